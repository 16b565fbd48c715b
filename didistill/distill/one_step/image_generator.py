"""The one-step image student as a standalone sampler, and its params file.

    G(z, y) = D_theta(sigma_g z; sigma_g, y),  z ~ N(0, I) [B, H, W, C],  y in {0..K-1} or None

(or, with `num_steps = K > 1`, the K-step sampler of `one_step.few_step` over the same D_theta)
with D_theta an EDM-preconditioned U-Net (DDPM++ 'unet' or 'adm') of the teacher's
architecture. `ImageGenerator` holds the architecture (a Flax module), sigma_g and the image
shape; the parameters stay separate (a pytree), so the same object samples with the EMA
parameters of any checkpoint.

File: `save_generator` writes the parameters alone (`nets.files` format, a few hundred MB at
most, no optimizer, fake score or discriminator) with meta
{'net': the U-Net config + arch, 'generator': {'sigma': sigma_g, 'kind': 'one_step_edm'}, ...};
`load_generator` reads it back, and `python -m didistill.sample` draws images from it.

`compute_dtype` ('float32' or 'bfloat16') is the dtype of the U-Net's convolutions and dense
layers; the parameters stay float32 and the output is float32 (mixed precision).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from didistill.nets.files import load_model, save_model

KIND = "one_step_edm"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EXPORT_HOW = "Export one with python -m didistill.evaluate --workdir=RUN --export=FILE."


def compute_dtype(name: str, key: str = "config.model.compute_dtype"):
    """jnp dtype of a compute-dtype name; ValueError naming `key` and the choices."""
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r} is not one of {tuple(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True, eq=False)
class ImageGenerator:
    net: Any  # EDMDenoiser (UNetDenoiser or ADMDenoiser)
    sigma: float  # sigma_g
    image_shape: tuple[int, int, int]  # (H, W, C)
    net_cfg: dict  # the 'net' meta of the teacher file (with 'arch')
    num_steps: int = 1  # K > 1: a K-step student (`one_step.few_step`)
    sigma_min: float = 0.002  # the last step's noise level scale of `few_step.step_sigmas`

    @property
    def num_classes(self) -> int:
        return int(self.net.label_dim)

    def with_dtype(self, name: str) -> ImageGenerator:
        return dataclasses.replace(self, net=self.net.clone(dtype=compute_dtype(name)))

    def step(self, params, x, sigma, labels=None):
        """One generator step: D_theta(x; sigma, y), x [B, H, W, C], sigma [B]."""
        return self.net.apply(params, x, sigma, labels)

    def __call__(self, params, z, labels=None, key=None):
        """x0 [B, H, W, C] (float32) of noise z [B, H, W, C] and labels [B] (or None); a K-step
        student draws its renoising noise from `key` (default: a fixed key)."""
        if self.num_steps > 1:
            from didistill.distill.one_step import few_step

            sigmas = few_step.step_sigmas(self.sigma, self.num_steps, self.sigma_min)
            key = jax.random.PRNGKey(0) if key is None else key
            return few_step.sample(self.step, params, z, sigmas, key, labels)
        n = z.shape[0]
        return self.step(params, self.sigma * z, jnp.full((n,), self.sigma), labels)

    def sample(self, params, key, n: int, labels=None):
        """(images [n, H, W, C], labels [n] or None): fresh noise and, if conditional and
        `labels` is None, uniform class labels."""
        k_z, k_y = jax.random.split(key)
        z = jax.random.normal(k_z, (n, *self.image_shape))
        if self.num_classes and labels is None:
            labels = jax.random.randint(k_y, (n,), 0, self.num_classes)
        return self(params, z, labels, jax.random.fold_in(key, 1)), labels


def from_network_file(path: str, sigma: float) -> tuple[ImageGenerator, Any]:
    """(generator, the file's variables) of a U-Net network file (a teacher)."""
    from didistill.nets.convert_edm import load_unet

    net, variables, meta = load_unet(path)
    cfg = meta["net"]
    res = int(cfg.get("img_resolution", 32))
    shape = (res, res, int(cfg.get("img_channels", 3)))
    return ImageGenerator(net, float(sigma), shape, dict(cfg)), variables


def save_generator(path: str, generator: ImageGenerator, params, **meta) -> str:
    """Writes the generator's parameters and architecture (see the module); returns `path`."""
    cfg = {k: v for k, v in generator.net_cfg.items() if k != "arch"}
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    info = {
        "sigma": generator.sigma,
        "kind": KIND,
        "num_steps": generator.num_steps,
        "sigma_min": generator.sigma_min,
    }
    return save_model(path, params, cfg, generator.net_cfg["arch"], generator=info, **meta)


def load_generator(path: str) -> tuple[ImageGenerator, Any, dict]:
    """(generator, params, meta) of a file written by `save_generator`.

    FileNotFoundError / ValueError name the file; a U-Net file that is not an exported
    generator (e.g. a teacher) is a ValueError saying how to export one.
    """
    net, params, meta = load_model(path, ("unet", "adm"), "one-step generator", EXPORT_HOW)
    info = meta.get("generator")
    if not isinstance(info, dict) or info.get("kind") != KIND:
        raise ValueError(
            f"{path} is a U-Net file but not an exported one-step generator (no 'generator' "
            f"meta; a teacher?). {EXPORT_HOW}"
        )
    cfg = meta["net"]
    res = int(cfg.get("img_resolution", 32))
    shape = (res, res, int(cfg.get("img_channels", 3)))
    generator = ImageGenerator(
        net,
        float(info["sigma"]),
        shape,
        dict(cfg),
        int(info.get("num_steps", 1)),
        float(info.get("sigma_min", 0.002)),
    )
    return generator, params, meta


__all__ = [
    "DTYPES",
    "ImageGenerator",
    "compute_dtype",
    "from_network_file",
    "load_generator",
    "save_generator",
]
