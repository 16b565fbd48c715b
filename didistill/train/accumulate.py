"""Gradient accumulation over micro-batches for the text students (`train.grad_accum_steps`).

A step over a batch of B rows runs k micro-batches of B / k rows one after the other in a
`lax.scan` (activation memory of B / k rows) and combines their outputs (loss, gradients,
metrics) as a weighted mean,

    out = sum_j w_j out_j / sum_j w_j,

then applies one optimizer update. With w_j = 1 and a loss that is a mean over rows, out is the
whole batch's value and gradient; with w_j = n_j, the number of terms of micro-batch j, and a
loss that is a ratio total_j / n_j (a mean over masked positions), out is the ratio over the
whole batch, sum_j total_j / sum_j n_j, and its gradient. Micro-batch j is the contiguous row
block [j B / k, (j + 1) B / k), so groups of consecutive rows (DiDi-Instruct's reward groups)
stay whole when B / k is a multiple of the group size. (The supervised teachers have their own
strided split, `distill/teachers/supervised.py`.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def check(config, multiple: int = 1, name: str = "") -> int:
    """k = config.train.grad_accum_steps (1 when absent), checked: k >= 1 and B / k a whole
    multiple of `multiple` (B = train.batch_size per host). ValueError naming the key."""
    accum = int(config.train.get("grad_accum_steps", 1))
    rows = config.train.batch_size // jax.process_count()
    if accum < 1 or rows % accum or (rows // accum) % multiple:
        need = f" and a multiple of {name}={multiple}" if multiple > 1 else ""
        raise ValueError(
            f"config.train.grad_accum_steps={accum} must be >= 1 and divide "
            f"config.train.batch_size={config.train.batch_size} per host into micro-batches of "
            f"whole rows{need}"
        )
    return accum


def split(tree, accum: int):
    """[B, ...] leaves -> [k, B / k, ...]: micro-batch j is rows [j B / k, (j + 1) B / k)."""
    return jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), tree)


def weighted_mean(
    fn: Callable[[Any, jax.Array, Any], tuple[Any, tuple[Any, jax.Array]]],
    carry: Any,
    accum: int,
    micro: Any = None,
) -> tuple[Any, Any]:
    """(carry, sum_j w_j out_j / sum_j w_j) of `fn(carry, j, micro_j) -> (carry, (out_j, w_j))`
    over j = 0..k-1 in a `lax.scan` (micro: a pytree of [k, ...] leaves or None; out_j a pytree
    of float arrays, w_j a scalar)."""
    xs = (jnp.arange(accum), micro)
    first = jax.tree.map(lambda x: x[0], micro)
    out_shape = jax.eval_shape(lambda c, m: fn(c, jnp.int32(0), m)[1][0], carry, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), out_shape)

    def body(state, inputs):
        carry, (total, weight) = state
        j, m = inputs
        carry, (out, w) = fn(carry, j, m)
        w = jnp.asarray(w, jnp.float32)
        total = jax.tree.map(lambda a, o: a + w * o.astype(jnp.float32), total, out)
        return (carry, (total, weight + w)), None

    (carry, (total, weight)), _ = jax.lax.scan(body, (carry, (zeros, jnp.float32(0))), xs)
    mean = jax.tree.map(lambda a, s: (a / weight).astype(s.dtype), total, out_shape)
    return carry, mean


__all__ = ["check", "split", "weighted_mean"]
