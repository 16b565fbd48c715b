"""Image classifiers trained on labels: the KD teacher, the label-only student baseline, and
the feature network of the digits FID (method 'classifier').

A classifier (`didistill.nets.classifier`) is trained by `classifier_method` on a loss of its
logits (cross-entropy here; the KD loss in `didistill.distill.kd`) through the shared
supervised helper, with an EMA of the weights (decay min(ema_decay, (1 + t) / (10 + t)) at step
t), and evaluated on the train and test splits: accuracy, NLL (mean -log softmax(z)_y) and the
expected calibration error (`expected_calibration_error`). The classifier method writes
`workdir/classifier_params.msgpack` (a network file, arch 'classifier'). Per-step data: rows
(and optional pixel shifts) drawn by `np.random.default_rng([seed, shard, step])`
(`shifted_batches`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from didistill.data.images import load_arrays
from didistill.distill.teachers.supervised import supervised_method
from didistill.nets.classifier import CLASSIFIER_FILE, make_classifier, num_params
from didistill.nets.files import save_model
from didistill.train.method import Method


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


def _check(config) -> None:
    if config.data.max_shift < 0:
        raise ValueError(f"config.data.max_shift={config.data.max_shift} must be >= 0")
    if config.eval.num_bins < 1:
        raise ValueError(f"config.eval.num_bins={config.eval.num_bins} must be >= 1")


def classifier_method(config, loss_fn, extra_eval, on_evaluate=None) -> Method:
    """The shared method: a classifier trained by `loss_fn(logits, images, labels) -> (loss,
    metrics)`, evaluated on the test split; `extra_eval(test_logits, test)` adds results."""
    _check(config)
    net = make_classifier(config.net)
    train = load_arrays(config.data, "train")
    test = load_arrays(config.data, "test")

    def init_params(key):
        return net.init(key, jnp.zeros((1, *train["image"].shape[1:])))

    def objective(params, batch, key):
        logits = net.apply(params, batch["image"], train=True, rngs={"dropout": key})
        return loss_fn(logits, batch["image"], batch["label"])

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
        local = config.train.batch_size // jax.process_count()
        return shifted_batches(
            train, config.seed, local, start_step, jax.process_index(), config.data.max_shift
        )

    # EMA warm-up always: forget the initialisation quickly
    return supervised_method(
        config, init_params, objective, evaluate, batches, ema_warmup=True, has_aux=True
    )


def make_classifier_method(config) -> Method:
    """A classifier trained by cross-entropy on labels (`configs/digits_classifier.py`).

    `evaluate` reports train/test accuracy, NLL and ECE and writes `workdir/classifier_params
    .msgpack` (the EMA params, meta = net config, data and results), the KD teacher file."""

    def loss_fn(logits, images, labels):
        del images
        loss = cross_entropy(logits, labels)
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

    def save(params, results, workdir):
        path = os.path.join(workdir, CLASSIFIER_FILE)
        save_model(path, params, config.net, "classifier", data=config.data.name, eval=results)

    return classifier_method(config, loss_fn, lambda logits, test: {}, on_evaluate=save)


__all__ = [
    "classification_metrics",
    "classifier_method",
    "cross_entropy",
    "expected_calibration_error",
    "make_classifier_method",
    "shifted_batches",
]
