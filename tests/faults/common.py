"""Helpers of the fault-injection suite: runs of the dummy engine method, in and out of process."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from didistill.train import loop, writers
from tests import dummy_method

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DUMMY = "--config=tests/configs/dummy.py"


def env(**extra):
    out = dict(os.environ, JAX_PLATFORMS="cpu")
    out.pop("JAX_COORDINATOR_ADDRESS", None)
    out.pop("DIDISTILL_DEBUG", None)
    return {**out, **extra}


def main_args(workdir, *flags, config=DUMMY):
    return [sys.executable, "-m", "didistill.main", config, f"--workdir={workdir}", *flags]


def run_main(workdir, *flags, config=DUMMY, timeout=300, **extra_env):
    return subprocess.run(
        main_args(workdir, *flags, config=config),
        cwd=REPO,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("didistill: error:")]


def config(num_steps=12, **train):
    cfg = dummy_method.load_config()
    cfg.train.num_steps = num_steps
    for key, value in train.items():
        cfg.train[key] = value
    return cfg


def train(workdir, cfg):
    return loop.train(dummy_method.make_method(cfg), cfg, str(workdir))


def metrics(workdir) -> str:
    """metrics.jsonl without the timing keys (they differ between identical runs), as text."""
    return "".join(json.dumps(line) + "\n" for line in writers.comparable_metrics(workdir))


def eval_json(workdir) -> dict:
    with open(os.path.join(workdir, loop.EVAL_FILE)) as f:
        return json.load(f)


def checkpoint_steps(workdir) -> list[int]:
    names = os.listdir(os.path.join(workdir, loop.CHECKPOINT_DIR))
    return sorted(int(n) for n in names if n.isdigit())


def array_files(workdir, step) -> list[str]:
    """The array data files (ocdbt chunks) of a checkpoint step, largest first."""
    pattern = os.path.join(workdir, loop.CHECKPOINT_DIR, str(step), "state", "**", "d", "*")
    files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    return sorted(files, key=os.path.getsize, reverse=True)


def flip_bit(path: str, offset: int | None = None, bit: int = 0) -> None:
    size = os.path.getsize(path)
    offset = size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def snapshot(directory) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `directory`."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out
