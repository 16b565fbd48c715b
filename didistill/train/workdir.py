"""What keeps a run directory from being lost or mixed up: fingerprint, lock, atomic files.

- **Fingerprint** (`check_fingerprint`): the first start in a workdir writes `run.json`, a hash
  of the resolved config (less the keys in `NEUTRAL_KEYS`, which cannot change results) and of
  every file the config names (the teacher). A later start with another fingerprint raises
  `WorkdirMismatchError` before anything in the workdir is touched; its message names the first
  differing keys and the two ways out: another `--workdir`, or `--restart`, which moves the old
  run aside (`move_aside`, never a deletion). `train.num_steps` may be raised (to extend a
  run), not lowered.
- **Lock** (`WorkdirLock`): `<workdir>/run.lock` holds the pid and host of the run that uses the
  directory, under an `fcntl.flock` that the kernel drops when the process dies (also on
  `kill -9`), so a lock left by a dead run is taken over, and a second live run stops.
- **Atomic files** (`write_text_atomic`): a temporary file in the same directory, flushed and
  fsynced, then renamed over the target: a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
from typing import Any

from didistill.train.errors import DidistillError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
FORMAT = 1

# Keys that cannot change a run's results: they may differ between starts of one workdir.
# (`train.num_steps` is handled apart: raising it extends a run, lowering it is refused.)
NEUTRAL_KEYS = (
    "train.log_every",  # only how metrics.jsonl windows are cut
    "train.progress",
    "train.checkpoint_every",  # resume is bit-identical from any step
    "train.keep_checkpoints",
    "train.keep_period",  # which checkpoints are kept
    "eval.every",  # periodic evaluation: extra metrics.jsonl lines and PNGs only
    "eval.periodic_samples",
    "eval.grid_samples",
    "eval.fid",  # the final evaluation is recomputed, it never feeds back into training
    "train.max_nonfinite_steps",  # when a diverging run stops, not what it computes
    "eval.batch_size",  # evaluation chunking (same samples, same keys)
    "mesh.data",  # device layout: same computation (last-bit rounding may differ)
    "mesh.model",
    "mesh.fsdp",
    "logging",  # where metrics are also sent (TensorBoard, W&B)
    "fingerprint_ignore",
)


class WorkdirMismatchError(DidistillError):
    """The workdir holds a run of another config."""


class WorkdirLockedError(DidistillError):
    """Another live run uses the workdir."""


def _stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` atomically (temp file + fsync + rename + directory fsync)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _is_neutral(key: str, extra: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in (*NEUTRAL_KEYS, *extra))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe(config) -> dict[str, Any]:
    """{"config": flat fingerprinted keys, "files": {key: sha256}, "num_steps": N}."""
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    flat = _flatten(resolved)
    extra = tuple(flat.get("fingerprint_ignore") or ())
    num_steps = flat.get("train.num_steps")
    kept = {k: v for k, v in flat.items() if k != "train.num_steps" and not _is_neutral(k, extra)}
    files = {}
    for key, value in kept.items():
        if isinstance(value, str) and value and os.path.isfile(value):
            files[key] = _sha256(value)
    return {"config": kept, "files": files, "num_steps": num_steps}


def fingerprint(description: dict[str, Any]) -> str:
    body = json.dumps([description["config"], description["files"]], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old["config"]) | set(new["config"])):
        a, b = old["config"].get(key, "<absent>"), new["config"].get(key, "<absent>")
        if a != b:
            out.append(f"{key} was {_short(a)}, now {_short(b)}")
    for key in sorted(set(old.get("files", {})) & set(new["files"])):
        if old["files"][key] != new["files"][key]:
            out.append(f"the file of {key} ({new['config'].get(key)}) has other contents")
    old_steps, new_steps = old.get("num_steps"), new["num_steps"]
    if isinstance(old_steps, int) and isinstance(new_steps, int) and new_steps < old_steps:
        out.append(f"train.num_steps was {old_steps}, now {new_steps} (it may only be raised)")
    return out


def _recorded(workdir: str) -> dict[str, Any] | None:
    """The description recorded in the workdir: run.json, else a legacy config.json."""
    path = os.path.join(workdir, RUN_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("format") == FORMAT and "config" in data:
                return data
        except ValueError:
            pass
        aside = f"{path}.damaged-{_stamp()}"
        os.replace(path, aside)
        logger.warning("%s is damaged (moved to %s); rebuilding it", path, aside)
    legacy = os.path.join(workdir, "config.json")
    if os.path.exists(legacy):  # runs from before run.json: config.json is the last config
        try:
            with open(legacy) as f:
                resolved = json.load(f)
        except ValueError:
            return None
        flat = _flatten(resolved)
        extra = tuple(flat.get("fingerprint_ignore") or ())
        kept = {
            k: v for k, v in flat.items() if k != "train.num_steps" and not _is_neutral(k, extra)
        }
        return {"config": kept, "files": {}, "num_steps": flat.get("train.num_steps")}
    return None


def check_fingerprint(config, workdir: str, write: bool = True) -> str:
    """Raises `WorkdirMismatchError` if `workdir` holds a run of another config; else records
    this config's fingerprint (first start, or a raised num_steps) and returns it."""
    new = describe(config)
    old = _recorded(workdir)
    if old is not None:
        differences = _differences(old, new)
        if differences:
            more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
            raise WorkdirMismatchError(
                f"--workdir={workdir} holds a run of a different config: "
                f"{'; '.join(differences[:3])}{more}. Nothing was changed. Use another --workdir "
                "for the new config, or rerun with --restart to move the old run aside (to "
                f"{os.path.normpath(workdir)}.old-<time>) and start over."
            )
    record = {
        "format": FORMAT,
        "fingerprint": fingerprint(new),
        "num_steps": max(new["num_steps"] or 0, (old or {}).get("num_steps") or 0),
        "config": new["config"],
        "files": new["files"],
        "created": (old or {}).get("created", datetime.datetime.now().isoformat(" ", "seconds")),
    }
    if write and (old is None or old.get("format") != FORMAT or record != old):
        write_text_atomic(
            os.path.join(workdir, RUN_FILE), json.dumps(record, indent=2, sort_keys=True) + "\n"
        )
    return record["fingerprint"]


def move_aside(workdir: str) -> str | None:
    """Renames `workdir` to `<workdir>.old-<time>` (nothing is deleted); returns the new path,
    or None if there was nothing to move. Raises `WorkdirLockedError` if a run holds it."""
    workdir = os.path.normpath(workdir)
    if not os.path.exists(workdir):
        return None
    if os.path.isdir(workdir):
        holder = WorkdirLock.holder(workdir)
        if holder is not None:
            raise WorkdirLockedError(
                f"cannot --restart {workdir}: it is in use by {holder}. Stop that run first."
            )
    target, suffix = f"{workdir}.old-{_stamp()}", 0
    while os.path.exists(target + (f"-{suffix}" if suffix else "")):
        suffix += 1
    target += f"-{suffix}" if suffix else ""
    os.rename(workdir, target)
    logger.warning("--restart: moved the old run %s to %s", workdir, target)
    return target


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `<workdir>/run.lock` (pid, host) for the run."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.enabled = enabled
        self._fd: int | None = None

    @staticmethod
    def _describe(path: str) -> str:
        try:
            with open(path) as f:
                info = json.load(f)
            return f"pid {info['pid']} on host {info['host']} (since {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    @classmethod
    def holder(cls, workdir: str) -> str | None:
        """Who holds the lock of `workdir` now (a live process), or None."""
        path = os.path.join(workdir, LOCK_FILE)
        if not os.path.exists(path):
            return None
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return cls._describe(path)
        finally:
            os.close(fd)  # also drops a lock taken just now
        return None

    def __enter__(self) -> WorkdirLock:
        if not self.enabled:
            return self
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise WorkdirLockedError(
                    f"--workdir={os.path.dirname(self.path)} is in use by "
                    f"{self._describe(self.path)}: two runs in one workdir would overwrite each "
                    f"other. Wait for it to finish or stop it, or use another --workdir. (The "
                    f"lock is {self.path}; a lock of a dead process is taken over by itself.)"
                ) from None
            try:  # the file may have been unlinked by its previous holder meanwhile
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale = os.fstat(fd).st_size > 0
            if stale:
                logger.info(
                    "taking over the lock of a run that ended: %s", self._describe(self.path)
                )
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(" ", "seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            self._fd = fd
            return self
        raise WorkdirLockedError(f"cannot take the lock {self.path}: it keeps changing")

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


__all__ = [
    "LOCK_FILE",
    "NEUTRAL_KEYS",
    "RUN_FILE",
    "WorkdirLock",
    "WorkdirLockedError",
    "WorkdirMismatchError",
    "check_fingerprint",
    "describe",
    "move_aside",
    "write_text_atomic",
]
