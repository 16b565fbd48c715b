"""`python -m didistill.main` end to end: config errors, SIGTERM + resume, 4 devices vs 1."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from didistill import distill, main
from didistill.train import loop, writers
from tests import dummy_method

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "--config=tests/configs/dummy.py"


def _env(devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _main(workdir, *flags, devices=1, timeout=180):
    args = [sys.executable, "-m", "didistill.main", CONFIG, f"--workdir={workdir}", *flags]
    return subprocess.run(
        args, cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=timeout
    )


_lines = writers.comparable_metrics  # metrics.jsonl without the timing keys


def _train_in_process(workdir, **train):
    config = dummy_method.load_config()
    for key, value in train.items():
        config.train[key] = value
    return loop.train(dummy_method.make_method(config), config, str(workdir))


@pytest.mark.parametrize(
    "flags, devices, expected",
    [
        (
            ["--config.train.batch_sise=3"],
            1,
            [
                "unknown config key 'train.batch_sise'",
                "did you mean 'batch_size'?",
                "Valid keys of config.train: batch_size, checkpoint_every,",
            ],
        ),
        (
            ["--config.trian.num_steps=3"],
            1,
            ["config has no key 'trian'", "(did you mean 'train'?)"],
        ),
        (["--config.train.batch_size=abc"], 1, ["--config.train.batch_size=abc: invalid literal"]),
        (["--config.train.batch_size=0"], 1, ["config.train.batch_size=0 is invalid", ">= 1"]),
        (
            ["--config.train.batch_size=6"],
            4,
            ["batch_size=6 does not divide by the 4 devices", "batch_size=4 or 8"],
        ),
        (["--config.dummy.dim=0"], 1, ["config.dummy.dim=0 must be >= 1"]),
        (["--config.method=nope"], 1, ["config.method='nope' is not a registered method"]),
    ],
    ids=[
        "unknown_key",
        "unknown_block",
        "bad_type",
        "bad_value",
        "indivisible",
        "factory",
        "method",
    ],
)
def test_config_errors_are_one_clear_message(tmp_path, flags, devices, expected):
    proc = _main(tmp_path / "run", *flags, devices=devices)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    for text in expected:
        assert text in errors[0]
    assert not os.path.exists(tmp_path / "run" / loop.CHECKPOINT_DIR)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("main_reference")
    return workdir, _train_in_process(workdir)


def test_four_devices_give_the_same_run_as_one(reference, tmp_path):
    ref_dir, ref = reference
    proc = _main(tmp_path, devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = _lines(tmp_path), _lines(ref_dir)
    assert [line["step"] for line in got] == [line["step"] for line in want]
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)
    with open(tmp_path / "eval.json") as f:
        np.testing.assert_allclose(json.load(f)["eval_mse"], ref["eval"]["eval_mse"], rtol=1e-4)
    # The 4-device checkpoint restores onto this 1-device process.
    config = dummy_method.load_config()
    step, state = loop.load_checkpoint(dummy_method.make_method(config), config, str(tmp_path))
    assert step == 12
    got, want = dummy_method.tree_arrays(state), dummy_method.tree_arrays(ref["state"])
    for a, b in zip(got["params"].values(), want["params"].values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["key"], want["key"])


def test_two_processes_give_the_same_run_as_one(reference, tmp_path):
    """2 processes x 2 CPU devices, joined by jax.distributed through JAX_COORDINATOR_ADDRESS."""
    ref_dir, ref = reference
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for process_id in range(2):
        env = _env(devices=2)
        env.update(
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(process_id),
        )
        args = [sys.executable, "-m", "didistill.main", CONFIG, f"--workdir={tmp_path}"]
        procs.append(
            subprocess.Popen(
                args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [proc.communicate(timeout=180)[1] for proc in procs]
    for proc, stderr in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    assert "process 1 of 2" in outputs[1]
    got, want = _lines(tmp_path), _lines(ref_dir)
    assert [line["step"] for line in got] == [line["step"] for line in want]  # written once
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
    with open(tmp_path / "eval.json") as f:
        np.testing.assert_allclose(json.load(f)["eval_mse"], ref["eval"]["eval_mse"], rtol=1e-4)


def test_sigterm_saves_a_checkpoint_exits_0_and_the_rerun_resumes(tmp_path):
    flags = ["--config.train.num_steps=40", "--config.train.log_every=1"]
    flags += ["--config.train.checkpoint_every=0"]  # only the preemption and final saves
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "didistill.main", CONFIG, f"--workdir={workdir}", *flags]
    proc = subprocess.Popen(
        [*args, "--config.dummy.sleep_s=0.05"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = workdir / loop.METRICS_FILE
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "received SIGTERM" in stderr
    stopped = _lines(workdir)[-1]["step"]
    assert 3 <= stopped < 40
    assert sorted(os.listdir(workdir / loop.CHECKPOINT_DIR)) == [str(stopped)]
    assert not (workdir / loop.EVAL_FILE).exists()

    resumed = _main(workdir, *flags, "--config.dummy.sleep_s=0.05")  # the same config
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from the checkpoint at step {stopped}" in resumed.stderr
    uninterrupted = tmp_path / "uninterrupted"
    ref = _train_in_process(uninterrupted, num_steps=40, log_every=1, checkpoint_every=0)
    assert _lines(workdir) == _lines(uninterrupted)
    with open(workdir / loop.EVAL_FILE) as f:
        assert json.load(f) == {**ref["eval"], "step": 40}


def test_get_method_resolves_names_and_paths(monkeypatch):
    config = dummy_method.load_config()
    assert distill.get_method(config).global_batch_size == 8  # "package.module:factory"
    monkeypatch.setitem(distill.METHODS, "dummy", "tests.dummy_method:make_method")
    config.method = "dummy"
    assert distill.get_method(config).global_batch_size == 8
    config.method = "dumy"
    with pytest.raises(
        ValueError, match=r"'dumy' is not a registered.*Registered methods: .*\bdummy\b"
    ):
        distill.get_method(config)
    config.method = "tests.no_such_module:make_method"
    with pytest.raises(ValueError, match="cannot import module 'tests.no_such_module'"):
        distill.get_method(config)
    config.method = "tests.dummy_method:no_such_factory"
    with pytest.raises(ValueError, match="has no factory 'no_such_factory'"):
        distill.get_method(config)


def test_cluster_environment_detection():
    assert main.cluster_environment({}) is None
    assert main.cluster_environment({"JAX_COORDINATOR_ADDRESS": "h:1234"})
    slurm = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert main.cluster_environment(slurm) is None
    assert main.cluster_environment({**slurm, "SLURM_NTASKS": "4"}) == "Slurm"
    assert main.cluster_environment({"TPU_WORKER_HOSTNAMES": "a,b"}) == "Cloud TPU slice"
    assert main.cluster_environment({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert main.maybe_initialize_distributed("off", {"JAX_COORDINATOR_ADDRESS": "h:1"}) is None


# A child that handles SIGINT as Ctrl-C even when pytest runs where SIGINT is ignored (`cmd &`).
_CHILD = "import os, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "


@pytest.mark.parametrize("debug", [False, True])
def test_ctrl_c_while_python_imports_the_package_is_one_line(debug, tmp_path):
    """`python -m didistill.X` imports didistill (and JAX) with sys.argv[0] == '-m' before X's
    handlers exist; a Ctrl-C there ends at once in one line and exit 130, with no
    KeyboardInterrupt that could surface inside a loading C extension (a traceback with the
    debug variable). Once X runs, Ctrl-C is Python's KeyboardInterrupt again, and a library
    user's is untouched."""
    code = _CHILD + "sys.argv[0] = '-m'; import didistill; os.kill(os.getpid(), signal.SIGINT)"
    env = dict(os.environ, DIDISTILL_DEBUG="1" if debug else "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if debug:
        assert out.returncode == -signal.SIGINT and "Traceback" in out.stderr
    else:
        assert out.returncode == 130, out.stderr
        assert out.stderr.strip().splitlines() == [
            "didistill: error: interrupted (Ctrl-C) during start-up: nothing was written; "
            "rerun the command."
        ]
    running = _CHILD + (
        "sys.argv[0] = '-m'; import didistill; sys.argv[0] = 'x.py'\n"
        "def main():\n    os.kill(os.getpid(), signal.SIGINT)\n"
        "try:\n    main()\nexcept KeyboardInterrupt:\n    print('caught')"
    )  # the command's own code (in a function, not an import): KeyboardInterrupt
    out = subprocess.run([sys.executable, "-c", running], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "caught", out.stderr
    # a Ctrl-C while the running command imports a module: one line too
    (tmp_path / "interrupted_import.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"
    )
    importing = _CHILD + (
        f"sys.path.insert(0, {str(tmp_path)!r}); sys.argv[0] = '-m'; import didistill; "
        "sys.argv[0] = 'x.py'; import interrupted_import"
    )
    out = subprocess.run([sys.executable, "-c", importing], capture_output=True, text=True)
    if not debug:
        assert out.returncode == 130, out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("didistill: error: interrupted (Ctrl-C) while Python loaded")
    library = subprocess.run(
        [sys.executable, "-c", _CHILD + "import didistill; os.kill(os.getpid(), signal.SIGINT)"],
        capture_output=True,
        text=True,
    )
    assert library.returncode == -signal.SIGINT and "Traceback" in library.stderr
