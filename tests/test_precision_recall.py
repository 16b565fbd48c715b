"""Improved precision/recall (didistill/eval/precision_recall.py) and class-histogram metrics."""

import numpy as np
import pytest

from didistill.eval import class_histogram as ch
from didistill.eval import precision_recall as pr


def brute_force(real, fake, k):
    """Literal NumPy transcription of the definition (Kynkäänniemi et al. 2019, eq. 1-3)."""

    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))  # [N, N]
        return np.sort(d, axis=1)[:, k]  # entry 0 is the point itself

    def inside(q, x, r):
        d = np.sqrt(((q[:, None, :] - x[None, :, :]) ** 2).sum(-1))  # [M, N]
        return (d <= r[None, :]).any(axis=1)

    return inside(fake, real, radii(real)).mean(), inside(real, fake, radii(fake)).mean()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(300, 6)).astype(np.float32)
    fake = (0.7 * rng.normal(size=(257, 6)) + 0.8).astype(np.float32)  # shifted, narrower
    got = pr.precision_recall(real, fake, k=k)
    precision, recall = brute_force(real.astype(np.float64), fake.astype(np.float64), k)
    # a point within float32 round-off of a ball's edge could flip: allow one point each
    assert abs(got["precision"] - precision) <= 1 / 257 and abs(got["recall"] - recall) <= 1 / 300
    assert 0.0 < got["precision"] < 1.0 and 0.0 < got["recall"] < 1.0


def test_knn_radii_closed_form_on_a_grid():
    # points 0, 1, ..., 9 on a line: the 3rd nearest other point is 3 away at both ends
    # (0 -> 1, 2, 3) and 2 away elsewhere (1 -> 0, 2, 3; 4 -> 3, 5, 2 or 6)
    grid = np.arange(10, dtype=np.float32)[:, None]
    np.testing.assert_allclose(pr.knn_radii(grid, 3), [3, 2, 2, 2, 2, 2, 2, 2, 2, 3])
    np.testing.assert_allclose(pr.knn_radii(grid, 1), np.ones(10))


def test_precision_closed_form():
    real = np.arange(10, dtype=np.float32)[:, None]  # balls: [-3, 3], [x-2, x+2], [6, 12]
    fake = np.array([[-3.0], [-3.5], [4.5], [12.0], [12.5], [20.0], [21.0], [22.0]], np.float32)
    # inside: -3 (ball of 0, radius 3), 4.5, 12 (ball of 9); outside: -3.5, 12.5, 20-22
    inside = pr.inside_manifold(fake, real, pr.knn_radii(real, 3))
    np.testing.assert_array_equal(inside, [1, 0, 1, 1, 0, 0, 0, 0])
    got = pr.precision_recall(real, fake, k=3)
    assert got["precision"] == pytest.approx(3 / 8)
    # recall: the share of real points within some fake ball, checked by brute force
    assert got["recall"] == pytest.approx(brute_force(real, fake, 3)[1])


def test_identical_sets_and_a_dropped_mode():
    rng = np.random.default_rng(0)
    modes = np.array([[0.0, 0.0], [100.0, 0.0]])
    real = (modes[np.arange(400) % 2] + rng.normal(size=(400, 2))).astype(np.float32)
    same = pr.precision_recall(real, real, k=3)
    assert same == {"precision": 1.0, "recall": 1.0}
    # a model with only the first mode: every sample is on the data, half the data is missed
    fake = (modes[0] + rng.normal(size=(400, 2))).astype(np.float32)
    got = pr.precision_recall(real, fake, k=3)
    assert got["precision"] > 0.95 and got["recall"] == pytest.approx(0.5, abs=0.03)


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="N > k=3"):
        pr.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="feature widths differ"):
        pr.precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))


def test_class_histogram_metrics():
    h = ch.histogram(np.array([0, 0, 1, 3]), 4)
    np.testing.assert_allclose(h, [0.5, 0.25, 0.0, 0.25])
    g = np.array([0.4, 0.3, 0.2, 0.1])
    assert ch.total_variation(h, g) == pytest.approx(0.5 * (0.1 + 0.05 + 0.2 + 0.15))
    assert ch.rarest(g, 2) == [3, 2]
    assert ch.rarest(np.array([0.2, 0.1, 0.1, 0.6]), 2) == [1, 2]  # ties: lower class first
    assert ch.class_recall(h, g, [3, 2]) == pytest.approx(0.25 / 0.3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        ch.histogram(np.array([4]), 4)


def test_classify_batches_and_clips():
    def logits_fn(x):
        flat = x.reshape(x.shape[0], -1)
        return flat[:, :3], flat  # logits: the first 3 pixels; features: all pixels

    images = np.zeros((7, 2, 2, 1), np.float32)
    images[np.arange(7), 0, np.arange(7) % 2, 0] = 5.0  # class 0 or 1; clipped to 1
    labels, feats = ch.classify(logits_fn, images, batch_size=3)
    np.testing.assert_array_equal(labels, np.arange(7) % 2)
    assert feats.shape == (7, 4) and feats.max() == 1.0
