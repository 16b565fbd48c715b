"""All benchmarks in one run: step throughput, achieved FLOP/s, sampling speed-ups, memory and
data-parallel scaling of every method, printed side by side.

    python -m benchmarks.run [--quick] [--only=throughput,flops,sampling,memory,scaling]
                             [--json=out.json] [--repeats=N] [--scaling_devices=1,2,4,8]

Sections (`--only` takes their names or the letters a-e):
  a throughput  engine training steps (the guarded `make_train_step` around `method.step`, jitted
                with the state donated and replicated outputs under the 'data' mesh, as
                `didistill.train.loop` does) in examples/s: points (toy), images (digits),
                tokens (text: batch x length). One-step methods: one step = critic updates +
                one generator update, so critic work is included.
  b flops       XLA's cost analysis of each compiled step ('flops') / median step time, against
                the best time of a large jitted f32 matmul on the same device in the same run.
                XLA counts a loop body once (scans: critic updates, samplers), so for steps with
                loops the figure is a lower bound.
  c sampling    student vs teacher sampling at equal batch: toy and digits (Heun at 35 NFE vs
                the one-step generator), text (MDLM ancestral sampler at many vs few steps,
                with the NFE actually used).
  d memory      `compiled.memory_analysis()` argument/output/temp bytes of each step, plus the
                device's `memory_stats()` peak where the backend has it (GPU, TPU; not CPU).
  e scaling     throughput with 1, 2, 4, 8 devices at a fixed global batch: one subprocess per
                count with XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU. Simulated
                devices share the same cores, so this measures sharding overhead, not speed-up.

Timing: compile and one warm-up call first, then `--repeats` calls, each blocked with
`jax.block_until_ready`; the median is reported. Data loading is excluded (one batch is reused).
`--quick` uses the configs' smoke sizes and few repeats (about a minute on 2 CPU cores). All
figures of one run come from one machine, so ratios within a run are comparable; absolute
numbers depend on the device and its load. `--json` also records the jax version, the device
and the git commit, so that runs can be compared across commits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from didistill import (
    assets,
    xla_cpu,  # before the first computation: sets the XLA:CPU flags
)

SECTIONS = ("throughput", "flops", "sampling", "memory", "scaling")
LETTERS = dict(zip("abcde", SECTIONS, strict=True))
TOY_METHODS = ("dmd2", "forward_kl", "sid", "uni_instruct,forward_kl")
DIGITS_METHODS = ("dmd2", "forward_kl", "sid", "uni_instruct,forward_kl")
GROUPS = ("toy", "digits", "text")
DIGITS_TEACHER = assets.path("digits/teacher.msgpack")
SCALING_WORKLOADS = ("toy/dmd2", "text/mdlm_teacher")
QUICK_WORKLOADS = ("toy/dmd2", "digits/dmd2", "digits/edm_teacher", "text")
TEXT_STEPS = (8, 16, 32, 64, 1024)  # sampler step counts of the text sampling figures
WORKER_MARK = "BENCHMARK_WORKER_JSON "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- timing helpers


def median_seconds(fn, *args, repeats: int) -> float:
    """Median wall time of `fn(*args)` over `repeats` blocked calls, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(n: int, repeats: int, dtype=jnp.float32) -> dict:
    """Best FLOP/s of a jitted [n, n] @ [n, n] matmul in `dtype` (default precision)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return {
        "n": n,
        "dtype": jnp.dtype(dtype).name,
        "best_s": best,
        "flops_per_s": 2.0 * n**3 / best,
    }


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def _memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    names = ("argument", "output", "alias", "temp", "generated_code")
    return {f"{n}_bytes": int(getattr(stats, f"{n}_size_in_bytes", 0)) for n in names}


def device_peak_bytes() -> int | None:
    """The device's peak bytes in use so far (process-wide), or None (CPU has no stats)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# --------------------------------------------------------------------------- workloads


def _digits_teacher_path(quick: bool, tmpdir: str) -> tuple[str, str]:
    """(U-Net teacher file, how it was made): the shipped asset, or a random-weight U-Net of
    `configs/digits_teacher.py` (its smoke network with --quick) saved as a network file."""
    if not quick and os.path.isfile(DIGITS_TEACHER):
        return DIGITS_TEACHER, f"trained ({DIGITS_TEACHER})"
    from didistill.configs import digits_teacher
    from didistill.nets.convert_edm import unet_from_config
    from didistill.nets.files import json_config, save_model

    net_cfg = json_config(digits_teacher.get_config("smoke" if quick else None).net)
    net, shape = unet_from_config(net_cfg)
    labels = jnp.zeros((1,), jnp.int32) if net.label_dim else None
    variables = jax.jit(lambda k: net.init(k, jnp.zeros((1, *shape)), jnp.ones((1,)), labels))(
        jax.random.key(0)
    )
    path = save_model(os.path.join(tmpdir, "digits_teacher.msgpack"), variables, net_cfg, "unet")
    size = "smoke-sized" if quick else "digits_teacher.py-sized"
    why = "--quick" if quick else f"{DIGITS_TEACHER} missing"
    return path, f"random init, {size} U-Net ({why})"


def _mdlm_teacher_path(quick: bool, tmpdir: str) -> str:
    """A randomly initialised MDLM teacher (synthetic_mdlm config) saved for DiDi-Instruct."""
    from didistill.configs import synthetic_mdlm
    from didistill.data import text
    from didistill.distill.teachers import mdlm as mdlm_teacher
    from didistill.nets.files import save_model

    config = synthetic_mdlm.get_config("markov,smoke" if quick else "markov")
    method = mdlm_teacher.make_method(config)
    params = jax.jit(method.init)(jax.random.key(0)).ema_params
    vocab = text.get_language(config.data.language).vocab_size
    net_cfg = dict(config.net, vocab_size=vocab, max_length=config.data.length)
    path = os.path.join(tmpdir, "mdlm_teacher.msgpack")
    return save_model(
        path, params, net_cfg, "dit", data=dict(config.data), diffusion=dict(config.diffusion)
    )


def selected(name: str, patterns) -> bool:
    """Whether workload `name` ('toy/dmd2') matches one of `patterns` (prefixes; None: all)."""
    return patterns is None or any(
        name == p or name.startswith(p.rstrip("/") + "/") for p in patterns
    )


def workloads(quick: bool, tmpdir: str, patterns=None) -> list[dict]:
    """[{'name', 'group', 'config', 'unit', 'examples_per_step', 'note'}] of the selected steps."""
    from didistill.configs import (
        digits_distill,
        digits_teacher,
        synthetic_didi,
        synthetic_mdlm,
        toy2d,
    )

    smoke = ",smoke" if quick else ""
    out = []
    want = lambda name: selected(name, patterns)  # noqa: E731
    if any(want(f"toy/{arg}") for arg in TOY_METHODS):
        for arg in filter(lambda a: want(f"toy/{a}"), TOY_METHODS):
            config = toy2d.get_config(arg + smoke)
            out.append(dict(name=f"toy/{arg}", group="toy", config=config, unit="points"))
    if any(want(f"digits/{arg}") for arg in DIGITS_METHODS):
        path, how = _digits_teacher_path(quick, tmpdir)
        for arg in filter(lambda a: want(f"digits/{a}"), DIGITS_METHODS):
            config = digits_distill.get_config(arg + smoke)
            config.teacher.checkpoint = path
            if quick:
                config.discriminator.resolutions = (8,)  # the smoke U-Net has one level
            out.append(
                dict(name=f"digits/{arg}", group="digits", config=config, unit="images", note=how)
            )
    if want("digits/edm_teacher"):
        config = digits_teacher.get_config("smoke" if quick else None)
        out.append(dict(name="digits/edm_teacher", group="digits", config=config, unit="images"))
    if want("text/mdlm_teacher"):
        config = synthetic_mdlm.get_config("markov" + smoke)
        out.append(dict(name="text/mdlm_teacher", group="text", config=config, unit="tokens"))
    if want("text/didi_instruct"):
        config = synthetic_didi.get_config("markov" + smoke)
        config.teacher.checkpoint = _mdlm_teacher_path(quick, tmpdir)
        out.append(
            dict(
                name="text/didi_instruct",
                group="text",
                config=config,
                unit="tokens",
                note="random-init MDLM teacher (timing only)",
            )
        )
    for w in out:
        c = w["config"]
        tokens = c.data.length if w["group"] == "text" else 1
        w["examples_per_step"] = c.train.batch_size * tokens
        w["batch"] = c.train.batch_size
        w["critic_steps"] = c.distill.critic_steps if "distill" in c else None
        w.setdefault("note", "")
    return out


def measure_step(config, repeats: int) -> dict:
    """Compiles and times the engine's guarded, sharded train step for `config`."""
    from didistill.distill import get_method
    from didistill.train import sharding
    from didistill.train.loop import run_keys
    from didistill.train.state import init_state, init_window, make_train_step

    method = get_method(config)
    mesh = sharding.make_mesh(config.mesh.data)
    with jax.set_mesh(mesh):
        replicated = sharding.replicated(mesh)
        local_rows = sharding.check_batch(method.global_batch_size, mesh)
        state = sharding.replicate(
            lambda: init_state(method.init(run_keys(config.seed)[1])), replicated
        )
        run_key = sharding.replicate(lambda: run_keys(config.seed)[0], replicated)
        local = next(iter(method.batches(0)))
        batch = sharding.global_batch(local, sharding.batch_sharding(mesh), local_rows)
        _, metrics = jax.eval_shape(method.step, state.method_state, batch, run_key, state.step)
        window = sharding.replicate(lambda: init_window(sorted(metrics)), replicated)
        jitted = jax.jit(
            make_train_step(method.step, config.train.log_every),
            donate_argnums=(0, 1),
            out_shardings=replicated,
        )
        start = time.perf_counter()
        compiled = jitted.lower(state, window, batch, run_key).compile()
        compile_s = time.perf_counter() - start
        state, window, report = compiled(state, window, batch, run_key)  # warm-up
        jax.block_until_ready((state, report))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            state, window, report = compiled(state, window, batch, run_key)
            jax.block_until_ready((state, report))
            times.append(time.perf_counter() - start)
        finite = int(jax.device_get(state.nonfinite_total)) == 0
    return {
        "step_s": statistics.median(times),
        "compile_s": compile_s,
        "flops": _flops(compiled),
        "has_loops": " while(" in compiled.as_text(),
        "memory": _memory(compiled),
        "device_peak_bytes": device_peak_bytes(),
        "devices": jax.device_count(),
        "all_steps_finite": finite,
    }


def bench_steps(quick: bool, repeats: int, tmpdir: str, log, patterns=None) -> dict:
    rows = {}
    for w in workloads(quick, tmpdir, patterns):
        log(f"  step: {w['name']} ...")
        m = measure_step(w["config"], repeats)
        rows[w["name"]] = {
            "unit": w["unit"],
            "batch": w["batch"],
            "examples_per_step": w["examples_per_step"],
            "critic_steps": w["critic_steps"],
            "examples_per_s": w["examples_per_step"] / m["step_s"],
            "steps_per_s": 1.0 / m["step_s"],
            "flops_per_s": m["flops"] / m["step_s"],
            "note": w["note"],
            **m,
        }
        log(f"    {rows[w['name']]['steps_per_s']:.3g} steps/s, compile {m['compile_s']:.1f} s")
    return rows


# --------------------------------------------------------------------------- sampling


def _sampling_row(t_teacher, t_student, batch, nfe_teacher, nfe_student, unit_per_sample=1):
    return {
        "batch": batch,
        "teacher_nfe": int(nfe_teacher),
        "student_nfe": int(nfe_student),
        "teacher_s": t_teacher,
        "student_s": t_student,
        "teacher_per_s": batch * unit_per_sample / t_teacher,
        "student_per_s": batch * unit_per_sample / t_student,
        "speedup": t_teacher / t_student,
    }


def bench_sampling(quick: bool, repeats: int, tmpdir: str, log, domains=GROUPS) -> dict:
    out = {}
    key = jax.random.key(2)
    log(f"  sampling: {', '.join(d for d in GROUPS if d in domains)} ...")

    if "toy" in domains:
        out["toy"] = _sample_toy(quick, repeats, key)
    if "digits" in domains:
        out["digits"] = _sample_digits(quick, repeats, key, tmpdir)
    if "text" in domains:
        out["text"] = _sample_text(quick, repeats, key, tmpdir)
    return out


def _sample_toy(quick, repeats, key):
    from didistill.configs import toy2d
    from didistill.diffusion import edm
    from didistill.distill.one_step import toy as one_step_toy

    config = toy2d.get_config("forward_kl")
    parts = one_step_toy.build(config)
    generator, _, _ = parts.init_params(jax.random.key(0))
    batch = 64 if quick else config.train.batch_size
    nfe = 5 if quick else config.eval.teacher_nfe
    student = jax.jit(lambda k: parts.generate(generator, k, batch))
    steps = edm.heun_steps_for_nfe(nfe)
    teacher = jax.jit(
        lambda k: edm.heun_sample(parts.teacher_denoise, jax.random.normal(k, (batch, 2)), steps)
    )
    return _sampling_row(
        median_seconds(teacher, key, repeats=repeats),
        median_seconds(student, key, repeats=repeats),
        batch,
        edm.heun_nfe(steps),
        1,
    )


def _sample_digits(quick, repeats, key, tmpdir):
    from didistill.configs import digits_distill
    from didistill.diffusion import edm
    from didistill.distill.one_step import images as one_step_images

    config = digits_distill.get_config("dmd2" + (",smoke" if quick else ""))
    config.teacher.checkpoint, how = _digits_teacher_path(quick, tmpdir)
    parts = one_step_images.build(config)
    generator, _, _ = parts.init_params(jax.random.key(0))
    batch = config.eval.batch_size
    steps = edm.heun_steps_for_nfe(5 if quick else config.eval.teacher_nfe)

    def teacher_images(k):
        x0, labels = parts.generate(generator, k, batch)  # only for the labels (and shape)
        z = jax.random.normal(jax.random.fold_in(k, 1), x0.shape)
        return edm.heun_sample(lambda x, s: parts.teacher_denoise(x, s, labels), z, steps)

    teacher = jax.jit(teacher_images)
    student = jax.jit(lambda k: parts.generate(generator, k, batch)[0])
    row = _sampling_row(
        median_seconds(teacher, key, repeats=repeats),
        median_seconds(student, key, repeats=repeats),
        batch,
        edm.heun_nfe(steps),
        1,
    )
    return dict(row, teacher_source=how)


def _sample_text(quick, repeats, key, tmpdir):
    """MDLM ancestral sampling (cached) of one batch at many vs few steps, and tokens/s at each
    of `TEXT_STEPS`. Default: the shipped CPU teacher (`assets/text`), whose perplexity at each
    step count is in experiments/ppl_table.py's table, so the two read together give the speed
    at equal quality; --quick: a random smoke-sized teacher. A few-step student has the
    teacher's architecture, so its cost at N steps is the teacher's at N steps."""
    from didistill.configs import synthetic_didi
    from didistill.diffusion import masked
    from didistill.distill.teachers import mdlm as mdlm_teacher

    shipped = os.path.join(REPO, synthetic_didi.SHIPPED_TEACHER)
    path = _mdlm_teacher_path(quick, tmpdir) if quick else shipped
    net, params, meta = mdlm_teacher.load_teacher_denoiser(path)
    schedule = masked.get_schedule(meta["diffusion"]["schedule"], meta["diffusion"]["eps"])
    length, mask_id, batch = int(meta["data"]["length"]), net.vocab_size, 256
    all_steps = (4, 16) if quick else TEXT_STEPS
    fn = mdlm_teacher.logits_fn_of(net, params)
    x = masked.all_masked(batch, length, mask_id)
    by_steps = {}
    for n in all_steps:
        sampler = jax.jit(lambda k, n=n: masked.ancestral_sample(fn, k, x, schedule, n))
        seconds = median_seconds(sampler, key, repeats=repeats)
        by_steps[n] = {
            "nfe": int(sampler(key)[1]),
            "s": seconds,
            "tokens_per_s": batch * length / seconds,
        }
    many, few = max(all_steps), min(all_steps)
    row = _sampling_row(
        by_steps[many]["s"], by_steps[few]["s"], batch, by_steps[many]["nfe"],
        by_steps[few]["nfe"], unit_per_sample=length,
    )  # fmt: skip
    teacher = "random smoke-sized" if quick else synthetic_didi.SHIPPED_TEACHER
    return dict(row, teacher_steps=many, student_steps=few, length=length, teacher=teacher,
                by_steps=by_steps)  # fmt: skip


# --------------------------------------------------------------------------- scaling


def scaling_worker(quick: bool, repeats: int, patterns=None) -> dict:
    """Run inside a subprocess: the scaling workloads' throughput on this process's devices."""
    with tempfile.TemporaryDirectory() as tmpdir:
        rows = {}
        for w in workloads(quick, tmpdir, SCALING_WORKLOADS):
            if selected(w["name"], patterns):
                m = measure_step(w["config"], repeats)
                rows[w["name"]] = {
                    "unit": w["unit"],
                    "batch": w["batch"],
                    "examples_per_s": w["examples_per_step"] / m["step_s"],
                    "step_s": m["step_s"],
                    "devices": m["devices"],
                }
    return rows


def bench_scaling(quick: bool, repeats: int, counts, log, patterns=None) -> dict:
    results = {}
    for n in counts:
        log(f"  scaling: {n} simulated CPU device(s) ...")
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        cmd = [sys.executable, "-m", "benchmarks.run", "--scaling_worker", f"--repeats={repeats}"]
        cmd += ["--quick"] if quick else []
        cmd += [f"--workloads={','.join(patterns)}"] if patterns else []
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(WORKER_MARK)]
        if proc.returncode or not lines:
            raise RuntimeError(f"scaling worker with {n} devices failed:\n{proc.stderr[-3000:]}")
        for name, row in json.loads(lines[-1][len(WORKER_MARK) :]).items():
            results.setdefault(name, {"unit": row["unit"], "batch": row["batch"], "by_devices": {}})
            results[name]["by_devices"][str(n)] = row
    for row in results.values():
        by = row["by_devices"]
        base = by.get("1", next(iter(by.values())))["examples_per_s"]
        for n, r in by.items():
            r["relative_to_1"] = r["examples_per_s"] / base
            r["per_device_efficiency"] = r["relative_to_1"] / int(n)
    return {
        "simulated_cpu_devices": True,
        "global_batch_fixed": True,
        "note": "simulated CPU devices share the same cores: this measures sharding overhead, "
        "not speed-up (ideal here is relative_to_1 = 1)",
        "workloads": results,
    }


# --------------------------------------------------------------------------- report


def _commit() -> dict:
    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def environment(quick: bool, repeats: int) -> dict:
    device = jax.devices()[0]
    import jaxlib

    return {
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "quick": quick,
        "repeats": repeats,
        "argv": sys.argv[1:],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **_commit(),
    }


def _si(x: float, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def print_report(results: dict, sections) -> None:
    env = results["environment"]
    print(
        f"\njax {env['jax_version']} | {env['platform']} ({env['device_kind']}) x "
        f"{env['device_count']} | commit {str(env['commit'])[:10]}"
        f"{'+dirty' if env['dirty'] else ''}"
        f" | {'quick' if env['quick'] else 'default'} sizes, median of {env['repeats']}"
    )
    steps = results.get("steps", {})
    if "throughput" in sections and steps:
        print("\n(a) training-step throughput (engine step: critic updates + generator update)")
        print("| step | batch | critic/step | steps/s | examples/s | compile s | note |")
        print("|---|---|---|---|---|---|---|")
        for name, r in steps.items():
            critic = "" if r["critic_steps"] is None else r["critic_steps"]
            print(
                f"| {name} | {r['batch']} | {critic} | {r['steps_per_s']:.3g} | "
                f"{_si(r['examples_per_s'], r['unit'])}/s | {r['compile_s']:.1f} | {r['note']} |"
            )
    if "flops" in sections and steps:
        peak = results["peak"]
        print(
            f"\n(b) achieved FLOP/s (XLA cost analysis / step time); matmul peak "
            f"{_si(peak['flops_per_s'], 'FLOP/s')} ({peak['n']}x{peak['n']} f32, best of "
            f"{env['repeats']}). '*' = step has loops, counted once by XLA: a lower bound."
        )
        print("| step | GFLOP/step | achieved FLOP/s | % of matmul peak |\n|---|---|---|---|")
        for name, r in steps.items():
            mark = "*" if r["has_loops"] else ""
            print(
                f"| {name}{mark} | {r['flops'] / 1e9:.3g} | {_si(r['flops_per_s'], 'FLOP/s')} | "
                f"{100 * r['flops_per_s'] / peak['flops_per_s']:.2f} |"
            )
    if "sampling" in sections and "sampling" in results:
        print("\n(c) sampling at equal batch: teacher vs student")
        print("| domain | batch | teacher NFE | student NFE | teacher /s | student /s | speed-up |")
        print("|---|---|---|---|---|---|---|")
        units = {"toy": "samples", "digits": "images", "text": "tokens"}
        for name, r in results["sampling"].items():
            print(
                f"| {name} | {r['batch']} | {r['teacher_nfe']} | {r['student_nfe']} | "
                f"{_si(r['teacher_per_s'], units[name])} | {_si(r['student_per_s'], units[name])} "
                f"| {r['speedup']:.1f}x |"
            )
        text = results["sampling"].get("text")
        if text:
            print(
                f"text: MDLM ancestral sampler (cached) of the {text['teacher']} teacher at "
                f"{text['teacher_steps']} vs {text['student_steps']} steps, length "
                f"{text['length']}; the few-step student has the teacher's architecture, so "
                "its cost per step is the teacher's. Tokens/s by sampler steps:"
            )
            print("| steps | NFE | tokens/s |\n|---|---|---|")
            for n, r in text["by_steps"].items():
                print(f"| {n} | {r['nfe']} | {_si(r['tokens_per_s'], 'tokens')}/s |")
    if "memory" in sections and steps:
        print("\n(d) memory per step, MiB (compiled.memory_analysis; device peak where available)")
        print("| step | arguments | outputs | temp | device peak |\n|---|---|---|---|---|")
        for name, r in steps.items():
            m = r["memory"]
            print(
                f"| {name} | {_mib(m.get('argument_bytes'))} | {_mib(m.get('output_bytes'))} | "
                f"{_mib(m.get('temp_bytes'))} | {_mib(r['device_peak_bytes'])} |"
            )
    if "scaling" in sections and "scaling" in results:
        sc = results["scaling"]
        print(f"\n(e) data-parallel scaling, fixed global batch. NOTE: {sc['note']}")
        print("| step | devices | examples/s | relative to 1 | per-device efficiency |")
        print("|---|---|---|---|---|")
        for name, row in sc["workloads"].items():
            for n, r in row["by_devices"].items():
                print(
                    f"| {name} (batch {row['batch']}) | {n} | "
                    f"{_si(r['examples_per_s'], row['unit'])}/s | {r['relative_to_1']:.2f} | "
                    f"{r['per_device_efficiency']:.2f} |"
                )


def parse_only(text: str) -> tuple[str, ...]:
    if not text:
        return SECTIONS
    chosen = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        name = LETTERS.get(token, token)
        if name not in SECTIONS:
            raise SystemExit(f"--only: {token!r} is not one of {SECTIONS} or a-e")
        chosen.append(name)
    return tuple(s for s in SECTIONS if s in chosen)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="", help="write all results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke sizes, few repeats")
    parser.add_argument("--only", default="", help=f"comma-separated sections {SECTIONS}")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls (default 10; 3 quick)")
    parser.add_argument("--scaling_devices", default="1,2,4,8")
    parser.add_argument(
        "--workloads",
        default="",
        help="comma-separated name prefixes, e.g. 'toy,digits/dmd2,text/mdlm_teacher' (default: "
        f"all; with --quick: {','.join(QUICK_WORKLOADS)})",
    )
    parser.add_argument("--scaling_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 10)
    patterns = [p.strip() for p in args.workloads.split(",") if p.strip()] or (
        list(QUICK_WORKLOADS) if args.quick else None
    )
    known = [f"toy/{m}" for m in TOY_METHODS] + [f"digits/{m}" for m in DIGITS_METHODS]
    known += ["digits/edm_teacher", "text/mdlm_teacher", "text/didi_instruct"]
    unknown = [p for p in patterns or () if not any(selected(n, [p]) for n in known)]
    if unknown:
        parser.error(f"--workloads: {unknown} match no workload; valid: {', '.join(known)}")
    if args.repeats < 0:
        parser.error(f"--repeats={args.repeats}: must be >= 1 (0 = the default)")
    if args.quick:  # cheap to compile on CPU (as in the tests); the default keeps threefry
        jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    if args.scaling_worker:
        print(WORKER_MARK + json.dumps(scaling_worker(args.quick, repeats, patterns)), flush=True)
        return {}
    sections = parse_only(args.only)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {"environment": environment(args.quick, repeats), "sections": list(sections)}
    results["environment"]["workloads"] = patterns or "all"
    results["environment"]["prng_impl"] = str(jax.config.jax_default_prng_impl)
    results["environment"]["xla_cpu_ynn_fusions"] = xla_cpu.ynn_fusions_active()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        if "flops" in sections:
            n = 512 if args.quick else (2048 if jax.devices()[0].platform == "cpu" else 8192)
            log("matmul peak ...")
            results["peak"] = matmul_peak(n, max(repeats, 5))
        if {"throughput", "flops", "memory"} & set(sections):
            results["steps"] = bench_steps(args.quick, repeats, tmpdir, log, patterns)
        if "sampling" in sections:
            groups = {p.split("/")[0] for p in patterns or GROUPS}
            domains = [g for g in GROUPS if g in groups]
            results["sampling"] = bench_sampling(args.quick, repeats, tmpdir, log, domains)
    if "scaling" in sections:
        counts = [int(c) for c in args.scaling_devices.split(",") if c.strip()]
        results["scaling"] = bench_scaling(args.quick, repeats, counts, log, patterns)
    results["total_s"] = time.perf_counter() - start
    print_report(results, sections)
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
