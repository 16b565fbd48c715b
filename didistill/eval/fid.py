"""Frechet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update
Rule Converge to a Local Nash Equilibrium", arXiv:1706.08500).

Maths. Fit a Gaussian to the features of each image set, N(mu1, S1) and N(mu2, S2); the FID is
the squared 2-Wasserstein (Frechet) distance between them,

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

S1 S2 is not symmetric, but it is similar to the PSD matrix M = S1^(1/2) S2 S1^(1/2), so
Tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(M)). `frechet_distance` computes it with two symmetric
eigendecompositions (S1 -> S1^(1/2), then eigvalsh(M)), clipping the tiny negative eigenvalues
that round-off gives rank-deficient covariances (fewer samples than features). No complex
`sqrtm`, no "add eps * I and retry": it is stable for singular covariances by construction.

Precision. In float64 (`with jax.enable_x64(True)`) it matches scipy's `sqrtm` reference to
~1e-9 relative (2048-d features from 4000 samples; the tests add low-rank cases). In float32
the eigenvalues carry absolute errors ~1e-7 * ||S||, and the small ones enter through a square
root: on those 2048-d features (trace 700) the float32 FID was off by 0.012 (44.168 vs
44.156). Fine for monitoring, not for tables, so `fid_from_stats` evaluates in float64 on the
host CPU by default (about half a minute for F = 2048 on two busy cores). Matmuls use
`Precision.HIGHEST` (TPUs default to bf16 passes).

Statistics. `FeatureStats` streams the moments batch by batch and never holds the N x F
features: per batch the device computes, in float32, the batch mean and *centred* scatter
sum_b (f_b - mean_b)(f_b - mean_b)^T, and the host merges them in float64 with Chan et al.'s
pairwise update (count, mean, M2), which avoids the cancellation of E[ff^T] - mu mu^T.
Sigma = M2 / (N - 1) (ddof 1, as np.cov and EDM's fid.py). Under `jit` with a sharded batch the
per-batch reductions are over the global batch (XLA inserts the all-reduce), so the host-side
accumulator sees one replicated result per step; on several hosts each process gathers it.

Protocol (what a published number means; EDM's README and fid.py, SiD's README):

- Samples: 50,000 generated images, saved / quantised to uint8, fed to the FID Inception-v3
  (`didistill.nets.inception`, pool3, 2048-d features, input resized to 299x299).
- Reference: NVIDIA's precomputed statistics (npz with 'mu', 'sigma'): `cifar10-32x32.npz` from
  the CIFAR-10 *training* set (50k images), `imagenet-64x64.npz` for ImageNet-64; or statistics
  computed by `compute_stats` + `save_stats` on the training split with the same extractor.
- Seeds: EDM draws 3 disjoint seed ranges (0-49999, 50000-99999, 100000-149999) and reports the
  **minimum** of the 3 FIDs; SiD averages 10 random trials of 50k and reports the **mean**
  (and std). `summarize_over_seeds` gives both; a table must say which it quotes.
- Fewer than 50k samples biases FID upwards (the estimator is biased in N): numbers from 10k
  samples or logged during training are comparable only with each other.
- Extractor: this port follows pytorch-fid (PyTorch bilinear resize), while NVIDIA's reference
  stats came from the TensorFlow graph; expect differences of order 0.1%.
- The project's *digits* FID (8x8 scikit-learn digits) uses another feature network, the
  penultimate layer of a classifier this project trains on digits (`didistill.nets.classifier`):
  a Frechet distance in that feature space, for comparing runs with each other; it is **not
  comparable** to Inception FIDs or to any published number. Pass its feature function to
  `fid` / `compute_stats` (any `batch -> [B, F]` works).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from didistill import compat

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def frechet_distance(mu1, sigma1, mu2, sigma2) -> jax.Array:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for mu [F], sigma [F, F] (PSD).

    Computed in the inputs' dtype (float32, or float64 under x64). Symmetric by construction
    up to round-off; non-negative up to round-off (not clipped, so a tiny negative value can
    appear for identical inputs).
    """
    dtype = jnp.result_type(mu1, sigma1, mu2, sigma2, jnp.float32)
    mu1, mu2 = jnp.asarray(mu1, dtype), jnp.asarray(mu2, dtype)  # [F]
    s1 = jnp.asarray(sigma1, dtype)  # [F, F]
    s2 = jnp.asarray(sigma2, dtype)
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    w1, v1 = jnp.linalg.eigh(s1)  # S1 = V diag(w) V^T
    sqrt_s1 = jnp.matmul(v1 * jnp.sqrt(jnp.clip(w1, 0.0)), v1.T, precision=_HIGHEST)
    m = jnp.matmul(jnp.matmul(sqrt_s1, s2, precision=_HIGHEST), sqrt_s1, precision=_HIGHEST)
    eigenvalues = jnp.linalg.eigvalsh(0.5 * (m + m.T))  # of S1^(1/2) S2 S1^(1/2), ~ S1 S2
    trace_sqrt = jnp.sum(jnp.sqrt(jnp.clip(eigenvalues, 0.0)))
    diff = mu1 - mu2
    return jnp.dot(diff, diff) + jnp.trace(s1) + jnp.trace(s2) - 2.0 * trace_sqrt


class FeatureStats:
    """Streaming mean and covariance of features, held on the host in float64.

    State: count N, mean [F] and M2 [F, F] = sum_n (f_n - mean)(f_n - mean)^T. Two partial
    states (n_a, mean_a, M2_a), (n_b, mean_b, M2_b) combine exactly (Chan, Golub, LeVeque 1979):
        delta = mean_b - mean_a,  n = n_a + n_b,  mean = mean_a + delta n_b / n,
        M2 = M2_a + M2_b + delta delta^T n_a n_b / n.
    `update` and `merge` modify the accumulator in place and return it.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None  # [F] float64
        self.m2: np.ndarray | None = None  # [F, F] float64

    @property
    def num_features(self) -> int | None:
        return None if self.mean is None else self.mean.shape[0]

    def update(self, features) -> FeatureStats:
        """Add a batch of host features [B, F] (moments computed here in float64)."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [B, F], got shape {f.shape}")
        if f.shape[0] == 0:
            return self
        batch_mean = f.mean(axis=0)  # [F]
        centred = f - batch_mean  # [B, F]
        return self.update_moments(f.shape[0], batch_mean, centred.T @ centred)

    def update_moments(self, count: int, mean, m2) -> FeatureStats:
        """Add a batch given by its size, mean [F] and centred scatter M2 [F, F]."""
        count = int(count)
        mean = np.asarray(mean, np.float64)
        m2 = np.asarray(m2, np.float64)
        if mean.ndim != 1 or m2.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"moments must be mean [F] and m2 [F, F], got {mean.shape}, {m2.shape}"
            )
        if self.num_features not in (None, mean.shape[0]):
            raise ValueError(f"feature width {mean.shape[0]} != accumulated {self.num_features}")
        if count <= 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean.copy(), m2.copy()
            return self
        total = self.count + count
        delta = mean - self.mean  # [F]
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
        self.count = total
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold another accumulator (e.g. another host's or another shard's) into this one."""
        if other.count == 0:
            return self
        return self.update_moments(other.count, other.mean, other.m2)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [F], sigma [F, F]) with sigma = M2 / (N - 1), float64."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}")
        return self.mean.copy(), self.m2 / (self.count - 1)


def _to_host(x) -> np.ndarray:
    """A (possibly multi-host, replicated or sharded) array as a float64 numpy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, np.float64)


def _batch_moments(features):  # [B, F] -> (mean [F], centred scatter [F, F]), float32
    f = features.astype(jnp.float32)
    mean = jnp.mean(f, axis=0)
    centred = f - mean
    return mean, jnp.matmul(centred.T, centred, precision=_HIGHEST)


def compute_stats(
    feature_fn: Callable[[Any], jax.Array],
    batches: Iterable[Any],
    stats: FeatureStats | None = None,
) -> FeatureStats:
    """Stream `batches` through `feature_fn` (-> [B, F]) into a FeatureStats (host, float64).

    `feature_fn` and the per-batch moments run under one `jax.jit` (a batch of another size,
    e.g. the last one, compiles once more). Batches may be sharded over a mesh: the moments
    then reduce over the global batch. Pass `stats` to continue an accumulator.
    """
    stats = FeatureStats() if stats is None else stats

    @jax.jit
    def moments(batch):
        features = feature_fn(batch)  # [B, F]
        if features.ndim != 2:
            raise ValueError(f"feature_fn must return [B, F], got shape {features.shape}")
        return features.shape[0], *_batch_moments(features)

    for batch in batches:
        count, mean, m2 = moments(batch)
        stats.update_moments(int(count), _to_host(mean), _to_host(m2))
    return stats


def _as_mean_cov(stats) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(stats, FeatureStats):
        return stats.mean_cov()
    if isinstance(stats, (str, os.PathLike)):
        return load_stats(stats)
    mu, sigma = stats
    return _check_stats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), "stats")


def fid_from_stats(stats, reference_stats, *, float64: bool = True) -> float:
    """FID between two Gaussians; each a FeatureStats, a (mu, sigma) pair or an .npz path.

    float64=True evaluates `frechet_distance` in float64 on the host CPU (x64 enabled only
    inside this call); float64=False uses float32 on the default device.
    """
    mu1, sigma1 = _as_mean_cov(stats)
    mu2, sigma2 = _as_mean_cov(reference_stats)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature widths differ: {mu1.shape[0]} vs reference {mu2.shape[0]}")
    if not float64:
        args = [jnp.asarray(a, jnp.float32) for a in (mu1, sigma1, mu2, sigma2)]
        return float(frechet_distance(*args))
    with compat.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def _batched(samples, batch_size: int):
    for start in range(0, samples.shape[0], batch_size):
        yield samples[start : start + batch_size]


def fid(
    feature_fn: Callable[[Any], jax.Array],
    samples_or_batches,
    reference_stats,
    *,
    batch_size: int = 250,
    float64: bool = True,
) -> float:
    """FID of samples against reference statistics (FeatureStats, (mu, sigma) or .npz path).

    samples_or_batches: one array [N, ...] (split into batches of `batch_size`) or an iterable
    of batches [B, ...] (e.g. a generator that samples and yields; nothing N-sized is kept).
    """
    if isinstance(samples_or_batches, (np.ndarray, jax.Array)):
        batches = _batched(samples_or_batches, batch_size)
    else:
        batches = samples_or_batches
    stats = compute_stats(feature_fn, batches)
    return fid_from_stats(stats, reference_stats, float64=float64)


def summarize_over_seeds(fids: Sequence[float]) -> dict[str, float]:
    """{'min', 'mean', 'std', 'num_seeds'} of FIDs of disjoint seed sets (EDM: min; SiD: mean)."""
    values = np.asarray(fids, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("need a non-empty list of FIDs, one per seed set")
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return dict(min=float(values.min()), mean=float(values.mean()), std=std, num_seeds=values.size)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str):
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{where}: expected mu [F] and sigma [F, F], got {mu.shape}, {sigma.shape}"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{where}: mu or sigma contains NaN or inf")
    return mu, sigma


def save_stats(path: str, mu, sigma) -> str:
    """Write reference statistics as EDM/NVIDIA's npz: keys 'mu' [F], 'sigma' [F, F] (float64)."""
    mu, sigma = _check_stats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), path)
    with open(path, "wb") as f:  # a file object, so numpy does not append '.npz'
        np.savez(f, mu=mu, sigma=sigma)
    return path


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu [F], sigma [F, F]) float64 from an npz with keys 'mu' and 'sigma'.

    Reads NVIDIA's EDM reference files (e.g. `cifar10-32x32.npz`) and pytorch-fid's `.npz`.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"FID reference statistics not found at {path!r}. Either download NVIDIA's "
            "reference statistics listed in the EDM README (fid-refs: cifar10-32x32.npz, "
            "imagenet-64x64.npz) on a machine with network access and copy them here, or "
            "compute them from the training split with `compute_stats(feature_fn, batches)` "
            "and `save_stats(path, *stats.mean_cov())` using the same feature network."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files if key in ("mu", "sigma")}
            keys = sorted(data.files)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path!r} is not a readable .npz of FID statistics: {error}") from None
    missing = {"mu", "sigma"} - set(arrays)
    if missing:
        raise ValueError(
            f"{path!r} has keys {keys}, missing {sorted(missing)}: reference statistics need "
            "'mu' [F] and 'sigma' [F, F] (EDM / pytorch-fid format)"
        )
    mu, sigma = arrays["mu"], arrays["sigma"]
    return _check_stats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), path)


def classifier_fid(config) -> Callable[[Any], float] | None:
    """`fid(samples [N, H, W, C]) -> float` in a classifier's feature space, or None.

    Features: the penultimate layer of the classifier file at `config.eval.feature_checkpoint`
    (`didistill.nets.classifier.load_classifier`); reference: the test split of `config.data`
    ('validation' for ImageNet). Samples are clipped to [-1, 1] first (the range of images, as
    standard FID code reads PNGs). None when no file is configured or it is missing. Not
    comparable with Inception FIDs.
    """
    path = config.eval.get("feature_checkpoint", "")
    if not path or not os.path.isfile(path):
        return None
    from didistill.data.images import load_arrays
    from didistill.nets.classifier import load_classifier

    module, params, _ = load_classifier(path)
    feature_fn = lambda x: module.apply(params, x, features=True)[1]  # [B, F]
    test_split = "validation" if config.data.name == "imagenet64" else "test"
    reference = load_arrays(config.data, test_split)
    ref_images = (reference if isinstance(reference, dict) else reference.to_arrays())["image"]
    chunks = [ref_images[s : s + 500] for s in range(0, len(ref_images), 500)]
    ref_stats = compute_stats(feature_fn, chunks)
    return lambda samples: fid(
        feature_fn, np.clip(np.asarray(samples), -1.0, 1.0), ref_stats, batch_size=500
    )
