"""`make faults`: randomized fault injection on real `python -m didistill.main` runs.

    python -m tests.faults.random_faults [--runs 12] [--budget_s 1200] [--seed 0]

Each run is the engine's dummy method (tests/configs/dummy.py, 40 steps, a checkpoint every 5,
one batch every 0.05 s) in a fresh workdir. Until it finishes, the runner starts it, and injects
random faults: `kill -9`, SIGTERM or SIGINT at a random moment (start-up included), and,
between starts, a bit flip in the newest checkpoint's array data, a truncated eval.json or
metrics.jsonl tail, or a stale lock file. (NaN checkpoints, read errors, disk full and config
mismatches are covered one by one in tests/faults/test_faults.py.)
Then it compares metrics.jsonl and eval.json with an undisturbed run and prints a table:
faults injected, runs recovered, results identical, data lost (a run whose results differ,
or that did not finish within its restarts).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from didistill.train import writers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = [
    "--config=tests/configs/dummy.py",
    "--config.train.num_steps=40",
    "--config.train.log_every=2",
    "--config.train.checkpoint_every=5",
    "--config.train.keep_checkpoints=3",
    "--config.dummy.sleep_s=0.05",
]
MAX_STARTS = 30


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _start(workdir):
    return subprocess.Popen(
        [sys.executable, "-m", "didistill.main", *FLAGS, f"--workdir={workdir}"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _results(workdir):
    metrics = writers.comparable_metrics(workdir)  # without the timing keys
    with open(os.path.join(workdir, "eval.json")) as f:
        return metrics, json.load(f)


def _newest_checkpoint(workdir):
    steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
    return max(steps) if steps else None


def _between_starts_fault(workdir, rng) -> str | None:
    """Damages the stopped run's files; returns the fault's name (None: nothing to damage)."""
    choice = rng.choice(["bit_flip", "truncate_metrics", "stale_lock", "truncate_eval"])
    if choice == "bit_flip":
        step = _newest_checkpoint(workdir) if os.path.isdir(f"{workdir}/checkpoints") else None
        if step is None:
            return None
        files = glob.glob(f"{workdir}/checkpoints/{step}/state/**/d/*", recursive=True)
        if not files:
            return None
        path = max(files, key=os.path.getsize)
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
            f.seek(0)
            f.write(data)
        return "bit flip in a checkpoint"
    if choice == "truncate_metrics":
        path = f"{workdir}/metrics.jsonl"
        if not os.path.exists(path) or os.path.getsize(path) < 10:
            return None
        with open(path, "r+b") as f:
            f.truncate(int(os.path.getsize(path) - rng.integers(1, 10)))
        return "truncated metrics.jsonl"
    if choice == "stale_lock":
        with open(f"{workdir}/run.lock", "w") as f:
            f.write('{"pid": 999999, "host": "gone", "started": "before"}\n')
        return "stale lock file"
    path = f"{workdir}/eval.json"
    if not os.path.exists(path):
        return None
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return "truncated eval.json"


def _lines(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _wait_for_kill_point(proc, workdir, rng) -> None:
    """Returns if `proc` ended; raises TimeoutExpired at the random moment to kill it: in
    start-up (1 in 5) or when metrics.jsonl reaches a random line, plus up to 0.1 s."""
    if rng.random() < 0.2:
        proc.wait(timeout=float(rng.uniform(0.2, 6.0)))
        return
    target = _lines(workdir) + int(rng.integers(1, 8))
    deadline = time.monotonic() + 300
    while _lines(workdir) < target:
        if proc.poll() is not None:
            return
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, 300)
        time.sleep(0.01)
    proc.wait(timeout=float(rng.uniform(0.0, 0.1)))


def one_run(workdir, rng, reference, counts) -> None:
    kill_next = True
    for _ in range(MAX_STARTS):
        proc = _start(workdir)
        if kill_next:
            try:
                _wait_for_kill_point(proc, workdir, rng)
            except subprocess.TimeoutExpired:
                sig = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
                proc.send_signal(sig)
                counts["faults"] += 1
                counts["by kind"][signal.Signals(sig).name] = (
                    counts["by kind"].get(signal.Signals(sig).name, 0) + 1
                )
        _, stderr = proc.communicate(timeout=600)
        if proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 130):
            counts["errors"].append(stderr.strip().splitlines()[-1:] or [str(proc.returncode)])
        if os.path.exists(f"{workdir}/eval.json") and proc.returncode == 0:
            fault = _between_starts_fault(workdir, rng) if rng.random() < 0.3 else None
            if fault is None:
                break
            counts["faults"] += 1
            counts["by kind"][fault] = counts["by kind"].get(fault, 0) + 1
            kill_next = False
            continue
        kill_next = rng.random() < 0.8
        if rng.random() < 0.3:
            fault = _between_starts_fault(workdir, rng)
            if fault is not None:
                counts["faults"] += 1
                counts["by kind"][fault] = counts["by kind"].get(fault, 0) + 1
    else:
        counts["lost"] += 1
        return
    counts["recovered"] += 1
    if _results(workdir) == reference:
        counts["identical"] += 1
    else:
        counts["lost"] += 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="runs to disturb (each ~10 faults)")
    parser.add_argument("--budget_s", type=float, default=1200, help="stop starting new runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.budget_s <= 0:
        parser.error("--runs must be >= 1 and --budget_s > 0")
    rng = np.random.default_rng(args.seed)
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix="didistill_faults_")
    ref_dir = os.path.join(root, "reference")
    proc = _start(ref_dir)
    _, stderr = proc.communicate(timeout=600)
    if proc.returncode != 0:
        print(stderr[-3000:], file=sys.stderr)
        return 1
    reference = _results(ref_dir)
    counts = {"faults": 0, "recovered": 0, "identical": 0, "lost": 0, "errors": [], "by kind": {}}
    runs = 0
    while runs < args.runs and time.monotonic() - start < args.budget_s:
        workdir = os.path.join(root, f"run{runs}")
        one_run(workdir, rng, reference, counts)
        runs += 1
        print(
            f"run {runs}: {counts['faults']} faults so far, {counts['identical']} identical "
            f"({time.monotonic() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    wall = time.monotonic() - start
    rows = [
        ("runs", runs),
        ("faults injected", counts["faults"]),
        *((f"  {kind}", n) for kind, n in sorted(counts["by kind"].items())),
        ("runs recovered", counts["recovered"]),
        ("results identical", counts["identical"]),
        ("data lost", counts["lost"]),
        ("unexpected exits", len(counts["errors"])),
        ("wall time (s)", f"{wall:.0f}"),
    ]
    print("\n| fault injection (make faults) | count |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for error in counts["errors"][:10]:
        print("unexpected exit:", error, file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)
    return 0 if counts["lost"] == 0 and counts["identical"] == runs else 1


if __name__ == "__main__":
    sys.exit(main())
