"""Step halving (SDTT): the two-step target against brute-force enumeration, the loss, rounds,
every divergence from config, jitted steps on a tiny DiT teacher, evaluation and config errors."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import synthetic_sdtt
from didistill.diffusion import masked
from didistill.distill.discrete import step_halving as sh
from didistill.divergences.categorical import categorical_names
from didistill.eval import text as text_eval
from tests.teachers import LANGUAGE, LENGTH

V, L, MASK = 2, 3, 2  # the enumerable setting: 2 tokens, 3 positions
SCHEDULE = masked.get_schedule("loglinear", 1e-3)
T, M, S = 0.9, 0.6, 0.3
PARAMS = {"alpha": {"alpha": 0.5}, "skew_kl": {}, "alpha_beta": {"alpha": 0.2, "beta": 0.7}}


def _config(teacher_path, **distill):
    config = synthetic_sdtt.get_config(f"{LANGUAGE},smoke")
    config.teacher.checkpoint = teacher_path
    config.data.length = LENGTH
    config.distill.update(**distill)
    config.eval.update(num_samples=8, batch_size=8, sample_steps=(2,))
    return config


def _mlp(key, scale=1.5):
    """A context-dependent denoiser over L positions: logits [B, L, V + 1] of one-hot z."""
    k1, k2 = jax.random.split(key)
    w1 = scale * jax.random.normal(k1, (L * (V + 1), 16))
    w2 = scale * jax.random.normal(k2, (16, L * (V + 1)))
    return lambda z, t: (jnp.tanh(jax.nn.one_hot(z, V + 1).reshape(len(z), -1) @ w1) @ w2).reshape(
        len(z), L, V + 1
    )


def _probs(fn, z, t):  # SUBS probabilities [L, V + 1] at one state z [L], float64
    z = jnp.asarray([z], jnp.int32)
    return np.exp(np.asarray(masked.subs_log_probs(fn(z, jnp.full((1,), t)), z), np.float64))[0]


def _step_prob(x, z_from, z_to, a_from, a_to):
    """Brute-force q(z_to | z_from) of one ancestral step with SUBS probabilities x [L, V+1]."""
    p = 1.0
    for l in range(L):
        if z_from[l] != MASK:
            p *= float(z_to[l] == z_from[l])
        elif z_to[l] == MASK:
            p *= (1 - a_to) / (1 - a_from)
        else:
            p *= (a_to - a_from) / (1 - a_from) * x[l, z_to[l]]
    return p


def _successors(z):
    return [c for c in itertools.product(range(V + 1), repeat=L)
            if all(z[l] == MASK or c[l] == z[l] for l in range(L))]  # fmt: skip


@pytest.fixture(scope="module")
def enumerated():
    """Every teacher path z_t -> z_m -> z_s with its exact probability, and the two laws."""
    fn = _mlp(jax.random.key(3))
    z_t = (MASK, MASK, 1)
    a_t, a_m, a_s = (float(SCHEDULE.alpha(x)) for x in (T, M, S))
    x_t = _probs(fn, z_t, T)
    paths, pi, step_law = [], np.zeros((L, V + 1)), np.zeros((L, V + 1))
    for z_m in _successors(z_t):
        p_m = _step_prob(x_t, z_t, z_m, a_t, a_m)
        x_m = _probs(fn, z_m, M)
        pi += p_m * x_m  # law of x0 ~ SUBS x_T(z_m)
        for z_s in _successors(z_m):
            p_s = p_m * _step_prob(x_m, z_m, z_s, a_m, a_s)
            paths.append((p_s, z_m, z_s, x_m))
            step_law[np.arange(L), z_s] += p_s  # law of z_s
    mu = step_law[:, :V] / step_law[:, :V].sum(-1, keepdims=True)  # z_s^l given revealed
    return dict(fn=fn, z_t=z_t, x_t=x_t, paths=paths, pi=pi, mu=mu, a=(a_t, a_m, a_s))


def _target(e, z_m, z_s, target):
    lp_t = jnp.log(jnp.asarray(e["x_t"]))[None]
    lp_m = masked.subs_log_probs(e["fn"](jnp.asarray([z_m]), jnp.full((1,), M)), jnp.asarray([z_m]))
    z_t, z_m, z_s = (jnp.asarray([z]) for z in (e["z_t"], z_m, z_s))
    log_tau, pos = sh.two_step_target(lp_t, lp_m, z_t, z_m, z_s, target)
    return np.exp(np.asarray(log_tau, np.float64))[0], np.asarray(pos)[0]


@pytest.mark.parametrize("target", sh.TARGETS)
def test_target_is_a_distribution_whose_mean_is_the_brute_force_law(enumerated, target):
    e = enumerated
    num, den = np.zeros((L, V + 1)), np.zeros((L, 1))
    for p, z_m, z_s, _ in e["paths"]:
        tau, pos = _target(e, z_m, z_s, target)
        np.testing.assert_allclose(tau.sum(-1), 1.0, atol=1e-6)
        assert np.all(tau[:, MASK] == 0) and np.all(tau >= 0)
        assert not pos[2]  # the position unmasked at t is never a loss position
        num += p * pos[:, None] * tau
        den += p * pos[:, None]
    mean = num[:2, :V] / den[:2]
    want = e["mu"] if target == "step_marginal" else e["pi"][:2, :V]
    np.testing.assert_allclose(mean, want[:2], atol=2e-6)


def test_closed_forms_of_pi_and_mu(enumerated):
    e = enumerated
    a_t, a_m, a_s = e["a"]
    r1, w = (a_m - a_t) / (1 - a_t), (a_m - a_t) / (a_s - a_t)
    still = np.zeros((L, V + 1))  # E[x_T(z_m) 1(z_m^l = m)]
    p_still = np.zeros((L, 1))
    for p, z_m, _, x_m in e["paths"]:
        on = np.asarray(z_m)[:, None] == MASK
        still += p * on * x_m
        p_still += p * on
    later = still / np.maximum(p_still, 1e-30)  # E[x_T(z_m)^l | z_m^l = m]
    np.testing.assert_allclose(e["pi"][:2], r1 * e["x_t"][:2] + (1 - r1) * later[:2], atol=1e-6)
    mu = w * e["x_t"][:2, :V] + (1 - w) * later[:2, :V]
    np.testing.assert_allclose(e["mu"][:2], mu, atol=1e-6)


@pytest.mark.parametrize("target", ["sdtt", "step_marginal"])
def test_sampled_paths_average_to_the_brute_force_law(enumerated, target):
    e, n = enumerated, 20000
    z_t = jnp.tile(jnp.asarray([e["z_t"]], jnp.int32), (n, 1))
    ones = jnp.ones((n,))
    path = jax.jit(
        lambda k: sh.teacher_path(e["fn"], k, z_t, T * ones, M * ones, S * ones, SCHEDULE)
    )
    lp_t, z_m, lp_m, z_s = path(jax.random.key(7))
    log_tau, pos = sh.two_step_target(lp_t, lp_m, z_t, z_m, z_s, target)
    tau, pos = np.exp(np.asarray(log_tau, np.float64)), np.asarray(pos)[..., None]
    mean = (tau * pos)[:, :2].sum(0) / pos[:, :2].sum(0)
    want = e["mu"] if target == "step_marginal" else e["pi"][:2, :V]
    np.testing.assert_allclose(mean[:2, :V], want[:2], atol=0.02)


def _sdtt_config(name, target="sdtt"):
    config = synthetic_sdtt.get_config("markov_tiny,smoke")
    config.distill.update(divergence=name, target=target, teacher_steps=4, rounds=1)
    config.distill.divergence_params.update(PARAMS.get(name, {}))
    return config


X0 = jax.random.randint(jax.random.key(0), (16, L), 0, V)
TABLE = jax.random.normal(jax.random.key(1), (L, V + 1))


def _context_free(z, t):
    """x_T(z_t) = x_T(z_m) at masked positions: the two-step target is x_T itself."""
    return jnp.broadcast_to(TABLE, (*z.shape, V + 1))


@pytest.mark.parametrize("name", categorical_names())
def test_every_divergence_from_config_trains_the_student(name):
    config = _sdtt_config(name)
    sh.validate(config)
    params = sh.divergence_params(config.distill)
    keys = jax.random.split(jax.random.key(6), 2)
    no_mask = jnp.arange(V + 1) == MASK  # SUBS: [MASK] has probability 0
    log_tau = jax.nn.log_softmax(
        jnp.where(no_mask, -jnp.inf, jax.random.normal(keys[0], (2, L, V + 1)))
    )
    positions = jnp.array([[True, True, False], [False, True, True]])

    @jax.jit
    def run(logits):
        def loss(logits):
            log_student = jax.nn.log_softmax(jnp.where(no_mask, -jnp.inf, logits))
            return sh.divergence_loss(
                config.distill.divergence, log_tau, log_student, positions, **params
            )[0]

        return loss(log_tau), jax.value_and_grad(loss)(logits)

    at_target, (value, grad) = run(jax.random.normal(keys[1], (2, L, V + 1)))
    assert abs(float(at_target)) < 1e-5 and float(value) > 0 and np.isfinite(float(value))
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0
    assert float(jnp.abs(grad[0, 2]).max()) == 0  # off the loss positions: no gradient


def test_make_loss_moves_a_student_copy_of_a_context_dependent_teacher():
    loss_fn = sh.make_loss(_sdtt_config("reverse_kl").distill, SCHEDULE, MASK)
    teacher = _mlp(jax.random.key(3))  # a copy of it is away from its two-step target

    def objective(shift):
        return loss_fn(lambda z, t: teacher(z, t) + shift, teacher, jax.random.key(4), X0, 0)

    (loss, aux), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(jnp.zeros((L, V + 1)))
    assert np.isfinite(float(loss)) and float(loss) > 0 and 0 < float(aux["loss_positions"]) <= 1
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0


def test_loss_is_zero_when_the_student_is_the_two_step_target():
    cases = [("reverse_kl", "sdtt"), ("jensen_shannon", "step_marginal"), ("forward_kl", "onehot")]
    losses = [sh.make_loss(_sdtt_config(n, t).distill, SCHEDULE, MASK) for n, t in cases]
    run = jax.jit(lambda key: [f(_context_free, _context_free, key, X0, 0) for f in losses])
    (sdtt, aux), (marginal, _), (onehot, _) = run(jax.random.key(5))
    assert abs(float(sdtt)) < 1e-5 and abs(float(marginal)) < 1e-5
    assert float(aux["loss_positions"]) > 0
    # 'onehot' targets are one-hot where the first step revealed: not x_T there
    assert float(onehot) > 0 and np.isfinite(float(onehot))


def test_divergence_loss_zero_for_equal_arguments_and_onehot_check():
    lp = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (2, L, V + 1)))
    onehot = jnp.log(jax.nn.one_hot(jnp.zeros((2, L), jnp.int32), V + 1))
    pos = jnp.array([[True, False, True], [False, False, True]])
    for name in categorical_names():
        params = PARAMS.get(name, {})
        loss, count = sh.divergence_loss(name, lp, lp, pos, **params)
        assert abs(float(loss)) < 1e-6 and int(count) == 3
        # target='onehot' is refused exactly for the divergences infinite at one-hot targets
        try:
            sh.validate(_sdtt_config(name, "onehot"))
            accepted = True
        except ValueError:
            accepted = False
        loss, _ = sh.divergence_loss(name, onehot, lp, pos, **params)
        assert bool(np.isfinite(float(loss))) == accepted, (name, float(loss))


def test_step_times_follow_the_student_grid():
    for k, n_student in [(0, 4), (1, 2), (2, 1)]:
        t, m, s = sh.step_times(jax.random.key(k), 512, k, 8, "grid")
        grid = np.asarray(masked.time_grid(n_student))[:-1]
        assert set(np.round(np.asarray(t), 6)) == set(np.round(grid, 6))
        np.testing.assert_allclose(t - s, 1 / n_student, atol=1e-6)
        np.testing.assert_allclose(t - m, 0.5 / n_student, atol=1e-6)


def _moved(a, b):
    return any(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.any(x != y)), a, b)))


def _equal(a, b):
    return not _moved(a, b)


def test_rounds_switch_the_teacher_and_halve_the_steps(tiny_text_teacher_1block):
    method = sh.make_method(_config(tiny_text_teacher_1block, rounds=3, steps_per_round=1))
    state0 = method.init(jax.random.key(0))
    step, batches = jax.jit(method.step), method.batches(0)
    states, metrics = [state0], []
    for i in range(4):
        state, m = step(states[-1], next(batches), jax.random.key(i), jnp.int32(i))
        states.append(state)
        metrics.append(m)
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values()), m
    assert [int(m["round"]) for m in metrics] == [0, 1, 2, 2]
    assert [float(m["teacher_steps"]) for m in metrics] == [8, 4, 2, 2]
    assert [float(m["student_steps"]) for m in metrics] == [4, 2, 1, 1]
    assert _moved(states[1].student, state0.student) and _equal(states[1].teacher, state0.teacher)
    # the teacher of round k is the student at the end of round k - 1, then stays frozen
    assert _equal(states[2].teacher, states[1].student)
    assert _equal(states[3].teacher, states[2].student)
    assert _equal(states[4].teacher, states[3].teacher)
    assert _moved(states[4].student_ema, state0.student_ema)


def test_variant_step_is_finite_and_moves_the_student(tiny_text_teacher_1block):
    config = _config(
        tiny_text_teacher_1block, target="step_marginal", divergence="jensen_shannon",
        time_sampling="uniform", teacher_from="ema", reset_optimizer=True, steps_per_round=1,
    )  # fmt: skip
    method = sh.make_method(config)
    state0 = method.init(jax.random.key(0))
    step, batches = jax.jit(method.step), method.batches(0)
    state, _ = step(state0, next(batches), jax.random.key(0), jnp.int32(0))
    state, metrics = step(state, next(batches), jax.random.key(1), jnp.int32(1))
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert _moved(state.student, state0.student)


def test_evaluate_reports_student_and_teacher(tiny_text_teacher_1block, tmp_path):
    method = sh.make_method(_config(tiny_text_teacher_1block))
    text_eval.clear_sampler_cache()
    results = method.evaluate(method.init(jax.random.key(0)), jax.random.key(1), str(tmp_path))
    info = text_eval.sampler_cache_info()  # student and teacher at 2 steps: one sampler
    assert (info.misses, info.hits, info.currsize) == (1, 1, 1)
    for who in ("student", "teacher"):
        for key in ("gen_ppl", "entropy", "nfe", "invalid_rate"):
            assert f"{who}/steps2/{key}" in results
    assert results["student/steps2/gen_ppl"] == pytest.approx(results["teacher/steps2/gen_ppl"])
    assert results["distill/round"] == 0 and results["distill/student_steps"] == 4
    assert math.isfinite(results["source/gen_ppl"])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(divergence="kl"), "unknown divergence"),
        (dict(divergence="alpha"), "alpha"),
        (dict(target="x0"), "distill.target"),
        (dict(target="onehot"), "infinite at the one-hot"),  # reverse KL, the default
        (dict(time_sampling="beta"), "time_sampling"),
        (dict(teacher_from="teacher"), "teacher_from"),
        (dict(rounds=0), "rounds"),
        (dict(steps_per_round=0), "steps_per_round"),
        (dict(teacher_steps=6, rounds=2), "multiple of 2"),
    ],
)
def test_bad_configs_say_what_to_set(tiny_text_teacher_1block, change, message):
    with pytest.raises(ValueError, match=message):
        sh.make_method(_config(tiny_text_teacher_1block, **change))


def test_onehot_target_accepts_divergences_finite_there(tiny_text_teacher_1block):
    sh.make_method(_config(tiny_text_teacher_1block, target="onehot", divergence="forward_kl"))


def test_missing_teacher_and_config_arg_errors(tiny_text_teacher_1block):
    with pytest.raises(ValueError, match="teacher.checkpoint is empty"):
        sh.make_method(_config(""))
    config = _config(tiny_text_teacher_1block)
    config.data.language = "markov"
    with pytest.raises(ValueError, match="does not fit the teacher"):
        sh.make_method(config)
    with pytest.raises(ValueError, match="expected '<language>'"):
        synthetic_sdtt.get_config("markov,fast")
