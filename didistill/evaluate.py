"""Evaluate and export the checkpoints of an image one-step run, after (or during) training.

    python -m didistill.evaluate --workdir=DIR [--steps=all|last|N,M,...] [--num_samples=N]
        [--seeds=S] [--batch_size=B] [--inception=FILE] [--reference=FILE] [--teacher=FILE]
        [--grid=64] [--export=FILE] [--export_only]

For each selected checkpoint of `DIR/checkpoints` (default `last`) it restores the EMA
generator and writes `DIR/eval/<step>/fid.json` (the Inception FID per seed set, min / mean /
std and the protocol: samples, sample indices, reference and feature-network SHA-256; see
`didistill.eval.generator_fid`) and `DIR/eval/<step>/samples.png` (the first `--grid` samples
of the protocol: the same noise and labels at every step). `DIR/eval/fid_vs_step.json` collects
{step: fid} over every evaluated step, for a FID-vs-step curve (keep checkpoints with
`config.train.keep_period`). The run's `config.json` gives the method, the teacher and
`config.eval.fid`; the flags override the FID settings (EDM's table protocol: `--seeds=3`, min
of three sets of 50,000) and the teacher path (a run moved to another machine).

`--export=FILE` writes the EMA generator of the last selected step alone (parameters and
architecture, `didistill.distill.one_step.image_generator`), which `python -m
didistill.sample --params=FILE` draws images from without the training state; with
`--export_only` no FID is computed.

Every bad input (no run, no checkpoint, a checkpoint of another architecture, missing Inception
or reference files, a reference of another resolution, a sample count that does not split
over the devices) is one line `didistill.evaluate: error: ...` and exit status 1 or 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

PROG = "didistill.evaluate"


class EvaluateError(Exception):
    pass


def _fail(message: str, code: int = 1):
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def read_run_config(workdir: str):
    """The ConfigDict of a run directory (its config.json)."""
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise EvaluateError(
            f"--workdir={workdir}: no config.json there; give the directory of a run started "
            "with python -m didistill.main"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def select_steps(spec: str, available: list[int]) -> list[int]:
    """'all' | 'last' | 'N,M,...' -> steps among `available` (EvaluateError if one is absent)."""
    if not available:
        raise EvaluateError("no checkpoints to evaluate")
    if spec == "all":
        return list(available)
    if spec == "last":
        return [available[-1]]
    try:
        wanted = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise EvaluateError(f"--steps={spec!r}: give all, last or steps like 5000,10000") from None
    missing = [s for s in wanted if s not in available]
    if missing or not wanted:
        raise EvaluateError(f"--steps={spec}: no checkpoint at {missing}; available: {available}")
    return wanted


def _generator(config):
    from didistill.distill.one_step.image_generator import from_network_file

    if config.get("data", {}).get("kind") != "images" or "generator" not in config:
        raise EvaluateError(
            f"this run (method {config.get('method')!r}) is not an image one-step run "
            "(config.data.kind='images'): didistill.evaluate evaluates those"
        )
    generator, _ = from_network_file(config.teacher.checkpoint, config.generator.sigma)
    generator = dataclasses.replace(
        generator,
        num_steps=int(config.generator.get("num_steps", 1)),
        sigma_min=float(config.distill.sigma_min),
    )
    dtype = config.get("model", {}).get("compute_dtype", "float32")
    return generator.with_dtype(dtype)


def _settings(config, args):
    from didistill.eval.generator_fid import FIDSettings

    block = config.eval.get("fid") if "eval" in config else None
    if args.inception is not None or args.reference is not None:
        import ml_collections

        block = ml_collections.ConfigDict(dict(block or {}))
        for key in ("inception", "reference"):
            if getattr(args, key) is not None:
                block[key] = getattr(args, key)
    settings = FIDSettings.from_config({"fid": block} if block is not None else None)
    if settings is None:
        raise EvaluateError(
            "config.eval.fid.inception is empty in this run's config: pass --inception=FILE "
            "(python -m didistill.prepare inception) and --reference=FILE"
        )
    return settings.replace(
        num_samples=args.num_samples, seeds=args.seeds, batch_size=args.batch_size
    )


def evaluate_run(args) -> dict:
    """Evaluates (and exports) as the flags say; returns {step: fid.json contents}."""
    import jax
    import numpy as np

    from didistill.distill import get_method
    from didistill.distill.one_step.image_generator import save_generator
    from didistill.eval import generator_fid, plots
    from didistill.train import reporting
    from didistill.train.checkpoint import Checkpointer
    from didistill.train.errors import CheckpointError
    from didistill.train.loop import CHECKPOINT_DIR, load_checkpoint

    workdir = args.workdir
    config = read_run_config(workdir)
    if args.teacher:
        config.teacher.checkpoint = args.teacher
    generator = _generator(config)
    settings = None if args.export_only else _settings(config, args)
    if settings is not None:
        generator_fid.check_divisible(settings.num_samples, settings.batch_size)
        generator_fid.check_files(settings, generator.image_shape)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        raise EvaluateError(f"--workdir={workdir}: no checkpoints directory {ckpt_dir}")
    with Checkpointer(ckpt_dir, config.train.keep_checkpoints) as c:
        steps = select_steps(args.steps, c.steps())
    method = get_method(config)
    results, curve_path = {}, os.path.join(workdir, "eval", "fid_vs_step.json")
    curve = {}
    if os.path.isfile(curve_path):
        with open(curve_path) as f:
            curve = json.load(f)
    is_main = jax.process_index() == 0
    for step in steps:
        try:
            step, state = load_checkpoint(method, config, workdir, step)
        except (CheckpointError, ValueError) as err:
            raise EvaluateError(
                f"{err} -- the networks' architecture comes from config.teacher.checkpoint="
                f"{config.teacher.checkpoint}: is it the teacher this run was trained from? "
                "(--teacher=FILE overrides it)"
            ) from err
        params = state.generator_ema
        if args.export and step == steps[-1]:
            source = {"workdir": os.path.abspath(workdir), "step": step, "method": config.method}
            if is_main:
                save_generator(args.export, generator, params, source=source)
            print(f"exported the EMA generator of step {step} to {args.export}")
        if settings is None:
            continue
        out_dir = os.path.join(workdir, "eval", str(step))
        record = generator_fid.evaluate_fid(
            generator, params, settings, generator.image_shape, generator.num_classes
        )
        record = {"step": step, **record}
        if is_main:
            os.makedirs(out_dir, exist_ok=True)
            reporting.write_json(os.path.join(out_dir, "fid.json"), record)
            n = min(args.grid, settings.num_samples)
            z, labels = generator_fid.sample_inputs(
                np.arange(n), generator.image_shape, generator.num_classes
            )
            grid = np.asarray(jax.jit(generator)(params, z, labels))
            plots.save_image_grid(grid, os.path.join(out_dir, "samples.png"))
            curve[str(step)] = record["fid"]
            reporting.write_json(curve_path, dict(sorted(curve.items(), key=lambda i: int(i[0]))))
        results[step] = record
        print(
            f"step {step}: FID {record['fid']:.4f} (min of {settings.seeds}, mean "
            f"{record['fid_mean']:.4f}, {settings.num_samples} samples each) -> "
            f"{os.path.join(out_dir, 'fid.json')}"
        )
    return results


def parse(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", default="last", help="all, last, or N,M,...")
    parser.add_argument("--num_samples", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="seed sets (EDM: 3, min)")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--inception", default=None, help="FID Inception .npz")
    parser.add_argument("--reference", default=None, help="reference statistics .npz")
    parser.add_argument("--teacher", default=None, help="teacher file (if it moved)")
    parser.add_argument("--grid", type=int, default=64, help="images in samples.png")
    parser.add_argument("--export", default=None, help="write the EMA generator here")
    parser.add_argument("--export_only", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    from didistill.train.errors import DidistillError

    try:
        if args.export_only and not args.export:
            raise EvaluateError("--export_only needs --export=FILE")
        return evaluate_run(args)
    except (EvaluateError, DidistillError, ValueError, OSError, KeyError) as err:
        text = str(err) if not isinstance(err, KeyError) else f"missing key {err}"
        _fail(text, getattr(err, "exit_code", 1))


if __name__ == "__main__":
    main()
