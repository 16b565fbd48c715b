"""What the experiment scripts share: engine runs, the compilation cache and quiet logs."""

from __future__ import annotations

import argparse
import logging
import os


def add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jax_cache", default=None, help="compilation cache dir ('' = off)")


def use_compilation_cache(workdir: str, cache: str | None) -> None:
    """JAX's persistent compilation cache in `cache` (None: `<workdir>/jax_cache`; '': off).

    Most of a CPU experiment's time is XLA compilation: seeds after the first and reruns
    reuse the compiled steps.
    """
    import jax

    cache = os.path.join(workdir, "jax_cache") if cache is None else cache
    if cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def train_run(config, workdir: str) -> dict:
    """The eval results of one engine run of `config` in `workdir` (a finished run is reused,
    an interrupted one resumed). A run stopped by SIGTERM / SIGINT ends the experiment with one
    line (exit status 1) after the engine's checkpoint."""
    from didistill.distill import get_method
    from didistill.train.loop import train

    result = train(get_method(config), config, workdir)
    if result["preempted"]:  # SIGTERM / Ctrl-C: the engine saved a checkpoint
        raise SystemExit(
            f"{workdir}: stopped at step {result['step']} on request (checkpoint saved); "
            "rerun the same command to resume"
        )
    return result["eval"]


def quiet_logs() -> None:
    """One line per run is enough: engine, orbax and JAX logs at WARNING."""
    for logger_name in ("absl", "orbax", "didistill", "jax"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)
