"""Sample estimators of f-divergences: Monte Carlo averages and the f-GAN variational bound.

With x_i ~ q and log_r_i = log p(x_i) - log q(x_i), D_f(p || q) = E_q[f(p/q)] is estimated by
the sample mean of f(r_i) (unbiased; its standard error is std(f(r_i)) / sqrt(n)).

When only an unnormalised ratio is known (log p up to a constant, e.g. an energy model or a
discriminator whose calibration is off by a constant), `estimate_self_normalized` rescales the
ratios so that their sample mean is 1, since E_q[p/q] = 1 for normalised p:
    log_r_i <- log_r_i - logsumexp_j(log_r_j) + log n.
This is consistent but biased at finite n (the self-normalised importance sampling estimate).

The variational bound (Nowozin, Cseke, Tomioka, "f-GAN", NeurIPS 2016, eq. 4-6):
    D_f(p || q) >= E_p[g(V)] - E_q[f*(g(V))]
for any critic V, with g the output activation of the divergence (`FDivergence.activation`)
and f* its Fenchel conjugate; equality holds for g(V(x)) = f'(p(x)/q(x)). Maximising the bound
over V trains the critic; its value estimates the divergence.

All reductions are means over the leading axis (the sample axis); trailing axes are kept.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.scipy.special import logsumexp

from didistill.divergences.f_divergences import FDivergence, resolve


def estimate(divergence: FDivergence | str, log_r, **params):
    """Monte Carlo estimate of D_f(p || q) = E_q[f(p/q)].

    Args:
      divergence: an FDivergence or a registered name (then `params` go to `get`).
      log_r: [n, ...] log p(x_i) - log q(x_i) at samples x_i ~ q.
    Returns:
      [...] the mean of f(r_i) over the leading axis.
    """
    div = resolve(divergence, **params)
    return jnp.mean(div.f(log_r), axis=0)  # [...]


def self_normalize_log_ratio(log_r):
    """log_r - logsumexp(log_r) + log n over the leading axis: the ratios then average to 1."""
    log_r = jnp.asarray(log_r)
    n = log_r.shape[0]
    return log_r - (logsumexp(log_r, axis=0, keepdims=True) - math.log(n))  # [n, ...]


def estimate_self_normalized(divergence: FDivergence | str, log_r, **params):
    """Self-normalised estimate of D_f(p || q) from an unnormalised log ratio.

    `log_r` may be off by any constant (per trailing index): the ratios are normalised to
    have sample mean 1 before f is applied. Consistent as n -> inf, biased at finite n.

    Args:
      divergence: an FDivergence or a registered name.
      log_r: [n, ...] log p~(x_i) - log q(x_i) + c, x_i ~ q, with p~ an unnormalised p.
    Returns:
      [...] estimate.
    """
    return estimate(divergence, self_normalize_log_ratio(log_r), **params)


def variational_bound(divergence: FDivergence | str, critic_p, critic_q, **params):
    """f-GAN lower bound E_p[g(V)] - E_q[f*(g(V))] from raw critic outputs.

    Uses `conjugate_activation(v) = f*(g(v))`, which stays finite where g(v) approaches the
    edge of dom f*. Tight when g(V) = f'(p/q), e.g. V = log r for reverse_kl, jensen_shannon,
    softened_reverse_kl; V = 1 + log r for forward_kl.

    Args:
      divergence: an FDivergence or a registered name.
      critic_p: [n, ...] critic outputs V(x) at samples x ~ p.
      critic_q: [m, ...] critic outputs V(x) at samples x ~ q.
    Returns:
      [...] the bound (maximise it over the critic).
    """
    div = resolve(divergence, **params)
    on_p = jnp.mean(div.activation(critic_p), axis=0)
    on_q = jnp.mean(div.conjugate_activation(critic_q), axis=0)
    return on_p - on_q


__all__ = [
    "estimate",
    "estimate_self_normalized",
    "self_normalize_log_ratio",
    "variational_bound",
]
