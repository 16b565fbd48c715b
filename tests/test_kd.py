"""Tests for the methods 'classifier' (distill.teachers.classifier) and 'kd' (distill.kd)."""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special
import scipy.stats
from scipy.spatial.distance import jensenshannon

from didistill.configs import digits_classifier, digits_kd
from didistill.distill import get_method, kd
from didistill.distill.teachers.classifier import (
    classification_metrics,
    expected_calibration_error,
    shifted_batches,
)
from didistill.divergences import names as f_names
from didistill.nets.classifier import CLASSIFIER_FILE, load_classifier
from didistill.train.loop import train

T = 2.0


def _softmax(logits, temperature=T):
    return scipy.special.softmax(np.asarray(logits, np.float64) / temperature, axis=-1)


def _kl(p, q):
    return np.sum(scipy.special.rel_entr(p, q), axis=-1)


def _ab(p, q, a, b):
    s = a + b
    return -np.sum(p**a * q**b - a / s * p**s - b / s * q**s, axis=-1) / (a * b)


# name -> (params, per-sample value from the softmaxes p (teacher), q (student)), by scipy/numpy
REFERENCE = {
    "forward_kl": ({}, lambda p, q: _kl(p, q)),
    "reverse_kl": ({}, lambda p, q: _kl(q, p)),
    "jensen_shannon": ({}, lambda p, q: jensenshannon(p, q, axis=-1) ** 2),
    "total_variation": ({}, lambda p, q: 0.5 * np.sum(np.abs(p - q), axis=-1)),
    "squared_hellinger": ({}, lambda p, q: 1.0 - np.sum(np.sqrt(p * q), axis=-1)),
    "jeffreys": ({}, lambda p, q: _kl(p, q) + _kl(q, p)),
    "pearson_chi2": ({}, lambda p, q: np.sum((p - q) ** 2 / q, axis=-1)),
    "neyman_chi2": ({}, lambda p, q: np.sum((p - q) ** 2 / p, axis=-1)),
    "softened_reverse_kl": ({}, lambda p, q: 2.0 * _kl((p + q) / 2, p)),
    "alpha": ({"alpha": 0.3}, lambda p, q: (np.sum(p**0.3 * q**0.7, -1) - 1) / (0.3 * -0.7)),
    "skew_kl": ({"alpha": 0.2}, lambda p, q: _kl(p, 0.2 * p + 0.8 * q)),
    "skew_reverse_kl": ({"alpha": 0.2}, lambda p, q: _kl(q, 0.2 * q + 0.8 * p)),
    "generalized_jsd": (
        {"beta": 0.3},
        lambda p, q: (0.3 * _kl(p, 0.3 * p + 0.7 * q) + 0.7 * _kl(q, 0.3 * p + 0.7 * q)) / 0.21,
    ),
    "alpha_beta": ({"alpha": 0.8, "beta": 0.3}, lambda p, q: _ab(p, q, 0.8, 0.3)),
}


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    student = 3.0 * rng.normal(size=(4, 5)).astype(np.float32)  # [B, K]
    teacher = 3.0 * rng.normal(size=(4, 5)).astype(np.float32)  # [B, K]
    return student, teacher


class TestKDLoss:
    def test_every_divergence_has_a_reference(self):
        assert set(REFERENCE) | {"bdkd", "sinkd"} == set(kd.KD_DIVERGENCES)
        assert set(f_names()) <= set(REFERENCE)

    @pytest.mark.parametrize("name", sorted(REFERENCE))
    def test_against_scipy(self, name, logits):
        student, teacher = logits
        params, reference = REFERENCE[name]
        p, q = _softmax(teacher), _softmax(student)
        expected = np.mean(reference(p, q))
        loss = kd.make_kd_loss(name, T, t2_scaling=False, **params)
        np.testing.assert_allclose(loss(student, teacher), expected, rtol=2e-4, atol=1e-6)
        scaled = kd.make_kd_loss(name, T, t2_scaling=True, **params)
        np.testing.assert_allclose(scaled(student, teacher), T**2 * expected, rtol=2e-4)

    def test_bdkd(self, logits):
        student, teacher = logits
        p, q = _softmax(teacher), _softmax(student)
        h_t, h_s = scipy.stats.entropy(p, axis=-1), scipy.stats.entropy(q, axis=-1)
        w_fwd, w_rev = np.where(h_t > h_s, 3.0, 1.0), np.where(h_s > h_t, 3.0, 1.0)
        expected = np.mean(w_fwd * _kl(p, q) + w_rev * _kl(q, p))
        loss = kd.make_kd_loss("bdkd", T, t2_scaling=False, high=3.0, low=1.0)
        np.testing.assert_allclose(loss(student, teacher), expected, rtol=2e-4)

    def test_sinkd_matches_the_published_loop(self, logits):
        student, teacher = logits
        s, t = _softmax(student), _softmax(teacher)
        cost = np.abs(s[:, None, :] - t[None, :, :]).sum(-1)  # [B, B]
        plan = np.exp(-cost / 0.1)
        for _ in range(20):  # rows, then columns, in kernel space
            plan = plan / plan.sum(1, keepdims=True)
            plan = plan / plan.sum(0, keepdims=True)
        expected = np.sum(plan * cost) / len(cost)  # per-sample scale: divided by B
        loss = kd.make_kd_loss("sinkd", T, t2_scaling=False, epsilon=0.1, num_iterations=20)
        np.testing.assert_allclose(loss(student, teacher), expected, rtol=1e-4)

    def test_hinton_gradient(self, logits):
        """grad_z T^2 mean_i KL(p_T || q_T) = T (q_T - p_T) / B; the teacher gets no gradient."""
        student, teacher = logits
        loss = kd.make_kd_loss("forward_kl", T, t2_scaling=True)
        grad_z, grad_v = jax.grad(loss, argnums=(0, 1))(jnp.asarray(student), teacher)
        expected = T * (_softmax(student) - _softmax(teacher)) / len(student)
        np.testing.assert_allclose(grad_z, expected, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(grad_v, 0.0)

    @pytest.mark.parametrize(
        "name,params,temperature,match",
        [
            ("kl", {}, 1.0, "valid: reverse_kl, forward_kl, .*bdkd, sinkd"),
            ("forward_kl", {"alpha": 0.5}, 1.0, "forward_kl"),
            ("alpha_beta", {"alpha": 0.5}, 1.0, "beta"),
            ("skew_kl", {"alpha": 2.0}, 1.0, r"\[0, 1\]"),
            ("sinkd", {"eps": 0.1}, 1.0, "epsilon, num_iterations"),
            ("forward_kl", {}, 0.0, "temperature"),
        ],
    )
    def test_bad_arguments(self, name, params, temperature, match):
        with pytest.raises(ValueError, match=match):
            kd.make_kd_loss(name, temperature, **params)


class TestMetrics:
    def test_ece_by_hand(self):
        probs = np.array([[0.9, 0.1], [0.12, 0.88], [0.62, 0.38], [0.3, 0.7]])
        labels = np.array([0, 0, 0, 1])
        # bins of width 1/15: the first two share bin 14 (0.867, 0.933]: acc 1/2, conf 0.89;
        # ECE = 2/4 |0.5 - 0.89| + 1/4 |1 - 0.62| + 1/4 |1 - 0.7| = 0.195 + 0.095 + 0.075
        assert expected_calibration_error(probs, labels) == pytest.approx(0.365)
        # one bin: |accuracy - mean confidence| = |0.75 - 0.775|
        assert expected_calibration_error(probs, labels, 1) == pytest.approx(0.025)
        assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0

    def test_classification_metrics(self, logits):
        student, _ = logits
        labels = np.array([0, 1, 2, 3])
        metrics = classification_metrics(student, labels)
        log_p = scipy.special.log_softmax(student.astype(np.float64), axis=-1)
        assert metrics["accuracy"] == np.mean(student.argmax(-1) == labels)
        assert metrics["nll"] == pytest.approx(-np.mean(log_p[np.arange(4), labels]), rel=1e-5)
        probs = np.exp(log_p)
        assert metrics["ece"] == pytest.approx(expected_calibration_error(probs, labels))


class TestFilesAndData:
    def test_missing_and_corrupt(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="--config=digits_classifier:teacher"):
            load_classifier(str(tmp_path / "nope.msgpack"))
        (tmp_path / "bad.msgpack").write_bytes(b"\x00garbage\xff" * 5)
        with pytest.raises(ValueError, match="not a readable classifier file"):
            load_classifier(str(tmp_path / "bad.msgpack"))

    def test_batches_resume_and_shift(self):
        image = -np.ones((1, 8, 8, 1), np.float32)
        image[0, 4, 4, 0] = 1.0  # one bright pixel, away from the border
        data = {"image": image, "label": np.array([7], np.int32)}
        stream = shifted_batches(data, 0, 64, max_shift=1)
        full = [b["image"] for b in itertools.islice(stream, 3)]
        resumed = shifted_batches(data, 0, 64, start_step=2, max_shift=1)
        np.testing.assert_array_equal(next(resumed)["image"], full[2])
        bright = np.argwhere(np.concatenate(full)[..., 0] == 1.0)  # [N, 3]: (row, y, x)
        assert len(bright) == 3 * 64  # the pixel survives every shift
        assert {(y, x) for _, y, x in bright} == {
            (4 + a, 4 + b) for a in (-1, 0, 1) for b in (-1, 0, 1)
        }
        plain = next(shifted_batches(data, 0, 5, max_shift=0))["image"]
        np.testing.assert_array_equal(plain, np.repeat(image, 5, axis=0))
        batch = next(shifted_batches(data, 0, 5, max_shift=1))
        assert batch["image"].shape == (5, 8, 8, 1) and batch["image"].dtype == np.float32
        np.testing.assert_array_equal(batch["label"], 7)


# ------------------------------------------------------------------------ methods end to end


def _configure(config, data_dir):
    config.data.data_dir = data_dir
    config.train.progress = False
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_dir):
    """A small MLP teacher trained by the 'classifier' method through the engine."""
    config = _configure(digits_classifier.get_config("teacher,smoke"), data_dir)
    config.net = digits_classifier.student_net()
    config.train.num_steps = 60
    workdir = str(tmp_path_factory.mktemp("teacher"))
    result = train(get_method(config), config, workdir)
    return config, workdir, result


def _kd_config(arg, data_dir, teacher_run):
    config = _configure(digits_kd.get_config(arg), data_dir)
    config.teacher.checkpoint = os.path.join(teacher_run[1], CLASSIFIER_FILE)
    return config


class TestClassifierMethod:
    def test_run_writes_eval_and_params(self, teacher_run):
        config, workdir, result = teacher_run
        results = result["eval"]
        assert results["test/accuracy"] > 0.5  # 60 steps; chance is 0.1
        for key in ("train/accuracy", "test/nll", "test/ece", "num_params"):
            assert np.isfinite(results[key])
        with open(os.path.join(workdir, "eval.json")) as f:
            assert json.load(f)["step"] == 60
        module, params, meta = load_classifier(os.path.join(workdir, CLASSIFIER_FILE))
        assert meta["net"]["widths"] == list(config.net.widths)
        assert meta["eval"]["test/accuracy"] == results["test/accuracy"]
        ema = result["state"].ema_params
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ema), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def student_state(data_dir, teacher_run):
    method = get_method(_kd_config("forward_kl,smoke", data_dir, teacher_run))
    return jax.jit(method.init)(jax.random.key(0))


class TestKDMethod:
    @pytest.mark.parametrize("name", kd.KD_DIVERGENCES)
    def test_step_under_jit(self, name, data_dir, teacher_run, student_state):
        config = _kd_config(f"{name},smoke", data_dir, teacher_run)
        method = kd.make_kd_method(config)
        batch = next(method.batches(0))
        assert batch["image"].shape == (config.train.batch_size, 8, 8, 1)
        new_state, metrics = jax.jit(method.step)(
            student_state, batch, jax.random.key(1), jnp.int32(0)
        )
        assert set(metrics) == {"loss", "grad_norm", "kd", "ce", "accuracy", "ema_decay"}
        assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
        assert float(metrics["grad_norm"]) > 0
        assert jax.tree.structure(new_state) == jax.tree.structure(student_state)

    def test_short_run_improves_the_student(self, data_dir, teacher_run, student_state, tmp_path):
        config = _kd_config("jensen_shannon,smoke", data_dir, teacher_run)
        config.train.num_steps = 60
        method = get_method(config)
        before = method.evaluate(student_state, jax.random.key(0), str(tmp_path / "init"))
        result = train(method, config, str(tmp_path / "run"))
        after = result["eval"]
        assert after["test/accuracy"] > before["test/accuracy"] + 0.2
        assert after["test/teacher_agreement"] > before["test/teacher_agreement"] + 0.2
        teacher_accuracy = teacher_run[2]["eval"]["test/accuracy"]
        assert after["teacher/test_accuracy"] == pytest.approx(teacher_accuracy)
        assert not os.path.exists(tmp_path / "run" / CLASSIFIER_FILE)  # students: no file


class TestConfigs:
    def test_classifier_configs(self):
        teacher = digits_classifier.get_config("teacher")
        student = digits_classifier.get_config("student")
        assert teacher.net.kind == "cnn" and student.net.kind == "mlp"
        assert teacher.method == student.method == digits_classifier.METHOD
        assert digits_classifier.get_config("student,smoke").train.num_steps < 100
        assert digits_classifier.get_config(None).net.kind == "cnn"

    @pytest.mark.parametrize("name", kd.KD_DIVERGENCES)
    def test_kd_config_defaults_are_valid(self, name):
        config = digits_kd.get_config(name)
        assert config.kd.divergence == name
        assert config.net == digits_classifier.get_config("student").net  # like for like
        kd.make_kd_loss(name, config.kd.temperature, **dict(config.kd.divergence_params))

    @pytest.mark.parametrize(
        "module,arg",
        [(digits_classifier, "tutor"), (digits_classifier, "teacher,fast"), (digits_kd, "kl")],
    )
    def test_bad_argument(self, module, arg):
        with pytest.raises(ValueError, match="config arg"):
            module.get_config(arg)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("kd.divergence", "kl", "valid: reverse_kl, forward_kl"),
        ("kd.temperature", 0.0, "temperature"),
        ("kd.divergence_params", ml_collections.ConfigDict({"alpha": 0.5}), "forward_kl"),
        ("kd.kd_weight", 0.0, "not both 0"),
        ("teacher.checkpoint", "/nonexistent/t.msgpack", "digits_classifier:teacher"),
        ("ema_decay", 1.0, "ema_decay"),
        ("data.max_shift", -1, "max_shift"),
    ],
)
def test_bad_kd_config(key, value, match, data_dir, teacher_run):
    config = _kd_config("forward_kl,smoke", data_dir, teacher_run)
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(ValueError, match=match):
        get_method(config)


class TestKDTable:
    @pytest.fixture(scope="class")
    def kd_table(self):
        import importlib.util

        path = os.path.join(os.path.dirname(__file__), "..", "experiments", "kd_table.py")
        spec = importlib.util.spec_from_file_location("kd_table", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def test_summary_table_and_plot(self, kd_table, tmp_path):
        runs = {
            kd_table.BASELINE: [{"test/accuracy": 0.9, "test/ece": 0.05, "test/nll": 0.3}],
            "alpha_beta": [
                {m: 0.8 for m in kd_table.METRICS},
                {m: 0.9 for m in kd_table.METRICS},
            ],
        }
        rows = kd_table.summarize(runs, {"test/accuracy": 0.99, "test/ece": 0.01})
        assert [r["name"] for r in rows] == [
            "teacher",
            "labels only",
            "alpha_beta(alpha=0.8, beta=0.3)",
        ]
        assert rows[2]["test/accuracy"] == pytest.approx(0.85)
        assert rows[2]["test/accuracy_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
        assert rows[1]["test/ece_std"] == 0.0
        table = kd_table.markdown(rows)
        assert "| alpha_beta(alpha=0.8, beta=0.3) | 2 | 85.00 ± 7.07 |" in table
        assert "| teacher | 1 | 99.00 ± 0.00 | 1.00 ± 0.00 | - | - |" in table
        assert os.path.getsize(kd_table.plot(rows, str(tmp_path / "t.png"))) > 0

    def test_end_to_end(self, kd_table, data_dir, teacher_run, tmp_path):
        teacher = os.path.join(teacher_run[1], CLASSIFIER_FILE)
        argv = ["--workdir", str(tmp_path), "--divergences", "reverse_kl", "--seeds", "1"]
        argv += ["--steps", "8", "--teacher", teacher, "--data_dir", data_dir, "--jax_cache", ""]
        # A subprocess, as users run it: the script sets JAX-wide options and runs many engine
        # runs, none of which should leak into the other tests of this pytest worker.
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        script = os.path.join(repo, "experiments", "kd_table.py")
        proc = subprocess.run(
            [sys.executable, script, *argv], cwd=repo, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(tmp_path / "results.json") as f:
            out = json.load(f)
        assert [row["name"] for row in out["table"]] == ["teacher", "labels only", "reverse_kl"]
        assert out["runs"]["reverse_kl"][0]["test/teacher_agreement"] >= 0
        for name in ("results.md", "results.json", "kd_table.png", "reverse_kl/seed0/eval.json"):
            assert os.path.getsize(tmp_path / name) > 0
        with pytest.raises(SystemExit):
            kd_table.main(["--divergences", "kl"])
