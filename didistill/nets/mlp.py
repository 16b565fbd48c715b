"""Residual MLPs for low-dimensional data: an EDM-preconditioned denoiser and a logit head.

`MLPDenoiser` is D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, see
`didistill.diffusion.edm`) with F a residual MLP conditioned on a sinusoidal embedding of
c_noise = ln(sigma) / 4. The same module serves as

- a diffusion teacher or fake-score network: `D = net.apply(params, x, sigma)`;
- a one-step generator G(z) = D(sigma_g z; sigma_g): `net.apply(params, sigma_g * z, sigma_g)`;
- a discriminator trunk: `D, features = net.apply(params, x, sigma, features=True)`, with
  features [B, width] fed to `MLPHead`.

The input dimension is read from the data; the output of F has the same dimension.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from didistill.diffusion import edm


def sinusoidal_embedding(c: jax.Array, dim: int, max_freq: float = 64.0) -> jax.Array:
    """[cos(f_j c), sin(f_j c)] with f_j log-spaced in [1, max_freq]; c [B] -> [B, dim].

    c_noise = ln(sigma)/4 spans about [-1.6, 1.1] for sigma in [0.002, 80], so angular
    frequencies from 1 to 64 resolve it from coarse to fine.
    """
    half = dim // 2
    freqs = jnp.exp(jnp.linspace(0.0, math.log(max_freq), half))  # [dim / 2]
    angles = c[:, None] * freqs[None]  # [B, dim / 2]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class ResidualBlock(nn.Module):
    """h + W2 silu(W1 silu(LN(h)) + E c_emb): a pre-norm residual block with noise conditioning."""

    width: int

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array) -> jax.Array:  # [B, W], [B, E]
        y = nn.Dense(self.width)(nn.silu(nn.LayerNorm()(h)))
        y = nn.silu(y + nn.Dense(self.width)(emb))
        return h + nn.Dense(self.width)(y)  # [B, W]


class MLPDenoiser(nn.Module):
    """EDM-preconditioned residual MLP denoiser.

    Attributes:
      width: hidden width W.
      depth: number of residual blocks.
      emb_dim: size of the sinusoidal c_noise embedding.
      sigma_data: data std used by the preconditioning.
    """

    width: int = 256
    depth: int = 4
    emb_dim: int = 64
    sigma_data: float = edm.SIGMA_DATA

    @nn.compact
    def __call__(self, x: jax.Array, sigma, features: bool = False):
        """x [B, D], sigma scalar or [B] -> D(x; sigma) [B, D] (and features [B, W])."""
        trunk = _Trunk(self.width, self.depth, self.emb_dim, name="trunk")
        out = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, name="out")
        feats = {}

        def raw_fn(x_in, c_noise):  # F(c_in x; c_noise): [B, D], [B] -> [B, D]
            feats["h"] = trunk(x_in, c_noise)
            return out(feats["h"])

        denoised = edm.precondition(raw_fn, x, sigma, self.sigma_data)
        return (denoised, feats["h"]) if features else denoised


class _Trunk(nn.Module):
    """F's hidden part: (c_in x [B, D], c_noise [B]) -> features [B, W]."""

    width: int
    depth: int
    emb_dim: int

    @nn.compact
    def __call__(self, x_in: jax.Array, c_noise: jax.Array) -> jax.Array:
        emb = sinusoidal_embedding(c_noise.astype(x_in.dtype), self.emb_dim)  # [B, E]
        emb = nn.Dense(self.width)(nn.silu(nn.Dense(self.width)(emb)))  # [B, W]
        h = nn.Dense(self.width)(x_in)  # [B, W]
        for _ in range(self.depth):
            h = ResidualBlock(self.width)(h, emb)
        return nn.silu(nn.LayerNorm()(h))  # [B, W]


class MLPHead(nn.Module):
    """Small MLP classifier: features [B, F] -> one logit per example [B]."""

    width: int = 128
    depth: int = 2

    @nn.compact
    def __call__(self, feats: jax.Array) -> jax.Array:
        h = feats
        for _ in range(self.depth):
            h = nn.silu(nn.Dense(self.width)(h))  # [B, W]
        return nn.Dense(1)(h)[..., 0]  # [B]


def denoiser_from_config(net_cfg: Mapping[str, Any]) -> MLPDenoiser:
    """The denoiser of a `config.net` block or of the 'net' entry of a network file's meta."""
    return MLPDenoiser(
        width=int(net_cfg["width"]),
        depth=int(net_cfg["depth"]),
        emb_dim=int(net_cfg["emb_dim"]),
        sigma_data=float(net_cfg["sigma_data"]),
    )


__all__ = [
    "denoiser_from_config",
    "MLPDenoiser",
    "MLPHead",
    "ResidualBlock",
    "sinusoidal_embedding",
]
