"""A benchmark that separates mode-seeking from mode-covering students (issue 15, part 2).

    .venv/bin/python experiments/mode_benchmark.py [--quick] [--workdir runs/mode_benchmark]
        [--seeds 3] [--methods dmd2,forward_kl,jensen_shannon] [--steps 500]
        [--imbalance 30] [--teacher_steps 1000] [--num_samples 1000] [--teacher_samples 2000]
        [--batch_size 64] [--critic_steps 2] [--generator_lr 2e-4] [--discriminator_lr 1e-3]

The answer is known: the data are the digits train split subsampled to geometric class
frequencies (`config.data.imbalance` = max/min ratio, default 30: 32.2% of 0s down to 1.07%
of 9s, 462 images; `didistill/data/imbalance.py`), and an UNCONDITIONAL EDM teacher
(`configs/digits_teacher.py:uncond`, `--teacher_steps` steps) is trained on them in
`<workdir>/teacher`. Students are distilled from that teacher with the settings of
`experiments/fid_table.py` (its `student_config`: batch 64, 2 critic updates per generator
update, generator lr 2e-4, discriminator lr 1e-3, SiD's EMA with half-life 500k images and
ramp-up 0.05), on the same imbalanced data (the discriminator's real images), in
`<workdir>/<method>/seed<k>`. Every run is an ordinary engine run: a rerun reuses finished
runs and resumes interrupted ones; the teacher's samples are cached in the workdir.

Metrics, for the data, the teacher (Heun, `--teacher_nfe`), the initial generator (the
teacher's denoiser applied once at each student's sigma_g, where the students start) and each
student; samples are
classified by the shipped digits classifier (`assets/digits/classifier_teacher.msgpack`,
argmax of its logits; its penultimate layer is the feature space):
- the class histogram of the samples (`didistill/eval/class_histogram.py`);
- TV to the teacher's histogram and TV to the data's (the classifier's labels of the 462
  training images, so that both sides carry the same classifier errors);
- rare recall: the share of samples classified as the three rarest classes of the data
  (7, 8, 9) over the teacher's share (1: the student keeps what the teacher has; 0: dropped);
- improved precision and recall (Kynkäänniemi et al. 2019, k = 3) of the samples' features
  against the training images' features (`didistill/eval/precision_recall.py`);
- whether the discriminator learned: its final logged loss (2 log 2 = 1.386 means r = 1,
  nothing learned) and the std of log r, from the run's metrics.jsonl.
Students: mean ± sample std over `--seeds` training seeds. The teacher is one model (its
samples from seed 0's evaluation key), so its row has no std.

Writes `<workdir>/results.json`, `results.md`, `histogram.png` (class shares of data, teacher
and students, log scale) and `samples.png` (the first 10 samples of each model).
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
from experiments import common, fid_table  # noqa: E402

METHODS = ("dmd2", "forward_kl", "jensen_shannon", "uni_instruct", "sid")
DEFAULT_METHODS = ("dmd2", "forward_kl", "jensen_shannon")
LABELS = fid_table.LABELS
NUM_CLASSES = 10
NUM_RARE = 3
DATA, TEACHER = "data (imbalanced train split)", "teacher"


def teacher_config(args):
    """`configs/digits_teacher.py:uncond` on the imbalanced digits (`:smoke,uncond` with
    --tiny_teacher, for tests)."""
    from didistill.configs import digits_teacher

    config = digits_teacher.get_config("smoke,uncond" if args.tiny_teacher else "uncond")
    config.data.data_dir = args.data_dir
    config.data.imbalance = args.imbalance
    config.train.num_steps = args.teacher_steps
    config.train.progress = False
    return config


def student_config(method: str, seed: int, args):
    """fid_table's student on this teacher and the imbalanced data; no periodic FID."""
    config = fid_table.student_config(method, seed, args.steps, args)
    config.data.imbalance = args.imbalance
    config.eval.every = 0
    if args.tiny_teacher:  # the smoke settings of the networks the tiny teacher does not fix
        config.discriminator.resolutions = (8,)  # its one level
        config.discriminator.width = 8
        config.discriminator.num_layers = 1
    return config


def classifier_fn(path: str):
    """x [B, H, W, C] -> (logits [B, 10], features [B, F]) of the classifier file."""
    from didistill.nets.classifier import load_classifier

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--classifier={path!r} does not exist (see assets/README.md for the command that "
            "trains it)"
        )
    module, params, _ = load_classifier(path)
    return lambda x: module.apply(params, x, features=True)


def teacher_samples(teacher_file: str, num: int, nfe: int, workdir: str) -> np.ndarray:
    """num Heun samples [num, H, W, C] of the teacher at `nfe`, from seed 0's evaluation key;
    cached in `workdir/teacher_samples_<num>_nfe<nfe>.npy`."""
    path = os.path.join(workdir, f"teacher_samples_{num}_nfe{nfe}.npy")
    if os.path.isfile(path):
        return np.load(path)
    import jax

    from didistill.diffusion import edm
    from didistill.distill.one_step.images import load_teacher_unet
    from didistill.train.loop import run_keys

    net, variables, shape = load_teacher_unet(teacher_file)
    steps = edm.heun_steps_for_nfe(nfe)
    sample = jax.jit(
        lambda z: edm.heun_sample(lambda x, s: net.apply(variables, x, s, None), z, steps)
    )
    z = jax.random.normal(run_keys(0)[2], (num, *shape))
    samples = np.concatenate([np.asarray(sample(z[s : s + 500])) for s in range(0, num, 500)])
    np.save(path, samples)
    return samples


def initial_samples(teacher_file: str, num: int, sigmas) -> dict[float, np.ndarray]:
    """{sigma_g: [num, H, W, C]}: the teacher's denoiser applied once at each sigma_g to
    sigma_g z (seed 0's evaluation key), which is where the students start."""
    import jax
    import jax.numpy as jnp

    from didistill.distill.one_step.images import load_teacher_unet
    from didistill.train.loop import run_keys

    net, variables, shape = load_teacher_unet(teacher_file)
    one_step = jax.jit(lambda z, s: net.apply(variables, s * z, jnp.full(len(z), s), None))
    z = jax.random.normal(run_keys(0)[2], (num, *shape))
    return {s: np.asarray(one_step(z, s)) for s in sigmas}


def model_metrics(labels, features, data_hist, rare, real_features, teacher_hist=None) -> dict:
    """The benchmark's numbers of one sample set (see the module docstring)."""
    from didistill.eval import class_histogram as ch
    from didistill.eval.precision_recall import precision_recall

    hist = ch.histogram(labels, NUM_CLASSES)
    out = {"histogram": hist.tolist(), "tv_data": ch.total_variation(hist, data_hist)}
    if teacher_hist is not None:
        out["tv_teacher"] = ch.total_variation(hist, teacher_hist)
        out["rare_recall"] = ch.class_recall(hist, teacher_hist, rare)
    out["rare_share"] = float(hist[list(rare)].sum())
    out.update(precision_recall(real_features, features, k=3))
    return out


COLUMNS = (
    ("tv_teacher", "TV to teacher ↓"),
    ("tv_data", "TV to data ↓"),
    ("rare_share", "rarest-3 share"),
    ("rare_recall", "rare recall (1 = teacher)"),
    ("precision", "precision ↑"),
    ("recall", "recall ↑"),
    ("disc_loss", "disc. loss"),
    ("std_log_r", "std log r"),
)


def summarize(name: str, nfe: int, per_seed: list[dict]) -> dict:
    """Row {name, nfe, seeds, key: mean, key_std: sample std, histogram: mean} over seeds."""
    row = {"name": name, "nfe": nfe, "seeds": len(per_seed)}
    for key, _ in COLUMNS:
        values = [r[key] for r in per_seed if r.get(key) is not None]
        if values:
            row[key] = float(np.mean(values))
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    hists = np.asarray([r["histogram"] for r in per_seed])  # [seeds, K]
    row["histogram"] = hists.mean(0).tolist()
    row["histogram_std"] = (hists.std(0, ddof=1) if len(hists) > 1 else 0 * hists[0]).tolist()
    return row


def markdown(rows: list[dict], header: str, rare: list[int]) -> str:
    lines = [header, "", "| model | NFE | seeds | " + " | ".join(t for _, t in COLUMNS) + " |"]
    lines.append("|---|---|---|" + "---|" * len(COLUMNS))
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            if key not in row:
                cells.append("-")
            elif row["seeds"] > 1:
                cells.append(f"{row[key]:.3f} ± {row[key + '_std']:.3f}")
            else:
                cells.append(f"{row[key]:.3f}")
        nfe = row["nfe"] or "-"
        lines.append(f"| {row['name']} | {nfe} | {row['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "Class histograms (% of samples per classified digit; mean over seeds):", ""]
    lines.append("| model | " + " | ".join(str(k) for k in range(NUM_CLASSES)) + " |")
    lines.append("|---|" + "---|" * NUM_CLASSES)
    for row in rows:
        cells = [f"{100 * h:.1f}" for h in row["histogram"]]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines.append(f"\nRarest classes of the data: {rare}.")
    return "\n".join(lines) + "\n"


def plot_histograms(rows: list[dict], path: str) -> str:
    """Grouped bars: the share of each class per model (log scale), seed std as error bars."""
    from matplotlib.figure import Figure

    from didistill.eval.plots import save_figure

    fig = Figure(figsize=(9.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rows)
    x = np.arange(NUM_CLASSES)
    for i, row in enumerate(rows):
        ax.bar(
            x + (i - (len(rows) - 1) / 2) * width,
            np.maximum(row["histogram"], 1e-4),
            width,
            yerr=row["histogram_std"],
            label=row["name"],
            capsize=1.5,
        )
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xlabel("class (classifier's argmax)")
    ax.set_ylabel("share of samples")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/mode_benchmark")
    parser.add_argument("--quick", action="store_true", help="1 seed, 100 steps, 500 samples")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds (3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="generator steps (500; quick 100)")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"among {METHODS}, or none"
    )
    parser.add_argument("--imbalance", type=float, default=30.0, help="max/min class frequency")
    parser.add_argument("--teacher_steps", type=int, default=1000, help="teacher training steps")
    parser.add_argument("--teacher_nfe", type=int, default=35, help="teacher Heun NFE")
    parser.add_argument("--num_samples", type=int, default=None, help="per student (1000)")
    parser.add_argument("--teacher_samples", type=int, default=None, help="teacher (2000)")
    parser.add_argument("--batch_size", type=int, default=64, help="generator batch")
    parser.add_argument("--critic_steps", type=int, default=2, help="critic updates per step")
    parser.add_argument("--generator_lr", type=float, default=2e-4, help="generator Adam LR")
    parser.add_argument("--discriminator_lr", type=float, default=1e-3, help="head Adam LR")
    parser.add_argument("--ema_halflife_kimg", type=float, default=500.0, help="SiD's EMA")
    parser.add_argument("--ema_rampup", type=float, default=0.05, help="SiD's EMA ramp-up")
    parser.add_argument("--classifier", default=assets.path("digits/classifier_teacher.msgpack"))
    parser.add_argument("--data_dir", default="data/tfds", help="tfds data_dir of the digits")
    parser.add_argument("--train_only", action="store_true", help="train the runs, no table")
    parser.add_argument("--tiny_teacher", action="store_true", help="tests: a tiny teacher")
    common.add_cache_flag(parser)
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds or (1 if quick else 3)
    args.steps = args.steps or (100 if quick else 500)
    args.num_samples = args.num_samples or (500 if quick else 1000)
    args.teacher_samples = args.teacher_samples or (1000 if quick else 2000)
    for name in ("seeds", "steps", "num_samples", "teacher_samples", "teacher_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
    if not args.imbalance > 1:
        parser.error(f"--imbalance={args.imbalance}: must be > 1 (max/min class frequency)")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if methods == ("none",):  # the data and teacher rows only
        methods = ()
    elif not methods or sorted(set(methods) - set(METHODS)):
        parser.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; valid: {METHODS}")
    # fid_table.student_config reads these
    args.eval_every, args.curve_samples = 0, 1

    from didistill.data.images import load_arrays
    from didistill.eval import class_histogram as ch

    common.use_compilation_cache(args.workdir, args.jax_cache)
    start = time.perf_counter()
    os.makedirs(args.workdir, exist_ok=True)
    classify_fn = classifier_fn(args.classifier)

    # the teacher, trained (or reused) in <workdir>/teacher
    tconfig = teacher_config(args)
    teacher_dir = os.path.join(args.workdir, "teacher")
    if os.path.isfile(os.path.join(teacher_dir, "eval.json")):  # finished: no lock needed,
        from didistill.train import workdir as workdir_lib  # so processes can share it

        workdir_lib.check_fingerprint(tconfig, teacher_dir, write=False)
    else:
        common.train_run(tconfig, teacher_dir)
    args.teacher = os.path.join(teacher_dir, "teacher.msgpack")
    print(f"teacher ready ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.train_only:  # e.g. one process per method; a later run without it makes the table
        for method in methods:
            for seed in range(args.seeds):
                workdir = os.path.join(args.workdir, method, f"seed{seed}")
                common.train_run(student_config(method, seed, args), workdir)
                print(f"{method} seed {seed} trained ({time.perf_counter() - start:.0f} s)")
        return {}

    data = load_arrays(tconfig.data)
    data_labels, real_features = ch.classify(classify_fn, data["image"])
    data_hist = ch.histogram(data_labels, NUM_CLASSES)
    true_hist = ch.histogram(data["label"], NUM_CLASSES)
    rare = ch.rarest(true_hist, NUM_RARE)
    grids = {DATA: data["image"][[int(np.flatnonzero(data["label"] == k)[0]) for k in range(10)]]}

    samples = teacher_samples(args.teacher, args.teacher_samples, args.teacher_nfe, args.workdir)
    labels, feats = ch.classify(classify_fn, samples)
    teacher = model_metrics(labels, feats, data_hist, rare, real_features)
    teacher_hist = np.asarray(teacher["histogram"])
    teacher["tv_teacher"], teacher["rare_recall"] = 0.0, 1.0
    grids[TEACHER] = samples[:10]
    data_row = model_metrics(
        data_labels, real_features, data_hist, rare, real_features, teacher_hist
    )
    rows = [summarize(DATA, 0, [data_row]), summarize(TEACHER, args.teacher_nfe, [teacher])]
    sigmas = sorted({float(student_config(m, 0, args).generator.sigma) for m in methods} or {80.0})
    for sigma, x in initial_samples(args.teacher, args.num_samples, sigmas).items():
        labels, feats = ch.classify(classify_fn, x)
        initial = model_metrics(labels, feats, data_hist, rare, real_features, teacher_hist)
        rows.append(summarize(fid_table.initial_row(sigma), 1, [initial]))
        grids[rows[-1]["name"]] = x[:10]
    elapsed = time.perf_counter() - start
    print(f"teacher sampled, TV to data {teacher['tv_data']:.3f} ({elapsed:.0f} s)", flush=True)

    runs: dict[str, list[dict]] = {}
    for method in methods:
        runs[method] = []
        for seed in range(args.seeds):
            workdir = os.path.join(args.workdir, method, f"seed{seed}")
            results, student = fid_table.run_student(student_config(method, seed, args), workdir)
            labels, feats = ch.classify(classify_fn, student)
            metrics = model_metrics(labels, feats, data_hist, rare, real_features, teacher_hist)
            metrics["disc_loss"] = results.get("train/discriminator_loss")
            metrics["std_log_r"] = results.get("train/std_log_r")
            metrics["train_seconds"] = results.get("train_seconds")
            metrics["feature_fid"] = results.get("student/feature_fid")
            runs[method].append(metrics)
            if seed == 0:
                grids[LABELS[method]] = student[:10]
            print(
                f"{method:>16s} seed {seed}: TV to teacher {metrics['tv_teacher']:.3f}, rare "
                f"recall {metrics['rare_recall']:.2f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        rows.append(summarize(LABELS[method], 1, runs[method]))

    import jax

    wall = time.perf_counter() - start
    header = (
        f"Imbalanced digits (max/min {args.imbalance:g}, {len(data['label'])} "
        f"training images); unconditional teacher, {args.teacher_steps} steps, Heun "
        f"{args.teacher_nfe} NFE, {args.teacher_samples} samples; "
        + (
            f"students {args.steps} generator steps, {args.num_samples} samples, mean ± std "
            f"over {args.seeds} seed(s); "
            if methods
            else "no students (--methods=none); "
        )
        + f"{wall:.0f} s on {jax.devices()[0].device_kind}."
    )
    report = markdown(rows, header, rare)
    settings = {k: v for k, v in vars(args).items() if k not in ("eval_every", "curve_samples")}
    settings.update(methods=methods, rare_classes=rare, true_histogram=true_hist.tolist())
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"settings": settings, "table": rows, "runs": runs, "wall_s": wall}, f, indent=2)
    plot_histograms(rows, os.path.join(args.workdir, "histogram.png"))
    fid_table.save_grid(grids, os.path.join(args.workdir, "samples.png"))
    print(report)
    return {"table": rows, "runs": runs}


if __name__ == "__main__":
    common.quiet_logs()
    main()
