"""VDOT (`one_step.vdot`): the OT direction in closed form (a translated batch), its config
errors, and a jit step on the toy and on images (pixels as the transported points)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import digits_distill, toy2d
from didistill.distill.one_step import method as one_step
from didistill.distill.one_step import vdot
from tests.teachers import random_data, save_tiny_unet_teacher
from tests.test_one_step_images import fake_data, run_two_steps  # noqa: F401 (fixture)


def test_translated_batch_moves_every_sample_against_the_translation():
    """Teacher = fake + c with well-separated points: the optimal plan is the identity, so
    grad_{x_i} OT = 2 (x_i - y_i) / N = -2 c / N and the unit direction is -c / |c|."""
    x = jnp.asarray(np.stack([np.arange(8.0) * 3.0, np.zeros(8)], axis=1), jnp.float32)
    c = jnp.asarray([0.3, -0.4])
    u = vdot.ot_direction(x, x + c, epsilon=0.1, iterations=60)
    np.testing.assert_allclose(u, jnp.broadcast_to(-c / 0.5, u.shape), atol=1e-4)
    cost = vdot.ot_cost(x, x + c, 0.1, 60)
    np.testing.assert_allclose(cost, 0.25, rtol=1e-3)  # W2^2 of a translation: |c|^2


def test_ot_direction_is_zero_where_fake_equals_teacher():
    x = jax.random.normal(jax.random.key(0), (6, 3))
    assert np.all(np.isfinite(vdot.ot_direction(x, x, 0.1, 60)))


def test_avg_pool_matches_a_loop():
    x = jax.random.normal(jax.random.key(1), (2, 4, 6, 3))
    ref = np.zeros((2, 2, 3, 3))
    for i in range(2):
        for j in range(3):
            ref[:, i, j] = np.asarray(x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]).mean((1, 2))
    np.testing.assert_allclose(vdot.avg_pool(x, 2), ref, rtol=1e-6)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("ot_features", "tokens", "config.distill.ot_features"),
        ("ot_features", "pixels", "use 'batch' on the toy"),
        ("ot_iterations", 0, "config.distill.ot_iterations"),
    ],
)
def test_config_errors_name_the_key(key, value, match):
    config = toy2d.get_config("vdot")
    config.distill[key] = value
    with pytest.raises(ValueError, match=match):
        one_step.validate(config)


def test_defaults_are_the_reference_values():
    d = digits_distill.get_config("vdot")
    assert (d.distill.dmd_weight, d.distill.ot_weight, d.distill.ot_step) == (0.2, 0.8, 0.1)
    assert (d.distill.ot_epsilon, d.distill.ot_iterations) == (0.1, 60)
    assert (d.distill.ot_features, d.distill.ot_downsample, d.generator.num_steps) == (
        "pixels",
        2,
        4,
    )
    assert toy2d.get_config("vdot").distill.ot_features == "batch"


def test_vdot_steps_under_jit_on_images(tmp_path, fake_data):  # noqa: F811
    teacher = save_tiny_unet_teacher(tmp_path / "teacher.msgpack", label_dim=0)
    fake_data["data"] = random_data((8, 8, 1), 10)
    config = digits_distill.get_config("vdot,smoke")
    config.teacher.checkpoint = teacher
    config.discriminator.resolutions = (8,)
    config.generator.num_steps = 2
    method, state, _ = run_two_steps(config)
    results = method.evaluate(state, jax.random.key(0), str(tmp_path))
    assert results["student/nfe"] == 2
