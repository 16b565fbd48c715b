"""Class-imbalanced subsets of a labelled dataset: geometric class frequencies.

A benchmark whose answer is known (issue 15): a teacher trained on data whose class
frequencies fall geometrically, so that a student that drops rare classes shows it in the
class histogram of its samples.

Frequencies. For K classes and a max/min ratio R > 1, class c (0-based) gets

    p_c = R^(-c / (K - 1)) / sum_j R^(-j / (K - 1)),

so p_0 / p_{K-1} = R exactly and the frequencies fall by the factor R^(1/(K-1)) from one
class to the next. K = 10, R = 30 (the digits benchmark): p = 32.207, 22.071, 15.125, 10.365,
7.103, 4.868, 3.336, 2.286, 1.567, 1.074 percent (factor 0.6853). Class 0 is the most
frequent, class K - 1 the rarest.

Counts. The subset is the largest one the classes can supply: N = max total such that the
largest-remainder apportionment n_c of N over p (ties: lower class first) has n_c <= a_c,
the examples available in class c. Rows: per class, the first n_c of a
`np.random.default_rng([seed, c])` permutation of that class's rows (sorted at the end), so a
(labels, frequencies, seed) triple always gives the same subset. On the digits train split
(1,500 images) R = 30 gives 462 images: 149, 102, 70, 48, 33, 22, 15, 11, 7, 5 of classes 0..9.
"""

from __future__ import annotations

import numpy as np


def geometric_frequencies(num_classes: int, ratio: float) -> np.ndarray:
    """p [K], float64, summing to 1, p_c proportional to ratio^(-c / (K - 1))."""
    if num_classes < 2:
        raise ValueError(f"geometric frequencies need at least 2 classes, got {num_classes}")
    if not ratio > 1.0:
        raise ValueError(f"imbalance ratio must be > 1 (max/min frequency), got {ratio}")
    p = float(ratio) ** (-np.arange(num_classes) / (num_classes - 1))
    return p / p.sum()


def apportion(total: int, frequencies: np.ndarray) -> np.ndarray:
    """Largest-remainder apportionment of `total` over `frequencies` [K] -> int counts [K]."""
    quota = total * np.asarray(frequencies, np.float64)
    counts = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def subset_counts(available: np.ndarray, frequencies: np.ndarray) -> np.ndarray:
    """The per-class counts [K] of the largest subset with these frequencies (see module)."""
    available = np.asarray(available, np.int64)
    p = np.asarray(frequencies, np.float64)
    total = int(np.floor(np.min(available / p)))
    while total > 0:
        counts = apportion(total, p)
        if np.all(counts <= available):
            return counts
        total -= 1
    raise ValueError(f"no non-empty subset with frequencies {p} from class sizes {available}")


def subsample_rows(labels: np.ndarray, frequencies: np.ndarray, seed: int = 0) -> np.ndarray:
    """Sorted row indices [N] of the subset of `labels` [M] (ints in [0, K)) with these class
    frequencies [K]; deterministic in `seed`."""
    labels = np.asarray(labels)
    num_classes = len(frequencies)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    available = np.bincount(labels, minlength=num_classes)
    counts = subset_counts(available, frequencies)
    rows = [
        np.random.default_rng([int(seed), c]).permutation(np.flatnonzero(labels == c))[:n]
        for c, n in enumerate(counts)
    ]
    return np.sort(np.concatenate(rows))


__all__ = ["apportion", "geometric_frequencies", "subset_counts", "subsample_rows"]
