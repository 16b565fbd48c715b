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
classifier (`didistill.distill.kd.load_classifier`; see `make_feature_fid`), and saves the EMA
teacher with `convert_edm.save_unet` to `workdir/teacher.msgpack` (meta['net'] = the U-Net
config, so `convert_edm.load_unet` rebuilds it; `one_step_images` reads that file).

Config layout: `configs/digits_teacher.py`. The helpers `unet_config`, `save_image_grid`,
`load_train_arrays` and `make_feature_fid` are shared with `one_step_images`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from didistill.diffusion import edm
from didistill.nets import convert_edm
from didistill.train.method import Method
from didistill.train.optim import apply_gradients, ema_update, make_optimizer

TEACHER_FILE = "teacher.msgpack"


@flax.struct.dataclass
class ImageTeacherState:
    params: Any  # U-Net variables {'params': ...}
    opt_state: Any
    ema_params: Any


def unet_config(net_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable U-Net config (`convert_edm.unet_from_config` keys) of `config.net`."""
    out = {}
    for key, value in dict(net_cfg).items():
        out[key] = [int(v) for v in value] if isinstance(value, (tuple, list)) else value
    return out


def save_image_grid(images, path: str, num_columns: int | None = None) -> str:
    """Writes images [N, H, W, C] in [-1, 1] (C = 1 or 3) as one PNG grid, 1-pixel gaps."""
    from PIL import Image

    x = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    n, h, w, c = x.shape
    cols = num_columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i]
    scale = max(1, 256 // max(grid.shape[:2]))  # small images (8x8 digits) are upscaled
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path


@functools.lru_cache(maxsize=4)
def _arrays(name: str, split: str, data_dir: str, resolution: int | None):
    from didistill.data import images  # tensorflow_datasets: imported only when data is needed

    return images.load_images(name, split, data_dir, resolution)


def load_train_arrays(data_cfg, split: str = "train"):
    """{'image': [N, H, W, C], 'label': [N]} in memory ('digits'), else the `ImageSource`."""
    source = _arrays(data_cfg.name, split, data_cfg.data_dir, data_cfg.get("resolution"))
    return source.to_arrays() if source.num_examples <= 100_000 else source


def make_feature_fid(config) -> Callable[[Any], float] | None:
    """`fid(samples [N, H, W, C]) -> float` in a digits classifier's feature space, or None.

    Features: the penultimate layer of the classifier at `config.eval.feature_checkpoint`
    (`didistill.distill.kd.load_classifier`); reference: the test split of `config.data`.
    Samples are clipped to [-1, 1] first (the range of images; standard FID code reads PNGs).
    None when no checkpoint is configured or the file is missing. Not comparable with
    Inception FIDs (see `didistill.eval.fid`).
    """
    path = config.eval.get("feature_checkpoint", "")
    if not path or not os.path.isfile(path):
        return None
    from didistill.distill.kd import load_classifier
    from didistill.eval import fid

    module, params, _ = load_classifier(path)
    feature_fn = lambda x: module.apply(params, x, features=True)[1]  # [B, F]
    test_split = "validation" if config.data.name == "imagenet64" else "test"
    reference = load_train_arrays(config.data, test_split)
    ref_images = (reference if isinstance(reference, dict) else reference.to_arrays())["image"]
    chunks = [ref_images[s : s + 500] for s in range(0, len(ref_images), 500)]
    ref_stats = fid.compute_stats(feature_fn, chunks)
    # samples are clipped to the image range [-1, 1], as saving them as images would do
    return lambda samples: fid.fid(
        feature_fn, np.clip(np.asarray(samples), -1.0, 1.0), ref_stats, batch_size=500
    )


def make_method(config) -> Method:
    """Builds the image EDM teacher method from a `configs/digits_teacher.py` config."""
    net_cfg = unet_config(config.net)
    net, image_shape = convert_edm.unet_from_config(net_cfg)
    optimizer = make_optimizer(config.optim)
    edm_cfg = config.edm
    num_heun_steps = edm.heun_steps_for_nfe(config.eval.nfe)
    global_batch = config.train.batch_size
    if global_batch % jax.process_count():
        raise ValueError(f"batch_size {global_batch} must divide by {jax.process_count()} hosts")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1), e.g. 0.999")
    conditional = net.label_dim > 0
    ema_warmup = bool(config.get("ema_warmup", False))

    def init(key):
        x = jnp.zeros((1, *image_shape), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if conditional else None
        params = net.init(key, x, jnp.ones((1,)), labels)
        return ImageTeacherState(params, optimizer.init(params), params)

    def loss_fn(params, batch, key):
        k_loss, k_drop = jax.random.split(key)
        labels = batch["label"] if conditional else None  # [B] int

        def denoise(x, sigma):  # [B, H, W, C], [B]
            return net.apply(params, x, sigma, labels, train=True, rngs={"dropout": k_drop})

        return edm.denoising_loss(
            denoise, batch["x"], k_loss, net.sigma_data, edm_cfg.p_mean, edm_cfg.p_std
        )

    def step(state, batch, key, step):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
        params, opt_state = apply_gradients(optimizer, state.params, state.opt_state, grads)
        decay = jnp.asarray(config.ema_decay, jnp.float32)
        if ema_warmup:
            t = jnp.asarray(step, jnp.float32)
            decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        ema_params = ema_update(state.ema_params, params, decay)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "ema_decay": decay}
        return ImageTeacherState(params, opt_state, ema_params), metrics

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
        fid_fn = make_feature_fid(config)
        if fid_fn is not None:
            results["teacher/feature_fid"] = fid_fn(samples)
        if jax.process_index() == 0:  # every process evaluates; one writes
            cols = net.label_dim if conditional and net.label_dim <= 20 else None
            save_image_grid(samples, os.path.join(workdir, "samples.png"), cols)
            convert_edm.save_unet(
                os.path.join(workdir, TEACHER_FILE), ema_params, net_cfg, source="image_teacher"
            )
        return results

    def batches(start_step):
        from didistill.data import images

        local = global_batch // jax.process_count()
        data = load_train_arrays(config.data)
        stream = images.image_batches(data, config.seed, local, start_step, jax.process_index())
        for batch in stream:
            yield {"x": batch["image"], "label": batch["label"]}

    return Method(
        init=init, step=step, evaluate=evaluate, batches=batches, global_batch_size=global_batch
    )


__all__ = [
    "TEACHER_FILE",
    "ImageTeacherState",
    "load_train_arrays",
    "make_feature_fid",
    "make_method",
    "save_image_grid",
    "unet_config",
]
