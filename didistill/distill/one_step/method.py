"""One-step distillation of an EDM teacher: f-distill, DMD2, Diff-Instruct, SiD, Uni-Instruct,
VDOT; each as a one-step or a K-step student.

Three networks share the teacher's denoiser architecture `D(x; sigma)`:
- the generator `G(z) = D_theta(sigma_g z; sigma_g)`, `z ~ N(0, I)`, initialised from the teacher
  (DMD2 / SiD practice; `generator.init = 'scratch'` for the from-scratch comparison);
- the fake score `D_psi`, initialised from the teacher, trained by EDM denoising score matching
  on generator samples, so `s_psi` tracks the student's noised score `s_q`;
- the discriminator, a logit on noised samples trained with the logistic loss, so that its logit
  estimates `log r_t = log p_t - log q_t` (f-distill reads it as the density ratio).

One engine step = `critic_steps` updates of fake score and discriminator (two-time-scale update
rule, DMD2 / f-distill), then one generator update with the method's loss (see
`one_step_losses`), then one EMA update. A step is therefore *one generator update*:
FastGen's iterations (4 critic + 1 generator update per 5, EMA every iteration) translate to
`critic_steps = 4`, `num_steps = iterations / 5` and `ema_decay = beta^5` (exact: the generator
does not move between its updates); DMD2's (5 critic updates per generator update) to
`critic_steps = 5`. The configs carry the translated numbers (`docs/one_step_settings.md`).

Noise levels: the generator's loss draws sigma from `config.distill.noise`, the fake score from
`config.distill.fake_score_noise` ('same' = the generator's), both in `one_step.noise`; the
discriminator sees generator samples at the fake score's noise when that is 'same' (FastGen:
the same `x_t`) and real samples at fresh noise from the generator's sampler. With
`config.distill.gan_r1_weight > 0` the discriminator adds FastGen's approximate R1.
`config.distill.ema_halflife_images > 0` replaces `config.ema_decay` by SiD's EMA:
`0.5^(B / min(halflife, ema_rampup_ratio * images seen))`. Uni-Instruct's schedule (its
`fsim_training_loop.py`, images seen = step index x batch): the generator is not updated
before `generator_freeze_images`, and before `gan_warmup_images` the method runs at reverse KL
(`h = 1`: SiD for Uni-Instruct, DMD for f-distill) without the generator's GAN term;
`critic_grad_clip > 0` replaces non-finite critic gradients and clips them by value.
Methods (`config.method`):

| method | generator loss | divergence | GAN |
|---|---|---|---|
| f_distill | h(r)-weighted score difference | any registered | yes |
| dmd2 | same | reverse_kl (h = 1) | yes |
| diff_instruct | same, unit time weight | reverse_kl | no |
| sid | SiD, gradients through the networks' inputs | (reverse KL) | no |
| uni_instruct | h-weighted SiD (+ our DI term with `di_term='derived'`) | any registered | yes |
| vdot | DMD + OT direction (Sinkhorn), fake score to teacher | reverse_kl | yes |

The methods differ only in their row of `one_step.table.METHODS`.

`distill.ratio = 'exact'` replaces the discriminator's ratio and the fake score by the exact
noised densities of an affine Gaussian generator (`generator.kind = 'affine'`) and the exact
toy teacher: an oracle for testing the estimators, not for real runs.

`config.generator.num_steps = K > 1` makes every method a K-step student
(`one_step.few_step`): its training samples come from DMD2's backward simulation (a random
step k per batch, the student's steps before k run without gradients), for the generator's
loss and the critics alike; evaluation samples with all K steps (NFE = K). K = 1 is the
one-step generator, unchanged.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from didistill import divergences
from didistill.distill.one_step import few_step, losses, noise, table
from didistill.distill.one_step.parts import OneStepParts
from didistill.train.method import Method
from didistill.train.optim import apply_gradients, ema_update, make_optimizer
from didistill.train.sharding import shard_batch


class OneStepState(flax.struct.PyTreeNode):
    generator: Any
    generator_opt: Any
    generator_ema: Any
    fake_score: Any
    fake_score_opt: Any
    discriminator: Any
    discriminator_opt: Any
    ratio_bins: jax.Array  # [num_bins] running mean of r per noise bin


def validate(config) -> None:
    """Checks the method-level keys; raises ValueError naming the key and the valid choices."""
    cfg = config.distill
    spec = table.get(config.method)
    divergences.get(cfg.divergence, **dict(cfg.divergence_params))  # raises with the valid names
    if spec.divergence is not None and cfg.divergence != spec.divergence:
        any_divergence = [name for name, row in table.METHODS.items() if row.uses_ratio]
        raise ValueError(
            f"config.method={config.method!r} is defined with {spec.divergence}, got "
            f"config.distill.divergence={cfg.divergence!r}; use method={any_divergence} "
            "for other divergences"
        )
    if cfg.divergence == "total_variation" and spec.uses_ratio:
        raise ValueError("config.distill.divergence='total_variation' has no weight h(r)")
    if cfg.ratio not in ("discriminator", "exact"):
        raise ValueError(
            f"config.distill.ratio={cfg.ratio!r} is not one of ('discriminator', 'exact')"
        )
    if cfg.ratio == "exact" and (
        config.generator.kind != "affine" or config.teacher.score != "exact"
    ):
        raise ValueError(
            "config.distill.ratio='exact' needs config.generator.kind='affine' and "
            "config.teacher.score='exact' (the only case with exact student and teacher densities)"
        )
    num_steps = config.generator.get("num_steps", 1)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"config.generator.num_steps must be an int >= 1, got {num_steps!r}")
    if num_steps > 1 and (config.generator.get("kind") == "affine" or cfg.ratio == "exact"):
        raise ValueError(
            "config.generator.num_steps > 1 needs a network generator (not kind='affine' or "
            "distill.ratio='exact'); set config.generator.num_steps=1"
        )
    if "ot_features" in cfg:
        from didistill.distill.one_step import vdot

        if cfg.ot_features not in vdot.OT_FEATURES:
            raise ValueError(
                f"config.distill.ot_features={cfg.ot_features!r} is not one of {vdot.OT_FEATURES}"
            )
        if cfg.ot_features == "pixels" and config.data.get("kind", "toy") == "toy":
            raise ValueError(
                "config.distill.ot_features='pixels' needs images; use 'batch' on the toy"
            )
        if int(cfg.ot_iterations) < 1 or float(cfg.ot_epsilon) <= 0:
            raise ValueError("config.distill.ot_iterations must be >= 1 and ot_epsilon > 0")
    if cfg.critic_steps < 0:
        raise ValueError(f"config.distill.critic_steps must be >= 0, got {cfg.critic_steps}")
    if not 0 <= cfg.min_index < cfg.max_index < cfg.num_sigmas:
        raise ValueError(
            "config.distill needs 0 <= min_index < max_index < num_sigmas (an inclusive range "
            "of indices of the ascending Karras grid)"
        )
    for key in ("noise", "fake_score_noise"):
        allowed = noise.SAMPLERS + (("same",) if key == "fake_score_noise" else ())
        if cfg[key] not in allowed:
            raise ValueError(f"config.distill.{key}={cfg[key]!r} is not one of {allowed}")
    choices = (
        ("di_term", losses.DI_TERMS),
        ("gan_time_weight", ("none", "dmd")),
        ("gan_recipe", ("fastgen", "sida")),
    )
    for key, allowed in choices:  # the first choice is the default
        if cfg.get(key, allowed[0]) not in allowed:
            raise ValueError(f"config.distill.{key}={cfg[key]!r} is not one of {allowed}")
    if cfg.fake_score_weight not in losses.FAKE_SCORE_WEIGHTS:
        raise ValueError(
            f"config.distill.fake_score_weight={cfg.fake_score_weight!r} is not one of "
            f"{losses.FAKE_SCORE_WEIGHTS}"
        )


def ema_decay_at(step_index, batch_size, decay, halflife_images=0.0, rampup_ratio=0.0):
    """EMA decay of step `step_index`: `decay`, or SiD's (`sid_training_loop`)
    `0.5^(B / max(min(halflife, rampup * images seen), 1e-8))` when `halflife_images > 0`."""
    if halflife_images <= 0:
        return decay
    halflife = halflife_images
    if rampup_ratio > 0:
        halflife = jnp.minimum(halflife, step_index * batch_size * rampup_ratio)
    return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def sanitize_gradients(grads, clip_value):
    """Uni-Instruct's critic gradients (`fsim_training_loop.py`): NaN -> 0, +-inf -> +-1e5,
    then clipped to [-clip_value, clip_value] elementwise; unchanged when `clip_value <= 0`."""
    if clip_value <= 0:
        return grads
    return jax.tree.map(
        lambda g: jnp.clip(
            jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), -clip_value, clip_value
        ),
        grads,
    )


def build_parts(config) -> OneStepParts:
    """The data-specific pieces: `config.data.kind` 'toy' (`one_step_toy`) or 'images'."""
    kind = config.data.get("kind", "toy")
    if kind == "toy":
        from didistill.distill.one_step import toy as one_step_toy

        return one_step_toy.build(config)
    if kind == "images":
        from didistill.distill.one_step import images as one_step_images

        return one_step_images.build(config)
    raise ValueError(f"config.data.kind={kind!r} is not one of ('toy', 'images')")


def make_method(config) -> Method:
    """Builds the one-step distillation `Method` for `config` (see `configs/toy2d.py`)."""
    validate(config)
    parts = build_parts(config)  # networks, teacher, data and evaluation
    cfg = config.distill
    spec = table.get(config.method)
    divergence = divergences.get(cfg.divergence, **dict(cfg.divergence_params))
    steps = config.train.num_steps  # schedules count updates: critic_steps critic ones per step
    opt_g = make_optimizer(config.optim_generator, total_steps=steps)
    opt_f = make_optimizer(config.optim_fake_score, total_steps=steps * max(cfg.critic_steps, 1))
    opt_d = make_optimizer(config.optim_discriminator, total_steps=steps * max(cfg.critic_steps, 1))
    exact = cfg.ratio == "exact"
    sample_sigma = noise.make_sampler(cfg.noise, cfg)
    same_noise = cfg.fake_score_noise == "same"
    sample_fake_sigma = (
        sample_sigma if same_noise else noise.make_sampler(cfg.fake_score_noise, cfg)
    )
    r1_weight, r1_alpha = float(cfg.get("gan_r1_weight", 0.0)), float(cfg.get("gan_r1_alpha", 0.1))
    ema_halflife = float(cfg.get("ema_halflife_images", 0.0))
    ema_rampup = float(cfg.get("ema_rampup_ratio", 0.0))
    gan_warmup = int(cfg.get("gan_warmup_images", 0))
    generator_freeze = int(cfg.get("generator_freeze_images", 0))
    critic_clip = float(cfg.get("critic_grad_clip", 0.0))
    gan_time_weight = cfg.get("gan_time_weight", "none")
    sida = cfg.get("gan_recipe", "fastgen") == "sida"
    reverse_kl = divergences.get("reverse_kl")
    num_steps = int(config.generator.get("num_steps", 1))
    step_sigmas = few_step.step_sigmas(config.generator.sigma, num_steps, cfg.sigma_min)

    def generate(params, key, n):  # the training sample: DMD2's backward simulation when K > 1
        if num_steps == 1:
            return parts.generate(params, key, n)
        k_z, k_sim = jax.random.split(key)
        z, cond = parts.latent(k_z, n)
        x0, _ = few_step.backward_simulation(
            parts.generator_step, params, z, step_sigmas, k_sim, cond
        )
        return x0, cond

    def sanitize(grads):
        return sanitize_gradients(grads, critic_clip)

    def noised(key, x0, sampler=sample_sigma):  # -> xt, sigma, bins (f-distill's time bins)
        k_sigma, k_eps = jax.random.split(key)
        sigma = sampler(k_sigma, x0.shape[0]).astype(x0.dtype)
        bins = noise.time_bins(sigma, cfg.num_bins, cfg.sigma_min, cfg.sigma_max)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        return x0 + sigma.reshape((-1,) + (1,) * (x0.ndim - 1)) * eps, sigma, bins

    def ema_decay(step_index):
        return ema_decay_at(
            step_index, parts.batch_size, config.ema_decay, ema_halflife, ema_rampup
        )

    def init(key):
        g, f, disc = parts.init_params(key)
        return OneStepState(
            generator=g,
            generator_opt=opt_g.init(g),
            generator_ema=g,
            fake_score=f,
            fake_score_opt=opt_f.init(f),
            discriminator=disc,
            discriminator_opt=opt_d.init(disc),
            ratio_bins=jnp.ones((cfg.num_bins,), jnp.float32),
        )

    def critic_update(state, real, real_cond, key):
        """One fake-score DSM step and one discriminator step on fresh generator samples."""
        k_gen, k_fake, k_real, k_disc = jax.random.split(key, 4)
        x0, cond = generate(state.generator, k_gen, real.shape[0])
        x0 = shard_batch(jax.lax.stop_gradient(x0))
        xt, sigma, _ = noised(k_fake, x0, sample_fake_sigma)

        def fake_loss(params):
            return losses.fake_score_loss(
                parts.denoise(params, xt, sigma, cond),
                x0,
                sigma,
                parts.sigma_data,
                cfg.fake_score_weight,
            )

        k_real, k_r1 = jax.random.split(k_real)
        if sida:  # real and fake at the fake score's sigma and noise (fsim_loss.py 85-101)
            real_t, real_sigma = real + (xt - x0), sigma
        else:
            real_t, real_sigma, _ = noised(k_real, real)
        fake_t, fake_sigma = (xt, sigma) if same_noise or sida else noised(k_disc, x0)[:2]

        def disc_loss(params, fake_params):
            def logit(x, s, c):
                return parts.disc_logit(params, x, s, c, fake_params)

            logit_real = logit(real_t, real_sigma, real_cond)
            logit_fake = logit(fake_t, fake_sigma, cond)
            if sida:
                loss = losses.sida_discriminator_loss(
                    logit_real, logit_fake, sigma, parts.sigma_data
                )
            else:
                loss = losses.discriminator_loss(logit_real, logit_fake)
            if r1_weight > 0:  # FastGen: clean real + alpha n, at the real sample's sigma
                shifted = real + r1_alpha * jax.random.normal(k_r1, real.shape, real.dtype)
                logit_shifted = logit(shifted, real_sigma, real_cond)
                loss = loss + r1_weight * losses.r1_penalty(logit_real, logit_shifted)
            return loss

        def critic_loss(params):
            # d_loss depends on the fake score's params only when the discriminator reads its
            # encoder (config.discriminator.features = 'fake_score'); then both losses train it
            f_loss, d_loss = fake_loss(params[0]), disc_loss(params[1], params[0])
            return f_loss + d_loss, (f_loss, d_loss)

        (_, (f_loss, d_loss)), (f_grads, d_grads) = jax.value_and_grad(critic_loss, has_aux=True)(
            (state.fake_score, state.discriminator)
        )
        fake_score, fake_opt = apply_gradients(
            opt_f, state.fake_score, state.fake_score_opt, sanitize(f_grads)
        )
        disc, disc_opt = apply_gradients(
            opt_d, state.discriminator, state.discriminator_opt, sanitize(d_grads)
        )
        state = state.replace(
            fake_score=fake_score,
            fake_score_opt=fake_opt,
            discriminator=disc,
            discriminator_opt=disc_opt,
        )
        return state, {"fake_score_loss": f_loss, "discriminator_loss": d_loss}

    def generator_loss(g_params, state, key, images_seen):
        k_gen, k_noise = jax.random.split(key)
        x0, cond = generate(g_params, k_gen, parts.batch_size)
        x0 = shard_batch(x0)
        xt, sigma, bins = noised(k_noise, x0)
        d_teacher = parts.teacher_denoise(xt, sigma, cond)
        if exact:  # oracle: exact student density instead of the fake score and discriminator
            frozen = jax.lax.stop_gradient(g_params)
            d_fake = parts.exact_student_denoiser(frozen, xt, sigma)
            log_r, logit = parts.exact_log_ratio(frozen, xt, sigma), None
        else:
            d_fake = parts.denoise(state.fake_score, xt, sigma, cond)
            logit = parts.disc_logit(state.discriminator, xt, sigma, cond, state.fake_score)
            log_r = losses.process_log_ratio(logit, cfg.ratio_lower, cfg.ratio_upper)
        ratio_bins = state.ratio_bins
        if cfg.bin_normalize and not exact:
            log_r, ratio_bins = losses.bin_normalize_log_ratio(
                log_r, bins, cfg.num_bins, state.ratio_bins, cfg.ratio_ema_rate
            )
        main = spec.generator_loss(x0, sigma, d_teacher, d_fake, log_r, divergence, cfg)
        use_gan = cfg.gan_weight > 0 and logit is not None
        gan = losses.generator_gan_loss(logit) if use_gan else jnp.zeros(())
        if gan_time_weight == "dmd":
            gan = gan * jnp.mean(losses.dmd_normalizer(x0, d_teacher))
        gan_weight = cfg.gan_weight
        if gan_warmup > 0:  # before the warm-up ends: reverse KL (h = 1), no GAN term
            ratio_on = images_seen >= gan_warmup
            plain = spec.generator_loss(
                x0, sigma, d_teacher, d_fake, jnp.zeros_like(log_r), reverse_kl, cfg
            )
            main = jnp.where(ratio_on, main, plain)
            gan_weight = jnp.where(ratio_on, gan_weight, 0.0)
        total = main + gan_weight * gan
        # std of log r: 0 means every f-divergence's h(r) is the same and f-distill is DMD2.
        aux = {
            "generator_loss": main,
            "generator_gan_loss": gan,
            "mean_log_r": jnp.mean(log_r),
            "std_log_r": jnp.std(log_r),
        }
        return total, (aux, ratio_bins)

    def step(state, batch, key, step_index):
        # every engine step is one generator update after its critic updates
        k_critic, k_gen = jax.random.split(key)
        critic_metrics = {}
        if cfg.critic_steps > 0:
            real = jnp.swapaxes(batch["x"], 0, 1)  # [critic_steps, B, ...]
            real_cond = jnp.swapaxes(batch["label"], 0, 1) if "label" in batch else None
            critic_keys = jax.random.split(k_critic, cfg.critic_steps)
            # A Python loop, not lax.scan: XLA:CPU leaves convolutions inside a while body in
            # non-canonical layouts (naive loops, not Eigen): the digits U-Net step ran 8x slower.
            per_step = []
            for i in range(cfg.critic_steps):
                cond_i = None if real_cond is None else real_cond[i]
                state, m = critic_update(state, real[i], cond_i, critic_keys[i])
                per_step.append(m)
            critic_metrics = jax.tree.map(lambda *v: jnp.stack(v), *per_step)
        images_seen = step_index * parts.batch_size
        (_, (aux, ratio_bins)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
            state.generator, state, k_gen, images_seen
        )
        generator, generator_opt = apply_gradients(
            opt_g, state.generator, state.generator_opt, grads
        )
        if generator_freeze > 0:  # Uni-Instruct: the generator waits for the critics
            frozen = images_seen < generator_freeze
            generator, generator_opt = jax.tree.map(
                lambda old, new: jnp.where(frozen, old, new),
                (state.generator, state.generator_opt),
                (generator, generator_opt),
            )
        state = state.replace(
            generator=generator,
            generator_opt=generator_opt,
            generator_ema=ema_update(state.generator_ema, generator, ema_decay(step_index)),
            ratio_bins=ratio_bins,
        )
        metrics = dict(aux, **{k: jnp.mean(v) for k, v in critic_metrics.items()})
        return state, metrics

    def evaluate(state, key, workdir):
        return parts.evaluate(state.generator_ema, key, workdir)

    periodic = None
    if parts.periodic_evaluate is not None:

        def periodic(state, key, workdir, step):
            return parts.periodic_evaluate(state.generator_ema, key, workdir, step)

    return Method(
        init=init,
        step=step,
        evaluate=evaluate,
        batches=parts.batches,
        global_batch_size=parts.batch_size,
        periodic_evaluate=periodic,
    )


__all__ = [
    "OneStepState",
    "build_parts",
    "ema_decay_at",
    "make_method",
    "sanitize_gradients",
    "validate",
]
