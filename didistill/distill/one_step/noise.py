"""Noise levels of one-step distillation: the samplers of the reference codes and f-distill's bins.

`config.distill.noise` picks the generator's sampler, `config.distill.fake_score_noise` the fake
score's (`'same'`: the generator's). All return sigma [n] (float32):

- `'karras_index'` (FastGen `EDMNoiseSchedule.sample_t(time_dist_type='polynomial')`, DMD2
  `EDMGuidance.compute_distribution_matching_loss`): an index uniform on the *inclusive* range
  `[min_index, max_index]` of the ascending Karras grid of `num_sigmas` points between
  `sigma_min` and `sigma_max` (rho 7). FastGen: [2, 998]; DMD2: [20, 980].
- `'all_indices'` (DMD2 `compute_loss_fake`): every index of that grid, [0, num_sigmas - 1].
- `'sid'` (SiD `generator_loss`, Uni-Instruct `generator_share_encoder_loss`):
  `u ~ U[0, tmax / 1000)`, `sigma = (max^(1/rho) + (1 - u)(min^(1/rho) - max^(1/rho)))^rho`;
  tmax = 800 gives sigma in (0.002, about 24.4].
- `'lognormal'` (EDM / SiD / Diff-Instruct fake-score loss, Diff-Instruct generator):
  `log sigma ~ N(p_mean, p_std^2)`, (-1.2, 1.2) in all three codes.

`time_bins` is f-distill's bin index: `num_bins` bins of *equal width in sigma* over
`[sigma_min, sigma_max]` (FastGen `FdistillModel._get_f_div_weighting_h`), so on FastGen's
sampler bin 0 (sigma < 8) holds about 64% of the samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RHO = 7.0
SAMPLERS = ("karras_index", "all_indices", "sid", "lognormal")


def karras_grid_ascending(num, sigma_min, sigma_max, rho=RHO) -> np.ndarray:
    """The `num`-point Karras grid, smallest sigma first (FastGen's `_sigmas`), float64."""
    ramp = np.linspace(0.0, 1.0, num)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return np.flip((hi + ramp * (lo - hi)) ** rho)


def sid_sigma(u, sigma_min=0.002, sigma_max=80.0, rho=RHO):
    """SiD's map from `u` in [0, tmax / 1000) to sigma (u = 0 is sigma_max)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1.0 - u) * (lo - hi)) ** rho


def make_sampler(kind: str, d):
    """`(key, n) -> sigma [n]` for sampler `kind` with the `config.distill` block `d`."""
    if kind not in SAMPLERS:
        raise ValueError(f"config.distill noise sampler {kind!r} is not one of {SAMPLERS}")
    grid = jnp.asarray(karras_grid_ascending(d.num_sigmas, d.sigma_min, d.sigma_max), jnp.float32)
    if kind in ("karras_index", "all_indices"):
        lo, hi = (d.min_index, d.max_index) if kind == "karras_index" else (0, d.num_sigmas - 1)

        def sample(key, n):
            return grid[jax.random.randint(key, (n,), lo, hi + 1)]

    elif kind == "sid":

        def sample(key, n):
            u = jax.random.uniform(key, (n,)) * d.tmax / 1000.0
            return sid_sigma(u, d.sigma_min, d.sigma_max).astype(jnp.float32)

    else:

        def sample(key, n):
            return jnp.exp(d.p_mean + d.p_std * jax.random.normal(key, (n,)))

    return sample


def time_bins(sigma, num_bins, sigma_min=0.002, sigma_max=80.0):
    """f-distill's bin of each noise level: equal width in sigma over [sigma_min, sigma_max]."""
    width = (sigma_max - sigma_min) / num_bins
    return jnp.clip(jnp.floor((sigma - sigma_min) / width), 0, num_bins - 1).astype(jnp.int32)


__all__ = ["SAMPLERS", "karras_grid_ascending", "make_sampler", "sid_sigma", "time_bins"]
