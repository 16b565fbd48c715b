"""`make demo`: one-step distillation of the 8-mode ring, teacher against students, one table.

    python -m didistill.demo --workdir=runs/demo [--quick] [--methods dmd2 forward_kl ...]

Each entry of `--methods` is a `configs/toy2d.py` argument (a divergence for f-distill, or a
method name). Every run is an ordinary engine run in `<workdir>/<entry>/` (rerunning resumes or
reuses it; nothing is overwritten). The teacher's 35-NFE Heun sampler is the reference line.
Writes `<workdir>/results.md`, `<workdir>/samples.png` and `<workdir>/metrics.png`.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from didistill.configs import toy2d  # run from the repository root (`make demo`)
from didistill.data import toy
from didistill.distill import get_method
from didistill.eval import plots
from didistill.train.files import write_text_atomic
from didistill.train.loop import train

DEFAULT_METHODS = ("dmd2", "forward_kl", "jensen_shannon", "uni_instruct,forward_kl")
COLUMNS = (
    ("energy_distance", "energy dist. ↓"),
    ("mode_coverage", "mode coverage ↑"),
    ("mode_tv", "mode TV ↓"),
    ("rare_mode_share", "rare-mode share (1 = exact)"),
    ("nll", "NLL ↓"),
    ("outlier_fraction", "outliers ↓"),
)


def _config(entry: str, quick: bool):
    config = toy2d.get_config(entry)
    if quick:
        config.train.num_steps = 300
        config.train.checkpoint_every = 300
    return config


def _row(label, nfe, metrics, prefix):
    cells = [label, str(nfe)]
    for key, _ in COLUMNS:
        value = metrics.get(f"{prefix}/{key}")
        cells.append("-" if value is None else f"{value:.3f}")
    return "| " + " | ".join(cells) + " |"


def run(workdir: str, entries, quick: bool) -> str:
    results, samples = {}, {}
    for entry in entries:
        config = _config(entry, quick)
        run_dir = os.path.join(workdir, entry.replace(",", "_"))
        print(f"\n== {entry}: {config.method} / {config.distill.divergence} -> {run_dir}")
        results[entry] = train(get_method(config), config, run_dir)["eval"]
        samples[entry] = np.load(os.path.join(run_dir, "student_samples.npy"))
        if "teacher" not in samples:
            samples["teacher"] = np.load(os.path.join(run_dir, "teacher_samples.npy"))
            teacher_metrics = results[entry]
    header = "| method | NFE | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    lines.append(
        _row("EDM teacher (Heun)", teacher_metrics["teacher/nfe"], teacher_metrics, "teacher")
    )
    for entry in entries:
        lines.append(_row(entry, 1, results[entry], "student"))
    table = "\n".join(lines)
    mixture = toy.get_toy(_config(entries[0], quick).data.toy)
    panels = {"teacher (35 NFE)": samples.pop("teacher")}
    panels.update({f"{entry} (1 NFE)": s for entry, s in samples.items()})
    plots.save_sample_grid(panels, os.path.join(workdir, "samples.png"), mixture=mixture)
    plots.save_bar_plot(
        {entry: results[entry]["student/energy_distance"] for entry in entries},
        os.path.join(workdir, "metrics.png"),
        title="energy distance to the data (1-step students)",
    )
    write_text_atomic(os.path.join(workdir, "results.md"), table + "\n")  # never half-written
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="configs/toy2d.py arguments",
    )
    parser.add_argument("--quick", action="store_true", help="300 generator steps per method")
    args = parser.parse_args(argv)
    table = run(args.workdir, args.methods, args.quick)
    print("\n" + table)
    print(f"\nPictures: {args.workdir}/samples.png, {args.workdir}/metrics.png")


if __name__ == "__main__":
    main()
