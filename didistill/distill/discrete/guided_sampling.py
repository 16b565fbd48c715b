"""Reward-guided ancestral sampling (RGAS) of DiDi-Instruct for masked diffusion students.

Zheng et al., arXiv:2509.25035 (the sampler as read from the authors' `algo.py`). The
discriminator of DiDi-Instruct estimates the log density ratio
log r(z, t) = log q_teacher(z, t) - log q_student(z, t) (the "reward"); at inference it steers
the student's MDLM ancestral sampler (`didistill.diffusion.masked`) towards states the
discriminator finds teacher-like. On the grid t_i = 1 - i/N (`masked.time_grid`):

Early steps, t_i > `tilt_until` (the reference's first (1 - rerank_ratio) N steps): gradient
tilting. With x = log x_theta(z_t) the student's SUBS log-probs [B, L, V + 1],

    g = clip( d log r(u(x), t) / d v , -c, c ),        c = `grad_clip` (<= 0: no clip)
    x'_l = log_softmax(x_l + h_i g_l)   at masked positions l (z_t^l = m),   x'_l = x_l else,

then one ordinary ancestral step z_t -> z_s from x'. `tilt_input` picks the relaxed input u
the discriminator sees and the variable v it is differentiated in:
- 'prediction' (the reference): u = softmax(x) at masked positions (the student's soft
  prediction of the clean token), one-hot(z_t) elsewhere; v = x (the gradient flows back
  through the softmax: g = p * (dlog r/du - <p, dlog r/du>)).
- 'state': u = v = one-hot(z_t), the relaxed current state. g_l[j] is the first-order change
  of log r when position l moves towards token j, so exp(h g) is a Taylor approximation of the
  tilt r(z_s)^h of the reverse transition (Nisonoff et al. 2024, arXiv:2406.01572).
The strength h_i ramps linearly from `guidance_scale` to `guidance_scale_end` over the tilt
steps (constant when it is None; the reference ramps 30 -> 40). The renormalisation keeps the
schedule's reveal probability (alpha_s - alpha_t)/(1 - alpha_t): the tilt changes which token
is revealed, not whether one is (the reference adds h g to log p; whether it renormalises is
not recorded, so the simpler, schedule-preserving version is used here).

Late steps, t_i <= `tilt_until`: best-of-k re-ranking. Draw k = `best_of` candidate
transitions z_s^(1..k) ~ q(. | z_t) from the (untilted) student step, score each by
log r(z_s^(j), s) at the next noise level s, and keep per sequence

    j* = argmax_j log r(z_s^(j), s)              (`rerank_temperature` = 0, ties -> first)
    j* ~ softmax_j( log r(z_s^(j), s) / T )      (T = `rerank_temperature` > 0, the reference's
                                                  rule, which samples the candidate)

Candidate 1 uses the step's own key, the others `fold_in(step_key, j)`: with best_of = 1 and
no tilt the sampler is bit-identical to `masked.ancestral_sample` for the same key, and the
kept candidate never scores below candidate 1 (the k = 1 draw) under argmax.

`log_ratio_fn(tokens, t, masked) -> [B]`: tokens are int [B, L] (re-ranking) or relaxed
[B, L, V + 1] (tilting); t [B]; masked bool [B, L] marks the positions that were [MASK] in
the state scored (so a per-token discriminator can aggregate over them: DiDi-Instruct's head is
trained only there). Rows must be independent (the tilt differentiates the batch sum).

NFE: the student is evaluated as in the cached plain sampler (`cache`); each tilt step costs
one discriminator forward and one backward pass on the batch; each re-ranking step k
discriminator forwards (one call on k*B rows). Returned as int32 scalars {'student',
'discriminator' (forward passes), 'discriminator_backward', 'total' = student +
discriminator}; a zero guidance scale or best_of = 1 skips the discriminator (counted 0).
The reference reports only the student NFE.

Caveat: at the last step s = 0 no position is masked, so a discriminator that aggregates over
masked positions scores every candidate alike and re-ranking keeps candidate 1 (the reference
stops its grid at 1e-5 and then denoises); a `log_ratio_fn` that scores clean tokens does
re-rank there.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from didistill.diffusion import masked

LogRatioFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
TILT_INPUTS = ("prediction", "state")


def tilt_log_probs(
    log_ratio_fn: LogRatioFn,
    log_probs: jax.Array,
    xt: jax.Array,
    t,
    scale,
    *,
    grad_clip: float = 1.0,
    tilt_input: str = "prediction",
) -> tuple[jax.Array, jax.Array]:
    """Gradient-tilted SUBS log-probs [B, L, V + 1] at masked positions (module docstring).

    Returns (tilted log-probs, clipped gradient g [B, L, V + 1]). Unmasked positions keep their
    carry-over one-hot; masked positions are renormalised, [MASK] stays at -inf.
    """
    if tilt_input not in TILT_INPUTS:
        raise ValueError(f"tilt_input={tilt_input!r} must be one of {TILT_INPUTS}")
    batch, _, num_ids = log_probs.shape
    is_masked = xt == num_ids - 1  # [B, L]
    onehot = jax.nn.one_hot(xt, num_ids, dtype=log_probs.dtype)  # [B, L, V + 1]
    t_rows = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))

    if tilt_input == "state":
        variable = onehot

        def relaxed(v):
            return v

    else:
        variable = log_probs

        def relaxed(v):
            return jnp.where(is_masked[..., None], jax.nn.softmax(v, axis=-1), onehot)

    grad = jax.grad(lambda v: jnp.sum(log_ratio_fn(relaxed(v), t_rows, is_masked)))(variable)
    if grad_clip > 0:
        grad = jnp.clip(grad, -grad_clip, grad_clip)
    tilted = jax.nn.log_softmax(log_probs + scale * grad, axis=-1)  # scale: a scalar
    return jnp.where(is_masked[..., None], tilted, log_probs), grad


def _best_of(log_ratio_fn, key, log_probs, xt, t, s, schedule, best_of, temperature, dtype):
    """k candidate steps z_t -> z_s [k, B, L]; returns the kept z_s [B, L] and all scores."""
    first = masked.ancestral_step(key, log_probs, xt, t, s, schedule, dtype)  # [B, L]
    others = jax.vmap(
        lambda j: masked.ancestral_step(
            jax.random.fold_in(key, j), log_probs, xt, t, s, schedule, dtype
        )
    )(jnp.arange(1, best_of))  # [k - 1, B, L]
    candidates = jnp.concatenate([first[None], others], axis=0)  # [k, B, L]
    k, batch, length = candidates.shape
    flat = candidates.reshape(k * batch, length)
    s_rows = jnp.full((k * batch,), s, jnp.float32)
    scores = log_ratio_fn(flat, s_rows, flat == log_probs.shape[-1] - 1).reshape(k, batch)
    if temperature > 0:
        pick_key = jax.random.fold_in(key, best_of)
        choice = jax.random.categorical(pick_key, scores / temperature, axis=0)  # [B]
    else:
        choice = jnp.argmax(scores, axis=0)  # [B], first of ties
    kept = jnp.take_along_axis(candidates, choice[None, :, None], axis=0)[0]
    return kept, scores


def guided_sample(
    student_logits_fn: masked.LogitsFn,
    log_ratio_fn: LogRatioFn,
    key,
    batch_size: int,
    length: int,
    num_steps: int,
    mask_id: int,
    schedule: masked.Schedule,
    guidance_scale: float,
    tilt_until: float,
    best_of: int,
    *,
    guidance_scale_end: float | None = None,
    grad_clip: float = 1.0,
    tilt_input: str = "prediction",
    rerank_temperature: float = 0.0,
    cache: bool = True,
    dtype=jnp.float32,
    x_init: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RGAS from all-[MASK] (or `x_init` [B, L]); returns (tokens int32 [B, L], nfe dict).

    Hyperparameters are static Python values; arrays (key, params closed over by the two
    functions) may be traced, so the function is jittable. Steps are two `lax.scan`s: the tilt
    steps (t_i > tilt_until) then the re-ranking steps.
    """
    if num_steps < 1 or best_of < 1:
        raise ValueError(f"need num_steps >= 1 and best_of >= 1, got {num_steps}, {best_of}")
    if tilt_input not in TILT_INPUTS:
        raise ValueError(f"tilt_input={tilt_input!r} must be one of {TILT_INPUTS}")
    if x_init is None:
        x_init = masked.all_masked(batch_size, length, mask_id)
    x_init = x_init.astype(jnp.int32)
    batch = x_init.shape[0]
    ts = masked.time_grid(num_steps)  # [N + 1]
    grid = np.float32(1) - np.arange(num_steps, dtype=np.float32) / np.float32(num_steps)
    num_tilt = int(np.sum(grid > tilt_until))  # the tilt steps come first (t decreases)
    end = guidance_scale if guidance_scale_end is None else guidance_scale_end
    tilting = guidance_scale != 0 or end != 0
    reranking = best_of > 1
    scales = jnp.linspace(guidance_scale, end, num_tilt, dtype=jnp.float32)  # [num_tilt]
    logits_shape = jax.eval_shape(student_logits_fn, x_init, jnp.ones((batch,), jnp.float32))
    lp_dtype = jnp.promote_types(logits_shape.dtype, jnp.float32)

    def evaluate(xt, t):
        logits = student_logits_fn(xt, jnp.full((batch,), t, jnp.float32))
        return masked.subs_log_probs(logits, xt).astype(lp_dtype)

    def student(carry, t):  # cached student log-probs, as in masked.ancestral_sample
        xt, log_probs, stale, nfe = carry
        stale = jnp.logical_or(stale, not cache)
        log_probs = jax.lax.cond(stale, evaluate, lambda xt, t: log_probs, xt, t)
        return log_probs, nfe + stale.astype(jnp.int32)

    def tilt_body(carry, inputs):
        step_key, t, s, scale = inputs
        xt = carry[0]
        log_probs, nfe = student(carry, t)
        step_lp = log_probs
        if tilting:
            step_lp, _ = tilt_log_probs(
                log_ratio_fn, log_probs, xt, t, scale, grad_clip=grad_clip, tilt_input=tilt_input
            )
        zs = masked.ancestral_step(step_key, step_lp, xt, t, s, schedule, dtype)
        return (zs, log_probs, jnp.any(zs != xt), nfe), None

    def rerank_body(carry, inputs):
        step_key, t, s = inputs
        xt = carry[0]
        log_probs, nfe = student(carry, t)
        if reranking:
            zs, _ = _best_of(
                log_ratio_fn, step_key, log_probs, xt, t, s, schedule, best_of,
                rerank_temperature, dtype,
            )  # fmt: skip
        else:
            zs = masked.ancestral_step(step_key, log_probs, xt, t, s, schedule, dtype)
        return (zs, log_probs, jnp.any(zs != xt), nfe), None

    keys = jax.random.split(key, num_steps)
    carry = (x_init, jnp.zeros(logits_shape.shape, lp_dtype), jnp.array(True), jnp.int32(0))
    if num_tilt:
        inputs = (keys[:num_tilt], ts[:num_tilt], ts[1 : num_tilt + 1], scales)
        carry, _ = jax.lax.scan(tilt_body, carry, inputs)
    if num_tilt < num_steps:
        inputs = (keys[num_tilt:], ts[num_tilt:-1], ts[num_tilt + 1 :])
        carry, _ = jax.lax.scan(rerank_body, carry, inputs)
    tokens, _, _, student_nfe = carry
    num_rerank = num_steps - num_tilt
    disc_forward = (num_tilt if tilting else 0) + (best_of * num_rerank if reranking else 0)
    nfe = {
        "student": student_nfe,
        "discriminator": jnp.int32(disc_forward),
        "discriminator_backward": jnp.int32(num_tilt if tilting else 0),
        "total": student_nfe + disc_forward,
    }
    return tokens, nfe


__all__ = ["TILT_INPUTS", "LogRatioFn", "guided_sample", "tilt_log_probs"]
