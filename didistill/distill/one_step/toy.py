"""The pieces of one-step distillation on an analytic 2-D toy (`configs/toy2d.py`).

`build(config)` returns the `OneStepParts` bundle that `one_step.make_method` uses: the networks
(generator, fake score, discriminator) as pure functions of their params, the frozen teacher,
the data stream and the evaluation. The teacher is a small MLP denoiser trained by
`configs/toy_teacher.py` (shipped under `assets/toy/`); `teacher.score = 'exact'` uses the
mixture's exact denoiser as the teacher signal instead (the network still initialises the
generator and the fake score).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from didistill.data import toy
from didistill.diffusion import edm
from didistill.distill.one_step import few_step
from didistill.distill.one_step.parts import OneStepParts
from didistill.distill.teachers.toy import load_teacher_denoiser
from didistill.eval import plots
from didistill.eval.toy import mode_histogram, toy_metrics
from didistill.nets.mlp import MLPDenoiser, MLPHead


def _affine_cov(params, sigma):  # student x0 = z A + b, z ~ N(0, I): Cov = A^T A + sigma^2 I
    a = params["A"]
    return a.T @ a + sigma[:, None, None] ** 2 * jnp.eye(a.shape[0])  # [B, D, D]


def _affine_log_prob(params, x, sigma):
    cov = _affine_cov(params, sigma)
    diff = x - params["b"]
    sol = jnp.linalg.solve(cov, diff[..., None])[..., 0]
    _, logdet = jnp.linalg.slogdet(cov)
    return -0.5 * (jnp.sum(diff * sol, -1) + logdet + x.shape[-1] * jnp.log(2 * jnp.pi))


def _affine_denoiser(params, x, sigma):  # x + sigma^2 grad log q_t
    score = -jnp.linalg.solve(_affine_cov(params, sigma), (x - params["b"])[..., None])[..., 0]
    return x + sigma[:, None] ** 2 * score


def rare_mode_share(samples, mixture) -> dict[str, float]:
    """Mass the samples put on the rare modes (weight below half the largest) over their true
    mass: 1 is right, 0 means the rare modes were dropped. Empty when no mode is rare."""
    weights = np.asarray(mixture.weights)
    rare = weights < 0.5 * weights.max()
    if not rare.any():
        return {}
    share = np.asarray(mode_histogram(samples, mixture))[rare].sum() / weights[rare].sum()
    return {"rare_mode_share": float(share)}


def build(config) -> OneStepParts:
    mixture = toy.get_toy(config.data.toy)
    if not os.path.isfile(config.teacher.checkpoint) and config.teacher.checkpoint.startswith(
        "assets/"
    ):
        raise FileNotFoundError(
            f"teacher checkpoint {config.teacher.checkpoint} not found. Run from the repository "
            "root, or recreate it with the command in assets/README.md."
        )
    net, teacher_params, meta = load_teacher_denoiser(config.teacher.checkpoint)
    if meta.get("toy") not in (None, config.data.toy):
        raise ValueError(
            f"config.teacher.checkpoint was trained on toy {meta.get('toy')!r}, but "
            f"config.data.toy={config.data.toy!r}"
        )
    d, g_cfg = config.distill, config.generator
    sigma_g = g_cfg.sigma
    dim = mixture.dim
    disc_trunk = MLPDenoiser(
        width=config.discriminator.width,
        depth=config.discriminator.depth,
        sigma_data=net.sigma_data,
    )
    head = MLPHead(width=config.discriminator.head_width, depth=2)

    def denoise(params, x, sigma, cond=None):  # the toy is unconditional: cond is None
        return net.apply(params, x, sigma)

    def teacher_denoise(x, sigma, cond=None):
        if config.teacher.score == "exact":
            return mixture.denoiser(x, sigma)
        return net.apply(teacher_params, x, sigma)

    features = config.discriminator.features
    if features not in ("teacher", "own", "fake_score"):
        raise ValueError(
            f"config.discriminator.features={features!r} is not one of "
            "('teacher', 'own', 'fake_score')"
        )

    def disc_logit(params, x, sigma, cond=None, fake_score=None):
        if features == "own":
            _, feats = disc_trunk.apply(params["trunk"], x, sigma, features=True)
        else:  # the frozen teacher's features, or the fake score's (SiDA: a shared encoder)
            trunk = fake_score if features == "fake_score" else teacher_params
            _, feats = net.apply(trunk, x, sigma, features=True)
        return head.apply(params["head"], feats)

    num_steps = int(g_cfg.get("num_steps", 1))
    sigmas = few_step.step_sigmas(sigma_g, num_steps, d.sigma_min)

    def generator_step(params, x, sigma, cond=None):
        return net.apply(params, x, sigma)

    def latent(key, n):
        return jax.random.normal(key, (n, dim)), None

    def generate(params, key, n):  # -> (x0 [n, D], cond None), with all num_steps steps
        if num_steps > 1:
            k_z, k_steps = jax.random.split(key)
            return few_step.sample(generator_step, params, latent(k_z, n)[0], sigmas, k_steps), None
        z = jax.random.normal(key, (n, dim))
        if g_cfg.kind == "affine":
            return z @ params["A"] + params["b"], None
        return net.apply(params, sigma_g * z, jnp.full((n,), sigma_g)), None

    def init_params(key):
        k_g, k_d, k_h = jax.random.split(key, 3)
        x, s = jnp.zeros((1, dim)), jnp.ones((1,))
        if g_cfg.kind == "affine":
            generator = {"A": jnp.eye(dim), "b": jnp.zeros(dim)}
        elif g_cfg.init == "teacher":
            generator = teacher_params
        else:
            generator = net.init(k_g, x, s)
        if features != "own":  # a head on the teacher's (f-distill) or fake score's features
            disc = {"head": head.init(k_h, jnp.zeros((1, net.width)))}
        else:  # a trainable trunk of its own
            disc = {"trunk": disc_trunk.init(k_d, x, s)}
            disc["head"] = head.init(k_h, jnp.zeros((1, disc_trunk.width)))
        return generator, teacher_params, disc

    def exact_log_ratio(params, x, sigma):
        return mixture.log_prob(x, sigma) - _affine_log_prob(params, x, sigma)

    def batches(start_step):
        per_process = config.train.batch_size // jax.process_count()
        rows = per_process * max(d.critic_steps, 1)
        stream = toy.batches(mixture, config.seed, rows, start_step, shard=jax.process_index())
        for batch in stream:
            yield {"x": batch["x"].reshape(per_process, max(d.critic_steps, 1), dim)}

    teacher_sampler = jax.jit(
        lambda latents: edm.heun_sample(
            teacher_denoise, latents, edm.heun_steps_for_nfe(config.eval.teacher_nfe)
        )
    )
    sample_student = jax.jit(lambda p, k, n: generate(p, k, n)[0], static_argnums=2)

    def evaluate(params, key, workdir):
        k_student, k_teacher, k_ref, k_metric = jax.random.split(key, 4)
        n = config.eval.num_samples
        student = sample_student(params, k_student, n)
        teacher = teacher_sampler(jax.random.normal(k_teacher, (n, dim)))
        results = {"student/nfe": num_steps, "teacher/nfe": config.eval.teacher_nfe}
        for name, samples in (("student", student), ("teacher", teacher)):
            metrics = dict(toy_metrics(samples, mixture, k_metric))
            metrics.update(rare_mode_share(samples, mixture))
            results.update({f"{name}/{metric}": value for metric, value in metrics.items()})
        np.save(os.path.join(workdir, "student_samples.npy"), np.asarray(student))
        np.save(os.path.join(workdir, "teacher_samples.npy"), np.asarray(teacher))
        reference = mixture.sample(k_ref, n)
        plots.save_sample_grid(
            {
                "data": reference,
                f"teacher ({config.eval.teacher_nfe} NFE)": teacher,
                f"student ({num_steps} NFE)": student,
            },
            os.path.join(workdir, "samples.png"),
            mixture=mixture,
        )
        return results

    return OneStepParts(
        sigma_data=net.sigma_data,
        batch_size=config.train.batch_size,
        init_params=init_params,
        generate=generate,
        denoise=denoise,
        teacher_denoise=teacher_denoise,
        disc_logit=disc_logit,
        exact_student_denoiser=_affine_denoiser,
        exact_log_ratio=exact_log_ratio,
        batches=batches,
        evaluate=evaluate,
        generator_step=generator_step,
        latent=latent,
    )


__all__ = ["build", "rare_mode_share"]
