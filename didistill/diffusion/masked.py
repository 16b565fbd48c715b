"""Masked (absorbing-state) discrete diffusion: MDLM.

Sahoo, Arriola, Schiff, Gokaslan, Marroquin, Chiu, Rush, Kuleshov, "Simple and Effective
Masked Diffusion Language Models", NeurIPS 2024 (arXiv:2406.07524).

Tokens take values in {0, ..., V-1}; the absorbing state [MASK] has id `mask_id = V`, so a
denoiser outputs logits over V + 1 entries.

Forward process. Each token independently stays itself with probability alpha_t and becomes
[MASK] otherwise, q(z_t | x) = Cat(z_t; alpha_t x + (1 - alpha_t) m), with alpha decreasing
from alpha_0 = 1. Schedules (eps = 1e-3 as in MDLM, so alpha_1 = eps, not 0):

    log-linear  alpha_t = 1 - (1 - eps) t                 (sigma_t = -log alpha_t)
    cosine      alpha_t = eps + (1 - eps) cos(pi t / 2)

SUBS parameterisation (`subs_log_probs`): the denoiser x_theta(z_t) never puts mass on [MASK]
(its logit is -inf) and copies every unmasked token (a one-hot on the observed token).

Continuous-time NELBO (`nelbo`). With w(t) = -alpha'_t / (1 - alpha_t) > 0,

    NELBO(x) = E_{t ~ U[0, 1], z_t ~ q(. | x)} [ w(t) sum_{l: z_t^l = m} -log x_theta^l(z_t)[x^l] ],

(w = 1/t for log-linear with eps = 0). With alpha_1 = 0 and the exact denoiser
x_theta^l(z) = p(x^l | unmasked tokens of z), NELBO(x) = -log p(x) for EVERY x: conditioning on
k masked positions, int_0^1 w(t) P(k masked | t) dt = 1/k for any schedule, so the NELBO is the
any-order autoregressive NLL averaged over orders, and each order gives -log p(x) by the chain
rule (Ou et al. 2024, arXiv:2406.03736). For any other denoiser E_{x~p} NELBO(x) >= H(p). Here t
is drawn on [t_min, 1] (MDLM's sampling_eps = 1e-3), which, like eps > 0, biases the bound by
O(eps); use eps = t_min = 0 for exact identities.

Ancestral sampler (`ancestral_sample`). On the grid t_i = 1 - i/N (i = 0..N), a step t -> s
keeps unmasked tokens and, at each masked position, draws z_s from

    q(z_s | z_t) = (alpha_s - alpha_t)/(1 - alpha_t) x_theta(z_t) + (1 - alpha_s)/(1 - alpha_t) m,

so a masked token is revealed with probability (alpha_s - alpha_t)/(1 - alpha_t) and its value
follows the SUBS distribution. The last step reaches s = 0 (alpha_0 = 1): every token is
revealed after N steps. Caching (MDLM `ddpm_cache`): the denoiser does not depend on t (time
conditioning off), so when a step changes no token the previous output is reused; the sampler
returns the number of real network evaluations (NFE <= N). A time-conditioned denoiser must
use `cache=False`.

Sampling precision: Gumbel-max sampling in float32 truncates the Gumbel tail and lowers sample
entropy (Zheng et al. 2024, "Masked Diffusion Models are Secretly Time-Agnostic Masked Models
and Exploit Inaccurate Categorical Sampling", arXiv:2409.02908). `dtype=jnp.float64` samples
in double precision; it requires x64 mode (call inside `with jax.enable_x64(True):`).

Shapes: tokens are int32 [B, L]; logits and log-probs are [B, L, V + 1]; `t` is a scalar or
[B]. A denoiser function is `logits_fn(z_t [B, L], t [B]) -> logits [B, L, V + 1]`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LogLinearSchedule:
    """alpha_t = 1 - (1 - eps) t; w(t) = -alpha'_t / (1 - alpha_t) = 1/t (MDLM default)."""

    eps: float = 1e-3

    def mask_prob(self, t):
        """1 - alpha_t, computed without cancellation."""
        return (1.0 - self.eps) * jnp.asarray(t)

    def alpha(self, t):
        return 1.0 - self.mask_prob(t)

    def dalpha(self, t):
        """d alpha_t / dt."""
        return jnp.full_like(jnp.asarray(t, jnp.result_type(float)), -(1.0 - self.eps))

    def loss_weight(self, t):
        """w(t) = -alpha'_t / (1 - alpha_t) > 0 (inf at t = 0)."""
        return -self.dalpha(t) / self.mask_prob(t)


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
    """alpha_t = eps + (1 - eps) cos(pi t / 2); 1 - alpha_t = 2 (1 - eps) sin^2(pi t / 4)."""

    eps: float = 1e-3

    def mask_prob(self, t):
        return 2.0 * (1.0 - self.eps) * jnp.sin(0.25 * math.pi * jnp.asarray(t)) ** 2

    def alpha(self, t):
        return 1.0 - self.mask_prob(t)

    def dalpha(self, t):
        return -(1.0 - self.eps) * 0.5 * math.pi * jnp.sin(0.5 * math.pi * jnp.asarray(t))

    def loss_weight(self, t):
        return -self.dalpha(t) / self.mask_prob(t)


Schedule = LogLinearSchedule | CosineSchedule
SCHEDULES = {"loglinear": LogLinearSchedule, "cosine": CosineSchedule}


def get_schedule(name: str, eps: float = 1e-3) -> Schedule:
    """'loglinear' or 'cosine' with the given eps (alpha_1 = eps)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"schedule eps must be in [0, 1), got {eps}")
    return SCHEDULES[name](eps=eps)


def _per_row(value, ndim: int) -> jax.Array:
    """A scalar or [B] value -> [B, 1, ...] (ndim axes) for broadcasting."""
    value = jnp.asarray(value)
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def all_masked(batch_size: int, length: int, mask_id: int) -> jax.Array:
    """The sampler's starting point z_1: every token [MASK], int32 [B, L]."""
    return jnp.full((batch_size, length), mask_id, jnp.int32)


def forward_mask(key, x0: jax.Array, t, schedule: Schedule, mask_id: int) -> jax.Array:
    """z_t ~ q(. | x0): each token of x0 [B, L] becomes `mask_id` with prob 1 - alpha_t."""
    p_mask = _per_row(schedule.mask_prob(t), x0.ndim)  # [B, 1] or scalar
    masked = jax.random.uniform(key, x0.shape) < p_mask
    return jnp.where(masked, jnp.asarray(mask_id, x0.dtype), x0)


def subs_log_probs(logits: jax.Array, xt: jax.Array) -> jax.Array:
    """SUBS log x_theta(z_t): [B, L, V + 1] log-probs from logits [B, L, V + 1], z_t [B, L].

    Masked positions: log_softmax with the [MASK] logit at -inf. Unmasked positions: 0 on the
    observed token, -inf elsewhere (carry-over). At least float32.
    """
    mask_id = logits.shape[-1] - 1
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logits = logits.at[..., mask_id].set(-jnp.inf)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    vocab = jnp.arange(logits.shape[-1])
    carry = jnp.where(vocab == xt[..., None], 0.0, -jnp.inf).astype(logits.dtype)
    return jnp.where((xt == mask_id)[..., None], log_probs, carry)


def sample_times(key, n: int, t_min: float = 1e-3, low_discrepancy: bool = True) -> jax.Array:
    """n diffusion times in [t_min, 1], float32 [n].

    low_discrepancy (antithetic/stratified, Kingma et al. 2021 VDM): t_i = (u + i/n) mod 1 with
    one shared u ~ U[0, 1), so the batch covers [0, 1) evenly; otherwise i.i.d. uniform. Then
    t <- t_min + (1 - t_min) t, as MDLM does.
    """
    if low_discrepancy:
        u = jax.random.uniform(key, ())
        t = jnp.mod(u + jnp.arange(n, dtype=jnp.float32) / n, 1.0)
    else:
        t = jax.random.uniform(key, (n,))
    return t_min + (1.0 - t_min) * t


def nelbo_from_log_probs(
    log_probs: jax.Array, x0: jax.Array, xt: jax.Array, t, schedule: Schedule
) -> jax.Array:
    """Per-sequence NELBO integrand w(t) sum_{l masked} -log x_theta^l[x0^l], [B] (nats).

    log_probs [B, L, V + 1] are SUBS log-probs at z_t; rows with no masked token give 0 (also
    at t = 0, where w is infinite), with finite gradients.
    """
    mask_id = log_probs.shape[-1] - 1
    masked = xt == mask_id  # [B, L]
    nll = -jnp.take_along_axis(log_probs, x0[..., None], axis=-1)[..., 0]  # [B, L]
    per_seq = jnp.sum(jnp.where(masked, nll, 0.0), axis=-1)  # [B]
    weight = jnp.broadcast_to(schedule.loss_weight(t), per_seq.shape)
    weight = jnp.where(jnp.any(masked, axis=-1), weight, 0.0)
    return weight * per_seq


def nelbo(
    logits_fn: LogitsFn,
    key,
    x0: jax.Array,
    schedule: Schedule,
    mask_id: int,
    *,
    t_min: float = 1e-3,
    low_discrepancy: bool = True,
) -> jax.Array:
    """One-sample Monte Carlo estimate of the continuous-time NELBO of each row of x0 [B, L].

    Returns [B] in nats (sum over tokens; divide by L for nats per token).
    """
    k_t, k_mask = jax.random.split(key)
    t = sample_times(k_t, x0.shape[0], t_min, low_discrepancy)  # [B]
    xt = forward_mask(k_mask, x0, t, schedule, mask_id)  # [B, L]
    log_probs = subs_log_probs(logits_fn(xt, t), xt)  # [B, L, V + 1]
    return nelbo_from_log_probs(log_probs, x0, xt, t, schedule)


def step_log_probs(log_probs: jax.Array, xt: jax.Array, mask_prob_t, mask_prob_s) -> jax.Array:
    """log q(z_s = j | z_t) of one reverse step t -> s, [B, L, V + 1].

    log_probs: SUBS log x_theta(z_t) [B, L, V + 1]; mask_prob_t = 1 - alpha_t >
    mask_prob_s = 1 - alpha_s (scalars or [B]; pass `schedule.mask_prob(t)`, which avoids the
    cancellation of 1 - alpha). Masked positions: log x_theta + log((alpha_s - alpha_t) /
    (1 - alpha_t)) on tokens and log((1 - alpha_s) / (1 - alpha_t)) on [MASK] (-inf at s = 0);
    unmasked positions: the carry-over one-hot.
    """
    mask_t = _per_row(jnp.asarray(mask_prob_t, log_probs.dtype), log_probs.ndim)  # [B, 1, 1]
    mask_s = _per_row(jnp.asarray(mask_prob_s, log_probs.dtype), log_probs.ndim)
    log_reveal = jnp.log(mask_t - mask_s) - jnp.log(mask_t)
    log_stay = jnp.log(mask_s) - jnp.log(mask_t)
    mask_id = log_probs.shape[-1] - 1
    is_mask_entry = jnp.arange(log_probs.shape[-1]) == mask_id  # [V + 1]
    masked_row = jnp.where(is_mask_entry, log_stay, log_probs + log_reveal)  # [B, L, V + 1]
    return jnp.where((xt == mask_id)[..., None], masked_row, log_probs)


def _check_dtype(dtype) -> None:
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "float64 sampling needs x64 mode: call the sampler inside `with "
            "jax.enable_x64(True):` (or set JAX_ENABLE_X64=1), or use dtype=jnp.float32."
        )


def sample_categorical(key, log_probs: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Gumbel-max draw from Cat(softmax(log_probs)) over the last axis, in `dtype`, int32."""
    _check_dtype(dtype)
    gumbel = jax.random.gumbel(key, log_probs.shape, dtype)
    return jnp.argmax(log_probs.astype(dtype) + gumbel, axis=-1).astype(jnp.int32)


def ancestral_step(
    key, log_probs: jax.Array, xt: jax.Array, t, s, schedule: Schedule, dtype=jnp.float32
) -> jax.Array:
    """One reverse step z_t -> z_s ~ q(. | z_t) (see `step_log_probs`), int32 [B, L]."""
    _check_dtype(dtype)
    log_probs = log_probs.astype(dtype)
    logq = step_log_probs(log_probs, xt, schedule.mask_prob(t), schedule.mask_prob(s))
    return sample_categorical(key, logq, dtype)


def transition_log_prob(
    log_probs: jax.Array, xt: jax.Array, zs: jax.Array, t, s, schedule: Schedule
) -> jax.Array:
    """log q(z_s | z_t) of a whole step, [B]: the sum over positions of `step_log_probs`."""
    logq = step_log_probs(log_probs, xt, schedule.mask_prob(t), schedule.mask_prob(s))
    return jnp.sum(jnp.take_along_axis(logq, zs[..., None], axis=-1)[..., 0], axis=-1)


def revealed_log_prob(log_probs: jax.Array, xt: jax.Array, zs: jax.Array) -> jax.Array:
    """sum over positions revealed by a step (z_t = m, z_s != m) of log x_theta(z_t)[z_s], [B].

    The log-probability of the sampled token values only (DiDi-Instruct's `prev_is_mask`
    mode); unlike `transition_log_prob` it leaves out which positions were revealed.
    """
    mask_id = log_probs.shape[-1] - 1
    revealed = (xt == mask_id) & (zs != mask_id)  # [B, L]
    lp = jnp.take_along_axis(log_probs, zs[..., None], axis=-1)[..., 0]  # [B, L]
    return jnp.sum(jnp.where(revealed, lp, 0.0), axis=-1)


def time_grid(num_steps: int) -> jax.Array:
    """t_i = 1 - i / N for i = 0..N, float32 [N + 1] (from 1 down to exactly 0)."""
    return 1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps


def ancestral_sample(
    logits_fn: LogitsFn,
    key,
    x_init: jax.Array,
    schedule: Schedule,
    num_steps: int,
    *,
    cache: bool = True,
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """MDLM ancestral sampling from x_init [B, L] (all [MASK], or a prompt with masks).

    Runs `num_steps` reverse steps on `time_grid(num_steps)` under `lax.scan` (jittable for a
    static num_steps). With `cache`, the denoiser is evaluated only when some token of the
    batch changed since its last evaluation (`lax.cond`), which is exact for a time-agnostic
    denoiser. Returns (tokens int32 [B, L] with no [MASK] left, nfe int32 scalar = number of
    real `logits_fn` calls).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    _check_dtype(dtype)
    ts = time_grid(num_steps)
    batch = x_init.shape[0]
    x_init = x_init.astype(jnp.int32)
    logits_shape = jax.eval_shape(logits_fn, x_init, jnp.ones((batch,), jnp.float32))
    lp_dtype = jnp.promote_types(logits_shape.dtype, jnp.float32)

    def evaluate(xt, t):
        logits = logits_fn(xt, jnp.full((batch,), t, jnp.float32))
        return subs_log_probs(logits, xt).astype(lp_dtype)

    def body(carry, inputs):
        xt, log_probs, stale, nfe = carry
        step_key, t, s = inputs
        stale = jnp.logical_or(stale, not cache)
        log_probs = jax.lax.cond(stale, evaluate, lambda xt, t: log_probs, xt, t)
        nfe = nfe + stale.astype(jnp.int32)
        zs = ancestral_step(step_key, log_probs, xt, t, s, schedule, dtype)
        return (zs, log_probs, jnp.any(zs != xt), nfe), None

    init = (x_init, jnp.zeros(logits_shape.shape, lp_dtype), jnp.array(True), jnp.int32(0))
    keys = jax.random.split(key, num_steps)
    (tokens, _, _, nfe), _ = jax.lax.scan(body, init, (keys, ts[:-1], ts[1:]))
    return tokens, nfe


__all__ = [
    "SCHEDULES",
    "CosineSchedule",
    "LogLinearSchedule",
    "LogitsFn",
    "Schedule",
    "all_masked",
    "ancestral_sample",
    "ancestral_step",
    "forward_mask",
    "get_schedule",
    "nelbo",
    "nelbo_from_log_probs",
    "revealed_log_prob",
    "sample_categorical",
    "sample_times",
    "step_log_probs",
    "subs_log_probs",
    "time_grid",
]
