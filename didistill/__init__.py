"""didistill: divergence-based distillation in JAX (see README.md)."""

import os
import signal
import sys

_START_UP_LINE = (
    "didistill: error: interrupted (Ctrl-C) during start-up: nothing was written; "
    "rerun the command.\n"
)
_LOADING_LINE = (
    "didistill: error: interrupted (Ctrl-C) while Python loaded modules: the files in the "
    "workdir are complete (each is written atomically); rerun the command.\n"
)


def _loading_modules(frame) -> bool:
    """Whether the interrupted code is an import, or the entry module's own top level."""
    if frame is not None and frame.f_code.co_name == "<module>":
        if frame.f_globals.get("__name__") == "__main__":
            return True
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _ctrl_c_while_loading(signum, frame) -> None:
    """SIGINT in a `python -m didistill.X` run while Python imports modules: one line and exit
    130 at once. A `KeyboardInterrupt` raised there is not safe: it can surface inside a C++
    extension that is loading (jaxlib's nanobind), which then aborts or crashes (exit -6 or
    -11, found by `make faults`). Before X runs (Python keeps `sys.argv[0]` at '-m' while it
    imports X's packages) nothing has been written. Anywhere else Ctrl-C is Python's
    `KeyboardInterrupt`, which X's own handlers turn into one line."""
    if sys.argv[:1] == ["-m"] or _loading_modules(frame):
        sys.stderr.write(_START_UP_LINE if sys.argv[:1] == ["-m"] else _LOADING_LINE)
        sys.stderr.flush()
        os._exit(130)
    signal.default_int_handler(signum, frame)


def _guard_start_up() -> None:
    """Installs `_ctrl_c_while_loading` for command-line runs only (not for a library user,
    not with --debug / DIDISTILL_DEBUG=1, and not where SIGINT is ignored, as in `cmd &`)."""
    if sys.argv[:1] != ["-m"] or os.environ.get("DIDISTILL_DEBUG") or "--debug" in sys.argv:
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _ctrl_c_while_loading)


_guard_start_up()

from didistill import xla_cpu  # noqa: E402

xla_cpu.disable_ynn_fusions()
