"""EDM teacher training on the analytic toys, as a method for the training engine.

The teacher is an `MLPDenoiser` trained with the EDM loss (Karras et al. 2022; see
`didistill.diffusion.edm`):

    L(theta) = E lambda(sigma) ||D_theta(x0 + sigma eps; sigma) - x0||^2,
    x0 ~ p, ln sigma ~ N(P_mean, P_std^2), eps ~ N(0, I),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,

with an exponential moving average of the weights, ema <- d ema + (1 - d) theta, where
d = min(ema_decay, (1 + step) / (10 + step)) when `config.ema_warmup` (the average then forgets
the random initialisation within the first few hundred steps of a short run).

`evaluate` draws `config.eval.num_samples` samples with the deterministic Heun sampler at
`config.eval.nfe` (35 -> N = 18 steps) from the EMA teacher and, with the same latents, from the
exact mixture denoiser; reports `toy_metrics` of both and of true samples; writes
`samples.png`; and saves the EMA params to `teacher_params.msgpack` (`didistill.nets.files`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from didistill.data import toy
from didistill.diffusion import edm
from didistill.distill.teachers.supervised import supervised_method
from didistill.eval import plots
from didistill.eval.toy import toy_metrics
from didistill.nets.files import load_model, save_model
from didistill.nets.mlp import MLPDenoiser, denoiser_from_config
from didistill.train.method import Method

TEACHER_FILE = "teacher_params.msgpack"


_HOW_TO_CREATE = (
    "Train one first: python -m didistill.main --config=toy_teacher:ring8 "
    f"--workdir=DIR (writes DIR/{TEACHER_FILE})."
)


def load_teacher_denoiser(path: str) -> tuple[MLPDenoiser, Any, dict[str, Any]]:
    """(module, params, meta) of a saved toy teacher: D = module.apply(params, x, sigma)."""
    return load_model(path, "mlp_denoiser", "toy teacher", _HOW_TO_CREATE)


def denoiser_weighted_mse(denoise, mixture, key, sigmas=(0.01, 0.1, 1.0, 10.0), n=2048):
    """How far `denoise` is from the exact mixture denoiser D*, averaged over a few noise levels:

        mean_{sigma in sigmas} lambda_1(sigma) E_{x ~ p_sigma} mean_d (D(x; sigma) - D*(x; sigma))^2

    with lambda_1(sigma) = (sigma^2 + 1) / sigma^2 the EDM weight for sigma_data = 1, and n
    Monte Carlo points per level. Jittable (returns a scalar array).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    k_data, k_noise = jax.random.split(key)
    sigma = jnp.repeat(sigmas, n)  # [S n]
    x0 = mixture.sample(k_data, sigma.shape[0])  # [S n, D]
    x = x0 + sigma[:, None] * jax.random.normal(k_noise, x0.shape)
    sq = jnp.mean((denoise(x, sigma) - mixture.denoiser(x, sigma)) ** 2, axis=-1)  # [S n]
    return jnp.mean(edm.loss_weight(sigma, 1.0) * sq)


def _write_outputs(workdir, samples, results, ema_params, config, mixture):
    """samples.png (data / exact Heun / teacher Heun, with metrics) and the teacher file."""
    nfe = results["teacher/nfe"]
    titles = {"data": "data", "exact_heun": f"exact, {nfe} NFE", "teacher": f"teacher, {nfe} NFE"}
    keys = ("energy_distance", "mode_tv", "outlier_fraction")
    plots.save_sample_grid(
        {titles[k]: np.asarray(v) for k, v in samples.items()},
        os.path.join(workdir, "samples.png"),
        mixture=mixture,
        subtitles={
            titles[k]: plots.format_metrics({m: results[f"{k}/{m}"] for m in keys}) for k in samples
        },
    )
    save_model(
        os.path.join(workdir, TEACHER_FILE),
        ema_params,
        config.net,
        "mlp_denoiser",
        toy=config.data.toy,
        edm=dict(config.edm),
        eval={k: v for k, v in results.items() if k.startswith("teacher/")},
    )


def make_method(config) -> Method:
    """Builds the 'toy_teacher' method from a `configs/toy_teacher.py` config."""
    mixture = toy.get_toy(config.data.toy)
    net = denoiser_from_config(config.net)
    num_heun_steps = edm.heun_steps_for_nfe(config.eval.nfe)
    edm_cfg = config.edm
    if config.eval.num_samples < 1:
        raise ValueError(f"config.eval.num_samples={config.eval.num_samples} must be >= 1")

    def init_params(key):
        return net.init(key, jnp.zeros((1, mixture.dim)), jnp.ones((1,)))

    def loss_fn(params, batch, key):
        denoise = lambda x, sigma: net.apply(params, x, sigma)
        return edm.denoising_loss(
            denoise, batch["x"], key, net.sigma_data, edm_cfg.p_mean, edm_cfg.p_std
        )

    @functools.partial(jax.jit, static_argnames="exact")
    def heun(params, latents, exact):
        denoise = mixture.denoiser if exact else (lambda x, s: net.apply(params, x, s))
        return edm.heun_sample(
            denoise,
            latents,
            num_heun_steps,
            edm_cfg.sigma_min,
            edm_cfg.sigma_max,
            edm_cfg.rho,
            return_nfe=True,
        )

    @jax.jit
    def wmse(params, key):
        return denoiser_weighted_mse(lambda x, s: net.apply(params, x, s), mixture, key)

    def evaluate(state, key, workdir):
        ema_params = jax.device_get(state.ema_params)
        k_lat, k_data, k_ref, k_den = jax.random.split(key, 4)
        n = config.eval.num_samples
        latents = jax.random.normal(k_lat, (n, mixture.dim))  # [n, D]
        teacher_x, nfe = heun(ema_params, latents, exact=False)
        exact_x, _ = heun(ema_params, latents, exact=True)
        data_x = jax.jit(mixture.sample, static_argnums=1)(k_data, n)
        samples = {"data": data_x, "exact_heun": exact_x, "teacher": teacher_x}
        results = {"teacher/nfe": int(nfe), "exact_heun/nfe": int(nfe)}
        for name, x in samples.items():
            for metric, value in toy_metrics(x, mixture, k_ref).items():
                results[f"{name}/{metric}"] = value
        results["teacher/denoiser_wmse"] = float(wmse(ema_params, k_den))
        if jax.process_index() == 0:  # every process evaluates; one writes
            _write_outputs(workdir, samples, results, ema_params, config, mixture)
        return results

    def batches(start_step):
        local = config.train.batch_size // jax.process_count()
        return toy.batches(mixture, config.seed, local, start_step, shard=jax.process_index())

    ema_warmup = bool(config.get("ema_warmup", False))
    return supervised_method(config, init_params, loss_fn, evaluate, batches, ema_warmup=ema_warmup)


__all__ = [
    "TEACHER_FILE",
    "denoiser_weighted_mse",
    "load_teacher_denoiser",
    "make_method",
]
