"""BD-KD: balanced forward/reverse KL for online knowledge distillation, on logits.

Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation",
arXiv 2212.12965. In online KD the teacher and the student are trained together. BD-KD keeps
the student's distillation term student-centred: per sample it mixes

    forward KL  KL(p_t || p_s)   mass-covering: spreads the student, lowers its confidence
    reverse KL  KL(p_s || p_t)   mode-seeking: sharpens the student, raises its confidence

with weights chosen by the entropy gap between the two predictions, so that the term which
moves the student's confidence towards the teacher's dominates:

    H_t > H_s (student over-confident):   w_fwd = high, w_rev = low
    H_s > H_t (student under-confident):  w_fwd = low,  w_rev = high
    equal entropies:                      w_fwd = w_rev = low

    student loss  = T^2 [w_fwd KL(p_t || p_s) + w_rev KL(p_s || p_t)]
    teacher term  = T^2 KL(p_s || p_t), trained with respect to the teacher

with p_t = softmax(v / T), p_s = softmax(z / T). The weights are not differentiated.

Sources and what is unverified: the paper body was not readable. The entropy-gap rule and
the reverse-KL teacher regulariser come from the abstract and a third-party summary; the
values high = 3, low = 1 come from a public re-implementation (ABKD's ``bdkd``; another copy
of it uses 2), which computes the entropies at T = 1 and has no teacher term. Which direction
"reverse KL" has for the teacher is not stated beyond the summary's notation
(FKL = KL(p^t || p^s), RKL = KL(p^s || p^t)); read with that notation, the teacher is pulled
towards the student by KL(p_s || p_t), which is what :func:`bdkd_teacher_loss` computes. The
T^2 factor is Hinton's scale correction (a no-op at T = 1); the entropies are taken at the
same temperature as the losses. Library convention (docs/design.md, section 1): p = teacher is the
target, q = student the model, log_r = log p_t - log p_s; KL(p_t || p_s) is the registry's
``forward_kl`` and KL(p_s || p_t) its ``reverse_kl``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from didistill.divergences.categorical import categorical_from_log_probs

__all__ = [
    "entropy_balance_weights",
    "bdkd_student_loss",
    "bdkd_teacher_loss",
    "bdkd_online_loss",
]


def _log_probs(logits: jax.Array, temperature: float, axis: int) -> jax.Array:
    logits = jnp.asarray(logits)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32
    return jax.nn.log_softmax(logits / temperature, axis=axis)


def _forward_and_reverse_kl(log_t, log_s, axis):
    """(KL(p_t || p_s), KL(p_s || p_t)): the registry's forward_kl and reverse_kl, p = p_t."""
    forward = categorical_from_log_probs("forward_kl", log_t, log_s, axis=axis)
    reverse = categorical_from_log_probs("reverse_kl", log_t, log_s, axis=axis)
    return forward, reverse


def _entropy(log_p: jax.Array, axis: int) -> jax.Array:
    finite = log_p > -jnp.inf
    safe = jnp.where(finite, log_p, 0.0)
    return -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=axis)


def entropy_balance_weights(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    high: float = 3.0,
    low: float = 1.0,
    axis: int = -1,
) -> tuple[jax.Array, jax.Array]:
    """Per-sample BD-KD weights (w_fwd, w_rev) from the teacher/student entropy gap.

    Args:
      student_logits: ``[..., V]`` student logits z.
      teacher_logits: ``[..., V]`` teacher logits v.
      temperature: T; entropies are of softmax(logits / T).
      high: weight of the favoured direction (3 in the public re-implementation).
      low: weight of the other direction (1).
      axis: class axis.

    Returns:
      ``(w_fwd, w_rev)``, each ``[...]``: w_fwd = high where H(p_t) > H(p_s), w_rev = high
      where H(p_s) > H(p_t), ``low`` elsewhere. Gradients are stopped.
    """
    h_s = _entropy(_log_probs(student_logits, temperature, axis), axis)  # [...]
    h_t = _entropy(_log_probs(teacher_logits, temperature, axis), axis)  # [...]
    w_fwd = jnp.where(h_t > h_s, high, low)
    w_rev = jnp.where(h_s > h_t, high, low)
    return jax.lax.stop_gradient(w_fwd), jax.lax.stop_gradient(w_rev)


def bdkd_student_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    high: float = 3.0,
    low: float = 1.0,
    axis: int = -1,
) -> jax.Array:
    """Student term T^2 [w_fwd KL(p_t || p_s) + w_rev KL(p_s || p_t)], per sample.

    The gradient reaches both arguments; in online KD pass ``stop_gradient(teacher_logits)``
    (or use :func:`bdkd_online_loss`). Add the cross-entropy on labels separately.

    Args:
      student_logits: ``[..., V]`` student logits z.
      teacher_logits: ``[..., V]`` teacher logits v.
      temperature, high, low, axis: as in :func:`entropy_balance_weights`.

    Returns:
      ``[...]`` loss per sample (reduce with a mean over the batch).
    """
    log_s = _log_probs(student_logits, temperature, axis)  # [..., V]
    log_t = _log_probs(teacher_logits, temperature, axis)  # [..., V]
    w_fwd, w_rev = entropy_balance_weights(
        student_logits, teacher_logits, temperature=temperature, high=high, low=low, axis=axis
    )
    forward, reverse = _forward_and_reverse_kl(log_t, log_s, axis)  # [...] each
    return temperature**2 * (w_fwd * forward + w_rev * reverse)


def bdkd_teacher_loss(
    teacher_logits: jax.Array,
    student_logits: jax.Array,
    *,
    temperature: float = 1.0,
    axis: int = -1,
) -> jax.Array:
    """Teacher regulariser T^2 KL(p_s || p_t), per sample (unverified direction, see module).

    Minimised with respect to the teacher, it makes the teacher cover the student's modes.
    Stop the student's gradient at the call site (or use :func:`bdkd_online_loss`).

    Args:
      teacher_logits: ``[..., V]`` teacher logits v (the argument being trained).
      student_logits: ``[..., V]`` student logits z.
      temperature: T.
      axis: class axis.

    Returns:
      ``[...]`` loss per sample.
    """
    log_s = _log_probs(student_logits, temperature, axis)
    log_t = _log_probs(teacher_logits, temperature, axis)
    # KL(p_s || p_t) is the registry's reverse_kl with p = p_t (here differentiated in v).
    return temperature**2 * categorical_from_log_probs("reverse_kl", log_t, log_s, axis=axis)


def bdkd_online_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    high: float = 3.0,
    low: float = 1.0,
    teacher_weight: float = 1.0,
    axis: int = -1,
) -> jax.Array:
    """Both BD-KD distillation terms with the right gradient stops, for one joint update.

    Returns ``student_term(z, sg(v)) + teacher_weight * teacher_term(sg(z), v)``, so a single
    ``jax.grad`` over (student params, teacher params) gives each network its own BD-KD
    gradient. Cross-entropy terms on the labels are added by the caller.

    Args:
      student_logits, teacher_logits: ``[..., V]`` logits z and v.
      temperature, high, low, axis: as in :func:`bdkd_student_loss`.
      teacher_weight: multiplier of the teacher regulariser.

    Returns:
      ``[...]`` per-sample sum of the two terms.
    """
    student_term = bdkd_student_loss(
        student_logits,
        jax.lax.stop_gradient(teacher_logits),
        temperature=temperature,
        high=high,
        low=low,
        axis=axis,
    )
    teacher_term = bdkd_teacher_loss(
        teacher_logits, jax.lax.stop_gradient(student_logits), temperature=temperature, axis=axis
    )
    return student_term + teacher_weight * teacher_term
