"""`make demo`: one-step distillation of the 8-mode ring, teacher against students, one table.

    python -m didistill.demo --workdir=runs/demo [--quick] [--seeds 3] [--methods dmd2 ...]

Each entry of `--methods` is a `configs/toy2d.py` argument (a divergence for f-distill, or a
method name). Every run is an ordinary engine run in `<workdir>/<entry>/` (rerunning resumes or
reuses it; nothing is overwritten). The teacher's 35-NFE Heun sampler is the reference line.
With `--seeds N` every entry is trained at seeds 0..N-1 (`<entry>_seed<k>/` for k > 0) and the
table shows mean ± sample std. Writes `<workdir>/results.md`, `results.json`, `samples.png` and
`metrics.png` (pictures of seed 0).
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
from didistill.train.reporting import write_json

DEFAULT_METHODS = ("dmd2", "forward_kl", "jensen_shannon", "uni_instruct,forward_kl")
COLUMNS = (
    ("energy_distance", "energy dist. ↓"),
    ("mode_coverage", "mode coverage ↑"),
    ("mode_tv", "mode TV ↓"),
    ("rare_mode_share", "rare-mode share (1 = exact)"),
    ("nll", "NLL ↓"),
    ("outlier_fraction", "outliers ↓"),
)


def _config(entry: str, quick: bool, seed: int = 0):
    config = toy2d.get_config(entry)
    config.seed = seed
    if quick:
        config.train.num_steps = 300
        config.train.checkpoint_every = 300
    return config


def _run_dir(workdir, entry, seed):  # seed 0 keeps the single-seed layout
    name = entry.replace(",", "_")
    return os.path.join(workdir, name if seed == 0 else f"{name}_seed{seed}")


def _cell(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _row(label, nfe, runs, prefix):
    cells = [label, str(nfe)]
    for key, _ in COLUMNS:
        values = [m[f"{prefix}/{key}"] for m in runs if m.get(f"{prefix}/{key}") is not None]
        cells.append(_cell(values) if values else "-")
    return "| " + " | ".join(cells) + " |"


def run(workdir: str, entries, quick: bool, seeds: int = 1) -> str:
    """Trains every entry at seeds 0..seeds-1 (or reuses finished runs); writes the table as
    `results.md` and `results.json` (per entry: every seed's final metrics) and the pictures
    (seed 0). With several seeds the cells are mean ± sample std over the seeds; the teacher
    row is the teacher sampled with each run's evaluation key."""
    results, samples = {}, {}
    for entry in entries:
        results[entry] = []
        for seed in range(seeds):
            config = _config(entry, quick, seed)
            run_dir = _run_dir(workdir, entry, seed)
            print(
                f"\n== {entry} seed {seed}: {config.method}, {config.distill.divergence}: {run_dir}"
            )
            results[entry].append(train(get_method(config), config, run_dir)["eval"])
        run_dir = _run_dir(workdir, entry, 0)
        samples[entry] = np.load(os.path.join(run_dir, "student_samples.npy"))
        if "teacher" not in samples:
            samples["teacher"] = np.load(os.path.join(run_dir, "teacher_samples.npy"))
    teacher_runs = results[entries[0]]
    header = "| method | NFE | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    lines.append(
        _row("EDM teacher (Heun)", teacher_runs[0]["teacher/nfe"], teacher_runs, "teacher")
    )
    for entry in entries:
        lines.append(_row(entry, 1, results[entry], "student"))
    table = "\n".join(lines)
    mixture = toy.get_toy(_config(entries[0], quick).data.toy)
    panels = {"teacher (35 NFE)": samples.pop("teacher")}
    panels.update({f"{entry} (1 NFE)": s for entry, s in samples.items()})
    plots.save_sample_grid(panels, os.path.join(workdir, "samples.png"), mixture=mixture)
    plots.save_bar_plot(
        {
            entry: float(np.mean([m["student/energy_distance"] for m in results[entry]]))
            for entry in entries
        },
        os.path.join(workdir, "metrics.png"),
        title="energy distance to the data (1-step students)",
    )
    write_text_atomic(os.path.join(workdir, "results.md"), table + "\n")
    write_json(
        os.path.join(workdir, "results.json"), {"seeds": seeds, "quick": quick, "runs": results}
    )
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
    parser.add_argument(
        "--seeds", type=int, default=1, help="training seeds per method (mean ± std when > 1)"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    table = run(args.workdir, args.methods, args.quick, args.seeds)
    print("\n" + table)
    print(f"\nPictures: {args.workdir}/samples.png, {args.workdir}/metrics.png")


if __name__ == "__main__":
    main()
