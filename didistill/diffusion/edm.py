"""EDM: preconditioning, training loss and deterministic Heun sampler.

Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models", NeurIPS 2022 (arXiv:2206.00364).

Convention (variance exploding): the noisy sample is x_t = x0 + sigma * eps, eps ~ N(0, I),
with sigma in [sigma_min, sigma_max] = [0.002, 80]. A denoiser D(x; sigma) estimates
E[x0 | x_t = x]; by Tweedie's formula the score of the noisy marginal p_sigma is

    grad_x log p_sigma(x) = (D(x; sigma) - x) / sigma^2.

Preconditioning (EDM Table 1). A raw network F is wrapped as

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),
    c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out   = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4,

so that the input and the training target of F have unit variance when x0 has std sigma_data.

Training: ln sigma ~ N(P_mean, P_std^2) with P_mean = -1.2, P_std = 1.2, and the loss is
E[ lambda(sigma) ||D(x0 + sigma eps; sigma) - x0||^2 ] with
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2, which makes the
effective target of F unit-variance at every sigma.

Sampling: the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, integrated from
sigma_max to 0 on the Karras schedule with Heun's method (Euler on the last step, whose end
point is sigma = 0), NFE = 2N - 1 for N steps.

Shapes: `x` is [B, ...]; `sigma` is a scalar or [B] (one noise level per example).
A denoiser function is `denoise(x [B, ...], sigma [B]) -> x0_hat [B, ...]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


class Preconditioning(NamedTuple):
    """The four EDM coefficients at one sigma (each with the shape of sigma)."""

    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def preconditioning(sigma, sigma_data: float = SIGMA_DATA) -> Preconditioning:
    """EDM coefficients (c_skip, c_out, c_in, c_noise) for noise level(s) `sigma` (> 0)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    total = sigma**2 + sigma_data**2
    return Preconditioning(
        c_skip=sigma_data**2 / total,
        c_out=sigma * sigma_data / jnp.sqrt(total),
        c_in=1.0 / jnp.sqrt(total),
        c_noise=jnp.log(sigma) / 4.0,
    )


def _per_example(sigma, x: jax.Array) -> jax.Array:
    """Broadcasts a scalar or [B] sigma to [B, 1, ..., 1] against x [B, ...]."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])  # [B]
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))


def precondition(raw_fn, x: jax.Array, sigma, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

    Args:
      raw_fn: the raw network, `raw_fn(x_in [B, ...], c_noise [B]) -> F [B, ...]`.
      x: noisy input [B, ...].
      sigma: noise level, scalar or [B].
      sigma_data: data standard deviation.

    Returns:
      The denoised estimate D(x; sigma), [B, ...].
    """
    sigma_b = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])  # [B]
    coef = preconditioning(sigma_b, sigma_data)
    expand = lambda c: c.reshape(c.shape + (1,) * (x.ndim - 1))  # [B] -> [B, 1, ...]
    raw = raw_fn(expand(coef.c_in) * x, coef.c_noise)  # [B, ...]
    return expand(coef.c_skip) * x + expand(coef.c_out) * raw


def loss_weight(sigma, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_training_sigma(key, shape, p_mean: float = P_MEAN, p_std: float = P_STD):
    """Log-normal training noise levels: ln sigma ~ N(p_mean, p_std^2). Returns `shape`."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape, jnp.float32))


def denoising_loss(
    denoise: Denoiser,
    x0: jax.Array,
    key: jax.Array,
    sigma_data: float = SIGMA_DATA,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
) -> jax.Array:
    """EDM weighted denoising score matching loss, a scalar.

        L = E_{x0, sigma, eps} [ lambda(sigma) mean_d (D(x0 + sigma eps; sigma) - x0)_d^2 ]

    The squared error is averaged over the non-batch dimensions (EDM sums them; the mean makes
    the value ~1 at initialisation whatever the data dimension) and then over the batch.

    Args:
      denoise: `denoise(x [B, ...], sigma [B]) -> x0_hat [B, ...]`.
      x0: clean data [B, ...].
      key: PRNG key for sigma and eps.
    """
    sigma_key, noise_key = jax.random.split(key)
    sigma = sample_training_sigma(sigma_key, x0.shape[:1], p_mean, p_std)  # [B]
    eps = jax.random.normal(noise_key, x0.shape, x0.dtype)  # [B, ...]
    x_t = x0 + _per_example(sigma, x0) * eps
    sq_err = jnp.square(denoise(x_t, sigma) - x0)  # [B, ...]
    per_example = jnp.mean(sq_err.reshape(x0.shape[0], -1), axis=1)  # [B]
    return jnp.mean(loss_weight(sigma, sigma_data) * per_example)


def karras_sigmas(
    num_steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> jax.Array:
    """Karras noise schedule with a trailing zero, [num_steps + 1], decreasing.

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..N-1, and sigma_N = 0.  For N = 1 the schedule is [sigma_max, 0].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return jnp.array([sigma_max, 0.0], jnp.float32)
    frac = jnp.arange(num_steps, dtype=jnp.float32) / (num_steps - 1)  # [N]
    inv_rho = 1.0 / rho
    lo, hi = sigma_min**inv_rho, sigma_max**inv_rho
    sigmas = (hi + frac * (lo - hi)) ** rho  # [N]
    return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])


def heun_nfe(num_steps: int) -> int:
    """Number of denoiser evaluations of the Heun sampler with `num_steps` steps: 2N - 1."""
    return 2 * num_steps - 1


def heun_steps_for_nfe(nfe: int) -> int:
    """Inverse of `heun_nfe`: N = (NFE + 1) / 2; NFE must be odd and >= 1."""
    if nfe < 1 or nfe % 2 == 0:
        raise ValueError(f"the Heun sampler needs an odd NFE >= 1 (NFE = 2N - 1), got {nfe}")
    return (nfe + 1) // 2


def heun_sample(
    denoise: Denoiser,
    latents: jax.Array,
    num_steps: int = 18,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    sigmas: jax.Array | None = None,
    return_nfe: bool = False,
):
    """Deterministic EDM sampler (Heun, Euler on the last step). Jittable.

    Integrates dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma from x_0 = sigma_0 latents:

        x'      = x_i + (sigma_{i+1} - sigma_i) d(x_i, sigma_i)                   (Euler)
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d(x_i, sigma_i) + d(x', sigma_{i+1})) / 2,

    the correction being skipped on the last step (sigma_N = 0), so NFE = 2N - 1. Few steps
    are unstable for sharp data: a Heun step whose end point sigma is much smaller than the
    data's scale evaluates the drift (x' - D(x'))/sigma_{i+1} with a tiny denominator (with
    the exact 'ring8' denoiser, N <= 6 diverges; N = 12 is accurate; EDM uses N = 18).

    Args:
      denoise: `denoise(x [B, ...], sigma [B]) -> x0_hat [B, ...]`.
      latents: standard normal noise [B, ...]; the chain starts at sigma_0 * latents.
      num_steps: N, ignored when `sigmas` is given.
      sigmas: optional explicit decreasing schedule [N + 1] ending with 0.
      return_nfe: also return the number of denoiser calls counted during the run.

    Returns:
      samples [B, ...], or (samples, nfe int32 scalar) when `return_nfe`.
    """
    if sigmas is None:
        sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    sigmas = jnp.asarray(sigmas, jnp.float32)  # [N + 1]
    batch = latents.shape[0]

    def drift(x, sigma):  # dx/dsigma at a scalar sigma > 0
        sigma_b = jnp.full((batch,), sigma, x.dtype)  # [B]
        return (x - denoise(x, sigma_b)) / sigma

    def heun_step(carry, sigma_pair):
        x, nfe = carry
        sigma_cur, sigma_next = sigma_pair[0], sigma_pair[1]
        d_cur = drift(x, sigma_cur)
        x_euler = x + (sigma_next - sigma_cur) * d_cur
        d_next = drift(x_euler, sigma_next)
        x = x + (sigma_next - sigma_cur) * 0.5 * (d_cur + d_next)
        return (x, nfe + 2), None

    x = latents * sigmas[0]
    pairs = jnp.stack([sigmas[:-2], sigmas[1:-1]], axis=1)  # [N - 1, 2], all sigma > 0
    nfe = jnp.int32(0)
    if pairs.shape[0] > 0:  # (a zero-length scan is rejected under jax.disable_jit)
        (x, nfe), _ = jax.lax.scan(heun_step, (x, nfe), pairs)
    x = x + (sigmas[-1] - sigmas[-2]) * drift(x, sigmas[-2])  # final Euler step to sigmas[-1]
    nfe = nfe + 1
    return (x, nfe) if return_nfe else x


def score_from_denoiser(denoised: jax.Array, x: jax.Array, sigma) -> jax.Array:
    """Tweedie: grad log p_sigma(x) = (D(x; sigma) - x) / sigma^2. Shapes [B, ...], sigma [B]."""
    return (denoised - x) / _per_example(sigma, x) ** 2


__all__ = [
    "P_MEAN",
    "P_STD",
    "RHO",
    "SIGMA_DATA",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "Preconditioning",
    "denoising_loss",
    "heun_nfe",
    "heun_sample",
    "heun_steps_for_nfe",
    "karras_sigmas",
    "loss_weight",
    "precondition",
    "preconditioning",
    "sample_training_sigma",
    "score_from_denoiser",
]
