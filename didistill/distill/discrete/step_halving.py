"""Step halving: SDTT-style self-distillation of an MDLM teacher, with any categorical divergence.

Deschenaux & Gulcehre, "Beyond Autoregression: Fast LLMs via Self-Distillation Through Time",
ICLR 2025 (arXiv:2410.21035). A student initialised from the teacher learns to do in ONE
ancestral step t -> s what the teacher does in TWO steps t -> m -> s (m the midpoint). Any
divergence of `categorical_names()` is the matching loss (`config.distill.divergence`), so
divergences can be compared on discrete students.

Notation (`didistill.diffusion.masked`): a_t = alpha_t; x_T(z), x_S(z) are the SUBS denoisers of
teacher and student (probabilities over the V tokens, 0 on [MASK], a one-hot at unmasked
positions); l is a position with z_t^l = m ([MASK]). One teacher step t -> m reveals l with
probability r1 = (a_m - a_t)/(1 - a_t) and draws its value from x_T(z_t)^l; the step m -> s
reveals a still-masked l with r2 = (a_s - a_m)/(1 - a_m), value from x_T(z_m)^l. The student's
single step reveals l with rho = (a_s - a_t)/(1 - a_t) = r1 + (1 - r1) r2, value from x_S(z_t)^l.

Exact two-step marginal. For v a token,

    P_T(z_s^l = v | z_t) = [(a_m - a_t) x_T(z_t)^l[v] + (a_s - a_m) E[x_T(z_m)^l[v] | z_m^l = m]]
                           / (1 - a_t),

and P_T(z_s^l = m | z_t) = (1 - a_s)/(1 - a_t) equals the student's. So the student's
(factorised) step law equals the product of the teacher's two-step marginals iff x_S(z_t)^l = mu^l,

    mu^l = w x_T(z_t)^l + (1 - w) E_{z_m}[x_T(z_m)^l | z_m^l = m],   w = (a_m - a_t)/(a_s - a_t)

(w = 1/2 for the log-linear schedule). The joint two-step law couples positions through z_m,
which no factorised one-step student represents; the product of marginals is its best
factorised approximation in KL(teacher || student).

Targets (`config.distill.target`). From one teacher path z_t -> z_m -> z_s (two network calls,
at z_t and at z_m; z_s costs no call) each gives a target tau^l and a set of loss positions:

- 'sdtt' (default; SDTT's `_teacher_logprobs_on_mask`): loss on every l masked at t;
  tau^l = x_T(z_t)^l if l was revealed by the first step (the teacher's prediction at the step
  that revealed it), else x_T(z_m)^l. Its mean is
      pi^l = E_{z_m}[tau^l] = r1 x_T(z_t)^l + (1 - r1) E[x_T(z_m)^l | z_m^l = m],
  the law of x0^l under "z_m ~ teacher step t -> m, then x0 ~ x_T(z_m)" (the teacher's
  denoising distribution after its steps).
- 'onehot' (the paper's wording): loss on every l masked at t; tau^l = x_T(z_m)^l with SUBS, i.e.
  the one-hot of the revealed token where z_m^l != m. Same mean pi^l (a one-hot of a draw from
  x_T(z_t)^l has mean x_T(z_t)^l); 'sdtt' replaces that one-hot by its mean, so it has less
  variance. Divergences with a log tau term under the student's mass (reverse KL, Jeffreys,
  Neyman chi2, softened reverse KL, ...) are infinite at a one-hot target: `make_method` checks
  the divergence at a one-hot target and refuses those.
- 'step_marginal': loss only on l revealed by s (z_t^l = m, z_s^l != m); tau^l as in 'sdtt'.
  Given l revealed by s, it was revealed by the first step with probability r1/rho = w, so
  E[tau^l | revealed] = mu^l: the exact two-step marginal above (positions still masked at s
  carry no information, both laws give them the same mass).

pi and mu mix the same two predictions: pi puts r1 (= dt/t for log-linear, small for fine
steps) on the first-step prediction, mu puts w = 1/2. With an exact teacher (x_T(z)^l =
p(x0^l | unmasked tokens of z)) both equal x_T(z_t)^l by the tower property, so distilling an
exact teacher leaves it unchanged.

Loss. With D = `categorical_from_log_probs(divergence, log tau, log x_S)` over the V + 1 entries
([MASK] has probability 0 in both) and P the loss positions of the batch,

    L(theta) = sum_{(b, l) in P} D(tau^l || x_S(z_t)^l; theta) / max(1, |P|)

(a mean over loss tokens, as SDTT's `batchmean` over masked tokens). For an f-divergence the
step laws over V + 1 values give D_f(P_T(z_s^l | z_t) || q_S(z_s^l | z_t)) = rho D_f(mu^l ||
x_S^l) (the [MASK] entries agree, the token entries share the factor rho). D is evaluated at the
one-path target tau, not at its mean: only divergences linear in the target up to a
student-free term (forward KL) have an unbiased gradient; the others, SDTT's reverse KL
included, are biased the same way SDTT's are. SDTT's 'kl-bwd' (its default, sum x_S log(x_S /
tau)) is `reverse_kl` here and 'kl-fwd' is `forward_kl`; its 'tvd' and 'mse' (in the public copy
I read) act on log-probabilities, so they are not this library's `total_variation`.

Times (`time_sampling`). Round k has a teacher of N_k = teacher_steps / 2^k steps and a student
of N_k / 2 steps of size h = 2 / N_k. 'antithetic' (default, SDTT's): continuous
low-discrepancy times, u_i = (u + i/B) mod 1 for one u ~ U[0, 1) per batch of B, and
t_i = (1 - e) u_i + e with e = 1e-5 (SDTT's `training.sampling_eps`); 'uniform': t ~ U[h, 1];
'grid': t = 1 - j h with j ~ U{0, ..., N_k/2 - 1}, exactly the steps `masked.ancestral_sample`
takes with N_k / 2 steps. Then m = t - h/2, s = max(t - h, 0), and z_t = forward_mask(x, t)
for data x (at t = 1 a token stays unmasked with probability eps, while the sampler starts
from all [MASK]; as in SDTT).

What the reference computes (jdeschena/sdtt @ 9172b86, src/sdtt/core/distill/
multi_round_sdtt.py `loss` 314-343 and `_teacher_logprobs_on_mask` 256-312, core/diffusion/
absorbing.py `_sample_t` 145-162, configs/config.yaml 51-53): t as 'antithetic' above, z_t ~
q(. | x, t), the student's prediction at z_t, and the teacher's predictions along two ancestral
steps of size dt = (1 - e) / N_k each (so h = 2 dt): with space = linspace(1, 0, 2) = (1, 0)
it forms ts = t * space + (1 - t) * (t - 2 dt), i.e. the steps start at

    t_1 = max(t + (1 - t)(t - 2 dt), e)     and     t_2 = max((1 - t)(t - 2 dt), e),

each going from t_i to t_i - dt (not t -> t - dt -> t - 2 dt: the interpolation weight is
(1 - t), not (1 - space)). For a time-agnostic teacher only the reveal probabilities of these
two steps differ from the midpoint path used here (t -> t - h/2 -> t - h), which is the one
the paper describes; this module keeps the midpoint path. Its targets are those of 'sdtt'
below, its loss a `batchmean` KL over all tokens masked in z_t.

Metrics: `loss`, `grad_norm`, `loss_positions` (fraction of the batch's tokens in P),
`first_step_fraction` (fraction of P whose target is the first-step prediction: about r1 for
'sdtt', w for 'step_marginal'), `round`, `teacher_steps`, `student_steps`.

Rounds. At engine step i the round is k = min(i // steps_per_round, rounds - 1). The teacher of
round k is a frozen copy of the student at the end of round k - 1 (`teacher_from='ema'`: of its
EMA, which also becomes the student, as SDTT's `use_ema_on_growth`). It lives in the state
(`StepHalvingState.teacher`, starting as the loaded teacher) and is switched inside the jitted
step by `lax.cond` on `k > state.round`: no host round trip, and a resumed run is exact. This
departs from the library's convention that teacher params stay out of the train state
(docs/design.md): from round 1 on the teacher IS a student snapshot, so checkpoints hold it
(one extra copy of the params). The step sizes follow the traced k, so one compiled step serves
every round. `train.num_steps` beyond rounds * steps_per_round continues the last round.

Teacher loading, the schedule, the cached sampler and the evaluation prelude are the
text-student scaffold (`student`). Gradient accumulation (`train.grad_accum_steps` = k): k
micro-batches of B / k rows, each weighted by its number of loss positions, so the loss and
gradient are the whole batch's ratio (`train/accumulate.py`).

Departures from the reference: the teacher's two steps are t -> m -> s (the reference's
start times are t_1 and t_2 above); no analytic sampler, no float64 loss, no MAUVE.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from didistill.diffusion import masked
from didistill.distill.discrete import student
from didistill.distill.teachers.mdlm import logits_fn_of
from didistill.divergences.categorical import categorical_from_log_probs, categorical_names
from didistill.train import accumulate
from didistill.train.method import Method
from didistill.train.optim import apply_gradients, ema_update, make_optimizer

TARGETS = ("sdtt", "onehot", "step_marginal")
TIME_SAMPLINGS = ("antithetic", "grid", "uniform")
ANTITHETIC_EPS = 1e-5  # SDTT's training.sampling_eps
TEACHER_FROM = ("student", "ema")


class StepHalvingState(flax.struct.PyTreeNode):
    student: Any
    student_opt: Any
    student_ema: Any
    teacher: Any  # frozen teacher of the current round (round 0: the loaded teacher)
    round: jax.Array  # int32 scalar, the round the teacher belongs to


def divergence_params(distill_cfg) -> dict[str, float]:
    """The divergence's parameters: the entries of distill.divergence_params that are set."""
    params = distill_cfg.get("divergence_params", None) or {}
    return {k: v for k, v in dict(params).items() if v is not None}


def antithetic_times(key, n: int, eps: float = ANTITHETIC_EPS) -> jax.Array:
    """t_i = (1 - eps) ((u + i/n) mod 1) + eps, one u ~ U[0, 1) per call, float32 [n]
    (SDTT's and MDLM's `_sample_t` with antithetic sampling)."""
    u = jax.random.uniform(key, ())
    offsets = jnp.arange(n, dtype=jnp.float32) / n  # linspace(0, 1, n + 1)[:-1]
    return (1.0 - eps) * jnp.mod(u + offsets, 1.0) + eps


def step_times(key, n: int, round_index, teacher_steps: int, time_sampling: str = "antithetic"):
    """(t, m, s) float32 [n] of student steps t -> s and teacher midpoints m in round k."""
    student_steps = teacher_steps * 0.5 ** (jnp.asarray(round_index, jnp.float32) + 1.0)
    h = 1.0 / student_steps  # student step size
    if time_sampling == "antithetic":
        t = antithetic_times(key, n)
    else:
        u = jax.random.uniform(key, (n,))
        t = (
            1.0 - jnp.floor(u * student_steps) / student_steps
            if time_sampling == "grid"
            else (h + (1.0 - h) * u)
        )
    return t, t - 0.5 * h, jnp.maximum(t - h, 0.0)


def teacher_path(teacher_fn, key, z_t, t, m, s, schedule: masked.Schedule):
    """Two teacher ancestral steps z_t -> z_m -> z_s; returns (log x_T(z_t), z_m, log x_T(z_m),
    z_s), log-probs [B, L, V + 1] (SUBS), tokens [B, L]. Two network calls."""
    k_m, k_s = jax.random.split(key)
    lp_t = masked.subs_log_probs(teacher_fn(z_t, t), z_t)
    z_m = masked.ancestral_step(k_m, lp_t, z_t, t, m, schedule)
    lp_m = masked.subs_log_probs(teacher_fn(z_m, m), z_m)
    z_s = masked.ancestral_step(k_s, lp_m, z_m, m, s, schedule)
    return jax.tree.map(jax.lax.stop_gradient, (lp_t, z_m, lp_m, z_s))


def two_step_target(lp_t, lp_m, z_t, z_m, z_s, target: str = "sdtt"):
    """(log tau [B, L, V + 1], loss positions bool [B, L]) of one teacher path (docstring)."""
    mask_id = lp_t.shape[-1] - 1
    masked_t = z_t == mask_id
    revealed_first = masked_t & (z_m != mask_id)  # [B, L]
    if target == "onehot":
        log_tau = lp_m
    else:
        log_tau = jnp.where(revealed_first[..., None], lp_t, lp_m)
    positions = masked_t & (z_s != mask_id) if target == "step_marginal" else masked_t
    return log_tau, positions


def divergence_loss(divergence: str, log_tau, log_student, positions, **params):
    """(mean of D(tau || x_S) over loss positions, number of positions); rows off the loss
    positions are replaced by a fixed distribution so they add nothing, gradients included."""
    uniform = -math.log(log_tau.shape[-1])
    keep = positions[..., None]
    per_token = categorical_from_log_probs(
        divergence,
        jnp.where(keep, log_tau, uniform),
        jnp.where(keep, log_student, uniform),
        axis=-1,
        **params,
    )  # fmt: skip  [B, L]
    count = jnp.sum(positions)
    total = jnp.sum(jnp.where(positions, per_token, 0.0))
    return total / jnp.maximum(count, 1), count


def make_loss(distill_cfg, schedule: masked.Schedule, mask_id: int):
    """loss_fn(student_fn, teacher_fn, key, x0 [B, L], round_index) -> (loss, aux metrics)."""
    divergence, params = distill_cfg.divergence, divergence_params(distill_cfg)
    target, teacher_steps = distill_cfg.target, distill_cfg.teacher_steps

    def loss_fn(student_fn, teacher_fn, key, x0, round_index):
        k_t, k_mask, k_path = jax.random.split(key, 3)
        t, m, s = step_times(
            k_t, x0.shape[0], round_index, teacher_steps, distill_cfg.time_sampling
        )
        z_t = masked.forward_mask(k_mask, x0, t, schedule, mask_id)  # [B, L]
        lp_t, z_m, lp_m, z_s = teacher_path(teacher_fn, k_path, z_t, t, m, s, schedule)
        log_tau, positions = two_step_target(lp_t, lp_m, z_t, z_m, z_s, target)
        log_student = masked.subs_log_probs(student_fn(z_t, t), z_t)  # [B, L, V + 1]
        loss, count = divergence_loss(divergence, log_tau, log_student, positions, **params)
        first = positions & (z_m != mask_id)
        aux = {
            "loss_positions": count / positions.size,
            "first_step_fraction": jnp.sum(first) / jnp.maximum(count, 1),
        }
        return loss, aux

    return loss_fn


def validate(config) -> None:
    """Checks config.distill; raises ValueError naming the key and what to set."""
    d = config.distill
    n0, rounds = d.teacher_steps, d.rounds
    checks = [
        (d.target in TARGETS, f"distill.target={d.target!r} must be one of {TARGETS}"),
        (
            d.time_sampling in TIME_SAMPLINGS,
            f"distill.time_sampling={d.time_sampling!r} must be one of {TIME_SAMPLINGS}",
        ),
        (
            d.teacher_from in TEACHER_FROM,
            f"distill.teacher_from={d.teacher_from!r} must be one of {TEACHER_FROM}",
        ),
        (rounds >= 1, f"distill.rounds={rounds} must be >= 1"),
        (d.steps_per_round >= 1, f"distill.steps_per_round={d.steps_per_round} must be >= 1"),
        (
            rounds >= 1 and n0 >= 2 and n0 % 2**rounds == 0,
            f"distill.teacher_steps={n0} must be a multiple of 2^rounds = 2^{rounds} (the last "
            "student takes teacher_steps / 2^rounds steps)",
        ),
        (0.0 <= config.ema_decay < 1.0, f"ema_decay={config.ema_decay} must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"bad step-halving config: config.{message}")
    params = divergence_params(d)
    probe = jnp.log(jnp.array([[0.5, 0.3, 0.2, 0.0]]))
    try:
        categorical_from_log_probs(d.divergence, probe, probe[:, ::-1], **params)
    except ValueError as err:
        raise ValueError(
            f"bad step-halving config: config.distill.divergence={d.divergence!r} with "
            f"divergence_params={params}: {err} (names: {', '.join(categorical_names())})"
        ) from None
    if d.target == "onehot":
        onehot = jnp.log(jnp.array([[1.0, 0.0, 0.0, 0.0]]))
        student = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
        value = categorical_from_log_probs(d.divergence, onehot, student, **params)
        if not np.all(np.isfinite(np.asarray(value))):
            raise ValueError(
                f"bad step-halving config: config.distill.divergence={d.divergence!r} is "
                "infinite at the one-hot targets of config.distill.target='onehot'; use "
                "target='sdtt' or a divergence finite there (e.g. forward_kl, jensen_shannon)"
            )


def make_method(config) -> Method:
    """Builds the step-halving `Method` for a `configs/synthetic_sdtt.py` config."""
    scaffold = student.load(config, lambda net: validate(config))
    d, net = config.distill, scaffold.net
    optimizer = make_optimizer(config.optim_student, total_steps=config.train.num_steps)
    loss_fn = make_loss(d, scaffold.schedule, scaffold.mask_id)
    accum = accumulate.check(config)

    def init(key):
        del key  # the student starts as the teacher
        student_params, teacher = scaffold.teacher_copy(), scaffold.teacher_copy()
        return StepHalvingState(
            student_params, optimizer.init(student_params), student_params, teacher,
            jnp.zeros((), jnp.int32),
        )  # fmt: skip

    def next_round(state, round_index):
        """Round k > state.round: the teacher becomes the student (or its EMA)."""

        def switch(state):
            source = state.student_ema if d.teacher_from == "ema" else state.student
            opt = optimizer.init(source) if d.reset_optimizer else state.student_opt
            ema = source if d.teacher_from == "ema" else state.student_ema
            return state.replace(
                student=source, student_opt=opt, student_ema=ema, teacher=source,
                round=round_index,
            )  # fmt: skip

        return jax.lax.cond(round_index > state.round, switch, lambda state: state, state)

    def step(state, batch, key, step_index):
        round_index = jnp.minimum(step_index // d.steps_per_round, d.rounds - 1)
        state = next_round(state, round_index.astype(jnp.int32))
        teacher_fn = logits_fn_of(net, state.teacher)

        def objective(params, tokens, key):
            return loss_fn(logits_fn_of(net, params), teacher_fn, key, tokens, state.round)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if accum == 1:
            (loss, aux), grads = grad_fn(state.student, batch["tokens"], key)
        else:  # the ratio over all loss positions of the batch: weights = positions per micro

            def micro(carry, j, tokens):
                out = grad_fn(state.student, tokens, jax.random.fold_in(key, j))
                return carry, (out, out[0][1]["loss_positions"] * tokens.size)

            tokens = accumulate.split(batch["tokens"], accum)
            (loss, aux), grads = accumulate.weighted_mean(micro, (), accum, tokens)[1]
        student_params, student_opt = apply_gradients(
            optimizer, state.student, state.student_opt, grads
        )
        state = state.replace(
            student=student_params,
            student_opt=student_opt,
            student_ema=ema_update(state.student_ema, student_params, config.ema_decay),
        )
        teacher_steps = d.teacher_steps * 0.5 ** state.round.astype(jnp.float32)
        metrics = dict(
            aux, loss=loss, grad_norm=optax.tree.norm(grads), round=state.round.astype(jnp.float32),
            teacher_steps=teacher_steps, student_steps=0.5 * teacher_steps,
        )  # fmt: skip
        return state, metrics

    def evaluate(state, key, workdir):
        del workdir
        _, results = scaffold.evaluate_prelude(jax.device_get(state.student_ema), key)
        final_round = int(jax.device_get(state.round))
        results["distill/round"] = final_round
        results["distill/student_steps"] = d.teacher_steps // 2 ** (final_round + 1)
        results.update(scaffold.source_report())
        return results

    return Method(
        init=init, step=step, evaluate=evaluate, batches=scaffold.batches,
        global_batch_size=config.train.batch_size,
    )  # fmt: skip


__all__ = [
    "StepHalvingState",
    "antithetic_times",
    "divergence_loss",
    "divergence_params",
    "make_loss",
    "make_method",
    "step_times",
    "teacher_path",
    "two_step_target",
    "validate",
]
