"""Logit knowledge distillation of image classifiers (method 'kd').

The teacher is a classifier trained by method 'classifier' (`distill.teachers.classifier`).
`make_kd_method` distils that frozen teacher into a smaller student by minimising a divergence
between their softened predictions, p = softmax(v / T) (teacher logits v) and
q = softmax(z / T) (student logits z):

    L(z) = kd_weight * s(T) * mean_i D(p_i || q_i) + label_weight * mean_i CE(y_i, softmax(z_i))
    s(T) = T^2 if kd.t2_scaling else 1

Temperature (Hinton, Vinyals, Dean 2015, arXiv 1503.02531): both sides are softened by T and
the soft term is multiplied by T^2, because grad_z T^2 KL(p_T || q_T) = T (q_T - p_T), which
for large T and zero-mean logits is about (z - v) / K: the soft term then keeps its scale
against the hard-label term (taken at T = 1) as T changes. The argument is about KL; we apply
the same s(T) to every divergence so that T means one thing across a table. (Practice varies:
DistiLLM and TRL's GKD loss use no T^2; SinKD fixes T = 2.)

`kd.divergence` (p = teacher is the target, q = student the model; docs/design.md):
- every registered f-divergence D_f(p || q) = sum_k q_k f(p_k / q_k): forward_kl = KL(p || q)
  (mass-covering), reverse_kl = KL(q || p) (mode-seeking), jensen_shannon, total_variation,
  squared_hellinger, jeffreys, pearson_chi2, neyman_chi2, softened_reverse_kl, alpha;
- skew_kl = KL(p || a p + (1-a) q) and skew_reverse_kl = KL(q || a q + (1-a) p) (DistiLLM,
  Ko et al. 2024, arXiv 2402.03898), generalized_jsd (GKD, Agarwal et al. 2024, arXiv
  2306.13649; returned divided by beta (1 - beta), so beta = 0 / 1 are forward / reverse KL),
  alpha_beta (ABKD, Wang et al. 2025, arXiv 2505.04560): these and the f-divergences go
  through `didistill.divergences.categorical`, with `kd.divergence_params` as its keywords;
- bdkd (BD-KD, Amara et al. 2022, arXiv 2212.12965): per sample w_fwd KL(p || q) +
  w_rev KL(q || p), weights from the teacher/student entropy gap (`divergences.balanced`;
  params high, low);
- sinkd (SinKD, Cui et al. 2024, arXiv 2402.17110): the Sinkhorn transport cost between the B
  student and the B teacher distributions of a batch (`divergences.transport.sinkd_loss`;
  params epsilon, num_iterations), divided by B to put it on a per-sample scale (the
  published loss sums a plan of mass B).

The student is trained and evaluated like any classifier (`classifier_method`: EMA, accuracy,
NLL, ECE); KD adds the student's top-1 agreement with the teacher and the teacher's metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from didistill.distill.teachers.classifier import (
    classification_metrics,
    classifier_method,
    cross_entropy,
)
from didistill.divergences import categorical, categorical_names
from didistill.divergences.balanced import bdkd_student_loss
from didistill.divergences.transport import sinkd_loss
from didistill.nets.classifier import CLASSIFIER_FILE, load_classifier
from didistill.train.method import Method


def _sinkd_params(params: dict) -> dict:
    params["num_iterations"] = int(params.get("num_iterations", 20))  # static
    if not (params.get("epsilon", 0.1) > 0 and params["num_iterations"] >= 1):
        raise ValueError(f"sinkd needs epsilon > 0 and num_iterations >= 1: {params}")
    return params


# KD losses on a whole batch that are not per-sample categorical divergences: name ->
# (allowed params, validate(params) -> params, loss(z, v, T, **params) before the T^2 factor).
_BATCH_LOSSES = {
    "bdkd": (  # bdkd_student_loss applies T^2 itself
        ("high", "low"),
        dict,
        lambda z, v, t, **kw: jnp.mean(bdkd_student_loss(z, v, temperature=t, **kw)) / t**2,
    ),
    "sinkd": (
        ("epsilon", "num_iterations"),
        _sinkd_params,
        lambda z, v, t, **kw: sinkd_loss(z, v, temperature=t, **kw) / z.shape[0],
    ),
}
KD_DIVERGENCES = categorical_names() + tuple(_BATCH_LOSSES)


def _categorical_loss(divergence: str):
    """The `_BATCH_LOSSES` entry of a `categorical` divergence (f-divergence or logit-KD loss):
    the batch mean of D(p_i || q_i); its parameters are validated on a dummy pair."""

    def validate(params):  # raises the divergence's own errors
        categorical(divergence, jnp.zeros((1, 2)), jnp.zeros((1, 2)), **params)
        return params

    def loss(z, v, t, **params):
        return jnp.mean(categorical(divergence, v, z, temperature=t, **params))

    return None, validate, loss


def make_kd_loss(divergence: str, temperature: float = 1.0, t2_scaling: bool = True, **params):
    """A KD loss `loss(student_logits [B, K], teacher_logits [B, K]) -> scalar`: the batch mean
    of D(softmax(v / T) || softmax(z / T)) times T^2 (if `t2_scaling`), see the module
    docstring. The teacher's gradient is stopped. Raises ValueError for an unknown divergence
    (listing `KD_DIVERGENCES`), bad parameters, or T <= 0."""
    valid = categorical_names() + tuple(_BATCH_LOSSES)  # the live registries
    if divergence not in valid:
        raise ValueError(f"unknown KD divergence {divergence!r}; valid: {', '.join(valid)}")
    if not float(temperature) > 0:
        raise ValueError(f"KD temperature must be > 0, got {temperature}")
    t = float(temperature)
    scale = t**2 if t2_scaling else 1.0
    allowed, validate, per_batch = _BATCH_LOSSES.get(divergence) or _categorical_loss(divergence)
    if allowed is not None and set(params) - set(allowed):
        raise ValueError(f"{divergence} takes {', '.join(allowed)}; got {sorted(params)}")
    params = validate(params)

    def loss(student_logits, teacher_logits):  # [B, K], [B, K] -> []
        teacher_logits = jax.lax.stop_gradient(teacher_logits)
        return scale * per_batch(student_logits, teacher_logits, t, **params)

    return loss


def make_kd_method(config) -> Method:
    """Distils the frozen classifier at `config.teacher.checkpoint` into the student
    `config.net` with the loss of the module docstring (`configs/digits_kd.py`).

    `evaluate` reports the student's train/test accuracy, NLL and ECE, its top-1 agreement with
    the teacher on the test split and the teacher's own test metrics."""
    kd = config.kd
    try:
        kd_loss = make_kd_loss(
            kd.divergence, kd.temperature, kd.t2_scaling, **dict(kd.divergence_params)
        )
    except ValueError as err:
        raise ValueError(f"config.kd: {err}") from None
    if kd.kd_weight < 0 or kd.label_weight < 0 or kd.kd_weight + kd.label_weight == 0:
        raise ValueError(
            f"config.kd.kd_weight={kd.kd_weight} and label_weight={kd.label_weight} must be "
            ">= 0 and not both 0"
        )
    try:
        teacher, teacher_params, meta = load_classifier(config.teacher.checkpoint)
    except FileNotFoundError as err:
        raise ValueError(
            f"config.teacher.checkpoint: {err} Then pass --config.teacher.checkpoint="
            f"DIR/{CLASSIFIER_FILE}."
        ) from None
    data = meta.get("data", config.data.name)  # files written by hand may not say
    if teacher.num_classes != config.net.num_classes or data != config.data.name:
        raise ValueError(
            f"the teacher {config.teacher.checkpoint} was trained on {data!r} with "
            f"{teacher.num_classes} classes; the student on {config.data.name!r} with "
            f"config.net.num_classes={config.net.num_classes}"
        )

    def loss_fn(logits, images, labels):  # logits [B, K]
        teacher_logits = teacher.apply(teacher_params, images)  # [B, K], frozen
        soft = kd_loss(logits, teacher_logits)
        hard = cross_entropy(logits, labels)
        loss = kd.kd_weight * soft + kd.label_weight * hard
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, {"kd": soft, "ce": hard, "accuracy": accuracy}

    def extra_eval(logits, test):  # student logits [N, K] on the test split
        teacher_logits = np.asarray(teacher.apply(teacher_params, test["image"]))  # [N, K]
        agree = np.argmax(np.asarray(logits), -1) == np.argmax(teacher_logits, -1)  # [N]
        results = {"test/teacher_agreement": float(np.mean(agree))}
        metrics = classification_metrics(teacher_logits, test["label"], config.eval.num_bins)
        results.update({f"teacher/test_{k}": v for k, v in metrics.items()})
        return results

    return classifier_method(config, loss_fn, extra_eval)


__all__ = ["KD_DIVERGENCES", "make_kd_loss", "make_kd_method"]
