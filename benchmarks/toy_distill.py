"""Speed of one-step distillation on the toy: training-step throughput per method, and the
sampling speed-up of the one-step student over the teacher's 35-NFE Heun sampler at equal batch.

    python benchmarks/toy_distill.py [--batch=256] [--repeats=20] [--json=out.json]

All figures come from one run on one machine, so the ratios are comparable; absolute numbers
depend on the device. Timings exclude compilation (one warm-up call) and block on results.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from didistill.configs import toy2d
from didistill.diffusion import edm
from didistill.distill import get_method
from didistill.distill.one_step import toy as one_step_toy

METHODS = ("dmd2", "forward_kl", "jensen_shannon", "sid", "uni_instruct,forward_kl")


def _seconds_per_call(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def bench_steps(batch, repeats):
    rows = {}
    for arg in METHODS:
        config = toy2d.get_config(arg)
        config.train.batch_size = batch
        method = get_method(config)
        state = method.init(jax.random.key(0))
        data = next(method.batches(0))
        step = jax.jit(method.step)
        key, index = jax.random.key(1), jnp.int32(0)
        seconds = _seconds_per_call(
            lambda s, b, k, i, f=step: f(s, b, k, i)[0], state, data, key, index, repeats=repeats
        )
        rows[arg] = {"steps_per_s": 1.0 / seconds, "critic_steps": config.distill.critic_steps}
    return rows


def bench_sampling(batch, repeats):
    config = toy2d.get_config("jensen_shannon")
    parts = one_step_toy.build(config)
    generator, _, _ = parts.init_params(jax.random.key(0))
    student = jax.jit(lambda key: parts.generate(generator, key, batch))
    steps = edm.heun_steps_for_nfe(config.eval.teacher_nfe)
    teacher = jax.jit(
        lambda key: edm.heun_sample(
            parts.teacher_denoise, jax.random.normal(key, (batch, 2)), steps
        )
    )
    key = jax.random.key(2)
    t_student = _seconds_per_call(student, key, repeats=repeats)
    t_teacher = _seconds_per_call(teacher, key, repeats=repeats)
    return {
        "batch": batch,
        "student_samples_per_s": batch / t_student,
        "teacher_samples_per_s": batch / t_teacher,
        "teacher_nfe": config.eval.teacher_nfe,
        "speedup": t_teacher / t_student,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s)")
    steps = bench_steps(args.batch, args.repeats)
    print(f"\n| method (batch {args.batch}) | critic updates / step | steps/s |\n|---|---|---|")
    for arg, row in steps.items():
        print(f"| {arg} | {row['critic_steps']} | {row['steps_per_s']:.1f} |")
    sampling = bench_sampling(args.batch, args.repeats)
    print(f"\n| sampler (batch {args.batch}) | NFE | samples/s |\n|---|---|---|")
    print(
        f"| teacher, Heun | {sampling['teacher_nfe']} | {sampling['teacher_samples_per_s']:.0f} |"
    )
    print(f"| one-step student | 1 | {sampling['student_samples_per_s']:.0f} |")
    print(f"\nstudent speed-up over the teacher at equal batch: {sampling['speedup']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "steps": steps, "sampling": sampling}, f, indent=2)


if __name__ == "__main__":
    main()
