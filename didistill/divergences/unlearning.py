"""Unlearning with only the forget data: FLAT, and the NPO baseline.

FLAT (Wang, Wei, Liu, Pang, Liu, Shah, Bao, Liu, Wei, "LLM Unlearning via Loss Adjustment with
Only Forget Data", ICLR 2025, arXiv 2410.11143; code github.com/UCSC-REAL/FLAT). For each forget
prompt x there is the answer to forget y_f and a template (refusal, "I don't know") answer y_e.
FLAT maximises an f-divergence between the template distribution and the forget distribution
through its variational (f-GAN) form, with the model's own score of an answer as the critic:

    L_FLAT(theta) = -g(V_theta(x, y_e)) + f*(g(V_theta(x, y_f))),

    V_theta(x, y) = (1/|y|) sum_t pi_theta(y_t | x, y_<t)      (mean token PROBABILITY)

with (g, f*) the divergence's activation and conjugate. Minimising L over theta maximises the
bound E_p[g(V)] - E_q[f*(g(V))] <= D_f(p || q), p the template answers, q the forget answers:
in the library's convention (p target, q model, D_f(p || q) = E_q[f(p/q)]) the template plays
the target p and the forget answers q, and the loss is exactly minus
`estimators.variational_bound(div, critic_p=V(x, y_e), critic_q=V(x, y_f))`. Its gradient

    grad L = -g'(V_e) grad V_e + (f* o g)'(V_f) grad V_f

is a pair of importance weights (`flat_weights`): learn the template with weight g'(V_e),
forget the answer with weight (f* o g)'(V_f) = u*(g(V_f)) g'(V_f) >= 0. Every activation of
the registry is increasing, so for every registered divergence FLAT raises the template and
lowers the forget answer; no retain data, no reference model. Since the critic lives in [0, 1]
the infimum over an unconstrained model is -g(1) + f*(g(0)): template probability 1.

Mapping to the reference code (UCSC-REAL/FLAT @ bf2ef07, dataloader.py, loss type "cl"; the
transcription is tests/test_unlearning.py). The formulas here come from that code and the
paper's abstract; the paper body was not readable when this was written:
  - critic: `ProbLossStable` is NLLLoss on softmax outputs, i.e. minus the token probability,
    so the critic is a mean of probabilities, not of log-probabilities (`critic="prob"` here;
    "log_prob" and "sequence_log_prob" are offered as alternatives, not in the paper).
  - reverse KL and squared Hellinger: the reference's activations are -exp(v) and
    1 - exp(v) where f-GAN's are -exp(-v) and 1 - exp(-v). The reference equals the library's
    pair at critic -V (tested), which is decreasing in V: its loss RAISES the forget answer and
    lowers the template. Neyman chi^2: activation 1 - exp(v) on the template likewise, and the
    conjugate 2 - 2 sqrt(1 - t) applied to the raw forget critic (no activation), so only its
    forget half goes the right way. DEVIATION: the registry's increasing pairs are used.
  - Jensen-Shannon: the reference uses f-GAN's 2 x JS pair; the library's is half of it.
    Squared Hellinger: the reference's (sqrt(u) - 1)^2 is twice the library's 1 - sqrt(u)
    up to a linear term. KL, Pearson chi^2 and total variation agree exactly.
  - Jeffreys: the reference uses t + t^2/4 + t^3/16, the third-order Taylor polynomial at 0 of
    the exact conjugate; the registry's exact (Lambert W) conjugate is used here.
  - reduction: the reference averages token probabilities over every position of the padded
    [B, T] batch (prompt and padding count as 0) and applies g and f* to that batch scalar.
    DEVIATION: here V is per example, normalised by its number of answer tokens, and g, f*
    are applied per example (the bound's expectations, and independent of padding length); the
    two coincide for one unpadded example (tested).
  - the registry's softened_reverse_kl and alpha have no counterpart in the reference.

NPO (Zhang, Lin, Bai, Mei, "Negative Preference Optimization", 2024), the reference-model
baseline FLAT compares with: (2/beta) softplus(beta (log pi_theta(y_f|x) - log pi_ref(y_f|x)))
with sequence (summed) log-probabilities, beta = 0.1 (reference dataloader.py lines 52, 144-146).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from didistill.divergences.f_divergences import FDivergence, resolve

__all__ = ["CRITICS", "flat_critic", "flat_infimum", "flat_loss", "flat_weights", "npo_loss"]

CRITICS = ("prob", "log_prob", "sequence_log_prob")


def _as_float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def flat_critic(token_log_probs: jax.Array, mask: jax.Array | None = None, critic: str = "prob"):
    """The critic V(x, y) from per-token log-probabilities of one answer per example.

    Args:
      token_log_probs: ``[..., T]`` log pi_theta(y_t | x, y_<t) of the answer's tokens.
      mask: ``[..., T]`` 1 on answer tokens, 0 on padding; None: every position counts.
      critic: "prob" (FLAT: mean token probability, in [0, 1]), "log_prob" (mean token
        log-probability) or "sequence_log_prob" (summed log-probability).

    Returns:
      ``[...]`` V per example.
    """
    if critic not in CRITICS:
        raise ValueError(f"unknown FLAT critic {critic!r}; valid: {', '.join(CRITICS)}")
    lp = _as_float(token_log_probs)
    m = jnp.ones_like(lp) if mask is None else (jnp.asarray(mask) > 0).astype(lp.dtype)
    values = jnp.exp(lp) if critic == "prob" else lp
    total = jnp.sum(jnp.where(m > 0, values, 0.0), axis=-1)  # [...]
    if critic == "sequence_log_prob":
        return total
    return total / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def flat_loss(
    template_log_probs: jax.Array,
    forget_log_probs: jax.Array,
    *,
    divergence: FDivergence | str = "total_variation",
    template_mask: jax.Array | None = None,
    forget_mask: jax.Array | None = None,
    critic: str = "prob",
    **params,
) -> jax.Array:
    """FLAT loss -g(V_e) + f*(g(V_f)) per forget example (module docstring); minimise its mean.

    The batch mean equals ``-variational_bound(div, V_e, V_f)``. For one-token answers pass
    ``[B, 1]`` log-probabilities (then V_prob is the answer's probability).

    Args:
      template_log_probs: ``[B, T_e]`` per-token log pi_theta of the template answer y_e.
      forget_log_probs: ``[B, T_f]`` per-token log pi_theta of the forget answer y_f.
      divergence: registry name or FDivergence; the paper's default is total variation.
      template_mask, forget_mask: ``[B, T]`` answer-token masks (None: all tokens).
      critic: see :func:`flat_critic`.
      **params: generator parameters (``alpha`` for "alpha").

    Returns:
      ``[B]`` loss per forget example.
    """
    fdiv = resolve(divergence, **params)
    v_e = flat_critic(template_log_probs, template_mask, critic)  # [B]
    v_f = flat_critic(forget_log_probs, forget_mask, critic)  # [B]
    return -fdiv.activation(v_e) + fdiv.conjugate_activation(v_f)


def flat_weights(template_critic, forget_critic, divergence: FDivergence | str, **params):
    """Importance weights of FLAT's gradient on V_e and V_f (module docstring).

    Args:
      template_critic: ``[...]`` V(x, y_e).
      forget_critic: ``[...]`` V(x, y_f).

    Returns:
      (``[...]`` g'(V_e), the weight on learning the template,
       ``[...]`` (f* o g)'(V_f), the weight on forgetting the answer); both >= 0.
    """
    fdiv = resolve(divergence, **params)
    slope = lambda fn, v: jax.vmap(jax.grad(fn))(jnp.ravel(v)).reshape(jnp.shape(v))
    v_e, v_f = _as_float(template_critic), _as_float(forget_critic)
    return slope(fdiv.activation, v_e), slope(fdiv.conjugate_activation, v_f)


def flat_infimum(divergence: FDivergence | str, **params) -> jax.Array:
    """-g(1) + f*(g(0)): the FLAT loss at template probability 1 and forget probability 0,
    its infimum for the "prob" critic (both terms are monotone in V in [0, 1])."""
    fdiv = resolve(divergence, **params)
    return -fdiv.activation(jnp.float32(1.0)) + fdiv.conjugate_activation(jnp.float32(0.0))


def npo_loss(policy_logps, reference_logps, beta: float = 0.1) -> jax.Array:
    """NPO: (2/beta) softplus(beta (log pi_theta - log pi_ref)) per forget example.

    Args:
      policy_logps: ``[B]`` log pi_theta(y_f | x), summed over answer tokens.
      reference_logps: ``[B]`` log pi_ref(y_f | x) of the original model.
      beta: inverse temperature (0.1 in the FLAT reference code). As beta -> 0 the gradient
        tends to that of gradient ascent, grad log pi_theta(y_f | x).

    Returns:
      ``[B]`` loss.
    """
    log_ratio = _as_float(policy_logps) - _as_float(reference_logps)
    return 2.0 / beta * jax.nn.softplus(beta * log_ratio)
