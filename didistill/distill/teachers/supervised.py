"""The one supervised-training helper shared by every teacher (EDM, MDLM, classifier).

A teacher is trained by gradient descent on a loss of its parameters,

    theta <- optimizer(theta, grad_theta L(theta; batch, key)),

with an exponential moving average of the weights, ema <- d ema + (1 - d) theta. With warm-up
the decay at step t is d_t = min(ema_decay, (1 + t) / (10 + t)), so that the average forgets the
random initialisation within the first few hundred steps of a short run (the schedule of the
TensorFlow `ExponentialMovingAverage` with `num_updates`).

`supervised_method` turns `init_params(key)` and `loss_fn(params, batch, key)` into the engine's
`init` and `step`; the method module adds its own `evaluate` and `batches`. The loss may return
`(loss, metrics)` (`has_aux=True`); the step reports `loss`, `grad_norm`, `ema_decay` and those
metrics.

Gradient accumulation (`config.train.grad_accum_steps` = k > 1): the step splits its batch of
B rows into k micro-batches of B / k (micro-batch j takes rows j, j + k, j + 2k, ..., so a
batch sharded over 'data' in contiguous blocks stays sharded) and runs them one after the other
in a `lax.scan`, each with key `fold_in(key, j)`; the gradient (and loss, metrics) is the mean
over the micro-batches, then one optimizer and EMA update. For a loss that is a mean over rows
this is the gradient of the whole batch (up to the per-micro-batch keys), with the activation
memory of B / k rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from didistill.train.method import Method
from didistill.train.optim import apply_gradients, ema_update, make_optimizer


@flax.struct.dataclass
class SupervisedState:
    params: Any  # the trained network's parameters
    opt_state: Any
    ema_params: Any  # what evaluation and the saved teacher file use


def check_common(config) -> None:
    """The checks every teacher config shares; ValueError naming the key."""
    if config.train.batch_size % jax.process_count():
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size} must divide by the "
            f"{jax.process_count()} hosts"
        )
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1), e.g. 0.999")


def make_init_and_step(
    config,
    init_params: Callable[[jax.Array], Any],
    loss_fn: Callable[[Any, Any, jax.Array], Any],
    *,
    ema_warmup: bool,
    has_aux: bool = False,
):
    """(init, step) of the engine for a network trained on `loss_fn(params, batch, key)`.

    `config.optim` builds the optimizer; `config.ema_decay` is the EMA decay (with the warm-up
    of the module docstring when `ema_warmup`)."""
    check_common(config)
    optimizer = make_optimizer(config.optim, total_steps=config.train.num_steps)
    accum = int(config.train.get("grad_accum_steps", 1))
    if accum < 1 or config.train.batch_size % (accum * jax.process_count()):
        raise ValueError(
            f"config.train.grad_accum_steps={accum} must be >= 1 and divide "
            f"config.train.batch_size={config.train.batch_size} / {jax.process_count()} hosts"
        )

    def init(key):
        params = init_params(key)
        return SupervisedState(params, optimizer.init(params), params)

    def gradients(params, batch, key):
        """((loss, aux), grads) of the batch, averaged over `accum` micro-batches."""
        grad_fn = jax.value_and_grad(lambda p, b, k: loss_fn(p, b, k), has_aux=has_aux)
        if accum == 1:
            return grad_fn(params, batch, key)

        def split(x):  # [B, ...] -> [k, B / k, ...], micro-batch j = rows j, j + k, ...
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        micro = jax.tree.map(split, batch)

        def body(total, inputs):
            j, b = inputs
            out, grads = grad_fn(params, b, jax.random.fold_in(key, j))
            return jax.tree.map(lambda a, g: a + g / accum, total, (out, grads)), None

        zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), key)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        return total

    def step(state, batch, key, step):
        out, grads = gradients(state.params, batch, key)
        loss, aux = out if has_aux else (out, {})
        params, opt_state = apply_gradients(optimizer, state.params, state.opt_state, grads)
        decay = jnp.asarray(config.ema_decay, jnp.float32)
        if ema_warmup:
            t = jnp.asarray(step, jnp.float32)
            decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        ema_params = ema_update(state.ema_params, params, decay)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux, "ema_decay": decay}
        return SupervisedState(params, opt_state, ema_params), metrics

    return init, step


def supervised_method(config, init_params, loss_fn, evaluate, batches, **kwargs) -> Method:
    """The engine `Method` of a supervised teacher (see `make_init_and_step` for kwargs)."""
    init, step = make_init_and_step(config, init_params, loss_fn, **kwargs)
    return Method(
        init=init,
        step=step,
        evaluate=evaluate,
        batches=batches,
        global_batch_size=config.train.batch_size,
    )


__all__ = ["SupervisedState", "check_common", "make_init_and_step", "supervised_method"]
