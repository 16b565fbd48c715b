"""The contract between the training engine and a method.

A method (a teacher trainer, f-distill, DiDi-Instruct, logit KD, ...) is a bundle of pure
functions. The engine (`didistill.train.loop`) owns everything else: the mesh and shardings,
jit, the per-step key, the NaN guard, checkpoints, logging, progress and the final
evaluation. The engine knows nothing about any method.

    state  = method.init(key)                              # pytree of arrays only
    state, metrics = method.step(state, batch, key, step)  # pure; jitted by the engine
    results = method.evaluate(state, key, workdir)         # host side; may write PNGs
    results = method.periodic_evaluate(state, key, workdir, step)  # optional, every
                                           # config.eval.every steps, into metrics.jsonl
    for batch in method.batches(start_step): ...           # this process's rows

Rules:
- `state` holds arrays only (params, optimizer states, EMA params, counters). Frozen inputs
  (teacher params) are closed over by the method's factory and never enter the state, so they
  are never differentiated nor written into student checkpoints.
- `step` is pure: no host round-trips, no Python loops over batch elements. `key` is
  `fold_in(run_key, step)` computed by the engine inside jit; `step` is the int32 index of
  this step (0-based), for schedules and alternating updates. `metrics` is a flat dict of
  scalars; the engine skips a step whose metrics or new state are not finite.
- `batches(start_step)` yields one batch per step, starting at `start_step`, as a pytree of
  NumPy arrays whose leading axis holds this process's share of the global batch
  (`global_batch_size // jax.process_count()` rows). It must be deterministic in
  `start_step`, so a resumed run sees exactly the data an uninterrupted run would.
- `evaluate` returns a flat dict of JSON-serialisable numbers (and may write pictures into
  `workdir`); the engine writes it to `eval.json`. It runs on every process, outside jit and the
  mesh, with the final state copied onto the process's first device; only process 0 should
  write files (`jax.process_index() == 0`).

What a method may assume (see `didistill.train.loop`):
- `init` and `step` run under `jax.jit` inside `jax.set_mesh(mesh)`, the mesh of
  `config.mesh` (a `'data'` axis, plus `'model'` when `config.mesh.model > 1`) in Auto mode:
  the batch arrives sharded along its leading axis, the state replicated or, with
  `config.mesh.fsdp`, each leaf split along one dimension (`didistill.train.sharding`); XLA
  inserts the all-reduces and gathers, so no sharding code is needed (see docs/scale.md).
- `init` gets `fold_in(run_key, 2**32 - 1)`, `evaluate` gets `fold_in(run_key, 2**32 - 2)`,
  step `i` gets `fold_in(run_key, i)`, with `run_key = jax.random.key(config.seed)`.
- A step whose metrics or new state hold a NaN/inf is skipped: the old state is kept, but the
  step index advances and its batch is consumed. Metric names `step` and `nonfinite_*` are
  reserved; metrics are logged as means over `config.train.log_every` steps.
- The state is checkpointed as is (typed PRNG keys included), so its tree structure, shapes
  and dtypes must not change between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax

PyTree = Any


class Method(NamedTuple):
    """What a method hands the engine. See the module docstring for the contract."""

    init: Callable[[jax.Array], PyTree]
    step: Callable[[PyTree, PyTree, jax.Array, jax.Array], tuple[PyTree, dict[str, jax.Array]]]
    evaluate: Callable[[PyTree, jax.Array, str], dict[str, float]]
    batches: Callable[[int], Iterator[PyTree]]
    global_batch_size: int
    # optional: (state, key, workdir, step) -> flat dict, run like `evaluate` every
    # `config.eval.every` steps (0 or None: never); the engine writes it to metrics.jsonl
    periodic_evaluate: Callable[[PyTree, jax.Array, str, int], dict[str, float]] | None = None
