"""`make faults`: randomized fault injection on real `python -m didistill.main` runs.

    python -m tests.faults.random_faults [--config toy|dummy] [--runs 40] [--budget_s 1500]
                                         [--jobs 1] [--seed 0]

Each run is a small real run in a fresh workdir: `--config toy` (default) is the one-step
f-distill student of the shipped 8-mode ring teacher (`toy2d:forward_kl,smoke`, 24 steps, a
checkpoint every 4, a log line every 2); `--config dummy` is the engine's dummy method (40
steps). Until the run finishes, the runner starts it again and again and injects random faults:

- a signal (`kill -9` half of the time, else SIGTERM or SIGINT) at a random kill point: during
  start-up (a random time after the start), during training (when metrics.jsonl reaches a
  random line, plus up to 0.1 s), or during the final evaluation (a random time after the last
  line);
- between starts: a bit flip in the array data of the newest checksummed checkpoint, a torn
  line at the end of metrics.jsonl (what a kill while writing it leaves), a truncated
  eval.json, or a stale run.lock of a dead process.

A run that stops because every checkpoint was corrupt ("no usable checkpoint", by design it
does not restart from step 0 on its own) is restarted with `--restart`, as its message says.
Then metrics.jsonl (without timing keys) and eval.json are compared with an undisturbed run.
The table: faults injected (by kind, and kill points by phase), runs recovered, results
identical, data lost (a run whose results differ from the undisturbed one; a run still not
finished after MAX_STARTS starts, because the random kills kept hitting it, is counted apart,
with a check that its metrics so far equal the undisturbed run's), unexpected exits (an exit
code other than 0, a signal's, 130, or the designed stop above). The first difference of a run
that differs is printed.

Every start shares one persistent JAX compilation cache (`JAX_COMPILATION_CACHE_DIR`, warmed by
the undisturbed run and one resumed run), so a start spends its time starting Python and
loading, not compiling: a whole `toy2d:forward_kl,smoke` run took 11 s of wall time instead of
42 s on this 2-core machine when it was nearly idle (load average 1).
`--jobs N` disturbs N runs at the same time (one process each), for machines with more cores.
(NaN checkpoints, read errors, disk full, read-only workdirs and config mismatches are covered
one by one in tests/faults/test_faults.py.)
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from didistill.train import writers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {
    "toy": (
        [
            "--config=toy2d:forward_kl,smoke",
            "--config.train.num_steps=24",
            "--config.train.log_every=2",
            "--config.train.checkpoint_every=4",
            "--config.train.keep_checkpoints=3",
        ],
        12,  # metrics lines of a finished run
    ),
    "dummy": (
        [
            "--config=tests/configs/dummy.py",
            "--config.train.num_steps=40",
            "--config.train.log_every=2",
            "--config.train.checkpoint_every=5",
            "--config.train.keep_checkpoints=3",
            "--config.dummy.sleep_s=0.05",
        ],
        20,
    ),
}
MAX_STARTS = 30
EXPECTED_CODES = (0, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 130)
NO_USABLE = "no usable checkpoint"
# Python's own start-up, before any code of the run: a SIGINT there is a fatal error of the
# interpreter (exit 1, nothing written) that no Python code can catch
PYTHON_INIT = "Fatal Python error: init_import_site"


class Runner:
    def __init__(self, config: str, root: str, rng):
        self.flags, self.total_lines = CONFIGS[config]
        self.rng = rng
        self.env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            PYTHONFAULTHANDLER="1",  # a crash prints the Python stack of every thread
            JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
        self.env.pop("JAX_COORDINATOR_ADDRESS", None)
        self.env.pop("DIDISTILL_DEBUG", None)
        self.counts = collections.Counter()
        self.errors: list[str] = []
        self.error_tails: list[str] = []  # the stderr ends of those exits, for the report
        self.differences: list[str] = []

    def start(self, workdir, *extra):
        self.counts["starts"] += 1
        return subprocess.Popen(
            [sys.executable, "-m", "didistill.main", *self.flags, f"--workdir={workdir}", *extra],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run_undisturbed(self, workdir, *extra) -> tuple[int, str]:
        proc = self.start(workdir, *extra)
        _, stderr = proc.communicate(timeout=1200)
        return proc.returncode, stderr

    # -------------------------------------------------------------- faults between starts

    def damage(self, workdir) -> str | None:
        """Damages the stopped run's files; returns the fault's name (None: nothing done)."""
        rng = self.rng
        choice = rng.choice(["bit_flip", "torn_metrics", "stale_lock", "truncate_eval"])
        if choice == "bit_flip":
            steps = [int(n) for n in _listdir(f"{workdir}/checkpoints") if n.isdigit()]
            if not steps:
                return None
            step_dir = f"{workdir}/checkpoints/{max(steps)}"
            if not os.path.exists(f"{step_dir}/didistill.sha256.json"):
                return None  # not checksummed yet (see docs/reliability.md): not flipped
            files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
            if not files:
                return None
            path = max(files, key=os.path.getsize)
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
                f.seek(0)
                f.write(data)
            return "bit flip in a checkpoint"
        if choice == "torn_metrics":
            path = f"{workdir}/metrics.jsonl"
            if not os.path.exists(path):
                return None
            with open(path, "a") as f:  # what a kill in the middle of writing a line leaves
                f.write('{"step": 999, "loss": 0.12'[: int(rng.integers(1, 27))])
            return "torn line at the end of metrics.jsonl"
        if choice == "stale_lock":
            if not os.path.isdir(workdir):
                return None
            with open(f"{workdir}/run.lock", "w") as f:
                f.write('{"pid": 999999, "host": "gone", "started": "before"}\n')
            return "stale lock file"
        path = f"{workdir}/eval.json"
        if not os.path.exists(path):
            return None
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return "truncated eval.json"

    # -------------------------------------------------------------- kill points

    def wait_for_kill_point(self, proc, workdir) -> str | None:
        """Waits for a random kill point; returns its phase, or None if `proc` ended first."""
        rng = self.rng
        phase = rng.choice(["start-up", "training", "training", "training", "evaluation"])
        deadline = time.monotonic() + 600
        if phase == "start-up":
            try:
                proc.wait(timeout=float(rng.uniform(0.1, 5.0)))
                return None
            except subprocess.TimeoutExpired:
                return phase
        target = (
            min(_lines(workdir) + int(rng.integers(1, 6)), self.total_lines)
            if phase == "training"
            else self.total_lines
        )
        if _lines(workdir) >= target:  # already there (an earlier start wrote it): start-up
            phase = "start-up"
        while _lines(workdir) < target:
            if proc.poll() is not None:
                return None
            if time.monotonic() > deadline:
                return phase
            time.sleep(0.01)
        pause = rng.uniform(0.0, 0.1) if phase == "training" else rng.uniform(0.0, 2.5)
        try:
            proc.wait(timeout=float(pause))
            return None
        except subprocess.TimeoutExpired:
            return phase

    def one_run(self, workdir, reference) -> None:
        counts, rng = self.counts, self.rng
        kill_next, extra = True, ()
        for _ in range(MAX_STARTS):
            proc = self.start(workdir, *extra)
            extra = ()
            fault = None
            if kill_next:
                phase = self.wait_for_kill_point(proc, workdir)
                if phase is not None:
                    sig = rng.choice(
                        [signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT]
                    )
                    proc.send_signal(sig)
                    counts["faults"] += 1
                    counts[f"kind:{signal.Signals(sig).name}"] += 1
                    counts[f"phase:{phase}"] += 1
                    fault = f"{signal.Signals(sig).name} during {phase}"
            _, stderr = proc.communicate(timeout=1200)
            if NO_USABLE in stderr and proc.returncode == 1:
                counts["stopped: no usable checkpoint (rerun with --restart)"] += 1
                extra = ("--restart",)
                kill_next = rng.random() < 0.5
                continue
            if proc.returncode == 1 and PYTHON_INIT in stderr and fault and "SIGINT" in fault:
                counts[f"SIGINT while Python itself starts ({PYTHON_INIT}, exit 1)"] += 1
            elif proc.returncode not in EXPECTED_CODES:
                last = stderr.strip().splitlines()[-1:] or [str(proc.returncode)]
                self.errors.append(
                    f"{proc.returncode} after {fault or 'no signal'}: {last[0][:300]}"
                )
                self.error_tails.append(stderr[-4000:])
            finished = proc.returncode == 0 and os.path.exists(f"{workdir}/eval.json")
            if finished and rng.random() >= 0.4:
                break
            fault = self.damage(workdir) if (finished or rng.random() < 0.5) else None
            if fault is not None:
                counts["faults"] += 1
                counts[f"kind:{fault}"] += 1
            elif finished:
                break
            kill_next = rng.random() < 0.85
        else:  # still being killed after MAX_STARTS starts: is what it has so far right?
            metrics = writers.comparable_metrics(workdir) if _lines(workdir) else []
            if metrics == reference[0][: len(metrics)]:
                counts["unfinished after MAX_STARTS starts, its metrics so far identical"] += 1
            else:
                counts["lost"] += 1
                self.differences.append(f"{workdir} (unfinished): metrics.jsonl differs")
            return
        counts["recovered"] += 1
        results = _results(workdir)
        if results == reference:
            counts["identical"] += 1
        else:
            counts["lost"] += 1
            self.differences.append(f"{workdir}: {_difference(results, reference)}")


def _listdir(path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _results(workdir):
    metrics = writers.comparable_metrics(workdir)  # without the timing keys
    with open(os.path.join(workdir, "eval.json")) as f:
        return metrics, json.load(f)


def _difference(results, reference) -> str:
    (metrics, evaluation), (want_metrics, want_eval) = results, reference
    if evaluation != want_eval:
        return "eval.json"
    got = {line.get("step"): line for line in metrics}
    for line in want_metrics:
        if got.get(line["step"]) != line:
            return f"metrics.jsonl line of step {line['step']}"
    return f"metrics.jsonl has {len(metrics)} lines, not {len(want_metrics)}"


def _lines(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except OSError:
        return 0


def _warm_up(runner: Runner, root: str) -> tuple | None:
    """The undisturbed reference run, then one run preempted and resumed (so that the restore
    path is compiled and cached too, before any start is killed)."""
    ref_dir = os.path.join(root, "reference")
    code, stderr = runner.run_undisturbed(ref_dir)
    if code != 0:
        print(stderr[-3000:], file=sys.stderr)
        return None
    warm = os.path.join(root, "warm")
    proc = runner.start(warm)
    while _lines(warm) < 2 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=1200)
    code, stderr = runner.run_undisturbed(warm)
    if code != 0:
        print(stderr[-3000:], file=sys.stderr)
        return None
    runner.counts["starts"] = 0
    return _results(ref_dir)


def _disturb(runners, reference, root, args, start) -> int:
    """Runs `one_run` on `len(runners)` threads (one subprocess each at a time) until `--runs`
    runs or `--budget_s`; returns the number of runs done."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0}

    def worker(runner):
        while True:
            with lock:
                over_budget = time.monotonic() - start >= args.budget_s
                if state["next"] >= args.runs or (over_budget and state["next"] >= len(runners)):
                    return  # (each job does at least one run)
                index = state["next"]
                state["next"] += 1
            runner.one_run(os.path.join(root, f"run{index}"), reference)
            with lock:
                state["done"] += 1
                c = sum((r.counts for r in runners), collections.Counter())
                print(
                    f"run {state['done']}: {c['faults']} faults, {c['starts']} starts, "
                    f"{c['identical']} identical, {c['lost']} lost "
                    f"({time.monotonic() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in runners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return state["done"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="toy")
    parser.add_argument("--runs", type=int, default=40, help="runs to disturb (each ~5 faults)")
    parser.add_argument(
        "--budget_s", type=float, default=1500, help="no new runs after (each job does one)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs disturbed at the same time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.budget_s <= 0 or args.jobs < 1:
        parser.error("--runs and --jobs must be >= 1 and --budget_s > 0")
    # A shell ignores SIGINT in jobs started with `&`; children inherit an ignored SIGINT, and
    # Python then leaves it ignored, so the SIGINT faults would do nothing. A handler (unlike
    # SIG_IGN) is reset to the default by exec, so the children handle SIGINT as Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix="didistill_faults_")
    runners = [
        Runner(args.config, root, np.random.default_rng(args.seed if j == 0 else (args.seed, j)))
        for j in range(args.jobs)
    ]
    try:
        reference = _warm_up(runners[0], root)
        if reference is None:
            return 1
        warm_s = time.monotonic() - start
        runs = _disturb(runners, reference, root, args, start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = time.monotonic() - start
    c = sum((r.counts for r in runners), collections.Counter())
    errors = [e for r in runners for e in r.errors]
    tails = [t for r in runners for t in r.error_tails]
    differences = [d for r in runners for d in r.differences]
    kinds = sorted((k.split(":", 1)[1], n) for k, n in c.items() if k.startswith("kind:"))
    phases = sorted((k.split(":", 1)[1], n) for k, n in c.items() if k.startswith("phase:"))
    stops = [
        (k, n) for k, n in c.items() if k.startswith(("stopped:", "unfinished", "SIGINT while"))
    ]
    rows = [
        ("config", f"{args.config} (seed {args.seed}, {args.jobs} at a time)"),
        ("runs", runs),
        ("starts (processes)", c["starts"]),
        ("faults injected", c["faults"]),
        *((f"&nbsp;&nbsp;{kind}", n) for kind, n in kinds),
        *((f"&nbsp;&nbsp;signals during {phase}", n) for phase, n in phases),
        *stops,
        ("runs recovered", c["recovered"]),
        ("results identical", c["identical"]),
        ("data lost", c["lost"]),
        ("unexpected exits", len(errors)),
        ("wall time (s)", f"{wall:.0f} (warm-up {warm_s:.0f})"),
    ]
    print("\n| fault injection (make faults) | count |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for error in errors[:10]:
        print("unexpected exit:", error, file=sys.stderr)
    for tail in tails[:3]:
        print("--- the end of an unexpected exit's stderr:\n" + tail, file=sys.stderr)
    for difference in differences[:10]:
        print("results differ:", difference, file=sys.stderr)
    return 0 if c["lost"] == 0 and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
