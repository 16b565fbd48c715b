"""Sample-quality metrics against an exact Gaussian mixture (`didistill.data.toy`).

All functions take samples [N, D] and the mixture; `toy_metrics` bundles them into a dict of
Python floats. Conventions:

- Mode histogram. The share of mode k in a sample set is the mean posterior responsibility
  h_k = (1/N) sum_n p(k | x_n) (a soft count). For true samples E[h_k] = w_k exactly, even when
  components overlap (as in 'moons'); for well separated modes it equals the argmax count.
- `energy_distance` rewards matching the whole distribution; `nll` rewards samples in high
  density regions and so *favours* a collapse onto a mode (it is a precision-like metric);
  `mode_coverage` and `mode_tv` measure mass allocation (recall-like); `outlier_fraction`
  measures samples off the support.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from didistill.data.toy import GaussianMixture


@functools.partial(jax.jit, static_argnames="block")
def _mean_pairwise_distance(a: jax.Array, b: jax.Array, block: int = 512) -> jax.Array:
    """(1/(N M)) sum_{i, j} ||a_i - b_j||, computed by blocks of rows of a ([N, D], [M, D])."""
    n = a.shape[0]
    pad = (-n) % block
    a_blocks = jnp.pad(a, ((0, pad), (0, 0))).reshape(-1, block, a.shape[1])  # [nb, block, D]
    valid = (jnp.arange(n + pad) < n).reshape(-1, block)  # [nb, block]

    def block_sum(args):
        rows, mask = args
        sq = jnp.sum((rows[:, None, :] - b[None]) ** 2, axis=-1)  # [block, M]
        return jnp.sum(jnp.sqrt(jnp.maximum(sq, 0.0)) * mask[:, None])

    return jnp.sum(jax.lax.map(block_sum, (a_blocks, valid))) / (n * b.shape[0])


def energy_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """Energy distance between two sample sets (Szekely & Rizzo), V-statistic.

        E(X, Y) = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||,

    with every expectation replaced by the mean over all pairs, diagonal pairs included. The
    V-statistic is the energy distance between the two empirical distributions, so it is
    always >= 0 (and 0 iff the sets coincide); it has a small positive bias of order 1/N.
    x [N, D], y [M, D] -> scalar.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    cross = _mean_pairwise_distance(x, y)
    return 2.0 * cross - _mean_pairwise_distance(x, x) - _mean_pairwise_distance(y, y)


def mode_histogram(samples: jax.Array, mixture: GaussianMixture) -> jax.Array:
    """Soft mode shares h_k = mean_n p(k | x_n), [K] (sums to 1)."""
    return jnp.mean(mixture.responsibilities(jnp.asarray(samples, jnp.float32)), axis=0)


def mode_coverage(samples: jax.Array, mixture: GaussianMixture, threshold: float = 0.5):
    """Fraction of modes k whose share h_k is at least `threshold` * w_k. A collapse onto a
    single mode of K gives 1/K (0.5 w_k of a mode of mass 1 would need w_k > 2)."""
    hist = mode_histogram(samples, mixture)
    return jnp.mean((hist >= threshold * mixture.weights).astype(jnp.float32))


def mode_tv(samples: jax.Array, mixture: GaussianMixture) -> jax.Array:
    """Total variation between the mode histogram and the true weights, 0.5 sum_k |h_k - w_k|,
    in [0, 1]."""
    return 0.5 * jnp.sum(jnp.abs(mode_histogram(samples, mixture) - mixture.weights))


def nll(samples: jax.Array, mixture: GaussianMixture) -> jax.Array:
    """Mean negative log density of the samples under the clean mixture, -mean_n log p(x_n).

    For true samples this estimates the entropy of p. Lower is not always better: a collapse
    onto mode centres scores below the entropy."""
    return -jnp.mean(mixture.log_prob(jnp.asarray(samples, jnp.float32)))


def outlier_fraction(samples: jax.Array, mixture: GaussianMixture, k: float = 4.0):
    """Fraction of samples whose Mahalanobis distance to *every* component exceeds k,

        outlier(x) = min_k sqrt((x - m_k)^T C_k^{-1} (x - m_k)) > k,

    or which are not finite. For a true sample the probability is at most
    P(chi_D > k) (exp(-k^2/2) ~ 3.4e-4 in 2-D for k = 4)."""
    x = jnp.asarray(samples, jnp.float32)
    z = mixture.rotated_offsets(x)  # [N, K, D]
    maha_sq = jnp.sum(z**2 / mixture.eigvals[None], axis=-1)  # [N, K]
    is_out = (jnp.min(maha_sq, axis=-1) > k**2) | ~jnp.all(jnp.isfinite(x), axis=-1)
    return jnp.mean(is_out.astype(jnp.float32))


def toy_metrics(
    samples: jax.Array, mixture: GaussianMixture, key: jax.Array, num_reference: int | None = None
) -> dict[str, float]:
    """All metrics of `samples` [N, D] against the mixture, as Python floats.

    The energy distance is taken against `num_reference` (default N) fresh samples from the
    mixture drawn with `key`; the other metrics use the exact mixture.
    """
    samples = jnp.asarray(samples, jnp.float32)
    values = _metric_values(samples, mixture, key, num_reference or samples.shape[0])
    return {name: float(value) for name, value in values.items()}


@functools.partial(jax.jit, static_argnames="num_reference")
def _metric_values(samples, mixture, key, num_reference):
    reference = mixture.sample(key, num_reference)
    return {
        "energy_distance": energy_distance(samples, reference),
        "mode_coverage": mode_coverage(samples, mixture),
        "mode_tv": mode_tv(samples, mixture),
        "nll": nll(samples, mixture),
        "outlier_fraction": outlier_fraction(samples, mixture),
    }


__all__ = [
    "energy_distance",
    "mode_coverage",
    "mode_histogram",
    "mode_tv",
    "nll",
    "outlier_fraction",
    "toy_metrics",
]
