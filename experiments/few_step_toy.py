"""Few-step students on the 8-mode ring: DMD2, f-distill forward KL and VDOT at K = 1 and 4.

    python -m experiments.few_step_toy --workdir=runs/few_step_toy [--seeds 3] [--steps 1000]

Every run is an ordinary engine run of `configs/toy2d.py` (`--steps` generator steps, default
its 1,000; batch 256)
with `config.generator.num_steps = K` (`didistill/distill/one_step/few_step.py`: DMD2's
backward simulation), in `<workdir>/<method>_k<K>_seed<s>/`; finished runs are reused and
interrupted ones resumed (`--report_only` tabulates the finished runs and trains nothing).
Runs go seed by seed (all entries at seed 0 first), and the table is
rewritten after every run, so a partial sweep still reports what finished. Writes
`results.md` (mean ± sample std over the finished seeds, with the teacher row),
`results.json` (every run's final metrics) and `samples.png` (seed 0).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from experiments import common

ENTRIES = (  # (label, configs/toy2d.py argument)
    ("dmd2", "dmd2"),
    ("f-distill forward KL", "forward_kl"),
    ("vdot", "vdot"),
)
STEPS = (1, 4)
COLUMNS = (
    ("mode_coverage", "mode coverage ↑"),
    ("rare_mode_share", "rare-mode share (1 = exact)"),
    ("outlier_fraction", "outliers ↓"),
    ("energy_distance", "energy dist. ↓"),
    ("mode_tv", "mode TV ↓"),
)


def make_config(arg: str, num_steps: int, seed: int, train_steps: int | None = None):
    from didistill.configs import toy2d

    config = toy2d.get_config(arg)
    config.generator.num_steps = num_steps
    config.seed = seed
    if train_steps:
        config.train.num_steps = train_steps
        config.train.checkpoint_every = train_steps
    return config


def run_dir(workdir, arg, num_steps, seed):
    return os.path.join(workdir, f"{arg}_k{num_steps}_seed{seed}")


def _cell(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _row(label, nfe, runs, prefix):
    cells = [label, str(nfe), str(len(runs))]
    for key, _ in COLUMNS:
        cells.append(_cell([m[f"{prefix}/{key}"] for m in runs if f"{prefix}/{key}" in m]))
    return "| " + " | ".join(cells) + " |"


def table(results) -> str:
    header = "| method | NFE | seeds | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    teacher = next(iter(results.values()), [])  # the first entry's runs: one per seed
    if teacher:
        lines.append(_row("EDM teacher (Heun)", teacher[0]["teacher/nfe"], teacher, "teacher"))
    for (label, arg), k in ((e, k) for e in ENTRIES for k in STEPS):
        runs = results.get(f"{arg}_k{k}", [])
        if runs:
            lines.append(_row(label, runs[0]["student/nfe"], runs, "student"))
    return "\n".join(lines)


def write_outputs(workdir, results, wall_s):
    from didistill.train.reporting import write_json
    from didistill.train.workdir import write_text_atomic

    text = table(results)
    write_text_atomic(
        os.path.join(workdir, "results.md"),
        text + f"\n\nWall time of this invocation: {wall_s / 60:.1f} min (finished runs reused).\n",
    )
    write_json(os.path.join(workdir, "results.json"), {"runs": results, "wall_s": wall_s})
    return text


def save_picture(workdir):
    from didistill.data import toy
    from didistill.eval import plots

    panels = {}
    for label, arg in ENTRIES:
        for k in STEPS:
            path = os.path.join(run_dir(workdir, arg, k, 0), "student_samples.npy")
            if os.path.isfile(path):
                if "teacher (35 NFE)" not in panels:
                    teacher = os.path.join(run_dir(workdir, arg, k, 0), "teacher_samples.npy")
                    panels["teacher (35 NFE)"] = np.load(teacher)
                panels[f"{label} ({k} NFE)"] = np.load(path)
    if panels:
        mixture = toy.get_toy(make_config("dmd2", 1, 0).data.toy)
        plots.save_sample_grid(panels, os.path.join(workdir, "samples.png"), mixture=mixture)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/few_step_toy")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first_seed", type=int, default=0, help="train seeds first_seed..seeds-1 only"
    )
    parser.add_argument("--steps", type=int, default=None, help="generator steps per run")
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="train nothing: tabulate the finished runs (their eval.json) of the workdir",
    )
    common.add_cache_flag(parser)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    os.makedirs(args.workdir, exist_ok=True)
    common.use_compilation_cache(args.workdir, args.jax_cache)
    common.quiet_logs()
    start = time.time()
    results = {}
    if args.report_only:
        import json

        for seed in range(args.seeds):
            for _, arg in ENTRIES:
                for k in STEPS:
                    path = os.path.join(run_dir(args.workdir, arg, k, seed), "eval.json")
                    if os.path.isfile(path):
                        with open(path) as f:
                            results.setdefault(f"{arg}_k{k}", []).append(json.load(f))
        save_picture(args.workdir)
        print(write_outputs(args.workdir, results, 0.0))
        return
    for seed in range(args.first_seed, args.seeds):
        for _, arg in ENTRIES:
            for k in STEPS:
                config = make_config(arg, k, seed, args.steps)
                path = run_dir(args.workdir, arg, k, seed)
                t0 = time.time()
                metrics = common.train_run(config, path)
                results.setdefault(f"{arg}_k{k}", []).append(metrics)
                print(f"{path}: {time.time() - t0:.0f} s", flush=True)
                write_outputs(args.workdir, results, time.time() - start)
    save_picture(args.workdir)
    print(write_outputs(args.workdir, results, time.time() - start))


if __name__ == "__main__":
    main()
