"""One accelerator check for the FID tables' configs: speed, FLOP/s, memory and FID timing.

    python -m benchmarks.device_check [--tiny] [--steps=10] [--dtypes=float32,bfloat16]
        [--workloads=cifar10/f_distill,cifar10/sid,imagenet64/f_distill] [--fid_samples=1000]
        [--batch=cifar10/f_distill=256,...] [--json=out.json]

For each workload it builds the full-size config (`configs/cifar10_distill.py` f-distill and
SiD, `configs/imagenet64_distill.py` f-distill) around a *randomly initialised* teacher of the
real architecture (EDM's DDPM++ of edm-cifar10-32x32-cond-vp, 55.7M parameters; EDM's ADM of
edm-imagenet-64x64-cond-adm, 295.9M), on random data, and times the engine's guarded train step
(`benchmarks.run.measure_step`: compile, one warm-up, then `--steps` timed calls, median) in
float32 and bfloat16 compute (`config.model.compute_dtype`). It prints steps/s, generator
images/s, achieved FLOP/s (XLA's cost analysis / step time) against the best jitted matmul of
the same dtype measured in the same run (8192^2 on an accelerator), and the device's peak
memory. Then it times a 1,000-sample Inception FID of the CIFAR-10 generator (random FID
Inception weights, the real architecture; `didistill.eval.generator_fid`): the first call
(compile included) and a second one.

Batch: the configs' global batches (2048 for CIFAR-10 f-distill, 8192 for ImageNet SiD) are
for many devices; on one device the default batches are 128 (CIFAR-10) and 32 (ImageNet-64),
changed with `--batch=NAME=B,...`. Images/s counts generator samples per step (the batch);
the critic updates of a step also draw `critic_steps` batches of real and generated images.

`--tiny` swaps in small networks of the same architectures, batch 4, one critic update per
step, one timed step and an 8-sample FID with a small feature network, so that a test runs it
on CPU (`tests/test_device_check.py`: two workloads in bf16).
Targets one H100/H200 in under 8 minutes with the defaults (not measured yet: no accelerator
was available when this was written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import run as bench
from didistill.configs import cifar10_distill, imagenet64_distill
from didistill.data import images
from didistill.distill.one_step import images as one_step_images
from didistill.nets import convert_edm

WORKLOADS = {
    "cifar10/f_distill": (cifar10_distill, "f_distill", "edm-cifar10-cond", 128),
    "cifar10/sid": (cifar10_distill, "sid", "edm-cifar10-cond", 128),
    "imagenet64/f_distill": (imagenet64_distill, "f_distill", "edm-imagenet64-cond", 32),
}
TINY_NETS = {  # the same architectures, tiny widths
    "edm-cifar10-cond": dict(
        model_channels=16,
        channel_mult=[1],  # one level: deeper ones cost minutes of compile on a CPU
        channel_mult_emb=1,
        num_blocks=1,
        attn_resolutions=[32],
        dropout=0.0,
        label_dim=10,
        img_resolution=32,
        img_channels=3,
        arch="unet",
    ),
    "edm-imagenet64-cond": dict(
        model_channels=16,
        channel_mult=[1],
        channel_mult_emb=1,
        num_blocks=1,
        attn_resolutions=[],
        channels_per_head=8,
        dropout=0.0,
        label_dim=1000,
        img_resolution=64,
        img_channels=3,
        arch="adm",
    ),
}


def random_teacher(preset: str, tiny: bool):
    """(net, random variables, image shape) of a preset's architecture (jitted init)."""
    cfg = TINY_NETS[preset] if tiny else convert_edm.PRESETS[preset]
    net, shape = convert_edm.unet_from_config(cfg)
    labels = jnp.zeros((1,), jnp.int32) if net.label_dim else None
    init = jax.jit(lambda k: net.init(k, jnp.zeros((1, *shape)), jnp.ones((1,)), labels))
    return net, init(jax.random.key(0)), shape, cfg


def _random_data(shape, num_classes: int, rows: int):
    rng = np.random.default_rng(0)
    return {
        "image": rng.uniform(-1, 1, (rows, *shape)).astype(np.float32),
        "label": rng.integers(0, max(num_classes, 1), rows).astype(np.int32),
    }


def workload_config(name: str, batch: int, dtype: str, tiny: bool):
    module, method, _, _ = WORKLOADS[name]
    config = module.get_config(method)
    config.train.batch_size = batch
    config.train.log_every = 1
    config.model.compute_dtype = dtype
    config.eval.fid.inception = ""  # the FID is timed on its own
    if tiny:  # CPU-sized: one critic update per step (compile time)
        config.discriminator.width = 8
        config.discriminator.resolutions = (32 if name.startswith("cifar10") else 64,)
        config.distill.critic_steps = 1
    return config


def measure(name: str, batch: int, dtype: str, steps: int, tiny: bool, teacher) -> dict:
    net, variables, shape, _ = teacher
    config = workload_config(name, batch, dtype, tiny)
    k = max(config.distill.critic_steps, 1)
    data = _random_data(shape, int(net.label_dim), batch * k)
    loader = lambda path: (net, variables, shape)  # noqa: E731
    with (
        mock.patch.object(one_step_images, "load_teacher_unet", loader),
        mock.patch.object(images, "load_arrays", lambda cfg, split="train": data),
    ):
        row = bench.measure_step(config, steps)
    row.update(workload=name, dtype=dtype, batch=batch, critic_steps=config.distill.critic_steps)
    row["steps_per_s"] = 1.0 / row["step_s"]
    row["images_per_s"] = batch / row["step_s"]
    row["flops_per_s"] = row["flops"] / row["step_s"]
    return row


def fid_timing(teacher, num_samples: int, tiny: bool, tmpdir: str) -> dict:
    """Wall time of an N-sample FID of the teacher-initialised generator (first and second)."""
    from didistill.distill.one_step.image_generator import ImageGenerator
    from didistill.eval import fid, generator_fid
    from didistill.nets import inception

    net, variables, shape, cfg = teacher
    generator = ImageGenerator(net, 2.5, tuple(shape), dict(cfg))
    if tiny:  # a small MLP feature network (the same interface as the Inception file)
        from didistill.nets.classifier import make_classifier
        from didistill.nets.files import save_model

        width = 6
        net_cfg = dict(kind="mlp", widths=[width], num_classes=3)
        params = make_classifier(net_cfg).init(jax.random.key(0), jnp.zeros((1, *shape)))
        features = save_model(
            os.path.join(tmpdir, "features.msgpack"), params, net_cfg, "classifier"
        )
    else:
        features = os.path.join(tmpdir, "inception.npz")
        inception.save_inception_params(features, inception.random_inception_variables(0))
        width = inception.FEATURE_DIM
    rng = np.random.default_rng(0)
    a = rng.standard_normal((width, width)) / np.sqrt(width)
    reference = os.path.join(tmpdir, f"ref-{shape[0]}x{shape[0]}.npz")
    fid.save_stats(reference, rng.standard_normal(width), a @ a.T)
    batch = min(250, num_samples)
    batch -= batch % jax.device_count()
    settings = generator_fid.FIDSettings(features, reference, num_samples, 1, batch)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = generator_fid.evaluate_fid(generator, variables, settings, shape, int(net.label_dim))
        times.append(time.perf_counter() - start)
    return {
        "num_samples": num_samples,
        "feature_network": "classifier (tiny)" if tiny else "Inception-v3 (random weights)",
        "first_s": times[0],
        "second_s": times[1],
        "samples_per_s": num_samples / times[1],
        "fid_finite": bool(np.isfinite(out["fid"])),
    }


def parse_batches(text: str | None, tiny: bool) -> dict[str, int]:
    batches = {name: (4 if tiny else spec[3]) for name, spec in WORKLOADS.items()}
    for item in (text or "").split(","):
        if item.strip():
            name, _, value = item.partition("=")
            if name not in WORKLOADS or not value.isdigit():
                raise SystemExit(f"--batch: {item!r} is not NAME=B with NAME in {list(WORKLOADS)}")
            batches[name] = int(value)
    return batches


def print_report(result: dict) -> None:
    env = result["environment"]
    print(f"device: {env['device']} x{env['device_count']}, jax {env['jax']}")
    peaks = result["matmul_peak"]
    for dtype, peak in peaks.items():
        print(f"matmul peak {dtype} ({peak['n']}^2): {bench._si(peak['flops_per_s'], 'FLOP/s')}")
    head = "workload | dtype | batch | steps/s | images/s | FLOP/s | % peak | peak mem | compile s"
    print(head)
    for row in result["steps"]:
        peak = peaks[row["dtype"]]["flops_per_s"]
        mem = row["device_peak_bytes"]
        print(
            f"{row['workload']} | {row['dtype']} | {row['batch']} | {row['steps_per_s']:.3g} | "
            f"{row['images_per_s']:.4g} | {bench._si(row['flops_per_s'], 'FLOP/s')} | "
            f"{100 * row['flops_per_s'] / peak:.0f} | "
            f"{'n/a' if mem is None else bench._mib(mem)} | {row['compile_s']:.0f}"
        )
    f = result["fid"]
    print(
        f"FID of {f['num_samples']} samples ({f['feature_network']}): {f['first_s']:.1f} s "
        f"first (compile included), {f['second_s']:.1f} s second, "
        f"{f['samples_per_s']:.0f} samples/s"
    )
    print(f"total wall time: {result['wall_s']:.0f} s")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small networks, CPU-sized")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; tiny 1)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--batch", default=None, help="NAME=B,... per-workload batch")
    parser.add_argument("--fid_samples", type=int, default=None, help="1000 (tiny: 8)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tiny = args.tiny
    steps = args.steps or (1 if tiny else 10)
    dtypes = [d for d in args.dtypes.split(",") if d]
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; known: {list(WORKLOADS)}")
    batches = parse_batches(args.batch, tiny)
    n = 256 if tiny else 8192
    peaks = {d: bench.matmul_peak(n, 3 if tiny else 10, jnp.dtype(d)) for d in dtypes}
    teachers, rows = {}, []
    for name in names:
        preset = WORKLOADS[name][2]
        if preset not in teachers:
            teachers[preset] = random_teacher(preset, tiny)
        for dtype in dtypes:
            row = measure(name, batches[name], dtype, steps, tiny, teachers[preset])
            rows.append(row)
            print(f"{name} {dtype}: {row['steps_per_s']:.3g} steps/s", flush=True)
    cifar = teachers.get("edm-cifar10-cond") or random_teacher("edm-cifar10-cond", tiny)
    with tempfile.TemporaryDirectory() as tmpdir:
        fid_row = fid_timing(cifar, args.fid_samples or (8 if tiny else 1000), tiny, tmpdir)
    result = {
        "environment": {
            "device": str(jax.devices()[0].device_kind),
            "device_count": jax.device_count(),
            "jax": jax.__version__,
            "tiny": tiny,
            **bench._commit(),
        },
        "matmul_peak": peaks,
        "steps": rows,
        "fid": fid_row,
        "wall_s": time.perf_counter() - start,
    }
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
