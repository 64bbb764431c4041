"""Progress reporting and cancellation, shared by the CLI, Slicer and the library.

Long computations take one optional ``progress`` argument: a callable
``progress(fraction, message)`` with ``fraction`` in [0, 1]. The callable may
raise :class:`perfusionai.errors.Cancelled` to stop the computation; core code
calls it only *between* steps, so a cancelled run never leaves half-updated
state. :class:`Progress` adapts any such callable and maps sub-steps onto a
sub-range, so nested functions can report 0..1 of their own work.

Front ends:
* :func:`terminal_progress` (the command line's default): a tqdm bar when stderr is a
  terminal, otherwise :func:`step_progress`'s timestamped lines ``HH:MM:SS  42% message``,
  rate-limited, so ``perfusionai demo > log 2>&1`` shows what it is doing;
* :func:`tqdm_progress` draws a progress bar on stderr;
* :func:`line_progress` prints ``PROGRESS <fraction> <message>`` lines on
  stdout, for a Slicer background process to parse;
* Slicer's module widgets pass a callback that updates a progress dialog and
  raises ``Cancelled`` when the user pressed Cancel.
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import datetime
from typing import Callable, Optional

from .errors import Cancelled

ProgressCallback = Callable[[float, str], None]


class Progress:
    """A progress reporter mapping local fractions onto a parent's sub-range.

    Parameters
    ----------
    callback
        ``callback(fraction, message)`` or None for silence.
    start, stop
        The parent's range that this reporter's 0..1 covers.
    cancel_event
        Optional :class:`threading.Event`; when set, the next update raises
        :class:`Cancelled`.
    """

    def __init__(
        self,
        callback: Optional[ProgressCallback] = None,
        start: float = 0.0,
        stop: float = 1.0,
        cancel_event: Optional[threading.Event] = None,
    ) -> None:
        if isinstance(callback, Progress):
            parent = callback
            self._callback = parent._callback
            self._cancel = cancel_event or parent._cancel
            span = parent._stop - parent._start
            self._start = parent._start + start * span
            self._stop = parent._start + stop * span
        else:
            self._callback = callback
            self._cancel = cancel_event
            self._start = start
            self._stop = stop

    def __call__(self, fraction: float, message: str = "") -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled()
        if self._callback is None:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        self._callback(self._start + fraction * (self._stop - self._start), message)

    def sub(self, start: float, stop: float) -> "Progress":
        """A child reporter whose 0..1 covers ``[start, stop]`` of this one."""
        return Progress(self, start, stop)


def as_progress(progress: Optional[ProgressCallback]) -> Progress:
    """Wrap any callback (or None) as a :class:`Progress`."""
    if isinstance(progress, Progress):
        return progress
    return Progress(progress)


def tqdm_progress(description: str = "") -> Callable[[float, str], None]:
    """A callback drawing a tqdm progress bar (0-100 %) on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=description, unit="%", file=sys.stderr,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}",
               disable=None)

    def update(fraction: float, message: str) -> None:
        target = int(round(100 * fraction))
        if target > bar.n:
            bar.update(target - bar.n)
        if message:
            bar.set_postfix_str(message, refresh=True)
        if target >= 100:
            bar.close()

    update.close = bar.close  # type: ignore[attr-defined]
    return update


def line_progress(stream=None) -> Callable[[float, str], None]:
    """A callback printing ``PROGRESS <fraction> <message>`` lines (machine readable)."""

    def update(fraction: float, message: str) -> None:
        out = stream or sys.stdout
        out.write(f"PROGRESS {fraction:.4f} {message}\n")
        out.flush()

    return update


def step_progress(stream=None, min_interval: float = 5.0, min_step: float = 0.05,
                  clock: Callable[[], float] = time.monotonic,
                  stamp: Callable[[], str] = lambda: datetime.now().strftime("%H:%M:%S"),
                  description: str = "") -> Callable[[float, str], None]:
    """A callback printing timestamped step lines ``HH:MM:SS  42% message`` (for logs and pipes).

    Rate-limited: a line is printed for the first update, for the end (100 %), and otherwise
    only when at least ``min_interval`` seconds passed since the last line and either the
    fraction grew by ``min_step`` or the message changed; a long loop's many updates give one
    line every few seconds, not thousands. ``stream`` defaults to stderr (looked up at each
    call); ``clock``/``stamp`` are injectable for tests.
    """
    state = {"last_time": None, "last_fraction": -1.0, "last_message": None, "done": False}
    prefix = f"{description}: " if description else ""

    def update(fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = clock()
        finished = fraction >= 1.0
        if state["done"] and finished:
            return
        if state["last_time"] is not None and not finished:
            if now - state["last_time"] < min_interval:
                return
            if fraction - state["last_fraction"] < min_step and message == state["last_message"]:
                return
        out = stream or sys.stderr
        out.write(f"{stamp()} {100 * fraction:3.0f}% {prefix}{message}".rstrip() + "\n")
        out.flush()
        state.update(last_time=now, last_fraction=fraction, last_message=message, done=finished)

    update.close = lambda: None  # type: ignore[attr-defined]
    return update


def terminal_progress(description: str = "", stream=None) -> Callable[[float, str], None]:
    """The command line's progress: a tqdm bar on a terminal, :func:`step_progress` lines otherwise."""
    out = stream or sys.stderr
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        return tqdm_progress(description)
    return step_progress(out, description=description)
