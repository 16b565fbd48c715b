"""benchmarks/device_check.py in its tiny setting on CPU: steps timed with FLOP/s against a
matmul peak of the same dtype, and the FID timing, in the report. By default one workload
(ImageNet-64 f-distill: ADM, bf16; a tiny step still compiles for minutes on a loaded CPU);
DIDISTILL_SLOW_TESTS=1 runs every workload in float32 and bfloat16."""

import os

import numpy as np

from benchmarks import device_check

FULL = os.environ.get("DIDISTILL_SLOW_TESTS") == "1"


def test_tiny_device_check(tmp_path, capsys):
    workloads = list(device_check.WORKLOADS) if FULL else ["imagenet64/f_distill"]
    dtypes = ["float32", "bfloat16"] if FULL else ["bfloat16"]
    argv = ["--tiny", f"--workloads={','.join(workloads)}", f"--dtypes={','.join(dtypes)}"]
    result = device_check.main([*argv, f"--json={tmp_path / 'out.json'}"])
    rows = result["steps"]
    assert {(r["workload"], r["dtype"]) for r in rows} == {
        (w, d) for w in workloads for d in dtypes
    }
    for row in rows:
        assert row["steps_per_s"] > 0 and row["images_per_s"] > 0 and row["all_steps_finite"]
        assert np.isfinite(row["flops_per_s"]) and row["flops"] > 0
    assert set(result["matmul_peak"]) == set(dtypes)
    assert result["fid"]["fid_finite"] and result["fid"]["num_samples"] == 8
    out = capsys.readouterr().out
    assert f"matmul peak {dtypes[-1]}" in out and f"{workloads[-1]} | {dtypes[-1]}" in out
    assert (tmp_path / "out.json").is_file()
