"""Exact divergences between categorical distributions given logits (logit distillation).

p = softmax(p_logits / T) is the teacher (target), q = softmax(q_logits / T) the student;
a = log p, b = log q are computed with log_softmax in at least float32. Every divergence is
reduced (summed) over `axis`, so [B, L, V] logits give [B, L] values.

f-divergences (`f_divergences.names()`): D_f(p || q) = sum_k q_k f(p_k / q_k). The form of
each lives in the f-divergence registry (`f_divergences`): a closed form where one is better
conditioned (forward/reverse KL, Jensen-Shannon, chi^2, alpha, ..., listed there), else the
generic `categorical_generic`, built from the registry's f(log_r) in log space with the limits
p_k = 0 (q_k f(0)) and q_k = 0 (p_k f'(inf)). Registering an f-divergence therefore makes it
available here, in KD (`didistill.distill.kd`) and in step halving without further changes.
A term with p_k = q_k = 0 (both logits -inf, a masked vocabulary entry) contributes 0, with
finite gradients; a term with p_k > 0 = q_k makes forward KL +inf, as it should.

Logit-KD losses that are not f-divergences, registered in the table `_LOSSES` (name -> function
of (log p, log q, axis, **params), parameter defaults, range):
- `skew_kl` (DistiLLM, Ko et al. 2024): KL(p || alpha p + (1 - alpha) q), alpha in [0, 1]
  (default 0.1); bounded by -log alpha; alpha = 0 is forward_kl.
- `skew_reverse_kl`: KL(q || alpha q + (1 - alpha) p); alpha = 0 is reverse_kl.
- `generalized_jsd` (GKD, Agarwal et al. 2024; TRL `generalized_jsd_loss`): with
  M = beta p + (1 - beta) q, JSD_beta = beta KL(p || M) + (1 - beta) KL(q || M). Near beta = 0,
  JSD_beta = beta KL(p || q) + O(beta^2); near beta = 1, (1 - beta) KL(q || p) + O((1-beta)^2).
  We return JSD_beta / (beta (1 - beta)) = KL(p || M)/(1 - beta) + KL(q || M)/beta, which is
  continuous on [0, 1] and equals forward KL(p || q) at beta = 0 and reverse KL(q || p) at
  beta = 1: the same endpoint semantics as TRL (beta = 0: KL(teacher || student)), without
  TRL's jump. Multiply by beta (1 - beta) to get TRL's interior values (beta = 0.5 gives 4 JS).
- `alpha_beta` (ABKD, Wang et al. 2025, arXiv 2505.04560), alpha, beta real:
  D = -1/(alpha beta) sum [p^alpha q^beta - alpha/(alpha+beta) p^(alpha+beta)
                           - beta/(alpha+beta) q^(alpha+beta)],
  with the continuous limits (derived by first-order expansion of the exponents):
  beta = 0:  1/alpha^2 sum [p^alpha log(p^alpha / q^alpha) - p^alpha + q^alpha]
  alpha = 0: 1/beta^2 sum [q^beta log(q^beta / p^beta) - q^beta + p^beta]
  alpha + beta = 0: 1/alpha^2 sum [(p/q)^alpha - 1 - alpha log(p/q)]
  alpha = beta = 0: 1/2 sum (log p - log q)^2.
  (1, 0) is forward KL, (0, 1) reverse KL, and alpha + beta = 1 is `alpha` with that alpha.

Temperature only divides the logits; multiply by T^2 yourself to keep Hinton's gradient
scale (grad_z of T^2 KL(p_T || q_T) is T (q_T - p_T)).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from didistill.divergences.f_divergences import (
    FDivergence,
    _drop_both_zero,
    _kl,
    _weighted,
    categorical_generic,
    names,
    resolve,
)


def _alpha_beta(a, b, axis, alpha: float, beta: float):
    both_zero, a, b = _drop_both_zero(a, b)
    s = alpha + beta
    if alpha == 0.0 and beta == 0.0:
        term = 0.5 * jnp.square(a - b)
    elif beta == 0.0:
        term = _weighted(alpha * a, alpha * (a - b)) - jnp.exp(alpha * a) + jnp.exp(alpha * b)
        term = term / alpha**2
    elif alpha == 0.0:
        term = _weighted(beta * b, beta * (b - a)) - jnp.exp(beta * b) + jnp.exp(beta * a)
        term = term / beta**2
    elif s == 0.0:
        d = alpha * (a - b)
        term = (jnp.expm1(d) - d) / alpha**2
    else:
        term = (
            jnp.exp(alpha * a + beta * b)
            - (alpha / s) * jnp.exp(s * a)
            - (beta / s) * jnp.exp(s * b)
        ) / (-alpha * beta)
    return jnp.sum(jnp.where(both_zero, 0.0, term), axis=axis)


def _kl_to_mixture(lx, ly, w: float, axis):
    """KL(x || w x + (1-w) y) = sum x * -log(w + (1-w) y/x), from log x, log y.

    Written through the ratio y/x, so that for w near 0 or 1 the result keeps its relative
    accuracy (no difference of two nearly equal logs); w = 0 is KL(x || y), w = 1 is 0."""
    both_zero = (lx == -jnp.inf) & (ly == -jnp.inf)
    d = jnp.where(both_zero, 0.0, ly) - jnp.where(both_zero, 0.0, lx)  # log(y/x)
    log_w = math.log(w) if w > 0 else -jnp.inf
    log_1mw = math.log1p(-w) if w < 1 else -jnp.inf
    return jnp.sum(_weighted(lx, -jnp.logaddexp(log_w, log_1mw + d)), axis=axis)


def _skew_kl(a, b, axis, alpha: float):  # KL(p || alpha p + (1 - alpha) q)
    return _kl_to_mixture(a, b, alpha, axis)


def _skew_reverse_kl(a, b, axis, alpha: float):  # KL(q || alpha q + (1 - alpha) p)
    return _kl_to_mixture(b, a, alpha, axis)


def _generalized_jsd(a, b, axis, beta: float):  # M = beta p + (1 - beta) q
    if beta == 0.0:
        return _kl(a, b, axis)
    if beta == 1.0:
        return _kl(b, a, axis)
    kl_p_m = _kl_to_mixture(a, b, beta, axis)
    kl_q_m = _kl_to_mixture(b, a, 1.0 - beta, axis)
    return kl_p_m / (1.0 - beta) + kl_q_m / beta


class _Loss(NamedTuple):
    """A categorical divergence that is not an f-divergence: fn(log_p, log_q, axis, **params)
    reduced over axis; params name -> default (None: required, `hint` says typical values);
    unit_interval: every parameter must lie in [0, 1]."""

    fn: Callable
    params: dict[str, float | None]
    unit_interval: bool = True
    hint: str = ""


_LOSSES: dict[str, _Loss] = {
    "skew_kl": _Loss(_skew_kl, {"alpha": 0.1}),
    "skew_reverse_kl": _Loss(_skew_reverse_kl, {"alpha": 0.1}),
    "generalized_jsd": _Loss(_generalized_jsd, {"beta": 0.5}),
    "alpha_beta": _Loss(
        _alpha_beta,
        {"alpha": None, "beta": None},
        unit_interval=False,
        hint="ABKD scripts use alpha=0.2, beta=0.7",
    ),
}
KD_NAMES = tuple(_LOSSES)


def _loss_params(name: str, params: dict) -> dict:
    loss = _LOSSES[name]
    spec = loss.params
    if set(params) - set(spec):
        raise ValueError(f"{name} takes {', '.join(spec)}; got {sorted(params)}")
    out = {}
    for key, default in spec.items():
        value = params.get(key, default)
        if value is None:
            raise ValueError(f"{name} needs {key} ({loss.hint})")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name}: {key} must be a real Python number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name}: {key} must be finite, got {value}")
        if loss.unit_interval and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {key} must lie in [0, 1], got {value}")
        out[key] = value
    return out


def categorical_names() -> tuple[str, ...]:
    """Every name `categorical` accepts: the f-divergences, then the logit-KD losses."""
    return names() + KD_NAMES


def _as_float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def categorical_from_log_probs(name: FDivergence | str, log_p, log_q, axis=-1, **params):
    """Like `categorical`, from normalised log-probabilities (each logsumexp over axis is 0).

    Args:
      name: a name from `categorical_names()` or an FDivergence.
      log_p: [..., V, ...] teacher log-probabilities; log_q: the student's, same shape.
    Returns:
      the divergence, reduced over `axis`.
    """
    a, b = _as_float(log_p), _as_float(log_q)
    if isinstance(name, str) and name in _LOSSES:
        return _LOSSES[name].fn(a, b, axis, **_loss_params(name, params))
    if isinstance(name, str) and name not in names():
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(categorical_names())}")
    return resolve(name, **params).categorical(a, b, axis)


def categorical(name: FDivergence | str, p_logits, q_logits, axis=-1, temperature=1.0, **params):
    """Exact divergence between softmax(p_logits / T) (teacher) and softmax(q_logits / T).

    Args:
      name: a name from `categorical_names()` (f-divergences and the KD losses
        skew_kl, skew_reverse_kl, generalized_jsd, alpha_beta) or an FDivergence.
      p_logits: [..., V, ...] teacher logits; q_logits: student logits, same shape. Entries
        of -inf are allowed (masked vocabulary); bf16 inputs are computed in float32.
      axis: the category axis.
      temperature: T > 0 dividing both sets of logits (no T^2 factor applied).
      **params: alpha / beta of the chosen divergence.
    Returns:
      the divergence, reduced over `axis` (e.g. [B, L] for [B, L, V] logits).
    """
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = jax.nn.log_softmax(_as_float(p_logits) / temperature, axis=axis)
    log_q = jax.nn.log_softmax(_as_float(q_logits) / temperature, axis=axis)
    return categorical_from_log_probs(name, log_p, log_q, axis=axis, **params)


__all__ = [
    "KD_NAMES",
    "categorical",
    "categorical_from_log_probs",
    "categorical_generic",
    "categorical_names",
]
