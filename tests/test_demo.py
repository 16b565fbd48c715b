"""`make demo`'s table: runs per seed, mean ± std cells, results.json beside results.md."""

import json

from didistill import demo


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
