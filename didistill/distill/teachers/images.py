"""EDM teacher training on images (a DDPM++ U-Net), as a method for the training engine.

The teacher is a `UNetDenoiser` (`didistill.nets.unet`) trained with the EDM loss (Karras et
al. 2022; `didistill.diffusion.edm.denoising_loss`):

    L(theta) = E lambda(sigma) mean_d (D_theta(x0 + sigma eps; sigma, y) - x0)_d^2,
    ln sigma ~ N(P_mean, P_std^2),  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,

class-conditional (y = the image's label, one-hot) when `config.net.label_dim > 0`, with an
EMA of the weights (d = min(ema_decay, (1 + t) / (10 + t)) when `config.ema_warmup`).

`evaluate` draws `config.eval.num_samples` deterministic Heun samples at `config.eval.nfe`
from the EMA teacher (labels cycling 0..K-1), writes them as `samples.png`, reports a feature
FID against the test split when `config.eval.feature_checkpoint` names an existing digits
classifier (`didistill.eval.fid.classifier_fid`), and saves the EMA teacher as a network file
(`didistill.nets.files`, arch 'unet') to `workdir/teacher.msgpack`, the file that one-step
distillation (`didistill.distill.one_step.images`) reads.

Config layout: `configs/digits_teacher.py`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from didistill.diffusion import edm
from didistill.distill.teachers.supervised import supervised_method
from didistill.eval import fid, plots
from didistill.nets.convert_edm import unet_from_config
from didistill.nets.files import json_config, save_model
from didistill.train.method import Method

TEACHER_FILE = "teacher.msgpack"


def make_method(config) -> Method:
    """Builds the image EDM teacher method from a `configs/digits_teacher.py` config."""
    net_cfg = json_config(config.net)
    net, image_shape = unet_from_config(net_cfg)
    edm_cfg = config.edm
    num_heun_steps = edm.heun_steps_for_nfe(config.eval.nfe)
    conditional = net.label_dim > 0

    def init_params(key):
        x = jnp.zeros((1, *image_shape), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if conditional else None
        return net.init(key, x, jnp.ones((1,)), labels)

    def loss_fn(params, batch, key):
        k_loss, k_drop = jax.random.split(key)
        labels = batch["label"] if conditional else None  # [B] int

        def denoise(x, sigma):  # [B, H, W, C], [B]
            return net.apply(params, x, sigma, labels, train=True, rngs={"dropout": k_drop})

        return edm.denoising_loss(
            denoise, batch["x"], k_loss, net.sigma_data, edm_cfg.p_mean, edm_cfg.p_std
        )

    @jax.jit
    def heun(params, latents, labels):  # [N, H, W, C], [N] or None -> samples [N, H, W, C]
        return edm.heun_sample(
            lambda x, s: net.apply(params, x, s, labels),
            latents,
            num_heun_steps,
            edm_cfg.sigma_min,
            edm_cfg.sigma_max,
            edm_cfg.rho,
        )

    def evaluate(state, key, workdir):
        ema_params = jax.device_get(state.ema_params)
        n = config.eval.num_samples
        latents = jax.random.normal(key, (n, *image_shape))
        labels = jnp.arange(n) % net.label_dim if conditional else None
        samples = np.asarray(heun(ema_params, latents, labels))
        results = {"teacher/nfe": edm.heun_nfe(num_heun_steps)}
        results["teacher/pixel_std"] = float(samples.std())
        fid_fn = fid.classifier_fid(config)
        if fid_fn is not None:
            results["teacher/feature_fid"] = fid_fn(samples)
        if jax.process_index() == 0:  # every process evaluates; one writes
            cols = net.label_dim if conditional and net.label_dim <= 20 else None
            plots.save_image_grid(samples, os.path.join(workdir, "samples.png"), cols)
            save_model(
                os.path.join(workdir, TEACHER_FILE),
                ema_params,
                net_cfg,
                net_cfg.get("arch", "unet"),
                source="image_teacher",
            )
        return results

    def batches(start_step):
        from didistill.data import images

        local = config.train.batch_size // jax.process_count()
        data = images.load_arrays(config.data)
        stream = images.image_batches(data, config.seed, local, start_step, jax.process_index())
        for batch in stream:
            yield {"x": batch["image"], "label": batch["label"]}

    ema_warmup = bool(config.get("ema_warmup", False))
    return supervised_method(config, init_params, loss_fn, evaluate, batches, ema_warmup=ema_warmup)


__all__ = ["TEACHER_FILE", "make_method"]
