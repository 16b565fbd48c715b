"""Command line entry point of every training and distillation run.

    python -m didistill.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=VALUE]

`--config` loads `get_config(ARG)` from the file (ml_collections, locked: an override of a key
the config does not have is an error); `--config.a.b=VALUE` overrides one key. `main` then
checks the engine keys, builds the method named by `config.method` (`didistill.distill`) and
calls `didistill.train.loop.train`. Rerunning the same command resumes from the checkpoints in
DIR. A config mistake prints one line, `didistill: error: ...`, and no traceback.

Exit status: 0 when the run finished or was preempted (SIGTERM/SIGINT: a checkpoint was saved,
rerun to resume); 1 when it stopped on an error it explains (non-finite steps, checkpoints from
another config); 2 for a usage error (unknown key, invalid value, unknown method).

Multi-host: before anything else (even loading the config file, which may touch devices),
`jax.distributed.initialize()` is called when `--distributed=on`, or with
`--distributed=auto` (the default) when one of these is present:
- `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`: explicit setup, for any launcher;
- Slurm under `srun` with more than one task (`SLURM_JOB_ID`, `SLURM_PROCID`, `SLURM_NTASKS`
  or `SLURM_STEP_NUM_TASKS` > 1);
- Open MPI's `mpirun` with more than one rank (`OMPI_MCA_orte_hnp_uri`, `OMPI_COMM_WORLD_SIZE`);
- a multi-host Cloud TPU slice that lists its hosts (`TPU_PROCESS_ADDRESSES` or
  `TPU_WORKER_HOSTNAMES` with a comma, as on GKE).
On TPU VMs started with `gcloud ... --worker=all` (which set none of these) and on Kubernetes
pass `--distributed=on`: JAX then finds the cluster itself. `--distributed=off` never calls it.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys
from typing import NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import ConfigDict, config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file: path/to/config.py[:ARG].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; a rerun resumes from it.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Call jax.distributed.initialize(): auto = when a cluster environment is detected.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str, exit_code: int = 2) -> NoReturn:
    print(f"didistill: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def _load_config_file(argv: list[str]) -> ConfigDict | None:
    """`get_config(ARG)` of the `--config=PATH[:ARG]` in `argv`, loaded again (for messages)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))), "")
    path, _, arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("_didistill_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
    except Exception:
        return None
    return config if isinstance(config, ConfigDict) else None


def _describe_unknown_key(argv: list[str]) -> str | None:
    """Names the first `--config.a.b` override whose key the loaded config does not have."""
    root = _load_config_file(argv)
    if root is None:
        return None
    for arg in argv[1:]:
        prefix = next((p for p in ("--config.", "--noconfig.") if arg.startswith(p)), None)
        if prefix is None:
            continue
        path = arg[len(prefix) :].split("=", 1)[0]
        node, walked = root, "config"
        for part in path.split("."):
            if not isinstance(node, ConfigDict):
                return f"unknown config key '{path}': {walked} is a value, not a config block."
            if part not in node:
                keys = sorted(node.keys())
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                return (
                    f"unknown config key '{path}': {walked} has no key '{part}'{hint}. "
                    f"Valid keys of {walked}: {', '.join(keys)}."
                )
            node, walked = node[part], f"{walked}.{part}"
    return None


def _expected_type(argv: list[str], message: str) -> str:
    """' (config.a.b holds a T)' for an invalid `--config.a.b=...` value, else ''."""
    if not message.startswith("flag --config."):
        return ""
    path = message[len("flag --config.") :].split("=", 1)[0]
    node = _load_config_file(argv)
    try:
        for part in path.split("."):
            node = node[part]
    except (KeyError, TypeError):
        return ""
    return f" (config.{path} is of type {type(node).__name__}; default {node!r})"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that reports every mistake as one message (no traceback)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err)
        if "Traceback" in message:  # get_config raised: keep its first line and the error
            lines = [line for line in message.splitlines() if line.strip()]
            message = f"{lines[0].rstrip(':')}: {lines[-1].strip()}"
        _fail(f"{message}{_expected_type(argv, message)}")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        message = _describe_unknown_key(argv)
        if message is None:  # not an unknown key: unwrap ml_collections' nested messages
            while isinstance(err, BaseException) and err.args:
                err = err.args[0]
            message = f"invalid --config override: {err}"
        _fail(message)


def _load_config() -> ConfigDict:
    config = _CONFIG.value
    try:
        config.keys()  # a config file that failed to load raises here
    except Exception as err:
        path = flags.FLAGS["config"].config_filename.partition(":")[0]
        if not os.path.isfile(path):
            _fail(f"--config: no config file at {path!r} (relative to {os.getcwd()})")
        _fail(f"cannot load --config: {' '.join(str(err).split())}")
    return config


def cluster_environment(environ=os.environ) -> str | None:
    """The multi-process environment `--distributed=auto` recognises, or None."""

    def count(*names: str) -> int:
        values = [environ.get(name, "1") for name in names]
        return max(int(v) if v.isdigit() else 1 for v in values)

    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ:
        if count("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS") > 1:
            return "Slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts:
        return "Cloud TPU slice"
    return None


def maybe_initialize_distributed(mode: str, environ=os.environ) -> str | None:
    """Calls `jax.distributed.initialize` as `mode` says; returns the environment's name."""
    env = cluster_environment(environ)
    if not (mode == "on" or (mode == "auto" and env is not None)):
        return None  # "off", no cluster, or an invalid mode that absl reports next
    import jax

    kwargs = {}
    if env == "JAX_COORDINATOR_ADDRESS":
        for arg, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if not environ.get(var, "").isdigit():
                _fail(
                    f"JAX_COORDINATOR_ADDRESS is set but {var} is not a number: set "
                    "JAX_NUM_PROCESSES and JAX_PROCESS_ID too, or pass --distributed=off."
                )
            kwargs[arg] = int(environ[var])
    jax.distributed.initialize(**kwargs)
    return env or "auto-detected by JAX"


def _distributed_mode(argv: list[str]) -> str:
    """`--distributed` read from argv before absl parses it (absl checks it again later)."""
    mode = "auto"
    for arg in argv[1:]:
        if arg.startswith(("--distributed=", "-distributed=")):
            mode = arg.split("=", 1)[1]
    return mode


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}: every option is a --flag=value")
    config = _load_config()

    import jax

    from didistill.distill import get_method
    from didistill.train import reporting
    from didistill.train.errors import DidistillError
    from didistill.train.loop import check_config, train

    reporting.setup()
    if not flags.FLAGS["verbosity"].present:  # orbax and jax log chattily at INFO through absl
        absl_logging.set_verbosity(absl_logging.WARNING)
    if jax.process_count() > 1:
        logging.getLogger("didistill.main").info(
            "process %d of %d", jax.process_index(), jax.process_count()
        )
    try:
        check_config(config)  # engine keys, mesh shape against the devices, batch split
        try:
            method = get_method(config)
        except ValueError as err:
            _fail(str(err))
        train(method, config, _WORKDIR.value)
    except DidistillError as err:
        _fail(str(err), err.exit_code)


def run() -> None:
    # Before absl parses flags: loading the config file may already touch devices, and
    # jax.distributed.initialize must come first.
    maybe_initialize_distributed(_distributed_mode(sys.argv))
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
