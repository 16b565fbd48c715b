"""What a run writes for people: log lines, the progress bar, metrics.jsonl and JSON files.

- `setup()` gives the `didistill` loggers one readable format,
  `2025-01-31 12:00:00 INFO didistill.train.loop: step 100/1000 | loss 0.1234 | ...`,
  printed through `tqdm.write` so that lines and the progress bar do not garble each other.
- `MetricsWriter` appends one JSON object a line to `metrics.jsonl`, always with "step". When a
  run resumes from step S it first drops the lines with step > S (written after the checkpoint
  it resumed from), so the file ends up as if the run had never stopped. Non-finite numbers are
  written as null (JSON has no NaN).
- `write_json` writes a file atomically (temporary file, then rename; `files.py`).
Every file goes through `files.py` (`etils.epath`): the run directory may be on `gs://`.
- `progress_bar` is a tqdm bar counting steps, showing steps/s.

Only process 0 writes files; the other processes get writers that do nothing.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import tqdm

from didistill.train import files

logger = logging.getLogger(__name__)

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.Handler):
    """Writes records with `tqdm.write`, which keeps an active progress bar intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup(level: int = logging.INFO) -> None:
    """Readable log lines for the `didistill` loggers (idempotent)."""
    root = logging.getLogger("didistill")
    root.setLevel(level)
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        root.addHandler(handler)
    root.propagate = False


def to_jsonable(value: Any) -> Any:
    """NumPy/JAX scalars -> Python numbers; NaN/inf -> None; containers recursively."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        value = np.asarray(value)
        if value.shape != ():
            return to_jsonable(value.tolist())
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """'loss 0.1234 | grad_norm 1.5' for a log line."""
    parts = []
    for name, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{name} {value:.5g}")
        else:
            parts.append(f"{name} {value}")
    return " | ".join(parts)


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON, atomically (temp file, fsync, rename)."""
    files.write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> Any:
    return json.loads(files.read_text(path))


class MetricsWriter:
    """Appends metric lines to a JSONL file, after dropping lines beyond `resume_step`."""

    def __init__(self, path: str, resume_step: int, enabled: bool = True):
        self.path = path
        self._file = None
        if not enabled:
            return
        self._file = files.AppendLog(path, self._lines_through(path, resume_step))

    @staticmethod
    def _lines_through(path: str, step: int) -> list[str]:
        if not files.exists(path):
            return []
        kept, dropped = [], 0
        for line in files.read_text(path).splitlines(keepends=True):
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped += 1  # e.g. a line cut short when the process was killed
                continue
            if record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
        if dropped:
            logger.info("metrics.jsonl: dropped %d lines written after step %d", dropped, step)
        return kept

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        record = {"step": int(step), **to_jsonable(dict(metrics))}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm.tqdm:
    """A steps progress bar (rate in steps/s); a silent one when not `enabled`."""
    return tqdm.tqdm(
        total=total,
        initial=initial,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=1.0,
        file=sys.stderr,
    )


__all__ = [
    "MetricsWriter",
    "format_metrics",
    "progress_bar",
    "read_json",
    "setup",
    "to_jsonable",
    "write_json",
]
