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
`samples.png`; and saves the EMA params to `teacher_params.msgpack` (see `save_teacher`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from didistill.data import toy
from didistill.diffusion import edm
from didistill.eval import plots
from didistill.eval.toy import toy_metrics
from didistill.nets.mlp import MLPDenoiser
from didistill.train.method import Method
from didistill.train.optim import apply_gradients, ema_update, make_optimizer
from didistill.train.params_io import load_params, save_params

TEACHER_FILE = "teacher_params.msgpack"
_FORMAT = "didistill.teacher/1"


@flax.struct.dataclass
class TeacherState:
    params: Any
    opt_state: Any
    ema_params: Any


def make_denoiser(net_cfg: Mapping[str, Any]) -> MLPDenoiser:
    """The teacher network from a `config.net` block or the 'net' entry of a teacher's meta."""
    return MLPDenoiser(
        width=int(net_cfg["width"]),
        depth=int(net_cfg["depth"]),
        emb_dim=int(net_cfg["emb_dim"]),
        sigma_data=float(net_cfg["sigma_data"]),
    )


_HOW_TO_CREATE = (
    "Train one first: python -m didistill.main --config=configs/toy_teacher.py:ring8 "
    f"--workdir=DIR (writes DIR/{TEACHER_FILE})."
)


def save_teacher(path: str, params, meta: Mapping[str, Any]) -> str:
    """Writes teacher params and JSON-serialisable meta to one file, atomically."""
    return save_params(path, params, meta, _FORMAT)


def load_teacher(path: str) -> tuple[Any, dict[str, Any]]:
    """(params, meta) of a file written by `save_teacher`; clear errors when missing/corrupt."""
    return load_params(path, _FORMAT, "teacher", _HOW_TO_CREATE)


def load_teacher_denoiser(path: str) -> tuple[MLPDenoiser, Any, dict[str, Any]]:
    """(module, params, meta) of a saved teacher: D = module.apply(params, x, sigma)."""
    params, meta = load_teacher(path)
    return make_denoiser(meta["net"]), params, meta


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
    meta = {
        "toy": config.data.toy,
        "net": dict(config.net),
        "edm": dict(config.edm),
        "eval": {k: v for k, v in results.items() if k.startswith("teacher/")},
    }
    save_teacher(os.path.join(workdir, TEACHER_FILE), ema_params, meta)


def make_method(config) -> Method:
    """Builds the 'edm_teacher' method from a `configs/toy_teacher.py` config."""
    mixture = toy.get_toy(config.data.toy)
    net = make_denoiser(config.net)
    optimizer = make_optimizer(config.optim)
    num_heun_steps = edm.heun_steps_for_nfe(config.eval.nfe)
    edm_cfg = config.edm
    global_batch = config.train.batch_size
    if global_batch % jax.process_count():
        raise ValueError(f"batch_size {global_batch} must divide by {jax.process_count()} hosts")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1), e.g. 0.999")
    if config.eval.num_samples < 1:
        raise ValueError(f"config.eval.num_samples={config.eval.num_samples} must be >= 1")
    ema_warmup = bool(config.get("ema_warmup", False))

    def init(key):
        params = net.init(key, jnp.zeros((1, mixture.dim)), jnp.ones((1,)))
        return TeacherState(params=params, opt_state=optimizer.init(params), ema_params=params)

    def loss_fn(params, x0, key):
        denoise = lambda x, sigma: net.apply(params, x, sigma)
        return edm.denoising_loss(denoise, x0, key, net.sigma_data, edm_cfg.p_mean, edm_cfg.p_std)

    def step(state, batch, key, step):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch["x"], key)
        params, opt_state = apply_gradients(optimizer, state.params, state.opt_state, grads)
        decay = jnp.asarray(config.ema_decay, jnp.float32)
        if ema_warmup:
            t = jnp.asarray(step, jnp.float32)
            decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        ema_params = ema_update(state.ema_params, params, decay)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "ema_decay": decay}
        return TeacherState(params, opt_state, ema_params), metrics

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
        local = global_batch // jax.process_count()
        return toy.batches(mixture, config.seed, local, start_step, shard=jax.process_index())

    return Method(
        init=init, step=step, evaluate=evaluate, batches=batches, global_batch_size=global_batch
    )


__all__ = [
    "TEACHER_FILE",
    "TeacherState",
    "denoiser_weighted_mse",
    "load_teacher",
    "load_teacher_denoiser",
    "make_denoiser",
    "make_method",
    "save_teacher",
]
