"""Tests for didistill.divergences.balanced (BD-KD) against its definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import rel_entr, softmax

from didistill.divergences import balanced

FAST = settings(max_examples=25, deadline=None, derandomize=True)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _logits(seed, shape=(5, 6), scale=2.0):
    rng = np.random.default_rng(seed)
    return scale * rng.normal(size=shape), scale * rng.normal(size=shape)


def _entropy(p):
    return -np.sum(p * np.log(p), axis=-1)


def _reference(z, v, temperature, high, low):
    """BD-KD student and teacher terms written from the definition with scipy."""
    p_s, p_t = softmax(z / temperature, axis=-1), softmax(v / temperature, axis=-1)
    h_s, h_t = _entropy(p_s), _entropy(p_t)
    w_fwd = np.where(h_t > h_s, high, low)
    w_rev = np.where(h_s > h_t, high, low)
    forward = rel_entr(p_t, p_s).sum(-1)  # KL(p_t || p_s)
    reverse = rel_entr(p_s, p_t).sum(-1)  # KL(p_s || p_t)
    student = temperature**2 * (w_fwd * forward + w_rev * reverse)
    return (w_fwd, w_rev), student, temperature**2 * reverse


class TestWeights:
    @FAST
    @given(seed=st.integers(0, 2**31 - 1), high=st.sampled_from([2.0, 3.0]))
    def test_against_definition(self, seed, high):
        z, v = _logits(seed)
        (w_fwd, w_rev), _, _ = _reference(z, v, 1.0, high, 1.0)
        got = balanced.entropy_balance_weights(z, v, high=high)
        np.testing.assert_array_equal(got[0], w_fwd)
        np.testing.assert_array_equal(got[1], w_rev)

    def test_direction(self):
        peaked = jnp.array([[8.0, 0.0, 0.0, 0.0]])
        flat = jnp.array([[0.1, 0.0, 0.0, 0.0]])
        # under-confident student (flat) vs peaked teacher: reverse KL (mode-seeking) leads
        w_fwd, w_rev = balanced.entropy_balance_weights(flat, peaked)
        assert (float(w_fwd[0]), float(w_rev[0])) == (1.0, 3.0)
        # over-confident student: forward KL (mass-covering) leads
        w_fwd, w_rev = balanced.entropy_balance_weights(peaked, flat)
        assert (float(w_fwd[0]), float(w_rev[0])) == (3.0, 1.0)
        # equal entropies: both low (a relabelled copy can differ by rounding, so use a copy)
        w_fwd, w_rev = balanced.entropy_balance_weights(peaked, peaked)
        assert (float(w_fwd[0]), float(w_rev[0])) == (1.0, 1.0)


class TestLosses:
    @FAST
    @given(seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([1.0, 2.0, 4.0]))
    def test_against_definition(self, seed, temperature):
        with jax.enable_x64(True):
            z, v = _logits(seed, shape=(2, 3, 7))
            _, student, teacher = _reference(z, v, temperature, 3.0, 1.0)
            got = balanced.bdkd_student_loss(z, v, temperature=temperature)
            assert got.shape == (2, 3)
            np.testing.assert_allclose(got, student, rtol=1e-10)
            np.testing.assert_allclose(
                balanced.bdkd_teacher_loss(v, z, temperature=temperature), teacher, rtol=1e-10
            )

    def test_identical_logits_give_zero(self):
        z, _ = _logits(0)
        np.testing.assert_allclose(balanced.bdkd_student_loss(z, z), 0.0, atol=1e-6)
        np.testing.assert_allclose(balanced.bdkd_teacher_loss(z, z), 0.0, atol=1e-6)

    def test_student_gradient_closed_form(self, x64):
        # With the weights held fixed: grad_z KL(p_t || p_s) = p_s - p_t and
        # grad_z KL(p_s || p_t) = p_s (log p_s - log p_t - KL(p_s || p_t)), at T = 1.
        z, v = _logits(1)
        (w_fwd, w_rev), _, reverse = _reference(z, v, 1.0, 3.0, 1.0)
        p_s, p_t = softmax(z, axis=-1), softmax(v, axis=-1)
        expected = w_fwd[:, None] * (p_s - p_t) + w_rev[:, None] * p_s * (
            np.log(p_s) - np.log(p_t) - reverse[:, None]
        )
        grad = jax.grad(lambda z: balanced.bdkd_student_loss(z, v).sum())(z)
        np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-12)

    def test_online_loss_routes_gradients(self, x64):
        z, v = _logits(2)
        grad_z, grad_v = jax.grad(
            lambda z, v: balanced.bdkd_online_loss(z, v, temperature=2.0, teacher_weight=0.5).sum(),
            argnums=(0, 1),
        )(z, v)
        np.testing.assert_allclose(
            grad_z,
            jax.grad(lambda z: balanced.bdkd_student_loss(z, v, temperature=2.0).sum())(z),
            rtol=1e-12,
        )
        # grad_v of T^2 KL(p_s || p_t) is T (p_t - p_s)
        p_s, p_t = softmax(z / 2.0, axis=-1), softmax(v / 2.0, axis=-1)
        np.testing.assert_allclose(grad_v, 0.5 * 2.0 * (p_t - p_s), rtol=1e-9, atol=1e-12)

    def test_masked_vocabulary_and_bf16(self):
        z, v = _logits(3, shape=(4, 6))
        z, v = z.copy(), v.copy()
        z[:, -1] = -np.inf
        v[:, -1] = -np.inf
        loss, grad = jax.value_and_grad(lambda z: balanced.bdkd_student_loss(z, v).sum())(z)
        assert np.isfinite(loss) and np.all(np.isfinite(grad))
        _, expected, _ = _reference(z[:, :-1], v[:, :-1], 1.0, 3.0, 1.0)
        np.testing.assert_allclose(balanced.bdkd_student_loss(z, v), expected, rtol=1e-5)
        low = balanced.bdkd_student_loss(z[:, :-1].astype(jnp.bfloat16), v[:, :-1])
        assert low.dtype == jnp.float32 and np.all(np.isfinite(low))
