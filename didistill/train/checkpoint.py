"""Checkpoints of the engine state: a thin layer over orbax's `CheckpointManager`.

Layout: `<workdir>/checkpoints/<step>/{state, meta}`, where `state` is the `EngineState` pytree
(orbax `StandardSave`, one tensorstore per array, written by every process for its shards) and
`meta` a small JSON dict (`JsonSave`). Saves are asynchronous (the device-to-host copy happens
before `save` returns, the file writes in the background); `wait()`/`close()` block on them.
The newest `keep` checkpoints are kept (`LatestN`), and with `keep_period` > 0 also every
checkpoint whose step is a multiple of it (`EveryNSteps`; for FID-vs-step curves).

Restoring (`restore_latest`) reads onto the shardings carried by an abstract tree of
`jax.ShapeDtypeStruct`s, newest step first:

- if a checkpoint's metadata shows a different tree or different shapes than the abstract
  state, the directory was written by another config: `CheckpointError`, nothing is touched;
- every file of the step directory is read first. An `OSError` there (permissions, I/O error,
  a vanished mount) is "cannot read", not "corrupt": `CheckpointError` naming the file and the
  OS error, and nothing is renamed;
- if a checkpoint is corrupt (a file's SHA-256 differs from the checksum manifest written
  after the save, orbax cannot decode it, or a restored float array holds NaN/inf), a warning
  is logged and its step directory is renamed `corrupt_<step>_<time>` (kept for inspection,
  and out of the way so the step can be saved again); the next older checkpoint is tried, and
  the warning of the one finally used names both;
- if checkpoints existed and none is usable, `CheckpointError`: a run never restarts from step
  0 on its own over a run that had checkpoints.

Checksums: once a save is on disk (checked at each log point, before the next save, in `wait()`
and `close()`),
process 0 writes `<step>/didistill.sha256.json`, the SHA-256 of every file of the step. A
checkpoint without one (killed between the save and the manifest, or from an older version)
is restored unverified but still checked for finite values.

A good checkpoint is never deleted here except by `LatestN` rotation after a newer save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from didistill.train import files, workdir
from didistill.train.errors import CheckpointError

logger = logging.getLogger(__name__)

PyTree = Any


class Restored(NamedTuple):
    step: int
    state: PyTree
    meta: dict[str, Any]


def _leaf_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes_by_path(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} with NamedTuple fields, dict keys and list indices as plain strings."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(leaf.shape)
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            shape = jax.eval_shape(jax.random.key_data, leaf).shape  # stored as raw key data
        out[tuple(_leaf_name(e) for e in path)] = shape
    return out


def _difference(saved: dict, wanted: dict) -> str | None:
    """One line describing how two {path: shape} maps differ, or None if they match."""
    for path in sorted(set(saved) | set(wanted)):
        name = "/".join(path)
        if path not in saved:
            return f"'{name}' is missing from the checkpoint"
        if path not in wanted:
            return f"the checkpoint has '{name}', which this config's state lacks"
        if saved[path] != wanted[path]:
            return f"'{name}' has shape {saved[path]} in the checkpoint, {wanted[path]} here"
    return None


MANIFEST = "didistill.sha256.json"
_UNREADABLE = ("PERMISSION_DENIED", "Permission denied", "Input/output error", "UNAVAILABLE")


class Unreadable(Exception):
    """A checkpoint file cannot be read (an OS problem, not corrupt data)."""


class Corrupt(Exception):
    """A checkpoint's data is damaged."""


def _open_for_read(path: str):
    """The file opened for reading in binary; a seam for the fault tests (root ignores chmod)."""
    return files.open_file(path, "rb")


def _relative(path: str, directory: str) -> str:
    return path[len(directory.rstrip("/")) + 1 :]


def _files(directory: str) -> list[str]:
    return sorted(p for p in files.walk_files(directory) if _relative(p, directory) != MANIFEST)


def _hash_files(directory: str) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` (the manifest excluded)."""
    out = {}
    for path in _files(directory):
        digest = hashlib.sha256()
        try:
            with _open_for_read(path) as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as err:
            raise Unreadable(f"{path}: {err.strerror or err}") from err
        out[_relative(path, directory)] = digest.hexdigest()
    return out


@jax.jit
def _nonfinite_counts(tree):
    return [jnp.sum(~jnp.isfinite(x)) for x in tree]


def _first_nonfinite(state) -> str | None:
    """The path of the first float leaf of `state` with a NaN/inf, or None."""
    leaves = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    if not leaves:
        return None
    counts = jax.device_get(_nonfinite_counts([leaf for _, leaf in leaves]))
    for (path, _), count in zip(leaves, counts, strict=True):
        if count:
            return f"'{'/'.join(_leaf_name(e) for e in path)}' holds {int(count)} NaN/inf values"
    return None


class Checkpointer:
    """Saves and restores `EngineState` pytrees under one directory. A context manager."""

    def __init__(self, directory: str, keep: int, async_save: bool = True, keep_period: int = 0):
        self.directory = files.absolute(directory)
        policies = ocp.checkpoint_managers
        policy = policies.LatestN(keep)
        if keep_period:
            policy = policies.AnyPreservationPolicy([policy, policies.EveryNSteps(keep_period)])
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = self._open()
        self._unsealed: set[int] = set()  # saved steps still without a checksum manifest

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=self._options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def set_aside_dirs(self) -> list[str]:
        """The step directories set aside earlier (corrupt_<step>_<time>)."""
        return [n for n in files.listdir(self.directory) if n.startswith("corrupt_")]

    def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> bool:
        """Starts saving `state` at `step`; returns False if that step is already saved."""
        if step in self._manager.all_steps():
            return False
        self._seal()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, step=step))
        )
        saved = self._manager.save(step, args=args, force=True)
        if saved:
            self._unsealed.add(step)
        return saved

    def seal_finished(self) -> None:
        """Writes the checksum manifests of saves already on disk, without waiting (single
        process; with several, at the next save, `wait()` or `close()`, which all call)."""
        if jax.process_count() > 1:
            return
        if self._unsealed and not self._manager.is_saving_in_progress():
            self._seal()

    def _seal(self) -> None:
        """Waits for pending saves, then writes the checksum manifest of each (process 0)."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in sorted(self._unsealed):
                directory = files.join(self.directory, str(step))
                if files.isdir(directory):  # not rotated away meanwhile
                    sums = _hash_files(directory)
                    workdir.write_text_atomic(
                        files.join(directory, MANIFEST), json.dumps(sums, indent=1) + "\n"
                    )
        self._unsealed.clear()

    def verify(self, step: int) -> None:
        """Raises `Unreadable` if a file of `step` cannot be read, `Corrupt` if a file differs
        from the checksum manifest (when there is one)."""
        directory = files.join(self.directory, str(step))
        sums = _hash_files(directory)
        manifest = files.join(directory, MANIFEST)
        if not files.exists(manifest):
            logger.info("checkpoint step %d has no checksum manifest: not verified", step)
            return
        try:
            with _open_for_read(manifest) as f:
                expected = json.loads(f.read())
        except OSError as err:
            raise Unreadable(f"{manifest}: {err.strerror or err}") from err
        except ValueError as err:
            raise Corrupt(f"its checksum manifest is damaged ({err})") from err
        for name in sorted(set(expected) | set(sums)):
            if name not in sums:
                raise Corrupt(f"file {name} is missing")
            if name in expected and expected[name] != sums[name]:
                raise Corrupt(f"file {name} does not match its SHA-256 checksum")

    def restore(self, step: int, abstract_state: PyTree) -> Restored:
        """Reads `step` onto the shardings of `abstract_state`, verified; raises `Unreadable`,
        `Corrupt` or `CheckpointError` (another config's checkpoint)."""
        self.verify(step)
        self._check_compatible(step, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except OSError as err:
            raise Unreadable(f"{files.join(self.directory, str(step))}: {err}") from err
        except Exception as err:  # orbax/tensorstore decoding errors
            text = str(err).splitlines()[0][:300] if str(err) else ""
            if any(marker in str(err) for marker in _UNREADABLE):
                raise Unreadable(f"{files.join(self.directory, str(step))}: {text}") from err
            raise Corrupt(f"{type(err).__name__}: {text}") from err
        bad = _first_nonfinite(restored.state)
        if bad is not None:
            raise Corrupt(bad)
        return Restored(step, restored.state, dict(restored.meta))

    def restore_latest(self, abstract_state: PyTree) -> Restored | None:
        """The newest usable checkpoint, setting corrupt ones aside; None if there is none.

        Raises `CheckpointError` if a checkpoint cannot be read (OS error, nothing renamed), if
        one belongs to another config, or if checkpoints existed and none was usable."""
        set_aside = []
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, abstract_state)
            except Unreadable as err:
                raise CheckpointError(
                    f"cannot read checkpoint step {step}: {err}. This is a storage or "
                    "permission problem, not corrupt data: nothing was renamed or deleted. Fix "
                    "access to the file and rerun the same command."
                ) from err
            except Corrupt as err:
                moved = self.set_aside(step)
                set_aside.append((step, moved))
                logger.warning(
                    "checkpoint step %d in %s is corrupt and cannot be read (%s); moved it to "
                    "%s and falling back to the previous checkpoint.",
                    step,
                    self.directory,
                    err,
                    moved,
                )
                continue
            if set_aside:
                logger.warning(
                    "using checkpoint step %d instead of step %d (set aside as %s)",
                    step,
                    set_aside[0][0],
                    set_aside[0][1],
                )
            return restored
        if set_aside or self.set_aside_dirs():
            aside = [os.path.basename(m) for _, m in set_aside] or self.set_aside_dirs()
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: the checkpoints there are corrupt "
                f"and were set aside ({', '.join(aside)}). The run does not restart from step "
                "0 on its own. Rerun with --restart to move this run aside and start over, or "
                "restore a good copy of a checkpoint into that directory."
            )
        return None

    def _check_compatible(self, step: int, abstract_state: PyTree) -> None:
        try:
            saved_tree = self._manager.item_metadata(step).state.tree
            saved = _shapes_by_path(saved_tree)
        except Exception:
            return  # unreadable metadata: let the restore fail and report it as corrupt
        difference = _difference(saved, _shapes_by_path(abstract_state))
        if difference is not None:
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} does not fit this config: "
                f"{difference}. It was written by a different config (network size, optimizer "
                "or method). Use a fresh --workdir, or rerun with the config that wrote it."
            )

    def set_aside(self, step: int, prefix: str = "corrupt") -> str:
        """Renames the step directory to <prefix>_<step>_<time>; returns the new path."""
        source = files.join(self.directory, str(step))
        target = files.join(self.directory, f"{prefix}_{step}_{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0 and files.exists(source):
            suffix = 0
            while files.exists(target + (f"_{suffix}" if suffix else "")):
                suffix += 1
            target += f"_{suffix}" if suffix else ""
            files.rename(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"didistill_set_aside_{step}")
        try:
            self._manager.close()
        except Exception:  # a manager that failed mid-read may not close cleanly
            pass
        self._manager = self._open()
        return target

    _set_aside = set_aside

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk (and checksummed)."""
        self._seal()

    def close(self) -> None:
        try:
            self._seal()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MANIFEST", "Checkpointer", "Corrupt", "Restored", "Unreadable"]
