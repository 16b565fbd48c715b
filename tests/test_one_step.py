"""One-step distillation methods on the toy: every method steps under jit, the exact oracle
reaches the closed-form optimum, and a short run improves on the initial generator."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill import assets
from didistill.configs import toy2d
from didistill.data import toy
from didistill.distill import get_method
from didistill.distill.one_step import method as one_step
from didistill.distill.one_step import table
from didistill.train.loop import train

ASSET = assets.path("toy/ring8_teacher.msgpack")


def _smoke_config(arg, teacher_path):
    config = toy2d.get_config(f"{arg},smoke")
    config.teacher.checkpoint = teacher_path
    config.discriminator.width, config.discriminator.head_width = 16, 16
    return config


def test_every_list_of_method_names_comes_from_the_table():
    from didistill import distill
    from didistill.configs import one_step_common

    one_step_names = [n for n, t in distill.METHODS.items() if t.startswith(one_step.__name__)]
    assert one_step_names == list(table.METHODS) == list(one_step_common.METHODS)
    for name, row in table.METHODS.items():
        config = toy2d.get_config(name)
        assert config.method == name and (config.distill.gan_weight > 0) == row.gan
        assert (config.distill.time_weight, config.distill.alpha) == (row.time_weight, row.alpha)
        if row.divergence is not None:
            assert config.distill.divergence == row.divergence
            config.distill.divergence = "forward_kl"
            with pytest.raises(ValueError, match=f"defined with {row.divergence}"):
                one_step.validate(config)


@pytest.mark.parametrize("arg", [*table.METHODS, "uni_instruct,forward_kl"])
def test_every_method_steps_under_jit(arg, tiny_toy_teacher):
    config = _smoke_config(arg, tiny_toy_teacher)
    method = get_method(config)
    state = method.init(jax.random.key(0))
    batch = next(method.batches(0))
    step = jax.jit(method.step)
    for i in range(2):
        state, metrics = step(state, batch, jax.random.key(i), jnp.int32(i))
    for name, value in metrics.items():
        assert np.isfinite(value), (arg, name, value)
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)),
        state.generator,
        method.init(jax.random.key(0)).generator,
    )
    assert any(jax.tree.leaves(changed)), "the generator did not move"


def test_linear_decay_schedules_count_the_run_length(tiny_toy_teacher):
    """schedule='warmup_linear_decay' with decay_steps 0 decays over the run: train.num_steps
    generator updates and num_steps x critic_steps critic updates (it used to stop the run)."""
    config = _smoke_config("dmd2", tiny_toy_teacher)
    for name in ("optim_generator", "optim_fake_score", "optim_discriminator"):
        config[name].schedule = "warmup_linear_decay"
    method = get_method(config)
    state = method.init(jax.random.key(0))
    state, metrics = jax.jit(method.step)(
        state, next(method.batches(0)), jax.random.key(0), jnp.int32(0)
    )
    assert all(np.isfinite(v) for v in metrics.values())
    config.train.num_steps = 0
    with pytest.raises(ValueError, match="needs decay_steps"):
        get_method(config)


def test_own_discriminator_trunk_and_scratch_generator(tiny_toy_teacher):
    config = _smoke_config("forward_kl,scratch", tiny_toy_teacher)
    config.discriminator.features = "own"
    method = get_method(config)
    state = method.init(jax.random.key(0))
    assert "trunk" in state.discriminator
    state, metrics = jax.jit(method.step)(state, next(method.batches(0)), jax.random.key(1), 0)
    assert all(np.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(method="dmd2", divergence="forward_kl"), "reverse_kl"),
        (dict(divergence="not_a_divergence"), "not_a_divergence"),
        (dict(divergence="total_variation"), "total_variation"),
        (dict(ratio="exact"), "affine"),
    ],
)
def test_bad_method_configs_say_what_to_do(change, message, tiny_toy_teacher):
    config = _smoke_config("jensen_shannon", tiny_toy_teacher)
    if "method" in change:
        config.method = change.pop("method")
    for key, value in change.items():
        config.distill[key] = value
    with pytest.raises(ValueError, match=message):
        one_step.make_method(config)


@pytest.mark.parametrize("key", ["di_term", "gan_time_weight"])
def test_unknown_uni_instruct_options_name_the_key(key, tiny_toy_teacher):
    config = _smoke_config("uni_instruct,forward_kl", tiny_toy_teacher)
    config.distill[key] = "nope"
    with pytest.raises(ValueError, match=f"config.distill.{key}='nope'"):
        one_step.make_method(config)


def _one_step(config):
    method = get_method(config)
    state = method.init(jax.random.key(0))
    new, _ = jax.jit(method.step)(state, next(method.batches(0)), jax.random.key(1), 0)
    return state, new


def test_generator_waits_until_generator_freeze_images(tiny_toy_teacher):
    config = _smoke_config("uni_instruct,forward_kl", tiny_toy_teacher)
    config.distill.generator_freeze_images = 10**6
    before, after = _one_step(config)
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before.generator, after.generator)
    assert all(jax.tree.leaves(same))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before.fake_score, after.fake_score)
    assert any(jax.tree.leaves(moved)), "the critics must train while the generator waits"


def test_gan_warmup_is_reverse_kl_without_gan(tiny_toy_teacher):
    """Before `gan_warmup_images`, f-distill forward KL + GAN takes DMD's step without GAN."""
    warm = _smoke_config("forward_kl", tiny_toy_teacher)
    warm.distill.gan_warmup_images = 10**6
    plain = _smoke_config("forward_kl", tiny_toy_teacher)
    plain.distill.update(divergence="reverse_kl", gan_weight=0.0)
    (_, a), (_, b) = _one_step(warm), _one_step(plain)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)
    (_, c) = _one_step(_smoke_config("forward_kl", tiny_toy_teacher))
    differs = jax.tree.map(lambda x, y: bool(jnp.any(x != y)), a.generator, c.generator)
    assert any(jax.tree.leaves(differs)), "after the warm-up the step must differ"


def test_sanitize_gradients_replaces_nonfinite_and_clips():
    grads = {"w": jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.5, -3.0])}
    out = one_step.sanitize_gradients(grads, 1.0)["w"]
    np.testing.assert_array_equal(out, [0.0, 1.0, -1.0, 0.5, -1.0])
    assert one_step.sanitize_gradients(grads, 0.0) is grads


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    config = _smoke_config("jensen_shannon", str(tmp_path / "nope.msgpack"))
    with pytest.raises(FileNotFoundError, match="toy_teacher"):
        get_method(config)


def test_exact_oracle_forward_kl_matches_moments():
    """Forward KL to any target is minimised by the Gaussian with the target's mean and
    covariance, at every noise level; the affine student with exact ratios must get there."""
    config = toy2d.get_config("forward_kl,exact")
    config.teacher.checkpoint = ASSET
    config.train.batch_size = 1024
    config.distill.min_index, config.distill.max_index = 300, 700  # sigma in about [0.2, 5]
    config.optim_generator.learning_rate = 2e-2
    method = get_method(config)
    state = method.init(jax.random.key(0))
    step = jax.jit(method.step)
    batch = next(method.batches(0))
    for i in range(400):
        state, _ = step(state, batch, jax.random.fold_in(jax.random.key(1), i), jnp.int32(i))
    mixture = toy.get_toy("ring8")
    samples = np.asarray(mixture.sample(jax.random.key(2), 200_000))
    a, b = np.asarray(state.generator["A"]), np.asarray(state.generator["b"])
    np.testing.assert_allclose(b, samples.mean(0), atol=0.1)
    np.testing.assert_allclose(a.T @ a, np.cov(samples.T), atol=0.25)


@pytest.mark.skipif(not os.path.isfile(ASSET), reason="shipped teacher missing")
def test_short_distillation_improves_on_initial_generator(tmp_path):
    config = toy2d.get_config("forward_kl")
    config.teacher.checkpoint = ASSET
    config.train.num_steps = 150
    config.train.batch_size = 256
    config.train.progress = False
    config.distill.critic_steps = 3
    config.eval.num_samples = 2000
    config.eval.teacher_nfe = 5
    method = get_method(config)
    os.makedirs(tmp_path / "init")
    before = method.evaluate(
        method.init(jax.random.key(0)), jax.random.key(9), str(tmp_path / "init")
    )
    after = train(method, config, str(tmp_path / "run"))["eval"]
    for metric in ("energy_distance", "mode_tv", "nll", "outlier_fraction"):
        assert after[f"student/{metric}"] < before[f"student/{metric}"], metric
    assert after["student/mode_coverage"] >= before["student/mode_coverage"]


def _run_main(workdir, teacher, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
    args = [
        sys.executable,
        "-m",
        "didistill.main",
        "--config=toy2d:jensen_shannon,smoke",
        f"--config.teacher.checkpoint={teacher}",
        f"--workdir={workdir}",
    ]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_one_and_four_devices_give_the_same_losses(tiny_toy_teacher, tmp_path):
    one = _run_main(tmp_path / "one", tiny_toy_teacher, 1)
    four = _run_main(tmp_path / "four", tiny_toy_teacher, 4)
    assert [m["step"] for m in one] == [m["step"] for m in four]
    for a, b in zip(one, four, strict=True):
        for key in ("generator_loss", "fake_score_loss", "discriminator_loss"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-3, atol=1e-4, err_msg=key)
