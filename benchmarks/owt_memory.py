"""Per-device memory of the OpenWebText MDLM teacher's training step (docs/scale.md).

    PYTHONPATH=. python benchmarks/owt_memory.py [--batches=1,2] [--variants=plain] [--json=F]

Computed, not measured on an accelerator: the real `owt_mdlm` step (`get_method(config).step`,
the GPT-2 tokenizer replaced by its vocabulary size as in `benchmarks/memory_table.py`) is
lowered and compiled by XLA for ONE device at a per-device batch of b sequences of L = 1024,
and `compiled.memory_analysis()` gives its temporary buffers (activations, gradients, optimizer
temporaries). Temporaries grow linearly in b, so two compiles (b = 1, 2) give
temp(b) = t0 + t1 b, extrapolated to the b that the global batch 512 leaves each of 8 devices
(64), or to 64 / k with k-step gradient accumulation (`config.train.grad_accum_steps`, which
adds one float32 gradient accumulator). The state (params, AdamW moments, EMA, float32) is
added once, replicated or split 8 ways under FSDP. Caveats: XLA:CPU's buffer assignment and
fusion are not XLA:GPU's (bfloat16 compute may be kept in float32 on CPU), and the fused
cuDNN attention cannot be compiled on CPU, so the rows are for the 'xla' attention (the
[B, H, L, L] scores materialised); collective buffers of data parallelism are not counted.
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from didistill.configs import owt_mdlm
from didistill.distill import get_method

GPT2_VOCAB = 50_257
VARIANTS = {"plain": dict(attention="xla", remat=False), "remat": dict(attention="xla", remat=True)}


def compile_step(per_device_batch: int, accum: int = 1, **net):
    """(state bytes, params bytes, memory_analysis dict, compile seconds) of the owt_mdlm step
    at `per_device_batch` rows on one device, in `accum` micro-batches."""
    config = owt_mdlm.get_config()
    config.net.update(**net)
    config.train.batch_size = per_device_batch
    config.train.grad_accum_steps = accum
    tokenizer = mock.Mock(vocab_size=GPT2_VOCAB)
    with mock.patch("didistill.data.text.get_tokenizer", return_value=tokenizer):
        method = get_method(config)
    state = jax.eval_shape(method.init, jax.random.key(0))
    batch = {"tokens": jax.ShapeDtypeStruct((per_device_batch, config.data.length), jnp.int32)}
    key = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    compiled = jax.jit(method.step).lower(state, batch, key, jnp.int32(0)).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")  # fmt: skip
    analysis = {f: int(getattr(mem, f, 0) or 0) for f in fields}
    state_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                      for x in jax.tree.leaves(state))  # fmt: skip
    params_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(state.params))
    return state_bytes, params_bytes, analysis, seconds


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--variants", default="plain")
    parser.add_argument("--global_batch", type=int, default=512)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--json", default="")
    parser.add_argument(
        "--check_accum",
        type=int,
        default=2,
        help="also compile b = 2k in k "
        "micro-batches of 2 (0: skip), to check the accumulation estimate",
    )
    args = parser.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    per_device = args.global_batch // args.devices
    records, rows = [], []
    for name in args.variants.split(","):
        temps = []
        for b in sizes:
            state_bytes, params_bytes, analysis, seconds = compile_step(b, **VARIANTS[name])
            temps.append(analysis["temp_size_in_bytes"])
            records.append(dict(variant=name, per_device_batch=b, compile_s=seconds, **analysis))
            print(f"{name} b={b}: temp {gib(temps[-1])} GiB, compile {seconds:.0f} s", flush=True)
        slope, intercept = np.polyfit(sizes, temps, 1) if len(sizes) > 1 else (temps[0], 0.0)
        for k in (1, 2, 4, 8):
            if per_device % k:
                continue
            micro = per_device // k
            temp = intercept + slope * micro + (params_bytes if k > 1 else 0)
            rows.append((name, k, micro, temp, state_bytes, state_bytes / args.devices))
    if args.check_accum > 1:  # the estimate's accumulation term, compiled once
        k = args.check_accum
        _, params_bytes, analysis, seconds = compile_step(2 * k, k, **VARIANTS["plain"])
        records.append(dict(variant="plain", per_device_batch=2 * k, accum=k, compile_s=seconds,
                            **analysis))  # fmt: skip
        print(f"plain b={2 * k} in {k} micro-batches of 2: temp "
              f"{gib(analysis['temp_size_in_bytes'])} GiB (params f32 {gib(params_bytes)} GiB), "
              f"compile {seconds:.0f} s", flush=True)  # fmt: skip
    print(
        f"\n| variant | grad accum k | rows per device per micro-step | temporaries GiB | "
        f"per device, replicated state GiB | per device, FSDP x{args.devices} GiB |"
    )
    print("|---|---|---|---|---|---|")
    for name, k, micro, temp, state_b, fsdp_b in rows:
        print(
            f"| {name} | {k} | {micro} | {gib(temp)} | {gib(temp + state_b)} | "
            f"{gib(temp + fsdp_b)} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(records=records, jax=jax.__version__), f, indent=1)


if __name__ == "__main__":
    main()
