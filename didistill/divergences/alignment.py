"""Alignment objectives built on f-divergences: f-DPO, f-DPG and the DPH-RL penalty.

The direction trap. These papers put the MODEL in the ratio's numerator: with u = pi/ref
(pi the trained policy; ref the reference, target or initial policy) they write
D = E_ref[f_paper(u)]. The library (docs/design.md, section 1) puts the target on top:
p = ref is the target, q = pi the model, log_r = log p - log q = log ref - log pi = -log u,
D_f(p || q) = E_q[f(r)]. The two agree exactly when f_paper is the dual generator

    f_paper(u) = u f(1/u)        (E_ref[f_paper(pi/ref)] = E_pi[f(ref/pi)] = D_f(ref || pi))

and then the divergence names agree too: the papers' "reverse KL" (f_paper = u log u) is
KL(pi || ref), the library's ``reverse_kl`` (f = -log r); "forward KL" (f_paper = -log u, or
its self-normalised form u - 1 - log u) is KL(ref || pi), the library's ``forward_kl``; the
alpha family (u^(1-a) - (1-a) u - a) / (a (a - 1)) is the library's ``alpha`` with the same
alpha; the papers' JS, u log u - (u + 1) log((u + 1)/2), is 2x the library's
``jensen_shannon`` (which is self-dual). So every function below takes log_r in the library
convention (or the explicit log-probabilities, and forms log_r = log ref - log pi itself),
and a divergence name from the registry.

One function carries all three objectives. The derivative of the dual generator is

    phi(r) = f_paper'(u) |_{u = 1/r} = f(r) - r f'(r),      d phi / d log r = -r^2 f''(r),

i.e. minus the antiderivative, in log r, of the f-distill weight h(r) = r^2 f''(r).

- f-DPO (Wang et al., "Beyond Reverse KL", arXiv 2309.16240): the KKT conditions of
  max E[reward] - beta D_f(pi || ref) give reward = beta psi(u) + const, psi = f_paper' = phi,
  hence the preference loss -log sigmoid(beta [psi(u_w) - psi(u_l)]) (constants cancel).
  For reverse KL psi = log u and this is DPO (Rafailov et al. 2023) exactly.
- f-DPG (Go et al., "Aligning Language Models with Preferences through f-divergence
  Minimization", ICML 2023, arXiv 2302.08215): with p the target and pi_theta the policy,
  grad_theta D_f(p || pi_theta) = grad sum_x pi f(p/pi) = sum_x grad pi [f(r) - r f'(r)]
  = E_{x ~ pi}[phi(r(x)) grad log pi(x)]; the paper's pseudo-reward is -phi.
- DPH-RL (Li et al., arXiv 2509.07430): the penalty eta E_{y ~ pi_0}[sum_t f_paper(u_t)]
  with per-token u_t = pi_theta / pi_0 evaluated on responses pre-sampled from the initial
  policy pi_0 (the reference, so p = pi_0), which estimates D_f(pi_0 || pi_theta) per token.

Formulas for f-DPO and DPH-RL come from the authors' code (paper bodies were not readable);
the mapping above and phi are derived here and tested in tests/test_alignment.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from didistill.divergences.f_divergences import LOG2, FDivergence, resolve

__all__ = [
    "dual_derivative",
    "fdpo_psi",
    "fdpo_loss",
    "fdpg_pseudo_reward",
    "fdpg_loss",
    "dph_penalty_terms",
    "dph_penalty",
]


# phi(r) = f(r) - r f'(r) in closed form for the registry's generators (f_divergences.py);
# accurate for large |log_r| where the generic difference cancels catastrophically.
_PHI = {
    "reverse_kl": lambda lr, p: 1.0 - lr,
    "forward_kl": lambda lr, p: -jnp.exp(lr),
    "jensen_shannon": lambda lr, p: 0.5 * (LOG2 - jax.nn.softplus(lr)),
    "squared_hellinger": lambda lr, p: 1.0 - 0.5 * jnp.exp(0.5 * lr),
    "jeffreys": lambda lr, p: 1.0 - lr - jnp.exp(lr),
    "pearson_chi2": lambda lr, p: -jnp.expm1(2.0 * lr),
    "neyman_chi2": lambda lr, p: 2.0 * jnp.expm1(-lr),
    "total_variation": lambda lr, p: -0.5 * jnp.sign(lr),
    "softened_reverse_kl": lambda lr, p: 1.0 - LOG2 + jax.nn.softplus(-lr),
    "alpha": lambda lr, p: -jnp.expm1(p["alpha"] * lr) / p["alpha"],
}


def _as_float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dual_derivative(log_r: jax.Array, divergence: FDivergence | str, **params) -> jax.Array:
    """phi(r) = f(r) - r f'(r): the derivative of the dual generator u f(1/u) at u = 1/r.

    Closed forms for the registry's built-in names (the generic difference cancels
    catastrophically at large |log_r|); any other registered generator falls back to
    ``f(log_r) - exp(log_r) * f_prime(log_r)``.

    Args:
      log_r: ``[...]`` log p - log q (p target/reference, q model).
      divergence: registry name (e.g. ``"reverse_kl"``, ``"alpha"``) or an FDivergence.
      **params: generator parameters (``alpha`` for ``"alpha"``).

    Returns:
      ``[...]`` phi(exp(log_r)).
    """
    fdiv = resolve(divergence, **params)
    log_r = _as_float(log_r)
    if fdiv.name in _PHI:
        return _PHI[fdiv.name](log_r, dict(fdiv.params))
    return fdiv.f(log_r) - jnp.exp(log_r) * fdiv.f_prime(log_r)


def fdpo_psi(log_r: jax.Array, divergence: FDivergence | str = "reverse_kl", **params) -> jax.Array:
    """The f-DPO link psi(u), u = pi/ref = exp(-log_r), up to an additive constant.

    Equal to :func:`dual_derivative` minus a constant; the published cases (u = pi/ref):

    ================ ============================ =====================================
    name             psi here                     as published (f-DPO code)
    ================ ============================ =====================================
    reverse_kl       log u                        log u (DPO)
    forward_kl       -1/u                         -1/u
    jensen_shannon   (1/2) log(u/(1+u))           log(2u/(1+u)) for the 2x JS generator
    alpha (a)        -(u^(-a) - 1)/a              -u^(-a)/a, a in (0, 1)
    ================ ============================ =====================================

    The paper's JS link is twice this one, so its beta equals half of beta here. alpha -> 0
    gives log u (reverse KL) and alpha -> 1 gives 1 - 1/u (forward KL).

    Args:
      log_r: ``[...]`` log ref - log pi.
      divergence: registry name or FDivergence.
      **params: generator parameters.

    Returns:
      ``[...]`` psi.
    """
    fdiv = resolve(divergence, **params)
    log_r = _as_float(log_r)
    if fdiv.name == "reverse_kl":
        return -log_r  # exactly the DPO implicit reward log pi - log ref
    if fdiv.name == "forward_kl":
        return -jnp.exp(log_r)
    if fdiv.name == "jensen_shannon":
        return -0.5 * jax.nn.softplus(log_r)
    return dual_derivative(log_r, fdiv)


def fdpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    divergence: FDivergence | str = "reverse_kl",
    beta: float = 0.1,
    **params,
) -> jax.Array:
    """f-DPO loss -log sigmoid(beta [psi(u_w) - psi(u_l)]), per preference pair.

    u = pi(y|x) / ref(y|x) of the chosen (w) and rejected (l) responses; log_r = -log u is
    formed here as ``reference - policy``. With ``divergence="reverse_kl"`` this is the DPO
    loss -log sigmoid(beta [(log pi_w - log ref_w) - (log pi_l - log ref_l)]) bit for bit.

    Args:
      policy_chosen_logps: ``[B]`` log pi(y_w | x), summed over response tokens.
      policy_rejected_logps: ``[B]`` log pi(y_l | x).
      reference_chosen_logps: ``[B]`` log ref(y_w | x) (no gradient needed).
      reference_rejected_logps: ``[B]`` log ref(y_l | x).
      divergence: registry name of the regulariser D_f(pi || ref) in the papers' naming,
        which is the library's D_f(ref || pi) of the same name (module docstring).
      beta: regularisation strength (0.1 published; the paper's JS beta is half of it here).
      **params: generator parameters (``alpha`` in (0, 1) for ``"alpha"``: 0.3/0.5/0.7).

    Returns:
      ``[B]`` loss per pair.
    """
    fdiv = resolve(divergence, **params)
    psi_w = fdpo_psi(reference_chosen_logps - policy_chosen_logps, fdiv)
    psi_l = fdpo_psi(reference_rejected_logps - policy_rejected_logps, fdiv)
    return -jax.nn.log_sigmoid(beta * (psi_w - psi_l))


def fdpg_pseudo_reward(log_r: jax.Array, divergence: FDivergence | str, **params) -> jax.Array:
    """f-DPG pseudo-reward -phi(r) = r f'(r) - f(r), log_r = log p_target - log pi.

    Examples: forward_kl (DPG) p/pi; reverse_kl log(p/pi) - 1 (KL-regularised RL up to a
    constant when p is proportional to ref exp(reward / beta)).
    """
    return -dual_derivative(log_r, divergence, **params)


def fdpg_loss(
    policy_logps: jax.Array,
    target_logps: jax.Array,
    *,
    divergence: FDivergence | str,
    proposal_logps: jax.Array | None = None,
    baseline: float | jax.Array = 0.0,
    **params,
) -> jax.Array:
    """Surrogate whose gradient is an unbiased estimate of grad D_f(p || pi_theta).

    For samples x_i from a proposal q (q = pi_theta when ``proposal_logps`` is None):

        loss = mean_i[ sg(w_i) sg(phi(r_i) - b) log pi_theta(x_i) ],
        w_i = pi_theta(x_i) / q(x_i),   r_i = p(x_i) / pi_theta(x_i),

    and E_q[grad loss] = E_pi[phi(r) grad log pi] = grad D_f(p || pi_theta) exactly, for any
    constant baseline b (E_pi[grad log pi] = 0). The value of the loss is not the divergence.
    ``target_logps`` must be normalised, log p = log P - log Z (with an estimate of Z when
    only P is known; for forward KL a wrong Z only rescales the gradient).

    Args:
      policy_logps: ``[N]`` log pi_theta(x_i), differentiable in theta.
      target_logps: ``[N]`` log p(x_i).
      divergence: registry name; ``D_f(p || pi)`` as in the library convention (the paper's
        D_f(pi || p) with the dual generator; names agree, module docstring).
      proposal_logps: ``[N]`` log q(x_i) of the sampling distribution, or None (on-policy).
      baseline: constant (or stopped) baseline b subtracted from phi, e.g. a running mean.
      **params: generator parameters.

    Returns:
      ``[]`` surrogate loss.
    """
    policy_stopped = jax.lax.stop_gradient(policy_logps)
    phi = dual_derivative(target_logps - policy_stopped, divergence, **params)  # [N]
    advantage = jax.lax.stop_gradient(phi - baseline)
    if proposal_logps is None:
        weight = jnp.ones_like(policy_stopped)
    else:
        weight = jax.lax.stop_gradient(jnp.exp(policy_stopped - proposal_logps))
    return jnp.mean(weight * advantage * policy_logps)


def dph_penalty_terms(
    policy_logps: jax.Array,
    initial_logps: jax.Array,
    *,
    divergence: FDivergence | str = "forward_kl",
    log_ratio_clip: float | None = 20.0,
    **params,
) -> jax.Array:
    """Per-token DPH-RL penalty g(u) + f'(1) (u - 1), u = pi_theta / pi_0 = exp(-log_r).

    g(u) = u f(1/u) is the dual generator, so E_{pi_0}[g(u)] = D_f(pi_0 || pi_theta)
    (library convention, p = pi_0); the control variate f'(1) (u - 1) has mean 0 under pi_0
    and makes every term >= 0 (g minus its tangent at u = 1). For ``forward_kl`` this is the
    k3 estimator u - 1 - log u that DPH-RL uses; ``jensen_shannon`` is half of DPH-RL's
    "js" generator (double eta to match); ``alpha`` matches its alpha family (default 0.2).

    Args:
      policy_logps: ``[..., T]`` log pi_theta(y_t | x, y_<t) on tokens sampled from pi_0.
      initial_logps: ``[..., T]`` the stored log pi_0(y_t | x, y_<t) of the same tokens.
      divergence: registry name.
      log_ratio_clip: clip log_r to [-c, c] (DPH-RL clips the exponent at 20); None: off.
      **params: generator parameters.

    Returns:
      ``[..., T]`` non-negative per-token penalties.
    """
    fdiv = resolve(divergence, **params)
    log_r = _as_float(initial_logps - policy_logps)  # log p - log q, p = pi_0, q = pi_theta
    if log_ratio_clip is not None:
        log_r = jnp.clip(log_r, -log_ratio_clip, log_ratio_clip)
    u = jnp.exp(-log_r)
    slope_at_one = fdiv.f_prime(jnp.zeros((), log_r.dtype))  # f'(1)
    return u * fdiv.f(log_r) + slope_at_one * (u - 1.0)


def dph_penalty(
    policy_logps: jax.Array,
    initial_logps: jax.Array,
    *,
    divergence: FDivergence | str = "forward_kl",
    mask: jax.Array | None = None,
    log_ratio_clip: float | None = 20.0,
    **params,
) -> jax.Array:
    """DPH-RL divergence penalty per response: sum over tokens of :func:`dph_penalty_terms`.

    Its expectation over responses y ~ pi_0 is sum_t E[D_f(pi_0(.|y_<t) || pi_theta(.|y_<t))]
    (the per-token conditional divergences along pi_0's prefixes); for single-token responses
    it is D_f(pi_0 || pi_theta). Multiply by eta (DPH-RL: 0.01-0.05 for forward KL, 0.05-0.2
    for its 2x JS) and average over the near-perfect set.

    Args:
      policy_logps: ``[..., T]`` per-token log pi_theta.
      initial_logps: ``[..., T]`` per-token log pi_0.
      divergence: registry name.
      mask: ``[..., T]`` 1 for response tokens, 0 for padding; None: all tokens count.
      log_ratio_clip: as in :func:`dph_penalty_terms`.
      **params: generator parameters.

    Returns:
      ``[...]`` penalty per response.
    """
    terms = dph_penalty_terms(
        policy_logps,
        initial_logps,
        divergence=divergence,
        log_ratio_clip=log_ratio_clip,
        **params,
    )
    if mask is not None:
        terms = jnp.where(mask > 0, terms, 0.0)
    return jnp.sum(terms, axis=-1)
