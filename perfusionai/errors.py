"""The one error type for user mistakes.

Every problem a user can cause (a wrong file, a missing header field, an empty
mask) raises :class:`PerfusionAIError` with a message that names the input and
the problem. The command line prints the message without a traceback and exits
with status 2; Slicer modules show it in an error dialog. Programming errors
keep their ordinary exception types so they stay visible as bugs.
"""

from __future__ import annotations

import os
import warnings


class PerfusionAIError(Exception):
    """A user-facing error: the message names the input and what is wrong with it."""


class ParameterError(PerfusionAIError):
    """A bad parameter value, named in library terms (``tikhonov_lambda``, not ``--lambda``).

    The core raises it with the parameter's field name; the command line
    rewrites the name to the verb's flag once (:meth:`perfusionai.jobs.Job.flag_of`),
    so a library caller reads ``tikhonov_lambda: ...`` and a shell user ``--lambda: ...``.
    """

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter}: {problem}")
        self.parameter = parameter
        self.problem = problem

    def with_name(self, name: str) -> "PerfusionAIError":
        """The same error with the parameter shown as ``name`` (e.g. a flag)."""
        return PerfusionAIError(f"{name}: {self.problem}")


class MissingDependency(PerfusionAIError):
    """An optional capability whose packages are not installed (see :func:`perfusionai.deps.require`)."""


class Cancelled(PerfusionAIError):
    """Raised from a progress callback when the user cancelled the run."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)


class PerfusionAIWarning(UserWarning):
    """Something the user should know about an input that was still used (e.g. a qform/sform conflict).

    The command line prints it as one ``perfusionai: warning: ...`` line; library callers get an
    ordinary :mod:`warnings` warning they can filter by this category.
    """


def warn(message: str) -> None:
    """Issue a :class:`PerfusionAIWarning` (the message names the file and what was decided)."""
    warnings.warn(message, PerfusionAIWarning, stacklevel=3)


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
