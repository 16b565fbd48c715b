"""Graceful stop on SIGTERM / SIGINT: finish the current step, save, exit 0.

Schedulers (Slurm, Kubernetes, Cloud TPU maintenance) announce a preemption with SIGTERM some
seconds before killing a job; Ctrl-C sends SIGINT. `PreemptionWatcher` turns either into a flag
that the training loop reads between steps (a Python bool: no device sync). The loop then saves
a checkpoint at the current step and returns normally, so `main` exits 0 and rerunning the
same command resumes. A second signal while the first is being handled raises
`KeyboardInterrupt` (the way out when saving hangs).

Single process: Python signal handlers, installed while the watcher is active (only possible
in the main thread; elsewhere a warning says preemption is not handled) and restored after.

Several processes: every process must stop at the same step, or the collective checkpoint
save would hang. There the watcher asks JAX's distributed runtime, which all processes
consult, through `jax.experimental.multihost_utils.reached_preemption_sync_point(step)`; the
runtime's own preemption notifier catches SIGTERM, so no Python handler is installed.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
    """Context manager; `requested(step)` says whether to save and stop before `step`."""

    def __init__(self):
        self._flag: str | bool = False  # False, or the name of the signal received
        self._reported = False
        self._previous = {}
        self._multi_process = jax.process_count() > 1

    def _handle(self, signum, frame) -> None:
        if self._flag:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self._flag = signal.Signals(signum).name  # logged by `requested`, not in the handler

    def __enter__(self) -> PreemptionWatcher:
        if self._multi_process:
            return self
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGTERM/SIGINT will not save a checkpoint")
            return self
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, step: int) -> bool:
        """True once a stop was requested (all processes agree on `step`)."""
        if self._multi_process:
            stop = multihost_utils.reached_preemption_sync_point(step)
            self._flag = self._flag or (stop and "a preemption notice")
        if self._flag and not self._reported:
            self._reported = True
            logger.warning("received %s: saving a checkpoint, then exiting", self._flag)
        return bool(self._flag)


__all__ = ["PreemptionWatcher"]
