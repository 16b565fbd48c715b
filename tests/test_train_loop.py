"""The training engine in-process, with the dummy method: resume, preemption, NaN guard."""

import glob
import json
import logging
import os

import jax
import numpy as np
import pytest

from didistill.train import loop
from didistill.train.errors import ConfigError, NonFiniteError
from didistill.train.reporting import MetricsWriter
from didistill.train.validate import validate_config
from didistill.train.writers import comparable_metrics
from tests import dummy_method


def _config(num_steps=12, **dummy):
    config = dummy_method.load_config()
    config.train.num_steps = num_steps
    # test hooks that cannot change results (a resumed run may drop them): see workdir.py
    config.fingerprint_ignore = ("dummy.sigterm_at_step", "dummy.sleep_s")
    for key, value in dummy.items():
        config.dummy[key] = value
    return config


def _train(workdir, config):
    return loop.train(dummy_method.make_method(config), config, str(workdir))


_metrics = comparable_metrics  # metrics.jsonl without the timing keys


def _assert_same_tree(a, b):
    a, b = dummy_method.tree_arrays(a), dummy_method.tree_arrays(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _checkpoint_steps(workdir):
    names = os.listdir(os.path.join(workdir, loop.CHECKPOINT_DIR))
    return sorted(int(n) for n in names if n.isdigit())


@pytest.fixture
def warnings_log(caplog):
    """Warnings of the didistill loggers, even if a handler setup stopped their propagation."""
    root = logging.getLogger("didistill")
    root.addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING):
        yield caplog
    root.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run: log every 3 steps, checkpoints every 4, keep 2."""
    workdir = tmp_path_factory.mktemp("reference")
    result = _train(workdir, _config())
    return workdir, result


def test_comparable_metrics_leave_out_timing_and_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "loss": 0.5, "steps_per_sec": 3.0}\n{"step": 4, "loss": 0.25}\n{"step": 6, "lo'
    )
    assert _metrics(str(tmp_path)) == [{"step": 2, "loss": 0.5}, {"step": 4, "loss": 0.25}]


def test_uninterrupted_run_writes_the_run_directory(reference):
    workdir, result = reference
    assert result["step"] == 12 and not result["preempted"]
    lines = _metrics(workdir)
    assert [line["step"] for line in lines] == [3, 6, 9, 12]
    assert all(np.isfinite(line["loss"]) and line["nonfinite_total"] == 0 for line in lines)
    assert _checkpoint_steps(workdir) == [8, 12]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 12
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f) == {**result["eval"], "step": 12}
    assert result["eval"]["updates"] == 12
    assert os.path.exists(os.path.join(workdir, "weights.png"))


def test_preempted_run_resumes_bit_identically(reference, tmp_path):
    ref_dir, ref = reference
    # The batch of step index 6 sends SIGTERM: step 6 finishes, then the loop saves at 7, which
    # is in the middle of the log window 7..9, and returns.
    first = _train(tmp_path, _config(sigterm_at_step=6))
    assert first["preempted"] and first["step"] == 7 and first["eval"] is None
    assert _checkpoint_steps(tmp_path) == [4, 7]
    assert not os.path.exists(os.path.join(tmp_path, "eval.json"))

    second = _train(tmp_path, _config())
    assert second["step"] == 12 and not second["preempted"]
    assert _metrics(tmp_path) == _metrics(ref_dir)
    _assert_same_tree(second["state"], ref["state"])
    assert second["eval"] == ref["eval"]


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(reference, tmp_path, warnings_log):
    ref_dir, ref = reference
    _train(tmp_path, _config())
    assert _checkpoint_steps(tmp_path) == [8, 12]
    ckpt_dir = os.path.join(tmp_path, loop.CHECKPOINT_DIR)
    corrupted = {}
    for path in glob.glob(os.path.join(ckpt_dir, "12", "state", "**", "*"), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 4:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            with open(path, "rb") as f:
                corrupted[os.path.relpath(path, os.path.join(ckpt_dir, "12"))] = f.read()

    again = _train(tmp_path, _config())

    assert "checkpoint step 12" in warnings_log.text and "cannot be read" in warnings_log.text
    (aside,) = glob.glob(os.path.join(ckpt_dir, "corrupt_12_*"))
    for rel, data in corrupted.items():  # the corrupt data is moved, not lost
        with open(os.path.join(aside, rel), "rb") as f:
            assert f.read() == data
    assert _checkpoint_steps(tmp_path) == [8, 12]  # resumed from 8, saved 12 again
    assert _metrics(tmp_path) == _metrics(ref_dir)
    _assert_same_tree(again["state"], ref["state"])


def test_rerunning_a_finished_run_changes_nothing(reference):
    workdir, ref = reference
    before = _metrics(workdir)
    again = _train(workdir, _config())
    assert again["step"] == 12 and again["eval"] == ref["eval"]
    assert _metrics(workdir) == before
    _assert_same_tree(again["state"], ref["state"])


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    config = _config(num_steps=4, nan_steps=(2,))
    config.train.log_every = 1
    config.train.checkpoint_every = 3
    result = _train(tmp_path / "nan", config)
    lines = _metrics(tmp_path / "nan")
    assert [line["nonfinite_skipped"] for line in lines] == [0, 0, 1, 0]
    assert [line["nonfinite_consecutive"] for line in lines] == [0, 0, 1, 0]
    assert [line["nonfinite_total"] for line in lines] == [0, 0, 1, 1]
    assert lines[2]["loss"] is None and lines[3]["loss"] is not None
    assert int(result["state"]["updates"]) == 3  # the skipped step left the state as it was

    # After the skipped step (checkpoint 3) the state is exactly that of a run stopped before
    # it (same nan_steps in both, so both compile the same step function and round alike).
    method = dummy_method.make_method(config)
    _, after_skip = loop.load_checkpoint(method, config, str(tmp_path / "nan"), step=3)
    clean = _train(tmp_path / "clean", _config(num_steps=2, nan_steps=(2,)))
    _assert_same_tree(after_skip, clean["state"])


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_checkpoint(tmp_path):
    config = _config(nan_steps=tuple(range(4, 12)))
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    with pytest.raises(NonFiniteError, match="max_nonfinite_steps=3") as err:
        _train(tmp_path, config)
    message = str(err.value)
    assert "step 6" in message and "rerun the same command" in message
    assert _checkpoint_steps(tmp_path) == [4, 6]
    step, state = loop.load_checkpoint(dummy_method.make_method(config), config, str(tmp_path))
    assert step == 6 and int(state["updates"]) == 4  # good state of before the NaN steps
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_engine_config_errors_name_the_key():
    config = _config()
    config.train.batch_size = 0
    with pytest.raises(ConfigError, match=r"config.train.batch_size=0 is invalid"):
        validate_config(config, num_devices=1)
    config = _config()
    with pytest.raises(ConfigError, match=r"does not divide by the 3 devices.*batch_size=6 or 9"):
        validate_config(config, num_devices=3)
    config.mesh.data = 2
    with pytest.raises(ConfigError, match=r"config.mesh.data=2.*-1 \(all devices\) or 3"):
        validate_config(config, num_devices=3)
    config = _config()
    config.train.keep_period = -5
    with pytest.raises(ConfigError, match=r"config.train.keep_period=-5 is invalid"):
        validate_config(config, num_devices=1)


def test_metrics_writer_drops_lines_after_the_resume_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 3, "loss": 1.0}\n{"step": 6, "loss": 2.0}\n{"step": 9, "lo')
    writer = MetricsWriter(path, resume_step=6)
    writer.write(9, {"loss": float("nan"), "n": np.int32(2)})
    writer.close()
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    assert lines == [
        {"step": 3, "loss": 1.0},
        {"step": 6, "loss": 2.0},
        {"step": 9, "loss": None, "n": 2},
    ]
