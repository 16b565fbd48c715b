"""A small diffusion transformer (DiT) denoiser for masked discrete diffusion (MDLM's "DDiT").

Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023 (adaLN-Zero);
Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021 (arXiv:2104.09864);
Sahoo et al., MDLM, NeurIPS 2024 (the text DiT with rotary embeddings, no time conditioning).

    tokens [B, L] (ids in 0..V, V = [MASK])  or  soft tokens [B, L, V + 1] (probabilities)
      -> embedding [B, L, D]
      -> depth x pre-LN block: x += Attn(LN(x)) ; x += MLP(LN(x))     (bidirectional)
      -> LN -> Dense (zero-initialised) -> logits [B, L, V + 1]

Attention uses rotary position embeddings on queries and keys: position m rotates each pair
of channels (x_i, x_{i + d/2}) by the angle m theta_i, theta_i = base^(-2i/d), so that
<R_m q, R_n k> = <q, R_{n-m} k> depends on positions only through n - m.

Time conditioning (`time_conditioning=True`, adaLN-Zero): a sinusoidal embedding of t (times
1000) goes through an MLP to c [B, cond_dim]; each block gets shift, scale and gate vectors
from a zero-initialised Dense(c), so the conditioned network starts as the unconditioned one:
LN(x) (1 + scale) + shift and x + gate * F(...). It is off by default: the optimal MDLM
denoiser does not depend on t (MDLM; Ou et al. 2024), and the cached sampler relies on that.

`__call__(..., return_hidden=K)` also returns the residual-stream outputs of the last K blocks
[K, B, L, D] (for a per-token discriminator head).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def rotary_angles(positions: jax.Array, head_dim: int, base: float = 10000.0) -> jax.Array:
    """m theta_i for positions [..., L] -> [..., L, head_dim / 2], theta_i = base^(-2i/d)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [d/2]
    return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotates x [B, L, H, d] by position: pairs (x_i, x_{i + d/2}) turn by m theta_i.

    positions: [L] or [B, L] (integers or floats).
    """
    angles = rotary_angles(positions, x.shape[-1], base)  # [(B,) L, d/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]  # [B|1, L, 1, d/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of t [B] (scaled by 1000) -> [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


def _modulate(x, shift, scale):
    return x * (1.0 + scale) + shift


class DiTBlock(nn.Module):
    """Pre-LN transformer block with rotary self-attention, optional adaLN-Zero."""

    width: int
    num_heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, cond=None, *, train: bool = False):
        # x [B, L, D]; cond [B, C] or None
        head_dim = self.width // self.num_heads
        if cond is None:
            shift1 = scale1 = shift2 = scale2 = 0.0
            gate1 = gate2 = 1.0
        else:
            mod = nn.Dense(6 * self.width, kernel_init=nn.initializers.zeros, name="adaln")(
                nn.silu(cond)
            )[:, None, :]  # [B, 1, 6D]
            shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        drop = nn.Dropout(self.dropout, deterministic=not train)

        h = _modulate(nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x), shift1, scale1)
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv")(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, d]
        q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        scores = jnp.einsum("blhd,bmhd->bhlm", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B, H, L, L]
        attn = jnp.einsum("bhlm,bmhd->blhd", weights, v)  # [B, L, H, d]
        out = nn.DenseGeneral(self.width, axis=(-2, -1), dtype=self.dtype, name="out")(attn)
        x = x + gate1 * drop(out)

        h = _modulate(nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x), shift2, scale2)
        h = nn.Dense(self.mlp_ratio * self.width, dtype=self.dtype, name="mlp_in")(h)
        h = nn.Dense(self.width, dtype=self.dtype, name="mlp_out")(nn.gelu(h))
        return x + gate2 * drop(h)


class DiT(nn.Module):
    """Transformer denoiser: tokens [B, L] -> logits [B, L, V + 1] (V = vocab_size).

    Fields: vocab_size V (without [MASK]); max_length (positions beyond it are an error);
    width D, depth, num_heads (D divisible by heads, even head dim), mlp_ratio, dropout (active
    only with train=True and a 'dropout' rng); time_conditioning (adaLN-Zero on t, off by
    default) with cond_dim; dtype of the activations (parameters stay float32; attention
    softmax and logits are float32).
    """

    vocab_size: int
    max_length: int = 1024
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    time_conditioning: bool = False
    cond_dim: int = 128
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, t=None, *, train: bool = False, return_hidden: int = 0):
        """tokens: int [B, L] or soft [B, L, V + 1]; t: [B] (needed with time conditioning).

        Returns logits float32 [B, L, V + 1], and with return_hidden = K > 0 also the outputs
        of the last K blocks, [K, B, L, D].
        """
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(
                f"DiT width {self.width} must split into {self.num_heads} heads of even size"
            )
        if not 0 <= return_hidden <= self.depth:
            raise ValueError(f"return_hidden={return_hidden} must be in [0, depth={self.depth}]")
        length = tokens.shape[1]
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length {self.max_length}")
        num_embeddings = self.vocab_size + 1
        table = self.param(
            "embedding", nn.initializers.normal(0.02), (num_embeddings, self.width)
        )  # [V + 1, D]
        if tokens.ndim == 3:  # soft tokens: probability-weighted embeddings
            x = jnp.einsum("blv,vd->bld", tokens.astype(jnp.float32), table)
        else:
            x = jnp.take(table, tokens, axis=0)  # [B, L, D]
        x = x.astype(self.dtype)

        cond = None
        if self.time_conditioning:
            if t is None:
                raise ValueError("DiT(time_conditioning=True) needs the diffusion time t [B]")
            t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (tokens.shape[0],))
            cond = timestep_embedding(t, self.cond_dim)
            cond = nn.Dense(self.cond_dim, name="time_in")(cond)
            cond = nn.Dense(self.cond_dim, name="time_out")(nn.silu(cond))  # [B, C]

        positions = jnp.arange(length)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        hidden = []
        for i in range(self.depth):
            x = DiTBlock(
                self.width,
                self.num_heads,
                self.mlp_ratio,
                self.dropout,
                self.dtype,
                name=f"block{i}",
            )(x, positions, cond, train=train)
            if i >= self.depth - return_hidden:
                hidden.append(x)

        h = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
        if cond is not None:
            shift, scale = jnp.split(
                nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros, name="adaln_final")(
                    nn.silu(cond)
                )[:, None, :],
                2,
                axis=-1,
            )
            h = _modulate(h, shift, scale)
        logits = nn.Dense(
            num_embeddings, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="logits"
        )(h).astype(jnp.float32)  # [B, L, V + 1]
        if return_hidden:
            return logits, jnp.stack(hidden)  # [K, B, L, D]
        return logits


def num_params(params) -> int:
    """Total number of parameters of a pytree."""
    return sum(int(p.size) for p in jax.tree.leaves(params))


def dit_from_config(net_cfg: Mapping[str, Any]) -> DiT:
    """The DiT of a net block that holds vocab_size and max_length too (a teacher's meta)."""
    return DiT(
        vocab_size=int(net_cfg["vocab_size"]),
        max_length=int(net_cfg["max_length"]),
        width=int(net_cfg["width"]),
        depth=int(net_cfg["depth"]),
        num_heads=int(net_cfg["num_heads"]),
        mlp_ratio=int(net_cfg.get("mlp_ratio", 4)),
        dropout=float(net_cfg.get("dropout", 0.0)),
        time_conditioning=bool(net_cfg.get("time_conditioning", False)),
        cond_dim=int(net_cfg.get("cond_dim", 128)),
        dtype=jnp.dtype(net_cfg.get("dtype", "float32")),
    )


__all__ = [
    "dit_from_config",
    "DiT",
    "DiTBlock",
    "apply_rotary",
    "num_params",
    "rotary_angles",
    "timestep_embedding",
]
