"""The exact-marginal factorised sampler q* (`eval/factorised_limit.py`) against brute force."""

import itertools
import math
import os

import numpy as np
import pytest

from didistill.data import text
from didistill.eval import factorised_limit as fl
from didistill.eval import text as text_eval

MARKOV = text.MarkovLanguage.create(3, 1, 2, seed=1)
HMM = text.HMMLanguage.create(2, 3, seed=0)


def brute_probs(language, length):
    """(sequences [V^L, L], p(x) float64) by summing over every sequence (HMM: every path)."""
    v = language.vocab_size
    seqs = np.array(list(itertools.product(range(v), repeat=length)))
    if isinstance(language, text.MarkovLanguage):
        p = language.context_probs[seqs[:, 0]].copy()
        for i in range(1, length):
            p *= language.transition[seqs[:, i - 1], seqs[:, i]]
        return seqs, p
    p = np.zeros(len(seqs))
    for path in itertools.product(range(language.num_states), repeat=length):
        term = language.initial[path[0]] * language.emission[path[0], seqs[:, 0]]
        for i in range(1, length):
            term = term * language.transition[path[i - 1], path[i]]
            term = term * language.emission[path[i], seqs[:, i]]
        p += term
    return seqs, p


def brute_marginal(seqs, p, x, revealed, pos):
    """p(X_pos = . | X_R = x_R) by summing p over the sequences that agree with x on R."""
    agree = np.all((seqs == x) | ~revealed, axis=1)
    out = np.bincount(seqs[agree, pos], weights=p[agree], minlength=seqs.max() + 1)
    return out / out.sum()


@pytest.mark.parametrize("language", [MARKOV, HMM], ids=["markov", "hmm"])
def test_conditional_marginals_match_brute_force(language):
    length = 5
    seqs, p = brute_probs(language, length)
    rng = np.random.default_rng(0)
    x = language.sample(rng, 6, length)
    revealed = rng.random((6, length)) < 0.5
    marg = fl.conditional_marginals(fl.chain_of(language), x, revealed)
    for n in range(6):
        for pos in np.flatnonzero(~revealed[n]):
            np.testing.assert_allclose(
                marg[n, pos], brute_marginal(seqs, p, x[n], revealed[n], pos), atol=1e-12
            )


def test_one_position_per_step_is_the_source():
    """k = L, one position per step: an any-order autoregressive sampler, q* = p."""
    seqs, p = brute_probs(MARKOV, 4)
    seqs_q, q = fl.exact_distribution(MARKOV, 4, 4, reveal="equal")
    np.testing.assert_array_equal(seqs_q, seqs)
    np.testing.assert_allclose(q, p, atol=1e-7)


@pytest.mark.parametrize("language", [MARKOV, HMM], ids=["markov", "hmm"])
def test_one_step_is_the_product_of_marginals(language):
    seqs, p = brute_probs(language, 4)
    marginals = [np.bincount(seqs[:, i], weights=p, minlength=3) for i in range(4)]
    product = np.prod([marginals[i][seqs[:, i]] for i in range(4)], axis=0)
    _, q = fl.exact_distribution(language, 4, 1)
    np.testing.assert_allclose(q, product, atol=1e-7)
    assert q.sum() == pytest.approx(1.0)


def test_two_steps_by_hand():
    """k = 2 with MDLM's reveal law on L = 2: each grouping by hand."""
    seqs, p = brute_probs(MARKOV, 2)
    m0 = np.bincount(seqs[:, 0], weights=p, minlength=3)
    m1 = np.bincount(seqs[:, 1], weights=p, minlength=3)
    joint = p.reshape(3, 3)
    cond1 = joint / np.where(m0 > 0, m0, 1)[:, None]  # p(x1 | x0)
    cond0 = joint / np.where(m1 > 0, m1, 1)[None, :]  # p(x0 | x1)
    together = np.outer(m0, m1)  # both revealed at the same step (2 of the 4 groupings)
    expected = 0.5 * together + 0.25 * m0[:, None] * cond1 + 0.25 * cond0 * m1[None, :]
    _, q = fl.exact_distribution(MARKOV, 2, 2)
    np.testing.assert_allclose(q, expected.ravel(), atol=1e-7)


def test_monte_carlo_matches_enumeration():
    length, steps = 4, 2
    seqs, q = fl.exact_distribution(MARKOV, length, steps)
    nll = text_eval.exact_judge(MARKOV)(seqs) / length
    report = fl.limit_report(MARKOV, length, steps, num_samples=20000, seed=3)
    assert abs(report["nll_per_token"] - q @ nll) < 4 * report["nll_per_token_se"]
    freq = np.bincount(
        np.ravel_multi_index(fl.sample(MARKOV, np.random.default_rng(1), 20000, 4, 2).T, (3,) * 4),
        minlength=81,
    )
    np.testing.assert_allclose(freq / 20000, q, atol=0.01)


def test_markov_tiny_limit():
    """One position per step reaches the source's perplexity; fewer steps are worse."""
    lang = text.get_language("markov_tiny")
    source = math.exp(lang.entropy_per_token(32))
    full = fl.limit_report(lang, 32, 32, num_samples=2048, reveal="equal")
    assert full["invalid_rate"] == 0.0
    assert abs(full["nll_per_token"] - math.log(source)) < 4 * full["nll_per_token_se"]
    ppl = [fl.limit_report(lang, 32, k, num_samples=2048)["gen_ppl"] for k in (4, 16, 64)]
    assert ppl[0] > ppl[1] > ppl[2] > source


def test_reveal_steps_and_errors():
    steps = fl.reveal_steps(np.random.default_rng(0), 5, 10, 4, reveal="equal")
    for row in steps:
        assert sorted(np.bincount(row, minlength=4)) == [2, 2, 3, 3]
    assert fl.reveal_steps(np.random.default_rng(0), 5, 10, 4).max() < 4
    with pytest.raises(ValueError, match="reveal='x'"):
        fl.reveal_steps(np.random.default_rng(0), 1, 4, 2, reveal="x")
    with pytest.raises(ValueError, match="order-1 Markov and hidden Markov"):
        fl.chain_of(text.get_language("markov_small"))


def test_point_mass_samplers_by_brute_force():
    seqs, p = brute_probs(MARKOV, 6)
    with np.errstate(divide="ignore"):
        nll = -np.log(p) / 6
    x, value = fl.most_probable(MARKOV, 6)
    assert value == pytest.approx(nll.min())
    entropies = text_eval.unigram_entropies(seqs)
    possible = np.isfinite(nll)
    floors = np.unique(np.round(entropies[possible], 6))
    for floor in floors:
        x, value = fl.best_point_mass(MARKOV, 6, floor - 1e-9)
        assert value == pytest.approx(nll[entropies >= floor - 1e-9].min())
        assert text_eval.unigram_entropies(x[None])[0] >= floor - 1e-9
    assert fl.best_point_mass(MARKOV, 6, floors.max() + 1e-3) == (None, math.inf)


def test_ppl_table_draws_the_limit_row(tmp_path):
    from experiments import ppl_table

    meta = {"data": {"language": "markov_tiny", "length": 32}}
    row = ppl_table.limit_row(meta, (8, 16), num_samples=256)
    assert row["name"] == ppl_table.LIMIT_ROW and sorted(row["cells"]) == [8, 16]
    assert row["cells"][8]["gen_ppl"] > row["cells"][16]["gen_ppl"] > 1.8
    assert ppl_table.limit_row({"data": {"language": "markov_small", "length": 8}}, (8,), 8) is None
    path = ppl_table.plot([row], 1.815, str(tmp_path / "p.png"))
    assert os.path.getsize(path) > 0
    assert ppl_table.LIMIT_ROW in ppl_table.markdown([row], (8, 16), "header")
