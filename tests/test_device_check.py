"""benchmarks/device_check.py in its tiny setting on CPU: every workload and dtype is timed,
with FLOP/s, a matmul peak per dtype and the FID timing in the report."""

import numpy as np

from benchmarks import device_check


def test_tiny_device_check_runs_every_workload_and_dtype(tmp_path, capsys):
    result = device_check.main(["--tiny", f"--json={tmp_path / 'out.json'}"])
    rows = result["steps"]
    assert {(r["workload"], r["dtype"]) for r in rows} == {
        (w, d) for w in device_check.WORKLOADS for d in ("float32", "bfloat16")
    }
    for row in rows:
        assert row["steps_per_s"] > 0 and row["images_per_s"] > 0 and row["all_steps_finite"]
        assert np.isfinite(row["flops_per_s"]) and row["flops"] > 0
    assert set(result["matmul_peak"]) == {"float32", "bfloat16"}
    assert result["fid"]["fid_finite"] and result["fid"]["num_samples"] == 8
    out = capsys.readouterr().out
    assert "matmul peak bfloat16" in out and "imagenet64/f_distill | bfloat16" in out
    assert (tmp_path / "out.json").is_file()
