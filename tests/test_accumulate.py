"""Gradient accumulation of the text students (`train/accumulate.py`): the weighted mean over
micro-batches equals the whole batch's loss and gradient, and DiDi-Instruct and step halving
combine their micro-batches that way; bad settings are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import synthetic_didi, synthetic_sdtt
from didistill.distill.discrete import didi
from didistill.distill.discrete import step_halving as sh
from didistill.distill.teachers.mdlm import load_teacher_denoiser, logits_fn_of
from didistill.train import accumulate
from tests.teachers import LANGUAGE, LENGTH


def _ratio_loss(w, x, mask):  # a mean over masked entries: total / count
    per_entry = jnp.tanh(x @ w) ** 2  # [n, L]
    return jnp.sum(per_entry * mask) / jnp.sum(mask), jnp.sum(mask)


def _row_mean_loss(w, x):
    return jnp.mean(jnp.sin(x @ w).sum(-1))


@pytest.mark.parametrize("accum", [2, 4])
def test_weighted_mean_is_the_concatenated_batch(accum):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 5)) < 0.4, jnp.float32)
    w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    full = jax.value_and_grad(lambda w: _ratio_loss(w, x, mask)[0])(w)

    def micro(carry, j, b):
        value = jax.value_and_grad(lambda w: _ratio_loss(w, *b)[0])(w)
        return carry, (value, _ratio_loss(w, *b)[1])

    _, acc = accumulate.weighted_mean(micro, (), accum, accumulate.split((x, mask), accum))
    np.testing.assert_allclose(acc[0], full[0], rtol=1e-6)
    np.testing.assert_allclose(acc[1], full[1], rtol=1e-5, atol=1e-7)

    full = jax.value_and_grad(lambda w: _row_mean_loss(w, x))(w)
    plain = lambda c, j, b: (c, (jax.value_and_grad(lambda w: _row_mean_loss(w, b))(w), 1.0))
    _, acc = jax.jit(
        lambda: accumulate.weighted_mean(plain, (), accum, accumulate.split(x, accum))
    )()
    np.testing.assert_allclose(acc[0], full[0], rtol=1e-6)
    np.testing.assert_allclose(acc[1], full[1], rtol=1e-5, atol=1e-7)


def test_weighted_mean_carries_state_in_order():
    fn = lambda c, j, _: (c * 10 + j, (jnp.float32(j), 1.0))
    carry, mean = accumulate.weighted_mean(fn, jnp.int32(1), 3)
    assert int(carry) == 1012 and float(mean) == 1.0


def _didi_config(teacher, accum, **distill):
    config = synthetic_didi.get_config(f"{LANGUAGE},smoke")
    config.teacher.checkpoint = teacher
    config.data.length = LENGTH
    config.train.batch_size = 8
    config.train.grad_accum_steps = accum
    config.distill.update(teacher_sample_steps=2, group_size=4, **distill)
    return config


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_didi_student_gradient_is_the_mean_of_micro_batches(tiny_text_teacher):
    run = didi.DiDiInstruct(_didi_config(tiny_text_teacher, 2))
    state = run.init(jax.random.key(0))
    key = jax.random.key(3)
    (loss, aux), grads = jax.jit(run.student_gradients)(state, key)
    grad_fn = jax.jit(jax.value_and_grad(run.student_objective, has_aux=True), static_argnums=3)
    parts = [grad_fn(state.student, state, jax.random.fold_in(key, j), 4) for j in range(2)]
    _close(grads, jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1]))
    np.testing.assert_allclose(loss, (parts[0][0][0] + parts[1][0][0]) / 2, rtol=1e-5)
    # one whole engine step with accumulation is finite and moves both networks
    method = didi.make_method(_didi_config(tiny_text_teacher, 2))
    new, metrics = jax.jit(method.step)(state, next(method.batches(0)), key, jnp.int32(0))
    assert all(np.isfinite(v) for v in metrics.values())
    assert not np.allclose(jax.tree.leaves(new.student)[0], jax.tree.leaves(state.student)[0])


def test_sdtt_gradient_is_the_position_weighted_mean(tiny_text_teacher_1block):
    config = synthetic_sdtt.get_config(f"{LANGUAGE},smoke")
    config.teacher.checkpoint = tiny_text_teacher_1block
    config.data.length = LENGTH
    config.train.batch_size = 8
    config.train.grad_accum_steps = 2
    method = sh.make_method(config)
    state = method.init(jax.random.key(0))
    batch, key = next(method.batches(0)), jax.random.key(5)
    new, metrics = jax.jit(method.step)(state, batch, key, jnp.int32(0))
    # by hand: the micro-batches' losses weighted by their loss positions
    net = load_teacher_denoiser(tiny_text_teacher_1block)[0]
    loss_fn = sh.make_loss(config.distill, method_schedule(config), net.vocab_size)
    teacher_fn = logits_fn_of(net, state.teacher)
    grad_fn = jax.value_and_grad(
        lambda p, x, k: loss_fn(logits_fn_of(net, p), teacher_fn, k, x, state.round), has_aux=True
    )
    parts = [
        grad_fn(state.student, batch["tokens"][4 * j : 4 * j + 4], jax.random.fold_in(key, j))
        for j in range(2)
    ]
    counts = [p[0][1]["loss_positions"] * 4 * LENGTH for p in parts]
    expected = sum(c * p[0][0] for c, p in zip(counts, parts, strict=True)) / sum(counts)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert np.isfinite(float(metrics["grad_norm"]))


def method_schedule(config):
    from didistill.diffusion import masked

    meta = load_teacher_denoiser(config.teacher.checkpoint)[2].get("diffusion", {})
    return masked.get_schedule(meta.get("schedule", "loglinear"), meta.get("eps", 1e-3))


def test_bad_accumulation_is_one_line(tiny_text_teacher):
    with pytest.raises(ValueError, match=r"grad_accum_steps=3 must be >= 1 and divide"):
        didi.DiDiInstruct(_didi_config(tiny_text_teacher, 3))
    with pytest.raises(ValueError, match=r"multiple of distill.group_size=4"):
        didi.DiDiInstruct(_didi_config(tiny_text_teacher, 4))
