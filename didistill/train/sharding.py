"""The data-parallel mesh and the two shardings the engine uses.

One mesh axis, `'data'`, spans every device of every process (`jax.make_mesh`, which picks a
topology-aware device order). The train state is replicated, `NamedSharding(mesh, P())`; a
batch is split along its leading axis, `NamedSharding(mesh, P('data'))`. XLA inserts the
gradient all-reduce itself when a jitted step reads a sharded batch and writes replicated
params, so there is no `pmap` and no explicit collective.

The axis type is `AxisType.Auto`: the compiler propagates shardings inside the step, so a
method's code needs no sharding annotations (in `Explicit` mode, `jax.random.*` calls would
need an `out_sharding=` argument to produce batch-sharded noise). A method may still call
`jax.lax.with_sharding_constraint(x, jax.P('data'))`: the engine runs under `jax.set_mesh`.

Multi-host: each process holds `global_batch // process_count` rows of every batch;
`global_batch` assembles them into one global array with
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from didistill.train.validate import check_batch_divisible, data_axis_size

DATA_AXIS = "data"


def make_mesh(mesh_data: int = -1) -> Mesh:
    """A 1-D mesh over all devices with axis 'data' (`mesh_data`: -1 or the device count)."""
    size = data_axis_size(mesh_data, jax.device_count())
    return jax.make_mesh((size,), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (train state, keys, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the 'data' axis (one slice of the batch per device)."""
    return NamedSharding(mesh, P(DATA_AXIS))


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


def replicate(make_tree, sharding: NamedSharding):
    """The pytree `make_tree()` computed under jit and placed on `sharding`.

    Works with several processes, where `jax.device_put` of a process-local array onto a mesh
    spanning other processes' devices is not allowed: every process runs the same computation.
    """
    return jax.jit(make_tree, out_shardings=sharding)()


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


def with_sharding(abstract_tree, sharding: NamedSharding):
    """`jax.ShapeDtypeStruct`s of `abstract_tree` (e.g. from `jax.eval_shape`) on `sharding`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_tree
    )


__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "check_batch",
    "global_batch",
    "local_copy",
    "make_mesh",
    "replicate",
    "replicated",
    "shard_batch",
    "with_sharding",
]
