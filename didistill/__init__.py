"""didistill: divergence-based distillation in JAX (see README.md)."""

import os
import sys


def _one_line_ctrl_c_during_start_up() -> None:
    """`python -m didistill.X` imports this package (and JAX, which takes seconds) before X's
    own handlers exist: a Ctrl-C then ends in one line and exit status 130, not a traceback
    (keep it with --debug or DIDISTILL_DEBUG=1). Only for such command-line runs: Python sets
    `sys.argv[0]` to '-m' while it imports the module's packages."""
    if sys.argv[:1] != ["-m"] or os.environ.get("DIDISTILL_DEBUG") or "--debug" in sys.argv:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        # a C extension interrupted while it loads raises ImportError from the KeyboardInterrupt
        cause = value.__cause__ or value.__context__
        ctrl_c = issubclass(kind, KeyboardInterrupt) or isinstance(cause, KeyboardInterrupt)
        if not ctrl_c or sys.argv[:1] != ["-m"]:
            return previous(kind, value, tb)  # not a Ctrl-C, or X itself is running
        sys.stderr.write(
            "didistill: error: interrupted (Ctrl-C) during start-up: nothing was written; "
            "rerun the command.\n"
        )
        sys.stderr.flush()
        os._exit(130)

    sys.excepthook = hook


_one_line_ctrl_c_during_start_up()

from didistill import xla_cpu  # noqa: E402

xla_cpu.disable_ynn_fusions()
