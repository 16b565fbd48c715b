"""The mesh and the shardings the engine uses: data parallelism, optionally FSDP.

The mesh comes from `config.mesh` (`mesh_from_config`): axes `'data'` and `'model'` with
`data * model` = every device of every process (`data=-1`: all devices left after `model`).
With `model=1` the mesh is 1-D, axis `'data'` only, exactly the data-parallel mesh of before.
`jax.make_mesh` picks a topology-aware device order; the axes are `AxisType.Auto`: the compiler
propagates shardings inside the step, so a method's code needs no sharding annotations (in
`Explicit` mode `jax.random.*` calls would need an `out_sharding=`). A method may still call
`jax.lax.with_sharding_constraint(x, jax.P('data'))`: the engine runs under `jax.set_mesh`.

A batch is split along its leading axis over `'data'`, `NamedSharding(mesh, P('data'))`
(replicated over `'model'`). The train state follows one rule (`state_shardings`):

- `fsdp=False`, `model=1`: every leaf replicated, `P()`. XLA inserts the gradient all-reduce.
- `fsdp=True` (ZeRO-3 style): every state leaf (params, optimizer moments, EMA) is split
  along its largest dimension that divides by the number of devices of the parameter axes
  (usually the largest dimension itself; for a vocabulary embedding [50258, 768] the 768);
  leaves with no such dimension (scalars, small biases) are replicated. XLA gathers the
  weights where the step uses them and reduce-scatters the gradients.
- The parameter axes are `('data',)` with FSDP, plus `'model'` when `model > 1` (so a model
  axis shards the state by the same rule, with or without FSDP). With both, a leaf is split
  over `('data', 'model')` if one of its dimensions divides by `data * model`, else over
  one single axis by the same rule.

Multi-host: each process holds `global_batch // process_count` rows of every batch;
`global_batch` assembles them into one global array with
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from didistill.train.errors import ConfigError
from didistill.train.validate import check_batch_divisible

DATA_AXIS = "data"
MODEL_AXIS = "model"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
    """(data, model) axis sizes for `config.mesh.data/model`; `ConfigError` if they don't fit."""
    if not _is_int(model) or model < 1 or num_devices % model:
        raise ConfigError(
            f"config.mesh.model={model!r} is invalid: the model axis size must divide the "
            f"{num_devices} devices. Valid choices: {_divisors(num_devices)}."
        )
    rest = num_devices // model
    if data == -1:
        return rest, model
    if not _is_int(data) or data != rest:
        raise ConfigError(
            f"config.mesh.data={data!r} is invalid: data * model must equal the {num_devices} "
            f"devices (config.mesh.model={model}). Valid choices: -1 (all remaining devices) "
            f"or {rest}."
        )
    return data, model


def make_mesh(data: int = -1, model: int = 1) -> Mesh:
    """A mesh over all devices: axis 'data' if `model` is 1, else axes ('data', 'model')."""
    data, model = mesh_shape(data, model, jax.device_count())
    if model == 1:
        return jax.make_mesh((data,), (DATA_AXIS,), axis_types=(AxisType.Auto,))
    return jax.make_mesh(
        (data, model), (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto)
    )


def check_mesh_config(mesh_config, num_devices: int) -> tuple[int, int, bool]:
    """(data, model, fsdp) of `config.mesh`; `ConfigError` naming the first bad key."""
    data, model = mesh_shape(mesh_config.data, mesh_config.get("model", 1), num_devices)
    fsdp = mesh_config.get("fsdp", False)
    if not isinstance(fsdp, bool):
        raise ConfigError(
            f"config.mesh.fsdp={fsdp!r} is invalid: valid choices are True (shard the state "
            "over the 'data' axis) or False (replicate it)."
        )
    return data, model, fsdp


def mesh_from_config(mesh_config) -> Mesh:
    """The mesh of `config.mesh` (keys data, model; fsdp is read by `state_shardings`)."""
    data, model, _ = check_mesh_config(mesh_config, jax.device_count())
    return make_mesh(data, model)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (keys, metrics; the state without FSDP)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the 'data' axis (one slice of the batch per data index)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def parameter_axes(mesh: Mesh, fsdp: bool) -> tuple[str, ...]:
    """The mesh axes the state is split over: 'data' with FSDP, 'model' if it has size > 1."""
    axes = (DATA_AXIS,) if fsdp else ()
    if mesh.shape.get(MODEL_AXIS, 1) > 1:
        axes += (MODEL_AXIS,)
    return axes


def leaf_sharding(shape, mesh: Mesh, axes: tuple[str, ...]) -> NamedSharding:
    """The sharding rule for one state leaf of `shape` (see the module docstring)."""
    if not axes or not shape:
        return replicated(mesh)
    by_size = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
    groups = [axes] + ([(a,) for a in axes] if len(axes) > 1 else [])
    for group in groups:
        count = math.prod(mesh.shape[a] for a in group)
        for dim in by_size:  # the largest dimension that divides (the last among ties)
            if shape[dim] % count == 0 and shape[dim] >= count:
                spec = [None] * len(shape)
                spec[dim] = group if len(group) > 1 else group[0]
                return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def state_shardings(abstract_tree, mesh: Mesh, fsdp: bool = False):
    """A pytree of `NamedSharding`s for the state `abstract_tree` (arrays or shape structs)."""
    axes = parameter_axes(mesh, fsdp)
    return jax.tree.map(lambda x: leaf_sharding(tuple(x.shape), mesh, axes), abstract_tree)


def check_batch(global_batch_size: int, mesh: Mesh) -> int:
    """Raises `ConfigError` unless the batch splits evenly; returns this process's rows."""
    check_batch_divisible(global_batch_size, mesh.shape[DATA_AXIS], jax.process_count())
    return global_batch_size // jax.process_count()


def global_batch(local_batch, sharding: NamedSharding, local_rows: int):
    """This process's rows (a pytree of NumPy arrays [local_rows, ...]) -> global jax.Arrays."""

    def put(path, rows):
        rows = np.asarray(rows)
        if rows.ndim == 0 or rows.shape[0] != local_rows:
            raise ValueError(
                f"method.batches yielded {jax.tree_util.keystr(path) or 'a leaf'} with shape "
                f"{rows.shape}; every leaf needs a leading axis of {local_rows} rows "
                "(global_batch_size // jax.process_count())."
            )
        return jax.make_array_from_process_local_data(sharding, rows)

    return jax.tree_util.tree_map_with_path(put, local_batch)


def replicate(make_tree, sharding):
    """The pytree `make_tree()` computed under jit and placed on `sharding` (one sharding, or
    a pytree of them matching the output, e.g. from `state_shardings`).

    Works with several processes, where `jax.device_put` of a process-local array onto a mesh
    spanning other processes' devices is not allowed: every process runs the same computation.
    """
    return jax.jit(make_tree, out_shardings=sharding)()


def gather(tree, mesh: Mesh):
    """`tree` with every leaf fully replicated (a no-op for leaves that already are)."""
    if all(x.sharding.is_fully_replicated for x in jax.tree.leaves(tree)):
        return tree
    return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


def local_copy(tree):
    """A fully replicated pytree as arrays on this process's first device (no host copy)."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


def shard_batch(x):
    """Inside a method's step: constrain `x` [B, ...] to be split over 'data' like a batch.

    For arrays made inside the step (generator samples from fresh noise) that XLA cannot tie
    to the input batch. A no-op when no mesh with a 'data' axis is set (a step jitted by hand).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return x
    return jax.lax.with_sharding_constraint(x, P(DATA_AXIS))


def with_sharding(abstract_tree, sharding):
    """`jax.ShapeDtypeStruct`s of `abstract_tree` (e.g. from `jax.eval_shape`) on `sharding`:
    one sharding for every leaf, or a pytree of them with the structure of `abstract_tree`."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, abstract_tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, sharding
    )


__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "batch_sharding",
    "check_batch",
    "check_mesh_config",
    "gather",
    "global_batch",
    "leaf_sharding",
    "local_copy",
    "make_mesh",
    "mesh_from_config",
    "mesh_shape",
    "parameter_axes",
    "replicate",
    "replicated",
    "shard_batch",
    "state_shardings",
    "with_sharding",
]
