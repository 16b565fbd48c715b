"""The f-distill score-difference surrogate (Xu, Nie, Vahdat 2025, arXiv 2502.15681).

For a generator x = G_theta(z) with density q_theta, target p and r = p/q_theta,
    d/dtheta D_f(p || q_theta) = E_z[ h(r(x)) (s_q(x) - s_p(x)) . dx/dtheta ],
    h(r) = r^2 f''(r),  s_p = grad_x log p,  s_q = grad_x log q_theta (theta held fixed).
Derivation: d/dtheta [q f(p/q)] = (f(r) - r f'(r)) d/dtheta q, so with
phi(x) = f(r(x)) - r f'(r(x)) frozen at the current theta,
d/dtheta D_f = d/dtheta E_{q_theta}[phi] = E_z[grad_x phi . dx/dtheta] (reparameterisation),
and grad_x phi = -r f''(r) grad_x r = -r^2 f''(r) (s_p - s_q) = h (s_q - s_p).

The surrogate loss
    L(x) = (1/B) sum_i w_i <stop_gradient(s_q(x_i) - s_p(x_i)), x_i>,   w = stop_gradient(h)
has exactly that per-sample gradient w_i (s_q - s_p)_i / B, so back-propagating it through
x = G_theta(z) gives the Monte Carlo estimate of the theorem; descending it moves samples
along h (s_p - s_q). Its value is meaningless (a surrogate), only its gradient matters.

With normalize=True (as in f-distill / FastGen) w_i = h_i / mean_j h_j, computed as
exp(log h_i - logsumexp_j log h_j + log B) so it is finite for any finite log_r, and the
gradient's scale no longer depends on the divergence.

`reduction='sum'` (the default: the theorem's Monte Carlo estimate) sums the per-sample inner
product over the data dimensions; `reduction='mean'` also divides by the number of data
dimensions D, as FastGen and DMD2 do (`0.5 * mse(x, sg(x - grad))`, mean reduction: gradient
`grad / (B D)`). The mean is what makes a published GAN weight mean what it means in those
papers; one-step distillation uses it. Under `jax.jit` with a NamedSharding
over the batch axis, the mean and logsumexp over that axis are global (all-reduced by XLA):
no explicit collective is needed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from didistill.divergences.f_divergences import FDivergence, resolve


def score_difference_weights(log_r, divergence: FDivergence | str, normalize: bool = True):
    """Per-sample weights h(r_i), or h(r_i) / mean_j h(r_j) when normalize (no stop_gradient).

    Args:
      log_r: [B] log p(x_i) - log q(x_i).
      divergence: an FDivergence or a name; total_variation raises ValueError.
    Returns:
      [B] weights (float32 or wider).
    """
    div = resolve(divergence)
    log_r = jnp.asarray(log_r)
    log_r = log_r.astype(jnp.promote_types(log_r.dtype, jnp.float32))
    if not normalize:
        return div.weight(log_r)  # [B]
    log_h = div.log_weight(log_r)  # [B]
    n = log_h.shape[0]
    return jnp.exp(log_h - (logsumexp(log_h, axis=0) - math.log(n)))  # [B], mean 1


def score_difference_loss(
    x,
    score_p,
    score_q,
    log_r,
    divergence: FDivergence | str,
    normalize: bool = True,
    reduction: str = "sum",
):
    """Scalar surrogate whose gradient w.r.t. x_i is w_i (score_q - score_p)_i / B (/ D).

    Args:
      x: [B, ...] generated samples (the only differentiated input).
      score_p: [B, ...] grad_x log p at x (teacher score), already evaluated.
      score_q: [B, ...] grad_x log q at x (student / fake score), already evaluated.
      log_r: [B] log p(x_i) - log q(x_i), e.g. a discriminator's logit.
      divergence: an FDivergence or a name (total_variation raises ValueError).
      normalize: divide h by its batch mean (stable, via log_weight and logsumexp).
      reduction: 'sum' over the data dimensions, or 'mean' (divides by D = prod(x.shape[1:])).
    Returns:
      [] the surrogate; everything except x is under stop_gradient.
    """
    x = jnp.asarray(x)
    weights = jax.lax.stop_gradient(score_difference_weights(log_r, divergence, normalize))
    direction = jax.lax.stop_gradient(jnp.asarray(score_q) - jnp.asarray(score_p))  # [B, ...]
    if weights.shape != x.shape[:1] or direction.shape != x.shape:
        raise ValueError(
            f"shapes: x {x.shape}, score_p/score_q {direction.shape} (must equal x), "
            f"log_r {weights.shape} (must be [B] = {x.shape[:1]})"
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    per_sample = jnp.sum((direction * x).reshape(x.shape[0], -1), axis=1)  # [B]
    if reduction == "mean":
        per_sample = per_sample / math.prod(x.shape[1:])
    return jnp.mean(weights.astype(per_sample.dtype) * per_sample)


__all__ = ["score_difference_loss", "score_difference_weights"]
