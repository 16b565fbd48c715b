"""Analytic Gaussian-mixture toys whose noisy densities, scores and denoisers are exact.

A mixture p(x0) = sum_k w_k N(x0; m_k, C_k) convolved with the EDM noise N(0, sigma^2 I) is
again a Gaussian mixture,

    p_sigma(x) = sum_k w_k N(x; m_k, C_k + sigma^2 I),

so every quantity a diffusion model estimates has a closed form at every sigma:

    score       grad log p_sigma(x) = -sum_k r_k(x) (C_k + sigma^2 I)^{-1} (x - m_k)
    denoiser    E[x0 | x] = x + sigma^2 score(x)                            (Tweedie)
                          = sum_k r_k(x) [m_k + C_k (C_k + sigma^2 I)^{-1} (x - m_k)]
    posterior   r_k(x) = w_k N(x; m_k, C_k + sigma^2 I) / p_sigma(x)         (responsibilities)

Each covariance is stored through its eigendecomposition C_k = U_k diag(l_k) U_k^T, so
C_k + sigma^2 I = U_k diag(l_k + sigma^2) U_k^T for any sigma without a new factorisation.
Everything is jittable JAX; log densities go through logsumexp. `sigma` is a scalar or [N].

Named toys (`get_toy`), all 2-D:
- 'ring8': 8 isotropic modes (std 0.1) on a circle of radius 2, weights proportional to
  [1, 1, 1, 0.25, 1, 1, 1, 0.25] (modes 3 and 7, opposite each other, are rare: 1/26 each,
  against 4/26 for a common mode), to see which divergences drop rare modes.
- 'grid25': 5 x 5 grid of equal modes at {-2, -1, 0, 1, 2}^2, std 0.08.
- 'moons': two interleaved half circles (the usual two-moons layout, centred), each drawn as
  16 equal Gaussians of std 0.1 along the arc; neighbours overlap so each arc is smooth.
"""

from __future__ import annotations

from collections.abc import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def _per_row(sigma, x: jax.Array) -> jax.Array:
    """sigma (scalar or [N]) -> [N, 1, 1] for broadcasting against [N, K, D]."""
    return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])[:, None, None]


@flax.struct.dataclass
class GaussianMixture:
    """A Gaussian mixture in D dimensions. Build it with `GaussianMixture.create`.

    Fields (all arrays, so the mixture is a pytree and can be passed through jit):
      means [K, D]; weights [K] (normalised); eigvals [K, D] and eigvecs [K, D, D], the
      eigendecomposition of the covariances, C_k = eigvecs_k diag(eigvals_k) eigvecs_k^T.
    """

    means: jax.Array
    weights: jax.Array
    eigvals: jax.Array
    eigvecs: jax.Array

    @classmethod
    def create(cls, means, weights=None, stds=None, covariances=None) -> GaussianMixture:
        """From means [K, D], weights [K] (default uniform, normalised here), and either
        isotropic stds (scalar or [K]) or full covariances [K, D, D] (symmetric positive
        definite)."""
        means = np.asarray(means, np.float64)
        num, dim = means.shape
        weights = np.ones(num) if weights is None else np.asarray(weights, np.float64)
        if weights.shape != (num,) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"weights must be [K={num}] non-negative, got {weights}")
        if (stds is None) == (covariances is None):
            raise ValueError("give exactly one of stds or covariances")
        if covariances is None:
            stds = np.broadcast_to(np.asarray(stds, np.float64), (num,))
            eigvals = np.repeat((stds**2)[:, None], dim, axis=1)  # [K, D]
            eigvecs = np.broadcast_to(np.eye(dim), (num, dim, dim))  # [K, D, D]
        else:
            covariances = np.asarray(covariances, np.float64)
            covariances = 0.5 * (covariances + np.swapaxes(covariances, 1, 2))
            eigvals, eigvecs = np.linalg.eigh(covariances)
            if np.any(eigvals <= 0):
                raise ValueError("covariances must be positive definite")
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return cls(f32(means), f32(weights / weights.sum()), f32(eigvals), f32(eigvecs))

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def covariances(self) -> jax.Array:
        """C_k [K, D, D]."""
        return jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)

    def rotated_offsets(self, x: jax.Array) -> jax.Array:
        """U_k^T (x - m_k) for every row and component: [N, K, D]."""
        diff = x[:, None, :] - self.means[None]  # [N, K, D]
        return jnp.einsum("kdj,nkd->nkj", self.eigvecs, diff)

    def component_log_probs(self, x: jax.Array, sigma=0.0) -> jax.Array:
        """log w_k + log N(x; m_k, C_k + sigma^2 I), [N, K]."""
        var = self.eigvals[None] + _per_row(sigma, x) ** 2  # [N, K, D]
        z = self.rotated_offsets(x)  # [N, K, D]
        log_norm = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * var) + z**2 / var, axis=-1)  # [N, K]
        return jnp.log(self.weights)[None] + log_norm

    def log_prob(self, x: jax.Array, sigma=0.0) -> jax.Array:
        """log p_sigma(x), [N], for x [N, D] and sigma scalar or [N]."""
        return jax.nn.logsumexp(self.component_log_probs(x, sigma), axis=-1)

    def responsibilities(self, x: jax.Array, sigma=0.0) -> jax.Array:
        """Posterior mode probabilities r_k(x) = p(k | x_sigma = x), [N, K]."""
        return jax.nn.softmax(self.component_log_probs(x, sigma), axis=-1)

    def assign_modes(self, x: jax.Array, sigma=0.0) -> jax.Array:
        """Most probable mode of each row, int32 [N]."""
        return jnp.argmax(self.component_log_probs(x, sigma), axis=-1).astype(jnp.int32)

    def score(self, x: jax.Array, sigma=0.0) -> jax.Array:
        """grad_x log p_sigma(x) = -sum_k r_k (C_k + sigma^2 I)^{-1} (x - m_k), [N, D]."""
        var = self.eigvals[None] + _per_row(sigma, x) ** 2  # [N, K, D]
        comp = -jnp.einsum("kdj,nkj->nkd", self.eigvecs, self.rotated_offsets(x) / var)  # [N, K, D]
        return jnp.einsum("nk,nkd->nd", self.responsibilities(x, sigma), comp)

    def denoiser(self, x: jax.Array, sigma) -> jax.Array:
        """E[x0 | x0 + sigma eps = x] = x + sigma^2 score, [N, D].

        Computed as sum_k r_k [m_k + C_k (C_k + sigma^2 I)^{-1} (x - m_k)], which equals the
        Tweedie form exactly and avoids its cancellation at large sigma.
        """
        var = self.eigvals[None] + _per_row(sigma, x) ** 2  # [N, K, D]
        shrunk = self.rotated_offsets(x) * (self.eigvals[None] / var)  # [N, K, D]
        comp = self.means[None] + jnp.einsum("kdj,nkj->nkd", self.eigvecs, shrunk)  # [N, K, D]
        return jnp.einsum("nk,nkd->nd", self.responsibilities(x, sigma), comp)

    def sample(self, key_or_rng, n: int, return_modes: bool = False):
        """n samples [n, D] float32 (and their modes [n] when `return_modes`).

        `key_or_rng` is a JAX PRNG key (JAX sampling, jittable for a static n) or a
        `numpy.random.Generator` (NumPy sampling on the host, returns NumPy arrays).
        """
        scale = self.eigvecs * jnp.sqrt(self.eigvals)[:, None, :]  # [K, D, D]; C = S S^T
        if isinstance(key_or_rng, np.random.Generator):
            rng = key_or_rng
            weights = np.asarray(self.weights, np.float64)
            modes = rng.choice(self.num_modes, size=n, p=weights / weights.sum())  # [n]
            eps = rng.standard_normal((n, self.dim))  # [n, D]
            x = np.asarray(self.means)[modes] + np.einsum(
                "nij,nj->ni", np.asarray(scale)[modes], eps
            )
            x = x.astype(np.float32)
            return (x, modes.astype(np.int32)) if return_modes else x
        mode_key, noise_key = jax.random.split(key_or_rng)
        modes = jax.random.categorical(mode_key, jnp.log(self.weights), shape=(n,))  # [n]
        eps = jax.random.normal(noise_key, (n, self.dim), jnp.float32)
        x = self.means[modes] + jnp.einsum("nij,nj->ni", scale[modes], eps)
        return (x, modes.astype(jnp.int32)) if return_modes else x


def data_std(mixture: GaussianMixture) -> np.ndarray:
    """Exact per-coordinate standard deviation of the (clean) mixture, [D].

    Var_j = sum_k w_k (C_k,jj + m_kj^2) - (sum_k w_k m_kj)^2.
    """
    w = np.asarray(mixture.weights, np.float64)
    means = np.asarray(mixture.means, np.float64)
    cov_diag = np.einsum("kij,kj->ki", np.asarray(mixture.eigvecs) ** 2, mixture.eigvals)
    second = np.einsum("k,kd->d", w, cov_diag + means**2)
    mean = w @ means
    return np.sqrt(second - mean**2)


def _ring8() -> GaussianMixture:
    angles = 2 * np.pi * np.arange(8) / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture.create(means, [1, 1, 1, 0.25, 1, 1, 1, 0.25], stds=0.1)


def _grid25() -> GaussianMixture:
    ticks = np.arange(-2.0, 3.0)
    means = np.stack(np.meshgrid(ticks, ticks, indexing="ij"), axis=-1).reshape(-1, 2)
    return GaussianMixture.create(means, stds=0.08)


def _moons(per_arc: int = 16) -> GaussianMixture:
    t = np.linspace(0.0, np.pi, per_arc)
    upper = np.stack([np.cos(t), np.sin(t)], axis=1)
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)
    means = np.concatenate([upper, lower]) - np.array([0.5, 0.25])
    return GaussianMixture.create(means, stds=0.1)


TOYS = {"ring8": _ring8, "grid25": _grid25, "moons": _moons}


def get_toy(name: str) -> GaussianMixture:
    """One of the named toys: 'ring8', 'grid25', 'moons' (see the module docstring)."""
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; choose one of {sorted(TOYS)}")
    return TOYS[name]()


def batches(
    mixture: GaussianMixture, seed: int, batch_size: int, start_step: int = 0, shard: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches {'x': float32 [batch_size, D]}, one per step from start_step.

    Batch `step` depends only on (seed, shard, step): rng = default_rng([seed, shard, step]),
    so a resumed run sees exactly the batches of an uninterrupted one. `shard` separates
    processes of a multi-host run (use jax.process_index()).
    """
    step = start_step
    while True:
        rng = np.random.default_rng([seed, shard, step])
        yield {"x": mixture.sample(rng, batch_size)}
        step += 1


__all__ = ["TOYS", "GaussianMixture", "batches", "data_std", "get_toy"]
