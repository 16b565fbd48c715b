"""The training engine: `train(method, config, workdir)` runs a `Method` (see `method.py`).

What the engine does, in order:

1. Checks the engine config keys (`validate.py`, `config.mesh` in `sharding.py`), builds the
   mesh of `config.mesh` ('data' x 'model' over all devices) and checks that
   `method.global_batch_size` splits over the data axis and the processes.
2. Keys: `run_key = jax.random.key(config.seed)`; step `i` uses `fold_in(run_key, i)`, computed
   inside jit. `method.init` gets `fold_in(run_key, 2**32 - 1)` and `method.evaluate` gets
   `fold_in(run_key, 2**32 - 2)`: tags no step index reaches, so no key is used twice.
3. State shardings: `sharding.state_shardings` of the abstract state (`jax.eval_shape` of
   init): replicated, or split leaf by leaf with `config.mesh.fsdp` (and over a 'model' axis).
   Restores the newest readable checkpoint of `<workdir>/checkpoints` onto those shardings,
   or runs `method.init` under jit with them as `out_shardings`.
4. Loops from the restored step to `config.train.num_steps`: `method.batches(start)` rows ->
   global batch sharded on 'data' -> the guarded step (`state.py`), jitted with the state
   donated and in/out shardings from the rule (XLA inserts the all-gathers and reductions).
   Nothing is fetched to the host between log points: every `log_every` steps (and at the
   last step) the report of the current window is fetched, written to `metrics.jsonl`,
   logged, and checked for a run of non-finite steps.
5. Every `config.eval.every` steps (if > 0 and the method has `periodic_evaluate`) runs it on
   a gathered copy of the state with `fold_in(eval_key, step)` and writes its dict to
   `metrics.jsonl` as a line of that step (before that step's checkpoint, so a resumed run
   redoes it if needed; its time is not counted in `steps_per_sec`). Saves a checkpoint
   every `checkpoint_every` steps and at the end; with
   `config.train.keep_period` > 0 every checkpoint at a multiple of it is kept too. On
   SIGTERM/SIGINT it saves at the current step and returns with `preempted=True` (no
   evaluation).
6. Runs `method.evaluate` on every process, outside the mesh context, with a copy of the final
   state (gathered if sharded) on the process's first device (so eager code can mix it with
   local arrays), and writes `eval.json`; a rerun of a finished run reuses an `eval.json` of
   the same step.

Run directory (only process 0 writes the files; every process writes its checkpoint shards):

    <workdir>/run.json                the config's fingerprint (`workdir.py`), first start
    <workdir>/run.lock                pid and host of the run using the directory (flock)
    <workdir>/config.json             the resolved config of the latest start
    <workdir>/metrics.jsonl           one JSON object a line: {"step": S, <metric means>, ...}
    <workdir>/checkpoints/<S>/        orbax checkpoints (state + meta), newest keep_checkpoints
    <workdir>/checkpoints/corrupt_<S>_<time>/   corrupt checkpoints, set aside
    <workdir>/checkpoints/nonfinite_<S>_<time>/ checkpoints after which every step was NaN/inf
    <workdir>/eval.json               {"step": S, <method.evaluate results>}
    <workdir>/*.png ...               whatever method.evaluate writes

A "step" in files and logs counts completed steps: the line and checkpoint labelled S come
after steps 0..S-1. Rerunning the same command resumes from the latest checkpoint; the metrics
lines and final state are then bit-identical to those of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from didistill.train import files, reporting, sharding, writers
from didistill.train import workdir as workdir_lib
from didistill.train.checkpoint import Checkpointer, Corrupt, Unreadable
from didistill.train.errors import CheckpointError, ConfigError, NonFiniteError
from didistill.train.method import Method
from didistill.train.preemption import PreemptionWatcher
from didistill.train.state import (
    EngineState,
    check_metrics,
    init_state,
    init_window,
    make_train_step,
    window_from_json,
    window_to_json,
)
from didistill.train.validate import validate_config

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
CHECKPOINT_DIR = "checkpoints"
INIT_KEY_TAG = 2**32 - 1
EVAL_KEY_TAG = 2**32 - 2
MAX_ROLLBACKS = 3  # checkpoints set aside by the NaN guard before the run stops


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(run_key, init_key, eval_key) of a run (process-local arrays)."""
    run_key = jax.random.key(seed)
    return (
        run_key,
        jax.random.fold_in(run_key, INIT_KEY_TAG),
        jax.random.fold_in(run_key, EVAL_KEY_TAG),
    )


def _init_fn(method: Method, seed: int):
    """() -> EngineState; the keys are made inside, so that jit can place every output."""
    return lambda: init_state(method.init(run_keys(seed)[1]))


def check_config(config) -> tuple[int, int, bool]:
    """Raises `ConfigError` for a bad engine key (mesh included); returns (data, model, fsdp)."""
    data, model, fsdp = sharding.check_mesh_config(config.mesh, jax.device_count())
    validate_config(config, data, jax.process_count())  # the batch splits over the data axis
    return data, model, fsdp


def state_shardings(method: Method, seed: int, mesh, fsdp: bool):
    """(abstract state with shardings, the pytree of shardings) for `method` on `mesh`."""
    abstract = jax.eval_shape(_init_fn(method, seed))
    shardings = sharding.state_shardings(abstract, mesh, fsdp)
    return sharding.with_sharding(abstract, shardings), shardings


def load_checkpoint(method: Method, config, workdir: str, step: int | None = None):
    """(step, method_state) of a run's checkpoint (the latest if `step` is None), replicated
    over all devices (also when it was saved sharded). For sampling or evaluating a trained
    model outside `train`."""
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    if not files.isdir(ckpt_dir):
        raise CheckpointError(f"no checkpoints in {workdir}: {ckpt_dir} does not exist")
    mesh = sharding.mesh_from_config(config.mesh)
    abstract = jax.eval_shape(_init_fn(method, config.seed))
    abstract = sharding.with_sharding(abstract, sharding.replicated(mesh))
    with Checkpointer(ckpt_dir, config.train.keep_checkpoints, **_keep(config)) as c:
        step = c.latest_step() if step is None else step
        if step is None or step not in c.steps():
            raise CheckpointError(f"no checkpoint {'' if step is None else step} in {c.directory}")
        try:
            restored = c.restore(step, abstract)
        except (Corrupt, Unreadable) as err:
            raise CheckpointError(f"checkpoint step {step} in {c.directory}: {err}") from err
    return restored.step, restored.state.method_state


def _keep(config) -> dict:
    return {"keep_period": config.train.get("keep_period", 0) or 0}


def _eval_every(config, method: Method) -> int:
    evaluation = config.get("eval")
    every = (evaluation.get("every", 0) if evaluation is not None else 0) or 0
    return every if method.periodic_evaluate is not None else 0


class _Loop:
    """The stepping part of `train`, split into small methods sharing the run's objects."""

    def __init__(self, method, config, mesh, state_sharding, ckpt, writer, watcher, workdir=""):
        self.method, self.tc, self.config = method, config.train, config
        self.ckpt, self.writer, self.watcher = ckpt, writer, watcher
        self.replicated = sharding.replicated(mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.local_rows = sharding.check_batch(method.global_batch_size, mesh)
        self.run_key = sharding.replicate(lambda: run_keys(config.seed)[0], self.replicated)
        rep = self.replicated
        self.train_step = jax.jit(
            make_train_step(method.step, self.tc.log_every),
            donate_argnums=(0, 1),
            in_shardings=(state_sharding, rep, self.batch_sharding, rep),
            out_shardings=(state_sharding, rep, rep),
        )
        self.last_line = None
        self.eval_every = _eval_every(config, method)
        self.workdir = workdir

    def periodic_evaluate(self, state: EngineState, step: int) -> None:
        """`method.periodic_evaluate` at `step`, written to metrics.jsonl."""
        local = sharding.local_copy(sharding.gather(state.method_state, self.replicated.mesh))
        key = jax.random.fold_in(run_keys(self.config.seed)[2], step)
        results = self.method.periodic_evaluate(local, key, self.workdir, step)
        results = reporting.to_jsonable(dict(results or {}))
        self.writer.write(step, results)
        logger.info("eval at step %d | %s", step, reporting.format_metrics(results))

    def run(self, state: EngineState, start: int, window_json) -> tuple[EngineState, int, bool]:
        """Steps from `start` to num_steps; returns (state, step, preempted)."""
        tc = self.tc
        batches = iter(self.method.batches(start))
        step, window, report = start, None, None
        clock = (time.perf_counter(), start)
        preempted = False
        show = tc.progress and jax.process_index() == 0
        with reporting.progress_bar(tc.num_steps, start, show) as bar:
            while step < tc.num_steps:
                if self.watcher.requested(step):
                    preempted = True
                    break
                batch = self._next_batch(batches, start, step)
                if window is None:
                    window = self._first_window(state, batch, window_json)
                state, window, report = self.train_step(state, window, batch, self.run_key)
                step += 1
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.num_steps:
                    clock = self._log(step, report, clock)
                    self.ckpt.seal_finished()  # checksum the saves that are on disk
                if self.eval_every and step % self.eval_every == 0:
                    began = time.perf_counter()
                    self.periodic_evaluate(state, step)
                    # steps/s counts training only: move the window's start past the evaluation
                    clock = (clock[0] + time.perf_counter() - began, clock[1])
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    self.save(state, step, window)
        self.save(state, step, window, window_json)
        return state, step, preempted

    def _next_batch(self, batches, start: int, step: int):
        try:
            local = next(batches)
        except StopIteration:
            raise ValueError(
                f"method.batches({start}) stopped after {step - start} batches; it must yield "
                f"one batch per step up to config.train.num_steps={self.tc.num_steps}"
            ) from None
        return sharding.global_batch(local, self.batch_sharding, self.local_rows)

    def _first_window(self, state: EngineState, batch, window_json):
        """The log window: restored from the checkpoint if its metric names still match."""
        _, metrics = jax.eval_shape(
            self.method.step, state.method_state, batch, self.run_key, state.step
        )
        check_metrics(metrics)
        names = sorted(metrics)
        if window_json is not None and sorted(window_json["sums"]) == names:
            return sharding.replicate(lambda: window_from_json(window_json), self.replicated)
        if window_json is not None:
            logger.warning("the method's metric names changed: starting a new log window")
        return sharding.replicate(lambda: init_window(names), self.replicated)

    def _log(self, step: int, report, clock):
        values = reporting.to_jsonable(jax.device_get(report))
        now = time.perf_counter()
        rate = (step - clock[1]) / max(now - clock[0], 1e-9)
        extra = {"steps_per_sec": rate, "wall_time": time.time()}  # writers.TIMING_KEYS
        line = {**values, **extra, **writers.learning_rates(self.config, step)}
        self.writer.write(step, line)
        self.last_line = {"step": step, **line}
        logger.info(
            "step %d/%d | %s | %.3g steps/s",
            step,
            self.tc.num_steps,
            reporting.format_metrics(values),
            rate,
        )
        self._check_nonfinite(values["nonfinite_consecutive"], step)
        return now, step

    def _check_nonfinite(self, consecutive: int, step: int) -> None:
        limit = self.tc.max_nonfinite_steps
        if consecutive < limit:
            return
        self.ckpt.wait()
        last_good = self.ckpt.latest_step()
        where = (
            f"its last checkpoint, step {last_good} in {self.ckpt.directory}, is kept"
            if last_good is not None
            else "no checkpoint was saved"
        )
        raise NonFiniteError(
            step - consecutive,
            f"training stopped at step {step}: the last {consecutive} steps (indices "
            f"{step - consecutive}..{step - 1}) gave NaN/inf metrics or parameters and were "
            f"skipped (config.train.max_nonfinite_steps={limit}); {where}. What to do: lower the "
            "learning rate, clip gradients (optimizer grad_clip_norm), or check the data and "
            "teacher; then rerun the same command to resume from the checkpoint (or raise "
            "--config.train.max_nonfinite_steps).",
        )

    def save(self, state: EngineState, step: int, window, window_json=None) -> None:
        """Checkpoint at `step` (unless saved already), refusing during a non-finite streak."""
        if step in self.ckpt.steps():
            return
        self._check_nonfinite(int(jax.device_get(state.nonfinite_consecutive)), step)
        window_json = window_to_json(window) if window is not None else window_json
        self.ckpt.save(step, state, {"window": window_json})
        logger.info("saving checkpoint at step %d", step)


def _write_config(config, workdir: str) -> None:
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    reporting.write_json(os.path.join(workdir, CONFIG_FILE), resolved)


def _previous_eval(eval_path: str, is_main: bool) -> dict | None:
    """The contents of eval.json; None (and the file set aside) if it is damaged."""
    if not files.exists(eval_path):
        return None
    try:
        previous = reporting.read_json(eval_path)
        if isinstance(previous, dict) and isinstance(previous.get("step"), int):
            return previous
        problem = "it holds no step"
    except ValueError as err:
        problem = f"invalid JSON: {err}"
    aside = f"{eval_path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    if is_main:
        files.replace(eval_path, aside)
    logger.warning(
        "%s is damaged (%s); moved it to %s and evaluating the final checkpoint again",
        eval_path,
        problem,
        aside,
    )
    return None


def _evaluate(method: Method, state, step: int, eval_key, workdir: str, is_main: bool, mesh):
    eval_path = os.path.join(workdir, EVAL_FILE)
    previous = _previous_eval(eval_path, is_main)
    if previous is not None:
        if previous.get("step") == step:
            logger.info("eval.json already holds step %d: not evaluating again", step)
            return {k: v for k, v in previous.items() if k != "step"}
    logger.info("evaluating at step %d", step)
    # eager code may mix it with local arrays; a sharded (FSDP) state is gathered first
    local_state = sharding.local_copy(sharding.gather(state, mesh))
    results = reporting.to_jsonable(dict(method.evaluate(local_state, eval_key, workdir)))
    if is_main:
        reporting.write_json(eval_path, {**results, "step": step})
    logger.info("eval | %s", reporting.format_metrics(results))
    return results


def _check_paths(workdir: str) -> None:
    """Clear errors for a workdir (or its checkpoints folder) that cannot be a directory."""
    if not workdir or not workdir.strip():
        raise ConfigError("--workdir is empty: give the run directory, e.g. --workdir=runs/toy")
    if files.exists(workdir) and not files.isdir(workdir):
        raise ConfigError(
            f"--workdir={workdir} is a file, not a directory: pass another --workdir (or move "
            "the file away)."
        )
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    if files.exists(ckpt_dir) and not files.isdir(ckpt_dir):
        raise ConfigError(
            f"{ckpt_dir} is a file, not a directory: move it away (checkpoints are saved in "
            "that directory), or use another --workdir."
        )


def _all_processes_agree(ok: bool) -> bool:
    """Process 0's `ok`, on every process (so that all stop together)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def train(method: Method, config, workdir: str) -> dict[str, Any]:
    """Trains `method` as `config.train` says, in `workdir`; resumes if it holds checkpoints.

    Returns {"step": steps done, "preempted": bool, "metrics": the last metrics line (or None),
    "eval": method.evaluate results (None if preempted), "state": the final method state, on
    the run's state shardings (split over devices with config.mesh.fsdp)}.
    Raises ConfigError for bad engine keys, WorkdirMismatchError if the workdir holds a run of
    another config (`workdir.py`), WorkdirLockedError if another run uses it, CheckpointError if
    the checkpoints cannot be read or none is usable, NonFiniteError after
    max_nonfinite_steps consecutive non-finite steps (after up to MAX_ROLLBACKS fallbacks to
    older checkpoints, when the checkpoint resumed from is what produced them).
    """
    _, _, fsdp = check_config(config)
    writers.backend_names(config)  # a bad config.logging.backends fails before any work
    writers.show_info_logs()
    mesh = sharding.mesh_from_config(config.mesh)
    sharding.check_batch(method.global_batch_size, mesh)
    is_main = jax.process_index() == 0
    _check_paths(workdir)
    workdir_lib.check_fingerprint(config, workdir, write=False)  # before touching anything
    files.makedirs(workdir)
    lock = workdir_lib.WorkdirLock(workdir, enabled=is_main)
    try:
        lock.__enter__()
        locked = True
    except workdir_lib.WorkdirLockedError:
        if jax.process_count() == 1:
            raise
        locked = False
    if not _all_processes_agree(locked):
        lock.__exit__(None, None, None)
        raise workdir_lib.WorkdirLockedError(f"--workdir={workdir} is in use by another run")
    try:
        workdir_lib.check_fingerprint(config, workdir, write=is_main)  # under the lock
        if is_main:
            _write_config(config, workdir)
        return _train_locked(method, config, workdir, mesh, fsdp, is_main)
    finally:
        lock.__exit__(None, None, None)


def _train_locked(method: Method, config, workdir: str, mesh, fsdp: bool, is_main: bool):
    eval_key = run_keys(config.seed)[2]
    abstract, state_sharding = state_shardings(method, config.seed, mesh, fsdp)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)

    rollbacks: list[str] = []
    keep = config.train.keep_checkpoints
    with jax.set_mesh(mesh), Checkpointer(ckpt_dir, keep, **_keep(config)) as ckpt:
        while True:
            restored = ckpt.restore_latest(abstract)
            if restored is None:
                logger.info(
                    "new run in %s (%d devices, mesh %s, fsdp=%s)",
                    workdir,
                    jax.device_count(),
                    dict(mesh.shape),
                    fsdp,
                )
                state = sharding.replicate(_init_fn(method, config.seed), state_sharding)
                start, window_json = 0, None
            else:
                logger.info("resuming from the checkpoint at step %d", restored.step)
                if restored.step > config.train.num_steps:
                    logger.warning(
                        "the checkpoint is past config.train.num_steps=%d: nothing to train",
                        config.train.num_steps,
                    )
                state, start = restored.state, restored.step
                window_json = restored.meta.get("window")
            metrics_path = os.path.join(workdir, METRICS_FILE)
            writer = writers.make_writers(config, workdir, metrics_path, start, is_main)
            try:
                with PreemptionWatcher() as watcher:  # also covers the wait for the last save
                    loop = _Loop(
                        method, config, mesh, state_sharding, ckpt, writer, watcher, workdir
                    )
                    state, step, preempted = loop.run(state, start, window_json)
                    ckpt.wait()
            except NonFiniteError as err:
                # Resuming from this checkpoint gave only non-finite steps: the checkpoint
                # itself is suspect (training is deterministic, so a streak that starts later
                # would come back from any older checkpoint too).
                if restored is None or err.first_bad_step != restored.step:
                    raise
                if len(rollbacks) >= MAX_ROLLBACKS:
                    raise NonFiniteError(
                        err.first_bad_step,
                        f"{err} Already fell back {len(rollbacks)} times (set aside: "
                        f"{', '.join(rollbacks)}): stopping.",
                    ) from err
                ckpt.wait()
                moved = ckpt.set_aside(restored.step, prefix="nonfinite")
                rollbacks.append(os.path.basename(moved))
                logger.warning(
                    "every step after the checkpoint at step %d was non-finite: moved it to %s "
                    "and falling back to the previous checkpoint (fallback %d of at most %d)",
                    restored.step,
                    moved,
                    len(rollbacks),
                    MAX_ROLLBACKS,
                )
                continue
            finally:
                writer.close()
            break
    result = {"step": step, "preempted": preempted, "metrics": loop.last_line, "eval": None}
    if preempted:
        logger.warning("stopped at step %d on request; rerun the same command to resume", step)
    else:  # outside the mesh context: evaluate's eager code runs on this process's devices
        result["eval"] = _evaluate(
            method, state.method_state, step, eval_key, workdir, is_main, mesh
        )
    result["state"] = state.method_state
    return result


__all__ = ["check_config", "load_checkpoint", "run_keys", "state_shardings", "train"]
