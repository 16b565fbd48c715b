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

`layout='mdlm'`: parameter-compatible with MDLM's DDiT (kuleshov-group/mdlm @ c112c52,
models/dit.py: `DDiTBlock` 214-289, `EmbeddingLayer` 292-299, `DDitFinalLayer` 302-321, `DIT`
324-370, `TimestepEmbedder` 150-189, `LayerNorm` 126-134), so that the published
`kuleshov-group/mdlm-owt` teacher converts one to one (`didistill.nets.convert_mdlm`):
- layer norms with a scale and no bias, eps 1e-5 (torch's), computed in float32;
- q/k/v and attention-output projections without bias, the MLP with biases, tanh GELU;
- no dropout on the embeddings (dropout only on the two residual branches, as MDLM);
- adaLN always present: c = silu(MLP(emb(sigma))), emb the 256-dim sinusoidal embedding of
  sigma (not of 1000 t), MLP Linear(256, C) -> SiLU -> Linear(C, C); blocks take
  Linear(c) -> (shift, scale, gate) x 2 and the final layer Linear(c) -> (shift, scale). With
  `time_conditioning=False` sigma is 0 (MDLM's `_process_sigma`), so the modulation is a
  constant learned vector: the network stays time-agnostic (the cached sampler is exact);
  with time conditioning sigma = -log(1 - (1 - 1e-3) t) (MDLM's log-linear noise);
- rotary embeddings as here (MDLM's `Rotary` + flash-attn's non-interleaved rotation rotate
  the pairs (x_i, x_{i + d/2}) by m base^(-2i/d)), and logits [B, L, V + 1] from the final
  linear layer (MDLM's vocab_size counts [MASK]).

Memory: `attention` chooses the attention kernel: 'einsum' (explicit float32 softmax of the
[B, H, L, L] scores), or `jax.nn.dot_product_attention` with implementation 'xla', 'cudnn'
(the fused flash kernel on NVIDIA GPUs; bf16/fp16 inputs) or 'auto' (cuDNN on a GPU with
bf16/fp16 activations, XLA otherwise; JAX's own default is always XLA). `remat`
rematerialises each block in the backward pass (`flax.linen.remat`): activations of one
block at a time instead of all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYOUTS = ("native", "mdlm")
ATTENTIONS = ("einsum", "xla", "cudnn", "auto")
MDLM_FREQ_DIM = 256  # MDLM's TimestepEmbedder frequency_embedding_size


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


def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10000.0, scale: float = 1000.0
) -> jax.Array:
    """Sinusoidal embedding [cos(scale t f_i), sin(scale t f_i)] of t [B] -> [B, dim],
    f_i = max_period^(-i / (dim // 2)) (scale 1000 here; MDLM embeds sigma with scale 1)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = scale * t.astype(jnp.float32)[:, None] * freqs[None]
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
    layout: str = "native"
    attention: str = "einsum"

    def _norm(self, name):
        if self.layout == "mdlm":
            return nn.LayerNorm(epsilon=1e-5, use_bias=False, dtype=jnp.float32, name=name)
        return nn.LayerNorm(dtype=self.dtype, name=name)

    def _attend(self, q, k, v):
        """softmax(q k^T / sqrt(d)) v over [B, L, H, d] (non-causal)."""
        head_dim = q.shape[-1]
        if self.attention == "einsum":
            scores = jnp.einsum("blhd,bmhd->bhlm", q, k).astype(jnp.float32) / math.sqrt(head_dim)
            weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B, H, L, L]
            return jnp.einsum("bhlm,bmhd->blhd", weights, v)  # [B, L, H, d]
        impl = self.attention
        if impl == "auto":  # JAX's own None means XLA: pick cuDNN where it applies
            fused = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            impl = "cudnn" if fused else "xla"
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)

    @nn.compact
    def __call__(self, x, positions, cond=None, train: bool = False):
        # x [B, L, D]; cond [B, C] or None
        head_dim = self.width // self.num_heads
        bias = self.layout != "mdlm"  # MDLM's attention projections have no bias
        if cond is None:
            shift1 = scale1 = shift2 = scale2 = 0.0
            gate1 = gate2 = 1.0
        else:
            mod = nn.Dense(6 * self.width, kernel_init=nn.initializers.zeros, name="adaln")(
                nn.silu(cond)
            )[:, None, :]  # [B, 1, 6D]
            shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        drop = nn.Dropout(self.dropout, deterministic=not train)

        h = _modulate(self._norm("ln_attn")(x), shift1, scale1).astype(self.dtype)
        qkv = nn.DenseGeneral(
            (3, self.num_heads, head_dim), use_bias=bias, dtype=self.dtype, name="qkv"
        )(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, d]
        q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        attn = self._attend(q, k, v)  # [B, L, H, d]
        out = nn.DenseGeneral(
            self.width, axis=(-2, -1), use_bias=bias, dtype=self.dtype, name="out"
        )(attn)
        x = x + gate1 * drop(out)

        h = _modulate(self._norm("ln_mlp")(x), shift2, scale2).astype(self.dtype)
        h = nn.Dense(self.mlp_ratio * self.width, dtype=self.dtype, name="mlp_in")(h)
        h = nn.Dense(self.width, dtype=self.dtype, name="mlp_out")(nn.gelu(h))
        return x + gate2 * drop(h)


class DiT(nn.Module):
    """Transformer denoiser: tokens [B, L] -> logits [B, L, V + 1] (V = vocab_size).

    Fields: vocab_size V (without [MASK]); max_length (positions beyond it are an error);
    width D, depth, num_heads (D divisible by heads, even head dim), mlp_ratio, dropout (active
    only with train=True and a 'dropout' rng); time_conditioning (adaLN-Zero on t, off by
    default) with cond_dim; dtype of the activations (parameters stay float32; attention
    softmax and logits are float32); layout 'native' or 'mdlm' (module docstring), attention
    'einsum' | 'xla' | 'cudnn' | 'auto', remat (recompute each block in the backward pass).
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
    layout: str = "native"
    attention: str = "einsum"
    remat: bool = False

    def _condition(self, t, batch):
        """cond [B, C] (before the blocks' SiLU), or None without adaLN."""
        mdlm = self.layout == "mdlm"
        if not (self.time_conditioning or mdlm):
            return None
        if self.time_conditioning and t is None:
            raise ValueError("DiT(time_conditioning=True) needs the diffusion time t [B]")
        if not mdlm:
            t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
            cond = timestep_embedding(t, self.cond_dim)
        else:  # MDLM: sigma(t) of its log-linear noise, or 0 without time conditioning
            sigma = jnp.zeros((batch,), jnp.float32)
            if self.time_conditioning:
                t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
                sigma = -jnp.log1p(-(1.0 - 1e-3) * t)
            cond = timestep_embedding(sigma, MDLM_FREQ_DIM, scale=1.0)
        cond = nn.Dense(self.cond_dim, name="time_in")(cond)
        return nn.Dense(self.cond_dim, name="time_out")(nn.silu(cond))  # [B, C]

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
        if self.layout not in LAYOUTS or self.attention not in ATTENTIONS:
            raise ValueError(
                f"DiT layout={self.layout!r} / attention={self.attention!r}: layout one of "
                f"{LAYOUTS}, attention one of {ATTENTIONS}"
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

        cond = self._condition(t, tokens.shape[0])
        positions = jnp.arange(length)
        if self.layout != "mdlm":  # MDLM has no dropout on the embeddings
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        block_cls = nn.remat(DiTBlock, static_argnums=(4,)) if self.remat else DiTBlock
        hidden = []
        for i in range(self.depth):
            x = block_cls(
                self.width,
                self.num_heads,
                self.mlp_ratio,
                self.dropout,
                self.dtype,
                self.layout,
                self.attention,
                name=f"block{i}",
            )(x, positions, cond, train)
            if i >= self.depth - return_hidden:
                hidden.append(x)

        if self.layout == "mdlm":
            h = nn.LayerNorm(epsilon=1e-5, use_bias=False, dtype=jnp.float32, name="ln_final")(x)
        else:
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
        layout=str(net_cfg.get("layout", "native")),
        attention=str(net_cfg.get("attention", "einsum")),
        remat=bool(net_cfg.get("remat", False)),
    )


__all__ = [
    "ATTENTIONS",
    "LAYOUTS",
    "dit_from_config",
    "DiT",
    "DiTBlock",
    "apply_rotary",
    "num_params",
    "rotary_angles",
    "timestep_embedding",
]
