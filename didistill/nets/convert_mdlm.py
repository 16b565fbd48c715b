"""Converts an MDLM DDiT checkpoint (the published `kuleshov-group/mdlm-owt` teacher) into a
didistill teacher file (`didistill.nets.files.save_model`, arch 'dit', layout 'mdlm').

    python -m didistill.nets.convert_mdlm SRC DST [--num_heads=12] [--max_length=1024]

SRC: the Hub repository's `model.safetensors` (read with NumPy), or a torch file
(`pytorch_model.bin`, an MDLM Lightning `.ckpt`; needs torch). A `config.json` next to SRC
(the Hub's, with `n_heads`, `model_length`, `time_conditioning`) fills the flags left unset.
Obtain the files offline, e.g. `huggingface-cli download kuleshov-group/mdlm-owt
model.safetensors config.json --local-dir DIR`; this library never downloads.

Key names (kuleshov-group/mdlm @ c112c52, models/dit.py; the Hub model wraps the same DIT as
its `backbone`, so keys may carry a 'backbone.' prefix, stripped here). torch Linear weights
are [out, in]; Flax kernels are [in, out]. With D the width, H heads of d = D / H, C = cond_dim:

    vocab_embed.embedding [V+1, D]            -> embedding
    sigma_map.mlp.0.{weight [C, 256], bias}   -> time_in.{kernel = W^T, bias}
    sigma_map.mlp.2.{weight [C, C], bias}     -> time_out
    blocks.i.norm1.weight / norm2.weight      -> block{i}.ln_attn.scale / ln_mlp.scale
    blocks.i.attn_qkv.weight [3D, D]          -> block{i}.qkv.kernel = W^T as [D, 3, H, d]
                                                 ('b s (three h d)' in MDLM)
    blocks.i.attn_out.weight [D, D]           -> block{i}.out.kernel = W^T as [H, d, D]
    blocks.i.mlp.0 / mlp.2 {weight, bias}     -> block{i}.mlp_in / mlp_out
    blocks.i.adaLN_modulation {weight [6D, C], bias}
                                              -> block{i}.adaln (shift, scale, gate) x 2
    output_layer.norm_final.weight            -> ln_final.scale
    output_layer.linear {weight [V+1, D], bias}  -> logits
    output_layer.adaLN_modulation {weight [2D, C], bias} -> adaln_final (shift, scale)
    rotary_emb.inv_freq                       -> (recomputed; checked against base 10000)

The teacher's meta records MDLM's schedule (log-linear, eps 1e-3) and the vocabulary V = the
embedding rows minus one ([MASK] = V = 50257 for GPT-2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from didistill.nets.files import save_model
from didistill.nets.safetensors_io import read_checkpoint

PREFIXES = ("backbone.", "model.backbone.", "model.")


def _strip(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            if key.startswith(prefix) and not key.startswith(("vocab_embed", "blocks")):
                key = key[len(prefix) :]
                break
        out[key] = np.asarray(value)
    return out


def mdlm_to_params(
    state: Mapping[str, np.ndarray], num_heads: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """({'params': ...} of `DiT(layout='mdlm')`, its net config without max_length) from an
    MDLM state dict (module docstring). Raises ValueError naming missing or unknown keys."""
    sd = _strip(state)
    used: set[str] = set()

    def take(key):
        if key not in sd:
            raise ValueError(f"MDLM checkpoint lacks {key!r} (is this an MDLM DDiT state dict?)")
        used.add(key)
        return np.asarray(sd[key], np.float32)

    def dense(key):
        return {"kernel": take(f"{key}.weight").T, "bias": take(f"{key}.bias")}

    embedding = take("vocab_embed.embedding")  # [V + 1, D]
    width = embedding.shape[1]
    if width % num_heads or (width // num_heads) % 2:
        raise ValueError(f"--num_heads={num_heads} does not split width {width} in even heads")
    head_dim = width // num_heads
    depth = 0
    while f"blocks.{depth}.norm1.weight" in sd:
        depth += 1
    params: dict[str, Any] = {
        "embedding": embedding,
        "time_in": dense("sigma_map.mlp.0"),
        "time_out": dense("sigma_map.mlp.2"),
        "ln_final": {"scale": take("output_layer.norm_final.weight")},
        "logits": dense("output_layer.linear"),
        "adaln_final": dense("output_layer.adaLN_modulation"),
    }
    for i in range(depth):
        b = f"blocks.{i}"
        qkv = take(f"{b}.attn_qkv.weight")  # [3D, D]
        out = take(f"{b}.attn_out.weight")  # [D, D]
        params[f"block{i}"] = {
            "ln_attn": {"scale": take(f"{b}.norm1.weight")},
            "ln_mlp": {"scale": take(f"{b}.norm2.weight")},
            "qkv": {"kernel": qkv.T.reshape(width, 3, num_heads, head_dim)},
            "out": {"kernel": out.T.reshape(num_heads, head_dim, width)},
            "mlp_in": dense(f"{b}.mlp.0"),
            "mlp_out": dense(f"{b}.mlp.2"),
            "adaln": dense(f"{b}.adaLN_modulation"),
        }
    if "rotary_emb.inv_freq" in sd:
        used.add("rotary_emb.inv_freq")
        expected = 1.0 / 10000 ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        inv_freq = np.asarray(sd["rotary_emb.inv_freq"])
        if inv_freq.shape != expected.shape or not np.allclose(inv_freq, expected, rtol=1e-5):
            raise ValueError(
                f"rotary_emb.inv_freq does not match head_dim {head_dim}: check --num_heads"
            )
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(f"MDLM checkpoint has keys this converter does not know: {unknown[:8]}")
    mlp_ratio = params["block0"]["mlp_in"]["kernel"].shape[1] // width if depth else 4
    net_cfg = dict(
        vocab_size=embedding.shape[0] - 1, width=width, depth=depth, num_heads=num_heads,
        mlp_ratio=int(mlp_ratio), cond_dim=int(params["time_out"]["kernel"].shape[0]),
        layout="mdlm",
    )  # fmt: skip
    return {"params": params}, net_cfg


def convert(
    src: str,
    dst: str,
    num_heads: int | None = None,
    max_length: int | None = None,
    time_conditioning: bool | None = None,
    dropout: float = 0.0,
    attention: str = "auto",
    remat: bool = False,
) -> str:
    """Converts the MDLM checkpoint `src` into the teacher file `dst`; returns dst. The
    network config records `attention` ('auto': `jax.nn.dot_product_attention`, the fused
    kernel where available) and `remat`, which the students built from the file inherit."""
    hub = {}
    config_path = os.path.join(os.path.dirname(os.path.abspath(src)), "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            hub = json.load(f)
    num_heads = num_heads or int(hub.get("n_heads", 12))
    max_length = max_length or int(hub.get("model_length", 1024))
    if time_conditioning is None:
        time_conditioning = bool(hub.get("time_conditioning", False))
    params, net_cfg = mdlm_to_params(read_checkpoint(src), num_heads)
    net_cfg.update(
        max_length=max_length, time_conditioning=time_conditioning, dropout=dropout,
        attention=attention, remat=remat,
    )  # fmt: skip
    return save_model(
        dst, params, net_cfg, "dit",
        diffusion=dict(schedule="loglinear", eps=1e-3), source=os.path.abspath(src),
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="model.safetensors (or a torch file) of an MDLM DDiT")
    parser.add_argument("dst", help="the teacher file to write (teacher_params.msgpack)")
    parser.add_argument("--num_heads", type=int, default=None)
    parser.add_argument("--max_length", type=int, default=None)
    parser.add_argument("--time_conditioning", action="store_true", default=None)
    parser.add_argument("--attention", default="auto", help="einsum | xla | cudnn | auto")
    parser.add_argument("--remat", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = convert(
            args.src, args.dst, args.num_heads, args.max_length, args.time_conditioning,
            attention=args.attention, remat=args.remat,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["convert", "main", "mdlm_to_params"]
