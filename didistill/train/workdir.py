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
  `kill -9`), so a lock left by a dead run is taken over, and a second live run stops. On an
  object store (`gs://`, no flock) the lock is best-effort: a heartbeat in the file.
- **Atomic files** (`write_text_atomic`, from `files.py`): a reader sees the old file or the
  new one, never half. Every file operation goes through `files.py` (`etils.epath`), so a
  workdir may be local or on `gs://`.
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
import threading
import time
import uuid
from typing import Any

from didistill.train import files
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


write_text_atomic = files.write_text_atomic  # kept here: callers import it from workdir


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _is_neutral(key: str, extra: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in (*NEUTRAL_KEYS, *extra))


def describe(config) -> dict[str, Any]:
    """{"config": flat fingerprinted keys, "files": {key: sha256}, "num_steps": N}."""
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    flat = _flatten(resolved)
    extra = tuple(flat.get("fingerprint_ignore") or ())
    num_steps = flat.get("train.num_steps")
    kept = {k: v for k, v in flat.items() if k != "train.num_steps" and not _is_neutral(k, extra)}
    hashes = {
        key: files.sha256_file(value)
        for key, value in kept.items()
        if isinstance(value, str) and value and os.path.isfile(value)
    }
    return {"config": kept, "files": hashes, "num_steps": num_steps}


def fingerprint(description: dict[str, Any]) -> str:
    body = json.dumps([description["config"], description["files"]], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Config keys added to the library after workdirs existed, with the value that does what the
# library did before the key existed: a run recorded without the key matches a config with
# that value. Add a key here when adding it to a config with a neutral default.
ADDED_KEYS = {
    "data.tokens_dir": "",  # pre-tokenised shards (data/token_shards.py)
    "data.heldout_tokens_dir": "",
    "data.imbalance": 0.0,  # class-imbalanced digits (data/imbalance.py)
    "data.imbalance_seed": 0,
}


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old["config"]) | set(new["config"])):
        a, b = old["config"].get(key, "<absent>"), new["config"].get(key, "<absent>")
        if key not in old["config"] and key in ADDED_KEYS and b == ADDED_KEYS[key]:
            continue  # a key added to the library since that run, at its neutral value
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
    path = files.join(workdir, RUN_FILE)
    if files.exists(path):
        try:
            data = json.loads(files.read_text(path))
            if isinstance(data, dict) and data.get("format") == FORMAT and "config" in data:
                return data
        except ValueError:
            pass
        aside = f"{path}.damaged-{_stamp()}"
        files.replace(path, aside)
        logger.warning("%s is damaged (moved to %s); rebuilding it", path, aside)
    legacy = files.join(workdir, "config.json")
    if files.exists(legacy):  # runs from before run.json: config.json is the last config
        try:
            resolved = json.loads(files.read_text(legacy))
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
                f"{files.normalize(workdir)}.old-<time>) and start over."
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
            files.join(workdir, RUN_FILE), json.dumps(record, indent=2, sort_keys=True) + "\n"
        )
    return record["fingerprint"]


def move_aside(workdir: str) -> str | None:
    """Renames `workdir` to `<workdir>.old-<time>` (nothing is deleted); returns the new path,
    or None if there was nothing to move. Raises `WorkdirLockedError` if a run holds it."""
    workdir = files.normalize(workdir)
    if not files.exists(workdir):
        return None
    if files.isdir(workdir):
        holder = WorkdirLock.holder(workdir)
        if holder is not None:
            raise WorkdirLockedError(
                f"cannot --restart {workdir}: it is in use by {holder}. Stop that run first."
            )
    target, suffix = f"{workdir}.old-{_stamp()}", 0
    while files.exists(target + (f"-{suffix}" if suffix else "")):
        suffix += 1
    target += f"-{suffix}" if suffix else ""
    files.rename(workdir, target)
    logger.warning("--restart: moved the old run %s to %s", workdir, target)
    return target


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `<workdir>/run.lock` (pid, host) for the run.

    Two kinds, chosen by the path (`kind=` forces one, for tests):
    - "flock" (local paths): the file is held with `fcntl.flock`, which the kernel drops when
      the process dies (also on `kill -9`): exact, and a dead run's lock is taken over at once.
    - "heartbeat" (object stores, `gs://`: no flock there), best-effort: the holder rewrites
      the file every `HEARTBEAT_S` seconds with the time. A lock counts as held while its
      holder is alive: its heartbeat is newer than `STALE_S` and, on this host, its pid
      exists. Two starts within about a second of each other may both get it (the
      store has no atomic create here); a run killed by `kill -9` on another host blocks the
      workdir for up to `STALE_S` (or until run.lock is deleted by hand).
    """

    HEARTBEAT_S = 30.0
    STALE_S = 120.0
    SETTLE_S = 1.0  # heartbeat kind: wait, then read back, so a racing writer is noticed

    def __init__(self, workdir: str, enabled: bool = True, kind: str | None = None):
        self.path = files.join(workdir, LOCK_FILE)
        self.enabled = enabled
        self.kind = kind or ("flock" if files.is_local(workdir) else "heartbeat")
        self._fd: int | None = None
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _read(path: str) -> dict | None:
        try:
            info = json.loads(files.read_text(path))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    @classmethod
    def _describe(cls, path: str) -> str:
        info = cls._read(path) or {}
        try:
            return f"pid {info['pid']} on host {info['host']} (since {info['started']})"
        except KeyError:
            return "another process"

    @classmethod
    def _alive(cls, info: dict | None) -> bool:
        """Heartbeat kind: whether the holder described by `info` still runs: a heartbeat
        younger than STALE_S, and on this host also a live pid (so a dead run on this host is
        taken over at once, and a reused pid with an old heartbeat is not mistaken for it)."""
        if not info:
            return False
        beat = info.get("heartbeat")
        if not isinstance(beat, int | float) or time.time() - beat >= cls.STALE_S:
            return False
        return info.get("host") != socket.gethostname() or _pid_alive(info.get("pid"))

    @classmethod
    def holder(cls, workdir: str, kind: str | None = None) -> str | None:
        """Who holds the lock of `workdir` now (a live process), or None."""
        path = files.join(workdir, LOCK_FILE)
        if not files.exists(path):
            return None
        if (kind or ("flock" if files.is_local(workdir) else "heartbeat")) == "heartbeat":
            return cls._describe(path) if cls._alive(cls._read(path)) else None
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

    def _locked_error(self) -> WorkdirLockedError:
        dead = (
            "a lock of a dead process is taken over by itself"
            if self.kind == "flock"
            else f"on this host a lock of a dead process is taken over at once, from another "
            f"host once its heartbeat is {self.STALE_S:.0f} s old; delete the file if that run "
            "is dead and you cannot wait"
        )
        return WorkdirLockedError(
            f"--workdir={self.path.rpartition('/')[0]} is in use by "
            f"{self._describe(self.path)}: two runs in one workdir would overwrite each "
            f"other. Wait for it to finish or stop it, or use another --workdir. (The "
            f"lock is {self.path}; {dead}.)"
        )

    def _info(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(" ", "seconds"),
        }

    def __enter__(self) -> WorkdirLock:
        if not self.enabled:
            return self
        if self.kind == "heartbeat":
            return self._enter_heartbeat()
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise self._locked_error() from None
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
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self._info()) + "\n").encode(), 0)
            self._fd = fd
            return self
        raise WorkdirLockedError(f"cannot take the lock {self.path}: it keeps changing")

    def _write_heartbeat(self, started: str) -> None:
        info = {**self._info(), "started": started, "token": self._token, "heartbeat": time.time()}
        files.write_text_atomic(self.path, json.dumps(info) + "\n")

    def _enter_heartbeat(self) -> WorkdirLock:
        previous = self._read(self.path) if files.exists(self.path) else None
        if self._alive(previous):
            raise self._locked_error()
        if previous is not None:
            logger.info("taking over the lock of a run that ended: %s", self._describe(self.path))
        self._token = uuid.uuid4().hex
        started = self._info()["started"]
        self._write_heartbeat(started)
        time.sleep(self.SETTLE_S)
        if (self._read(self.path) or {}).get("token") != self._token:  # another start won
            self._token = None
            raise self._locked_error()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, args=(started,), name="didistill-lock-heartbeat", daemon=True
        )
        self._thread.start()
        return self

    def _beat(self, started: str) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                self._write_heartbeat(started)
            except Exception:  # a transient store error: the next beat tries again
                logger.warning("could not refresh the lock %s", self.path, exc_info=True)

    def __exit__(self, *exc) -> None:
        if self._token is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            with contextlib.suppress(OSError):
                if (self._read(self.path) or {}).get("token") == self._token:
                    files.remove(self.path)
            self._token = None
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
