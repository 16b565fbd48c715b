"""Command line entry point of every training and distillation run.

    python -m didistill.main --config=NAME[:ARG] --workdir=DIR [--config.a.b=VALUE]

`--config` names a config shipped in `didistill/configs/` (`toy2d`, `digits_distill`, ...; also
written `configs/NAME.py`, as from the repository root) or the path of any config file, and loads
its `get_config(ARG)` (ml_collections, locked: an override of a key
the config does not have is an error); `--config.a.b=VALUE` overrides one key. `main` then
checks the engine keys, builds the method named by `config.method` (`didistill.distill`) and
calls `didistill.train.loop.train`. Rerunning the same command resumes from the checkpoints in
DIR. A mistake or a fault (config, files, disk, another run in DIR) prints one line,
`didistill: error: ...`, naming the file or key and what to do, and no traceback: pass `--debug`
(or set DIDISTILL_DEBUG=1) to see it. `--restart` moves DIR's old run aside (DIR.old-<time>,
nothing is deleted) and starts over; it is the way out when DIR holds a run of another config
(see docs/reliability.md). A key given twice with different values is an error, not last-wins.
`--config.<block>.divergence_params.NAME=VALUE` sets a divergence parameter (e.g. alpha) even
when the config file leaves the block empty.

Exit status: 0 when the run finished or was preempted (SIGTERM/SIGINT: a checkpoint was saved,
rerun to resume); 1 when it stopped on an error it explains (non-finite steps, checkpoints from
another config, unreadable files, disk full, workdir in use); 2 for a usage error (unknown key,
invalid value, unknown method); 130 when interrupted (Ctrl-C) outside the training loop.

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

import ast
import difflib
import errno
import importlib.util
import logging
import os
import sys
import traceback
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
_RESTART = flags.DEFINE_bool(
    "restart",
    False,
    "Move the workdir's old run aside (to <workdir>.old-<time>; nothing is deleted), start over.",
)
flags.DEFINE_bool("debug", False, "Show the traceback of errors (also: DIDISTILL_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])

# `--<...>.divergence_params.NAME=VALUE` overrides: set after parsing (the block may be empty).
_FREE_PARAMS: list[tuple[str, str]] = []


def debug_enabled(argv: list[str] | None = None) -> bool:
    """--debug in argv (read before absl parses it) or DIDISTILL_DEBUG set and not 0."""
    if os.environ.get("DIDISTILL_DEBUG", "").strip() not in ("", "0", "false", "False"):
        return True
    args = sys.argv if argv is None else argv
    on = ("--debug", "-debug", "--debug=true", "--debug=True", "--debug=1")
    return any(a in on for a in args)


def _fail(message: str, exit_code: int = 2) -> NoReturn:
    if debug_enabled() and sys.exc_info()[0] is not None:
        traceback.print_exc()
    message = " ".join(str(message).split())  # one line
    print(f"didistill: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def _os_error_message(err: BaseException) -> str | None:
    """One line for a file-system error (also one wrapped by orbax/tensorstore), or None."""
    text = " ".join(str(err).split())[:300]
    name = getattr(err, "filename", None)
    where = f" ({name})" if name else ""
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC or "No space left" in text or "RESOURCE_EXHAUSTED" in text:
        return (
            f"no space left on the device{where}: {text}. Free some space or use a --workdir "
            "on another disk, then rerun the same command: the run resumes from its last "
            "complete checkpoint."
        )
    if code == errno.EROFS or "Read-only file system" in text:
        return f"read-only file system{where}: {text}. Use a writable --workdir."
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        return f"permission denied{where}: {text}. Fix the permissions or use another --workdir."
    if code == errno.ENOENT:
        cwd = os.getcwd()
        return f"no such file or directory{where}: {text}. Check the path (relative to {cwd})."
    if isinstance(err, OSError):
        return f"{text}{where}. Check the file and the disk, then rerun."
    return None


def _check_duplicates(argv: list[str]) -> None:
    """A flag given twice with different values is a mistake, not last-wins."""
    seen: dict[str, str] = {}
    for arg in argv[1:]:
        if not arg.startswith("-") or "=" not in arg:
            continue
        name, value = arg.lstrip("-").split("=", 1)
        if name in seen and seen[name] != value:
            _fail(
                f"contradictory arguments --{name}={seen[name]} and --{name}={value}: give each "
                "key once."
            )
        seen[name] = value


def resolve_config_spec(spec: str) -> str:
    """`--config` value -> a config file path: an existing file as given, else the shipped
    `didistill/configs/NAME.py` of `NAME`, `NAME.py` or `configs/NAME.py` (any directory)."""
    path, sep, arg = spec.partition(":")
    if not path or os.path.isfile(path):
        return spec
    name = os.path.basename(path).removesuffix(".py")
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{name}.py")
    if name != "__init__" and os.path.isfile(shipped):
        return shipped + sep + arg
    return spec


def _resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrites `--config=SPEC` in argv and in sys.argv (config_flags reads both)."""

    def fix(a: str) -> str:
        for prefix in ("--config=", "-config="):
            if a.startswith(prefix):
                return prefix + resolve_config_spec(a[len(prefix) :])
        return a

    sys.argv = [fix(a) for a in sys.argv]
    return [fix(a) for a in argv]


def _split_free_params(argv: list[str]) -> list[str]:
    """Takes the `divergence_params.NAME` overrides of keys the config lacks out of argv."""
    if not any(".divergence_params." in a for a in argv):
        return argv
    root = _load_config_file(argv)
    if root is None:
        return argv
    kept = []
    for arg in argv:
        if arg.startswith("--config.") and ".divergence_params." in arg and "=" in arg:
            path, value = arg[len("--config.") :].split("=", 1)
            block_path, _, name = path.rpartition(".")
            node = root
            try:
                for part in block_path.split("."):
                    node = node[part]
            except (KeyError, TypeError, AttributeError):
                node = None
            if isinstance(node, ConfigDict) and name and name not in node:
                _FREE_PARAMS.append((path, value))
                continue
        kept.append(arg)
    removed = {f"--config.{path}={value}" for path, value in _FREE_PARAMS}
    sys.argv = [a for a in sys.argv if a not in removed]  # config_flags reads sys.argv itself
    return kept


def _apply_free_params(config: ConfigDict) -> None:
    for path, text in _FREE_PARAMS:
        block_path, _, name = path.rpartition(".")
        node = config
        for part in block_path.split("."):
            node = node[part]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        with node.unlocked():
            node[name] = value


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
    _check_duplicates(argv)
    argv = _split_free_params(_resolve_config_args(argv))
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err)
        if "Traceback" in message:  # get_config raised: keep its first line and the error
            lines = [line for line in message.splitlines() if line.strip()]
            message = f"{lines[0].rstrip(':')}: {lines[-1].strip()}"
        _fail(f"{message}{_expected_type(argv, message)}")
    except (SyntaxError, ImportError) as err:  # the config file itself cannot be run
        spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
        path = spec.partition(":")[0]
        if isinstance(err, SyntaxError):
            _fail(f"cannot load --config={path}: syntax error at line {err.lineno}: {err.msg}.")
        _fail(f"cannot load --config={path}: {err}.")
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
            shipped = sorted(
                f.removesuffix(".py")
                for f in os.listdir(os.path.join(os.path.dirname(__file__), "configs"))
                if f.endswith(".py") and f != "__init__.py"
            )
            _fail(
                f"--config: no config file at {path!r} (relative to {os.getcwd()}) and no "
                f"shipped config of that name; shipped: {', '.join(shipped)}"
            )
        _fail(f"cannot load --config={path}: {' '.join(str(err).split())}")
    _apply_free_params(config)
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
    try:
        jax.distributed.initialize(**kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as err:
        where = f"the {env} environment" if env else "--distributed=on (no cluster found)"
        reason = " ".join(str(err).split())[:300].rstrip(".")
        _fail(
            f"jax.distributed.initialize() failed for {where}: {reason}"
            ". On a single machine pass --distributed=off; on a cluster check the coordinator "
            "address and that every process was started.",
            1,
        )
    return env or "auto-detected by JAX"


def _distributed_mode(argv: list[str]) -> str:
    """`--distributed` read from argv before absl parses it (absl checks it again later)."""
    mode = "auto"
    for arg in argv[1:]:
        if arg.startswith(("--distributed=", "-distributed=")):
            mode = arg.split("=", 1)[1]
    return mode


def _check_teacher_file(config: ConfigDict) -> None:
    teacher = config.get("teacher")
    path = teacher.get("checkpoint") if isinstance(teacher, ConfigDict) else None
    if isinstance(path, str) and path and not os.path.isfile(path):
        _fail(
            f"config.teacher.checkpoint={path!r}: no such file (relative to {os.getcwd()}). "
            "Run from the repository root, or pass --config.teacher.checkpoint=PATH (see "
            "assets/README.md for how the teachers are made).",
            2,
        )


def _build_method(config: ConfigDict):
    from didistill.distill import get_method
    from didistill.train.errors import DidistillError

    try:
        return get_method(config)
    except (DidistillError, OSError, KeyboardInterrupt):
        raise
    except ValueError as err:
        _fail(str(err))
    except Exception as err:  # a wrong teacher file: KeyError('width'), msgpack errors, ...
        teacher = config.get("teacher")
        path = teacher.get("checkpoint") if isinstance(teacher, ConfigDict) else None
        hint = (
            f" Is config.teacher.checkpoint={path!r} a teacher file of this config's kind? "
            "Point --config.teacher.checkpoint to the right one."
            if path
            else " Check the config values of the method."
        )
        _fail(f"cannot build method {config.method!r}: {type(err).__name__}: {err}.{hint}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}: every option is a --flag=value")
    workdir = _WORKDIR.value
    if not workdir or not workdir.strip():
        _fail("--workdir is empty: give the run directory, e.g. --workdir=runs/toy")
    config = _load_config()

    import jax

    from didistill.train import reporting
    from didistill.train import workdir as workdir_lib
    from didistill.train.errors import DidistillError
    from didistill.train.loop import check_config, train
    from didistill.train.validate import validate_method_keys

    reporting.setup()
    if not flags.FLAGS["verbosity"].present:  # orbax and jax log chattily at INFO through absl
        absl_logging.set_verbosity(absl_logging.WARNING)
    if jax.process_count() > 1:
        logging.getLogger("didistill.main").info(
            "process %d of %d", jax.process_index(), jax.process_count()
        )
    try:
        check_config(config)  # engine keys, mesh shape against the devices, batch split
        validate_method_keys(config)
        _check_teacher_file(config)
        method = _build_method(config)
        if _RESTART.value:
            if jax.process_index() == 0:
                moved = workdir_lib.move_aside(workdir)
                if moved:
                    print(f"didistill: moved the old run {workdir} to {moved}", file=sys.stderr)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("didistill_restart")
        train(method, config, workdir)
    except DidistillError as err:
        _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        _fail(
            "interrupted (Ctrl-C) outside the training loop: nothing is lost, the checkpoints "
            "in --workdir are intact; rerun the same command to resume (or evaluate again).",
            130,
        )
    except Exception as err:
        message = _os_error_message(err)
        if message is None:
            message = (
                f"unexpected {type(err).__name__}: {' '.join(str(err).split())[:300]}. Rerun "
                "with --debug (or DIDISTILL_DEBUG=1) for the traceback."
            )
        _fail(message, 1)


def run() -> None:
    # Before absl parses flags: loading the config file may already touch devices, and
    # jax.distributed.initialize must come first.
    try:
        maybe_initialize_distributed(_distributed_mode(sys.argv))
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C) during start-up: nothing was written; rerun the command.", 130)


if __name__ == "__main__":
    run()
