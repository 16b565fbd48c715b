"""The one table of one-step methods: every list of method names is derived from `METHODS`.

A row says what distinguishes a method inside the shared engine (`one_step.method`):

- `generator_loss(x0, sigma, d_teacher, d_fake, log_r, divergence, cfg)`: the generator's
  main loss (`one_step.losses`), given generator samples `x0` [B, ...], their noise levels
  `sigma` [B], the teacher's and the fake score's denoised `d_teacher`, `d_fake` [B, ...], the
  estimated `log_r` [B], the `FDivergence` and the `config.distill` block `cfg`;
- `divergence`: the one divergence the method is defined with, or None when any registered
  f-divergence may be chosen (then the method reads the density ratio r);
- `gan`: whether the generator adds the non-saturating GAN term (`config.distill.gan_weight`);
- `time_weight`, `alpha`, `sigma_g`: the config defaults of `config.distill.time_weight`,
  `config.distill.alpha` and the image configs' `config.generator.sigma` (the generator maps
  sigma_g z to an image at noise level sigma_g);
- `recipe`: the published recipe family the configs start from: 'dmd' (FastGen / DMD2:
  generator input 80 z at sigma 80, AdamW) or 'sid' (SiD / Uni-Instruct / Diff-Instruct:
  2.5 z at sigma 2.5 (Diff-Instruct: 1.0), Adam with b1 = 0);
- `gan_time_weight`: the default of `config.distill.gan_time_weight`: 'dmd' multiplies the
  generator's GAN term by the batch mean of DMD's normaliser `1 / mean|x0 - D_phi|`, as
  Uni-Instruct's code divides its GAN loss by the same per-sample factor;
- `gan_recipe`: the default of `config.distill.gan_recipe` and of the discriminator's
  features: 'fastgen' (a head on the frozen teacher's features, real samples at their own
  noise, plain logistic loss) or 'sida' (SiDA / Uni-Instruct: the head reads the fake score's
  encoder, which the discriminator loss trains too; real and fake at the same sigma and noise;
  the loss scaled by the batch mean of EDM's lambda / 2);
- `num_steps`: the default of `config.generator.num_steps` (K-step student, `one_step.few_step`):
  1, or 4 for VDOT (its `denoising_step_list` [1000, 750, 500, 250]);
- `extra`: `(key, value)` pairs added to `config.distill` for this method only (VDOT's OT
  keys, `one_step.vdot`);
- `noise`, `fake_score_noise`, `fake_score_weight`: the config defaults of the generator's and
  the fake score's noise samplers (`one_step.noise`) and of the fake-score loss weighting
  (`losses.fake_score_loss`), as in each reference code: FastGen draws both from its Karras
  index sampler and trains the fake score by an unweighted x0-MSE; SiD / Uni-Instruct draw the
  generator's sigma by `u ~ U[0, 0.8)` and Diff-Instruct's from lognormal(-1.2, 1.2), and all
  three train the fake score with EDM's lognormal noise and lambda weight.

To add a method: write its loss in `one_step.losses`, add a row here, and give its config
defaults in `configs/one_step_common.py` if they differ (see docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from didistill.distill.one_step import losses, vdot


class OneStepMethod(NamedTuple):
    generator_loss: Callable
    divergence: str | None  # None: any registered f-divergence (the method reads r)
    gan: bool
    time_weight: str = "dmd"
    alpha: float = 1.0
    sigma_g: float = 80.0
    recipe: str = "dmd"
    noise: str = "karras_index"
    fake_score_noise: str = "same"
    fake_score_weight: str = "none"
    gan_time_weight: str = "none"
    gan_recipe: str = "fastgen"
    num_steps: int = 1
    extra: tuple = ()

    @property
    def uses_ratio(self) -> bool:
        return self.divergence is None


def _f_distill(x0, sigma, d_teacher, d_fake, log_r, divergence, cfg):
    del sigma
    return losses.f_distill_generator_loss(
        x0, d_teacher, d_fake, log_r, divergence, cfg.normalize_weights, cfg.time_weight
    )


def _sid(x0, sigma, d_teacher, d_fake, log_r, divergence, cfg):
    del sigma, log_r, divergence
    return losses.sid_generator_loss(x0, d_teacher, d_fake, cfg.alpha, cfg.time_weight)


def _uni_instruct(x0, sigma, d_teacher, d_fake, log_r, divergence, cfg):
    return losses.uni_instruct_generator_loss(
        x0,
        sigma,
        d_teacher,
        d_fake,
        log_r,
        divergence,
        cfg.alpha,
        cfg.normalize_weights,
        cfg.time_weight,
        di_term=cfg.get("di_term", "none"),
    )


def _vdot(x0, sigma, d_teacher, d_fake, log_r, divergence, cfg):
    del sigma
    return vdot.vdot_generator_loss(x0, d_teacher, d_fake, log_r, divergence, cfg)


# VDOT (hhhh1138/VDOT 95d8ad6, training/model/bi_dmd_gan.py): 0.2 DMD + 0.8 OT (line 630), OT
# step 0.1 (496), Sinkhorn eps 0.1 and 60 iterations (420-421), 2x2 pooling (336), pixels of each
# frame as the points (299-301); its GAN weight (gan_g_weight 0.1, configs/self_forcing_bi_gan
# .yaml) is not carried over: the configs' gan_weight is every method's.
_VDOT_KEYS = (
    ("dmd_weight", 0.2),
    ("ot_weight", 0.8),
    ("ot_step", 0.1),
    ("ot_epsilon", 0.1),
    ("ot_iterations", 60),
    ("ot_features", "pixels"),  # the toy configs use 'batch' (2-D samples have no pixels)
    ("ot_downsample", 2),
)

# SiD `generator_loss` (u ~ U[0, tmax/1000)) and SiD's / EDM's fake-score loss (lognormal, lambda)
_SID_NOISE = dict(recipe="sid", noise="sid", fake_score_noise="lognormal", fake_score_weight="edm")
# Diff-Instruct `DI_EDMLoss.gloss` and `__call__`: lognormal(-1.2, 1.2) for both networks
_DI_NOISE = dict(
    recipe="sid", noise="lognormal", fake_score_noise="lognormal", fake_score_weight="edm"
)

METHODS: dict[str, OneStepMethod] = {
    # f-distill (Xu, Nie, Vahdat 2025): h(r)-weighted score difference, any divergence, GAN
    "f_distill": OneStepMethod(_f_distill, None, gan=True),
    # DMD2 (Yin et al. 2024): the same loss at reverse KL (h = 1), GAN
    "dmd2": OneStepMethod(_f_distill, "reverse_kl", gan=True),
    # Diff-Instruct (Luo et al. 2023): reverse KL, unit time weight, no GAN
    "diff_instruct": OneStepMethod(
        _f_distill, "reverse_kl", gan=False, time_weight="none", sigma_g=1.0, **_DI_NOISE
    ),
    # SiD (Zhou et al. 2024): score identity, gradients through the networks' inputs
    "sid": OneStepMethod(_sid, "reverse_kl", gan=False, alpha=1.2, sigma_g=2.5, **_SID_NOISE),
    # Uni-Instruct (Wang et al. 2025): h-weighted SiD (+ optional DI term), any divergence, SiDA GAN
    "uni_instruct": OneStepMethod(
        _uni_instruct,
        None,
        gan=True,
        sigma_g=2.5,
        gan_time_weight="dmd",
        gan_recipe="sida",
        **_SID_NOISE,
    ),
    # VDOT: DMD (reverse KL) + an OT direction between fake-score and teacher predictions, GAN
    "vdot": OneStepMethod(_vdot, "reverse_kl", gan=True, num_steps=4, extra=_VDOT_KEYS),
}


def get(name: str) -> OneStepMethod:
    if name not in METHODS:
        raise ValueError(f"config.method={name!r} is not one of {tuple(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "OneStepMethod", "get"]
