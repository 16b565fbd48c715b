"""Logit knowledge distillation of image classifiers, as two methods for the training engine.

`make_classifier_method` trains a classifier (`didistill.nets.classifier`) by cross-entropy on
labels: the KD teacher, or the label-only student baseline. `make_kd_method` distils a frozen
teacher classifier into a smaller student by minimising a divergence between their softened
predictions, p = softmax(v / T) (teacher logits v) and q = softmax(z / T) (student logits z):

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

Both methods keep an EMA of the weights, decay min(ema_decay, (1 + t) / (10 + t)) at step t,
and evaluate it on the train and test splits: accuracy, NLL (mean -log softmax(z)_y) and the
expected calibration error (`expected_calibration_error`); KD adds the student's top-1
agreement with the teacher. The classifier method writes `workdir/classifier_params.msgpack`
(`save_classifier`). Per-step data: rows (and optional pixel shifts) drawn by
`np.random.default_rng([seed, shard, step])` (`shifted_batches`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from didistill.divergences import categorical, categorical_names
from didistill.divergences.balanced import bdkd_student_loss
from didistill.divergences.transport import sinkd_loss
from didistill.nets.classifier import Classifier, make_classifier, num_params
from didistill.train.method import Method
from didistill.train.optim import apply_gradients, ema_update, make_optimizer
from didistill.train.params_io import load_params, save_params

CLASSIFIER_FILE = "classifier_params.msgpack"
_FORMAT = "didistill.classifier/1"
_TRAIN_TEACHER = "python -m didistill.main --config=configs/digits_classifier.py:teacher"


@flax.struct.dataclass
class ClassifierState:
    params: Any
    opt_state: Any
    ema_params: Any


# ----------------------------------------------------------------------------- losses, metrics


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


def cross_entropy(logits, labels):
    """Mean of -log softmax(logits)_y; logits [B, K], labels int [B]."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
    """Expected calibration error with `num_bins` equal-width confidence bins (Guo et al. 2017,
    "On Calibration of Modern Neural Networks"; Naeini et al. 2015).

    With confidence c_i = max_k probs_ik, prediction argmax_k probs_ik and correct_i = 1 if the
    prediction equals labels_i, bin m (m = 1..M) holds B_m = {i : c_i in ((m-1)/M, m/M]}
    (c_i = 0 goes to the first bin) and

        ECE = sum_m (|B_m| / N) |acc(B_m) - conf(B_m)| = (1/N) sum_m |sum_{B_m} (correct_i - c_i)|

    with acc and conf the bin means; empty bins contribute 0. probs [N, K], labels int [N].
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    conf = probs.max(axis=-1)  # [N]
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)  # [N]
    bins = np.clip(np.ceil(conf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)  # [N]
    gap = np.bincount(bins, weights=correct - conf, minlength=num_bins)  # [M]
    return float(np.sum(np.abs(gap)) / len(conf))


def classification_metrics(logits, labels, num_bins: int = 15) -> dict[str, float]:
    """{'accuracy', 'nll', 'ece'} of logits [N, K] against integer labels [N]."""
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)), np.float64)
    labels = np.asarray(labels)
    return {
        "accuracy": float(np.mean(log_probs.argmax(-1) == labels)),
        "nll": float(-np.mean(np.take_along_axis(log_probs, labels[:, None], -1))),
        "ece": expected_calibration_error(np.exp(log_probs), labels, num_bins),
    }


# ---------------------------------------------------------------------------- files and data


def save_classifier(path: str, params, meta: Mapping[str, Any]) -> str:
    """Writes classifier params and JSON-serialisable `meta` (with the 'net' config block) to
    one file, atomically (`didistill.train.params_io`)."""
    if "net" not in meta:
        raise ValueError("save_classifier: meta must hold the 'net' config of the classifier")
    return save_params(path, params, meta, _FORMAT)


def load_classifier(path: str) -> tuple[Classifier, Any, dict[str, Any]]:
    """(module, params, meta) of a file written by `save_classifier`:
    logits = module.apply(params, images). FileNotFoundError / ValueError say what to do."""
    how = f"Train one with: {_TRAIN_TEACHER} --workdir=DIR (it writes DIR/{CLASSIFIER_FILE})."
    params, meta = load_params(path, _FORMAT, "classifier", how)
    try:
        module = make_classifier(meta["net"])
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable classifier file (bad 'net' meta: {err})"
        ) from err
    return module, params, meta


def _data_dir(data_dir: str) -> str:
    return os.path.expanduser(
        data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    )


@functools.lru_cache(maxsize=8)
def _image_arrays(name: str, split: str, data_dir: str) -> dict[str, np.ndarray]:
    """{'image': float32 [N, H, W, C] in [-1, 1], 'label': int32 [N]} of one split, through
    `didistill.data.images` ('digits' is prepared into `data_dir` on first use, offline)."""
    from didistill.data import images  # tensorflow_datasets: imported only when data is needed

    return images.load_images(name, split, _data_dir(data_dir)).to_arrays()


def _digits_arrays(split: str, data_dir: str = "") -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 digits, fixed stratified 1500 'train' / 297 'test' split."""
    return _image_arrays("digits", split, data_dir)


def shifted_batches(
    data, seed: int, batch_size: int, start_step: int = 0, shard: int = 0, max_shift: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches {'image': [B, H, W, C], 'label': [B]} from `start_step` on. Batch `step`
    draws rows with replacement and, if `max_shift` > 0, integer translations in
    [-max_shift, max_shift]^2 (background -1 fills the border), all from
    `np.random.default_rng([seed, shard, step])`: resuming reproduces the stream exactly."""
    images, labels = np.asarray(data["image"]), np.asarray(data["label"])
    _, h, w, _ = images.shape
    s = int(max_shift)
    padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)
    step = int(start_step)
    while True:
        rng = np.random.default_rng([int(seed), int(shard), step])
        rows = rng.integers(0, len(labels), size=batch_size)  # [B]
        oy, ox = rng.integers(0, 2 * s + 1, size=(2, batch_size))  # [B] each
        ys = (oy[:, None] + np.arange(h))[:, :, None]  # [B, H, 1]
        xs = (ox[:, None] + np.arange(w))[:, None, :]  # [B, 1, W]
        yield {"image": padded[rows[:, None, None], ys, xs], "label": labels[rows]}
        step += 1


# ------------------------------------------------------------------------------------ methods


def _check(config) -> None:
    if config.train.batch_size % jax.process_count():
        raise ValueError(f"batch_size {config.train.batch_size} must divide by the hosts")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1), e.g. 0.99")
    if config.data.max_shift < 0:
        raise ValueError(f"config.data.max_shift={config.data.max_shift} must be >= 0")
    if config.eval.num_bins < 1:
        raise ValueError(f"config.eval.num_bins={config.eval.num_bins} must be >= 1")


def _build(config, loss_fn, extra_eval, on_evaluate=None) -> Method:
    """The shared method: a classifier trained by `loss_fn(logits, images, labels) -> (loss,
    metrics)`, evaluated on the test split; `extra_eval(test_logits, test)` adds results."""
    _check(config)
    net = make_classifier(config.net)
    optimizer = make_optimizer(config.optim)
    train = _image_arrays(config.data.name, "train", config.data.data_dir)
    test = _image_arrays(config.data.name, "test", config.data.data_dir)
    global_batch = config.train.batch_size

    def init(key):
        params = net.init(key, jnp.zeros((1, *train["image"].shape[1:])))
        return ClassifierState(params, optimizer.init(params), params)

    def step(state, batch, key, step):
        def objective(params):
            logits = net.apply(params, batch["image"], train=True, rngs={"dropout": key})
            return loss_fn(logits, batch["image"], batch["label"])

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        params, opt_state = apply_gradients(optimizer, state.params, state.opt_state, grads)
        t = jnp.asarray(step, jnp.float32)  # EMA warm-up: forget the initialisation quickly
        decay = jnp.minimum(config.ema_decay, (1.0 + t) / (10.0 + t))
        ema_params = ema_update(state.ema_params, params, decay)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        return ClassifierState(params, opt_state, ema_params), metrics

    def evaluate(state, key, workdir):  # eager: op-by-op kernels are shared by every run
        del key  # deterministic
        params = jax.device_get(state.ema_params)
        results = {"num_params": num_params(params)}
        for split, data in (("train", train), ("test", test)):
            logits = net.apply(params, data["image"])  # [N, K]
            for name, value in classification_metrics(
                logits, data["label"], config.eval.num_bins
            ).items():
                results[f"{split}/{name}"] = value
        results.update(extra_eval(logits, test))  # the test logits
        if on_evaluate is not None and jax.process_index() == 0:
            on_evaluate(params, results, workdir)
        return results

    def batches(start_step):
        local = global_batch // jax.process_count()
        return shifted_batches(
            train, config.seed, local, start_step, jax.process_index(), config.data.max_shift
        )

    return Method(init, step, evaluate, batches, global_batch)


def make_classifier_method(config) -> Method:
    """A classifier trained by cross-entropy on labels (`configs/digits_classifier.py`).

    `evaluate` reports train/test accuracy, NLL and ECE and writes `workdir/classifier_params
    .msgpack` (the EMA params, meta = net config, data and results), the KD teacher file."""

    def loss_fn(logits, images, labels):
        del images
        loss = cross_entropy(logits, labels)
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

    def save(params, results, workdir):
        meta = {"net": dict(config.net), "data": config.data.name, "eval": results}
        save_classifier(os.path.join(workdir, CLASSIFIER_FILE), params, meta)

    return _build(config, loss_fn, lambda logits, test: {}, on_evaluate=save)


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

    return _build(config, loss_fn, extra_eval)


__all__ = [
    "CLASSIFIER_FILE",
    "KD_DIVERGENCES",
    "ClassifierState",
    "classification_metrics",
    "cross_entropy",
    "expected_calibration_error",
    "load_classifier",
    "make_classifier_method",
    "make_kd_loss",
    "make_kd_method",
    "save_classifier",
    "shifted_batches",
]
