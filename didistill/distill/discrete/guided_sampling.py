"""Reward-guided ancestral sampling (RGAS) of DiDi-Instruct for masked diffusion students.

Zheng et al., arXiv:2509.25035. Reference: haoyangzheng-ai/didi-instruct @ 7825a02 `algo.py`,
`reward_guided_ancestral_step` (lines 305-369) and `generate_samples` (371-427), the code of the
published evaluation (`scripts/eval-didi-instruct.sh`: `sampling.predictor=guided`,
`noise_removal=ancestral`; `configs/algo/didi_instruct.yaml`: `guidance_scale_start` 30,
`guidance_scale_end` 40, `num_candidates` 4, `rerank_steps_ratio` 0.5). The discriminator of
DiDi-Instruct estimates the log density ratio log r(z, t) = log q_teacher(z, t) -
log q_student(z, t) (the "reward"); at inference it steers the student's MDLM ancestral sampler
(`didistill.diffusion.masked`) towards states the discriminator finds teacher-like.

Grid. With `final_eps` = e > 0 (the reference, e = 1e-5): t_i = 1 - i (1 - e) / N, i = 0..N
(its `linspace(1, eps, N + 1)`), then one final denoising step e -> 0 that draws every
still-masked token from the (untilted) student's x_theta(z, e) (its `_denoiser_update`, [MASK]
excluded); it costs one more student call. With e = 0: t_i = 1 - i/N down to exactly 0
(`masked.time_grid`), no extra step.

The first n_tilt = int(N (1 - `tilt_until`)) steps tilt, the others re-rank (the reference's
`rerank_start_step = int(N (1 - rerank_steps_ratio))`, so `tilt_until` = 0.5 is its
`rerank_steps_ratio` 0.5; on the grid 1 - i/N these are the steps with t_i > tilt_until).

Tilt steps: gradient tilting. With x = log x_theta(z_t) the student's SUBS log-probs
[B, L, V + 1],

    g = clip( d log r(u(x), t) / d v , -c, c ),        c = `grad_clip` (<= 0: no clip)
    x'_l = log_softmax(x_l + h_i g_l)   at masked positions l (z_t^l = m),   x'_l = x_l else,

then one ordinary ancestral step z_t -> z_s from x'. log r sums the discriminator's token
logits over the masked positions of z_t (the reference's `(scores * masked_pos).sum()`).
`tilt_input` picks the relaxed input u the discriminator sees and the variable v it is
differentiated in:
- 'prediction' (the reference): u = softmax(x) at masked positions (the student's soft
  prediction of the clean token), one-hot(z_t) elsewhere; v = x (the gradient flows back
  through the softmax: g = p * (dlog r/du - <p, dlog r/du>)). The reference feeds log p and
  1e9 one-hots to a DiT whose embedding softmaxes soft inputs: the same u.
- 'state': u = v = one-hot(z_t), the relaxed current state. g_l[j] is the first-order change
  of log r when position l moves towards token j, so exp(h g) is a Taylor approximation of the
  tilt r(z_s)^h of the reverse transition (Nisonoff et al. 2024, arXiv:2406.01572).
The strength h_i ramps linearly from `guidance_scale` to `guidance_scale_end` over the tilt
steps (h_i = start + i / max(1, n_tilt - 1) (end - start), the reference's ramp; constant when
end is None). The renormalisation is the reference's: softmax(x + h g) gives the token law,
revealed with the schedule's probability (alpha_s - alpha_t)/(1 - alpha_t) (its
`q_xs = softmax(...) (alpha_s - alpha_t)`, `q_xs[mask] = 1 - alpha_s`): the tilt changes which
token is revealed, not whether one is.

Re-ranking steps: best-of-k. Draw k = `best_of` candidate transitions z_s^(1..k) ~ q(. | z_t)
from the (untilted) student step, score each by log r(z_s^(j), s) at the next noise level s,
over every position (`rerank_positions='all'`, the reference's `scores.sum(dim=[1, 2])`) or
over the positions still masked in the candidate ('masked'), and keep per sequence

    j* ~ softmax_j( log r(z_s^(j), s) / T )      (T = `rerank_temperature` > 0; the reference
                                                  samples with T = 1)
    j* = argmax_j log r(z_s^(j), s)              (T = 0, ties -> first)

Candidate 1 uses the step's own key, the others `fold_in(step_key, j)`: with best_of = 1, no
tilt and final_eps = 0 the sampler is bit-identical to `masked.ancestral_sample` for the same
key, and under argmax the kept candidate never scores below candidate 1 (the k = 1 draw).

`log_ratio_fn(tokens, t, positions) -> [B]`: tokens are int [B, L] (re-ranking) or relaxed
[B, L, V + 1] (tilting); t [B]; positions bool [B, L] marks the positions to aggregate the
per-token discriminator over (the masked ones of the scored state, or all of them). Rows must
be independent (the tilt differentiates the batch sum).

NFE: the student is evaluated as in the cached plain sampler (`cache`), the final denoising
step included; each tilt step costs one discriminator forward and one backward pass on the
batch; each re-ranking step k discriminator forwards (one call on k*B rows). Returned as int32
scalars {'student', 'discriminator' (forward passes), 'discriminator_backward', 'total' =
student + discriminator}; a zero guidance scale or best_of = 1 skips the discriminator
(counted 0). The reference reports only the student NFE.

Not reproduced: the training-code release of the reference (2026) ramps h over all N steps and
re-ranks with softmax(h_i log r); this module follows the evaluation release above.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from didistill.diffusion import masked

LogRatioFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
TILT_INPUTS = ("prediction", "state")
RERANK_POSITIONS = ("all", "masked")


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


def _best_of(
    log_ratio_fn, key, log_probs, xt, t, s, schedule, best_of, temperature, dtype, every=True
):
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
    positions = jnp.ones_like(flat, bool) if every else flat == log_probs.shape[-1] - 1
    scores = log_ratio_fn(flat, s_rows, positions).reshape(k, batch)
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
    rerank_temperature: float = 1.0,
    rerank_positions: str = "all",
    final_eps: float = 1e-5,
    cache: bool = True,
    dtype=jnp.float32,
    x_init: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RGAS from all-[MASK] (or `x_init` [B, L]); returns (tokens int32 [B, L], nfe dict).

    Hyperparameters are static Python values; arrays (key, params closed over by the two
    functions) may be traced, so the function is jittable. Steps are two `lax.scan`s: the tilt
    steps then the re-ranking steps, then the final denoising step when final_eps > 0.
    """
    if num_steps < 1 or best_of < 1:
        raise ValueError(f"need num_steps >= 1 and best_of >= 1, got {num_steps}, {best_of}")
    if tilt_input not in TILT_INPUTS:
        raise ValueError(f"tilt_input={tilt_input!r} must be one of {TILT_INPUTS}")
    if rerank_positions not in RERANK_POSITIONS:
        raise ValueError(f"rerank_positions={rerank_positions!r}: one of {RERANK_POSITIONS}")
    if not 0.0 <= final_eps < 1.0 or not 0.0 <= tilt_until <= 1.0:
        raise ValueError(f"need 0 <= final_eps={final_eps} < 1 and 0 <= tilt_until <= 1")
    if x_init is None:
        x_init = masked.all_masked(batch_size, length, mask_id)
    x_init = x_init.astype(jnp.int32)
    batch = x_init.shape[0]
    if final_eps > 0:  # linspace(1, eps, N + 1), then the final denoising step
        ts = jnp.asarray(np.linspace(1.0, final_eps, num_steps + 1), jnp.float32)
    else:
        ts = masked.time_grid(num_steps)  # [N + 1], down to exactly 0
    num_tilt = int(num_steps * (1.0 - tilt_until) + 1e-9)  # the tilt steps come first
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
                rerank_temperature, dtype, rerank_positions == "all",
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
    if final_eps > 0:  # draw every remaining [MASK] from x_theta(z, eps) (reveal prob 1)
        log_probs, nfe = student(carry, ts[-1])
        zs = masked.ancestral_step(
            jax.random.fold_in(key, num_steps), log_probs, carry[0], ts[-1], 0.0, schedule, dtype
        )
        carry = (zs, log_probs, jnp.any(zs != carry[0]), nfe)
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


__all__ = ["RERANK_POSITIONS", "TILT_INPUTS", "LogRatioFn", "guided_sample", "tilt_log_probs"]
