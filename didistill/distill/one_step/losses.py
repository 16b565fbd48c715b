"""Losses of one-step distillation: f-distill (DMD2, Diff-Instruct), SiD, Uni-Instruct.

Notation (EDM / VE): the generator makes `x0 = G(z)`, noised to `xt = x0 + sigma * eps`. The
teacher denoiser `D_phi` and the fake-score denoiser `D_psi` (trained online on generator
samples) give scores `s = (D - x) / sigma^2`, so `s_p - s_q = (D_phi - D_psi) / sigma^2`. `log_r`
estimates `log p_t(xt) - log q_t(xt)` (a discriminator logit). Shapes: `x0, xt, d_teacher,
d_fake` are `[B, ...]`, `sigma, log_r` are `[B]`.

Papers: f-distill (Xu, Nie, Vahdat 2025, arXiv 2502.15681); DMD2 (Yin et al. 2024); Diff-Instruct
(Luo et al. 2023); SiD (Zhou et al. 2024, arXiv 2404.04057); Uni-Instruct (Wang et al. 2025,
arXiv 2505.20755; our derivation of its weights is in `docs/uni_instruct_derivation.md`).

Scale: every generator loss here is a *mean over samples and data dimensions* (FastGen / DMD2:
`0.5 * mse(x, sg(x - grad))`, mean reduction), so a published `gan_weight` means what it
means in FastGen and DMD2. SiD and Uni-Instruct sum over dimensions and multiply by a loss
scale of 100; with Adam that scale only moves epsilon, and the GAN weights of those recipes are
translated in the configs (see `docs/one_step_settings.md`). `tests/parity/` checks each
formula against a NumPy transcription of the reference code.
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
    """DMD's per-sample time weight `1 / (mean_{dims} |x0 - D_phi(xt)| + 1e-6)`, stop-gradient.

    FastGen `variational_score_distillation_loss` adds 1e-6 (float32); DMD2 adds nothing (and
    `nan_to_num`s the gradient), SiD clips the mean at 1e-5: the same away from a perfect teacher.
    """
    return sg(1.0 / (_per_sample_mean(jnp.abs(x0 - d_teacher)) + eps))  # [B]


def _time_weight(x0, d_teacher, time_weight):  # [B]
    if time_weight == "dmd":
        return dmd_normalizer(x0, d_teacher)
    if time_weight == "none":
        return jnp.ones(x0.shape[0], x0.dtype)
    raise ValueError(f"time_weight must be 'dmd' or 'none', got {time_weight!r}")


def process_log_ratio(logit, ratio_lower=0.1, ratio_upper=20.0):
    """f-distill's reading of a discriminator logit as `log r`, clipped, in float32.

    `logit` is [B] or [B, heads] (one logit per feature resolution): FastGen averages the heads,
    clamps to [-10, 10] and clips `r` to [0.1, 20]; the second clip implies the first, so
    `log r = clip(mean_heads logit, log 0.1, log 20)`. Always under stop-gradient.
    """
    logit = logit.astype(jnp.float32)
    if logit.ndim == 2:
        logit = jnp.mean(logit, axis=1)
    return sg(jnp.clip(logit, math.log(ratio_lower), math.log(ratio_upper)))


def bin_normalize_log_ratio(log_r, bins, num_bins, running_mean=None, ema_rate=0.0):
    """f-distill's time-binned ratio normalisation: `r <- r / (mean r in its noise bin + 1e-6)`.

    `bins` [B] (int) is each sample's noise bin (`noise.time_bins`: equal width in sigma, as in
    FastGen; high-noise bins are often empty in a batch). With `ema_rate = 0` the
    bin means are batch statistics; otherwise `running_mean` [num_bins] is updated as
    `ema * old + (1 - ema) * batch` (bins absent from the batch keep their old value). Returns
    `(normalised log_r [B], new running_mean [num_bins])`. Means are over the global batch.
    """
    onehot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32)  # [B, K]
    r = jnp.exp(log_r)
    counts = onehot.sum(0)  # [K]
    batch_mean = (onehot * r[:, None]).sum(0) / (counts + 1e-6)  # [K] (FastGen's epsilon)
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
    The denoiser outputs are under stop-gradient; only `x0` is differentiated. The gradient is
    further divided by D (mean over data dimensions, FastGen / DMD2), i.e. it is
    `h_i omega_i (D_psi - D_phi)_i / (B D)`, FastGen's `variational_score_distillation_loss`.
    """
    omega = _expand(_time_weight(x0, d_teacher, time_weight), x0)
    return score_difference_loss(
        x0,
        sg(d_teacher) * omega,
        sg(d_fake) * omega,
        log_r,
        divergence,
        normalize=normalize,
        reduction="mean",
    )


def sid_integrand(x0, d_teacher, d_fake, alpha):
    """SiD's per-sample integrand, mean over dimensions: `(1 - a)|delta|^2 + delta.(D_psi - x0)`.

    `delta = D_phi - D_psi`; SiD `generator_loss` writes it `delta . ((D_phi - x0) - a delta)`.
    """
    delta = d_teacher - d_fake
    return (1.0 - alpha) * _per_sample_mean(delta**2) + _per_sample_mean(delta * (d_fake - x0))


def sid_generator_loss(x0, d_teacher, d_fake, alpha, time_weight="dmd"):
    """SiD: `[(1 - a)||D_phi - D_psi||^2 + (D_phi - D_psi).(D_psi - x0)] / sg(mean|x0 - D_phi|)`.

    `d_teacher`, `d_fake` must be computed from `xt = x0 + sigma eps` WITH gradients flowing into
    the networks' inputs (their parameters frozen). `alpha = 1/2` is the value the score identity
    gives (see `docs/uni_instruct_derivation.md`); SiD publishes 1.2. Mean over samples and
    dimensions (SiD sums over dimensions and scales by 100: the same direction under Adam).
    """
    per_sample = sid_integrand(x0, d_teacher, d_fake, alpha)
    return jnp.mean(per_sample * _time_weight(x0, d_teacher, time_weight))


DI_TERMS = ("none", "derived")


def uni_instruct_generator_loss(*args, di_term="none", **kwargs):
    """Uni-Instruct: the `h`-weighted SiD term, plus (optionally) the Diff-Instruct term.

    Per sample, with `P_a` the SiD integrand at alpha `a`, `n = 1 / sg(mean|x0 - D_phi|)`,
    `w = h(r) / mean(h)` and `h' = dh / dlog r`:
        L = sg(w) P_alpha n                                              (di_term='none')
          + < sg(h'/mean(h) * P_{1/2} n * (D_phi - D_psi) / sigma^2), x0 >  (di_term='derived')
    `'none'` is what the reference code computes for its forward-KL, Jeffreys and
    'Forward-Clean' divergences (a-little-hoof/Uni_Instruct `fsim_training_loop.py`: the SiD
    loss times a per-sample weight, no Diff-Instruct term). `'derived'` adds the term our
    derivation gives (`docs/uni_instruct_derivation.md`): the path derivative of `h(r_t(x_t))`,
    with the exact integrand `P_{1/2}` as multiplier whatever the config's `alpha`. It is exact
    with exact denoisers, but its `1 / sigma^2` amplifies the fake score's error at small sigma:
    on the toy ring it diverged (docs/one_step_settings.md). Reverse KL (`h = 1`) is SiD either
    way. Mean over samples and dimensions (see the module docstring).
    Arguments: those of `uni_instruct_terms`.
    """
    if di_term not in DI_TERMS:
        raise ValueError(f"config.distill.di_term={di_term!r} is not one of {DI_TERMS}")
    sim, di = uni_instruct_terms(*args, **kwargs)
    return sim + di if di_term == "derived" else sim


def uni_instruct_terms(
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
    """`(SIM term, Diff-Instruct term)` of `uni_instruct_generator_loss`, each a scalar."""
    delta = d_teacher - d_fake
    norm = _time_weight(x0, d_teacher, time_weight)  # [B]
    p_alpha = sid_integrand(x0, d_teacher, d_fake, alpha) * norm  # [B]
    p_half = sg(sid_integrand(x0, d_teacher, d_fake, 0.5) * norm)  # [B], the exact integrand
    weight = divergence.weight(log_r)  # [B]
    dweight = jax.jvp(divergence.weight, (log_r,), (jnp.ones_like(log_r),))[1]  # dh / dlog r
    scale = jnp.mean(weight) if normalize else 1.0
    weight, dweight = sg(weight / scale), sg(dweight / scale)
    grad_log_r = sg(delta) / _expand(sigma**2, x0)  # grad_x log r_t = s_p - s_q
    di_direction = sg(_expand(dweight * p_half, x0) * grad_log_r)
    return jnp.mean(weight * p_alpha), jnp.mean(_per_sample_sum(di_direction * x0))


FAKE_SCORE_WEIGHTS = ("none", "karras", "edm")


def fake_score_loss(d_fake, x0, sigma, sigma_data, weighting="edm"):
    """Denoising loss of the fake score on generator samples `x0` (already under stop-gradient).

    - `'none'`: FastGen `denoising_score_matching_loss('x0')`: `mse(x0, D_psi)`, mean over all;
    - `'karras'`: DMD2 `compute_loss_fake`: `mean((1/sigma^2 + 1/sigma_data^2) (D_psi - x0)^2)`;
    - `'edm'`: EDM / SiD / Diff-Instruct: `lambda = (sigma^2 + sigma_data^2) / (sigma
      sigma_data)^2`, summed over dimensions, mean over samples.
    The noise levels are drawn by the caller (`config.distill.fake_score_noise`).
    """
    if weighting == "none":
        return jnp.mean((d_fake - x0) ** 2)
    if weighting == "karras":
        lam = 1.0 / sigma**2 + 1.0 / sigma_data**2  # [B]
        return jnp.mean(_expand(lam, x0) * (d_fake - x0) ** 2)
    if weighting == "edm":
        lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # [B]
        return jnp.mean(lam * _per_sample_sum((d_fake - x0) ** 2))
    raise ValueError(f"config.distill.fake_score_weight={weighting!r} not in {FAKE_SCORE_WEIGHTS}")


def discriminator_loss(logit_real, logit_fake):
    """Non-saturating logistic loss; at the optimum `logit = log p_t - log q_t`.

    Logits [B] or [B, heads]: the mean runs over every element (FastGen `gan_loss_discriminator`).
    """
    return jnp.mean(jax.nn.softplus(-logit_real)) + jnp.mean(jax.nn.softplus(logit_fake))


def sida_discriminator_loss(logit_real, logit_fake, sigma, sigma_data):
    """SiDA / Uni-Instruct's discriminator loss: the logistic loss times `mean(lambda) / 2`,
    `lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2` at the batch's noise levels
    `sigma` [B] (real and fake share sigma and noise). Uni_Instruct `fsim_loss.py` multiplies
    the batch-mean BCE by the per-sample lambda and the loop averages over samples."""
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # [B]
    return 0.5 * jnp.mean(lam) * discriminator_loss(logit_real, logit_fake)


def generator_gan_loss(logit_fake):
    """The generator's non-saturating GAN term `softplus(-logit)`, mean over every element."""
    return jnp.mean(jax.nn.softplus(-logit_fake))


def r1_penalty(logit_real, logit_real_perturbed):
    """FastGen's approximate R1 (APT): `mse(D(x_real), D(x_real + alpha n))`, mean over all."""
    return jnp.mean((logit_real - logit_real_perturbed) ** 2)


__all__ = [
    "DI_TERMS",
    "FAKE_SCORE_WEIGHTS",
    "bin_normalize_log_ratio",
    "discriminator_loss",
    "dmd_normalizer",
    "f_distill_generator_loss",
    "fake_score_loss",
    "generator_gan_loss",
    "process_log_ratio",
    "r1_penalty",
    "sid_generator_loss",
    "sid_integrand",
    "sida_discriminator_loss",
    "uni_instruct_generator_loss",
    "uni_instruct_terms",
]
