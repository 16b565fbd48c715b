"""Fault injection (issue 16): each fault done for real; exit code, message, and that the final
results equal an undisturbed run (or that nothing was written). The long randomized version is
`make faults` (tests/faults/random_faults.py).

Root ignores chmod, so "cannot read" is simulated by patching the checkpoint reader
(`checkpoint._open_for_read`) to raise PermissionError, and "disk full" by patching the
metrics writer to raise ENOSPC (a small tmpfs needs mount rights the tests may not have).
"""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill import main
from didistill.train import checkpoint, loop, reporting, sharding, workdir
from didistill.train.checkpoint import Checkpointer
from didistill.train.errors import CheckpointError
from tests import dummy_method
from tests.faults import common


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The undisturbed 12-step dummy run (checkpoints 8 and 12, kept 2)."""
    path = tmp_path_factory.mktemp("faults_reference")
    return path, common.train(path, common.config())


def _copy_of_reference(reference, tmp_path):
    import shutil

    target = tmp_path / "run"
    shutil.copytree(reference[0], target)
    os.remove(target / loop.EVAL_FILE)
    return target


def _same_as_reference(run, reference, result=None):
    assert common.metrics(run) == common.metrics(reference[0])
    assert common.eval_json(run) == common.eval_json(reference[0])
    if result is not None:
        got = dummy_method.tree_arrays(result["state"])
        want = dummy_method.tree_arrays(reference[1]["state"])
        jax.tree.map(np.testing.assert_array_equal, got, want)


# ------------------------------------------------------------------ mismatched config


def test_other_config_stops_before_touching_anything_and_restart_moves_it_aside(
    reference, tmp_path
):
    run = _copy_of_reference(reference, tmp_path)
    before = common.snapshot(run)
    proc = common.run_main(run, "--config.optimizer.learning_rate=0.1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = common.error_lines(proc.stderr)
    assert "holds a run of a different config" in line
    assert "optimizer.learning_rate was 0.05, now 0.1" in line
    assert "another --workdir" in line and "--restart" in line
    assert "Traceback" not in proc.stderr
    assert common.snapshot(run) == before  # nothing written, nothing renamed

    proc = common.run_main(run, "--config.optimizer.learning_rate=0.1", "--restart")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (old,) = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert common.snapshot(tmp_path / old) == before  # moved, never deleted
    assert common.eval_json(run)["step"] == 12
    with open(run / workdir.RUN_FILE) as f:
        assert json.load(f)["config"]["optimizer.learning_rate"] == 0.1


def test_changes_that_cannot_change_results_are_allowed(reference, tmp_path):
    run = tmp_path / "run"
    common.train(run, common.config(num_steps=8))  # then extended to 12, logged differently
    result = common.train(run, common.config(num_steps=12, progress=True, keep_checkpoints=2))
    assert result["step"] == 12
    assert common.eval_json(run) == common.eval_json(reference[0])
    jax.tree.map(
        np.testing.assert_array_equal,
        dummy_method.tree_arrays(result["state"]),
        dummy_method.tree_arrays(reference[1]["state"]),
    )
    # the same lines, plus the end-of-run line the 8-step run wrote at step 8
    want = common.metrics(reference[0]).splitlines()
    assert [line for line in common.metrics(run).splitlines() if '"step": 8,' not in line] == want
    lower = common.config(num_steps=4)
    with pytest.raises(workdir.WorkdirMismatchError, match="train.num_steps was 12, now 4"):
        common.train(run, lower)


def test_teacher_file_contents_are_part_of_the_fingerprint(tmp_path):
    teacher = tmp_path / "teacher.bin"
    teacher.write_bytes(b"one")
    cfg = common.config(num_steps=0)
    cfg.teacher_file = str(teacher)
    workdir.check_fingerprint(cfg, str(tmp_path))
    teacher.write_bytes(b"two")
    with pytest.raises(workdir.WorkdirMismatchError, match="the file of teacher_file"):
        workdir.check_fingerprint(cfg, str(tmp_path))


# ------------------------------------------------------------------ checkpoints


def test_unreadable_checkpoint_stops_and_renames_nothing(reference, tmp_path, monkeypatch):
    run = _copy_of_reference(reference, tmp_path)
    before = common.snapshot(run)

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(checkpoint, "_open_for_read", denied)
    with pytest.raises(CheckpointError, match="cannot read checkpoint step 12.*Permission denied"):
        common.train(run, common.config())
    after = common.snapshot(run)
    assert {k: v for k, v in after.items() if k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"
    }  # metrics.jsonl not truncated, no corrupt_* directory


def test_bit_flip_in_array_data_is_set_aside_and_the_older_one_used(reference, tmp_path, caplog):
    run = _copy_of_reference(reference, tmp_path)
    common.flip_bit(common.array_files(run, 12)[0])
    logging_root = logging.getLogger("didistill")
    logging_root.addHandler(caplog.handler)
    try:
        result = common.train(run, common.config())
    finally:
        logging_root.removeHandler(caplog.handler)
    assert "does not match its SHA-256 checksum" in caplog.text
    assert "using checkpoint step 8 instead of step 12" in caplog.text
    assert [n for n in os.listdir(run / "checkpoints") if n.startswith("corrupt_12_")]
    _same_as_reference(run, reference, result)


def _write_checkpoint(run, step, transform):
    """Replaces checkpoint `step` of `run` by a properly saved (checksummed) altered copy."""
    cfg = common.config()
    method = dummy_method.make_method(cfg)
    mesh = sharding.mesh_from_config(cfg.mesh)
    abstract, _ = loop.state_shardings(method, cfg.seed, mesh, False)
    ckpt_dir = str(run / "checkpoints")
    with Checkpointer(ckpt_dir, 5) as ckpt:
        good = ckpt.restore(step, abstract)
    os.rename(os.path.join(ckpt_dir, str(step)), os.path.join(ckpt_dir, f"original_{step}"))
    method_state = dict(good.state.method_state)
    method_state["params"] = jax.tree.map(transform, method_state["params"])
    state = good.state._replace(method_state=method_state)
    with Checkpointer(ckpt_dir, 5) as ckpt:
        ckpt.save(step, state, good.meta)


def test_nan_filled_checkpoint_is_set_aside_and_the_older_one_used(reference, tmp_path):
    run = _copy_of_reference(reference, tmp_path)
    _write_checkpoint(run, 12, lambda x: jnp.full_like(x, jnp.nan))
    result = common.train(run, common.config())
    assert [n for n in os.listdir(run / "checkpoints") if n.startswith("corrupt_12_")]
    _same_as_reference(run, reference, result)


def test_nan_guard_falls_back_to_older_checkpoints(reference, tmp_path, caplog):
    """A finite checkpoint after which every step is non-finite is set aside in turn."""
    run = _copy_of_reference(reference, tmp_path)
    _write_checkpoint(run, 12, lambda x: jnp.full_like(x, 3e38))  # finite, overflows at once
    cfg = common.config(num_steps=16, log_every=1)
    cfg.train.checkpoint_every = 4
    logging_root = logging.getLogger("didistill")
    logging_root.addHandler(caplog.handler)
    try:
        result = common.train(run, cfg)
    finally:
        logging_root.removeHandler(caplog.handler)
    assert "every step after the checkpoint at step 12 was non-finite" in caplog.text
    assert [n for n in os.listdir(run / "checkpoints") if n.startswith("nonfinite_12_")]
    assert result["step"] == 16 and not result["preempted"]
    assert np.isfinite(result["eval"]["eval_mse"])


def test_no_usable_checkpoint_stops_instead_of_restarting_from_zero(reference, tmp_path):
    run = _copy_of_reference(reference, tmp_path)
    for step in (8, 12):
        common.flip_bit(common.array_files(run, step)[0])
    metrics_before = common.metrics(run)
    for _ in range(2):  # also on the rerun, once they are set aside
        with pytest.raises(CheckpointError, match="no usable checkpoint.*--restart"):
            common.train(run, common.config())
    assert common.metrics(run) == metrics_before
    assert not os.path.exists(run / loop.EVAL_FILE)


# ------------------------------------------------------------------ result files


def test_truncated_eval_json_is_regenerated_from_the_final_checkpoint(reference, tmp_path):
    run = _copy_of_reference(reference, tmp_path)
    text = json.dumps(common.eval_json(reference[0]))
    (run / loop.EVAL_FILE).write_text(text[: len(text) // 2])
    result = common.train(run, common.config())
    _same_as_reference(run, reference, result)
    assert [n for n in os.listdir(run) if n.startswith("eval.json.damaged-")]


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    reporting.write_json(str(path), {"a": 1})

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        reporting.write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["eval.json"]


def test_disk_full_while_training_then_resume_gives_the_same_run(reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = reporting.MetricsWriter.write

    def write(self, step, values):
        if step == 9:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        return original(self, step, values)

    monkeypatch.setattr(reporting.MetricsWriter, "write", write)
    with pytest.raises(OSError) as err:
        common.train(run, common.config())
    message = main._os_error_message(err.value)
    assert message.startswith("no space left on the device") and "metrics.jsonl" in message
    monkeypatch.setattr(reporting.MetricsWriter, "write", original)
    _same_as_reference(run, reference, common.train(run, common.config()))


def test_read_only_workdir_is_one_line_and_changes_nothing(reference, tmp_path):
    """Root ignores chmod: the child's writes under the workdir fail with EROFS, as on a file
    system mounted read-only (common.run_main_read_only)."""
    run = _copy_of_reference(reference, tmp_path)
    before = common.snapshot(run)
    for workdir_ in (run, tmp_path / "fresh"):
        if workdir_ != run:
            os.makedirs(workdir_)
        proc = common.run_main_read_only(workdir_)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        (line,) = common.error_lines(proc.stderr)
        assert line.startswith("didistill: error: read-only file system"), line
        assert str(workdir_) in line and "Use a writable --workdir" in line
    assert common.snapshot(run) == before
    assert os.listdir(tmp_path / "fresh") == []
    proc = common.run_main(run)  # writable again: the run finishes as if nothing happened
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_as_reference(run, reference)


def test_file_system_turning_read_only_mid_run_then_resume(reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = reporting.MetricsWriter.write

    def write(self, step, values):
        if step == 6:
            raise OSError(errno.EROFS, "Read-only file system", self.path)
        return original(self, step, values)

    monkeypatch.setattr(reporting.MetricsWriter, "write", write)
    with pytest.raises(OSError) as err:
        common.train(run, common.config())
    message = main._os_error_message(err.value)
    assert message.startswith("read-only file system") and "metrics.jsonl" in message
    assert not (run / workdir.LOCK_FILE).exists()
    monkeypatch.setattr(reporting.MetricsWriter, "write", original)
    _same_as_reference(run, reference, common.train(run, common.config()))


# ------------------------------------------------------------------ lock


def test_second_run_in_the_same_workdir_stops(tmp_path):
    run = tmp_path / "run"
    os.makedirs(run)
    with workdir.WorkdirLock(str(run)):
        with pytest.raises(workdir.WorkdirLockedError, match=f"in use by pid {os.getpid()}"):
            common.train(run, common.config())
        with pytest.raises(workdir.WorkdirLockedError):
            workdir.move_aside(str(run))
    (run / workdir.LOCK_FILE).write_text('{"pid": 999999, "host": "x", "started": "then"}\n')
    common.train(run, common.config(num_steps=3))  # a stale lock (no flock held) is taken over
    assert not (run / workdir.LOCK_FILE).exists()


def test_concurrent_starts_one_runs_one_stops(tmp_path):
    run = tmp_path / "run"
    args = common.main_args(run, "--config.dummy.sleep_s=0.3")
    procs = [
        subprocess.Popen(args, cwd=common.REPO, env=common.env(), stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], errors
    loser = errors[[p.returncode for p in procs].index(1)]
    (line,) = common.error_lines(loser)
    assert "is in use by pid" in line or "holds a run" in line
    assert common.eval_json(run)["step"] == 12


# ------------------------------------------------------------------ kill -9


def test_kill_9_at_a_random_step_then_resume_gives_the_same_run(reference, tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(int(time.time()))
    lines, extra_s = int(rng.integers(1, 4)), float(rng.uniform(0.0, 0.6))
    slow = "--config.dummy.sleep_s=0.2"  # one batch every 0.2 s: cannot change results
    proc = subprocess.Popen(
        common.main_args(run, slow), cwd=common.REPO, env=common.env(), stderr=subprocess.DEVNULL
    )
    metrics = run / loop.METRICS_FILE
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(extra_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = common.run_main(run, slow)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_as_reference(run, reference)


# ------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_during_evaluation_then_rerun_evaluates(reference, tmp_path):
    """SIGINT while `method.evaluate` runs: exit 130 with one line, no eval.json (nor a
    temporary file), the lock released; the rerun evaluates the final checkpoint."""
    run = tmp_path / "run"
    with common.children_handle_sigint():
        proc = subprocess.Popen(
            common.main_args(run),
            cwd=common.REPO,
            env=common.env(DIDISTILL_DUMMY_EVAL_SLEEP_S="120"),  # long, for loaded machines
            stderr=subprocess.PIPE,
            text=True,
        )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "evaluating at step 12" in line:
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest
    assert "Traceback" not in rest
    (line,) = common.error_lines(rest)
    assert "interrupted (Ctrl-C)" in line and "rerun the same command" in line
    names = os.listdir(run)
    assert loop.EVAL_FILE not in names and workdir.LOCK_FILE not in names
    assert not [n for n in names if ".tmp" in n]
    assert common.checkpoint_steps(run) == [8, 12]
    proc = common.run_main(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluating at step 12" in proc.stderr and "resuming from the checkpoint at step 12" in (
        proc.stderr
    )
    _same_as_reference(run, reference)


# ------------------------------------------------------------------ outside the repository


def test_runs_from_outside_the_repository(tmp_path):
    """From another directory: a shipped config by name (here a mistake in it, one line) and
    by path (a real toy run whose teacher is the shipped asset)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = common.env(PYTHONPATH=common.REPO)  # this checkout, as an editable install gives

    def main_(*args):
        return subprocess.run(
            [sys.executable, "-m", "didistill.main", *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    proc = main_("--config=toy2d:forward_kl,smoke", "--workdir=bad", "--config.generator.kind=x")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = common.error_lines(proc.stderr)
    assert "config.generator.kind='x' is invalid for the toy data" in line
    config_path = os.path.join(common.REPO, "didistill", "configs", "toy2d.py")
    proc = main_(
        f"--config={config_path}:forward_kl,smoke",
        "--workdir=run",
        "--config.train.num_steps=2",
        "--config.eval.num_samples=64",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((elsewhere / "run" / loop.CONFIG_FILE).read_text())
    assert os.path.isfile(config["teacher"]["checkpoint"])  # the shipped asset, found
    assert common.eval_json(elsewhere / "run")["step"] == 2
    assert sorted(os.listdir(elsewhere)) == ["run"]  # nothing written elsewhere


# ------------------------------------------------------------------ messages


TOY = "--config=toy2d:forward_kl,smoke"


def _bad_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case",
    [
        "workdir_is_a_file",
        "checkpoints_is_a_file",
        "empty_workdir",
        "config_syntax_error",
        "missing_teacher",
        "wrong_teacher",
        "generator_kind",
        "generator_kind_images",
        "eval_num_samples",
        "contradictory",
        "distributed_without_cluster",
    ],
)
def test_mistakes_are_one_line_naming_the_file_or_key(tmp_path, case):
    run = tmp_path / "run"
    config, flags, expect, code = common.DUMMY, [], [], 2
    if case == "workdir_is_a_file":
        run = _bad_file(tmp_path, "afile", "x")
        expect = ["is a file, not a directory", "afile"]
    elif case == "checkpoints_is_a_file":
        os.makedirs(run)
        (run / "checkpoints").write_text("x")
        expect = ["checkpoints is a file", "move it away"]
    elif case == "empty_workdir":
        run = ""
        expect = ["--workdir is empty"]
    elif case == "config_syntax_error":
        config = "--config=" + _bad_file(tmp_path, "bad.py", "def get_config(:\n")
        expect = ["bad.py", "syntax error at line 1"]
    elif case == "missing_teacher":
        config, flags = TOY, ["--config.teacher.checkpoint=nowhere.msgpack"]
        expect = ["config.teacher.checkpoint='nowhere.msgpack': no such file"]
    elif case == "wrong_teacher":
        config = TOY
        flags = ["--config.teacher.checkpoint=" + _bad_file(tmp_path, "t.msgpack", "junk")]
        expect = ["t.msgpack"]
    elif case == "generator_kind":
        config, flags = TOY, ["--config.generator.kind=foo"]
        expect = ["config.generator.kind='foo'", "'mlp', 'affine'"]
    elif case == "generator_kind_images":
        config, flags = "--config=digits_distill:forward_kl", ["--config.generator.kind=mlp"]
        expect = ["config.generator.kind='mlp' is invalid for the images data", "'unet'"]
    elif case == "eval_num_samples":
        config, flags = TOY, ["--config.eval.num_samples=0"]
        expect = ["config.eval.num_samples=0 is invalid"]
    elif case == "contradictory":
        flags = ["--config.train.num_steps=5", "--config.train.num_steps=7"]
        expect = ["contradictory arguments", "train.num_steps"]
    elif case == "distributed_without_cluster":
        flags, code = ["--distributed=on"], 1
        expect = ["--distributed=on", "--distributed=off"]
    proc = common.run_main(run, *flags, config=config, timeout=120)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = common.error_lines(proc.stderr)
    for text in expect:
        assert text in line, line
    if case not in ("workdir_is_a_file", "checkpoints_is_a_file", "empty_workdir"):
        assert not os.path.exists(run)  # nothing written


def test_debug_shows_the_traceback(tmp_path):
    proc = common.run_main(
        tmp_path / "run", "--config.dummy.dim=0", DIDISTILL_DEBUG="1", timeout=120
    )
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert len(common.error_lines(proc.stderr)) == 1


def test_divergence_params_can_be_set_from_the_command_line(tmp_path):
    """The toy config leaves distill.divergence_params empty; NAME reaches the divergence."""
    proc = common.run_main(
        tmp_path / "run",
        "--config.distill.divergence_params.alphaa=0.3",
        config="--config=toy2d:alpha,smoke",
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = common.error_lines(proc.stderr)
    assert "'alpha' takes alpha; got ['alphaa']" in line
