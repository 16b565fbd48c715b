"""Text sample metrics: generative perplexity under a judge, unigram entropy, held-out NELBO.

Protocol (the `metrics.py` of MDLM, Sahoo et al. 2024, arXiv:2406.07524; DUO, Sahoo et al. 2025,
arXiv:2506.10892; DiDi-Instruct, Zheng et al. 2025, arXiv:2509.25035): samples are judged by
another model, Gen PPL = exp(total NLL / total tokens), and
always reported together with the samples' entropy, because a sampler can lower Gen PPL by
lowering diversity (e.g. float32 Gumbel sampling):

    gen_ppl  = exp( sum_n NLL_judge(x_n) / sum_n T_n )
    entropy  = mean_n H(unigram frequencies of the token ids of x_n)     (nats)
    nfe      = denoiser evaluations used to draw the samples

A judge is any callable `judge(tokens int [N, L]) -> nll [N]` (nats per sequence) or
`-> (nll [N], num_tokens [N])` when it re-tokenises (a GPT-2 judge of decoded text). For the
synthetic languages the judge is the exact source (`exact_judge`): gen_ppl is then exp of the
cross-entropy of the samples under the true distribution, compared with exp(H(X_{1:L}) / L)
of real data. A sparse source forbids most transitions, so the exact judge smooths every
conditional with a tiny uniform mass (default 1e-4) and also reports `invalid_rate`, the
fraction of sequences that the unsmoothed source gives probability 0.

Sampling: `ancestral_sampler` is the one jitted MDLM ancestral sampler of the library (the MDLM
teacher's evaluation, DiDi-Instruct, step halving), memoised per (network, schedule, step count,
cache flag, dtype) with the params an argument: a teacher and its student (same architecture)
sampled at the same step count share one compilation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from didistill.diffusion import masked

Judge = Callable[[np.ndarray], "np.ndarray | tuple[np.ndarray, np.ndarray]"]


def unigram_entropies(tokens) -> np.ndarray:
    """Entropy (nats) of each row's token-id frequencies, float64 [N] for tokens [N, L]."""
    tokens = np.asarray(tokens)
    out = np.empty(tokens.shape[0])
    for n, row in enumerate(tokens):
        freq = np.unique(row, return_counts=True)[1] / row.size
        out[n] = -np.sum(freq * np.log(freq))
    return out


def unigram_entropy(tokens) -> float:
    """Per-sample unigram entropy averaged over samples (the reference `record_entropy`)."""
    return float(np.mean(unigram_entropies(tokens)))


def judge_nll(judge: Judge, tokens) -> tuple[np.ndarray, np.ndarray]:
    """(nll [N], num_tokens [N]) from a judge of either return form."""
    tokens = np.asarray(tokens)
    out = judge(tokens)
    nll, count = out if isinstance(out, tuple) else (out, np.full(len(tokens), tokens.shape[1]))
    return np.asarray(nll, np.float64), np.asarray(count, np.float64)


def generative_perplexity(tokens, judge: Judge) -> float:
    """exp(total judge NLL / total judged tokens) of samples tokens [N, L]."""
    nll, count = judge_nll(judge, tokens)
    return float(np.exp(nll.sum() / count.sum()))


def exact_judge(language, smoothing: float = 1e-4) -> Judge:
    """The exact NLL -log p_e(x) [N] under a synthetic source (`didistill.data.text`), where
    p_e smooths each conditional as (1 - e) p + e / V."""
    log_prob = jax.jit(lambda x: language.log_prob(x, smoothing=smoothing))
    return lambda tokens: -np.asarray(log_prob(jnp.asarray(tokens, jnp.int32)), np.float64)


def invalid_rate(language, tokens) -> float:
    """Fraction of sequences with probability 0 under the (unsmoothed) source."""
    log_p = np.asarray(jax.jit(language.log_prob)(jnp.asarray(tokens, jnp.int32)))
    return float(np.mean(~np.isfinite(log_p)))


def sample_report(tokens, judge: Judge | None, nfe, language=None) -> dict[str, float]:
    """{'gen_ppl', 'entropy', 'nfe', 'nll_per_token'} of samples tokens [N, L] (and
    'invalid_rate' when the exact `language` is given); without a judge gen_ppl and
    nll_per_token are NaN (entropy and NFE are still reported)."""
    if judge is None:
        nan = float("nan")
        return {"gen_ppl": nan, "entropy": unigram_entropy(tokens), "nfe": int(nfe),
                "nll_per_token": nan}  # fmt: skip
    nll, count = judge_nll(judge, tokens)
    report = {
        "gen_ppl": float(np.exp(nll.sum() / count.sum())),
        "entropy": unigram_entropy(tokens),
        "nfe": int(nfe),
        "nll_per_token": float(nll.sum() / count.sum()),
    }
    if language is not None:
        report["invalid_rate"] = invalid_rate(language, tokens)
    return report


def sample_in_chunks(sample_fn, key, num_samples: int, batch_size: int, length: int, mask_id: int):
    """(tokens [num_samples, length], NFE) from an all-[MASK] start, `batch_size` rows at a time.

    sample_fn: `(key, x_init [rows, L]) -> (tokens [rows, L], nfe)`, nfe an int or a dict of
    ints; chunk i uses `fold_in(key, i)`. The NFE returned is the largest of any chunk (NFE
    per sampling run), leaf by leaf.
    """
    chunks, nfe = [], None
    for i, start in enumerate(range(0, num_samples, batch_size)):
        x_init = masked.all_masked(min(batch_size, num_samples - start), length, mask_id)
        tokens, used = sample_fn(jax.random.fold_in(key, i), x_init)
        chunks.append(np.asarray(tokens))
        used = jax.tree.map(int, used)
        nfe = used if nfe is None else jax.tree.map(max, nfe, used)
    return np.concatenate(chunks), nfe


@functools.lru_cache(maxsize=64)
def _jitted_ancestral_sampler(net, schedule, num_steps: int, cache: bool, dtype):
    def run(params, key, x_init):
        logits_fn = lambda xt, t: net.apply(params, xt, t)
        return masked.ancestral_sample(
            logits_fn, key, x_init, schedule, num_steps, cache=cache, dtype=dtype
        )

    return jax.jit(run)


def ancestral_sampler(
    net, schedule: masked.Schedule, num_steps: int, *, cache: bool = True, dtype=jnp.float32
):
    """The jitted `masked.ancestral_sample` of the denoiser `net` (logits = net.apply(params,
    z_t, t)): `(params, key, x_init [B, L]) -> (tokens int32 [B, L], nfe int32)`.

    One function per (net, schedule, num_steps, cache, dtype), memoised (`sampler_cache_info`);
    net and schedule are compared by value (frozen dataclasses), so equal architectures share
    it. The params are an argument, not a closed-over constant: every params of that
    architecture (teacher, student, EMA) reuses the compilation at a given x_init shape.
    `cache` (skip the network when no token changed) is exact only for a time-agnostic
    denoiser; float64 needs x64 mode when called.
    """
    return _jitted_ancestral_sampler(net, schedule, int(num_steps), bool(cache), jnp.dtype(dtype))


def sampler_cache_info():
    """`functools.lru_cache` statistics of `ancestral_sampler`'s memo (hits, misses, size)."""
    return _jitted_ancestral_sampler.cache_info()


def clear_sampler_cache() -> None:
    """Forgets every memoised `ancestral_sampler` (and so its compilations)."""
    _jitted_ancestral_sampler.cache_clear()


def ancestral_samples(
    net,
    params: Any,
    key,
    num_steps: int,
    schedule: masked.Schedule,
    *,
    num_samples: int,
    batch_size: int,
    length: int,
    mask_id: int,
    cache: bool = True,
    dtype=jnp.float32,
):
    """(tokens [num_samples, length], NFE) of `ancestral_sampler` from all-[MASK] starts,
    `batch_size` rows at a time (`sample_in_chunks`: chunk i uses fold_in(key, i))."""
    fn = ancestral_sampler(net, schedule, num_steps, cache=cache, dtype=dtype)
    return sample_in_chunks(
        lambda k, x: fn(params, k, x), key, num_samples, batch_size, length, mask_id
    )


def reports_at_steps(sample, models, key, sample_steps, judge: Judge, language=None):
    """{'<model>/steps<N>/<metric>': value} of `sample_report` for every model and step count.

    sample: `(params, key, num_steps) -> (tokens [N, L], nfe)`; models: {name: params}; the
    samples at N steps use `fold_in(key, N)` for every model (paired comparisons).
    """
    results = {}
    for name, params in models.items():
        for num_steps in sample_steps:
            tokens, nfe = sample(params, jax.random.fold_in(key, num_steps), num_steps)
            report = sample_report(tokens, judge, nfe, language)
            results.update({f"{name}/steps{num_steps}/{k}": v for k, v in report.items()})
    return results


def heldout_nelbo(
    logits_fn: masked.LogitsFn,
    batches: Iterable,
    key,
    schedule: masked.Schedule,
    mask_id: int,
    *,
    num_t: int = 4,
    t_min: float = 1e-3,
) -> dict[str, float]:
    """Monte Carlo NELBO of held-out data, in nats per token (and its PPL bound).

    batches: iterable of int token arrays [B, L]; each batch gets `num_t` independent
    low-discrepancy (t, mask) draws. Returns {'nelbo_per_token', 'ppl_bound'}: an upper bound
    (up to the O(eps) of the schedule) on the per-token NLL, so ppl_bound = exp(nelbo).
    """
    estimate = jax.jit(lambda k, x: masked.nelbo(logits_fn, k, x, schedule, mask_id, t_min=t_min))
    total, count = 0.0, 0
    for i, tokens in enumerate(batches):
        tokens = jnp.asarray(tokens, jnp.int32)
        for j in range(num_t):
            per_seq = estimate(jax.random.fold_in(key, i * num_t + j), tokens)  # [B]
            total += float(jnp.sum(per_seq))
            count += tokens.size
    if not count:
        raise ValueError("heldout_nelbo got no batches")
    value = total / count
    return {"nelbo_per_token": value, "ppl_bound": float(np.exp(value))}


__all__ = [
    "Judge",
    "ancestral_sampler",
    "ancestral_samples",
    "clear_sampler_cache",
    "exact_judge",
    "generative_perplexity",
    "heldout_nelbo",
    "invalid_rate",
    "judge_nll",
    "reports_at_steps",
    "sample_in_chunks",
    "sample_report",
    "sampler_cache_info",
    "unigram_entropies",
    "unigram_entropy",
]
