"""Checkpoints of the engine state: a thin layer over orbax's `CheckpointManager`.

Layout: `<workdir>/checkpoints/<step>/{state, meta}`, where `state` is the `EngineState` pytree
(orbax `StandardSave`, one tensorstore per array, written by every process for its shards) and
`meta` a small JSON dict (`JsonSave`). Saves are asynchronous (the device-to-host copy happens
before `save` returns, the file writes in the background); `wait()`/`close()` block on them.
The newest `keep` checkpoints are kept (`LatestN`).

Restoring (`restore_latest`) reads onto the shardings carried by an abstract tree of
`jax.ShapeDtypeStruct`s, newest step first:

- if a checkpoint's metadata shows a different tree or different shapes than the abstract
  state, the directory was written by another config: `CheckpointError`, nothing is touched;
- if a checkpoint cannot be read (truncated, corrupt, half deleted), a warning is logged and
  its step directory is renamed `corrupt_<step>_<time>` (kept for inspection, and out of the
  way so the step can be saved again); the next older checkpoint is tried.

A good checkpoint is never deleted here except by `LatestN` rotation after a newer save.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

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


class Checkpointer:
    """Saves and restores `EngineState` pytrees under one directory. A context manager."""

    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = self._open()

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

    def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> bool:
        """Starts saving `state` at `step`; returns False if that step is already saved."""
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, step=step))
        )
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: PyTree) -> Restored:
        """Reads `step` onto the shardings of `abstract_state`; raises on any failure."""
        self._check_compatible(step, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return Restored(step, restored.state, dict(restored.meta))

    def restore_latest(self, abstract_state: PyTree) -> Restored | None:
        """The newest readable checkpoint, setting corrupt ones aside; None if there is none."""
        for step in reversed(self.steps()):
            try:
                return self.restore(step, abstract_state)
            except CheckpointError:
                raise
            except Exception as err:  # any read failure means the same: unusable data
                moved = self._set_aside(step)
                logger.warning(
                    "checkpoint step %d in %s cannot be read (%s: %s); moved it to %s and "
                    "falling back to the previous checkpoint.",
                    step,
                    self.directory,
                    type(err).__name__,
                    str(err).splitlines()[0][:300] if str(err) else "",
                    moved,
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

    def _set_aside(self, step: int) -> str:
        """Renames the step directory to corrupt_<step>_<time>; returns the new path."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"corrupt_{step}_{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0 and os.path.exists(source):
            suffix = 0
            while os.path.exists(target + (f"_{suffix}" if suffix else "")):
                suffix += 1
            target += f"_{suffix}" if suffix else ""
            os.rename(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"didistill_set_aside_{step}")
        try:
            self._manager.close()
        except Exception:  # a manager that failed mid-read may not close cleanly
            pass
        self._manager = self._open()
        return target

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Checkpointer", "Restored"]
