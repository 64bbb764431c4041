"""Helpers shared by every domain's command-line verbs."""

from __future__ import annotations

import argparse
from typing import Callable, Optional

from .progress import line_progress, terminal_progress


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options every verb accepts (``--progress``)."""
    parser.add_argument(
        "--progress",
        choices=("bar", "lines", "none"),
        default="bar",
        help="progress display: 'bar' (default) draws a bar on stderr when it is a terminal and prints "
             "timestamped step lines (HH:MM:SS 42%% message, every few seconds) when it is not (a log "
             "file or a pipe); 'lines' prints 'PROGRESS <fraction> <message>' on stdout (for Slicer's "
             "background process); 'none' is silent",
    )


def make_progress(args: argparse.Namespace, description: str = "") -> Optional[Callable[[float, str], None]]:
    """The progress callback selected by ``--progress`` (None for silence)."""
    mode = getattr(args, "progress", "bar")
    if mode == "none":
        return None
    if mode == "lines":
        return line_progress()
    return terminal_progress(description)


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
