"""Helpers of the fault-injection suite: runs of the dummy engine method, in and out of process."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
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


@contextlib.contextmanager
def children_handle_sigint():
    """Children started inside handle SIGINT as Ctrl-C. A shell ignores SIGINT in jobs started
    with `&` (pytest in the background), children inherit an ignored SIGINT and Python leaves
    it ignored; a handler in this process is reset to the default by exec instead."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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


# Run in the child before `didistill.main`: every write under ROOT fails with EROFS, as on a
# file system mounted read-only (root ignores chmod, so a read-only directory cannot be made).
_READ_ONLY = """
import builtins, errno, os, runpy, sys
ROOT = os.path.abspath(sys.argv.pop(1))

def _guard(path, writing):
    if writing and os.path.abspath(os.fsdecode(path)).startswith(ROOT):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

_open, _os_open = builtins.open, os.open

def _open_ro(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)):
        _guard(file, any(c in mode for c in "wax+"))
    return _open(file, mode, *args, **kwargs)

def _os_open_ro(path, flags, *args, **kwargs):
    _guard(path, flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
    return _os_open(path, flags, *args, **kwargs)

def _refuse(name):
    original = getattr(os, name)
    def refused(path, *args, **kwargs):
        _guard(path, True)
        return original(path, *args, **kwargs)
    return refused

builtins.open, os.open = _open_ro, _os_open_ro
for _name in ("mkdir", "rename", "replace", "remove", "unlink", "rmdir", "truncate"):
    setattr(os, _name, _refuse(_name))
sys.argv[0] = "didistill.main"
runpy.run_module("didistill.main", run_name="__main__", alter_sys=True)
"""


def run_main_read_only(workdir, *flags, config=DUMMY, timeout=300):
    """`python -m didistill.main` with `workdir` on a (simulated) read-only file system."""
    args = main_args(workdir, *flags, config=config)[3:]  # without python -m didistill.main
    return subprocess.run(
        [sys.executable, "-c", _READ_ONLY, str(workdir), *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
