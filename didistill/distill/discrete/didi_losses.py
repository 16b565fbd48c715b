"""DiDi-Instruct losses: pure functions, one screen each.

Zheng et al., "Ultra-Fast Language Generation via Discrete Diffusion Divergence Instruct"
(arXiv:2509.25035).

Notation: p_nu is the student generator (a few-step masked-diffusion sampler started from
all-[MASK]), q_nu(z, t) = sum_x p_nu(x) Q_t(z | x) its noised marginal; q_theta(z, t) the
teacher's. Tokens [B, L], logits [B, L, V + 1] with [MASK] = V.

Integral KL and its score-function gradient (derivation; the reference marks it third-hand).
With R(z, t) = log q_nu(z, t) - log q_theta(z, t),

    D_IKL(nu) = int omega(t) E_{q_nu(z, t)}[R(z, t)] dt.

Differentiate at fixed t: grad_nu sum_z q_nu R = sum_z (grad q_nu) R + sum_z q_nu grad log q_nu,
and the last sum is grad sum_z q_nu = 0. Since q_nu(z) = sum_x p_nu(x) Q_t(z | x) with Q_t free of
nu, sum_z R(z) grad q_nu(z) = sum_{x, z} p_nu(x) Q_t(z | x) R(z) grad log p_nu(x). So

    grad D_IKL = E_{t ~ pi, x ~ p_nu, z ~ Q_t(.|x)} [ (omega(t) / pi(t)) R(z, t) grad log p_nu(x) ].

The same holds with p_nu(x) replaced by the probability of the whole sampling path
(m -> z_tau -> x, "score decomposition"): marginalising the path gives back p_nu(x), so
E_path[R grad log p_nu(path)] = E_x[R grad log p_nu(x)] by the identical argument, and the path
log-probability is tractable while p_nu(x) is not. The discriminator estimates
reward = log q_theta / q_nu = -R, so the surrogate whose gradient is this estimator is

    L_pg = -mean_i[ omega_i * sg(A_i) * log p_nu(path_i) ],   A = reward (or its normalised form).

Grouped normalisation (GRPO-style) replaces reward by a per-group z-score: a baseline (which
keeps the estimator unbiased only in the limit of large groups) and a scale change; it is a
variance-reduction heuristic, not part of the exact gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_normalize(
    rewards: jax.Array, group_size: int, clip: float = 0.0, eps: float = 1e-8, ddof: int = 1
):
    """Per-group z-score of rewards [B] (B = num_groups * G, rows of a group adjacent), [B].

        A_i = clip( (r_i - mean_g r) / (std_g r + eps), -clip, clip )

    std is the unbiased std (ddof = 1, `torch.std`'s default), as in the reference
    `_get_rewards` (its group mean and `.std(dim=1)`, eps 1e-8, then a clamp at
    `advantage_clip_val`); ddof = 0 gives the population std. clip <= 0: none. A group of
    equal rewards gives exactly A = 0.
    """
    if group_size < 2:
        raise ValueError(
            f"group_size={group_size}: grouped reward normalisation needs G >= 2 samples per "
            "group (set config.distill.reward_normalize=False to use raw rewards)"
        )
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards of shape {rewards.shape} do not split into groups of {group_size}: the "
            "batch size must be a multiple of config.distill.group_size"
        )
    groups = rewards.reshape(-1, group_size)  # [B / G, G]
    # Centre on each group's first reward first: exact for constant groups (a float32 mean of
    # equal numbers can differ from them, which would turn rounding noise into A = +-1).
    groups = groups - groups[:, :1]
    mean = jnp.mean(groups, axis=1, keepdims=True)
    std = jnp.std(groups, axis=1, keepdims=True, ddof=ddof)
    adv = (groups - mean) / (std + eps)
    if clip > 0:
        adv = jnp.clip(adv, -clip, clip)
    return adv.reshape(rewards.shape)


def _bce_with_logits(logits, target):
    """Binary cross-entropy of sigmoid(logits) against soft targets, elementwise."""
    return jax.nn.softplus(logits) - target * logits


def _masked_mean(values, mask):
    """Mean of values [B, L] over positions where mask [B, L]; 0 when no position is masked."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def discriminator_loss(
    real_logits: jax.Array,
    fake_logits: jax.Array,
    real_masked: jax.Array,
    fake_masked: jax.Array,
    label_smoothing: float = 0.1,
) -> jax.Array:
    """Per-token BCE on masked positions, (real + fake) / 2, scalar.

    real_logits, fake_logits [B, L]: the head's per-token logits on noised teacher-side ("real":
    teacher samples or data, config) and student-side sequences; *_masked [B, L]: where the
    input is [MASK]. Targets 1 - s (real) and s (fake), s = label_smoothing.

    Optimum. Every position sees the whole sequence z and carries the label of the sequence, so
    (mask weights being a function of z, shared by both classes) the per-position optimum is
    pointwise in z: sigmoid(d) = ((1 - s) p + s q) / (p + q), i.e.

        d*(z) = log((1 - s) p(z) + s q(z)) - log(s p(z) + (1 - s) q(z))     (`optimal_logit`),

    which is log p/q for s = 0 and a monotone, bounded (|d*| <= log((1 - s)/s)) squashing of it
    otherwise: smoothing trades bias for a bounded reward.
    """
    real = _masked_mean(_bce_with_logits(real_logits, 1.0 - label_smoothing), real_masked)
    fake = _masked_mean(_bce_with_logits(fake_logits, label_smoothing), fake_masked)
    return 0.5 * (real + fake)


def optimal_logit(log_p: jax.Array, log_q: jax.Array, label_smoothing: float = 0.1):
    """The minimiser d*(z) of `discriminator_loss` in expectation (see its docstring)."""
    s = label_smoothing
    log_1ms, log_s = jnp.log1p(-s), jnp.log(s) if s > 0 else -jnp.inf
    num = jnp.logaddexp(log_1ms + log_p, log_s + log_q)
    den = jnp.logaddexp(log_s + log_p, log_1ms + log_q)
    return num - den


def sequence_reward(token_logits: jax.Array, masked: jax.Array, clip: float = 8.0):
    """Reward [B] = mean over masked positions of clip(token logit, -clip, clip) (clip <= 0: none).

    At the optimum each masked position's logit estimates the same sequence-level quantity
    log q_theta(z_t) / q_nu(z_t) (`discriminator_loss`), so their mean (the reference's
    aggregation) is an estimate of it with lower variance than one position, not a sum of
    per-token ratios. Rows with no masked position get 0.
    """
    if clip > 0:
        token_logits = jnp.clip(token_logits, -clip, clip)
    mask = masked.astype(token_logits.dtype)
    return jnp.sum(token_logits * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def time_weight(schedule, t: jax.Array, kind: str, lo: float = 0.1, hi: float = 10.0):
    """omega(t) [B]: 'none' -> 1; 'elbo' -> clip(-alpha'_t / (1 - alpha_t), lo, hi) (= 1/t)."""
    if kind == "none":
        return jnp.ones_like(t)
    if kind == "elbo":
        return jnp.clip(schedule.loss_weight(t), lo, hi)
    raise ValueError(f"time weight {kind!r} is not one of ('none', 'elbo')")


def policy_gradient_loss(advantage: jax.Array, log_q: jax.Array, weight: jax.Array):
    """-mean(weight * sg(advantage) * log_q), scalar; all [B].

    Its gradient is the score-function estimator of the module docstring: in expectation,
    -grad E[weight * reward] = grad of the (weighted) integral KL when advantage = -R.
    """
    return -jnp.mean(weight * jax.lax.stop_gradient(advantage) * log_q)


def kl_to_teacher(student_logits: jax.Array, teacher_logits: jax.Array, masked: jax.Array):
    """Mean over masked positions of KL(teacher || student) of the SUBS token laws, scalar.

    On a masked position the SUBS law is softmax over the V real tokens (the [MASK] column is
    dropped here, which avoids -inf * 0); logits [B, L, V + 1], masked [B, L]. As in the
    reference (`kl_div(log_softmax(student), softmax(teacher))`), i.e. forward KL.
    """
    log_s = jax.nn.log_softmax(student_logits[..., :-1].astype(jnp.float32), -1)  # [B, L, V]
    log_t = jax.nn.log_softmax(teacher_logits[..., :-1].astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1)  # [B, L]
    return _masked_mean(kl, masked)


def entropy(student_logits: jax.Array, masked: jax.Array):
    """Mean over masked positions of the entropy of the SUBS token law, scalar (nats)."""
    log_s = jax.nn.log_softmax(student_logits[..., :-1].astype(jnp.float32), -1)  # [B, L, V]
    return _masked_mean(-jnp.sum(jnp.exp(log_s) * log_s, -1), masked)


def student_loss(pg, kl, ent, kl_weight: float = 0.0, entropy_weight: float = 0.0):
    """L = L_pg + kl_weight * KL(teacher || student) - entropy_weight * H(student)."""
    return pg + kl_weight * kl - entropy_weight * ent


__all__ = [
    "discriminator_loss",
    "entropy",
    "grouped_normalize",
    "kl_to_teacher",
    "optimal_logit",
    "policy_gradient_loss",
    "sequence_reward",
    "student_loss",
    "time_weight",
]
