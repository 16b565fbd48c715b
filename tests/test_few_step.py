"""Few-step students (`one_step.few_step`): the noise levels, the K-step sampler, DMD2's backward
simulation (gradient only through the selected step), K = 1 unchanged, and a jit step of
f-distill, SiD and Uni-Instruct as 2-step students on the toy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import toy2d
from didistill.distill import get_method
from didistill.distill.one_step import few_step
from didistill.distill.one_step import method as one_step
from didistill.distill.one_step import toy as one_step_toy


def test_step_sigmas_karras_fractions_and_k1():
    assert few_step.step_sigmas(2.5, 1).tolist() == [2.5]
    s = few_step.step_sigmas(80.0, 4, sigma_min=0.002)
    # DMD2's list [999, 749, 499, 249]: fractions 1 - k/K of the (here Karras) time variable
    t = (s ** (1 / 7) - 0.002 ** (1 / 7)) / (80 ** (1 / 7) - 0.002 ** (1 / 7))
    np.testing.assert_allclose(t, [1.0, 0.75, 0.5, 0.25], atol=1e-12)
    assert np.all(np.diff(s) < 0)
    with pytest.raises(ValueError, match="config.generator.num_steps"):
        few_step.step_sigmas(2.5, 0)


def _linear_step(p, x, sigma, cond=None):  # a toy "generator step": x0 = p * x / (1 + sigma)
    return p * x / (1.0 + sigma[:, None])


def test_sample_runs_every_step_and_k1_is_one_call():
    z = jax.random.normal(jax.random.key(0), (5, 2))
    one = few_step.sample(_linear_step, 2.0, z, [2.5], jax.random.key(1))
    np.testing.assert_allclose(one, 2.0 * 2.5 * z / 3.5, rtol=1e-6)
    sigmas = few_step.step_sigmas(2.5, 3)
    x = few_step.sample(_linear_step, 2.0, z, sigmas, jax.random.key(1))
    keys = jax.random.split(jax.random.key(1), 2)
    ref = sigmas[0] * z
    for k in range(3):
        x0 = 2.0 * ref / (1.0 + sigmas[k])
        if k < 2:
            ref = x0 + sigmas[k + 1] * jax.random.normal(keys[k], x0.shape)
    np.testing.assert_allclose(x, x0, rtol=1e-5)


def test_backward_simulation_gradient_only_through_selected_step():
    z = jax.random.normal(jax.random.key(0), (64, 2))
    sigmas = few_step.step_sigmas(2.5, 4)
    seen = set()
    for i in range(24):
        key = jax.random.key(i)
        (x0, k) = few_step.backward_simulation(_linear_step, 1.5, z, sigmas, key)
        k = int(k)
        seen.add(k)
        grad = jax.grad(
            lambda p, key=key: jnp.sum(
                few_step.backward_simulation(_linear_step, p, z, sigmas, key)[0]
            )
        )(1.5)
        # x0 = p * x_k / (1 + sigma_k) with x_k under stop-gradient: d sum(x0)/dp = sum(x0) / p
        np.testing.assert_allclose(grad, jnp.sum(x0) / 1.5, rtol=1e-5)
        if k == 0:  # pure noise at sigma_0
            np.testing.assert_allclose(x0, 1.5 * sigmas[0] * z / (1 + sigmas[0]), rtol=1e-5)
        else:  # x_k is some x0 of step k-1 renoised to sigma_k: its spread exceeds sigma_k
            x_k = x0 * (1 + sigmas[k]) / 1.5
            assert float(jnp.std(x_k)) > 0.5 * sigmas[k]
    assert seen == {0, 1, 2, 3}


def _smoke(arg, teacher, steps):
    config = toy2d.get_config(f"{arg},smoke")
    config.teacher.checkpoint = teacher
    config.discriminator.width, config.discriminator.head_width = 16, 16
    config.generator.num_steps = steps
    return config


def test_k1_generate_is_the_one_step_generator(tiny_toy_teacher):
    config = _smoke("dmd2", tiny_toy_teacher, 1)
    parts = one_step_toy.build(config)
    g, _, _ = parts.init_params(jax.random.key(0))
    x0, _ = parts.generate(g, jax.random.key(3), 16)
    z = jax.random.normal(jax.random.key(3), (16, 2))
    ref = parts.denoise(g, 2.5 * z, jnp.full((16,), 2.5))
    np.testing.assert_array_equal(x0, ref)  # bit-identical: the same single call


@pytest.mark.parametrize("arg", ["forward_kl", "sid", "uni_instruct,forward_kl"])
def test_two_step_students_step_under_jit(arg, tiny_toy_teacher, tmp_path):
    config = _smoke(arg, tiny_toy_teacher, 2)
    method = get_method(config)
    state = method.init(jax.random.key(0))
    batch = next(method.batches(0))
    step = jax.jit(method.step)
    state0 = state
    for i in range(2):
        state, metrics = step(state, batch, jax.random.key(i), jnp.int32(i))
    for name, value in metrics.items():
        assert np.isfinite(value), (arg, name, value)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.generator, state0.generator)
    assert any(jax.tree.leaves(moved))
    results = method.evaluate(state, jax.random.key(5), str(tmp_path))
    assert results["student/nfe"] == 2


def test_num_steps_errors_name_the_key(tiny_toy_teacher):
    config = _smoke("dmd2", tiny_toy_teacher, 0)
    with pytest.raises(ValueError, match="config.generator.num_steps"):
        one_step.validate(config)
    config = toy2d.get_config("forward_kl,exact")
    config.generator.num_steps = 2
    with pytest.raises(ValueError, match="config.generator.num_steps"):
        one_step.validate(config)
