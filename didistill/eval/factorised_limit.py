"""The few-step limit of a factorised sampler on a synthetic language with exact likelihood.

A k-step masked-diffusion sampler (MDLM's ancestral sampler, a DiDi-Instruct or step-halving
student) reveals the L positions in k groups G_1, ..., G_k and, at step j, draws the tokens of
G_j independently of each other given the tokens revealed before, R_j = G_1 u ... u G_{j-1}:

    q(x) = E_G [ prod_j prod_{l in G_j} q_j(x_l | x_{R_j}) ]                           (1)

The network chooses the per-position laws q_j(. | x_{R_j}); the sampler, not the network,
chooses the groups: in MDLM each position's reveal step is drawn independently with
P(step i) = (alpha_{t_{i+1}} - alpha_{t_i}) / (1 - alpha_1), uniform over the k steps for the
log-linear schedule on the grid t_i = 1 - i/k (`reveal='mdlm'`); `reveal='equal'` cuts a
uniformly random order of the positions into k groups of L/k (sizes differing by at most one).

The factorised sampler closest to the source. Among samplers of the form (1), the one with the
exact conditional marginals of the source p,

    q*_j(x_l | x_{R_j}) = p(X_l = x_l | X_{R_j} = x_{R_j}),                            (2)

minimises KL(p || q) for every fixed grouping: log q(x) = sum_j sum_{l in G_j} log q_j(x_l | .)
and E_p[-log q(x)] = sum_j E_p[ sum_{l in G_j} -log q_j(X_l | X_{R_j}) ], each term the
cross-entropy of a product law against p(X_{G_j} | X_{R_j}), minimised by the product of that
law's marginals. So q* is the maximum-likelihood factorised sampler: what a perfect MDLM
teacher (its denoiser is exactly (2)) and a student matched to it by forward KL sample. Its
special cases: k = L with `reveal='equal'` reveals one position per step, an exact
any-order autoregressive sampler, q* = p; k = 1 draws every position at once, q* = prod_l p(x_l).

Evaluation: gen_ppl = exp(E_q*[-log p_e(x)] / L) under the judge of the tables (the exact source
smoothed by e = 1e-4, `eval.text.exact_judge`) and the samples' unigram entropy, by Monte Carlo:
`sample` draws from q* exactly (the marginals (2) by the forward-backward algorithm on the
source written as a hidden Markov chain: order-1 Markov = states are tokens, emission the
identity; HMM as is). Positions revealed together may form a sequence the sparse source
forbids; the marginals given such a context are taken under the smoothed source p_e with
e = `context_smoothing` (1e-9; the e -> 0 limit: the fewest forbidden transitions). For tiny
languages, `exact_distribution` evaluates (1) exactly by enumerating every grouping.

What this is not: a lower bound on the gen_ppl of every factorised sampler. A sampler may go
below q* by giving up diversity: log gen_ppl = (H(q) + KL(q || p)) / L, and the point mass on
the most probable sequence (`most_probable`, a factorised sampler whose every step is
deterministic) reaches min_x -log p(x) / L, below the source's own entropy; with a cycle of
several tokens it even keeps a high per-sample unigram entropy, the statistic the tables report
next to gen_ppl. So gen_ppl with unigram entropy cannot rule such samplers out: q* is the limit
of a factorised sampler that keeps the source's law as far as a factorised sampler can
(forward KL), and a student's distance below it is paid for in diversity.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from didistill.data import text

REVEALS = ("mdlm", "equal")


def chain_of(language, smoothing: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(initial [S], transition [S, S], emission [S, V]) float64 of `language` as a hidden
    Markov chain: an order-1 `MarkovLanguage` (states = tokens, emission the identity; its
    tables smoothed as (1 - e) p + e / V) or an `HMMLanguage` (unchanged)."""
    if isinstance(language, text.HMMLanguage):
        return language.initial, language.transition, language.emission
    if isinstance(language, text.MarkovLanguage) and language.order == 1:
        v = language.vocab_size
        smooth = lambda p: (1.0 - smoothing) * p + smoothing / v
        return smooth(language.context_probs), smooth(language.transition), np.eye(v)
    raise ValueError(
        f"factorised_limit handles order-1 Markov and hidden Markov languages; got "
        f"{type(language).__name__} (order {getattr(language, 'order', '?')}): use markov_tiny "
        "or an hmm_* language"
    )


def conditional_marginals(chain, tokens, revealed) -> np.ndarray:
    """p(X_l = v | X_R = x_R) float64 [B, L, V] for tokens int [B, L] with revealed bool [B, L]
    (R: the revealed positions; only the rows of masked positions are meant), by
    forward-backward with scaling:

        f_l(s) = p(S_l = s, x_{R, <l}) (normalised),  f_{l+1} = (f_l * e_l) A
        b_l(s) = p(x_{R, >l} | S_l = s) (normalised), b_l = A (e_{l+1} * b_{l+1})
        p(X_l = v | x_R) prop. to sum_s f_l(s) e_l(s) b_l(s) B[s, v] (masked l: e_l = 1)

    with e_l(s) = B[s, x_l] at revealed l, 1 otherwise.
    """
    initial, transition, emission = chain
    tokens, revealed = np.asarray(tokens), np.asarray(revealed, bool)
    batch, length = tokens.shape
    evidence = np.where(revealed[..., None], emission.T[tokens], 1.0)  # [B, L, S]
    fwd = np.empty(evidence.shape)
    bwd = np.empty(evidence.shape)
    f = np.broadcast_to(initial, (batch, initial.size))
    for pos in range(length):
        fwd[:, pos] = f
        f = (f * evidence[:, pos]) @ transition
        f = f / f.sum(axis=-1, keepdims=True)
    b = np.ones((batch, initial.size))
    for pos in range(length - 1, -1, -1):
        bwd[:, pos] = b
        b = (evidence[:, pos] * b) @ transition.T
        b = b / b.sum(axis=-1, keepdims=True)
    post = fwd * bwd * evidence  # [B, L, S]
    marg = post @ emission  # [B, L, V]
    return marg / marg.sum(axis=-1, keepdims=True)


def reveal_steps(rng, batch: int, length: int, num_steps: int, reveal: str = "mdlm"):
    """The step (0..k-1) at which each position is revealed, int [batch, length]: 'mdlm'
    independent and uniform (MDLM's log-linear schedule on the uniform grid), 'equal' a
    uniformly random order cut into k groups of sizes floor or ceil of L/k."""
    if reveal == "mdlm":
        return rng.integers(0, num_steps, size=(batch, length))
    if reveal == "equal":
        bounds = np.linspace(0, length, num_steps + 1).round().astype(int)
        step_of_rank = np.searchsorted(bounds, np.arange(length), side="right") - 1
        order = np.argsort(rng.random((batch, length)), axis=1)
        steps = np.empty((batch, length), np.int64)
        np.put_along_axis(steps, order, np.broadcast_to(step_of_rank, (batch, length)), axis=1)
        return steps
    raise ValueError(f"reveal={reveal!r}: use one of {REVEALS}")


def sample(
    language, rng, num_samples: int, length: int, num_steps: int, reveal: str = "mdlm",
    context_smoothing: float = 1e-9,
) -> np.ndarray:  # fmt: skip
    """num_samples sequences int32 [N, L] of the exact-marginal factorised sampler q* (2).

    Only the order of the non-empty groups matters, so the loop runs over each row's g-th
    non-empty group (at most L rounds whatever k)."""
    chain = chain_of(language, context_smoothing)
    steps = reveal_steps(rng, num_samples, length, num_steps, reveal)
    # rank of each position's group among its row's non-empty groups
    sorted_steps = np.sort(steps, axis=1)
    new = np.concatenate(
        [np.ones((num_samples, 1), bool), sorted_steps[:, 1:] != sorted_steps[:, :-1]], axis=1
    )
    ranks_sorted = np.cumsum(new, axis=1) - 1
    rank = np.empty_like(steps)
    np.put_along_axis(rank, np.argsort(steps, axis=1, kind="stable"), ranks_sorted, axis=1)
    tokens = np.zeros((num_samples, length), np.int64)
    revealed = np.zeros((num_samples, length), bool)
    for group in range(int(rank.max()) + 1):
        now = rank == group
        marg = conditional_marginals(chain, tokens, revealed)
        u = rng.random((num_samples, length, 1))
        draw = np.minimum((u > np.cumsum(marg, axis=-1)).sum(-1), language.vocab_size - 1)
        tokens = np.where(now, draw, tokens)
        revealed |= now
    return tokens.astype(np.int32)


def limit_report(
    language, length: int, num_steps: int, *, num_samples: int = 8192, seed: int = 0,
    reveal: str = "mdlm", smoothing: float = 1e-4,
) -> dict[str, float]:  # fmt: skip
    """`sample_report` of q* at `num_steps` under the tables' exact judge (smoothing e), plus
    'nll_per_token_se' (standard error of the per-token NLL) and 'num_samples'."""
    from didistill.eval import text as text_eval

    tokens = sample(language, np.random.default_rng(seed), num_samples, length, num_steps, reveal)
    judge = text_eval.exact_judge(language, smoothing)
    report = text_eval.sample_report(tokens, judge, num_steps, language)
    nll = np.asarray(judge(tokens)) / length
    report["nll_per_token_se"] = float(nll.std(ddof=1) / math.sqrt(num_samples))
    report["num_samples"] = num_samples
    return report


def _groupings(length: int, num_steps: int, reveal: str):
    """Every (groups, probability) of `reveal_steps`: groups a list of position tuples."""
    if reveal == "mdlm":
        prob = float(num_steps) ** -length
        for steps in itertools.product(range(num_steps), repeat=length):
            yield [tuple(p for p in range(length) if steps[p] == j) for j in range(num_steps)], prob
    elif reveal == "equal":
        bounds = np.linspace(0, length, num_steps + 1).round().astype(int)
        prob = 1.0 / math.factorial(length)
        for order in itertools.permutations(range(length)):
            yield [tuple(order[bounds[j] : bounds[j + 1]]) for j in range(num_steps)], prob
    else:
        raise ValueError(f"reveal={reveal!r}: use one of {REVEALS}")


def exact_distribution(
    language, length: int, num_steps: int, reveal: str = "mdlm", context_smoothing: float = 1e-9
):
    """(sequences int [V^L, L], q*(x) [V^L]) of (1)-(2) by enumerating every grouping (the
    marginals under the same smoothed source as `sample`); for tiny V and L only (V^L
    sequences times k^L or L! groupings)."""
    v = language.vocab_size
    seqs = np.array(list(itertools.product(range(v), repeat=length)), np.int64)
    chain = chain_of(language, context_smoothing)
    q = np.zeros(len(seqs))
    for groups, prob in _groupings(length, num_steps, reveal):
        term = np.ones(len(seqs))
        revealed = np.zeros(seqs.shape, bool)
        for group in groups:
            if not group:
                continue
            marg = conditional_marginals(chain, seqs, revealed)
            for pos in group:
                term *= marg[np.arange(len(seqs)), pos, seqs[:, pos]]
            revealed[:, list(group)] = True
        q += prob * term
    return seqs, q


def most_probable(language, length: int) -> tuple[np.ndarray, float]:
    """(x* int32 [L], -log p(x*) / L): the most probable sequence of an order-1 Markov
    language (Viterbi), the gen_ppl floor exp(-log p(x*) / L) of a point-mass sampler."""
    if not (isinstance(language, text.MarkovLanguage) and language.order == 1):
        raise ValueError("most_probable: order-1 Markov languages only (use markov_tiny)")
    with np.errstate(divide="ignore"):
        log_init, log_t = np.log(language.context_probs), np.log(language.transition)
    score, back = log_init, []
    for _ in range(length - 1):
        cand = score[:, None] + log_t  # [from, to]
        back.append(cand.argmax(axis=0))
        score = cand.max(axis=0)
    path = [int(score.argmax())]
    for ptr in reversed(back):
        path.append(int(ptr[path[-1]]))
    return np.array(path[::-1], np.int32), float(-score.max() / length)


def best_point_mass(language, length: int, min_entropy: float) -> tuple[np.ndarray, float]:
    """(x int32 [L], -log p(x) / L) of the most probable sequence of an order-1 Markov
    language whose unigram entropy is >= min_entropy (nats), or (None, inf) if none: the
    lowest gen_ppl of a point-mass sampler (factorised, every step deterministic) that passes a
    unigram-entropy check. Dynamic programming over (token counts so far, last token):
    the entropy depends on the counts only, and log p is additive along the chain."""
    if not (isinstance(language, text.MarkovLanguage) and language.order == 1):
        raise ValueError("best_point_mass: order-1 Markov languages only (use markov_tiny)")
    v = language.vocab_size
    with np.errstate(divide="ignore"):
        log_init, log_t = np.log(language.context_probs), np.log(language.transition)
    # best[(counts, last)] = (log p of the best prefix, the prefix)
    best = {}
    for tok in range(v):
        if np.isfinite(log_init[tok]):
            counts = tuple(int(i == tok) for i in range(v))
            best[(counts, tok)] = (log_init[tok], (tok,))
    for _ in range(length - 1):
        nxt = {}
        for (counts, last), (score, prefix) in best.items():
            for tok in np.flatnonzero(np.isfinite(log_t[last])):
                key = (counts[:tok] + (counts[tok] + 1,) + counts[tok + 1 :], int(tok))
                cand = score + log_t[last, tok]
                if key not in nxt or cand > nxt[key][0]:
                    nxt[key] = (cand, prefix + (int(tok),))
        best = nxt
    top, top_x = -np.inf, None
    for (counts, _), (score, prefix) in best.items():
        freq = np.array([c for c in counts if c]) / length
        if -np.sum(freq * np.log(freq)) >= min_entropy and score > top:
            top, top_x = score, prefix
    if top_x is None:
        return None, math.inf
    return np.array(top_x, np.int32), float(-top / length)


__all__ = [
    "REVEALS",
    "best_point_mass",
    "chain_of",
    "conditional_marginals",
    "exact_distribution",
    "limit_report",
    "most_probable",
    "reveal_steps",
    "sample",
]
