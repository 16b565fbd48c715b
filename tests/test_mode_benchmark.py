"""experiments/mode_benchmark.py end to end on a tiny teacher it trains itself.

Runs the script in a subprocess (it sets JAX-wide cache options): a 4-step smoke-sized
unconditional teacher on the imbalanced digits, one 3-step DMD2 student, 40 samples each.
The numbers mean nothing at this size; the test checks the pipeline and the files.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments/mode_benchmark.py")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mode_benchmark")
    command = [
        sys.executable,
        SCRIPT,
        f"--workdir={workdir}",
        f"--data_dir={tmp_path_factory.mktemp('tfds')}",
        "--tiny_teacher",
        "--teacher_steps=4",
        "--methods=dmd2",
        "--seeds=1",
        "--steps=3",
        "--batch_size=8",
        "--critic_steps=1",
        "--num_samples=40",
        "--teacher_samples=40",
        "--jax_cache=",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(command, check=True, cwd=REPO, env=env, timeout=900)
    with open(workdir / "results.json") as f:
        return workdir, json.load(f)


def test_rows_metrics_and_files(benchmark):
    workdir, results = benchmark
    names = [row["name"] for row in results["table"]]
    assert names == [
        "data (imbalanced train split)",
        "teacher",
        "initial generator (NFE 1, sigma_g 80)",
        "DMD2 (reverse KL)",
    ]
    assert results["settings"]["rare_classes"] == [9, 8, 7]
    true = results["settings"]["true_histogram"]
    assert true[0] == pytest.approx(149 / 462) and true[9] == pytest.approx(5 / 462)
    for row in results["table"]:
        assert sum(row["histogram"]) == pytest.approx(1.0)
        assert 0.0 <= row["tv_data"] <= 1.0
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
    data, teacher, _, student = results["table"]
    assert data["precision"] == 1.0 and data["recall"] == 1.0 and data["tv_data"] == 0.0
    assert teacher["tv_teacher"] == 0.0 and teacher["rare_recall"] == 1.0
    assert 0.0 <= student["tv_teacher"] <= 1.0
    assert 0.0 < student["disc_loss"] < 5.0 and student["std_log_r"] >= 0.0, student
    report = (workdir / "results.md").read_text()
    assert all(f"| {name} |" in report for name in names)
    for picture in ("histogram.png", "samples.png"):
        assert (workdir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(workdir / "teacher" / "teacher.msgpack")


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--methods=gan", "unknown methods ['gan']"),
        ("--imbalance=1", "--imbalance=1.0: must be > 1"),
    ],
)
def test_bad_flags_are_usage_errors(flag, message):
    done = subprocess.run(
        [sys.executable, SCRIPT, flag], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr
