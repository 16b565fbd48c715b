"""Reward-guided ancestral sampler (RGAS): reduction to the plain sampler, tilt identities,
best-of-k ordering, reward following, NFE accounting, and DiDi-Instruct's guided evaluation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import synthetic_didi
from didistill.diffusion import masked
from didistill.distill.discrete import didi
from didistill.distill.discrete.guided_sampling import guided_sample, tilt_log_probs
from tests.teachers import LANGUAGE, LENGTH

V, L = 4, 8  # tokens 0..3, [MASK] = 4
MASK = V
A = 2  # the token the test rewards prefer
SCHEDULE = masked.LogLinearSchedule()
TRANSITION = jax.random.normal(jax.random.key(0), (V + 1, V + 1))  # [prev id, V + 1]
POSITION = jax.random.normal(jax.random.key(1), (L, V + 1))


def student_fn(z, t):
    """A toy time-agnostic denoiser whose logits depend on the previous token, [B, L, V + 1]."""
    del t
    prev = jnp.roll(z, 1, axis=-1)
    return TRANSITION[prev] + POSITION[None]


def _onehot(tokens):
    return tokens if tokens.ndim == 3 else jax.nn.one_hot(tokens, V + 1)


def count_reward(tokens, t, is_masked, beta=1.0):
    """log r = beta * (number of A tokens): linear in the relaxed one-hot."""
    del t, is_masked
    return beta * jnp.sum(_onehot(tokens)[..., A], axis=-1)


WEIGHTS = 0.3 * jax.random.normal(jax.random.key(2), (L, V + 1))


def linear_reward(tokens, t, is_masked):
    """log r = sum_{l, j} W[l, j] u[l, j], a general linear reward."""
    del t, is_masked
    return jnp.einsum("blv,lv->b", _onehot(tokens), WEIGHTS)


@functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=("reward", "batch"))
def _sample(key, num_steps, options, *, reward=count_reward, batch=64):
    """guided_sample with hashable options ((name, value), ...); by default the grid down to 0
    without a final denoising step and argmax re-ranking over masked positions."""
    base = dict(
        guidance_scale=0.0, tilt_until=0.5, best_of=1, final_eps=0.0, rerank_temperature=0.0,
        rerank_positions="masked",
    )  # fmt: skip
    kw = dict(base, **dict(options))
    return guided_sample(
        student_fn, reward, key, batch, L, num_steps, MASK, SCHEDULE, kw.pop("guidance_scale"),
        kw.pop("tilt_until"), kw.pop("best_of"), **kw,
    )  # fmt: skip


class TestReducesToPlainSampler:
    @pytest.mark.parametrize("cache, tilt_until", [(True, 0.5), (False, 0.0)])
    def test_same_tokens_and_nfe(self, cache, tilt_until):
        key = jax.random.key(3)
        plain, plain_nfe = masked.ancestral_sample(
            student_fn, key, masked.all_masked(64, L, MASK), SCHEDULE, 6, cache=cache
        )
        tokens, nfe = _sample(key, 6, (("cache", cache), ("tilt_until", tilt_until)))
        np.testing.assert_array_equal(tokens, plain)
        assert int(nfe["student"]) == int(plain_nfe)
        assert int(nfe["discriminator"]) == int(nfe["discriminator_backward"]) == 0
        assert int(nfe["total"]) == int(plain_nfe)


class TestTilt:
    def _state(self):
        xt = jax.random.randint(jax.random.key(4), (3, L), 0, V + 1)  # a mix of tokens and masks
        xt = xt.at[:, 0].set(MASK).at[:, 1].set(0)
        logits = jax.random.normal(jax.random.key(5), (3, L, V + 1))
        return xt, masked.subs_log_probs(logits, xt)

    def test_state_tilt_adds_gamma_grad_at_masked_positions(self):
        xt, log_probs = self._state()
        gamma = 1.7
        tilted, grad = tilt_log_probs(
            linear_reward, log_probs, xt, 0.8, gamma, grad_clip=0.0, tilt_input="state"
        )
        np.testing.assert_allclose(grad, jnp.broadcast_to(WEIGHTS, grad.shape), rtol=1e-6)
        is_masked = np.asarray(xt == MASK)
        # masked positions: tilted - log_probs = gamma * W - (a per-position normaliser)
        shift = np.asarray(tilted - log_probs - gamma * WEIGHTS)[is_masked][:, :V]  # [M, V]
        np.testing.assert_allclose(shift, shift[:, :1] * np.ones((1, V)), atol=1e-5)
        expected = jax.nn.log_softmax(log_probs + gamma * WEIGHTS, axis=-1)
        np.testing.assert_allclose(np.asarray(tilted)[is_masked], np.asarray(expected)[is_masked])
        assert np.all(np.isneginf(np.asarray(tilted)[is_masked][:, MASK]))  # never predicts [MASK]
        # unmasked positions: the carry-over one-hot, unchanged
        np.testing.assert_array_equal(np.asarray(tilted)[~is_masked], log_probs[~is_masked])

    def test_prediction_tilt_differentiates_through_the_softmax(self):
        xt, log_probs = self._state()
        _, grad = tilt_log_probs(
            linear_reward, log_probs, xt, 0.8, 1.0, grad_clip=0.0, tilt_input="prediction"
        )
        p = jnp.exp(log_probs)
        expected = p * (WEIGHTS - jnp.sum(p * WEIGHTS, axis=-1, keepdims=True))
        expected = jnp.where((xt == MASK)[..., None], expected, 0.0)
        np.testing.assert_allclose(grad, expected, atol=1e-6)

    def test_gradient_is_clamped(self):
        xt, log_probs = self._state()
        reward = functools.partial(count_reward, beta=5.0)
        _, grad = tilt_log_probs(reward, log_probs, xt, 0.8, 1.0, grad_clip=1.0, tilt_input="state")
        assert float(jnp.max(jnp.abs(grad))) == pytest.approx(1.0)


class TestBestOf:
    def test_never_scores_below_one_candidate(self, reward=count_reward):
        # one step 1 -> 0, all re-ranking: candidate 1 is the best_of=1 draw of the same key
        for seed in range(3):
            key = jax.random.key(10 + seed)
            one, _ = _sample(key, 1, (("tilt_until", 1.0),), reward=reward)
            best, _ = _sample(key, 1, (("tilt_until", 1.0), ("best_of", 4)), reward=reward)
            score_one = reward(one, None, None)
            score_best = reward(best, None, None)
            assert bool(jnp.all(score_best >= score_one))
            assert float(jnp.mean(score_best)) > float(jnp.mean(score_one))


def _count_a(tokens):
    return float(jnp.mean(tokens == A))


@pytest.mark.parametrize(
    "options",
    [
        (("guidance_scale", 4.0), ("tilt_until", 0.0), ("tilt_input", "prediction")),
        (("guidance_scale", 1.0), ("tilt_until", 0.0), ("tilt_input", "state")),
        (("tilt_until", 1.0), ("best_of", 4)),
        (("tilt_until", 1.0), ("best_of", 4), ("rerank_temperature", 0.5)),  # the reference's
        (("guidance_scale", 0.5), ("guidance_scale_end", 2.0), ("best_of", 4)),
    ],
)
def test_guided_samples_contain_more_preferred_token(options):
    key = jax.random.key(7)
    plain, _ = _sample(key, 8, (), batch=256)
    guided, _ = _sample(key, 8, options, batch=256)
    assert not bool(jnp.any(guided == MASK))
    assert _count_a(guided) > _count_a(plain) + 0.05, (_count_a(guided), _count_a(plain))


def test_nfe_counts_every_network_call():
    # grid 1, 5/6, 4/6 | 3/6, 2/6, 1/6: 3 tilt steps (t > 0.5), 3 re-ranking steps
    opts = (("guidance_scale", 1.0), ("best_of", 4), ("cache", False))
    _, nfe = _sample(jax.random.key(0), 6, opts)
    assert {k: int(v) for k, v in nfe.items()} == {
        "student": 6, "discriminator": 3 + 4 * 3, "discriminator_backward": 3, "total": 21,
    }  # fmt: skip


# DiDi-Instruct's evaluate with the guided sampler


def _didi_config(teacher_path, **guided):
    config = synthetic_didi.get_config(f"{LANGUAGE},smoke")
    config.teacher.checkpoint = teacher_path
    config.data.length = LENGTH
    config.distill.update(teacher_sample_steps=2)
    config.eval.update(num_samples=8, batch_size=8, sample_steps=(2,))
    config.eval.guided.update(enabled=True, **guided)
    return config


def test_didi_evaluate_reports_guided_metrics(tiny_text_teacher, tmp_path):
    method = didi.make_method(_didi_config(tiny_text_teacher, guidance_scale=2.0, best_of=3))
    state = method.init(jax.random.key(0))
    results = method.evaluate(state, jax.random.key(1), str(tmp_path))
    prefix = "student_guided/steps2/"
    for key in ("gen_ppl", "entropy", "nfe", "invalid_rate", "nfe_discriminator", "nfe_total"):
        assert prefix + key in results, key
    assert math.isfinite(results[prefix + "gen_ppl"])
    # steps at t = 1 (tilt) and t = 0.5 (best of 3): 1 + 3 discriminator forwards, 1 backward
    assert results[prefix + "nfe_discriminator"] == 4
    assert results[prefix + "nfe_discriminator_backward"] == 1
    assert results[prefix + "nfe_total"] == results[prefix + "nfe"] + 4
    assert "student/steps2/gen_ppl" in results
    assert not synthetic_didi.get_config().eval.guided.enabled  # off by default
