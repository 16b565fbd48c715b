"""didistill: divergence-based distillation in JAX (see README.md)."""

import os
import signal
import sys

_START_UP_LINE = (
    "didistill: error: interrupted (Ctrl-C) during start-up: nothing was written; "
    "rerun the command.\n"
)


def _ctrl_c_during_start_up(signum, frame) -> None:
    """SIGINT while `python -m didistill.X` imports its packages (Python keeps `sys.argv[0]` at
    '-m' until then): one line and exit 130 at once. Raising `KeyboardInterrupt` there is not
    safe: it can surface inside a C++ extension that is loading (jaxlib's nanobind), which then
    aborts or crashes (exit -6 / -11, found by `make faults`). Nothing is written before X runs.
    Afterwards the handler hands Ctrl-C back to Python's default (`KeyboardInterrupt`), which X's
    own handlers turn into one line."""
    if sys.argv[:1] == ["-m"]:
        sys.stderr.write(_START_UP_LINE)
        sys.stderr.flush()
        os._exit(130)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.default_int_handler(signum, frame)


def _guard_start_up() -> None:
    """Installs `_ctrl_c_during_start_up` for command-line runs only (not for a library user,
    not with --debug / DIDISTILL_DEBUG=1, and not where SIGINT is ignored, as in `cmd &`)."""
    if sys.argv[:1] != ["-m"] or os.environ.get("DIDISTILL_DEBUG") or "--debug" in sys.argv:
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _ctrl_c_during_start_up)


_guard_start_up()

from didistill import xla_cpu  # noqa: E402

xla_cpu.disable_ynn_fusions()
