"""The f-divergence registry: generators in log-ratio form, their weights and conjugates.

Convention (the library's, see docs/design.md): p is the target (teacher), q the model
(student), `D_f(p || q) = E_q[f(p/q)]` with f convex and f(1) = 0. Every function takes
`log_r = log p - log q` and works in log space (expm1, log1p, softplus, sigmoid) so that
`|log_r| <= 50` stays finite in float32 wherever the exact value is representable.

    name                 f(r)                           h(r) = r^2 f''(r)   activation g(v)
    reverse_kl           -log r                         1                   -exp(-v)
    forward_kl           r log r                        r                   v
    jensen_shannon       [r log r-(r+1)log((r+1)/2)]/2  r/(2(r+1))          (log 2-softplus(-v))/2
    squared_hellinger    1 - sqrt(r)                    sqrt(r)/4           -exp(-v)/2
    jeffreys             (r-1) log r                    r + 1               v
    pearson_chi2         (r-1)^2                        2 r^2               v
    neyman_chi2          (1-r)^2/r                      2/r                 1 - exp(-v)
    total_variation      |r-1|/2                        (none: an error)    tanh(v)/2
    softened_reverse_kl  (r+1) log((r+1)/(2r))          1/(r+1)             f'(exp(v))
    alpha (a != 0, 1)    (r^a-1-a(r-1))/(a(a-1))        r^a                 a<1: 1/(1-a)-sp(-v)
                                                                            a>1: v
    (sp = softplus; f' = df/dr.)

The weight h is the f-distill weight (Xu, Nie, Vahdat 2025, arXiv 2502.15681): for a
generator x = G_theta(z), grad_theta D_f(p || q_theta) = E_z[h(r) (s_q - s_p)(x) dx/dtheta]
with s = grad_x log density, so the generator moves samples along h (s_p - s_q).

The conjugate f*(t) = sup_{u >= 0} {t u - f(u)} and the activation g (mapping R into dom f*)
give the f-GAN bound D_f(p || q) >= E_p[g(V)] - E_q[f*(g(V))] (Nowozin, Cseke, Tomioka 2016),
with equality for g(V) = f'(p/q), i.e. at the optimal critic V* below. f-GAN's activations
are carried over to this project's constants with (c f)*(t) = c f*(t/c) and
(f + c (u-1))*(t) = f*(t - c). Derivations are in the docstrings of the helpers below.

    name                 f*(t)                            dom f*          V*(r)
    reverse_kl           -1 - log(-t)                     t < 0           log r
    forward_kl           exp(t - 1)                       R               1 + log r
    jensen_shannon       -log(2 - exp(2t))/2              t < log(2)/2    log r
    squared_hellinger    -1 - 1/(4t)                      t < 0           log(r)/2
    jeffreys             W + 1/W + t - 2, W = W(e^(1-t))  R               f'(r)
    pearson_chi2         t + t^2/4 (t >= -2), -1 below    R               2(r - 1)
    neyman_chi2          2 - 2 sqrt(1 - t)                t <= 1          2 log r
    total_variation      max(t, -1/2)                     t <= 1/2        +-inf (sign of r-1)
    softened_reverse_kl  -1 - t - a, a - log1p(a) = -t-log 2  t <= -log 2     log r
    alpha                ((1+(a-1)t)^(a/(a-1)) - 1)/a     1+(a-1)t > 0    g^-1(f'(r))
                         (a > 1: -1/a where 1+(a-1)t <= 0, so dom f* = R)

Each generator also provides `conjugate_activation(v) = f*(g(v))` in a closed, stable form
(e.g. (softplus(v) - log 2)/2 for jensen_shannon), used by the variational bound.

Categorical forms. Between categorical distributions, D_f(p || q) = sum_k q_k f(p_k / q_k)
is computed by `didistill.divergences.categorical` from log-probabilities a = log p, b = log q.
An entry without a `categorical` closed form gets the generic one (`categorical_generic`,
built from `f` alone, with the limits f(0) = f(log_r = -inf) and f'(inf) = f_prime(+inf));
the closed forms below are better conditioned (no overflow of f(r) where q f(p/q) is finite,
sums through logsumexp) and are what these names have always computed:

    reverse_kl           sum q (b - a)                  forward_kl   sum p (a - b)
    jensen_shannon       [sum p (a - m) + q (b - m)]/2, m = log((p + q)/2)
    squared_hellinger    -expm1(logsumexp((a + b)/2))   = 1 - sum sqrt(p q)
    jeffreys             forward_kl + reverse_kl
    pearson_chi2         expm1(logsumexp(2a - b))       = sum p^2/q - 1
    neyman_chi2          expm1(logsumexp(2b - a))
    total_variation      sum |p - q| / 2
    softened_reverse_kl  2 sum M (log M - a), M = (p + q)/2, i.e. 2 KL(M || p)
    alpha                expm1(logsumexp(alpha a + (1 - alpha) b)) / (alpha (alpha - 1))

Each keeps every term finite when probabilities underflow (a_k or b_k very negative or -inf):
a term with p_k = q_k = 0 (a masked vocabulary entry) contributes 0 with finite gradients; a
term with p_k > 0 = q_k makes forward KL +inf, as it should.

Overflow: beyond float32 range the exact value is returned as +-inf (e.g. pearson_chi2 at
log_r = 50 is e^100); never NaN for finite inputs. Gradients are finite wherever the value
and the derivative are representable. Style after TFP `vi.csiszar_divergence`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

LOG2 = math.log(2.0)
_NEWTON_STEPS = 10


def _log_half_one_plus_exp(x):
    """log((1 + e^x) / 2) = softplus(x) - log 2, without cancellation near x = 0."""
    xp = jnp.where(x > 0, x, 0.0)  # safe per-branch inputs keep gradients finite
    xn = jnp.where(x > 0, 0.0, x)
    return jnp.where(x > 0, xp + jnp.log1p(0.5 * jnp.expm1(-xp)), jnp.log1p(0.5 * jnp.expm1(xn)))


def _log_softplus(x):
    """log(softplus(x)), equal to x (to 1e-9 relative) where softplus underflows."""
    safe = jnp.where(x < -20.0, -20.0, x)
    return jnp.where(x < -20.0, x, jnp.log(jax.nn.softplus(safe)))


def _outside(mask, t, safe_value, fn, outside_value=jnp.inf):
    """fn(t) where mask holds, outside_value elsewhere; fn never sees an out-of-domain t."""
    return jnp.where(mask, fn(jnp.where(mask, t, safe_value)), outside_value)


def _rkl_conjugate(t):
    """reverse_kl: f = -log r. f*(t) = sup t u + log u = -1 - log(-t) at u = -1/t, t < 0."""
    return _outside(t < 0, t, -1.0, lambda s: -1.0 - jnp.log(-s))


def _js_f(l):
    """jensen_shannon: f = [r log r - (r+1) log((r+1)/2)]/2 = -[r L(-l) + L(l)]/2 with
    L(x) = log((1+e^x)/2). With f2 = 2f ("JS x2", f-GAN), f2*(t) = -log(2 - e^t) on t < log 2,
    so f*(t) = f2*(2t)/2 = -log(2 - e^(2t))/2 on t < log(2)/2 and g = g2/2. f*(g(v)) simplifies
    to (softplus(v) - log 2)/2; the optimal critic is V = log r."""
    return -0.5 * (jnp.exp(l) * _log_half_one_plus_exp(-l) + _log_half_one_plus_exp(l))


def _js_conjugate(t):
    fn = lambda s: -0.5 * (LOG2 + jnp.log1p(-jnp.exp(2.0 * s - LOG2)))
    return _outside(t < 0.5 * LOG2, t, 0.0, fn)


def _hellinger_conjugate(t):
    """squared_hellinger: f = 1 - sqrt(u). For t < 0 the sup is at sqrt(u) = -1/(2t), giving
    f*(t) = -1 - 1/(4t); t >= 0 is +inf. f-GAN's (sqrt(u)-1)^2 = 2 f + (u - 1) with activation
    1 - e^(-v) maps to g(v) = -e^(-v)/2 here, f*(g(v)) = e^v/2 - 1; optimal V = log(r)/2."""
    return _outside(t < 0, t, -1.0, lambda s: -1.0 - 0.25 / s)


def _jeffreys_conjugate(t):
    """jeffreys: f = (u-1) log u. Stationarity t = log u + 1 - 1/u; with w = 1/u this is
    log w + w = 1 - t, i.e. w = W(e^(1-t)) (Lambert W), and f*(t) = w + 1/w + t - 2 on all of R.
    Solved for log w by Newton on ell + e^ell = 1 - t (convex, increasing; the start lies right
    of the root, so the iterates decrease monotonically to it)."""
    z = 1.0 - t
    ell = jnp.where(z > 1.0, jnp.log(jnp.maximum(z, 1.0)), z)
    for _ in range(_NEWTON_STEPS):
        e = jnp.exp(ell)
        ell = ell - (ell + e - z) / (1.0 + e)
    return jnp.exp(ell) + jnp.exp(-ell) + t - 2.0


def _pearson_conjugate(t):
    """pearson_chi2: f = (u-1)^2 on u >= 0: sup at u = 1 + t/2 if t >= -2 (t + t^2/4),
    else at u = 0 (-1)."""
    return jnp.where(t >= -2.0, t + 0.25 * t * t, -1.0)


def _neyman_conjugate(t):
    """neyman_chi2: f = (1-u)^2/u = u - 2 + 1/u. For t < 1 the sup is at u = (1-t)^(-1/2):
    f*(t) = 2 - 2 sqrt(1-t) (also the limit 2 at t = 1); +inf for t > 1. f*(g(v)) = 2-2e^(-v/2);
    optimal V = 2 log r."""
    return _outside(t <= 1.0, t, 0.0, lambda s: 2.0 - 2.0 * jnp.sqrt(1.0 - s))


def _tv_conjugate(t):
    """total_variation: f = |u-1|/2 on u >= 0: f*(t) = t on |t| <= 1/2, +inf for t > 1/2 and
    -1/2 = -f(0) for t < -1/2 (the sup sits at u = 0; f-GAN's "|t| <= 1/2" assumes u in R)."""
    return jnp.where(t <= 0.5, jnp.maximum(t, -0.5), jnp.inf)


def _srkl_conjugate(t):
    """softened_reverse_kl: f = (u+1) log((u+1)/(2u)) = (1+r) L(-l), f' = L(-l) - 1/r.
    With a = 1/u stationarity reads a - log(1+a) = -(t + log 2) =: k >= 0 and then
    f*(t) = -1 - t - a (t = -log 2 gives a = 0, the limit u -> inf); t > -log 2 is +inf.
    a is found by Newton (convex increasing in a; the start k + sqrt(2k) lies right of the
    root). With g(v) = f'(e^v), Fenchel-Young gives f*(g(v)) = e^v f'(e^v) - f(e^v) = -1 - L(-v)."""

    def solve(s):
        k = -(s + LOG2)
        a = k + jnp.sqrt(2.0 * k)
        for _ in range(_NEWTON_STEPS):
            a = a - (a - jnp.log1p(a) - k) * (1.0 + a) / jnp.maximum(a, 1e-30)
        return -1.0 - s - a

    return _outside(t <= -LOG2, t, -1.0, solve)


def _alpha_f(l, alpha):
    """alpha: f = (r^a - 1 - a(r-1))/(a(a-1)) = sum_i c_i e^(k_i l), k in {a, 0, 1}. Each side
    of l = 0 factors out its dominant exponential so that every expm1 argument is <= 0: no
    overflow before the value itself overflows, no cancellation near l = 0 beyond the O(l) one.
    Conjugate: u* = y^(1/(a-1)) with y = 1 + (a-1) t > 0 gives f*(t) = (y^(a/(a-1)) - 1)/a.
    a > 1: dom f* = R, f*(t) = -1/a where y <= 0 (u* = 0). a < 0: y = 0 gives -1/a, y < 0 inf.
    0 < a < 1: y <= 0 is +inf. f-GAN activation: a < 1: 1/(1-a) - softplus(-v), for which
    y = (1-a) softplus(-v); a > 1: v."""
    a, c = alpha, alpha * (alpha - 1.0)
    ln, lp = jnp.where(l < 0, l, 0.0), jnp.where(l < 0, 0.0, l)

    def direct(x):  # dominant term e^0
        return (jnp.expm1(a * x) - a * jnp.expm1(x)) / c

    def dual(x):  # dominant term e^x (r f_{1-a}(1/r))
        return jnp.exp(x) * (jnp.expm1((a - 1.0) * x) - (1.0 - a) * jnp.expm1(-x)) / c

    def scaled(x):  # dominant term e^(a x)
        return jnp.exp(a * x) * ((a - 1.0) * jnp.expm1(-a * x) - a * jnp.expm1((1.0 - a) * x)) / c

    negative_side = direct(ln) if a > 0 else scaled(ln)
    positive_side = dual(lp) if a < 1 else scaled(lp)
    return jnp.where(l < 0, negative_side, positive_side)


def _alpha_conjugate(t, alpha):
    y = 1.0 + (alpha - 1.0) * t
    if alpha > 1:
        outside = -1.0 / alpha
    elif alpha < 0:
        outside = jnp.where(y == 0, -1.0 / alpha, jnp.inf)
    else:
        outside = jnp.inf
    fn = lambda s: jnp.expm1(alpha / (alpha - 1.0) * jnp.log(1.0 + (alpha - 1.0) * s)) / alpha
    return _outside(y > 0, t, 0.0, fn, outside)


def _alpha_activation(v, alpha):
    return 1.0 / (1.0 - alpha) - jax.nn.softplus(-v) if alpha < 1 else v


def _alpha_conjugate_activation(v, alpha):
    if alpha > 1:
        return _alpha_conjugate(v, alpha)
    log_y = math.log(1.0 - alpha) + _log_softplus(-v)
    return jnp.expm1(alpha / (alpha - 1.0) * log_y) / alpha


# ------------------------------------------------------- categorical forms, log-probabilities


def _weighted(log_w, d):
    """sum-term e^log_w * d with 0 wherever e^log_w = 0 (0 * inf = 0, finite gradients)."""
    zero = log_w == -jnp.inf
    return jnp.where(zero, 0.0, jnp.exp(log_w) * jnp.where(zero, 0.0, d))


def _kl(a, b, axis):
    """KL(e^a || e^b) = sum e^a (a - b)."""
    return jnp.sum(_weighted(a, a - b), axis=axis)


def _expm1_lse(arg, axis):
    return jnp.expm1(logsumexp(arg, axis=axis))


def _drop_both_zero(a, b):
    """(mask of p_k = q_k = 0, a and b with 0 there): masked entries feed nothing non-finite."""
    both_zero = (a == -jnp.inf) & (b == -jnp.inf)
    return both_zero, jnp.where(both_zero, 0.0, a), jnp.where(both_zero, 0.0, b)


def _log_mid(a, b):
    """m = log((p + q)/2), -inf where p = q = 0."""
    both_zero, a_s, b_s = _drop_both_zero(a, b)
    return jnp.where(both_zero, -jnp.inf, jnp.logaddexp(a_s, b_s) - LOG2)


def _js_categorical(a, b, axis):
    m = _log_mid(a, b)
    return 0.5 * jnp.sum(_weighted(a, a - m) + _weighted(b, b - m), axis=axis)


def _srkl_categorical(a, b, axis):
    m = _log_mid(a, b)
    return 2.0 * jnp.sum(_weighted(m, m - a), axis=axis)


def _chi2_categorical(a, b, axis):
    """sum e^(2a - b) - 1 (pearson_chi2; neyman_chi2 with a and b swapped); p_k = 0 adds 0."""
    _, a_s, b_s = _drop_both_zero(a, b)
    return _expm1_lse(jnp.where(a == -jnp.inf, -jnp.inf, 2.0 * a_s - b_s), axis)


def _alpha_categorical(a, b, axis, alpha):
    both_zero, a_s, b_s = _drop_both_zero(a, b)
    arg = jnp.where(both_zero, -jnp.inf, alpha * a_s + (1.0 - alpha) * b_s)
    return _expm1_lse(arg, axis) / (alpha * (alpha - 1.0))


def _weighted_unless_underflow(log_w, d):
    """e^log_w * d, with 0 wherever e^log_w rounds to 0 (also for d = +-inf)."""
    return _weighted(jnp.where(jnp.exp(log_w) == 0, -jnp.inf, log_w), d)


def _limits(div: FDivergence, dtype):
    """(f(0), f'(inf)): f at log_r = -inf (at the most negative float where that gives NaN,
    e.g. l e^l) and f_prime at log_r = +inf. f'(inf) = lim f(r)/r, by convexity."""
    f0 = div.f(jnp.asarray(-jnp.inf, dtype))
    f0 = jnp.where(jnp.isnan(f0), div.f(jnp.asarray(jnp.finfo(dtype).min, dtype)), f0)
    return f0, div.f_prime(jnp.asarray(jnp.inf, dtype))


def categorical_generic(divergence: FDivergence, log_p, log_q, axis=-1):
    """D_f(p || q) = sum_k q_k f(p_k / q_k) from log-probabilities, using `f` alone: the
    categorical form of every f-divergence without a closed form in the registry.

    With l = log p_k - log q_k, each term is max(p_k, q_k) g(l) with g(l) = f(r) for r <= 1
    and f(r)/r for r > 1 (so the weight is the larger probability, never one that underflows
    first). The zero limits, as in the closed forms: p_k = q_k = 0 adds 0; q_k = 0 < p_k adds
    p_k f'(inf) (+inf for forward KL, p_k/2 for total variation); p_k = 0 < q_k adds q_k f(0).
    Where f(r) itself overflows, g takes the same limits (f(r)/r -> f'(inf), f(r) -> f(0)), and
    terms whose weight underflows to 0 add 0; values and gradients are never NaN for finite or
    -inf inputs. A closed form is better conditioned where f overflows but q f(p/q) does not
    (forward KL at |l| > ~88 in float32: p l is finite, here +inf).

    Args:
      divergence: an FDivergence (its `f` must return f(0) at log_r = -inf, or at the most
        negative float, and its `f_prime` f'(inf) = lim f(r)/r at log_r = +inf).
      log_p, log_q: [..., V, ...] floating log-probabilities, the same shape.
    Returns:
      the divergence, reduced over `axis`.
    """
    a, b = jnp.asarray(log_p), jnp.asarray(log_q)
    a_zero, b_zero = a == -jnp.inf, b == -jnp.inf
    finite = ~(a_zero | b_zero)
    log_r = jnp.where(finite, a - b, 0.0)
    above = log_r > 0
    ok = jnp.isfinite(divergence.f(jax.lax.stop_gradient(log_r)))  # f(r) representable
    l = jnp.where(ok, log_r, 0.0)  # safe inputs keep the gradients of unused branches finite
    f_l = divergence.f(l)
    g = jnp.where(above, f_l * jnp.exp(-jnp.where(above, l, 0.0)), f_l)
    f0, slope = _limits(divergence, log_r.dtype)
    g = jnp.where(ok, g, jnp.where(above, slope, f0))
    terms = (
        _weighted_unless_underflow(jnp.where(finite, jnp.where(above, a, b), -jnp.inf), g)
        + _weighted_unless_underflow(jnp.where(b_zero & ~a_zero, a, -jnp.inf), slope)
        + _weighted_unless_underflow(jnp.where(a_zero & ~b_zero, b, -jnp.inf), f0)
    )
    return jnp.sum(terms, axis=axis)


# ------------------------------------------------------------------------------- the registry


class _Generator(NamedTuple):
    """Elementwise functions of one f; all take (array, **params). `categorical`, if given, is
    the closed categorical form (log_p, log_q, axis, **params) -> D_f reduced over axis; None
    uses `categorical_generic`."""

    f: Callable
    f_prime: Callable
    weight: Callable | None
    log_weight: Callable | None
    conjugate: Callable
    activation: Callable
    conjugate_activation: Callable
    params: tuple[str, ...] = ()
    categorical: Callable | None = None


_exp, _sp, _L = jnp.exp, jax.nn.softplus, _log_half_one_plus_exp

_REGISTRY: dict[str, _Generator] = {
    "reverse_kl": _Generator(
        f=lambda l: -l,
        f_prime=lambda l: -_exp(-l),
        weight=jnp.ones_like,
        log_weight=jnp.zeros_like,
        conjugate=_rkl_conjugate,
        activation=lambda v: -_exp(-v),
        conjugate_activation=lambda v: v - 1.0,
        categorical=lambda a, b, axis: _kl(b, a, axis),
    ),
    "forward_kl": _Generator(
        f=lambda l: l * _exp(l),
        f_prime=lambda l: l + 1.0,
        weight=_exp,
        log_weight=lambda l: l,
        conjugate=lambda t: _exp(t - 1.0),
        activation=lambda v: v,
        conjugate_activation=lambda v: _exp(v - 1.0),
        categorical=_kl,
    ),
    "jensen_shannon": _Generator(
        f=_js_f,
        f_prime=lambda l: -0.5 * _L(-l),
        weight=lambda l: 0.5 * jax.nn.sigmoid(l),
        log_weight=lambda l: jax.nn.log_sigmoid(l) - LOG2,
        conjugate=_js_conjugate,
        activation=lambda v: 0.5 * (LOG2 - _sp(-v)),
        conjugate_activation=lambda v: 0.5 * (_sp(v) - LOG2),
        categorical=_js_categorical,
    ),
    "squared_hellinger": _Generator(
        f=lambda l: -jnp.expm1(0.5 * l),
        f_prime=lambda l: -0.5 * _exp(-0.5 * l),
        weight=lambda l: 0.25 * _exp(0.5 * l),
        log_weight=lambda l: 0.5 * l - 2.0 * LOG2,
        conjugate=_hellinger_conjugate,
        activation=lambda v: -0.5 * _exp(-v),
        conjugate_activation=lambda v: 0.5 * _exp(v) - 1.0,
        categorical=lambda a, b, axis: -_expm1_lse(0.5 * (a + b), axis),
    ),
    "jeffreys": _Generator(
        f=lambda l: l * jnp.expm1(l),
        f_prime=lambda l: l - jnp.expm1(-l),
        weight=lambda l: 1.0 + _exp(l),
        log_weight=_sp,
        conjugate=_jeffreys_conjugate,
        activation=lambda v: v,
        conjugate_activation=_jeffreys_conjugate,
        categorical=lambda a, b, axis: _kl(a, b, axis) + _kl(b, a, axis),
    ),
    "pearson_chi2": _Generator(
        f=lambda l: jnp.square(jnp.expm1(l)),
        f_prime=lambda l: 2.0 * jnp.expm1(l),
        weight=lambda l: 2.0 * _exp(2.0 * l),
        log_weight=lambda l: LOG2 + 2.0 * l,
        conjugate=_pearson_conjugate,
        activation=lambda v: v,
        conjugate_activation=_pearson_conjugate,
        categorical=_chi2_categorical,
    ),
    "neyman_chi2": _Generator(
        f=lambda l: 4.0 * jnp.square(jnp.sinh(0.5 * l)),
        f_prime=lambda l: -jnp.expm1(-2.0 * l),
        weight=lambda l: 2.0 * _exp(-l),
        log_weight=lambda l: LOG2 - l,
        conjugate=_neyman_conjugate,
        activation=lambda v: -jnp.expm1(-v),
        conjugate_activation=lambda v: 2.0 - 2.0 * _exp(-0.5 * v),
        categorical=lambda a, b, axis: _chi2_categorical(b, a, axis),
    ),
    "total_variation": _Generator(
        f=lambda l: 0.5 * jnp.abs(jnp.expm1(l)),
        f_prime=lambda l: 0.5 * jnp.sign(l),
        weight=None,
        log_weight=None,
        conjugate=_tv_conjugate,
        activation=lambda v: 0.5 * jnp.tanh(v),
        conjugate_activation=lambda v: 0.5 * jnp.tanh(v),
        categorical=lambda a, b, axis: 0.5 * jnp.sum(jnp.abs(jnp.exp(a) - jnp.exp(b)), axis=axis),
    ),
    "softened_reverse_kl": _Generator(
        f=lambda l: (1.0 + _exp(l)) * _L(-l),
        f_prime=lambda l: _L(-l) - _exp(-l),
        weight=lambda l: jax.nn.sigmoid(-l),
        log_weight=lambda l: -_sp(l),
        conjugate=_srkl_conjugate,
        activation=lambda v: _L(-v) - _exp(-v),
        conjugate_activation=lambda v: -1.0 - _L(-v),
        categorical=_srkl_categorical,
    ),
    "alpha": _Generator(
        f=_alpha_f,
        f_prime=lambda l, alpha: jnp.expm1((alpha - 1.0) * l) / (alpha - 1.0),
        weight=lambda l, alpha: _exp(alpha * l),
        log_weight=lambda l, alpha: alpha * l,
        conjugate=_alpha_conjugate,
        activation=_alpha_activation,
        conjugate_activation=_alpha_conjugate_activation,
        params=("alpha",),
        categorical=_alpha_categorical,
    ),
}


def names() -> tuple[str, ...]:
    """Every registered f-divergence name, in registration order (the table above)."""
    return tuple(_REGISTRY)


def _validate(name: str, params: dict) -> tuple[tuple[str, float], ...]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown f-divergence {name!r}; valid names: {', '.join(names())}")
    expected = _REGISTRY[name].params
    if set(params) != set(expected):
        wanted = ", ".join(expected) if expected else "no parameters"
        raise ValueError(f"f-divergence {name!r} takes {wanted}; got {sorted(params) or 'none'}")
    clean = {}
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name}: {key} must be a real Python number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name}: {key} must be finite, got {value}")
        clean[key] = value
    if name == "alpha" and clean["alpha"] in (0.0, 1.0):
        raise ValueError(
            "alpha: alpha must differ from 0 and 1 (use 'reverse_kl' for alpha -> 0 and "
            f"'forward_kl' for alpha -> 1); got {clean['alpha']}"
        )
    return tuple(sorted(clean.items()))


def _as_float(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class FDivergence:
    """One f-divergence: a name and its (static) parameters; hashable, so usable as a static
    jit argument. All methods are elementwise on arrays; `f`, `f_prime`, `weight` and
    `log_weight` take log_r = log p - log q, `conjugate` takes t and the activations take the
    raw critic output v."""

    name: str
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "params", _validate(self.name, dict(self.params)))

    @property
    def _gen(self) -> _Generator:
        return _REGISTRY[self.name]

    def _call(self, fn, x):
        return fn(_as_float(x), **dict(self.params))

    @property
    def has_weight(self) -> bool:
        return self._gen.weight is not None

    def f(self, log_r):
        """f(r) at r = exp(log_r)."""
        return self._call(self._gen.f, log_r)

    def f_prime(self, log_r):
        """f'(r) (d f / d r, not d f / d log_r)."""
        return self._call(self._gen.f_prime, log_r)

    def _weight_fn(self, which: str) -> Callable:
        fn = getattr(self._gen, which)
        if fn is None:
            raise ValueError(
                f"{self.name} has no weight h(r) = r^2 f''(r): its generator is piecewise "
                "linear (f'' = 0 almost everywhere), so score-difference distillation is "
                f"undefined; use one of {', '.join(n for n in names() if n != self.name)}"
            )
        return fn

    def weight(self, log_r):
        """h(r) = r^2 f''(r), the f-distill weight on (s_q - s_p)."""
        return self._call(self._weight_fn("weight"), log_r)

    def log_weight(self, log_r):
        """log h(r), finite for every finite log_r (normalise batches with logsumexp)."""
        return self._call(self._weight_fn("log_weight"), log_r)

    def conjugate(self, t):
        """Fenchel conjugate f*(t) = sup_u t u - f(u); +inf outside dom f*."""
        return self._call(self._gen.conjugate, t)

    def activation(self, v):
        """f-GAN output activation g: R -> dom f*."""
        return self._call(self._gen.activation, v)

    def conjugate_activation(self, v):
        """f*(g(v)) in a closed form that stays finite where g(v) approaches dom f*'s edge."""
        return self._call(self._gen.conjugate_activation, v)

    def categorical(self, log_p, log_q, axis=-1):
        """D_f(p || q) = sum_k q_k f(p_k / q_k) over `axis` from floating log-probabilities
        (p the target): the entry's closed categorical form, else `categorical_generic`."""
        form = self._gen.categorical
        if form is None:
            return categorical_generic(self, log_p, log_q, axis)
        return form(log_p, log_q, axis, **dict(self.params))


def get(name: str, **params) -> FDivergence:
    """The f-divergence `name` with its parameters, e.g. get("alpha", alpha=0.5).

    Raises ValueError for an unknown name or a missing, extra, non-finite or invalid
    parameter, listing the valid choices."""
    return FDivergence(name, tuple(params.items()))


def resolve(divergence: FDivergence | str, **params) -> FDivergence:
    """An FDivergence from an FDivergence (returned as is) or a name (with params)."""
    if isinstance(divergence, FDivergence):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with an FDivergence instance")
        return divergence
    if isinstance(divergence, str):
        return get(divergence, **params)
    raise ValueError(f"expected an FDivergence or one of {names()}, got {divergence!r}")


__all__ = ["FDivergence", "LOG2", "categorical_generic", "get", "names", "resolve"]
