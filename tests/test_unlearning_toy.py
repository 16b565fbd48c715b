"""experiments/unlearning_toy.py: FLAT reaches its closed-form optimum; the quick run works."""

import json
import os

import numpy as np

from experiments import unlearning_toy


def test_quick_run_and_closed_form_optimum(tmp_path):
    results = unlearning_toy.main(["--quick", "--out", str(tmp_path)])
    for name in ("results.json", "results.md", "unlearning_toy.png"):
        assert os.path.getsize(tmp_path / name) > 0
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["steps"] == 50
    # Tabular policy: every divergence reaches the infimum -g(1) + f*(g(0)) at template 1.
    for row in results["tabular"]:
        assert 0.0 <= row["loss - infimum"] < 1e-3, row
        assert row["template prob"] > 0.999 and row["forget prob"] < 1e-3, row
    # Linear policy, 50 steps: every FLAT divergence forgets and learns the template; the
    # reference code's reverse-KL activation goes the other way.
    rows = {row["method"]: row for row in results["toy"]}
    original = rows["(original model)"]
    for name, _ in unlearning_toy.DIVERGENCES:
        row = next(r for m, r in rows.items() if m.startswith(f"FLAT {name}"))
        assert row["forget prob"] < 0.5 * original["forget prob"], name
        assert row["template prob"] > 100 * original["template prob"], name
        assert np.isfinite(row["retain KL"])
    wrong = rows["FLAT reverse_kl, reference sign"]
    assert wrong["forget prob"] > original["forget prob"]
    assert wrong["template prob"] < original["template prob"]
