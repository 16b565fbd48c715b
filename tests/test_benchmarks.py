"""`python -m benchmarks.run` runs end to end and writes every section as positive, finite
numbers (no timing assertions: figures depend on the machine and its load). Each run is a
subprocess on CPU, so its XLA flags (simulated devices) and PRNG setting stay out of this
process. Kept small: only the MDLM teacher step (the cheapest to compile) in every section,
and 1 and 2 devices for scaling."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(tmp_path, *args):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", f"--json={out}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_step_flops_sampling_memory_sections(tmp_path):
    results, stdout = run_benchmark(
        tmp_path, "--only=a,b,c,d", "--workloads=text/mdlm_teacher", "--repeats=2"
    )
    env = results["environment"]
    assert env["jax_version"] and env["device_kind"] and env["quick"]
    assert "commit" in env
    assert env["xla_cpu_ynn_fusions"] is False  # didistill's XLA:CPU flag came in time
    assert results["sections"] == ["throughput", "flops", "sampling", "memory"]
    assert positive(results["peak"]["flops_per_s"])
    step = results["steps"]["text/mdlm_teacher"]
    for key in ("examples_per_s", "steps_per_s", "step_s", "flops", "flops_per_s", "compile_s"):
        assert positive(step[key]), (key, step[key])
    assert step["all_steps_finite"]
    for key in ("argument_bytes", "output_bytes", "temp_bytes"):
        assert positive(step["memory"][key]), (key, step["memory"])
    text = results["sampling"]["text"]
    for key in ("teacher_per_s", "student_per_s", "speedup", "teacher_nfe", "student_nfe"):
        assert positive(text[key]), (key, text)
    assert sorted(text["by_steps"], key=int) == ["4", "16"], text  # tokens/s per step count
    assert all(positive(r["tokens_per_s"]) for r in text["by_steps"].values())
    assert "Tokens/s by sampler steps" in stdout
    for title in ("(a)", "(b)", "(c)", "(d)"):
        assert title in stdout


def test_scaling_section(tmp_path):
    results, stdout = run_benchmark(
        tmp_path,
        "--only=scaling",
        "--workloads=text/mdlm_teacher",
        "--scaling_devices=1,2",
        "--repeats=2",
    )
    scaling = results["scaling"]
    assert scaling["simulated_cpu_devices"]
    by = scaling["workloads"]["text/mdlm_teacher"]["by_devices"]
    assert sorted(by) == ["1", "2"]
    for n, row in by.items():
        assert row["devices"] == int(n)
        for key in ("examples_per_s", "relative_to_1", "per_device_efficiency"):
            assert positive(row[key]), (n, key, row)
    assert "(e)" in stdout and "share the same cores" in stdout
