"""Tests for didistill.diffusion.edm: hand-computed coefficients, schedule and Heun steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from didistill.diffusion import edm


def gaussian_denoiser(mean, std):
    """Exact E[x0 | x0 + sigma eps = x] for x0 ~ N(mean, std^2) (per coordinate)."""

    def denoise(x, sigma):
        var = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1)) ** 2
        return mean + std**2 / (std**2 + var) * (x - mean)

    return denoise


class TestPreconditioning:
    def test_hand_values_default_sigma_data(self):
        c = edm.preconditioning(0.5)  # sigma = sigma_data = 0.5: sigma^2 + sigma_data^2 = 0.5
        np.testing.assert_allclose(c.c_skip, 0.5, rtol=1e-6)
        np.testing.assert_allclose(c.c_out, 0.25 / math.sqrt(0.5), rtol=1e-6)
        np.testing.assert_allclose(c.c_in, 1 / math.sqrt(0.5), rtol=1e-6)
        np.testing.assert_allclose(c.c_noise, math.log(0.5) / 4, rtol=1e-6)

    def test_hand_values_other_sigma_data(self):
        c = edm.preconditioning(1.5, sigma_data=2.0)  # 2.25 + 4 = 6.25 = 2.5^2
        np.testing.assert_allclose(c.c_skip, 4 / 6.25, rtol=1e-6)
        np.testing.assert_allclose(c.c_out, 3.0 / 2.5, rtol=1e-6)
        np.testing.assert_allclose(c.c_in, 0.4, rtol=1e-6)
        np.testing.assert_allclose(c.c_noise, math.log(1.5) / 4, rtol=1e-6)

    @settings(max_examples=30, deadline=None)
    @given(st.floats(1e-3, 100.0), st.floats(0.1, 3.0))
    def test_identities(self, sigma, sigma_data):
        c = edm.preconditioning(sigma, sigma_data)
        # c_out^2 = sigma^2 c_skip and lambda = 1 / c_out^2.
        np.testing.assert_allclose(c.c_out**2, sigma**2 * c.c_skip, rtol=1e-4)
        np.testing.assert_allclose(edm.loss_weight(sigma, sigma_data) * c.c_out**2, 1, rtol=1e-4)

    def test_precondition_combines_raw_output(self):
        x = jnp.array([[1.0, -2.0], [0.5, 3.0]])  # [2, 2]
        sigma = jnp.array([0.3, 2.0])
        seen = {}

        def raw_fn(x_in, c_noise):
            seen["x_in"], seen["c_noise"] = x_in, c_noise
            return 2.0 * x_in + c_noise[:, None]

        out = edm.precondition(raw_fn, x, sigma, sigma_data=0.7)
        c = edm.preconditioning(sigma, 0.7)
        np.testing.assert_allclose(seen["x_in"], c.c_in[:, None] * x, rtol=1e-6)
        np.testing.assert_allclose(seen["c_noise"], np.log([0.3, 2.0]) / 4, rtol=1e-6)
        want = c.c_skip[:, None] * x + c.c_out[:, None] * (
            2 * c.c_in[:, None] * x + c.c_noise[:, None]
        )
        np.testing.assert_allclose(out, want, rtol=1e-6)

    def test_scalar_sigma_broadcasts(self):
        x = jnp.ones((3, 2, 2))
        raw_fn = lambda x_in, c: x_in
        np.testing.assert_allclose(
            edm.precondition(raw_fn, x, 0.4), edm.precondition(raw_fn, x, jnp.full((3,), 0.4))
        )


class TestLoss:
    def test_training_sigma_lognormal(self):
        sigma = edm.sample_training_sigma(jax.random.key(0), (200_000,))
        assert np.all(sigma > 0)
        np.testing.assert_allclose(np.mean(np.log(sigma)), -1.2, atol=0.01)
        np.testing.assert_allclose(np.std(np.log(sigma)), 1.2, atol=0.01)

    def test_exact_denoiser_of_gaussian_has_unit_loss(self):
        # x0 ~ N(m, s^2) with s = sigma_data: the posterior variance s^2 sigma^2 / (s^2 + sigma^2)
        # times lambda(sigma) is exactly 1 for every sigma, so the expected loss is 1.
        s, m = 0.5, 1.3
        x0 = m + s * jax.random.normal(jax.random.key(1), (100_000, 2))
        loss = edm.denoising_loss(gaussian_denoiser(m, s), x0, jax.random.key(2), sigma_data=s)
        np.testing.assert_allclose(loss, 1.0, atol=0.02)
        # Ignoring the mean (D = c_skip x) is worse.
        zero_mean = edm.denoising_loss(gaussian_denoiser(0.0, s), x0, jax.random.key(2), s)
        assert zero_mean > 1.5

    def test_gradient_flows(self):
        x0 = jax.random.normal(jax.random.key(0), (16, 3))
        grad = jax.grad(lambda a: edm.denoising_loss(lambda x, s: a * x, x0, jax.random.key(1)))(
            1.0
        )
        assert np.isfinite(grad) and grad != 0


class TestKarrasSigmas:
    def test_hand_values(self):
        sig = np.asarray(edm.karras_sigmas(3))
        mid = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
        np.testing.assert_allclose(sig, [80.0, mid, 0.002, 0.0], rtol=1e-5)

    def test_shape_order_and_trailing_zero(self):
        sig = np.asarray(edm.karras_sigmas(18))
        assert sig.shape == (19,) and sig[-1] == 0
        np.testing.assert_allclose([sig[0], sig[-2]], [80.0, 0.002], rtol=1e-5)
        assert np.all(np.diff(sig) < 0)

    def test_one_step_and_invalid(self):
        np.testing.assert_allclose(edm.karras_sigmas(1, sigma_max=5.0), [5.0, 0.0])
        with pytest.raises(ValueError, match="num_steps"):
            edm.karras_sigmas(0)


class TestHeun:
    mean, std = 0.7, 0.3

    def _denoise(self):
        return gaussian_denoiser(self.mean, self.std)

    def test_one_step_is_the_denoiser(self):
        # A single Euler step from sigma_max to 0 lands on D(x_0; sigma_max).
        z = jnp.array([[0.3], [-1.2]])
        out = edm.heun_sample(self._denoise(), z, num_steps=1, sigma_max=2.0)
        x0 = 2.0 * z
        np.testing.assert_allclose(out, self._denoise()(x0, jnp.full((2,), 2.0)), rtol=1e-5)

    def test_two_steps_by_hand(self):
        m, s = self.mean, self.std
        s0, s1 = 3.0, 0.5
        z = 0.8
        x = s0 * z
        d = lambda x, sig: sig * (x - m) / (s**2 + sig**2)  # (x - D) / sigma for this data
        x_euler = x + (s1 - s0) * d(x, s0)
        x1 = x + (s1 - s0) * 0.5 * (d(x, s0) + d(x_euler, s1))
        x2 = m + s**2 / (s**2 + s1**2) * (x1 - m)  # final Euler step = D(x1; s1)
        out = edm.heun_sample(self._denoise(), jnp.array([[z]]), sigmas=jnp.array([s0, s1, 0.0]))
        np.testing.assert_allclose(out[0, 0], x2, rtol=1e-5)

    def test_many_steps_follow_the_exact_flow(self):
        # For Gaussian data the probability-flow ODE is linear: x(sigma) - m is proportional to
        # sqrt(s^2 + sigma^2), so x(0) = m + (x(sigma_max) - m) s / sqrt(s^2 + sigma_max^2).
        z = jax.random.normal(jax.random.key(0), (4000, 1))
        sm, m, s = 80.0, self.mean, self.std
        exact = m + (sm * z - m) * s / math.sqrt(s**2 + sm**2)
        errors = {}
        for n in (64, 256):
            out = edm.heun_sample(self._denoise(), z, num_steps=n)
            errors[n] = float(np.max(np.abs(out - exact)))
        assert errors[256] < 1e-3
        assert errors[64] / errors[256] > 10  # second order: 4x the steps, ~16x less error
        np.testing.assert_allclose([np.mean(out), np.std(out)], [m, s], atol=0.02)

    @pytest.mark.parametrize("num_steps", [1, 2, 5, 18])
    def test_nfe_is_2n_minus_1(self, num_steps):
        calls = []

        def counting(x, sigma):
            calls.append(1)
            return self._denoise()(x, sigma)

        with jax.disable_jit():  # scan runs as a Python loop, so every call is counted
            _, nfe = edm.heun_sample(counting, jnp.zeros((2, 1)), num_steps, return_nfe=True)
        assert len(calls) == int(nfe) == edm.heun_nfe(num_steps) == 2 * num_steps - 1

    def test_jit_matches_eager_and_image_shapes(self):
        z = jax.random.normal(jax.random.key(3), (4, 2, 3, 3))  # [B, H, W, C]
        eager = edm.heun_sample(self._denoise(), z, 6)
        jitted = jax.jit(lambda z: edm.heun_sample(self._denoise(), z, 6))(z)
        assert jitted.shape == z.shape
        np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-6)

    def test_steps_for_nfe(self):
        assert edm.heun_steps_for_nfe(35) == 18 and edm.heun_steps_for_nfe(1) == 1
        with pytest.raises(ValueError, match="odd"):
            edm.heun_steps_for_nfe(34)


def test_score_from_denoiser_gaussian():
    m, s = 0.7, 0.3
    x = jnp.array([[0.1, 2.0], [-1.0, 0.5]])
    sigma = jnp.array([0.2, 1.5])
    score = edm.score_from_denoiser(gaussian_denoiser(m, s)(x, sigma), x, sigma)
    want = -(x - m) / (s**2 + sigma[:, None] ** 2)
    np.testing.assert_allclose(score, want, rtol=1e-5)
