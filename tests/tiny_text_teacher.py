"""A tiny random MDLM teacher file for the text-distillation tests (DiDi, guided, SDTT)."""

import jax
import jax.numpy as jnp

from didistill.nets.dit import dit_from_config
from didistill.nets.files import save_model

LANGUAGE, LENGTH = "markov_tiny", 8


def save_tiny_teacher(directory, depth: int) -> str:
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
