"""DSC signal to delta-R2* concentration, with automatic bolus-arrival / baseline detection.

``C(t) = -ln(S(t) / S0) / TE`` in 1/s (ARCHITECTURE.md), with ``S0`` the mean of the
pre-bolus (baseline) frames of each voxel.

Baseline detection works on the mean signal of the mask (robust to voxel noise): the
reference level is the median of the first ``max(min_baseline, argmin // 2)`` frames and
the bolus depth is that level minus the curve minimum (a depth below ``min_drop`` = 2 % of
the level means "no bolus"). The bolus arrives at the first frame that lies below the level
by more than ``max(k_sigma * sd, arrival_fraction * depth)`` (``sd`` of the reference
frames, ``k_sigma`` 4, ``arrival_fraction`` 10 %). The baseline is frames ``0 .. arrival-2``:
like dsc-mri-toolbox, the frame just before the detected drop is left out because the bolus
front may already touch it; at least ``min_baseline`` (2) frames are kept.

Arrays are time-last: ``[k, j, i, t]`` or ``(n_voxels, t)``.

Safety: frames that are NaN/inf in every voxel raise :class:`PerfusionAIError`; isolated
non-finite samples give concentration 0; voxels whose ``S0`` is not positive give
concentration 0 everywhere (reported in ``invalid_voxels``); non-positive signal samples in
a valid voxel are clipped to ``MIN_SIGNAL_RATIO * S0`` (concentration ``-ln(1e-3)/TE``,
about 230 1/s at TE 30 ms) instead of an infinite value.
"""

from __future__ import annotations

from dataclasses import dataclass
import warnings
from typing import Optional

import numpy as np

from ..errors import ParameterError, PerfusionAIError, input_error
from .acquisition import validate_te  # noqa: F401  (re-exported: the one TE check, perfusionai.mrml uses it)

MIN_SIGNAL_RATIO = 1e-3
DEFAULT_K_SIGMA = 4.0
DEFAULT_MIN_DROP = 0.02
DEFAULT_MIN_BASELINE = 2
DEFAULT_ARRIVAL_FRACTION = 0.1


@dataclass
class BolusArrival:
    """Result of :func:`detect_bolus_arrival`.

    baseline_frames: number of leading frames used for S0.
    arrival_index: first frame of the detected signal drop.
    mean_curve: the mean signal of the mask, shape ``(t,)``.
    """

    baseline_frames: int
    arrival_index: int
    mean_curve: np.ndarray


@dataclass
class ConcentrationResult:
    """Result of :func:`signal_to_concentration`.

    concentration: delta R2* in 1/s, same shape as the signal (time last), float32.
    s0: baseline signal per voxel, signal shape without the time axis.
    baseline_frames: frames used for S0.
    invalid_voxels: number of voxels (among those converted) with non-positive or non-finite S0.
    clipped_samples: number of non-positive signal samples clipped.
    """

    concentration: np.ndarray
    s0: np.ndarray
    baseline_frames: int
    invalid_voxels: int
    clipped_samples: int


def check_finite_frames(signal: np.ndarray, name: str = "DSC series") -> None:
    """Raise when whole frames of ``signal [..., t]`` are NaN/inf (names the frame indices)."""
    s = np.asarray(signal)
    flat = s.reshape(-1, s.shape[-1])
    bad = ~np.isfinite(flat).any(axis=0)
    if bad.any():
        frames = np.nonzero(bad)[0]
        listed = ", ".join(str(f) for f in frames[:10]) + (" ..." if frames.size > 10 else "")
        raise input_error(name, f"{frames.size} frame(s) contain only NaN or infinite values "
                          f"(frame index {listed}); remove or repair those frames")


def detect_bolus_arrival(signal: np.ndarray, mask: Optional[np.ndarray] = None,
                         k_sigma: float = DEFAULT_K_SIGMA, min_drop: float = DEFAULT_MIN_DROP,
                         arrival_fraction: float = DEFAULT_ARRIVAL_FRACTION,
                         min_baseline: int = DEFAULT_MIN_BASELINE, name: str = "DSC series") -> BolusArrival:
    """Find the bolus arrival and the number of baseline frames from the mean signal of ``mask``.

    Parameters
    ----------
    signal
        DSC signal ``[k, j, i, t]`` or ``(n_voxels, t)``.
    mask
        Boolean mask over the non-time axes, or None (voxels whose mean signal is above the
        mean of all voxels, a crude foreground).
    """
    s = np.asarray(signal)
    flat = s.reshape(-1, s.shape[-1])
    if mask is not None:
        flat = flat[np.asarray(mask, bool).reshape(-1)]
    else:
        level = np.nanmean(flat, axis=1)
        foreground = level > np.nanmean(level)
        if foreground.any():
            flat = flat[foreground]
    if flat.shape[0] == 0:
        raise input_error("mask", "the mask is empty")
    with np.errstate(invalid="ignore"):
        curve = np.nanmean(np.where(np.isfinite(flat), flat, np.nan), axis=0).astype(np.float64)
    n = curve.size
    lowest = int(np.nanargmin(curve))
    reference_frames = max(int(min_baseline), lowest // 2)
    if lowest <= int(min_baseline) or reference_frames >= n:
        raise input_error(name, "no bolus passage found: the signal minimum of the mask is in the first "
                          f"{int(min_baseline) + 1} frames; check the series, or give the number of baseline "
                          "frames explicitly")
    reference = curve[:reference_frames]
    level = float(np.median(reference))
    depth = level - float(curve[lowest])
    if not depth > min_drop * abs(level):
        raise input_error(name, "no bolus passage found: the mean signal of the mask never drops "
                          f"clearly below its first frames (needs > {100 * min_drop:.0f} %); "
                          "check the series, or give the number of baseline frames explicitly")
    noise = float(reference.std(ddof=1)) if reference.size >= 3 else 0.0
    threshold = level - max(k_sigma * noise, arrival_fraction * depth)
    below = np.nonzero(curve[: lowest + 1] < threshold)[0]
    if below.size == 0:  # the minimum itself is not clearly below the baseline level (NaN frames, a flat curve)
        raise input_error(name, "no bolus passage found: the mean signal of the mask never drops clearly below "
                          "its first frames; check the series, or give the number of baseline frames explicitly")
    arrival = int(below[0])
    baseline = max(int(min_baseline), arrival - 1)
    if baseline >= lowest:
        raise input_error(name, "the bolus arrives too early to leave baseline frames; give the number "
                          "of baseline frames explicitly")
    return BolusArrival(baseline_frames=baseline, arrival_index=arrival, mean_curve=curve)


def earliest_bolus_arrival(signal: np.ndarray, mask: Optional[np.ndarray] = None,
                           arterial_mask: Optional[np.ndarray] = None, deepest_fraction: float = 0.01,
                           min_voxels: int = 5, name: str = "DSC series") -> BolusArrival:
    """Bolus arrival of the earliest-enhancing voxels, so S0 never includes arterial bolus frames.

    The mean curve of a brain with large delayed territories (stroke) drops later than the
    arteries do; a baseline ending there would put the first bolus frames into the arteries'
    S0 and corrupt the AIF. This takes the earliest of the arrivals found on the mean curve of
    ``mask``, on the deepest-dropping ``deepest_fraction`` of its voxels (arteries and
    high-CBV tissue, which enhance first) and on ``arterial_mask`` when given.
    ``signal`` is ``[k, j, i, t]`` or ``(n_voxels, t)``; masks cover the non-time axes.
    """
    found = [detect_bolus_arrival(signal, mask, name=name)]
    flat = np.asarray(signal).reshape(-1, np.asarray(signal).shape[-1])
    inside = np.ones(flat.shape[0], bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    candidates = np.flatnonzero(inside)
    if candidates.size >= min_voxels:
        curves = flat[candidates].astype(np.float64)
        early = np.nanmedian(curves[:, : max(DEFAULT_MIN_BASELINE, found[0].baseline_frames)], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            drop = np.nanmin(curves, axis=1) / early
        drop = np.where(np.isfinite(drop) & (early > 0), drop, np.inf)
        n_deep = max(min_voxels, int(deepest_fraction * candidates.size))
        deepest = candidates[np.argsort(drop)[:n_deep]]
        deep_mask = np.zeros(flat.shape[0], bool)
        deep_mask[deepest] = True
        try:
            found.append(detect_bolus_arrival(flat, deep_mask, name=name))
        except PerfusionAIError:
            pass  # no clear bolus in the deepest voxels alone: keep the mean-curve arrival
    if arterial_mask is not None:
        try:
            found.append(detect_bolus_arrival(signal, arterial_mask, name=name))
        except PerfusionAIError:
            pass
    return min(found, key=lambda b: b.baseline_frames)


def signal_to_concentration(signal: np.ndarray, te: float, baseline_frames: Optional[int] = None,
                            mask: Optional[np.ndarray] = None, name: str = "DSC series",
                            dtype=np.float32, check_frames: bool = True) -> ConcentrationResult:
    """Convert a DSC signal ``[..., t]`` to delta R2* ``-ln(S/S0)/TE`` (1/s).

    Parameters
    ----------
    signal
        DSC signal, time last. Not modified.
    te
        Echo time in seconds.
    baseline_frames
        Number of leading frames averaged into S0; None detects it on the mean curve of
        ``mask`` (:func:`detect_bolus_arrival`).
    mask
        Voxels to convert (boolean, signal shape without time); others get concentration 0.
        None converts every voxel.
    dtype
        Output dtype (float32 default: halves memory; computed in float32 too).
    check_frames
        Check for all-NaN frames (skip when the caller already did).
    """
    te = validate_te(te)
    s = np.asarray(signal)
    if s.ndim < 2:
        raise input_error(name, "expected a series with time on the last axis")
    if check_frames:
        check_finite_frames(s, name)
    n_frames = s.shape[-1]
    if baseline_frames is None:
        baseline_frames = detect_bolus_arrival(s, mask, name=name).baseline_frames
    baseline_frames = int(baseline_frames)
    if not 1 <= baseline_frames < n_frames:
        raise ParameterError("baseline_frames", f"the number of baseline frames must be between 1 and "
                          f"{n_frames - 1}, got {baseline_frames}")
    flat = s.reshape(-1, n_frames)
    selected = np.arange(flat.shape[0]) if mask is None else np.nonzero(np.asarray(mask, bool).reshape(-1))[0]
    out = np.zeros(flat.shape, dtype=dtype)
    s0_out = np.zeros(flat.shape[0], dtype=np.float64)
    invalid = 0
    clipped = 0
    # float32 arithmetic for float32 output: the ratio's 1e-7 rounding is ~1e-5 1/s at TE 30 ms
    work = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    chunk = max(1, int(2 ** 22 // n_frames))
    for start in range(0, selected.size, chunk):
        index = selected[start:start + chunk]
        block = flat[index].astype(work, copy=False)
        finite = np.isfinite(block)
        all_finite = bool(finite.all())
        if all_finite:
            s0 = flat[index, :baseline_frames].mean(axis=1, dtype=np.float64)
        else:
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN baselines -> invalid voxels
                s0 = np.nanmean(np.where(finite[:, :baseline_frames], flat[index, :baseline_frames],
                                         np.nan).astype(np.float64), axis=1)
        valid = np.isfinite(s0) & (s0 > 0)
        invalid += int((~valid).sum())
        inverse = np.where(valid, 1.0 / np.where(valid, s0, 1.0), 0.0).astype(work)
        ratio = block * inverse[:, None]
        low = ratio < MIN_SIGNAL_RATIO
        if low.any():
            clipped += int((low & (block <= 0) & valid[:, None]).sum())
            np.maximum(ratio, MIN_SIGNAL_RATIO, out=ratio)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.log(ratio, out=ratio)
        ratio *= -1.0 / te
        if not all_finite or not valid.all():
            ratio[~finite | ~valid[:, None]] = 0.0
        out[index] = ratio
        s0_out[index] = np.where(valid, s0, 0.0)
    return ConcentrationResult(concentration=out.reshape(s.shape), s0=s0_out.reshape(s.shape[:-1]),
                               baseline_frames=baseline_frames, invalid_voxels=invalid,
                               clipped_samples=clipped)
