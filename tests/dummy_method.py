"""A tiny method for the engine tests: noisy linear regression on synthetic data.

Data for step `s` comes from `np.random.default_rng((seed, s))`, so any start step yields the
same batches an uninterrupted run sees. The step adds input noise drawn with the step key (so
key plumbing shows in the losses), updates params with the shared optimizer factory, keeps an
EMA and a typed PRNG key in its state (so typed keys go through checkpoints).

Test hooks in `config.dummy`: `nan_steps` (step indices whose loss and gradients are NaN),
`sleep_s` (seconds per batch, to slow a run down), `sigterm_at_step` (the batch of that step
index sends SIGTERM to this process, to exercise preemption in-process). The environment
variable DIDISTILL_DUMMY_EVAL_SLEEP_S makes `evaluate` wait that many seconds first.
"""

from __future__ import annotations

import itertools
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from didistill.train.method import Method
from didistill.train.optim import apply_gradients, ema_update, make_optimizer


def make_method(config) -> Method:
    cfg = config.dummy
    if cfg.dim < 1:
        raise ValueError(f"config.dummy.dim={cfg.dim} must be >= 1")
    optimizer = make_optimizer(config.optimizer)
    true_w = np.linspace(-1.0, 1.0, cfg.dim).astype(np.float32)  # [D]
    global_batch = config.train.batch_size
    rows = global_batch // jax.process_count()
    nan_steps = jnp.asarray(cfg.nan_steps, jnp.int32) if cfg.nan_steps else None

    def batches(start_step):
        offset = jax.process_index() * rows
        for step in itertools.count(start_step):
            if cfg.sleep_s:
                time.sleep(cfg.sleep_s)
            if step == cfg.sigterm_at_step:
                if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                    raise RuntimeError("no SIGTERM handler installed: the signal would kill us")
                os.kill(os.getpid(), signal.SIGTERM)
            rng = np.random.default_rng((config.seed, step))
            x = rng.normal(size=(global_batch, cfg.dim)).astype(np.float32)  # [B, D]
            y = x @ true_w + 0.5 + 0.1 * rng.normal(size=global_batch).astype(np.float32)  # [B]
            yield {"x": x[offset : offset + rows], "y": y[offset : offset + rows]}

    def init(key):
        k_w, k_state = jax.random.split(key)
        params = {"w": 0.1 * jax.random.normal(k_w, (cfg.dim,)), "b": jnp.zeros(())}
        return {
            "params": params,
            "opt_state": optimizer.init(params),
            "ema_params": params,
            "key": k_state,
            "updates": jnp.zeros((), jnp.int32),
        }

    def step(state, batch, key, step):
        noise = cfg.input_noise * jax.random.normal(key, batch["x"].shape)  # [B, D]

        def loss_fn(params):
            pred = (batch["x"] + noise) @ params["w"] + params["b"]  # [B]
            return jnp.mean((pred - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        if nan_steps is not None:
            poison = jnp.any(step == nan_steps)
            loss = jnp.where(poison, jnp.nan, loss)
            grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
        params, opt_state = apply_gradients(optimizer, state["params"], state["opt_state"], grads)
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "ema_params": ema_update(state["ema_params"], params, cfg.ema_decay),
            "key": jax.random.split(state["key"])[0],
            "updates": state["updates"] + 1,
        }
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def evaluate(state, key, workdir):
        # A slow evaluation, for the Ctrl-C fault test (not a config key: no fingerprint change).
        # In short sleeps, like an evaluation's Python between device calls: a signal that the
        # kernel hands to another thread is acted on only when the main thread runs Python.
        end = time.monotonic() + float(os.environ.get("DIDISTILL_DUMMY_EVAL_SLEEP_S", "0"))
        while time.monotonic() < end:
            time.sleep(0.05)
        x = jax.random.normal(key, (256, cfg.dim))
        ema = state["ema_params"]
        err = x @ (ema["w"] - true_w) + ema["b"] - 0.5
        if jax.process_index() == 0:
            pixels = np.zeros((8, 8), np.uint8)
            pixels[: cfg.dim] = 255
            Image.fromarray(pixels).save(os.path.join(workdir, "weights.png"))
        return {
            "eval_mse": float(jnp.mean(err**2)),
            "updates": int(state["updates"]),
            "key_sum": int(jnp.sum(jax.random.key_data(state["key"]))),
        }

    return Method(init, step, evaluate, batches, global_batch)


CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "dummy.py")


def load_config():
    """`get_config()` of tests/configs/dummy.py, as `--config=tests/configs/dummy.py` loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dummy_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tree_arrays(tree):
    """`tree` on the host with typed PRNG keys as their raw key data, for exact comparisons."""

    def plain(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(plain, tree)
