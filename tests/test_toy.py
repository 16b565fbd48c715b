"""Tests for didistill.data.toy: exact noisy densities, scores, denoisers, sampling, batches."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from didistill.data import toy


@pytest.fixture(scope="module")
def full_cov():
    """Three overlapping components with full, anisotropic covariances."""
    covs = [[[0.3, 0.1], [0.1, 0.2]], [[0.05, -0.02], [-0.02, 0.4]], [[0.2, 0.0], [0.0, 0.2]]]
    return toy.GaussianMixture.create(
        [[0.0, 0.0], [1.0, 0.5], [-0.8, 1.2]], [0.5, 0.2, 0.3], covariances=covs
    )


def scipy_log_prob(mixture, x, sigma):
    covs = np.asarray(mixture.covariances) + sigma**2 * np.eye(2)
    dens = sum(
        w * stats.multivariate_normal(m, c).pdf(x)
        for w, m, c in zip(
            np.asarray(mixture.weights), np.asarray(mixture.means), covs, strict=True
        )
    )
    return np.log(dens)


class TestGaussianMixture:
    def test_create_validates(self):
        with pytest.raises(ValueError, match="exactly one"):
            toy.GaussianMixture.create([[0.0, 0.0]])
        with pytest.raises(ValueError, match="positive definite"):
            toy.GaussianMixture.create([[0.0, 0.0]], covariances=[[[1.0, 0.0], [0.0, -1.0]]])
        with pytest.raises(ValueError, match="weights"):
            toy.GaussianMixture.create([[0.0, 0.0]], [-1.0], stds=1.0)

    def test_weights_normalised_and_covariances_roundtrip(self, full_cov):
        np.testing.assert_allclose(np.sum(full_cov.weights), 1.0, rtol=1e-6)
        np.testing.assert_allclose(
            full_cov.covariances[1], [[0.05, -0.02], [-0.02, 0.4]], atol=1e-6
        )

    @pytest.mark.parametrize("sigma", [0.0, 0.3, 2.0])
    def test_log_prob_matches_scipy(self, full_cov, sigma):
        x = jax.random.normal(jax.random.key(0), (50, 2)) * 1.5
        np.testing.assert_allclose(
            full_cov.log_prob(x, sigma), scipy_log_prob(full_cov, np.asarray(x), sigma), rtol=1e-4
        )

    @pytest.mark.parametrize("name,sigma", [("ring8", 0.3), ("grid25", 0.05), ("moons", 1.0)])
    def test_noisy_density_integrates_to_one(self, name, sigma):
        mixture = toy.get_toy(name)
        ticks = np.linspace(-7.0, 7.0, 561)  # spacing 0.025
        grid = np.stack(np.meshgrid(ticks, ticks), axis=-1).reshape(-1, 2)
        dens = np.exp(np.asarray(mixture.log_prob(jnp.asarray(grid), sigma)))
        np.testing.assert_allclose(dens.sum() * (ticks[1] - ticks[0]) ** 2, 1.0, atol=2e-3)

    @pytest.mark.parametrize("sigma", [0.0, 0.1, 1.0, 10.0])
    def test_score_is_grad_log_prob(self, full_cov, sigma):
        x = jax.random.normal(jax.random.key(1), (20, 2))
        auto = jax.vmap(jax.grad(lambda v: full_cov.log_prob(v[None], sigma)[0]))(x)
        np.testing.assert_allclose(full_cov.score(x, sigma), auto, rtol=1e-4, atol=1e-5)

    def test_per_row_sigma(self, full_cov):
        x = jax.random.normal(jax.random.key(2), (3, 2))
        sigma = jnp.array([0.1, 0.5, 2.0])
        rows = [full_cov.denoiser(x[i : i + 1], sigma[i])[0] for i in range(3)]
        np.testing.assert_allclose(full_cov.denoiser(x, sigma), np.stack(rows), rtol=1e-5)

    @pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
    def test_denoiser_is_tweedie(self, full_cov, sigma):
        x = jax.random.normal(jax.random.key(3), (20, 2))
        tweedie = x + sigma**2 * full_cov.score(x, sigma)
        np.testing.assert_allclose(full_cov.denoiser(x, sigma), tweedie, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("sigma", [0.3, 1.0])
    def test_denoiser_against_importance_sampling(self, full_cov, sigma):
        # E[x0 | x_t] = sum_i x0_i N(x_t; x0_i, sigma^2) / sum_i N(x_t; x0_i, sigma^2), x0_i ~ p.
        x0 = full_cov.sample(jax.random.key(4), 400_000)  # [M, 2]
        x_t = jnp.array([[0.2, 0.4], [1.0, 1.0], [-1.0, 1.5]])  # [3, 2]
        log_w = -jnp.sum((x_t[:, None] - x0[None]) ** 2, -1) / (2 * sigma**2)  # [3, M]
        mc = jnp.einsum("nm,md->nd", jax.nn.softmax(log_w, axis=1), x0)
        np.testing.assert_allclose(full_cov.denoiser(x_t, sigma), mc, atol=0.01)

    def test_large_sigma_and_far_points_are_stable(self):
        mixture = toy.get_toy("ring8")
        x = jnp.array([[1e3, -1e3], [0.0, 0.0]])
        assert np.all(np.isfinite(mixture.log_prob(x)))
        assert np.all(np.isfinite(mixture.score(x, 0.0)))
        mean = np.asarray(mixture.weights @ mixture.means)
        np.testing.assert_allclose(mixture.denoiser(x[1:], 80.0)[0], mean, atol=1e-3)

    def test_responsibilities_and_assign_modes(self):
        mixture = toy.get_toy("ring8")
        x, modes = mixture.sample(jax.random.key(5), 4000, return_modes=True)
        resp = mixture.responsibilities(x)
        np.testing.assert_allclose(np.sum(resp, axis=1), 1.0, rtol=1e-5)
        assert np.mean(mixture.assign_modes(x) == modes) > 0.999

    def test_jit_with_mixture_argument(self, full_cov):
        x = jnp.ones((4, 2))
        fn = jax.jit(lambda m, v: m.log_prob(v, 0.2))
        np.testing.assert_allclose(fn(full_cov, x), full_cov.log_prob(x, 0.2), rtol=1e-6)


class TestSampling:
    @pytest.mark.parametrize("source", ["jax", "numpy"])
    def test_moments_and_mode_frequencies(self, full_cov, source):
        n = 200_000
        rng = jax.random.key(6) if source == "jax" else np.random.default_rng(6)
        x, modes = full_cov.sample(rng, n, return_modes=True)
        assert x.shape == (n, 2) and x.dtype == np.float32
        freq = np.bincount(np.asarray(modes), minlength=3) / n
        np.testing.assert_allclose(freq, full_cov.weights, atol=5e-3)
        np.testing.assert_allclose(np.std(np.asarray(x), axis=0), toy.data_std(full_cov), rtol=0.01)
        sel = np.asarray(x)[np.asarray(modes) == 1]
        np.testing.assert_allclose(np.cov(sel.T), full_cov.covariances[1], atol=5e-3)

    def test_data_std_isotropic_ring(self):
        # ring8 is symmetric under rotation by 90 degrees: equal stds, r^2 / 2 + 0.1^2 each.
        np.testing.assert_allclose(
            toy.data_std(toy.get_toy("ring8")), np.sqrt(2.0 + 0.01), rtol=1e-5
        )


class TestToys:
    @pytest.mark.parametrize("name,num_modes", [("ring8", 8), ("grid25", 25), ("moons", 32)])
    def test_named_toys(self, name, num_modes):
        mixture = toy.get_toy(name)
        assert mixture.num_modes == num_modes and mixture.dim == 2

    def test_ring8_has_rare_modes(self):
        w = np.asarray(toy.get_toy("ring8").weights)
        np.testing.assert_allclose(w[[3, 7]], 1 / 26, rtol=1e-5)
        np.testing.assert_allclose(np.delete(w, [3, 7]), 4 / 26, rtol=1e-5)

    def test_unknown_toy(self):
        with pytest.raises(ValueError, match="unknown toy"):
            toy.get_toy("spiral")


class TestBatches:
    def test_deterministic_and_resumable(self):
        mixture = toy.get_toy("grid25")
        full = [b["x"] for b in itertools.islice(toy.batches(mixture, 3, 16), 5)]
        again = [b["x"] for b in itertools.islice(toy.batches(mixture, 3, 16), 5)]
        resumed = [b["x"] for b in itertools.islice(toy.batches(mixture, 3, 16, start_step=2), 3)]
        for a, b in zip(full, again, strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(full[2:], resumed, strict=True):
            np.testing.assert_array_equal(a, b)
        assert full[0].shape == (16, 2) and full[0].dtype == np.float32
        assert not np.array_equal(full[0], full[1])

    def test_seed_and_shard_change_the_data(self):
        mixture = toy.get_toy("ring8")
        base = next(toy.batches(mixture, 0, 8))["x"]
        assert not np.array_equal(base, next(toy.batches(mixture, 1, 8))["x"])
        assert not np.array_equal(base, next(toy.batches(mixture, 0, 8, shard=1))["x"])
