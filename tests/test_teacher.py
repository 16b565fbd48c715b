"""Tests for didistill.distill.teachers.toy (method 'toy_teacher') and configs/toy_teacher.py."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import toy_teacher
from didistill.data import toy
from didistill.distill.teachers import toy as teacher
from didistill.nets.mlp import denoiser_from_config


@pytest.fixture(scope="module")
def smoke():
    config = toy_teacher.get_config("ring8,smoke")
    method = teacher.make_method(config)
    step = jax.jit(method.step)
    return config, method, step


def run_steps(method, step, num_steps):
    state = method.init(jax.random.key(0))
    for i, batch in zip(range(num_steps), method.batches(0), strict=False):
        state, metrics = step(state, batch, jax.random.key(i + 1), jnp.int32(i))
    return state, metrics


class TestConfig:
    def test_arguments(self):
        config = toy_teacher.get_config("grid25")
        assert config.method == "toy_teacher" and config.data.toy == "grid25"
        assert config.eval.nfe == 35 and config.train.num_steps >= 1000
        std = toy.data_std(toy.get_toy("grid25"))
        assert config.net.sigma_data == pytest.approx(float(np.sqrt(np.mean(std**2))))
        smoke = toy_teacher.get_config("moons,smoke")
        assert smoke.data.toy == "moons" and smoke.train.num_steps < 100
        assert toy_teacher.get_config(None).data.toy == "ring8"

    @pytest.mark.parametrize("arg", ["spiral", "ring8,fast"])
    def test_bad_argument(self, arg):
        with pytest.raises(ValueError, match="toy_teacher config arg"):
            toy_teacher.get_config(arg)


class TestMethod:
    def test_step_under_jit(self, smoke):
        config, method, step = smoke
        state = method.init(jax.random.key(0))
        batch = next(method.batches(0))
        assert batch["x"].shape == (config.train.batch_size, 2)
        assert method.global_batch_size == config.train.batch_size
        new_state, metrics = step(state, batch, jax.random.key(1), jnp.int32(0))
        assert set(metrics) >= {"loss", "grad_norm"}
        assert all(np.isfinite(float(v)) for v in metrics.values())
        # EMA warm-up: at step 0 the decay is 1/10, so the EMA moved towards the new params.
        np.testing.assert_allclose(metrics["ema_decay"], 0.1, rtol=1e-6)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)

    def test_batches_resume(self, smoke):
        _, method, _ = smoke
        full = [b["x"] for b in itertools.islice(method.batches(0), 4)]
        resumed = next(method.batches(3))["x"]
        np.testing.assert_array_equal(full[3], resumed)

    def test_short_run_lowers_the_loss(self, smoke):
        _, method, step = smoke
        fixed = {"x": toy.get_toy("ring8").sample(jax.random.key(9), 2048)}
        key = jax.random.key(10)
        state0 = method.init(jax.random.key(0))
        _, before = step(state0, fixed, key, jnp.int32(0))
        state, _ = run_steps(method, step, 300)
        _, after = step(state, fixed, key, jnp.int32(0))
        assert float(after["loss"]) < 0.85 * float(before["loss"])

    def test_evaluate_writes_png_and_teacher(self, smoke, tmp_path):
        config, method, step = smoke
        state, _ = run_steps(method, step, 5)
        results = method.evaluate(state, jax.random.key(3), str(tmp_path))
        assert results["teacher/nfe"] == config.eval.nfe
        for prefix in ("data", "exact_heun", "teacher"):
            assert np.isfinite(results[f"{prefix}/energy_distance"])
        assert results["exact_heun/mode_coverage"] == 1.0  # the exact denoiser at 35 NFE
        assert results["exact_heun/outlier_fraction"] < 0.02
        assert os.path.getsize(tmp_path / "samples.png") > 0
        net, params, meta = teacher.load_teacher_denoiser(str(tmp_path / teacher.TEACHER_FILE))
        assert meta["toy"] == "ring8" and meta["net"]["width"] == config.net.width
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params), strict=True):
            np.testing.assert_array_equal(a, b)
        x = jnp.ones((3, 2))
        np.testing.assert_array_equal(
            net.apply(params, x, 0.5),
            denoiser_from_config(config.net).apply(state.ema_params, x, 0.5),
        )


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("ema_decay", 1.5, "ema_decay"),
        ("eval.nfe", 34, "odd NFE"),
        ("data.toy", "x", "unknown toy"),
    ],
)
def test_bad_method_config(key, value, match):
    config = toy_teacher.get_config("ring8,smoke")
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(ValueError, match=match):
        teacher.make_method(config)
