"""FID maths and plumbing: Frechet distance against scipy, streamed statistics, stats files."""

import os
import subprocess
import sys
import textwrap
import warnings

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings

from didistill.eval import fid as fidlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scipy_frechet(mu1, sigma1, mu2, sigma2):
    """The reference computation of TTUR / pytorch-fid / EDM: sqrtm of the product."""
    with warnings.catch_warnings():  # singular products warn, yet the result is accurate
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real


def ours64(mu1, sigma1, mu2, sigma2):
    with jax.enable_x64(True):
        out = fidlib.frechet_distance(mu1, sigma1, mu2, sigma2)
        assert out.dtype == jnp.float64
        return float(out)


def random_spd(rng, dim, rank=None, spread=1.0):
    """A A^T / rank with A [dim, rank]; eigenvalue spread via a per-column scale."""
    rank = rank or 2 * dim
    a = rng.standard_normal((dim, rank)) * np.logspace(0, -spread, rank)
    return a @ a.T / rank


class TestFrechetDistance:
    @pytest.mark.parametrize("dim", [3, 16, 64])
    def test_matches_scipy_sqrtm_on_random_spd(self, dim):
        rng = np.random.default_rng(dim)
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        s1, s2 = random_spd(rng, dim), random_spd(rng, dim, spread=2.0)
        ref = scipy_frechet(mu1, s1, mu2, s2)
        np.testing.assert_allclose(ours64(mu1, s1, mu2, s2), ref, rtol=1e-4)
        np.testing.assert_allclose(ours64(mu2, s2, mu1, s1), ref, rtol=1e-4)  # symmetric

    def test_near_singular_covariances(self):
        rng = np.random.default_rng(1)
        dim = 32
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        s1 = (q * np.logspace(0, -12, dim)) @ q.T  # condition number 1e12
        s2 = random_spd(rng, dim, spread=3.0)
        mu = np.zeros(dim)
        np.testing.assert_allclose(ours64(mu, s1, mu, s2), scipy_frechet(mu, s1, mu, s2), rtol=1e-4)

    @pytest.mark.parametrize("rank", [1, 5])
    def test_low_rank_covariances(self, rank):
        # S = A A^T with A [F, r]: Tr (S1 S2)^(1/2) = sum of singular values of A1^T A2, exactly
        rng = np.random.default_rng(rank)
        dim = 20
        a1, a2 = rng.standard_normal((dim, rank)), rng.standard_normal((dim, rank))
        s1, s2 = a1 @ a1.T, a2 @ a2.T
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        nuclear = np.linalg.svd(a1.T @ a2, compute_uv=False).sum()
        exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
        ours = ours64(mu1, s1, mu2, s2)
        assert np.isfinite(ours)
        np.testing.assert_allclose(ours, exact, rtol=1e-6)
        np.testing.assert_allclose(ours, scipy_frechet(mu1, s1, mu2, s2), rtol=1e-4)

    @pytest.mark.parametrize("rank", [None, 4])
    def test_identical_inputs_give_zero(self, rank):
        rng = np.random.default_rng(3)
        mu, s = rng.standard_normal(24), random_spd(rng, 24, rank=rank)
        assert abs(ours64(mu, s, mu, s)) < 1e-7 * np.trace(s)

    def test_gaussians_with_commuting_covariances_closed_form(self):
        # diagonal S1, S2: Tr (S1 S2)^(1/2) = sum sqrt(d1 d2), FID = sum (sqrt d1 - sqrt d2)^2
        d1, d2 = np.array([1.0, 4.0, 0.0, 9.0]), np.array([4.0, 1.0, 2.0, 9.0])
        mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 2.0, 1.0])
        exact = 5.0 + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
        np.testing.assert_allclose(ours64(mu1, np.diag(d1), mu2, np.diag(d2)), exact, rtol=1e-12)

    def test_float32_is_close_to_float64(self):
        rng = np.random.default_rng(4)
        mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
        s1, s2 = random_spd(rng, 16), random_spd(rng, 16)
        args32 = [np.asarray(a, np.float32) for a in (mu1, s1, mu2, s2)]
        out32 = fidlib.frechet_distance(*args32)
        assert out32.dtype == jnp.float32
        np.testing.assert_allclose(float(out32), ours64(mu1, s1, mu2, s2), rtol=1e-3)


def projection_features(key=0, dim_in=6, dim_out=10):
    """A fixed random feature network: tanh of a random projection, [B, D] -> [B, F]."""
    weights = jax.random.normal(jax.random.key(key), (dim_in, dim_out)) / np.sqrt(dim_in)
    return lambda x: jnp.tanh(x @ weights)


class TestFeatureStats:
    @settings(max_examples=25, deadline=None)
    @given(splits=st.lists(st.integers(0, 7), min_size=1, max_size=6), seed=st.integers(0, 99))
    def test_streamed_stats_equal_one_shot_mean_and_cov(self, splits, seed):
        rng = np.random.default_rng(seed)
        features = rng.standard_normal((sum(splits) + 2, 5)) * 3.0 + 100.0  # large mean
        edges = np.cumsum([0, *splits, 2])
        stats = fidlib.FeatureStats()
        for start, stop in zip(edges[:-1], edges[1:], strict=True):
            stats.update(features[start:stop])
        mu, sigma = stats.mean_cov()
        assert stats.count == features.shape[0]
        np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)

    def test_merge_equals_update_on_the_union(self):
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((7, 3)), rng.standard_normal((4, 3)) + 2.0
        merged = fidlib.FeatureStats().update(a).merge(fidlib.FeatureStats().update(b))
        merged.merge(fidlib.FeatureStats())  # merging an empty accumulator is a no-op
        whole = np.concatenate([a, b])
        mu, sigma = merged.mean_cov()
        np.testing.assert_allclose(mu, whole.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(whole, rowvar=False), rtol=1e-10)

    def test_errors(self):
        stats = fidlib.FeatureStats().update(np.zeros((1, 3)))
        with pytest.raises(ValueError, match="at least 2"):
            stats.mean_cov()
        with pytest.raises(ValueError, match="feature width 4 != accumulated 3"):
            stats.update(np.zeros((2, 4)))
        with pytest.raises(ValueError, match=r"\[B, F\]"):
            stats.update(np.zeros(3))

    def test_compute_stats_streams_a_jitted_feature_fn(self):
        feature_fn = projection_features()
        data = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
        batches = [data[:16], data[16:32], data[32:48], data[48:]]  # last batch is smaller
        stats = fidlib.compute_stats(feature_fn, iter(batches))
        features = np.asarray(feature_fn(data), np.float64)
        mu, sigma = stats.mean_cov()
        np.testing.assert_allclose(mu, features.mean(0), atol=1e-6)
        np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), atol=1e-6)

    def test_compute_stats_over_a_sharded_batch(self):
        code = textwrap.dedent(
            """
            import jax, jax.numpy as jnp, numpy as np
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
            from didistill.eval import fid
            mesh = Mesh(np.array(jax.devices()), ("data",))
            shard = NamedSharding(mesh, P("data"))
            data = np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)
            w = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
            fn = lambda x: jnp.tanh(x @ w)
            batches = [jax.device_put(data[i:i + 8], shard) for i in range(0, 32, 8)]
            mu, sigma = fid.compute_stats(fn, batches).mean_cov()
            f = np.tanh(data.astype(np.float64) @ w)
            assert jax.device_count() == 4
            np.testing.assert_allclose(mu, f.mean(0), atol=1e-6)
            np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), atol=1e-6)
            print("ok")
            """
        )
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
        env["PYTHONPATH"] = REPO
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == "ok"


class TestFid:
    def setup_method(self):
        self.feature_fn = projection_features()
        self.data = np.random.default_rng(0).standard_normal((1000, 6)).astype(np.float32)
        self.noise = np.random.default_rng(1).standard_normal((1000, 6)).astype(np.float32)
        self.reference = fidlib.compute_stats(self.feature_fn, [self.data])

    def test_a_set_against_itself_is_zero(self):
        value = fidlib.fid(self.feature_fn, self.data, self.reference, batch_size=300)
        assert abs(value) < 1e-8

    def test_grows_monotonically_with_noise(self):
        levels = [0.0, 0.1, 0.3, 1.0, 3.0]
        values = [
            fidlib.fid(self.feature_fn, self.data + s * self.noise, self.reference) for s in levels
        ]
        assert abs(values[0]) < 1e-8
        assert np.all(np.diff(values) > 0), values

    def test_batches_array_and_reference_forms_agree(self, tmp_path):
        samples = self.data + 0.5 * self.noise
        from_array = fidlib.fid(self.feature_fn, samples, self.reference, batch_size=128)
        batches = (samples[i : i + 200] for i in range(0, 1000, 200))
        mu, sigma = self.reference.mean_cov()
        path = fidlib.save_stats(str(tmp_path / "ref.npz"), mu, sigma)
        from_batches = fidlib.fid(self.feature_fn, batches, path)
        from_pair = fidlib.fid_from_stats(
            fidlib.compute_stats(self.feature_fn, [samples]), (mu, sigma)
        )
        np.testing.assert_allclose([from_batches, from_pair], from_array, rtol=1e-5)  # f32 batches
        in_float32 = fidlib.fid(self.feature_fn, samples, self.reference, float64=False)
        np.testing.assert_allclose(in_float32, from_array, rtol=1e-3)

    def test_feature_width_mismatch(self):
        other = fidlib.FeatureStats().update(np.random.default_rng(0).standard_normal((5, 3)))
        with pytest.raises(ValueError, match="feature widths differ"):
            fidlib.fid_from_stats(other, self.reference)

    def test_summarize_over_seeds(self):
        summary = fidlib.summarize_over_seeds([2.1, 1.9, 2.0])
        assert summary["min"] == 1.9 and summary["num_seeds"] == 3
        np.testing.assert_allclose([summary["mean"], summary["std"]], [2.0, 0.1])
        with pytest.raises(ValueError, match="non-empty"):
            fidlib.summarize_over_seeds([])


class TestStatsFiles:
    def test_round_trip_in_the_edm_format(self, tmp_path):
        rng = np.random.default_rng(0)
        mu, sigma = rng.standard_normal(4), random_spd(rng, 4)
        path = fidlib.save_stats(str(tmp_path / "ref"), mu, sigma)
        assert path == str(tmp_path / "ref")  # no '.npz' appended behind the caller's back
        with np.load(path) as data:
            assert sorted(data.files) == ["mu", "sigma"]
        loaded_mu, loaded_sigma = fidlib.load_stats(path)
        np.testing.assert_array_equal(loaded_mu, mu)
        np.testing.assert_array_equal(loaded_sigma, sigma)

    def test_clear_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="cifar10-32x32.npz.*save_stats"):
            fidlib.load_stats(str(tmp_path / "missing.npz"))
        np.savez(tmp_path / "keys.npz", mean=np.zeros(2), cov=np.eye(2))
        with pytest.raises(ValueError, match=r"keys \['cov', 'mean'\], missing \['mu', 'sigma'\]"):
            fidlib.load_stats(str(tmp_path / "keys.npz"))
        np.savez(tmp_path / "shape.npz", mu=np.zeros(2), sigma=np.eye(3))
        with pytest.raises(ValueError, match=r"mu \[F\] and sigma \[F, F\]"):
            fidlib.load_stats(str(tmp_path / "shape.npz"))
        (tmp_path / "junk.npz").write_bytes(b"not a zip file")
        with pytest.raises(ValueError, match="not a readable .npz"):
            fidlib.load_stats(str(tmp_path / "junk.npz"))
        with pytest.raises(ValueError, match="NaN or inf"):
            fidlib.save_stats(str(tmp_path / "nan.npz"), np.array([np.nan]), np.eye(1))
