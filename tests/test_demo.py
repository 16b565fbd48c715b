"""`make demo` (didistill/demo.py) writes results.md atomically: a failed write leaves the old
table, never half of one. The engine runs are stubbed (each entry's eval results and samples)."""

import errno
import os

import numpy as np
import pytest

from didistill import demo


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    def train(method, config, run_dir):
        os.makedirs(run_dir, exist_ok=True)
        for who in ("student", "teacher"):
            np.save(os.path.join(run_dir, f"{who}_samples.npy"), np.zeros((4, 2), np.float32))
        metrics = {f"{who}/{key}": 0.5 for who in ("student", "teacher") for key, _ in demo.COLUMNS}
        return {"eval": {**metrics, "teacher/nfe": 35}}

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo, "get_method", lambda config: None)
    monkeypatch.setattr(demo.plots, "save_sample_grid", lambda *a, **k: None)
    monkeypatch.setattr(demo.plots, "save_bar_plot", lambda *a, **k: None)
    return tmp_path


def test_results_md_is_written_whole_or_not_at_all(stubbed, monkeypatch):
    table = demo.run(str(stubbed), ["forward_kl"], quick=True)
    results = stubbed / "results.md"
    assert results.read_text() == table + "\n"
    assert "| forward_kl | 1 | 0.500 |" in table

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        demo.run(str(stubbed), ["forward_kl", "dmd2"], quick=True)
    assert results.read_text() == table + "\n"  # the old table, whole
    assert not [n for n in os.listdir(stubbed) if ".tmp-" in n]
