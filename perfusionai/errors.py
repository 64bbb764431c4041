"""The one error type for user mistakes.

Every problem a user can cause (a wrong file, a missing header field, an empty
mask) raises :class:`PerfusionAIError` with a message that names the input and
the problem. The command line prints the message without a traceback and exits
with status 2; Slicer modules show it in an error dialog. Programming errors
keep their ordinary exception types so they stay visible as bugs.
"""

from __future__ import annotations

import os


class PerfusionAIError(Exception):
    """A user-facing error: the message names the input and what is wrong with it."""


class Cancelled(PerfusionAIError):
    """Raised from a progress callback when the user cancelled the run."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)


def input_error(name: str | os.PathLike | None, problem: str) -> PerfusionAIError:
    """Build the standard error for a bad input.

    Parameters
    ----------
    name
        The file path (or the option name when there is no file, e.g. ``"--te"``).
    problem
        What is wrong, in plain words, ideally with what was expected instead.
    """
    if name is None or str(name) == "":
        return PerfusionAIError(problem)
    return PerfusionAIError(f"{os.fspath(name)}: {problem}")
