"""Mode-dropping metrics from a classifier's labels: class histograms of samples.

For samples of a generator classified into K classes (argmax of a classifier's logits):

- histogram h [K]: the share of samples given each class (sums to 1);
- total variation to a reference histogram g: TV(h, g) = (1/2) sum_k |h_k - g_k|, in [0, 1];
- rare-class recall of classes S against a reference g: (sum_{k in S} h_k) / (sum_{k in S} g_k),
  the mass the samples put on S relative to the reference's (1: kept, 0: dropped, > 1: more);
- `rarest(g, n)`: the n classes of smallest reference share (ties: lower class first).

Samples are classified in batches of `batch_size` under one jitted function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np


def histogram(labels, num_classes: int) -> np.ndarray:
    """Share of each class among integer labels [N] -> float64 [K], sums to 1."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty [N] array, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    return np.bincount(labels, minlength=num_classes) / labels.size


def total_variation(h, g) -> float:
    """(1/2) sum_k |h_k - g_k| for two histograms [K]."""
    h, g = np.asarray(h, np.float64), np.asarray(g, np.float64)
    if h.shape != g.shape:
        raise ValueError(f"histograms differ in shape: {h.shape} vs {g.shape}")
    return float(0.5 * np.abs(h - g).sum())


def rarest(g, n: int) -> list[int]:
    """The n classes with the smallest reference share g [K] (ties: lower class first)."""
    return [int(k) for k in np.argsort(np.asarray(g), kind="stable")[:n]]


def class_recall(h, g, classes: Sequence[int]) -> float:
    """sum_{k in classes} h_k / sum_{k in classes} g_k (nan if the reference has no mass)."""
    h, g = np.asarray(h, np.float64), np.asarray(g, np.float64)
    idx = list(classes)
    denominator = g[idx].sum()
    return float(h[idx].sum() / denominator) if denominator > 0 else float("nan")


def classify(
    logits_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    images: np.ndarray,
    batch_size: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels int [N], features [N, F]) of images [N, H, W, C] under `logits_fn(x) ->
    (logits [B, K], features [B, F])`; images are clipped to [-1, 1] first (as FID does)."""
    fn = jax.jit(logits_fn)
    labels, features = [], []
    images = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    for start in range(0, images.shape[0], batch_size):
        logits, feats = fn(images[start : start + batch_size])
        labels.append(np.asarray(np.argmax(logits, axis=-1)))
        features.append(np.asarray(feats, np.float32))
    return np.concatenate(labels), np.concatenate(features)


__all__ = ["class_recall", "classify", "histogram", "rarest", "total_variation"]
