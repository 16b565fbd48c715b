"""Errors the engine reports to a person: each says what went wrong and what to do.

They are raised for problems in a run's inputs (config, checkpoint files, numerics), never for
bugs in the code. `didistill.main` prints the message of a `DidistillError` alone, without a
traceback, and exits with its `exit_code`. Library callers can catch the usual built-in bases
(`ValueError`, `RuntimeError`) as well.
"""

from __future__ import annotations


class DidistillError(Exception):
    """Base class: a problem the user can fix; the message says how."""

    exit_code = 1


class ConfigError(DidistillError, ValueError):
    """An engine config value is invalid (bad range, indivisible batch, unusable mesh)."""

    exit_code = 2


class CheckpointError(DidistillError):
    """The checkpoints in a run directory cannot be used with this config."""


class NonFiniteError(DidistillError, RuntimeError):
    """Too many consecutive steps produced NaN/inf and were skipped; the run stopped.

    `first_bad_step` is the index of the first skipped step of the streak."""

    def __init__(self, first_bad_step: int | str, message: str | None = None):
        if message is None:  # NonFiniteError(message), as before
            first_bad_step, message = -1, str(first_bad_step)
        super().__init__(message)
        self.first_bad_step = first_bad_step


__all__ = ["CheckpointError", "ConfigError", "DidistillError", "NonFiniteError"]
