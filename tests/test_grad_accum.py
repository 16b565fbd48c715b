"""Gradient accumulation in the supervised engine step: k micro-batches give the whole batch's
gradient (loss a mean over rows), one optimizer update, and bad settings are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import base
from didistill.distill.teachers.supervised import make_init_and_step


def _config(accum, batch=8):
    config = base.get_config()
    config.train.batch_size = batch
    config.train.grad_accum_steps = accum
    config.optim = base.optimizer(learning_rate=0.1, name="adam")
    config.ema_decay = 0.5
    return config


def _loss(params, batch, key):  # a mean over rows, independent of the key
    del key
    pred = batch["x"] @ params["w"]
    return jnp.mean((pred - batch["y"]) ** 2), {"first_row": batch["y"][0]}


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_step_equals_full_batch_step(accum):
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}  # fmt: skip
    init_params = lambda key: {"w": jax.random.normal(key, (3,))}
    results = []
    for k in (1, accum):
        init, step = make_init_and_step(_config(k), init_params, _loss, ema_warmup=False,
                                        has_aux=True)  # fmt: skip
        state = init(jax.random.key(0))
        state, metrics = jax.jit(step)(state, batch, jax.random.key(1), jnp.int32(0))
        results.append((state, metrics))
    (s1, m1), (sk, mk) = results
    np.testing.assert_allclose(sk.params["w"], s1.params["w"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mk["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(mk["grad_norm"], m1["grad_norm"], rtol=1e-5)
    # aux metrics are micro-batch means: micro-batch j starts at row j
    np.testing.assert_allclose(mk["first_row"], np.mean(batch["y"][:accum]), rtol=1e-6)


def test_bad_accumulation_is_a_clear_error():
    init_params = lambda key: {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="config.train.grad_accum_steps=3 must be >= 1 and divide"):
        make_init_and_step(_config(3), init_params, _loss, ema_warmup=False)
