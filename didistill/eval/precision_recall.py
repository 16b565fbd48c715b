"""Improved precision and recall of a generative model in a feature space (Kynkäänniemi,
Karras, Laine, Lehtinen, Aila 2019, "Improved Precision and Recall Metric for Assessing
Generative Models", arXiv:1904.06991).

Maths. Each feature set approximates its distribution's support by a union of balls: for a set
Phi = {phi_i}, the ball around phi_i has radius NND_k(phi_i), the distance from phi_i to its
k-th nearest neighbour in Phi other than itself. A point x is inside the manifold of Phi when

    f(x, Phi) = 1  iff  ||x - phi_i||_2 <= NND_k(phi_i) for at least one i.

With real features Phi_r [N_r, F] and generated features Phi_g [N_g, F]:

    precision = (1/N_g) sum_{g in Phi_g} f(g, Phi_r)   (share of samples on the data manifold),
    recall    = (1/N_r) sum_{r in Phi_r} f(r, Phi_g)   (share of data on the samples' manifold).

The paper uses k = 3. A model that drops a mode keeps its precision and loses recall; one that
spreads mass off the data loses precision. Both are in [0, 1]; identical sets give 1 and 1.

Computation: all pairwise Euclidean distances by blocks of query rows (||a||^2 + ||b||^2 -
2 a.b clipped at 0, float32, `Precision.HIGHEST`), in one jitted function per shape. A duplicate
point counts as a neighbour at distance 0 (the reference sorts whole distance rows, self
included, and takes entry k). Ties at the radius count as inside (<=), as in the reference.
Memory: [block, N] distances at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """||a_i - b_j||^2 for a [M, F], b [N, F] -> [M, N], clipped at 0."""
    dot = jnp.matmul(a, b.T, precision=_HIGHEST)  # [M, N]
    sq = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * dot
    return jnp.maximum(sq, 0.0)


def _row_blocks(x: jax.Array, block: int) -> tuple[jax.Array, int]:
    """x [M, F] zero-padded to a multiple of `block` rows and reshaped [M' / block, block, F]."""
    pad = (-x.shape[0]) % block
    return jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, x.shape[1]), x.shape[0]


@functools.partial(jax.jit, static_argnames=("k", "block"))
def knn_radii(features: jax.Array, k: int = 3, block: int = 256) -> jax.Array:
    """NND_k: distance of each of features [N, F] to its k-th nearest other point -> [N].

    Needs N > k. Row i's own zero distance is the first of its sorted row, so the radius is
    entry k of the sorted squared distances (ascending).
    """
    f = jnp.asarray(features, jnp.float32)
    blocks, n = _row_blocks(f, block)

    def radii(rows):  # [block, F] -> [block]
        sq = _squared_distances(rows, f)  # [block, N]
        smallest = -jax.lax.top_k(-sq, k + 1)[0]  # [block, k + 1], ascending
        return jnp.sqrt(smallest[:, k])

    return jax.lax.map(radii, blocks).reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames="block")
def inside_manifold(
    queries: jax.Array, reference: jax.Array, radii: jax.Array, block: int = 256
) -> jax.Array:
    """f(x, Phi) for each query [M, F] against reference [N, F] with radii [N] -> bool [M]."""
    ref = jnp.asarray(reference, jnp.float32)
    squared_radii = jnp.asarray(radii, jnp.float32) ** 2  # [N]
    blocks, m = _row_blocks(jnp.asarray(queries, jnp.float32), block)

    def inside(rows):  # [block, F] -> [block]
        return jnp.any(_squared_distances(rows, ref) <= squared_radii[None, :], axis=1)

    return jax.lax.map(inside, blocks).reshape(-1)[:m]


def precision_recall(real, fake, k: int = 3) -> dict[str, float]:
    """{'precision', 'recall'} of generated features fake [N_g, F] against real [N_r, F].

    Raises ValueError unless both are 2-D with the same F and more than k rows.
    """
    real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
    for name, x in (("real", real), ("fake", fake)):
        if x.ndim != 2 or x.shape[0] <= k:
            raise ValueError(f"{name} features must be [N, F] with N > k={k}, got {x.shape}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature widths differ: real {real.shape[1]}, fake {fake.shape[1]}")
    precision = inside_manifold(fake, real, knn_radii(real, k))
    recall = inside_manifold(real, fake, knn_radii(fake, k))
    return {"precision": float(jnp.mean(precision)), "recall": float(jnp.mean(recall))}


__all__ = ["inside_manifold", "knn_radii", "precision_recall"]
