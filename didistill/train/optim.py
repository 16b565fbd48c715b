"""Optimizers and EMA from config: the only place optax transformations are built.

`make_optimizer(cfg)` reads one ConfigDict block (see `configs/base.py::optimizer`):
    name            'adam' | 'adamw'
    learning_rate   peak learning rate
    b1, b2, eps     Adam moments
    weight_decay    decoupled weight decay (adamw only)
    warmup_steps    linear warm-up from 0 to the peak (0 = constant)
    grad_clip_norm  clip by global norm before the update (0 = off)
    schedule        'warmup_constant' (default): optax's linear warm-up from 0, then the peak;
                    'warmup_linear_decay': DiDi-Instruct's `_get_lr` (`warmup_linear_decay`)
    decay_steps     T of 'warmup_linear_decay' (0: the run's train.num_steps, passed by the
                    method as `total_steps`)
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("warmup_constant", "warmup_linear_decay")


def warmup_linear_decay(peak: float, warmup_steps: int, total_steps: int, floor: float = 1e-8):
    """DiDi-Instruct's learning rate at optimizer step k = 0, 1, ... (its `_get_lr`, applied to
    the student and the discriminator optimizer alike, each with its own peak):

        lr(k) = peak (k + 1) / W                          k < W   (W = warmup_steps)
        lr(k) = max(peak (1 - (k - W) / (T - W)), floor)  k >= W  (T = total_steps)

    The warm-up starts at peak / W, not 0, and ends at the peak; the decay reaches the floor
    (1e-8) at k = T."""
    if total_steps <= warmup_steps:
        raise ValueError(
            f"warmup_linear_decay needs total steps {total_steps} > warmup_steps {warmup_steps}"
        )

    def schedule(count):
        k = jnp.asarray(count, jnp.float32)
        warm = peak * (k + 1.0) / max(warmup_steps, 1)
        decay = jnp.maximum(peak * (1.0 - (k - warmup_steps) / (total_steps - warmup_steps)), floor)
        return jnp.where(k < warmup_steps, warm, decay)

    return schedule


def make_optimizer(cfg, total_steps: int = 0) -> optax.GradientTransformation:
    """Builds the optax transformation described by one optimizer config block; `total_steps`
    is the run's length, used by schedule='warmup_linear_decay' when cfg.decay_steps is 0."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optimizer name {cfg.name!r} is not one of {OPTIMIZERS}")
    if cfg.learning_rate <= 0:
        raise ValueError(f"optimizer learning_rate must be > 0, got {cfg.learning_rate}")
    kind = cfg.get("schedule", "warmup_constant")
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer schedule {kind!r} is not one of {SCHEDULES}")
    if kind == "warmup_linear_decay":
        steps = cfg.get("decay_steps", 0) or total_steps
        if steps <= cfg.warmup_steps:
            raise ValueError(
                f"optimizer schedule 'warmup_linear_decay' needs decay_steps (or train.num_steps) "
                f"= {steps} > warmup_steps = {cfg.warmup_steps}"
            )
        schedule = warmup_linear_decay(cfg.learning_rate, cfg.warmup_steps, steps)
    elif cfg.warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    else:
        schedule = optax.constant_schedule(cfg.learning_rate)
    if cfg.name == "adam":
        core = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        core = optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), core)
    return core


def ema_update(ema_params, params, decay: float):
    """Exponential moving average: ema <- decay * ema + (1 - decay) * params."""
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)


def apply_gradients(optimizer: optax.GradientTransformation, params, opt_state, grads):
    """One optimizer update; returns (new_params, new_opt_state)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "apply_gradients",
    "ema_update",
    "make_optimizer",
    "warmup_linear_decay",
]
