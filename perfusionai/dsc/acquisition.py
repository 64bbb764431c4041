"""Acquisition checks of a DSC series, each in one place: TE, frame interval (TR), frame count,
frames whose signal drops to zero.

Every check raises :class:`perfusionai.errors.ParameterError` naming the parameter (``te``,
``tr``) or :func:`perfusionai.errors.input_error` naming the file, never a command-line flag.
Times are in seconds; series are ``[k, j, i, t]`` (time last).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ParameterError, input_error
from ..io import IMAGE_SUFFIXES

#: Fewer frames than this cannot hold a baseline, a first pass and a tail.
MIN_FRAMES = 10
#: Plausible DSC frame interval in seconds (outside it a header in ms read as s is the usual cause).
TR_RANGE_S = (0.1, 10.0)
#: A frame whose mean signal inside the mask is below this fraction of the series' median frame
#: has lost its signal (an interrupted acquisition or conversion); a bolus lowers brain signal by
#: tens of percent, never by 90 %.
DROPOUT_FRACTION = 0.1


def validate_te(te, parameter: str = "te") -> float:
    """TE in seconds as a float; missing, non-finite, zero, negative or ms-looking values are refused."""
    if te is None:
        raise ParameterError(parameter, "the echo time TE is missing; give it in seconds, e.g. 0.03")
    try:
        value = float(te)
    except (TypeError, ValueError):
        raise ParameterError(parameter, f"the echo time must be a number of seconds, got {te!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ParameterError(parameter, f"the echo time must be positive (seconds), got {te!r}")
    if value > 1.0:
        raise ParameterError(parameter, f"the echo time is in seconds; {value:g} looks like milliseconds "
                                        f"({value / 1000:g} s?)")
    return value


def validate_tr(tr: float, allow_unusual: bool = False, source: Optional[str] = None,
                parameter: str = "tr") -> float:
    """The frame interval ``tr`` (s) as a float, refused outside :data:`TR_RANGE_S` unless ``allow_unusual``.

    ``source`` names where the value came from (e.g. the file whose header gave it) for the message.
    """
    try:
        value = float(tr)
    except (TypeError, ValueError):
        raise ParameterError(parameter, f"the frame interval must be a number of seconds, got {tr!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise ParameterError(parameter, f"the frame interval must be a positive number of seconds, got {tr!r}")
    low, high = TR_RANGE_S
    if not allow_unusual and not (low <= value <= high):
        origin = f" (from the header of {source})" if source else ""
        hint = f" ({value / 1000:g} s if the header meant milliseconds?)" if value > high else ""
        raise ParameterError(parameter, f"the frame interval {value:g} s{origin} is outside the plausible "
                                        f"{low:g}-{high:g} s of a DSC series{hint}; give the right value, or "
                                        "set allow_unusual_tr to use it anyway")
    return value


def validate_frame_count(n_frames: int, source: str = "DSC series") -> int:
    """Refuse a series with fewer than :data:`MIN_FRAMES` frames (names ``source``)."""
    if int(n_frames) < MIN_FRAMES:
        raise input_error(source, f"the series has {int(n_frames)} frames; DSC needs at least {MIN_FRAMES}")
    return int(n_frames)


def frame_interval(times: Sequence[float], tolerance: float = 0.01, source: str = "frame times") -> float:
    """The uniform frame interval ``dt`` in seconds of frame ``times`` (shape ``(t,)``).

    Deconvolution assumes uniform sampling; intervals that differ from their median by more
    than ``tolerance`` (relative, default 1 %) are refused.
    """
    t = np.asarray(times, dtype=float).ravel()
    if t.size < 2 or not np.all(np.isfinite(t)):
        raise input_error(source, "need at least two finite frame times")
    steps = np.diff(t)
    dt = float(np.median(steps))
    if not dt > 0:
        raise input_error(source, "frame times must increase")
    worst = float(np.max(np.abs(steps - dt)) / dt)
    if worst > tolerance:
        raise input_error(
            source,
            f"the frame intervals are irregular (up to {100 * worst:.1f} % from the median {dt:.4g} s); "
            "deconvolution assumes uniformly sampled frames (tolerance 1 %)")
    return dt


def check_signal_dropout(signal: np.ndarray, mask: Optional[np.ndarray] = None,
                         source: str = "DSC series") -> None:
    """Refuse a series whose frames lose their signal (mean inside ``mask`` below
    :data:`DROPOUT_FRACTION` of the median frame): zero-filled frames from an interrupted
    acquisition or conversion would read as a huge bolus.

    ``signal`` ``[k, j, i, t]``; ``mask`` ``[k, j, i]`` bool or None (every voxel). No override:
    such frames carry no signal any deconvolution could use; remove them from the series.
    """
    s = np.asarray(signal)
    flat = s.reshape(-1, s.shape[-1]) if mask is None else s[np.asarray(mask, bool)]
    with np.errstate(invalid="ignore"):
        means = np.nanmean(np.where(np.isfinite(flat), flat, np.nan).astype(np.float64), axis=0)
    reference = float(np.nanmedian(means)) if np.isfinite(means).any() else 0.0
    if not reference > 0:
        raise input_error(source, "the series has no positive signal inside the mask")
    lost = np.flatnonzero(~(means >= DROPOUT_FRACTION * reference))
    if lost.size:
        listed = ", ".join(str(f + 1) for f in lost[:8]) + (" ..." if lost.size > 8 else "")
        raise input_error(source, f"{lost.size} frame(s) of {s.shape[-1]} have (almost) no signal (frame {listed}, "
                                  f"mean below {100 * DROPOUT_FRACTION:.0f} % of the series' median frame): an "
                                  "interrupted acquisition or conversion; remove those frames")


#: Key of the BIDS-style sidecar (``dsc.json`` beside ``dsc.nii.gz``) that ``perfusionai dsc
#: phantom`` sets, so that a model trained on the series says "trained on phantoms".
PHANTOM_MARK = "PerfusionAIPhantom"


def sidecar_path(path) -> Optional[Path]:
    """The BIDS sidecar ``<name>.json`` of an image file (None for a folder or another suffix)."""
    p = Path(path)
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):  # ".nii.gz" before ".nii"
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)] + ".json")
    return None


def is_marked_phantom(path) -> bool:
    """True when the series file ``path`` carries the digital-phantom mark in its sidecar."""
    side = sidecar_path(path)
    if side is None or not side.is_file():
        return False
    try:
        return bool(json.loads(side.read_text()).get(PHANTOM_MARK, False))
    except (OSError, ValueError, AttributeError):
        return False


def series_te(te: Optional[float], series) -> float:
    """TE (s): the given value, else the series header's (a :class:`perfusionai.io.Series`); refused
    when neither has one. The value is checked once, by :func:`validate_te`, where it is used."""
    if te is None and series.te is None:
        raise ParameterError("te", f"the echo time (TE) of {series.path} is not in its header or a BIDS "
                                   "sidecar; give it in seconds")
    return te if te is not None else series.te
