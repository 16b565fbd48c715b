"""DiDi-Instruct method: jitted steps on a tiny random teacher, evaluation keys, config errors."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import synthetic_didi
from didistill.diffusion import masked
from didistill.distill.discrete import didi
from didistill.distill.teachers.mdlm import load_teacher_denoiser
from didistill.eval import text as text_eval
from tests.teachers import LANGUAGE, LENGTH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(teacher_path, **distill):
    config = synthetic_didi.get_config(f"{LANGUAGE},smoke")
    config.teacher.checkpoint = teacher_path
    config.data.length = LENGTH
    config.distill.update(teacher_sample_steps=2, **distill)
    config.eval.update(num_samples=8, batch_size=8, sample_steps=(2,))
    return config


def _moved(a, b):
    return any(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.any(x != y)), a, b)))


@pytest.mark.parametrize(
    "distill",
    [
        {},  # the full method: corrupted data as real, two-step trajectories, coupled time
        dict(  # every ablation switch flipped
            real="data", score_decomposition=False, coupled_time=False, time_weight="none",
            importance_weight=True, logprob_mode="transition", disc_trainable_blocks=0,
            reward_normalize=False, kl_weight=0.0, entropy_weight=0.0, critic_steps=2,
        ),
    ],
)  # fmt: skip
def test_two_jitted_steps_are_finite_and_move_the_student(tiny_text_teacher, distill):
    method = didi.make_method(_config(tiny_text_teacher, **distill))
    state0 = method.init(jax.random.key(0))
    state, step = state0, jax.jit(method.step)
    batches = method.batches(0)
    for i in range(2):
        state, metrics = step(state, next(batches), jax.random.key(i), jnp.int32(i))
    for name, value in metrics.items():
        assert np.isfinite(value), (name, value)
    assert _moved(state.student, state0.student), "the student did not move"
    assert _moved(state.discriminator, state0.discriminator), "the discriminator did not move"
    assert _moved(state.student_ema, state0.student_ema)


def test_discriminator_freezes_all_but_last_blocks(tiny_text_teacher):
    method = didi.make_method(_config(tiny_text_teacher, disc_trainable_blocks=1))
    state = method.init(jax.random.key(0))
    assert sorted(state.discriminator["blocks"]) == ["block1"]


def test_evaluate_reports_student_and_teacher(tiny_text_teacher, tmp_path):
    method = didi.make_method(_config(tiny_text_teacher))
    text_eval.clear_sampler_cache()
    results = method.evaluate(method.init(jax.random.key(0)), jax.random.key(1), str(tmp_path))
    # one cached sampler for student and teacher at 2 steps (params are its arguments), the
    # same as the MDLM teacher's own evaluation builds from the teacher file's network
    info = text_eval.sampler_cache_info()
    assert (info.misses, info.hits, info.currsize) == (1, 1, 1)
    net = load_teacher_denoiser(tiny_text_teacher)[0]
    text_eval.ancestral_sampler(net, masked.get_schedule("loglinear", 1e-3), 2)
    assert text_eval.sampler_cache_info().currsize == 1
    for who in ("student", "teacher"):
        for key in ("gen_ppl", "entropy", "nfe", "invalid_rate"):
            assert f"{who}/steps2/{key}" in results
        assert math.isfinite(results[f"{who}/steps2/gen_ppl"])
    # the student starts as a copy of the teacher: same sampler keys give the same samples
    assert results["student/steps2/gen_ppl"] == pytest.approx(results["teacher/steps2/gen_ppl"])
    assert math.isfinite(results["source/gen_ppl"])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(real="model"), "distill.real"),
        (dict(group_size=3), "multiple of distill.group_size"),
        (dict(group_size=1), "group_size >= 2"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(tau_min=0.5, tau_max=0.4), "tau_min"),
        (dict(time_weight="snr"), "time_weight"),
        (dict(logprob_mode="x"), "logprob_mode"),
        (dict(disc_trainable_blocks=3), "disc_trainable_blocks"),
        (dict(kl_weight=-1.0), "kl_weight"),
    ],
)
def test_bad_configs_say_what_to_set(tiny_text_teacher, change, message):
    with pytest.raises(ValueError, match=message):
        didi.make_method(_config(tiny_text_teacher, **change))


def test_missing_teacher_and_mismatched_language_are_clear(tiny_text_teacher, tmp_path):
    with pytest.raises(ValueError, match="teacher.checkpoint is empty"):
        didi.make_method(_config(""))
    with pytest.raises(FileNotFoundError, match="Train one first"):
        didi.make_method(_config(str(tmp_path / "none.msgpack")))
    config = _config(tiny_text_teacher)
    config.data.language = "markov"
    with pytest.raises(ValueError, match="does not fit the teacher"):
        didi.make_method(config)


def test_config_arg_errors():
    with pytest.raises(ValueError, match="expected '<language>'"):
        synthetic_didi.get_config("markov,fast")


def test_short_cpu_run_beats_the_shipped_teachers_8_step_sampling(tmp_path):
    """`configs/synthetic_didi.py:markov_tiny,cpu` (200 steps from the shipped teacher) lowers
    the exact-judge perplexity of 8-step sampling below the teacher's own 8-step sampling
    (same keys), without buying it by collapse: the student's unigram entropy stays within
    10% of the data's. Measured: 2.223 vs 2.329, entropy 0.907 vs data 0.961. The control run
    with the discriminator frozen at its initialisation (rewards = noise) reached 2.268 only by
    collapsing (entropy 0.790), and its 16-step perplexity got worse than the teacher's."""
    from didistill.distill import get_method
    from didistill.train.loop import train

    config = synthetic_didi.get_config("markov_tiny,cpu")
    config.teacher.checkpoint = os.path.join(REPO, config.teacher.checkpoint)
    config.eval.sample_steps = (8,)
    config.train.update(progress=False, checkpoint_every=0)
    results = train(get_method(config), config, str(tmp_path))["eval"]
    student, teacher = results["student/steps8/gen_ppl"], results["teacher/steps8/gen_ppl"]
    assert student < 0.98 * teacher, (student, teacher)
    assert results["student/steps8/entropy"] > 0.9 * results["data/entropy"], results
