"""Class-imbalanced subsets (didistill/data/imbalance.py) and the config.data.imbalance option."""

import ml_collections
import numpy as np
import pytest

from didistill.data import images, imbalance


def test_geometric_frequencies_closed_form():
    p = imbalance.geometric_frequencies(10, 30.0)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert p[0] / p[-1] == pytest.approx(30.0, rel=1e-12)
    np.testing.assert_allclose(p[1:] / p[:-1], 30.0 ** (-1 / 9), rtol=1e-12)  # geometric
    # the frequencies the docs state, in percent
    stated = [32.207, 22.071, 15.125, 10.365, 7.103, 4.868, 3.336, 2.286, 1.567, 1.074]
    np.testing.assert_allclose(100 * p, stated, atol=5e-4)


@pytest.mark.parametrize("ratio", [1.0, 0.5, -3.0])
def test_ratio_must_exceed_one(ratio):
    with pytest.raises(ValueError, match="must be > 1"):
        imbalance.geometric_frequencies(10, ratio)


def test_apportion_sums_and_largest_remainders():
    counts = imbalance.apportion(10, np.array([0.55, 0.25, 0.2]))
    np.testing.assert_array_equal(counts, [6, 2, 2])  # quotas 5.5, 2.5, 2: ties to class 0
    assert imbalance.apportion(7, np.full(3, 1 / 3)).tolist() == [3, 2, 2]


def test_subset_is_largest_feasible_and_deterministic():
    labels = np.repeat(np.arange(4), [50, 40, 30, 20])
    p = imbalance.geometric_frequencies(4, 8.0)  # 8:4:2:1 / 15
    rows = imbalance.subsample_rows(labels, p, seed=3)
    counts = np.bincount(labels[rows], minlength=4)
    np.testing.assert_array_equal(counts, [50, 25, 12, 6])  # class 0 binds: N = 93
    assert np.all(np.diff(rows) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(rows, imbalance.subsample_rows(labels, p, seed=3))
    assert not np.array_equal(rows, imbalance.subsample_rows(labels, p, seed=4))


def test_labels_out_of_range_are_an_error():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        imbalance.subsample_rows(np.array([0, 1, 5]), np.full(3, 1 / 3))


def test_config_option_on_the_digits(tmp_path):
    data_cfg = ml_collections.ConfigDict(
        dict(name="digits", data_dir=str(tmp_path), resolution=None, imbalance=30.0)
    )
    data = images.load_arrays(data_cfg)
    counts = np.bincount(data["label"], minlength=10)
    np.testing.assert_array_equal(counts, [149, 102, 70, 48, 33, 22, 15, 11, 7, 5])
    assert data["image"].shape == (462, 8, 8, 1)
    full = images.load_arrays(
        ml_collections.ConfigDict(dict(name="digits", data_dir=str(tmp_path)))
    )
    assert len(full["label"]) == 1500  # imbalance 0 (absent) keeps the split whole
    data_cfg.imbalance_seed = 1
    other = images.load_arrays(data_cfg)
    np.testing.assert_array_equal(np.bincount(other["label"], minlength=10), counts)
    assert not np.array_equal(other["image"], data["image"])


def test_image_configs_carry_the_option():
    from didistill.configs import digits_distill, digits_teacher

    for config in (digits_teacher.get_config("uncond"), digits_distill.get_config("dmd2")):
        assert config.data.imbalance == 0.0 and config.data.imbalance_seed == 0
