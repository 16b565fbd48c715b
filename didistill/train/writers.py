"""Where a run's metric lines go: metrics.jsonl always, TensorBoard and Weights & Biases optionally.

`config.logging` (configs/base.py):

    backends       "" or a comma-separated list of "tensorboard", "wandb": extra writers that
                   receive every metrics line. `<workdir>/metrics.jsonl` is always written and is
                   the source of truth (resume truncates it; the others only append).
    wandb_project, wandb_entity, wandb_name, wandb_mode   passed to `wandb.init` ("" = wandb's
                   default); the run id is stored in `<workdir>/wandb_id.txt`, so a resumed run
                   continues the same W&B run.

- tensorboard: `tensorboardX.SummaryWriter` on `<workdir>/tensorboard` (`pip install
  tensorboardX`, or `didistill[tensorboard]`; no TensorFlow needed). `tensorboard --logdir
  <workdir>` shows it; TensorBoard reads gs:// directly.
- wandb: `wandb.log(metrics, step=step)` (`pip install wandb`, or `didistill[wandb]`).

A backend whose package is missing stops the run before any work, with one line naming the key.
Only process 0 writes. Every metrics line also gets, besides the method's metrics:
`steps_per_sec` (over the log window), `wall_time` (Unix seconds when the line was written) and
`lr/<block>` for each optimizer block of the config (the block's schedule at the engine step:
methods that update one optimizer several times a step advance its schedule faster).
`TIMING_KEYS` are the keys that differ between otherwise identical runs.

Work directories may be any `etils.epath` path, gs:// included (`pip install gcsfs`): the
writers' files go through epath, as every workdir file does (`files.py`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from etils import epath

from didistill.train import reporting
from didistill.train.errors import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "wandb")
TIMING_KEYS = ("steps_per_sec", "wall_time")
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"


def backend_names(config) -> list[str]:
    """The configured backends (config.logging.backends: a comma-separated str or a sequence)."""
    logging_cfg = config.get("logging") if hasattr(config, "get") else None
    value = logging_cfg.get("backends", "") if logging_cfg is not None else ""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip().lower() for n in names if n and n.strip()]
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(
                f"config.logging.backends: unknown backend {name!r}; allowed: {BACKENDS}"
            )
    return names


def learning_rates(config, step: int) -> dict[str, float]:
    """{"lr/<path>": value at `step`} for every optimizer block (see `train.optim`)."""
    out = {}

    def visit(node, path):
        if not hasattr(node, "items"):
            return
        keys = set(node.keys())
        if {"name", "learning_rate", "warmup_steps"} <= keys:
            lr, warmup = float(node["learning_rate"]), int(node["warmup_steps"])
            out["lr/" + ".".join(path)] = lr * min(1.0, step / warmup) if warmup > 0 else lr
            return
        for key, value in node.items():
            visit(value, (*path, str(key)))

    visit(config, ())
    return out


def show_info_logs() -> None:
    """Makes the engine's INFO lines visible when nobody configured the `didistill` logger (a
    notebook, a script): Python prints only warnings by default. `reporting.setup()` is called
    when that logger has no handler and no level; set either to keep your own setup."""
    own = logging.getLogger("didistill")
    if not own.handlers and own.level == logging.NOTSET:
        reporting.setup()


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


class TensorBoardWriter:
    def __init__(self, logdir: str):
        try:
            import tensorboardX
        except ImportError:
            raise ConfigError(
                "config.logging.backends has 'tensorboard' but tensorboardX is not installed: "
                "pip install tensorboardX (or didistill[tensorboard])"
            ) from None
        self._writer = tensorboardX.SummaryWriter(logdir)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        walltime = metrics.get("wall_time")
        for name, value in _scalars(metrics).items():
            if name != "wall_time":
                self._writer.add_scalar(name, value, step, walltime=walltime)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    def __init__(self, logging_cfg, workdir: str, run_config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "config.logging.backends has 'wandb' but wandb is not installed: "
                "pip install wandb (or didistill[wandb])"
            ) from None
        id_path = epath.Path(workdir) / WANDB_ID_FILE
        run_id = id_path.read_text().strip() if id_path.exists() else wandb.util.generate_id()
        id_path.write_text(run_id + "\n")
        options = {
            key: logging_cfg.get(f"wandb_{key}") or None
            for key in ("project", "entity", "name", "mode")
        }
        local_dir = workdir if not str(workdir).startswith("gs://") else None
        self._run = wandb.init(
            id=run_id, resume="allow", config=dict(run_config), dir=local_dir, **options
        )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class Writers:
    """metrics.jsonl plus the configured backends; `write` sends a line to all of them."""

    def __init__(self, jsonl: reporting.MetricsWriter, backends=()):
        self.jsonl, self.backends = jsonl, list(backends)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.jsonl.write(step, metrics)  # first: the source of truth
        for backend in self.backends:
            try:
                backend.write(step, metrics)
            except Exception:  # a dashboard failing must not stop training
                logger.exception("logging backend %s failed at step %d", type(backend), step)

    def close(self) -> None:
        self.jsonl.close()
        for backend in self.backends:
            backend.close()


def make_writers(config, workdir: str, metrics_path: str, start: int, is_main: bool) -> Writers:
    """The run's writers (backends only on process 0); raises ConfigError for a bad backend."""
    names = backend_names(config)
    jsonl = reporting.MetricsWriter(metrics_path, start, is_main)
    if not is_main:
        return Writers(jsonl)
    backends = []
    try:
        for name in names:
            if name == "tensorboard":
                backends.append(TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR)))
            else:
                run_config = reporting.to_jsonable(config.to_dict())
                backends.append(WandbWriter(config.logging, workdir, run_config))
    except BaseException:
        jsonl.close()
        for backend in backends:
            backend.close()
        raise
    return Writers(jsonl, backends)


def comparable_metrics(workdir: str) -> list[dict[str, Any]]:
    """The lines of `<workdir>/metrics.jsonl` without `TIMING_KEYS`: what two runs of the same
    config share bit for bit (resume and fault-injection tests compare these). A torn last line
    (no newline: a kill while writing it; the next start cuts it) is not a line yet."""
    text = epath.Path(workdir, "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in text.split("\n")[:-1] if line]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


__all__ = [
    "comparable_metrics",
    "BACKENDS",
    "TIMING_KEYS",
    "Writers",
    "backend_names",
    "learning_rates",
    "make_writers",
]
