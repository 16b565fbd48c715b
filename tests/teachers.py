"""Tiny teacher files that several test files need, made without training: a random DiT for
the text students, a random U-Net for the image students (shared by tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from didistill.nets.convert_edm import unet_from_config
from didistill.nets.dit import dit_from_config
from didistill.nets.files import save_model

LANGUAGE, LENGTH = "markov_tiny", 8
RBG = dict(impl="unsafe_rbg")  # cheap to compile on CPU


def save_tiny_text_teacher(directory, depth: int) -> str:
    """Writes a random DiT teacher for markov_tiny (V = 4, L = 8) of `depth` blocks, its weights
    perturbed by 0.3 N(0, 1) so its predictions are not uniform; returns the file's path."""
    net_cfg = dict(vocab_size=4, max_length=LENGTH, width=16, depth=depth, num_heads=2, cond_dim=8)
    net = dit_from_config(net_cfg)
    params = net.init(jax.random.key(0), jnp.full((1, LENGTH), 4, jnp.int32), jnp.ones((1,)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    path = str(directory / "teacher_params.msgpack")
    data = {"language": LANGUAGE, "length": LENGTH}
    diffusion = {"schedule": "loglinear", "eps": 1e-3}
    params = jax.tree.unflatten(tree, leaves)
    return save_model(path, params, net_cfg, "dit", data=data, diffusion=diffusion)


def save_tiny_unet_teacher(path, resolution=8, channels=1, label_dim=0, channel_mult=(1,)):
    """A random-weight U-Net saved as a network file; returns the path."""
    cfg = dict(
        model_channels=8,
        channel_mult=list(channel_mult),
        channel_mult_emb=1,
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        label_dim=label_dim,
        img_resolution=resolution,
        img_channels=channels,
    )
    net, shape = unet_from_config(cfg)
    labels = jnp.zeros((1,), jnp.int32) if label_dim else None
    init = jax.jit(lambda k: net.init(k, jnp.zeros((1, *shape)), jnp.ones((1,)), labels))
    variables = init(jax.random.key(0, **RBG))
    # Give the zero-initialised output layers some weight, so the generator is not ~constant.
    variables = jax.tree.map(
        lambda v: v + 0.05 * jnp.sign(jnp.sin(jnp.arange(v.size))).reshape(v.shape), variables
    )
    return save_model(str(path), variables, cfg, "unet")


def random_data(shape, num_classes):
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (64, *shape)).astype(np.float32)
    return {"image": image, "label": rng.integers(0, num_classes, 64).astype(np.int32)}
