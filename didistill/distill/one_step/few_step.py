"""Few-step students: the K-step sampler and DMD2's backward simulation of its training inputs.

A K-step student (`config.generator.num_steps = K`) is the one-step generator applied K times:
step k maps `x_k` at noise level `sigma_k` to `x0_k = G_theta(x_k; sigma_k)` and renoises it
with fresh noise to the next level, `x_{k+1} = x0_k + sigma_{k+1} eps_k`; `x_0 = sigma_0 z` and
the sample is `x0_{K-1}` (K network evaluations: NFE = K). K = 1 is the one-step generator.

Noise levels (`step_sigmas`): `sigma_0 = sigma_g` (`config.generator.sigma`), then the Karras
ramp (rho 7) from `sigma_g` down to `sigma_min` at fractions `k / K`:
`sigma_k = (sigma_g^(1/rho) + (k / K)(sigma_min^(1/rho) - sigma_g^(1/rho)))^rho`, k < K. This is
our EDM transcription of DMD2's few-step list (tianweiy/DMD2 8d8fa55,
`main/sd_unified_model.py` lines 31-32: `range(T - 1, 0, -T // K)`, i.e. the timesteps at
fractions `1 - k / K` of the training range, [999, 749, 499, 249] for K = 4), with the EDM
time variable `sigma^(1/rho)` in place of the DDPM timestep.

Backward simulation (DMD2 `sample_backward` and `prepare_denoising_data`, same file, lines
127-200): one step index `k ~ U{0, ..., K-1}` is drawn per batch (shared by every sample);
the student's own steps `0 .. k-1` are run from fresh noise without gradients, their last `x0`
is renoised to `sigma_k` with independent noise (`k = 0`: pure noise `sigma_0 z`), and the
generator is differentiated only at step k. The critics (fake score, discriminator) train on
the same kind of samples (DMD2's guidance model reads the generator's output of that turn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RHO = 7.0


def step_sigmas(sigma_g: float, num_steps: int, sigma_min: float = 0.002, rho: float = RHO):
    """The K noise levels `[sigma_0 = sigma_g, ..., sigma_{K-1}]` (float64 NumPy, descending)."""
    if num_steps < 1:
        raise ValueError(f"config.generator.num_steps must be >= 1, got {num_steps}")
    frac = np.arange(num_steps) / num_steps
    hi, lo = float(sigma_g) ** (1 / rho), float(sigma_min) ** (1 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    sigmas[0] = sigma_g  # exact, whatever the rounding of the power
    return sigmas


def _expand(v, like):  # [B] -> [B, 1, ..., 1]
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _full(value, like):  # a noise level for each sample of `like`, in its dtype
    return jnp.full((like.shape[0],), value, like.dtype)


def sample(step, params, z, sigmas, key, cond=None):
    """K-step sampling: `step(params, x [B, ...], sigma [B], cond) -> x0`; `z` [B, ...] ~ N(0, I),
    `sigmas` [K] from `step_sigmas`; `key` draws the renoising noise. Returns `x0_{K-1}`."""
    sigmas = [float(s) for s in sigmas]
    x = sigmas[0] * z
    keys = jax.random.split(key, max(len(sigmas) - 1, 1))
    for k, sigma in enumerate(sigmas):
        x0 = step(params, x, _full(sigma, x), cond)
        if k + 1 < len(sigmas):
            x = x0 + sigmas[k + 1] * jax.random.normal(keys[k], x0.shape, x0.dtype)
    return x0


def backward_simulation(step, params, z, sigmas, key, cond=None):
    """DMD2's training sample of a K-step student: `(x0 [B, ...], k [])`, gradient only through
    the step-k call (see the module docstring). `z` [B, ...] ~ N(0, I) is step 0's latent; the
    earlier steps run from independent noise (DMD2: "uncorrelated noise")."""
    sigmas = [float(s) for s in sigmas]
    num = len(sigmas)
    k_index, k_sim, k_renoise, k_eps = jax.random.split(key, 4)
    index = jax.random.randint(k_index, (), 0, num)
    sim_keys = jax.random.split(k_sim, num)
    frozen = jax.lax.stop_gradient(params)
    x = sigmas[0] * z  # k = 0: the input is pure noise
    x_sim = sigmas[0] * jax.random.normal(k_renoise, z.shape, z.dtype)
    for j in range(num - 1):  # the student's steps 0..j under stop-gradient, renoised to j + 1
        x0_j = jax.lax.stop_gradient(step(frozen, x_sim, _full(sigmas[j], x_sim), cond))
        eps = jax.random.normal(sim_keys[j], x0_j.shape, x0_j.dtype)
        x_sim = x0_j + sigmas[j + 1] * eps
        renoised = x0_j + sigmas[j + 1] * jax.random.normal(k_eps, x0_j.shape, x0_j.dtype)
        x = jnp.where(index == j + 1, renoised, x)
    sigma = jnp.asarray(sigmas, x.dtype)[index]
    return step(params, x, _full(sigma, x), cond), index


__all__ = ["backward_simulation", "sample", "step_sigmas"]
