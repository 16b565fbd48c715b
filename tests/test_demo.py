"""`make demo` (didistill/demo.py): runs per seed, mean ± std cells, results.json beside
results.md, and results.md written atomically (a failed write leaves the old table, never half
of one; those tests stub the engine runs)."""

import errno
import json
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


def test_demo_with_two_seeds_writes_mean_and_std(tmp_path):
    table = demo.run(str(tmp_path), ["forward_kl,smoke"], quick=False, seeds=2)
    assert "±" in table and "EDM teacher" in table
    assert (tmp_path / "results.md").read_text() == table + "\n"
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]["forward_kl,smoke"]
    assert len(runs) == 2 and runs[0] != runs[1], "two seeds must give two different runs"
    assert (tmp_path / "forward_kl_smoke" / "eval.json").exists()
    assert (tmp_path / "forward_kl_smoke_seed1" / "eval.json").exists()
    assert (tmp_path / "samples.png").stat().st_size > 0
    again = demo.run(str(tmp_path), ["forward_kl,smoke"], quick=False, seeds=2)  # reuses runs
    assert again == table
