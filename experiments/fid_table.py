"""The digits FID table: the EDM teacher at several NFE against one-step students.

    .venv/bin/python experiments/fid_table.py [--quick] [--workdir runs/fid_table] [--seeds 1]
        [--steps 500] [--methods dmd2,forward_kl,...] [--teacher_nfe 35,17,13,11,9,5]
        [--num_samples 1000] [--batch_size 64] [--critic_steps 2] [--generator_lr 2e-4]
        [--discriminator_lr 1e-3] [--ema_halflife_kimg 500] [--ema_rampup 0.05]
        [--eval_every 50] [--curve_samples 1000] [--teacher PATH] [--data_dir DIR]

Rows:
- 'digits train split': the real training images, the floor of the metric;
- 'teacher, Heun NFE n': the teacher (`--teacher`, default the shipped
  `assets/digits/teacher.msgpack`) sampled deterministically with Heun's method (EDM) at each
  `--teacher_nfe`;
- 'initial generator (NFE 1, sigma_g s)': the teacher's denoiser applied once at sigma_g = s,
  which is where the students start (`generator.init = 'teacher'`; sigma_g is 80 for DMD2 and
  f-distill, 2.5 for SiD and Uni-Instruct), so the students' gain is measured from it;
- one row per student method of `configs/digits_distill.py` (`dmd2` = reverse KL,
  `forward_kl`, `jensen_shannon`, `squared_hellinger`, `jeffreys` = f-distill, `uni_instruct`
  (forward KL) and `sid`), each trained by `didistill.train.loop.train` in
  `<workdir>/<method>/seed<k>`: ordinary engine runs, so a rerun reuses finished runs (their
  eval.json) and resumes interrupted ones. Use a new workdir after changing code or configs.

FID protocol (the embedded default; not comparable with Inception FIDs): features are the
penultimate layer of the shipped digits classifier (`assets/digits/classifier_teacher.msgpack`);
the reference statistics are those of the whole test split (297 images); each model draws
`--num_samples` samples (default 1,000) with labels cycling 0..9 from the engine's evaluation
key of its seed (the teacher rows: seed 0's);
the table reports the mean and sample std over `--seeds` training seeds (never the minimum).
Teacher rows have no training seed (one row, std 0).

Student settings (the defaults, sized for 2 CPU cores; the config's GPU values are batch 128,
5 critic updates, one learning rate 1e-4 and EMA 0.999):
- two time scales: the discriminator head learns at 1e-3, the generator at 2e-4, with 2 critic
  updates per generator update. With all three learning rates at 1e-4 and one critic update the
  generator moved faster than the head could follow: the head's loss stayed at 2 log 2 (r = 1),
  every f-divergence's weight h(r) was the same, and the students could not differ;
- SiD's EMA for every student (half-life min(500k images, 0.05 x images seen)). A fixed decay
  of 0.999 is a 1,000-step average: after a few hundred steps the evaluated EMA generator is
  still mostly the initial one (0.999^200 = 0.82 of its weight), which held every student of the
  first table at FID 42 from a start of 60 while the raw generator had moved on;
- 500 generator steps, with the periodic digits FID of `--curve_samples` samples every
  `--eval_every` steps: the FID-vs-step curve that shows whether a run had converged.
Each student row also reports the head's final loss, the std of log r and the training minutes
(compilation included, evaluations excluded); a second table gives the training steps and
minutes until each student's curve first reaches the teacher's FID at each NFE (the cost of
distillation, against the teacher's own training time in assets/README.md).

Writes `<workdir>/results.md` (markdown), `results.json`, `samples.png` (one row per model, the
digits 0..9 from the same latents), `fid_bar.png` and `fid_vs_step.png`. `--quick` (3
students, 100 steps, 500 samples) takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `experiments` is a folder of the repository, not a package

from didistill import assets  # noqa: E402
from didistill.configs import digits_distill  # noqa: E402
from experiments import common  # noqa: E402

METHODS = (
    "dmd2",
    "forward_kl",
    "jensen_shannon",
    "squared_hellinger",
    "jeffreys",
    "uni_instruct",
    "sid",
)
QUICK_METHODS = ("dmd2", "forward_kl", "uni_instruct")
LABELS = {
    "dmd2": "DMD2 (reverse KL)",
    "forward_kl": "f-distill forward KL",
    "jensen_shannon": "f-distill Jensen-Shannon",
    "squared_hellinger": "f-distill squared Hellinger",
    "jeffreys": "f-distill Jeffreys",
    "uni_instruct": "Uni-Instruct (forward KL)",
    "sid": "SiD",
}
REAL = "digits train split"


def initial_row(sigma_g: float) -> str:
    return f"initial generator (NFE 1, sigma_g {sigma_g:g})"


GRID_COLUMNS = 10  # the digits 0..9
GRID_ZOOM = 4


def _settings(quick: bool) -> dict:
    if quick:
        return {"steps": 100, "methods": QUICK_METHODS, "num_samples": 500, "teacher_nfe": "35,9"}
    return {"steps": 500, "methods": METHODS, "num_samples": 1000, "teacher_nfe": "35,17,13,11,9,5"}


def student_config(method: str, seed: int, steps: int, args):
    """`configs/digits_distill.py:<method>` with the table's settings."""
    config = digits_distill.get_config(method)
    config.seed = seed
    config.teacher.checkpoint = args.teacher
    config.data.data_dir = args.data_dir
    config.train.num_steps = steps
    config.train.batch_size = args.batch_size
    config.distill.critic_steps = args.critic_steps
    config.optim_generator.learning_rate = args.generator_lr
    config.optim_discriminator.learning_rate = args.discriminator_lr
    # SiD's EMA for every student: half-life min(ema_halflife, ema_rampup x images seen)
    config.distill.ema_halflife_images = args.ema_halflife_kimg * 1000.0
    config.distill.ema_rampup_ratio = args.ema_rampup
    config.train.checkpoint_every = min(steps, 200)
    config.train.progress = False
    config.eval.num_samples = args.num_samples
    config.eval.batch_size = min(500, args.num_samples)
    config.eval.every = args.eval_every  # the FID-vs-step curve
    config.eval.periodic_samples = args.curve_samples
    config.eval.grid_samples = GRID_COLUMNS
    config.eval.teacher_nfe = 0  # the teacher rows are computed once, below
    return config


def teacher_rows(config, nfes, num_samples: int, sigmas):
    """FID rows and sample grids of the real data, the teacher at each NFE and the initial
    generator at each sigma_g of `sigmas`, all from the evaluation key the students use
    (`train.loop.run_keys`)."""
    import jax
    import jax.numpy as jnp

    from didistill.data.images import load_arrays
    from didistill.diffusion import edm
    from didistill.distill.one_step.images import load_teacher_unet
    from didistill.eval.fid import classifier_fid
    from didistill.train.loop import run_keys

    fid_fn = classifier_fid(config)
    if fid_fn is None:
        raise FileNotFoundError(
            f"the digits FID needs the classifier {config.eval.feature_checkpoint!r} "
            "(see assets/README.md for the command that trains it)"
        )
    net, variables, shape = load_teacher_unet(config.teacher.checkpoint)
    eval_key = run_keys(0)[2]
    z = jax.random.normal(eval_key, (num_samples, *shape))
    labels = jnp.arange(num_samples) % net.label_dim if net.label_dim else None

    def heun(z, labels, steps):
        return edm.heun_sample(lambda x, s: net.apply(variables, x, s, labels), z, steps)

    heun = jax.jit(heun, static_argnums=2)
    one_step = jax.jit(lambda z, y, s: net.apply(variables, s * z, jnp.full(len(z), s), y))
    data = load_arrays(config.data)
    rows, grids = [], {}

    def add(name, samples, nfe):
        rows.append({"name": name, "nfe": nfe, "seeds": 1, "fid": fid_fn(samples), "fid_std": 0.0})
        grids[name] = np.asarray(samples[:GRID_COLUMNS])

    add(REAL, data["image"], 0)
    grids[REAL] = data["image"][[int(np.flatnonzero(data["label"] == k)[0]) for k in range(10)]]
    for nfe in nfes:
        steps = edm.heun_steps_for_nfe(nfe)
        chunks = [
            heun(z[s : s + 500], None if labels is None else labels[s : s + 500], steps)
            for s in range(0, num_samples, 500)
        ]
        add(f"teacher, Heun NFE {edm.heun_nfe(steps)}", np.concatenate(chunks), edm.heun_nfe(steps))
    for sigma_g in sigmas:
        add(initial_row(sigma_g), np.asarray(one_step(z, labels, sigma_g)), 1)
    return rows, grids


def run_student(config, workdir: str) -> tuple[dict, np.ndarray]:
    """(eval results, student samples [N, H, W, C]) of one engine run (reused when finished).

    The results also hold the discriminator's loss and the std of log r over the last logged
    `train.log_every` steps (`train/...`): 2 log 2 and 0 mean the discriminator has learned
    nothing, r = 1, and every f-divergence's weight h(r) is the same; `curve`, the
    [[step, FID of `eval.periodic_samples` samples, training seconds]] of the periodic
    evaluations; and `train_seconds`, the wall time of training (first to last log line,
    evaluations excluded: the time of a log line minus the evaluation time before it).
    """
    results = dict(common.train_run(config, workdir))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f.read().splitlines()]
    train_lines = [m for m in lines if "discriminator_loss" in m or "generator_loss" in m]
    for key in ("discriminator_loss", "std_log_r"):
        if key in train_lines[-1]:
            results[f"train/{key}"] = train_lines[-1][key]
    results["curve"] = training_curve(lines)
    results["train_seconds"] = results["curve"][-1][2] if results["curve"] else None
    return results, np.load(os.path.join(workdir, "samples.npy"))


def training_curve(lines: list[dict]) -> list[list[float]]:
    """[[step, periodic feature FID, training seconds]] from a run's metrics.jsonl lines.

    Training seconds at a step add up the engine's log windows before it (steps / steps_per_sec,
    which leaves out evaluations, includes compilation in the first window and, in a resumed
    run, the restart's compilation), interpolated inside a window.
    """
    steps, seconds = [0], [0.0]
    for m in lines:
        if m.get("steps_per_sec"):
            seconds.append(seconds[-1] + (m["step"] - steps[-1]) / m["steps_per_sec"])
            steps.append(m["step"])
    points = [(m["step"], m["eval/feature_fid"]) for m in lines if "eval/feature_fid" in m]
    return [[step, fid, float(np.interp(step, steps, seconds))] for step, fid in points]


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | NFE | seeds | digits FID | disc. loss | std log r | train min |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fid = f"{row['fid']:.2f}" + (f" ± {row['fid_std']:.2f}" if row["seeds"] > 1 else "")
        nfe = row["nfe"] if row["nfe"] else "-"
        disc = [f"{row[k]:.3f}" if k in row else "-" for k in ("disc_loss", "std_log_r")]
        minutes = f"{row['train_seconds'] / 60:.1f}" if "train_seconds" in row else "-"
        lines.append(
            f"| {row['name']} | {nfe} | {row['seeds']} | {fid} | "
            + " | ".join(disc)
            + f" | {minutes} |"
        )
    return "\n".join(lines) + "\n"


def distillation_cost(runs: dict[str, list[dict]], teacher_fid: dict[int, float]) -> list[dict]:
    """Per method: the first curve point at or below the teacher's FID at each NFE of
    `teacher_fid` (its step and training seconds; None if never reached), per seed."""
    cost = []
    for method, seeds in runs.items():
        for nfe, target in sorted(teacher_fid.items()):
            hits = [next((p for p in r.get("curve", []) if p[1] <= target), None) for r in seeds]
            cost.append(
                {
                    "method": method,
                    "teacher_nfe": nfe,
                    "teacher_fid": target,
                    "reached": sum(h is not None for h in hits),
                    "seeds": len(hits),
                    "steps": [h[0] if h else None for h in hits],
                    "seconds": [h[2] if h else None for h in hits],
                }
            )
    return cost


def cost_markdown(cost: list[dict], teacher_fid: dict[int, float]) -> str:
    """Training steps and minutes until a student's curve first reaches the teacher's FID at
    each NFE (mean over the seeds that reached it)."""
    nfes = sorted(teacher_fid)
    lines = [
        "Training until the curve first reaches the teacher's FID (steps / minutes, mean over "
        "the seeds that reached it; n/N seeds):",
        "",
        "| student | " + " | ".join(f"teacher {n} NFE ({teacher_fid[n]:.2f})" for n in nfes) + " |",
        "|---|" + "---|" * len(nfes),
    ]
    for method in dict.fromkeys(c["method"] for c in cost):
        cells = []
        for nfe in nfes:
            c = next(c for c in cost if c["method"] == method and c["teacher_nfe"] == nfe)
            if not c["reached"]:
                cells.append(f"not reached (0/{c['seeds']})")
                continue
            steps = np.mean([s for s in c["steps"] if s is not None])
            minutes = np.mean([s for s in c["seconds"] if s is not None]) / 60
            cells.append(f"{steps:.0f} / {minutes:.1f} ({c['reached']}/{c['seeds']})")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict[str, list[dict]], teacher_fid: dict[int, float], path: str) -> str:
    """FID of the periodic evaluations against the generator step, one line per method (mean
    over seeds, band min..max), the teacher's FID at each NFE as dashed lines."""
    from matplotlib.figure import Figure

    from didistill.eval.plots import save_figure

    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for method, seeds in runs.items():
        curves = [np.asarray(r["curve"], np.float64) for r in seeds if r.get("curve")]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        fids = np.stack([c[:length, 1] for c in curves])  # [seeds, points]
        steps = curves[0][:length, 0]
        (line,) = ax.plot(steps, fids.mean(0), label=LABELS[method])
        if len(curves) > 1:
            ax.fill_between(steps, fids.min(0), fids.max(0), color=line.get_color(), alpha=0.2)
    for nfe, value in sorted(teacher_fid.items()):
        if value < 50:  # the teachers in the students' range (not the broken 5-NFE sampler)
            ax.axhline(value, color="gray", linestyle="--", linewidth=0.8)
            ax.text(
                0.99,
                value,
                f"teacher {nfe} NFE",
                transform=ax.get_yaxis_transform(),
                fontsize=7,
                color="gray",
                ha="right",
                va="bottom",
            )
    ax.set_yscale("log")
    ax.set_xlabel("generator step")
    ax.set_ylabel("digits feature FID (periodic samples)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_grid(grids: dict[str, np.ndarray], path: str) -> str:
    """One row of GRID_COLUMNS images per model, in the order of `grids`, each pixel drawn as
    GRID_ZOOM x GRID_ZOOM (8x8 digits are too small to see otherwise)."""
    from didistill.eval.plots import save_image_grid

    images = np.concatenate([g[:GRID_COLUMNS] for g in grids.values()])  # [N, H, W, C]
    images = images.repeat(GRID_ZOOM, axis=1).repeat(GRID_ZOOM, axis=2)
    return save_image_grid(images, path, GRID_COLUMNS)


def plot(rows: list[dict], path: str) -> str:
    """Horizontal FID bars (grey: data and teacher rows, blue: students) with std error bars."""
    from matplotlib.figure import Figure

    from didistill.eval.plots import save_figure

    fig = Figure(figsize=(7.0, 0.35 * len(rows) + 1.0))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(rows))
    students = [row["name"] in LABELS.values() for row in rows]
    ax.barh(
        y,
        [row["fid"] for row in rows],
        xerr=[row["fid_std"] for row in rows],
        color=["tab:blue" if s else "tab:gray" for s in students],
        capsize=2,
    )
    ax.set_yticks(y, [row["name"] for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("digits feature FID (lower is better)")
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/fid_table")
    parser.add_argument("--quick", action="store_true", help="3 students, 100 steps, 500 samples")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per student")
    parser.add_argument("--steps", type=int, default=None, help="generator steps (500; quick 100)")
    parser.add_argument("--methods", default=None, help=f"comma-separated among {METHODS}")
    parser.add_argument(
        "--teacher_nfe", default=None, help="Heun NFEs (35,17,13,11,9,5; quick 35,9)"
    )
    parser.add_argument("--num_samples", type=int, default=None, help="samples per model")
    parser.add_argument("--batch_size", type=int, default=64, help="generator batch (CPU-sized)")
    parser.add_argument("--critic_steps", type=int, default=2, help="critic updates per step")
    parser.add_argument("--generator_lr", type=float, default=2e-4, help="generator Adam LR")
    parser.add_argument("--discriminator_lr", type=float, default=1e-3, help="head Adam LR")
    parser.add_argument("--ema_halflife_kimg", type=float, default=500.0, help="SiD's EMA")
    parser.add_argument("--ema_rampup", type=float, default=0.05, help="SiD's EMA ramp-up")
    parser.add_argument("--eval_every", type=int, default=50, help="curve: FID every N steps")
    parser.add_argument("--curve_samples", type=int, default=1000, help="samples per curve FID")
    parser.add_argument("--teacher", default=assets.path("digits/teacher.msgpack"))
    parser.add_argument("--data_dir", default="data/tfds", help="tfds data_dir of the digits")
    parser.add_argument(
        "--finished_only",
        action="store_true",
        help="train nothing: the table of the runs already finished in --workdir",
    )
    common.add_cache_flag(parser)
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "num_samples", "batch_size", "critic_steps", "curve_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
    if args.eval_every < 0:
        parser.error(f"--eval_every={args.eval_every}: must be >= 0 (0: no FID-vs-step curve)")
    settings = _settings(args.quick)
    steps = args.steps or settings["steps"]
    args.num_samples = args.num_samples or settings["num_samples"]
    methods = settings["methods"]
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if sorted(set(methods) - set(METHODS)):
        parser.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; valid: {METHODS}")
    nfes = [int(n) for n in (args.teacher_nfe or settings["teacher_nfe"]).split(",")]

    import jax

    common.use_compilation_cache(args.workdir, args.jax_cache)
    start = time.perf_counter()
    configs = [student_config(method, 0, steps, args) for method in methods]
    sigmas = sorted({float(c.generator.sigma) for c in configs}, reverse=True)
    rows, grids = teacher_rows(configs[0], nfes, args.num_samples, sigmas)
    for row in rows:
        print(f"{row['name']:>28s}: FID {row['fid']:.2f} ({time.perf_counter() - start:.0f} s)")
    runs: dict[str, list[dict]] = {}
    for method in methods:
        runs[method] = []
        for seed in range(args.seeds):
            config = student_config(method, seed, steps, args)
            workdir = os.path.join(args.workdir, method, f"seed{seed}")
            if args.finished_only and not os.path.isfile(os.path.join(workdir, "eval.json")):
                continue
            results, samples = run_student(config, workdir)
            runs[method].append(results)
            if len(runs[method]) == 1:
                grids[LABELS[method]] = samples[:GRID_COLUMNS]
        if not runs[method]:
            del runs[method]
            continue
            print(
                f"{method:>28s} seed {seed}: FID {results['student/feature_fid']:.2f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        fids = np.asarray([r["student/feature_fid"] for r in runs[method]], np.float64)
        rows.append(
            {
                "name": LABELS[method],
                "nfe": 1,
                "seeds": len(fids),
                "fid": float(fids.mean()),
                "fid_std": float(fids.std(ddof=1)) if len(fids) > 1 else 0.0,
            }
        )
        for key, name in (
            ("train/discriminator_loss", "disc_loss"),
            ("train/std_log_r", "std_log_r"),
            ("train_seconds", "train_seconds"),
        ):
            values = [r[key] for r in runs[method] if r.get(key) is not None]
            if values:
                rows[-1][name] = float(np.mean(values))
    header = (
        f"Digits FID (classifier features, {args.num_samples} samples vs the 297 test images); "
        f"students: {steps} generator steps from the teacher, mean ± std over the seeds "
        f"column (of {args.seeds} asked); {time.perf_counter() - start:.0f} s on "
        f"{jax.devices()[0].device_kind}."
    )
    report = markdown(rows, header)
    teacher_fid = {row["nfe"]: row["fid"] for row in rows if row["name"].startswith("teacher")}
    cost = distillation_cost(runs, teacher_fid)
    if cost:
        report += "\n" + cost_markdown(cost, teacher_fid)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(report)
    settings = {**vars(args), "steps": steps, "methods": list(runs), "teacher_nfe": nfes}
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"settings": settings, "table": rows, "cost": cost, "runs": runs}, f, indent=2)
    save_grid(grids, os.path.join(args.workdir, "samples.png"))
    plot(rows, os.path.join(args.workdir, "fid_bar.png"))
    plot_curves(runs, teacher_fid, os.path.join(args.workdir, "fid_vs_step.png"))
    print(report)
    return {"table": rows, "runs": runs}


if __name__ == "__main__":
    common.quiet_logs()
    main()
