"""Inception-v3 pool3 features for FID (Heusel et al. 2017), in Flax linen.

The network is the "FID Inception": the TensorFlow graph `inception-2015-12-05` that the
original TTUR code, NVIDIA's EDM/StyleGAN3 detector and mseitzer/pytorch-fid all use, not
torchvision's ImageNet Inception-v3 (Szegedy et al. 2016). Its structure is Inception-v3 with
three quirks of that graph, which change the features and so must be kept:

- the average pools inside the Mixed_5*, Mixed_6b-e and Mixed_7b blocks divide by the number
  of *valid* pixels of each 3x3 window (TensorFlow's SAME padding; `count_include_pad=False`);
- the pool branch of the last block, Mixed_7c, is a 3x3 **max** pool (stride 1, SAME), where
  the paper and torchvision use an average pool;
- every convolution is conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU.

Input: images [B, H, W, 3] in [-1, 1] (the range the graph expects; pytorch-fid maps [0, 1]
to it with 2x - 1). They are resized to 299x299 with bilinear interpolation at half-pixel
centres and no anti-aliasing (PyTorch's `interpolate(..., align_corners=False)`), as in
pytorch-fid. The original TensorFlow graph resizes with its own legacy bilinear kernel, so
FIDs from this port differ from TTUR/EDM's by a small amount (pytorch-fid reports ~0.1% on
one benchmark); quote numbers with the feature extractor used.

Output: the pool3 features [B, 2048], the global average of Mixed_7c's [B, 8, 8, 2048].

Weights: the PyTorch FID weights `pt_inception-2015-12-05-6726825d.pth` (a state dict ported
from the TensorFlow graph by pytorch-fid) converted once, on a machine that has them, by
`experiments/convert_inception.py` into a pickle-free `.npz` of the Flax tree (keys
'params/<path>' and 'batch_stats/<path>' joined with '/', plus '__format__').
`load_inception_params` reads it and checks every name and shape.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

INCEPTION_SIZE = 299  # input resolution of the graph
FEATURE_DIM = 2048  # pool3 width
FORMAT = "didistill.inception/1"  # '__format__' entry of the converted .npz
PYTORCH_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
CONVERT_COMMAND = "python experiments/convert_inception.py /path/to/" + PYTORCH_WEIGHTS + " {path}"


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, running stats) -> ReLU; torch's BasicConv2d."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)  # symmetric zero padding (rows, cols), as torch's
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, H, W, C] -> [B, H', W', features]
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_valid(x):  # 3x3 stride 1, SAME, mean over the valid pixels only
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):  # 3x3 stride 2, no padding
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class BlockA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, p, name: ConvBN(f, k, padding=p, dtype=self.dtype, name=name)
        b1 = c(64, (1, 1), (0, 0), "branch1x1")(x)
        b5 = c(48, (1, 1), (0, 0), "branch5x5_1")(x)
        b5 = c(64, (5, 5), (2, 2), "branch5x5_2")(b5)
        b3 = c(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), (0, 0), "branch_pool")(_avg_pool_valid(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)  # [B, 35, 35, 224 + pool_features]


class BlockB(nn.Module):
    """Mixed_6a (35 -> 17): 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, s, p, name: ConvBN(f, k, s, p, dtype=self.dtype, name=name)
        b3 = c(384, (3, 3), 2, (0, 0), "branch3x3")(x)
        bd = c(64, (1, 1), 1, (0, 0), "branch3x3dbl_1")(x)
        bd = c(96, (3, 3), 1, (1, 1), "branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), 2, (0, 0), "branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)  # [B, 17, 17, 768]


class BlockC(nn.Module):
    """Mixed_6b-6e (17x17): factorised 7x7 convolutions (1x7 and 7x1) of width c7."""

    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, p, name: ConvBN(f, k, padding=p, dtype=self.dtype, name=name)
        c7 = self.channels_7x7
        b1 = c(192, (1, 1), (0, 0), "branch1x1")(x)
        b7 = c(c7, (1, 1), (0, 0), "branch7x7_1")(x)
        b7 = c(c7, (1, 7), (0, 3), "branch7x7_2")(b7)
        b7 = c(192, (7, 1), (3, 0), "branch7x7_3")(b7)
        bd = c(c7, (1, 1), (0, 0), "branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), (3, 0), "branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), (0, 3), "branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), (3, 0), "branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), (0, 3), "branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), (0, 0), "branch_pool")(_avg_pool_valid(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)  # [B, 17, 17, 768]


class BlockD(nn.Module):
    """Mixed_7a (17 -> 8): 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, s, p, name: ConvBN(f, k, s, p, dtype=self.dtype, name=name)
        b3 = c(192, (1, 1), 1, (0, 0), "branch3x3_1")(x)
        b3 = c(320, (3, 3), 2, (0, 0), "branch3x3_2")(b3)
        b7 = c(192, (1, 1), 1, (0, 0), "branch7x7x3_1")(x)
        b7 = c(192, (1, 7), 1, (0, 3), "branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), 1, (3, 0), "branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), 2, (0, 0), "branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)  # [B, 8, 8, 1280]


class BlockE(nn.Module):
    """Mixed_7b/7c (8x8): split 1x3/3x1 branches; pool branch 'avg' (7b) or 'max' (7c, FID)."""

    pool: str = "avg"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, p, name: ConvBN(f, k, padding=p, dtype=self.dtype, name=name)
        b1 = c(320, (1, 1), (0, 0), "branch1x1")(x)
        b3 = c(384, (1, 1), (0, 0), "branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                c(384, (1, 3), (0, 1), "branch3x3_2a")(b3),
                c(384, (3, 1), (1, 0), "branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = c(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        bd = c(384, (3, 3), (1, 1), "branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                c(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd),
                c(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "max":  # FID graph quirk (Mixed_7c): max pool with -inf padding
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_valid(x)
        bp = c(192, (1, 1), (0, 0), "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)  # [B, 8, 8, 2048]


class InceptionV3FID(nn.Module):
    """pool3 features [B, 2048] of images [B, H, W, 3] in [-1, 1] (resized to 299x299)."""

    resize: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):  # [B, H, W, 3]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3] in [-1, 1], got {images.shape}")
        x = images.astype(self.dtype)
        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        if self.resize and x.shape[1:3] != size:
            x = jax.image.resize(x, (x.shape[0], *size, 3), "bilinear", antialias=False)
        c = lambda f, k, s, p, name: ConvBN(f, k, s, p, dtype=self.dtype, name=name)
        x = c(32, (3, 3), 2, (0, 0), "Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
        x = c(32, (3, 3), 1, (0, 0), "Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
        x = c(64, (3, 3), 1, (1, 1), "Conv2d_2b_3x3")(x)  # [B, 147, 147, 64]
        x = _max_pool_3x3_s2(x)  # [B, 73, 73, 64]
        x = c(80, (1, 1), 1, (0, 0), "Conv2d_3b_1x1")(x)  # [B, 73, 73, 80]
        x = c(192, (3, 3), 1, (0, 0), "Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
        x = _max_pool_3x3_s2(x)  # [B, 35, 35, 192]
        x = BlockA(32, self.dtype, name="Mixed_5b")(x)  # [B, 35, 35, 256]
        x = BlockA(64, self.dtype, name="Mixed_5c")(x)  # [B, 35, 35, 288]
        x = BlockA(64, self.dtype, name="Mixed_5d")(x)  # [B, 35, 35, 288]
        x = BlockB(self.dtype, name="Mixed_6a")(x)  # [B, 17, 17, 768]
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160)):
            x = BlockC(c7, self.dtype, name=name)(x)
        x = BlockC(192, self.dtype, name="Mixed_6e")(x)  # [B, 17, 17, 768]
        x = BlockD(self.dtype, name="Mixed_7a")(x)  # [B, 8, 8, 1280]
        x = BlockE("avg", self.dtype, name="Mixed_7b")(x)  # [B, 8, 8, 2048]
        x = BlockE("max", self.dtype, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # pool3 [B, 2048]


@functools.cache
def _default_template() -> dict:
    images = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3FID().init, jax.random.key(0), images)


def variables_template() -> dict:
    """Shapes/dtypes of the variables {'params', 'batch_stats'} (traced once, no computation).

    {'params': {<block>: {<branch>: {'conv': {'kernel' [kh, kw, I, O]},
                                     'bn': {'scale' [O], 'bias' [O]}}}},
     'batch_stats': {<block>: {<branch>: {'bn': {'mean' [O], 'var' [O]}}}}}
    with 94 ConvBN layers and 21,785,568 parameters (torchvision's backbone count).
    """
    return jax.tree.map(lambda leaf: leaf, _default_template())  # a fresh copy of the tree


def random_variables_like(template, seed: int = 0) -> dict:
    """Random variables with the shapes of `template` (He-normal kernels, identity BatchNorm).

    Drawn with numpy, so it neither runs the forward pass nor compiles anything, unlike
    `model.init`; for tests and benchmarks.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(template).items():
        name = path[-1]
        if name == "kernel":  # [kh, kw, I, O]
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape, np.float32) * np.float32(np.sqrt(2 / fan_in))
        elif name in ("scale", "var"):
            value = np.ones(leaf.shape, np.float32)
        else:  # bias, mean
            value = np.zeros(leaf.shape, np.float32)
        out[path] = jnp.asarray(value, leaf.dtype)
    return traverse_util.unflatten_dict(out)


def random_inception_variables(seed: int = 0) -> dict:
    """Random variables of the whole FID Inception (see `random_variables_like`)."""
    return random_variables_like(variables_template(), seed)


def save_inception_params(path: str, variables) -> str:
    """Write the Flax variables as a pickle-free `.npz` ('params/...', 'batch_stats/...')."""
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    arrays = {key: np.asarray(value, np.float32) for key, value in flat.items()}
    with open(path, "wb") as f:  # a file object: np.savez would append '.npz' to the name
        np.savez(f, __format__=np.array(FORMAT), **arrays)
    return path


def load_inception_params(path: str) -> dict:
    """Read converted FID Inception variables; every name and shape is checked.

    Raises FileNotFoundError, naming the weights file and the command that prepares it, when
    `path` does not exist, and ValueError when the file is not a converted FID Inception.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {path!r}. Prepare them once, on a machine "
            f"that has the PyTorch FID Inception weights {PYTORCH_WEIGHTS} (pytorch-fid's "
            f"release; torch is needed there, or an .npz export of that state dict): "
            f"{CONVERT_COMMAND.format(path=path)}. Then copy the .npz to {path!r}."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(
            f"{path!r} is not a readable .npz of FID Inception weights: {error}"
        ) from None
    found = str(arrays.pop("__format__", "none"))
    if found != FORMAT:
        raise ValueError(
            f"{path!r} has format {found!r}, expected {FORMAT!r}; re-create it with "
            f"{CONVERT_COMMAND.format(path=path)}"
        )
    template = traverse_util.flatten_dict(variables_template(), sep="/")
    missing = sorted(set(template) - set(arrays))
    extra = sorted(set(arrays) - set(template))
    wrong = [
        f"{k}: {arrays[k].shape} != {template[k].shape}"
        for k in sorted(set(template) & set(arrays))
        if arrays[k].shape != template[k].shape
    ]
    if missing or extra or wrong:
        raise ValueError(
            f"{path!r} does not match the FID Inception tree: missing {missing[:5]} "
            f"({len(missing)}), unexpected {extra[:5]} ({len(extra)}), "
            f"mis-shaped {wrong[:5]} ({len(wrong)})"
        )
    flat = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def inception_feature_fn(
    variables, *, quantize: bool = True, model: InceptionV3FID | None = None
) -> Callable[[jax.Array], jax.Array]:
    """A jitted `images [B, H, W, 3] in [-1, 1] -> pool3 features [B, 2048]`.

    quantize=True rounds images to the 256 levels of uint8 first (x -> round(127.5 (x + 1))),
    as every published FID does, since samples are saved as 8-bit images (EDM's protocol).
    """
    model = model or InceptionV3FID()

    @jax.jit
    def features(images):  # [B, H, W, 3] -> [B, 2048]
        x = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
        if quantize:
            x = jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0
        return model.apply(variables, x)

    return features
