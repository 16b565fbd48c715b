"""GPT-2 (Radford et al. 2019) in Flax, and its weight converter from the Hugging Face layout.

The generative-perplexity judge of MDLM, DUO and DiDi-Instruct is GPT-2 Large
(`gpt2-large`: width 1280, 36 layers, 20 heads, 774M parameters). The network restates
huggingface/transformers @ 0010f60 src/transformers/models/gpt2/modeling_gpt2.py
(`GPT2Attention._attn`, `GPT2MLP`, `GPT2Block`, `GPT2Model.forward`, `GPT2LMHeadModel` with
the tied head):

    ids [B, T], mask [B, T] (1 = token, 0 = padding)
      -> x = wte[ids] + wpe[0..T-1]
      -> depth x: x += c_proj(Attn(ln_1(x))) ; x += c_proj(gelu_tanh(c_fc(ln_2(x))))
      -> logits = ln_f(x) @ wte^T                                     [B, T, V]

Attn is causal multi-head attention, softmax(q k^T / sqrt(d) + m) v with m = finfo.min on
future keys and on padding keys; layer norms have eps 1e-5; the tanh GELU is `gelu_new`.

Converter (`gpt2_to_params`): HF GPT-2 state dicts (`model.safetensors` of `gpt2`,
`gpt2-large`, ...; keys with or without the 'transformer.' prefix). HF's `Conv1D` stores its
weight as [in, out], which is a Flax kernel as it is:

    wte.weight [V, D] -> wte          wpe.weight [P, D] -> wpe
    h.i.ln_1 / ln_2 / ln_f {weight, bias} -> {scale, bias}
    h.i.attn.c_attn {weight [D, 3D], bias} -> h{i}.c_attn (q, k, v in that order, heads
                                              contiguous: [..., (3, H, d)])
    h.i.attn.c_proj, h.i.mlp.c_fc, h.i.mlp.c_proj -> h{i}.attn_proj, mlp_fc, mlp_proj
    h.i.attn.bias, h.i.attn.masked_bias, lm_head.weight (= wte) -> not needed
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # gpt2, -medium, -large, -xl


class GPT2Block(nn.Module):
    width: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):  # x [B, T, D]; mask bool [B, 1, T, T] (True = attend)
        head_dim = self.width // self.num_heads
        h = nn.LayerNorm(epsilon=1e-5, name="ln_1")(x)
        qkv = nn.Dense(3 * self.width, dtype=self.dtype, name="c_attn")(h)
        q, k, v = jnp.split(qkv.reshape(*qkv.shape[:2], 3, self.num_heads, head_dim), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, T, H, d]
        scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / np.sqrt(head_dim)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        attn = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(x.shape)
        x = x + nn.Dense(self.width, dtype=self.dtype, name="attn_proj")(attn)
        h = nn.LayerNorm(epsilon=1e-5, name="ln_2")(x)
        h = nn.gelu(nn.Dense(4 * self.width, dtype=self.dtype, name="mlp_fc")(h), approximate=True)
        return x + nn.Dense(self.width, dtype=self.dtype, name="mlp_proj")(h)


class GPT2(nn.Module):
    """Causal LM: ids int [B, T] (and a padding mask [B, T]) -> logits float32 [B, T, V]."""

    vocab_size: int = 50257
    max_positions: int = 1024
    width: int = 1280
    depth: int = 36
    num_heads: int = 20
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, attention_mask=None):
        length = ids.shape[1]
        if length > self.max_positions:
            raise ValueError(f"GPT-2 context {length} exceeds its {self.max_positions} positions")
        wte = self.param("wte", nn.initializers.normal(0.02), (self.vocab_size, self.width))
        wpe = self.param("wpe", nn.initializers.normal(0.01), (self.max_positions, self.width))
        x = (jnp.take(wte, ids, axis=0) + wpe[:length][None]).astype(self.dtype)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, T, T]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        for i in range(self.depth):
            x = GPT2Block(self.width, self.num_heads, self.dtype, name=f"h{i}")(x, mask)
        x = nn.LayerNorm(epsilon=1e-5, name="ln_f")(x.astype(jnp.float32))
        return x @ wte.T  # tied head, float32


def gpt2_to_params(
    state: Mapping[str, np.ndarray], num_heads: int | None = None
) -> tuple[dict[str, Any], dict[str, int]]:
    """({'params': ...} of `GPT2`, its config) from a Hugging Face GPT-2 state dict (module
    docstring); `num_heads` defaults to the public sizes' (12/16/20/25 for width
    768/1024/1280/1600). Raises ValueError naming a missing or unknown key."""
    sd = {k.removeprefix("transformer."): np.asarray(v) for k, v in state.items()}
    used: set[str] = set()

    def take(key):
        if key not in sd:
            raise ValueError(f"GPT-2 checkpoint lacks {key!r} (is this a GPT-2 state dict?)")
        used.add(key)
        return np.asarray(sd[key], np.float32)

    def dense(key):
        return {"kernel": take(f"{key}.weight"), "bias": take(f"{key}.bias")}

    def norm(key):
        return {"scale": take(f"{key}.weight"), "bias": take(f"{key}.bias")}

    wte, wpe = take("wte.weight"), take("wpe.weight")
    width, depth = wte.shape[1], 0
    while f"h.{depth}.ln_1.weight" in sd:
        depth += 1
    heads = num_heads or HEADS_BY_WIDTH.get(width)
    if not heads or width % heads:
        raise ValueError(f"GPT-2 width {width}: pass num_heads (a divisor of the width)")
    params: dict[str, Any] = {"wte": wte, "wpe": wpe, "ln_f": norm("ln_f")}
    for i in range(depth):
        h = f"h.{i}"
        params[f"h{i}"] = {
            "ln_1": norm(f"{h}.ln_1"), "ln_2": norm(f"{h}.ln_2"),
            "c_attn": dense(f"{h}.attn.c_attn"), "attn_proj": dense(f"{h}.attn.c_proj"),
            "mlp_fc": dense(f"{h}.mlp.c_fc"), "mlp_proj": dense(f"{h}.mlp.c_proj"),
        }  # fmt: skip
        used.update(k for k in (f"{h}.attn.bias", f"{h}.attn.masked_bias") if k in sd)
    if "lm_head.weight" in sd:
        used.add("lm_head.weight")
        if not np.array_equal(sd["lm_head.weight"], wte):
            raise ValueError("lm_head.weight differs from wte.weight: not a tied GPT-2 head")
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(f"GPT-2 checkpoint has keys this converter does not know: {unknown[:8]}")
    config = dict(
        vocab_size=wte.shape[0], max_positions=wpe.shape[0], width=width, depth=depth,
        num_heads=heads,
    )  # fmt: skip
    return {"params": params}, config


def load_gpt2(path: str, num_heads: int | None = None) -> tuple[GPT2, dict[str, Any]]:
    """(module, variables) of a Hugging Face GPT-2 checkpoint: a folder holding
    model.safetensors (config.json's n_head used when present) or the file itself."""
    from didistill.nets.safetensors_io import read_checkpoint

    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    config_path = os.path.join(folder, "config.json")
    if num_heads is None and os.path.exists(config_path):
        with open(config_path) as f:
            num_heads = json.load(f).get("n_head")
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"GPT-2 judge weights not found at {file}: download them on a machine with network "
            "access (`huggingface-cli download openai-community/gpt2-large model.safetensors "
            "config.json vocab.json merges.txt --local-dir DIR`) and point config.eval.judge_dir "
            "at DIR"
        )
    variables, config = gpt2_to_params(read_checkpoint(file), num_heads)
    return GPT2(**config), variables


__all__ = ["GPT2", "GPT2Block", "HEADS_BY_WIDTH", "gpt2_to_params", "load_gpt2"]
