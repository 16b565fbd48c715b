"""Run directories on object stores (`gs://`, issue 17): every workdir file goes through
`didistill.train.files` (etils.epath). Tested on a fake `gs://` (fsspec's in-memory file system
behind epath's fsspec backend) and, end to end, on a local path taking the object-store code
(no append, direct object writes, the heartbeat lock)."""

import json
import os
import socket
import time

import fsspec
import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend

from didistill.train import checkpoint, files, loop, reporting, workdir
from tests import dummy_method
from tests.faults import common

ROOT = "gs://bucket/runs/x"


@pytest.fixture
def fake_gcs(monkeypatch):
    """`gs://` served by an in-memory file system that, like GCS, cannot append."""
    memory = fsspec.filesystem("memory")
    memory.store.clear()
    memory.pseudo_dirs.clear()
    memory.pseudo_dirs.append("")
    original_open = memory.open

    def open_(path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("object stores cannot append")
        return original_open(path, mode, **kwargs)

    monkeypatch.setattr(memory, "open", open_)
    monkeypatch.setenv("EPATH_USE_TF", "0")  # epath would prefer tf.io.gfile if TF were there
    monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: memory)
    return memory


def test_uris_are_not_local_paths():
    assert not files.is_local("gs://b/x") and not files.is_local("s3://b")
    assert files.is_local("runs/x") and files.is_local("/tmp/x")
    assert files.absolute("gs://b/x/") == "gs://b/x"  # os.path.abspath would give /cwd/gs:/b/x
    assert files.normalize("gs://b/x/") == "gs://b/x"
    assert files.join("gs://b/x", "checkpoints", "3") == "gs://b/x/checkpoints/3"


def test_result_files_and_metrics_on_a_fake_object_store(fake_gcs):
    files.makedirs(ROOT)
    path = files.join(ROOT, "eval.json")
    reporting.write_json(path, {"step": 3, "a": 1.5})
    assert reporting.read_json(path) == {"step": 3, "a": 1.5}
    assert files.listdir(ROOT) == ["eval.json"]  # no temporary file left

    metrics = files.join(ROOT, "metrics.jsonl")
    writer = reporting.MetricsWriter(metrics, resume_step=0)
    for step in (2, 4, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    text = files.read_text(metrics)
    files.write_text_atomic(metrics, text + '{"step": 8, "lo')  # cut short by a kill
    writer = reporting.MetricsWriter(metrics, resume_step=4)  # resumed from step 4
    writer.write(6, {"loss": 6.0})
    writer.close()
    steps = [json.loads(line)["step"] for line in files.read_text(metrics).splitlines()]
    assert steps == [2, 4, 6]


def test_damaged_eval_json_is_set_aside_on_a_fake_object_store(fake_gcs):
    files.makedirs(ROOT)
    path = files.join(ROOT, loop.EVAL_FILE)
    files.write_text_atomic(path, '{"step": 1')
    assert loop._previous_eval(path, is_main=True) is None
    (aside,) = files.listdir(ROOT)
    assert aside.startswith("eval.json.damaged-")


def test_fingerprint_and_restart_on_a_fake_object_store(fake_gcs):
    cfg = common.config()
    files.makedirs(ROOT)
    workdir.check_fingerprint(cfg, ROOT)
    assert json.loads(files.read_text(files.join(ROOT, workdir.RUN_FILE)))["fingerprint"]
    other = common.config()
    other.optimizer.learning_rate = 0.1
    with pytest.raises(workdir.WorkdirMismatchError, match="learning_rate was 0.05, now 0.1"):
        workdir.check_fingerprint(other, ROOT)
    moved = workdir.move_aside(ROOT + "/")
    assert moved.startswith(ROOT + ".old-")
    assert not files.exists(ROOT)
    assert files.listdir(moved) == [workdir.RUN_FILE]


def test_checkpoint_checksums_on_a_fake_object_store(fake_gcs):
    step_dir = files.join(ROOT, "checkpoints", "4")
    files.makedirs(files.join(step_dir, "state", "d"))
    files.write_text_atomic(files.join(step_dir, "state", "d", "chunk"), "abc")
    files.write_text_atomic(files.join(step_dir, "meta"), "{}")
    sums = checkpoint._hash_files(step_dir)
    assert sorted(sums) == ["meta", "state/d/chunk"]
    files.makedirs(files.join(ROOT, "checkpoints", "corrupt_3_x"))
    ckpt = checkpoint.Checkpointer.__new__(checkpoint.Checkpointer)
    ckpt.directory = files.absolute(files.join(ROOT, "checkpoints"))
    assert ckpt.set_aside_dirs() == ["corrupt_3_x"]


def _lock_file(pid, host, heartbeat):
    return json.dumps({"pid": pid, "host": host, "started": "then", "heartbeat": heartbeat})


def test_heartbeat_lock_on_a_fake_object_store(fake_gcs, monkeypatch):
    monkeypatch.setattr(workdir.WorkdirLock, "SETTLE_S", 0.0)
    files.makedirs(ROOT)
    lock_path = files.join(ROOT, workdir.LOCK_FILE)
    with workdir.WorkdirLock(ROOT) as lock:
        assert lock.kind == "heartbeat"
        info = json.loads(files.read_text(lock_path))
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(workdir.WorkdirLockedError, match=f"in use by pid {os.getpid()}"):
            workdir.WorkdirLock(ROOT).__enter__()
        assert workdir.WorkdirLock.holder(ROOT) is not None
    assert not files.exists(lock_path)  # released

    # another host, heartbeat fresh: held; heartbeat older than STALE_S: taken over
    files.write_text_atomic(lock_path, _lock_file(1, "elsewhere", time.time()))
    with pytest.raises(workdir.WorkdirLockedError, match="pid 1 on host elsewhere"):
        workdir.WorkdirLock(ROOT).__enter__()
    stale = time.time() - workdir.WorkdirLock.STALE_S - 1
    files.write_text_atomic(lock_path, _lock_file(1, "elsewhere", stale))
    assert workdir.WorkdirLock.holder(ROOT) is None
    with workdir.WorkdirLock(ROOT):
        pass
    # this host, a pid that is gone: taken over at once, whatever the heartbeat
    files.write_text_atomic(lock_path, _lock_file(2**22 + 12345, socket.gethostname(), time.time()))
    with workdir.WorkdirLock(ROOT):
        pass
    # this host, a live pid (reused, or hung) whose heartbeat is stale: taken over
    files.write_text_atomic(lock_path, _lock_file(os.getpid(), socket.gethostname(), stale))
    with workdir.WorkdirLock(ROOT):
        pass
    files.write_text_atomic(lock_path, json.dumps({"host": socket.gethostname()}))  # no pid
    with workdir.WorkdirLock(ROOT):
        pass


def test_heartbeat_is_refreshed_and_a_lost_race_stops(fake_gcs, monkeypatch):
    monkeypatch.setattr(workdir.WorkdirLock, "SETTLE_S", 0.0)
    monkeypatch.setattr(workdir.WorkdirLock, "HEARTBEAT_S", 0.05)
    files.makedirs(ROOT)
    lock_path = files.join(ROOT, workdir.LOCK_FILE)
    with workdir.WorkdirLock(ROOT):
        first = json.loads(files.read_text(lock_path))["heartbeat"]
        time.sleep(0.3)
        assert json.loads(files.read_text(lock_path))["heartbeat"] > first

    real_sleep = time.sleep

    def racing_sleep(seconds):  # another start overwrites the lock during the settle wait
        files.write_text_atomic(lock_path, _lock_file(1, "elsewhere", time.time()))
        real_sleep(seconds)

    monkeypatch.setattr(workdir.time, "sleep", racing_sleep)
    with pytest.raises(workdir.WorkdirLockedError, match="host elsewhere"):
        workdir.WorkdirLock(ROOT).__enter__()
    assert json.loads(files.read_text(lock_path))["host"] == "elsewhere"  # the winner's, kept


def test_a_run_through_the_object_store_code_on_a_local_path(tmp_path, monkeypatch):
    """The whole engine (kill-free) with `files.is_local` false: direct writes, rewritten
    metrics, heartbeat lock; preempted and resumed, it equals a plain local run."""
    plain = tmp_path / "plain"
    reference = common.train(plain, common.config())
    monkeypatch.setattr(files, "is_local", lambda path: False)
    monkeypatch.setattr(workdir.WorkdirLock, "SETTLE_S", 0.0)
    run = tmp_path / "object_store"
    preempted = common.config()
    preempted.dummy.sigterm_at_step = 6  # the dummy sends itself SIGTERM at step 6
    preempted.fingerprint_ignore = ("dummy.sigterm_at_step",)
    first = common.train(run, preempted)
    assert first["preempted"] and first["step"] < 12
    resumed = common.config()
    resumed.fingerprint_ignore = ("dummy.sigterm_at_step",)
    result = common.train(run, resumed)
    assert common.metrics(run) == common.metrics(plain)
    assert common.eval_json(run) == common.eval_json(plain)
    jax.tree.map(
        np.testing.assert_array_equal,
        dummy_method.tree_arrays(result["state"]),
        dummy_method.tree_arrays(reference["state"]),
    )
    assert not (run / workdir.LOCK_FILE).exists()
    assert not [n for n in os.listdir(run) if ".tmp-" in n]


@pytest.mark.parametrize(
    "module, arg, added, changed",
    [
        (
            "synthetic_sdtt",
            "markov,smoke",
            ("tokens_dir", "heldout_tokens_dir"),
            ("tokens_dir", "T"),
        ),
        ("digits_distill", "dmd2,smoke", ("imbalance", "imbalance_seed"), ("imbalance", 30.0)),
    ],
)
def test_runs_from_before_an_added_key_still_resume(tmp_path, module, arg, added, changed):
    """Keys added to the library at a neutral value (workdir.ADDED_KEYS) do not orphan older
    workdirs; another value of them is a difference."""
    import importlib

    load = lambda: importlib.import_module(f"didistill.configs.{module}").get_config(arg)
    old = load()
    for key in added:
        del old.data[key]
    workdir.check_fingerprint(old, str(tmp_path))
    workdir.check_fingerprint(load(), str(tmp_path))
    new = load()
    new.data[changed[0]] = changed[1]
    with pytest.raises(workdir.WorkdirMismatchError, match=f"data.{changed[0]} was"):
        workdir.check_fingerprint(new, str(tmp_path))
