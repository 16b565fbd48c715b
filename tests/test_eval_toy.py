"""Tests for didistill.eval.toy metrics and didistill.eval.plots writers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from didistill.data import toy
from didistill.eval import plots
from didistill.eval import toy as metrics


@pytest.fixture(scope="module")
def ring():
    mixture = toy.get_toy("ring8")
    x, modes = mixture.sample(jax.random.key(0), 4000, return_modes=True)
    return mixture, x, modes


class TestEnergyDistance:
    def test_matches_scipy_in_1d(self):
        # scipy's 1-D energy distance is sqrt of the V-statistic 2E|X-Y| - E|X-X'| - E|Y-Y'|.
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=300), rng.normal(0.5, 2.0, size=211)
        ours = metrics.energy_distance(x[:, None], y[:, None])
        np.testing.assert_allclose(np.sqrt(ours), stats.energy_distance(x, y), rtol=1e-4)

    def test_blocking_matches_brute_force(self):
        rng = np.random.default_rng(1)
        x, y = rng.normal(size=(1100, 2)), rng.normal(size=(700, 2)) + 0.3
        dist = lambda a, b: np.mean(np.linalg.norm(a[:, None] - b[None], axis=-1))
        brute = 2 * dist(x, y) - dist(x, x) - dist(y, y)
        np.testing.assert_allclose(metrics.energy_distance(x, y), brute, rtol=1e-4)

    def test_zero_for_identical_sets_and_ordering(self, ring):
        mixture, x, _ = ring
        np.testing.assert_allclose(metrics.energy_distance(x, x), 0.0, atol=1e-5)
        ref = mixture.sample(jax.random.key(1), 4000)
        assert metrics.energy_distance(x, ref) < metrics.energy_distance(x + 0.3, ref)


class TestModeMetrics:
    def test_true_samples(self, ring):
        mixture, x, _ = ring
        assert metrics.mode_coverage(x, mixture) == 1.0
        assert metrics.mode_tv(x, mixture) < 0.04
        np.testing.assert_allclose(metrics.mode_histogram(x, mixture).sum(), 1.0, rtol=1e-5)

    def test_single_mode_collapse(self, ring):
        mixture, x, modes = ring
        collapsed = x[modes == 0]
        assert metrics.mode_coverage(collapsed, mixture) == pytest.approx(1 / 8)
        np.testing.assert_allclose(metrics.mode_tv(collapsed, mixture), 1 - 4 / 26, atol=1e-3)

    def test_dropping_rare_modes(self, ring):
        mixture, x, modes = ring
        common = x[(modes != 3) & (modes != 7)]
        assert metrics.mode_coverage(common, mixture) == pytest.approx(6 / 8)
        np.testing.assert_allclose(metrics.mode_tv(common, mixture), 2 / 26, atol=0.02)


class TestDensityMetrics:
    def test_nll_true_samples_estimate_entropy(self, ring):
        # Well separated modes: H = H(w) + sum_k w_k log(2 pi e s^2).
        mixture, x, _ = ring
        w = np.asarray(mixture.weights)
        entropy = -np.sum(w * np.log(w)) + np.log(2 * np.pi * np.e * 0.1**2)
        np.testing.assert_allclose(metrics.nll(x, mixture), entropy, atol=0.06)
        assert metrics.nll(x, mixture) < metrics.nll(x + 0.2, mixture)
        # nll rewards a collapse onto mode centres (documented as precision-like).
        assert metrics.nll(mixture.means, mixture) < metrics.nll(x, mixture)

    def test_outlier_fraction(self, ring):
        mixture, x, _ = ring
        assert metrics.outlier_fraction(x, mixture) < 0.002
        assert metrics.outlier_fraction(jnp.zeros((10, 2)), mixture) == 1.0
        half_bad = jnp.concatenate([x[:10], jnp.full((10, 2), jnp.nan)])
        assert metrics.outlier_fraction(half_bad, mixture) == 0.5


def test_toy_metrics_dict(ring):
    mixture, x, _ = ring
    good = metrics.toy_metrics(x, mixture, jax.random.key(2))
    bad = metrics.toy_metrics(x * 0.7, mixture, jax.random.key(2))
    assert set(good) == {"energy_distance", "mode_coverage", "mode_tv", "nll", "outlier_fraction"}
    assert all(isinstance(v, float) for v in good.values())
    assert good["energy_distance"] < bad["energy_distance"]
    assert good["outlier_fraction"] < bad["outlier_fraction"]


class TestPlots:
    def test_sample_grid(self, ring, tmp_path):
        mixture, x, _ = ring
        path = tmp_path / "sub" / "grid.png"
        plots.save_sample_grid(
            {"data": x, "shifted": x + 0.5, "noise": np.random.default_rng(0).normal(size=(50, 2))},
            str(path),
            mixture=mixture,
            subtitles={"data": plots.format_metrics({"nll": 0.2134, "tv": 0.01})},
        )
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 2 * im.size[1]

    def test_sample_grid_without_mixture(self, tmp_path):
        path = tmp_path / "grid.png"
        plots.save_sample_grid({"a": np.random.default_rng(0).normal(size=(100, 2))}, str(path))
        assert path.stat().st_size > 0

    def test_bar_and_line(self, tmp_path):
        bar = plots.save_bar_plot({"reverse_kl": 0.1, "forward_kl": 0.05}, str(tmp_path / "b.png"))
        line = plots.save_line_plot(
            {"a": ([1, 2, 4], [1.0, 0.5, 0.2])}, str(tmp_path / "l.png"), logx=True, logy=True
        )
        for path in (bar, line):
            with Image.open(path) as im:
                assert im.format == "PNG"

    def test_format_metrics(self):
        assert plots.format_metrics({"a": 0.123456, "b": 2.0}, ["b", "c"]) == "b=2"
