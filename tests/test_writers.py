"""Logging backends (didistill/train/writers.py): TensorBoard, W&B (faked), timing and
learning rates in metrics.jsonl, INFO lines where nothing configured logging, epath workdirs."""

import json
import logging
import os
import subprocess
import sys
import types

import pytest
from etils import epath

from didistill.configs import base
from didistill.train import loop, writers
from didistill.train.errors import ConfigError
from tests import dummy_method

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(backends="", num_steps=6):
    config = dummy_method.load_config()
    config.train.num_steps = num_steps
    config.logging.backends = backends
    return config


def _train(workdir, config):
    return loop.train(dummy_method.make_method(config), config, str(workdir))


def _lines(workdir):
    with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


class FakeWandb(types.ModuleType):
    """The part of the wandb API the writer uses; records what it was given."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        self.util = types.SimpleNamespace(generate_id=lambda: f"id{len(self.inits)}")

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def finish(self):
        self.finished += 1


def test_base_config_has_the_logging_block():
    assert base.get_config().logging.backends == ""
    assert writers.backend_names(base.get_config()) == []
    config = base.get_config()
    config.logging.backends = " TensorBoard, wandb "
    assert writers.backend_names(config) == ["tensorboard", "wandb"]
    assert writers.backend_names({"logging": {"backends": ("wandb",)}}) == ["wandb"]


def test_unknown_backend_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"config.logging.backends.*'mlflow'"):
        _train(tmp_path, _config("mlflow"))
    assert not os.path.exists(tmp_path / loop.METRICS_FILE)


def test_learning_rates_follow_each_optimizer_blocks_schedule():
    config = base.get_config()
    config.optimizer = base.optimizer(learning_rate=0.1, warmup_steps=10)
    config.critic = {"optimizer": base.optimizer(learning_rate=0.02)}
    assert writers.learning_rates(config, 5) == {
        "lr/optimizer": pytest.approx(0.05),
        "lr/critic.optimizer": 0.02,
    }
    assert writers.learning_rates(config, 50)["lr/optimizer"] == pytest.approx(0.1)


def test_metrics_lines_carry_timing_and_learning_rates(tmp_path):
    result = _train(tmp_path, _config())
    lines = _lines(tmp_path)
    assert [line["step"] for line in lines] == [3, 6]
    for line in lines:
        assert line["steps_per_sec"] > 0
        assert abs(line["wall_time"] - lines[-1]["wall_time"]) < 3600
        assert line["lr/optimizer"] == pytest.approx(0.05)
        assert "loss" in line
    assert result["metrics"] == lines[-1]


def test_tensorboard_writes_event_files_with_every_scalar(tmp_path):
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto import event_pb2

    _train(tmp_path, _config("tensorboard"))
    files = list((tmp_path / writers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 1
    tags = {}
    data = files[0].read_bytes()
    pos = 0
    while pos < len(data):  # TFRecord framing: len(8) crc(4) payload crc(4)
        n = int.from_bytes(data[pos : pos + 8], "little")
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append(event.step)
    assert tags["loss"] == [3, 6]
    assert tags["steps_per_sec"] == [3, 6] and tags["lr/optimizer"] == [3, 6]
    assert "wall_time" not in tags  # it is the events' own wall time
    assert len(_lines(tmp_path)) == 2  # metrics.jsonl is still written


def test_wandb_gets_every_line_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = _config("wandb", num_steps=3)
    config.logging.wandb_project = "proj"
    _train(tmp_path, config)
    _train(tmp_path, _config("wandb", num_steps=6))  # resumes from step 3
    assert [init["id"] for init in fake.inits] == ["id0", "id0"]
    assert fake.inits[0]["project"] == "proj" and fake.inits[0]["entity"] is None
    assert fake.inits[0]["resume"] == "allow" and fake.inits[0]["dir"] == str(tmp_path)
    assert fake.inits[0]["config"]["train"]["num_steps"] == 3
    assert [step for step, _ in fake.logged] == [3, 6]
    assert "loss" in fake.logged[0][1] and "lr/optimizer" in fake.logged[0][1]
    assert fake.finished == 2


def test_missing_wandb_is_one_line_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError) as info:
        _train(tmp_path, _config("wandb"))
    message = str(info.value)
    assert "\n" not in message
    assert "config.logging.backends" in message and "pip install wandb" in message


def test_a_failing_backend_does_not_stop_training(tmp_path, caplog):
    class Broken:
        def write(self, step, metrics):
            raise OSError("dashboard down")

        def close(self):
            pass

    jsonl = writers.reporting.MetricsWriter(str(tmp_path / "m.jsonl"), 0)
    out = writers.Writers(jsonl, [Broken()])
    out.write(1, {"loss": 1.0})
    out.close()
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 1, "loss": 1.0}


def test_info_lines_show_when_nothing_configured_logging():
    """As in a fresh notebook kernel: no handler on the root logger."""
    code = (
        "from didistill.train import loop\n"
        "from tests import dummy_method\n"
        "import sys, tempfile\n"
        "c = dummy_method.load_config(); c.train.num_steps = 3\n"
        "loop.train(dummy_method.make_method(c), c, tempfile.mkdtemp())\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "INFO didistill.train.loop: step 3/3" in out.stderr
    assert "INFO didistill.train.loop: new run in" in out.stderr


def test_show_info_logs_leaves_a_configured_logger_alone(monkeypatch):
    didistill_logger = logging.getLogger("didistill")
    monkeypatch.setattr(didistill_logger, "handlers", [])
    monkeypatch.setattr(didistill_logger, "level", logging.WARNING)
    writers.show_info_logs()
    assert didistill_logger.handlers == []


def test_wandb_id_file_goes_through_epath(tmp_path, monkeypatch):
    """gs:// workdirs: the writers' own files go through etils.epath (a local path here)."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    workdir = epath.Path(tmp_path) / "run"
    workdir.mkdir()
    writer = writers.WandbWriter(_config("wandb").logging, os.fspath(workdir), {})
    writer.close()
    assert (workdir / writers.WANDB_ID_FILE).read_text().strip() == "id0"
