"""Losses of one-step distillation: f-distill (DMD2, Diff-Instruct), SiD, Uni-Instruct.

Notation (EDM / VE): the generator makes `x0 = G(z)`, noised to `xt = x0 + sigma * eps`. The
teacher denoiser `D_phi` and the fake-score denoiser `D_psi` (trained online on generator
samples) give scores `s = (D - x) / sigma^2`, so `s_p - s_q = (D_phi - D_psi) / sigma^2`. `log_r`
estimates `log p_t(xt) - log q_t(xt)` (a discriminator logit). Shapes: `x0, xt, d_teacher,
d_fake` are `[B, ...]`, `sigma, log_r` are `[B]`.

Papers: f-distill (Xu, Nie, Vahdat 2025, arXiv 2502.15681); DMD2 (Yin et al. 2024); Diff-Instruct
(Luo et al. 2023); SiD (Zhou et al. 2024, arXiv 2404.04057); Uni-Instruct (Wang et al. 2025,
arXiv 2505.20755; our derivation of its weights is in `docs/uni_instruct_derivation.md`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from didistill.divergences import FDivergence, score_difference_loss

sg = jax.lax.stop_gradient


def _per_sample_mean(x):  # [B, ...] -> [B]
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _per_sample_sum(x):  # [B, ...] -> [B]
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _expand(v, like):  # [B] -> [B, 1, ..., 1]
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def dmd_normalizer(x0, d_teacher, eps=1e-6):
    """DMD's per-sample time weight `1 / mean_{dims} |x0 - D_phi(xt)|`, under stop-gradient."""
    return sg(1.0 / (_per_sample_mean(jnp.abs(x0 - d_teacher)) + eps))  # [B]


def _time_weight(x0, d_teacher, time_weight):  # [B]
    if time_weight == "dmd":
        return dmd_normalizer(x0, d_teacher)
    if time_weight == "none":
        return jnp.ones(x0.shape[0], x0.dtype)
    raise ValueError(f"time_weight must be 'dmd' or 'none', got {time_weight!r}")


def process_log_ratio(logit, ratio_lower=0.1, ratio_upper=20.0):
    """f-distill's reading of a discriminator logit as `log r`, clipped, in float32.

    FastGen clamps the logit to [-10, 10] and clips `r` to [0.1, 20]; the second clip implies
    the first, so `log r = clip(logit, log 0.1, log 20)`. Always under stop-gradient.
    """
    return sg(jnp.clip(logit.astype(jnp.float32), math.log(ratio_lower), math.log(ratio_upper)))


def bin_normalize_log_ratio(log_r, bins, num_bins, running_mean=None, ema_rate=0.0):
    """f-distill's time-binned ratio normalisation: `r <- r / (mean r in its noise bin + 1e-6)`.

    `bins` [B] (int) is each sample's noise bin; bins are equal-probability bins of the noise
    sampler (index bins of the Karras grid), so every bin is populated. With `ema_rate = 0` the
    bin means are batch statistics; otherwise `running_mean` [num_bins] is updated as
    `ema * old + (1 - ema) * batch` (bins absent from the batch keep their old value). Returns
    `(normalised log_r [B], new running_mean [num_bins])`. Means are over the global batch.
    """
    onehot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32)  # [B, K]
    r = jnp.exp(log_r)
    counts = onehot.sum(0)  # [K]
    batch_mean = (onehot * r[:, None]).sum(0) / jnp.maximum(counts, 1.0)  # [K]
    if running_mean is None:
        running_mean = batch_mean
    updated = ema_rate * running_mean + (1.0 - ema_rate) * batch_mean
    running_mean = jnp.where(counts > 0, updated, running_mean)
    per_sample = onehot @ running_mean  # [B]
    return sg(log_r - jnp.log(per_sample + 1e-6)), sg(running_mean)


def f_distill_generator_loss(
    x0, d_teacher, d_fake, log_r, divergence: FDivergence, normalize=True, time_weight="dmd"
):
    """f-distill's score-difference loss (reverse KL: DMD / DMD2 / Diff-Instruct).

    Gradient w.r.t. `x0_i`: `h(r_i) * omega_i * (D_psi - D_phi)(xt_i) / B`, i.e. descent moves
    samples along `h(r) (s_p - s_q)` with the time weight `omega * sigma^2` folded in.
    `time_weight='dmd'` is DMD's `1 / mean|x0 - D_phi|`; `'none'` is Diff-Instruct's unit weight.
    With `log_r` of a reverse KL (`h = 1`) this is DMD's distribution-matching gradient.
    The denoiser outputs are under stop-gradient; only `x0` is differentiated.
    """
    omega = _expand(_time_weight(x0, d_teacher, time_weight), x0)
    return score_difference_loss(
        x0, sg(d_teacher) * omega, sg(d_fake) * omega, log_r, divergence, normalize=normalize
    )


def sid_generator_loss(x0, d_teacher, d_fake, alpha, time_weight="dmd"):
    """SiD: `[(1 - a)||D_phi - D_psi||^2 + (D_phi - D_psi).(D_psi - x0)] / sg(mean|x0 - D_phi|)`.

    `d_teacher`, `d_fake` must be computed from `xt = x0 + sigma eps` WITH gradients flowing into
    the networks' inputs (their parameters frozen). `alpha = 1/2` is the value the score identity
    gives (see `docs/uni_instruct_derivation.md`); SiD publishes 1.2.
    """
    delta = d_teacher - d_fake
    per_sample = (1.0 - alpha) * _per_sample_sum(delta**2) + _per_sample_sum(delta * (d_fake - x0))
    return jnp.mean(per_sample * _time_weight(x0, d_teacher, time_weight))


def uni_instruct_generator_loss(
    x0,
    sigma,
    d_teacher,
    d_fake,
    log_r,
    divergence: FDivergence,
    alpha=0.5,
    normalize=True,
    time_weight="dmd",
):
    """Uni-Instruct: the `h`-weighted SiD term plus the Diff-Instruct term from `grad_x h(r)`.

    Per sample (derivation in `docs/uni_instruct_derivation.md`), with `P` the SiD integrand
    and `n = 1 / sg(mean|x0 - D_phi|)`:
        L = sg(w) P n + < sg((dh/dlog r) / mean(h) * P n * (D_phi - D_psi) / sigma^2), x0 >,
    `w = h(r) / mean(h)`. Reverse KL (`h = 1`) reduces exactly to SiD.
    """
    delta = d_teacher - d_fake
    p_term = (1.0 - alpha) * _per_sample_sum(delta**2) + _per_sample_sum(delta * (d_fake - x0))
    p_term = p_term * _time_weight(x0, d_teacher, time_weight)  # [B]
    weight = divergence.weight(log_r)  # [B]
    dweight = jax.jvp(divergence.weight, (log_r,), (jnp.ones_like(log_r),))[1]  # dh / dlog r
    scale = jnp.mean(weight) if normalize else 1.0
    weight, dweight = sg(weight / scale), sg(dweight / scale)
    grad_log_r = sg(delta) / _expand(sigma**2, x0)  # grad_x log r_t = s_p - s_q
    di_direction = sg(_expand(dweight * p_term, x0) * grad_log_r)
    return jnp.mean(weight * p_term + _per_sample_sum(di_direction * x0))


def fake_score_loss(d_fake, x0, sigma, sigma_data):
    """EDM's weighted denoising loss on generator samples `x0` (already under stop-gradient)."""
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # [B]
    return jnp.mean(lam * _per_sample_sum((d_fake - x0) ** 2))


def discriminator_loss(logit_real, logit_fake):
    """Non-saturating logistic loss; at the optimum `logit = log p_t - log q_t`."""
    return jnp.mean(jax.nn.softplus(-logit_real)) + jnp.mean(jax.nn.softplus(logit_fake))


def generator_gan_loss(logit_fake):
    """The generator's non-saturating GAN term `softplus(-logit)`."""
    return jnp.mean(jax.nn.softplus(-logit_fake))


__all__ = [
    "bin_normalize_log_ratio",
    "discriminator_loss",
    "dmd_normalizer",
    "f_distill_generator_loss",
    "fake_score_loss",
    "generator_gan_loss",
    "process_log_ratio",
    "sid_generator_loss",
    "uni_instruct_generator_loss",
]
