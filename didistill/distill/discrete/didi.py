"""DiDi-Instruct: few-step distillation of an MDLM teacher by an integral-KL policy gradient.

Zheng et al., "Ultra-Fast Language Generation via Discrete Diffusion Divergence Instruct",
arXiv:2509.25035; the estimator and its derivation are in `didi_losses`. Teacher loading, the
schedule, sampling and the evaluation prelude are the text-student scaffold (`student`).

Networks (all the teacher's `DiT` architecture):
- the student, initialised from the teacher's params, trained on `student_loss`;
- the discriminator: a copy of the teacher whose last `disc_trainable_blocks` = K blocks are
  trainable, the rest frozen at the teacher's weights (only the K blocks and the head live in
  the state; the frozen part is the closed-over teacher params), plus a per-token head
  [LN ->] Dense(D) -> SiLU -> Dense(1) on the last block's output. K = 0 is a head on the
  frozen teacher's features. The reference's head (`DiscriminatorHead`, which replaces the
  DiT's output layer, final norm included) is SN(Linear(D, D)) -> SiLU -> SN(Linear(D, 1)) with
  torch's `spectral_norm` (one power iteration per training forward): `disc_spectral_norm=True,
  disc_head_layernorm=False`. Here the power-iteration vector u lives in
  `DiDiState.discriminator_stats` (flax `SpectralNorm`: one iteration from the stored u at
  every call, stored only by the critic updates; the reward and the guided sampler read it).

One engine step (one jitted function):
1. `critic_steps` discriminator updates (`lax.scan`): "real" = data (`distill.real='data'`,
   the reference's `x0_real = input_ids`) or teacher samples (`'teacher'`,
   `teacher_sample_steps`-step ancestral sampler), "fake" = student samples, both
   forward-corrupted at the same tau when `coupled_time`, BCE with label smoothing on masked
   positions.
2. One student update: a G-grouped batch of two-step trajectories m -> z_tau -> x
   (`score_decomposition`; one step m -> x otherwise), tau ~ Beta(a, b) clamped; reward =
   discriminator mean masked-token logit on x re-corrupted at tau (coupled) or at a fresh
   t ~ U[tau_min, tau_max]; advantage = grouped z-score (`reward_normalize`); weight omega(t)
   (`time_weight`), optionally / pi(t) (`importance_weight`); log-prob of the path
   (`logprob_mode`: 'revealed' = token values at revealed positions, the reference's
   `prev_is_mask`; 'transition' = the full step law; same gradient, since where tokens are
   revealed does not depend on the student); KL(teacher || student) on the masked positions of
   each step, summed over the steps with `kl_weight` each (the reference's kl_hi_coef = kl_lo_coef
   = 0.01), and the entropy bonus averaged over the steps (its `(entropy_step1 +
   entropy_step2) / 2`).

Gradient accumulation (`train.grad_accum_steps` = k): every critic update and the student
update run k micro-batches of B / k rows and apply their mean gradient once
(`train/accumulate.py`; B / k a multiple of `group_size`).

Optimisers: `schedule='warmup_linear_decay'` (the default of `configs/synthetic_didi.py`) is the
reference's `_get_lr`, applied to both optimisers (`train.optim.warmup_linear_decay`), T =
train.num_steps.

`evaluate`: exact-judge `sample_report` of the EMA student and of the teacher at each of
`eval.sample_steps` (`student/steps{N}/...`, `teacher/steps{N}/...`), and of real data. With
`eval.guided.enabled`, also the EMA student under the reward-guided ancestral sampler
(`guided_sampling.guided_sample`, same keys as the plain student samples) with this
discriminator, log r = sum (`eval.guided.aggregate='sum'`, the reference) or mean of its token
logits over the positions the sampler names (masked ones when tilting; all L when re-ranking,
`eval.guided.rerank_positions='all'`): `student_guided/steps{N}/...`, where `nfe` counts
student calls and `nfe_discriminator`, `nfe_discriminator_backward`, `nfe_total` the rest.

Departures from the reference (its training release, `algo.py` `training_step`): one fresh
student batch per critic update and another for the student update (the reference reuses one
trajectory batch for both); the reward is the clipped logit (the reference's
log(sigma(d) + 1e-6) - log(1 - sigma(d) + 1e-6), equal within the +-8 clip); no nan_to_num of
gradients. The teacher params are closed over (jit constants): fine for small teachers; a 169M
teacher should be passed as a step input instead.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from didistill.diffusion import masked
from didistill.distill.discrete import didi_losses as losses
from didistill.distill.discrete import guided_sampling, student
from didistill.eval import text as text_eval
from didistill.train import accumulate
from didistill.train.method import Method
from didistill.train.optim import apply_gradients, ema_update, make_optimizer

REAL_SOURCES = ("teacher", "data")
LOGPROB_MODES = ("revealed", "transition")
TIME_WEIGHTS = ("none", "elbo")


class TokenHead(nn.Module):
    """Per-token discriminator head: hidden [B, L, D] -> logits [B, L].

    [LayerNorm ->] Dense(D) -> SiLU -> Dense(1); with `spectral_norm` each Dense kernel W is
    divided by sigma = u^T W v from one power iteration (v = W^T u / |.|, u = W v / |.|, u, v
    without gradient), u kept in the 'batch_stats' collection and stored when
    `update_stats` (torch's `spectral_norm` in training mode; the reference's head)."""

    width: int
    spectral_norm: bool = False
    layer_norm: bool = True

    @nn.compact
    def __call__(self, hidden, update_stats: bool = False):
        h = hidden.astype(jnp.float32)
        if self.layer_norm:
            h = nn.LayerNorm()(h)

        def dense(features, name, x):
            layer = nn.Dense(features, name=name)
            if self.spectral_norm:
                return nn.SpectralNorm(layer, name=f"sn_{name}")(x, update_stats=update_stats)
            return layer(x)

        h = nn.silu(dense(self.width, "hidden", h))
        return dense(1, "out", h)[..., 0]


class DiDiState(flax.struct.PyTreeNode):
    student: Any
    student_opt: Any
    student_ema: Any
    discriminator: Any  # {'blocks': the K trainable blocks, 'head': TokenHead params}
    discriminator_opt: Any
    discriminator_stats: Any  # the head's spectral-norm vectors ({} without spectral norm)


def validate(config, depth: int) -> None:
    """Checks config.distill; raises ValueError naming the key and what to set."""
    d = config.distill
    checks = [
        (d.real in REAL_SOURCES, f"distill.real={d.real!r} must be one of {REAL_SOURCES}"),
        (
            d.logprob_mode in LOGPROB_MODES,
            f"distill.logprob_mode={d.logprob_mode!r} must be one of {LOGPROB_MODES}",
        ),
        (
            d.time_weight in TIME_WEIGHTS,
            f"distill.time_weight={d.time_weight!r} must be one of {TIME_WEIGHTS}",
        ),
        (d.group_size >= 1, f"distill.group_size={d.group_size} must be >= 1"),
        (
            not d.reward_normalize or d.group_size >= 2,
            "distill.reward_normalize=True needs distill.group_size >= 2",
        ),
        (
            config.train.batch_size % d.group_size == 0,
            f"train.batch_size={config.train.batch_size} must be a multiple of "
            f"distill.group_size={d.group_size}",
        ),
        (
            0.0 <= d.label_smoothing < 0.5,
            f"distill.label_smoothing={d.label_smoothing} in [0, 0.5)",
        ),
        (
            0.0 < d.tau_min < d.tau_max < 1.0,
            f"need 0 < distill.tau_min={d.tau_min} < distill.tau_max={d.tau_max} < 1",
        ),
        (d.tau_a > 0 and d.tau_b > 0, "distill.tau_a and distill.tau_b must be > 0"),
        (d.critic_steps >= 0, f"distill.critic_steps={d.critic_steps} must be >= 0"),
        (
            0 <= d.disc_trainable_blocks <= depth,
            f"distill.disc_trainable_blocks={d.disc_trainable_blocks} must be in [0, {depth}]",
        ),
        (
            d.kl_weight >= 0 and d.entropy_weight >= 0,
            "distill.kl_weight and distill.entropy_weight must be >= 0 (0 disables)",
        ),
        (d.teacher_sample_steps >= 1, "distill.teacher_sample_steps must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"bad DiDi-Instruct config: config.{message}")


class DiDiInstruct:
    """One DiDi-Instruct run on a loaded teacher; `make_method` exposes its `init`, `step`,
    `evaluate` and `batches`. The teacher params are closed over (jit constants)."""

    def __init__(self, config, scaffold: student.TextStudent | None = None):
        """`scaffold`: an already loaded `student.TextStudent` (benchmarks, tests); None loads
        `config.teacher.checkpoint` (`student.load`)."""
        self.config, self.d = config, config.distill
        if scaffold is None:
            scaffold = student.load(config, lambda net: validate(config, net.depth))
        else:
            validate(config, scaffold.net.depth)
        self.scaffold = scaffold
        net = self.scaffold.net
        k_blocks = self.d.disc_trainable_blocks
        self.block_names = [f"block{i}" for i in range(net.depth - k_blocks, net.depth)]
        self.head = TokenHead(
            net.width, bool(self.d.get("disc_spectral_norm", False)),
            bool(self.d.get("disc_head_layernorm", True)),
        )  # fmt: skip
        steps = config.train.num_steps
        self.opt_s = make_optimizer(config.optim_student, total_steps=steps)
        self.opt_d = make_optimizer(config.optim_discriminator, total_steps=steps)
        self.teacher_fn = self.scaffold.logits_fn(self.scaffold.teacher_params)
        self.batch_size = config.train.batch_size
        self.accum = accumulate.check(config, self.d.group_size, "distill.group_size")
        self._guided = {}  # num_steps -> jitted guided sampler

    def token_logits(self, disc, z, t, stats=None, *, stop_frozen: bool = True, update=False):
        """Discriminator logits [B, L] of tokens z [B, L] (or soft [B, L, V + 1]) at t [B],
        with the head's spectral-norm `stats`; with `update`, returns (logits, new stats).
        With K = 0 trainable blocks and `stop_frozen`, no gradient reaches the frozen trunk."""
        inner = dict(self.scaffold.teacher_params["params"], **disc["blocks"])
        _, hidden = self.scaffold.net.apply({"params": inner}, z, t, return_hidden=1)  # [1,B,L,D]
        if stop_frozen and self.d.disc_trainable_blocks == 0:
            hidden = jax.lax.stop_gradient(hidden)
        variables = dict(disc["head"], **({"batch_stats": stats} if stats else {}))
        if update and stats:
            logits, new = self.head.apply(
                variables, hidden[0], update_stats=True, mutable=["batch_stats"]
            )
            return logits, new["batch_stats"]
        logits = self.head.apply(variables, hidden[0])
        return (logits, stats) if update else logits

    def init(self, key):
        teacher_params, length = self.scaffold.teacher_params, self.scaffold.length
        blocks = {n: teacher_params["params"][n] for n in self.block_names}
        zeros = jnp.zeros((1, length, self.scaffold.net.width), jnp.float32)
        head_vars = dict(self.head.init(key, zeros))
        stats = head_vars.pop("batch_stats", {})
        disc = {"blocks": blocks, "head": head_vars}
        student_params = self.scaffold.teacher_copy()
        return DiDiState(
            student_params, self.opt_s.init(student_params), student_params, disc,
            self.opt_d.init(disc), stats,
        )  # fmt: skip

    def sample_tau(self, key, n):  # [n] in [tau_min, tau_max]
        d = self.d
        tau = jax.random.beta(key, d.tau_a, d.tau_b, (n,))
        return jnp.clip(tau, d.tau_min, d.tau_max)

    def corrupt_times(self, key, tau):  # the time of the discriminator's (and reward's) corruption
        if self.d.coupled_time:
            return tau
        return jax.random.uniform(key, tau.shape, minval=self.d.tau_min, maxval=self.d.tau_max)

    def trajectory(self, params, key, tau):
        """m -> (z_tau ->) x; returns x [B, L], path log-prob [B], per-step (z, t, logits)."""
        d, scaffold, schedule = self.d, self.scaffold, self.scaffold.schedule
        n = tau.shape[0]
        fn = scaffold.logits_fn(params)
        ones, zeros = jnp.ones((n,)), jnp.zeros((n,))
        times = [ones, tau, zeros] if d.score_decomposition else [ones, zeros]  # t_0 > ... > 0
        z = masked.all_masked(n, scaffold.length, scaffold.mask_id)
        log_q, steps = jnp.zeros((n,)), []
        for i, k in enumerate(jax.random.split(key, len(times) - 1)):
            t, s = times[i], times[i + 1]
            logits = fn(z, t)  # [B, L, V + 1]
            log_probs = masked.subs_log_probs(logits, z)
            z_next = masked.ancestral_step(k, jax.lax.stop_gradient(log_probs), z, t, s, schedule)
            if d.logprob_mode == "revealed":
                log_q = log_q + masked.revealed_log_prob(log_probs, z, z_next)
            else:
                log_q = log_q + masked.transition_log_prob(log_probs, z, z_next, t, s, schedule)
            steps.append((z, t, logits))
            z = z_next
        return z, log_q, steps

    def real_samples(self, key, data_tokens):  # [B, L]
        if self.d.real == "data":
            return data_tokens
        scaffold = self.scaffold
        x_init = masked.all_masked(data_tokens.shape[0], scaffold.length, scaffold.mask_id)
        tokens, _ = masked.ancestral_sample(
            self.teacher_fn, key, x_init, scaffold.schedule, self.d.teacher_sample_steps,
            cache=scaffold.cache,
        )  # fmt: skip
        return tokens

    def critic_loss_and_grad(self, state, stats, data_tokens, key):
        """((BCE loss, new spectral-norm stats), gradient) of one discriminator batch: real
        (teacher or data) vs student samples, both forward-corrupted, on masked positions; as
        many rows as data_tokens [n, L]."""
        schedule, mask_id = self.scaffold.schedule, self.scaffold.mask_id
        n = data_tokens.shape[0]
        k_real, k_fake, k_tau, k_t, k_mr, k_mf = jax.random.split(key, 6)
        real = self.real_samples(k_real, data_tokens)
        tau = self.sample_tau(k_tau, n)
        fake, _, _ = self.trajectory(state.student, k_fake, tau)
        t = self.corrupt_times(k_t, tau)
        t_real = self.corrupt_times(jax.random.fold_in(k_t, 1), tau)
        z_real = masked.forward_mask(k_mr, real, t_real, schedule, mask_id)  # [n, L]
        z_fake = masked.forward_mask(k_mf, fake, t, schedule, mask_id)

        def loss_fn(disc):
            real_logits, new = self.token_logits(disc, z_real, t_real, stats, update=True)
            fake_logits, new = self.token_logits(disc, z_fake, t, new, update=True)
            loss = losses.discriminator_loss(
                real_logits, fake_logits, z_real == mask_id, z_fake == mask_id,
                self.d.label_smoothing,
            )  # fmt: skip
            return loss, new

        return jax.value_and_grad(loss_fn, has_aux=True)(state.discriminator)

    def critic_update(self, state, data_tokens, key):
        """One discriminator step on data_tokens [B, L]; with `train.grad_accum_steps` = k > 1
        the mean gradient of k micro-batches of B / k rows (keys fold_in(key, j); the
        spectral-norm vectors carried from one micro-batch to the next), one update."""
        stats = state.discriminator_stats
        if self.accum == 1:
            (loss, stats), grads = self.critic_loss_and_grad(state, stats, data_tokens, key)
        else:

            def micro(stats, j, tokens):
                (loss, stats), grads = self.critic_loss_and_grad(
                    state, stats, tokens, jax.random.fold_in(key, j)
                )
                return stats, ((loss, grads), 1.0)

            micro_tokens = accumulate.split(data_tokens, self.accum)
            stats, (loss, grads) = accumulate.weighted_mean(micro, stats, self.accum, micro_tokens)
        disc, disc_opt = apply_gradients(
            self.opt_d, state.discriminator, state.discriminator_opt, grads
        )
        state = state.replace(
            discriminator=disc, discriminator_opt=disc_opt, discriminator_stats=stats
        )
        return state, {"discriminator_loss": loss}

    def weight(self, t):
        """omega(t) (`time_weight`), divided by pi(t) with `importance_weight`: the Beta(a, b)
        density (coupled time) or the uniform one (both ignore the clamp)."""
        d = self.d
        weight = losses.time_weight(self.scaffold.schedule, t, d.time_weight)
        if d.importance_weight:
            log_pi = (
                jax.scipy.stats.beta.logpdf(t, d.tau_a, d.tau_b)
                if d.coupled_time
                else -jnp.log(d.tau_max - d.tau_min) * jnp.ones_like(t)
            )
            weight = weight * jnp.exp(-log_pi)
        return weight

    def regularisers(self, steps):
        """(KL(teacher || student) summed over the steps, entropy averaged over the steps), each
        step's term a mean over its masked positions (the reference's `_get_regularization`)."""
        d, mask_id = self.d, self.scaffold.mask_id
        kl, ent = jnp.zeros(()), jnp.zeros(())
        for z_step, t_step, logits in steps:
            if d.kl_weight > 0:
                teacher_logits = jax.lax.stop_gradient(self.teacher_fn(z_step, t_step))
                kl = kl + losses.kl_to_teacher(logits, teacher_logits, z_step == mask_id)
            if d.entropy_weight > 0:
                ent = ent + losses.entropy(logits, z_step == mask_id) / len(steps)
        return kl, ent

    def student_objective(self, params, state, key, n: int | None = None):
        """(loss, metrics) of the student update on n (default train.batch_size) fresh
        trajectories."""
        d, schedule, mask_id = self.d, self.scaffold.schedule, self.scaffold.mask_id
        k_tau, k_traj, k_t, k_mask = jax.random.split(key, 4)
        tau = self.sample_tau(k_tau, n or self.batch_size)
        x, log_q, steps = self.trajectory(params, k_traj, tau)
        t = self.corrupt_times(k_t, tau)
        z = masked.forward_mask(k_mask, x, t, schedule, mask_id)
        token_logits = self.token_logits(state.discriminator, z, t, state.discriminator_stats)
        reward = jax.lax.stop_gradient(
            losses.sequence_reward(token_logits, z == mask_id, d.reward_clip)
        )  # [B], estimates log q_teacher / q_student
        adv = (
            losses.grouped_normalize(reward, d.group_size, d.advantage_clip)
            if d.reward_normalize
            else reward
        )
        weight = self.weight(t)
        pg = losses.policy_gradient_loss(adv, log_q, weight)
        kl, ent = self.regularisers(steps)
        total = losses.student_loss(pg, kl, ent, d.kl_weight, d.entropy_weight)
        aux = {
            "pg_loss": pg, "kl_to_teacher": kl, "entropy": ent, "reward_mean": jnp.mean(reward),
            "reward_std": jnp.std(reward), "log_q_mean": jnp.mean(log_q),
            "time_weight_mean": jnp.mean(weight),
        }  # fmt: skip
        return total, aux

    def student_gradients(self, state, key):
        """((loss, metrics), gradient) of the student update; with `train.grad_accum_steps` =
        k > 1 the mean over k micro-batches of B / k trajectories (keys fold_in(key, j), whole
        reward groups in each): the policy-gradient term is a mean over trajectories, so this
        is the gradient of the B trajectories together; the KL and entropy terms, means over
        each micro-batch's masked positions, are averaged over the micro-batches."""
        grad_fn = jax.value_and_grad(self.student_objective, has_aux=True)
        if self.accum == 1:
            return grad_fn(state.student, state, key)
        micro_rows = self.batch_size // self.accum

        def micro(carry, j, _):
            return carry, (
                grad_fn(state.student, state, jax.random.fold_in(key, j), micro_rows),
                1.0,
            )

        return accumulate.weighted_mean(micro, (), self.accum)[1]

    def step(self, state, batch, key, step_index):
        del step_index
        d = self.d
        k_critic, k_student = jax.random.split(key)
        critic_metrics = {}
        if d.critic_steps > 0:
            data = jnp.swapaxes(batch["tokens"], 0, 1)  # [critic_steps, B, L]
            keys = jax.random.split(k_critic, d.critic_steps)
            state, critic_metrics = jax.lax.scan(
                lambda s, inputs: self.critic_update(s, *inputs), state, (data, keys)
            )
        (loss, aux), grads = self.student_gradients(state, k_student)
        student_params, student_opt = apply_gradients(
            self.opt_s, state.student, state.student_opt, grads
        )
        state = state.replace(
            student=student_params,
            student_opt=student_opt,
            student_ema=ema_update(state.student_ema, student_params, self.config.ema_decay),
        )
        metrics = dict(aux, student_loss=loss, student_grad_norm=optax.tree.norm(grads))
        metrics.update({k: jnp.mean(v) for k, v in critic_metrics.items()})
        return state, metrics

    def log_ratio(self, disc, stats, tokens, t, is_masked):
        """log r [B]: the sum (`eval.guided.aggregate='sum'`) or mean of the discriminator's
        token logits over the positions `is_masked` [B, L]; tokens int [B, L] or soft
        [B, L, V + 1]. No stop-gradient on the frozen trunk: the tilt needs d log r / d tokens."""
        token_logits = self.token_logits(disc, tokens, t, stats, stop_frozen=False)  # [B, L]
        total = jnp.sum(jnp.where(is_masked, token_logits, 0.0), axis=-1)
        if self.config.eval.guided.aggregate == "sum":
            return total
        return total / jnp.maximum(jnp.sum(is_masked, axis=-1), 1)

    def sample_guided(self, params, disc, key, num_steps, stats=None):
        """RGAS samples [num_samples, L] of `params` steered by `disc`, and the NFE dict."""
        ecfg, scaffold = self.config.eval, self.scaffold
        g = ecfg.guided
        if g.aggregate not in ("sum", "mean"):
            raise ValueError(f"config.eval.guided.aggregate={g.aggregate!r}: 'sum' or 'mean'")
        if num_steps not in self._guided:

            def run(p, dsc, sts, k, x):
                return guided_sampling.guided_sample(
                    scaffold.logits_fn(p), lambda z, t, m: self.log_ratio(dsc, sts, z, t, m), k,
                    x.shape[0], scaffold.length, num_steps, scaffold.mask_id, scaffold.schedule,
                    g.guidance_scale, g.tilt_until, g.best_of,
                    guidance_scale_end=g.guidance_scale_end, grad_clip=g.grad_clip,
                    tilt_input=g.tilt_input, rerank_temperature=g.rerank_temperature,
                    rerank_positions=g.get("rerank_positions", "all"),
                    final_eps=g.get("final_eps", 1e-5), cache=scaffold.cache, x_init=x,
                )  # fmt: skip

            self._guided[num_steps] = jax.jit(run)
        fn = self._guided[num_steps]
        return text_eval.sample_in_chunks(
            lambda k, x: fn(params, disc, stats or {}, k, x),
            key, ecfg.num_samples, ecfg.batch_size, scaffold.length, scaffold.mask_id,
        )  # fmt: skip

    def guided_reports(self, student_params, state, judge, key):
        """`student_guided/steps{N}/...` at every eval.sample_steps, with the plain student's
        keys (paired comparison)."""
        disc, results = jax.device_get(state.discriminator), {}
        stats = jax.device_get(state.discriminator_stats)
        for num_steps in self.config.eval.sample_steps:
            tokens, nfe = self.sample_guided(
                student_params, disc, jax.random.fold_in(key, num_steps), num_steps, stats
            )
            report = text_eval.sample_report(tokens, judge, nfe["student"], self.scaffold.lang)
            report.update({f"nfe_{k}": v for k, v in nfe.items() if k != "student"})
            results.update({f"student_guided/steps{num_steps}/{k}": v for k, v in report.items()})
        return results

    def evaluate(self, state, key, workdir):
        del workdir
        ecfg = self.config.eval
        student_params = jax.device_get(state.student_ema)
        judge, results = self.scaffold.evaluate_prelude(student_params, key)
        if ecfg.get("guided") is not None and ecfg.guided.enabled:
            results.update(self.guided_reports(student_params, state, judge, key))
        results.update(self.scaffold.source_report())
        return results

    def batches(self, start_step):  # {'tokens': [B, max(critic_steps, 1), L]}
        return self.scaffold.batches(start_step, rows=max(self.d.critic_steps, 1))


def make_method(config) -> Method:
    """Builds the DiDi-Instruct `Method` for a `configs/synthetic_didi.py` config."""
    run = DiDiInstruct(config)
    return Method(
        init=run.init, step=run.step, evaluate=run.evaluate, batches=run.batches,
        global_batch_size=run.batch_size,
    )  # fmt: skip


__all__ = ["DiDiInstruct", "DiDiState", "TokenHead", "make_method", "validate"]
