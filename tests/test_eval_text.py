"""Tests for didistill.eval.text: entropy, generative perplexity, judges, held-out NELBO."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.data import text
from didistill.diffusion import masked
from didistill.eval import text as text_eval


class TestUnigramEntropy:
    def test_hand_values(self):
        tokens = np.array([[0, 0, 0, 0], [0, 1, 2, 3], [5, 5, 7, 7]])
        np.testing.assert_allclose(
            text_eval.unigram_entropies(tokens), [0.0, math.log(4), math.log(2)]
        )
        assert text_eval.unigram_entropy(tokens) == pytest.approx(math.log(8) / 3)


class TestGenerativePerplexity:
    def test_constant_judge(self):
        judge = lambda tokens: np.full(len(tokens), 2.0 * tokens.shape[1])
        tokens = np.zeros((3, 5), np.int32)
        assert text_eval.generative_perplexity(tokens, judge) == pytest.approx(math.exp(2.0))

    def test_retokenising_judge_weights_by_its_token_count(self):
        judge = lambda tokens: (np.array([1.0, 9.0]), np.array([1, 3]))
        tokens = np.zeros((2, 7), np.int32)
        assert text_eval.generative_perplexity(tokens, judge) == pytest.approx(math.exp(10 / 4))

    def test_exact_judge_matches_enumeration(self):
        lang = text.get_language("markov_tiny")
        seqs = np.array(list(itertools.product(range(4), repeat=4)), np.int32)
        nll = text_eval.exact_judge(lang, smoothing=0.0)(seqs)
        p = np.exp(-nll)
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
        # Gen PPL of data under the exact judge estimates exp(H(X_{1:L}) / L)
        x = lang.sample(np.random.default_rng(0), 4000, 4)
        ppl = text_eval.generative_perplexity(x, text_eval.exact_judge(lang, smoothing=0.0))
        assert math.log(ppl) == pytest.approx(lang.entropy_per_token(4), abs=0.03)

    def test_report_has_ppl_entropy_nfe_and_invalid_rate(self):
        lang = text.get_language("markov_tiny")
        x = lang.sample(np.random.default_rng(1), 64, 8)
        report = text_eval.sample_report(x, text_eval.exact_judge(lang), 7, lang)
        assert {"gen_ppl", "entropy", "nfe", "invalid_rate"} <= set(report)
        assert report["nfe"] == 7 and report["invalid_rate"] == 0.0
        c = int(np.argmax(lang.context_probs))  # order 1: a context is one token
        pairs = np.array([[c, np.argmin(lang.transition[c])], [c, np.argmax(lang.transition[c])]])
        assert text_eval.invalid_rate(lang, pairs) == 0.5  # the first pair is forbidden


class TestHeldoutNelbo:
    def test_uniform_denoiser_gives_log_vocab(self):
        # every conditional of a uniform denoiser is 1/V, so NELBO = L log V exactly on average
        vocab, length = 5, 6
        fn = lambda xt, t: jnp.zeros(xt.shape + (vocab + 1,))
        data = [np.random.default_rng(i).integers(0, vocab, (512, length)) for i in range(2)]
        out = text_eval.heldout_nelbo(
            fn, data, jax.random.key(0), masked.LogLinearSchedule(0.0), vocab, num_t=4, t_min=0.0
        )
        assert out["nelbo_per_token"] == pytest.approx(math.log(vocab), rel=0.03)
        assert out["ppl_bound"] == pytest.approx(math.exp(out["nelbo_per_token"]))

    def test_no_batches(self):
        with pytest.raises(ValueError, match="no batches"):
            text_eval.heldout_nelbo(
                lambda xt, t: None, [], jax.random.key(0), masked.LogLinearSchedule(), 3
            )
