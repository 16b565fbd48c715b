"""Optimizers and EMA from config: the only place optax transformations are built.

`make_optimizer(cfg)` reads one ConfigDict block (see `configs/base.py::optimizer`):
    name            'adam' | 'adamw'
    learning_rate   peak learning rate
    b1, b2, eps     Adam moments
    weight_decay    decoupled weight decay (adamw only)
    warmup_steps    linear warm-up from 0 to the peak (0 = constant)
    grad_clip_norm  clip by global norm before the update (0 = off)
"""

from __future__ import annotations

import optax

OPTIMIZERS = ("adam", "adamw")


def make_optimizer(cfg) -> optax.GradientTransformation:
    """Builds the optax transformation described by one optimizer config block."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optimizer name {cfg.name!r} is not one of {OPTIMIZERS}")
    if cfg.learning_rate <= 0:
        raise ValueError(f"optimizer learning_rate must be > 0, got {cfg.learning_rate}")
    schedule = (
        optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
        if cfg.warmup_steps > 0
        else optax.constant_schedule(cfg.learning_rate)
    )
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


__all__ = ["OPTIMIZERS", "apply_gradients", "ema_update", "make_optimizer"]
