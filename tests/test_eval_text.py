"""Tests for didistill.eval.text: entropy, generative perplexity, judges, held-out NELBO, the
cached ancestral sampler."""

import itertools
import math

import flax.linen as nn
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


class _CountingDenoiser(nn.Module):
    """A token-embedding "denoiser" that records every trace of its call (TRACES)."""

    vocab_size: int

    @nn.compact
    def __call__(self, xt, t):
        _TRACES.append(xt.shape)
        return nn.Embed(self.vocab_size + 1, self.vocab_size + 1)(xt)


_TRACES: list = []


class TestAncestralSampler:
    def test_teacher_and_student_at_equal_steps_share_one_compilation(self):
        vocab, length, steps = 4, 6, 3
        schedule = masked.LogLinearSchedule()
        x = jnp.full((1, length), vocab, jnp.int32)
        teacher = _CountingDenoiser(vocab).init(jax.random.key(0), x, jnp.ones((1,)))
        student = jax.tree.map(
            lambda p: 3.0 * jax.random.normal(jax.random.key(2), p.shape), teacher
        )
        text_eval.clear_sampler_cache()
        _TRACES.clear()
        opts = dict(num_samples=10, batch_size=5, length=length, mask_id=vocab)
        key = jax.random.key(1)
        # two equal (not identical) networks, as a teacher file loaded twice gives
        out_t = text_eval.ancestral_samples(
            _CountingDenoiser(vocab), teacher, key, steps, schedule, **opts
        )
        traces = len(_TRACES)
        assert traces > 0
        out_s = text_eval.ancestral_samples(
            _CountingDenoiser(vocab), student, key, steps, schedule, **opts
        )
        assert len(_TRACES) == traces, "the student's sampling traced (compiled) again"
        info = text_eval.sampler_cache_info()
        assert (info.misses, info.hits, info.currsize) == (1, 1, 1)
        assert text_eval.ancestral_sampler(
            _CountingDenoiser(vocab), schedule, steps, cache=True, dtype=jnp.float32
        ) is text_eval.ancestral_sampler(_CountingDenoiser(vocab), schedule, steps)
        # the params are an argument: the student's samples are its own, not the teacher's
        assert not np.array_equal(out_t[0], out_s[0])
        # and the samples are those of masked.ancestral_sample with the params closed over
        net = _CountingDenoiser(vocab)
        for params, (tokens, nfe) in ((teacher, out_t), (student, out_s)):
            ref = text_eval.sample_in_chunks(
                jax.jit(
                    lambda k, x, p=params: masked.ancestral_sample(
                        lambda z, t: net.apply(p, z, t), k, x, schedule, steps
                    )
                ),
                key, 10, 5, length, vocab,
            )  # fmt: skip
            np.testing.assert_array_equal(tokens, ref[0])
            assert nfe == ref[1]
        # another step count, cache flag or dtype is another sampler
        text_eval.ancestral_sampler(_CountingDenoiser(vocab), schedule, steps + 1)
        text_eval.ancestral_sampler(_CountingDenoiser(vocab), schedule, steps, cache=False)
        assert text_eval.sampler_cache_info().currsize == 3
