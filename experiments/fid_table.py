"""The digits FID table: the EDM teacher at several NFE against one-step students.

    .venv/bin/python experiments/fid_table.py [--quick] [--workdir runs/fid_table] [--seeds 1]
        [--steps 200] [--methods dmd2,forward_kl,...] [--teacher_nfe 35,17,9,5]
        [--num_samples 1000] [--batch_size 64] [--critic_steps 2] [--generator_lr 5e-5]
        [--discriminator_lr 1e-3] [--teacher PATH] [--data_dir DIR]

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

Two-time-scale settings (the defaults): the discriminator head learns at 20x the generator's
rate with 2 critic updates per generator update. With all three learning rates at 1e-4 and one
critic update the generator moved faster than the head could follow: the head's loss stayed at
2 log 2 (r = 1), every f-divergence's weight h(r) was the same, and the students could not
differ. Each student row also reports the head's final loss and the std of log r.

Writes `<workdir>/results.md` (markdown), `results.json`, `samples.png` (one row per model, the
digits 0..9 from the same latents) and `fid_bar.png`. The default (7 students x 200 generator
steps, 1 seed) takes about 40 minutes on 2 CPU cores; `--quick` (3 students, 100 steps, 500
samples) a few minutes.
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
    return {"steps": 200, "methods": METHODS, "num_samples": 1000, "teacher_nfe": "35,17,9,5"}


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
    config.train.checkpoint_every = steps
    config.train.progress = False
    config.eval.num_samples = args.num_samples
    config.eval.batch_size = min(500, args.num_samples)
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
    nothing, r = 1, and every f-divergence's weight h(r) is the same.
    """
    results = dict(common.train_run(config, workdir))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
    for key in ("discriminator_loss", "std_log_r"):
        if key in last:
            results[f"train/{key}"] = last[key]
    return results, np.load(os.path.join(workdir, "samples.npy"))


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | NFE | seeds | digits FID | disc. loss | std log r |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        fid = f"{row['fid']:.2f}" + (f" ± {row['fid_std']:.2f}" if row["seeds"] > 1 else "")
        nfe = row["nfe"] if row["nfe"] else "-"
        disc = [f"{row[k]:.3f}" if k in row else "-" for k in ("disc_loss", "std_log_r")]
        lines.append(
            f"| {row['name']} | {nfe} | {row['seeds']} | {fid} | " + " | ".join(disc) + " |"
        )
    return "\n".join(lines) + "\n"


def save_grid(grids: dict[str, np.ndarray], path: str) -> str:
    """One row of GRID_COLUMNS images per model, in the order of `grids`, each pixel drawn as
    GRID_ZOOM x GRID_ZOOM (8x8 digits are too small to see otherwise)."""
    from didistill.eval.plots import save_image_grid

    images = np.concatenate([g[:GRID_COLUMNS] for g in grids.values()])  # [N, H, W, C]
    images = images.repeat(GRID_ZOOM, axis=1).repeat(GRID_ZOOM, axis=2)
    return save_image_grid(images, path, GRID_COLUMNS)


def plot(rows: list[dict], path: str) -> str:
    """Horizontal FID bars (grey: data and teacher rows, blue: students) with std error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/fid_table")
    parser.add_argument("--quick", action="store_true", help="3 students, 100 steps, 500 samples")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per student")
    parser.add_argument("--steps", type=int, default=None, help="generator steps (200; quick 100)")
    parser.add_argument("--methods", default=None, help=f"comma-separated among {METHODS}")
    parser.add_argument("--teacher_nfe", default=None, help="Heun NFEs (35,17,9,5; quick 35,9)")
    parser.add_argument("--num_samples", type=int, default=None, help="samples per model")
    parser.add_argument("--batch_size", type=int, default=64, help="generator batch (CPU-sized)")
    parser.add_argument("--critic_steps", type=int, default=2, help="critic updates per step")
    parser.add_argument("--generator_lr", type=float, default=5e-5, help="generator Adam LR")
    parser.add_argument("--discriminator_lr", type=float, default=1e-3, help="head Adam LR")
    parser.add_argument("--teacher", default=assets.path("digits/teacher.msgpack"))
    parser.add_argument("--data_dir", default="data/tfds", help="tfds data_dir of the digits")
    common.add_cache_flag(parser)
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "num_samples", "batch_size", "critic_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
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
            results, samples = run_student(config, workdir)
            runs[method].append(results)
            if seed == 0:
                grids[LABELS[method]] = samples[:GRID_COLUMNS]
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
        ):
            values = [r[key] for r in runs[method] if key in r]
            if values:
                rows[-1][name] = float(np.mean(values))
    header = (
        f"Digits FID (classifier features, {args.num_samples} samples vs the 297 test images); "
        f"students: {steps} generator steps from the teacher, mean ± std over {args.seeds} "
        f"seed(s); {time.perf_counter() - start:.0f} s on {jax.devices()[0].device_kind}."
    )
    report = markdown(rows, header)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(report)
    settings = {"steps": steps, "seeds": args.seeds, "methods": methods, "teacher_nfe": nfes}
    settings.update(teacher=args.teacher, num_samples=args.num_samples)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"settings": settings, "table": rows, "runs": runs}, f, indent=2)
    save_grid(grids, os.path.join(args.workdir, "samples.png"))
    plot(rows, os.path.join(args.workdir, "fid_bar.png"))
    print(report)
    return {"table": rows, "runs": runs}


if __name__ == "__main__":
    common.quiet_logs()
    main()
