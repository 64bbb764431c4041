"""Perfusion parameters from concentration curves, the AIF and deconvolved residues.

Units (ARCHITECTURE.md, Ostergaard):

* CBV [mL/100 g] = 100 kH/rho * int C_t dt / int C_a dt
* CBF [mL/100 g/min] = 60 * 100 kH/rho * max_t k(t), with ``k = CBF * R`` in 1/s
* MTT [s] = CBV / CBF * 60 (central volume theorem)
* Tmax [s] = time of the residue maximum (sample grid; optional parabolic refinement)
* TTP [s] = time of the concentration peak, from the series start (``times[0]``)

Defaults kH = 0.73 (large-to-small-vessel haematocrit ratio) and rho = 1.04 g/mL (brain
density); kH = rho = 1 give the plain ratios used by OSIPI and dsc-mri-toolbox.

Integration of CBV: ``"trapezoid"`` (default, as dsc-mri-toolbox ``trapz``) or ``"sum"``
(rectangle rule). Both equal ``dt * sum`` when the curves start and end at zero. On a
left-rectangle simulator the ratio equals CBV + CBF*dt/2 rather than CBV (research/dsc.md).
An optional ``window=(first, stop)`` of frame indices restricts both integrals, e.g. to the
first pass (:func:`first_pass_window`), which limits the influence of the S0 error over long
series.

Arrays: curves are ``(n_voxels, t)``; maps are ``(n_voxels,)``. NaN marks values that are
undefined for a voxel (MTT where CBF <= 0).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..errors import ParameterError, input_error

DEFAULT_KH = 0.73
DEFAULT_RHO = 1.04

#: Unit of every DSC map the package writes (file attributes, tables, reports, summary.json, Slicer
#: nodes): the five maps, leakage K2/K1, and the optional outputs: FWHM of each concentration curve,
#: K2's coefficient of variation, the parametric fit's R2 and converged flag, the per-voxel
#: regularisation (relative to the largest singular value), oSVD's oscillation index and the residue
#: (4D, flow-scaled CBF*R(t)).
MAP_UNITS = {"cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "tmax": "s", "ttp": "s",
             "k2": "1/s", "k1": "1", "fwhm": "s", "k2_cv": "1", "fit_r2": "1", "converged": "1 = converged, 0 = not",
             "regularisation": "1 (relative to s_max)", "oscillation_index": "1", "residue": "1/s"}
#: The five maps every DSC method gives, in the order they are listed (k2/k1 only with leakage correction).
MAP_NAMES = ("cbv", "cbf", "mtt", "tmax", "ttp")
INTEGRATIONS = ("trapezoid", "sum")
#: CBV integration windows: the whole series, or the first pass of the AIF (:func:`first_pass_window`).
CBV_WINDOWS = ("full", "first_pass")


def median_in_mask(values: np.ndarray, mask: Optional[np.ndarray] = None) -> Optional[float]:
    """Median of the finite values of ``values`` inside the bool ``mask`` (same shape; None: all).

    None when no finite value is there (JSON ``null``). The one "median inside the mask" of the
    DSC summaries, tables and reports.
    """
    v = np.asarray(values, dtype=np.float64)
    if mask is not None:
        v = v[np.asarray(mask, bool)]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


def _scale(kh: float, rho: float) -> float:
    if not kh > 0:
        raise ParameterError("kh", f"the haematocrit factor kH must be positive, got {kh}")
    if not rho > 0:
        raise ParameterError("rho", f"the brain density rho must be positive (g/mL), got {rho}")
    return float(kh) / float(rho)


def _integral(curves: np.ndarray, dt: float, integration: str) -> np.ndarray:
    if integration == "trapezoid":
        return dt * (curves.sum(axis=-1) - 0.5 * (curves[..., 0] + curves[..., -1]))
    if integration == "sum":
        return dt * curves.sum(axis=-1)
    raise ParameterError("cbv_integration", f"unknown integration {integration!r}; choose trapezoid or sum")


def cbv_window_frames(aif: np.ndarray, window: str) -> Optional[Tuple[int, int]]:
    """Frame window ``(first, stop)`` of the CBV integrals for a window name (``"full"``: None)."""
    if window == "full":
        return None
    if window == "first_pass":
        return first_pass_window(aif)
    raise ParameterError("cbv_window", f"unknown CBV window {window!r}; choose {' or '.join(CBV_WINDOWS)}")


def first_pass_window(aif: np.ndarray, fraction: float = 0.1, tail_frames: Optional[int] = None) -> Tuple[int, int]:
    """A first-pass window ``(first, stop)`` (frame indices, stop exclusive) from the AIF ``(t,)``.

    Starts at the last frame before the AIF first exceeds ``fraction`` of its peak; ends where
    the AIF, after its peak, first falls below ``fraction`` of the peak, extended by
    ``tail_frames`` (default: the width of the AIF bolus) so that the slower tissue wash-out is
    included. Clipped to the series.
    """
    a = np.asarray(aif, dtype=np.float64).ravel()
    peak = int(np.argmax(a))
    level = fraction * a[peak]
    above = np.nonzero(a[: peak + 1] > level)[0]
    first = max(0, int(above[0]) - 1) if above.size else 0
    after = np.nonzero(a[peak:] < level)[0]
    end = peak + int(after[0]) if after.size else a.size
    width = end - first
    stop = min(a.size, end + (width if tail_frames is None else int(tail_frames)))
    return first, max(stop, first + 2)


def cbv_map(concentration: np.ndarray, aif: np.ndarray, dt: float, kh: float = DEFAULT_KH,
            rho: float = DEFAULT_RHO, integration: str = "trapezoid",
            window: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """CBV in mL/100 g, shape ``(n_voxels,)``, from curves ``(n_voxels, t)`` and the AIF ``(t,)``.

    ``window=(first, stop)`` restricts both integrals to frames ``first .. stop-1``.
    """
    c = np.asarray(concentration, dtype=np.float64)
    a = np.asarray(aif, dtype=np.float64).ravel()
    if window is not None:
        first, stop = int(window[0]), int(window[1])
        c, a = c[..., first:stop], a[first:stop]
    denominator = _integral(a, dt, integration)
    if not denominator > 0:
        raise input_error("AIF", "the area under the AIF is not positive; check the AIF mask")
    return 100.0 * _scale(kh, rho) * _integral(c, dt, integration) / denominator


def cbf_map(residue_max: np.ndarray, kh: float = DEFAULT_KH, rho: float = DEFAULT_RHO) -> np.ndarray:
    """CBF in mL/100 g/min from ``max_t k(t)`` in 1/s (shape ``(n_voxels,)``)."""
    return 6000.0 * _scale(kh, rho) * np.asarray(residue_max, dtype=np.float64)


def mtt_map(cbv: np.ndarray, cbf: np.ndarray) -> np.ndarray:
    """MTT = CBV / CBF * 60 in seconds; NaN where CBF <= 0 (undefined)."""
    cbv = np.asarray(cbv, dtype=np.float64)
    cbf = np.asarray(cbf, dtype=np.float64)
    out = np.full(np.broadcast(cbv, cbf).shape, np.nan)
    positive = cbf > 0
    np.divide(60.0 * cbv, cbf, out=out, where=positive)
    return out


def ttp_map(concentration: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Time to peak in seconds from the series start, shape ``(n_voxels,)`` (curves ``(n, t)``)."""
    t = np.asarray(times, dtype=np.float64).ravel()
    index = np.argmax(np.asarray(concentration), axis=-1)
    return t[index] - t[0]


def perfusion_maps(concentration: np.ndarray, aif: np.ndarray, times: np.ndarray, deconvolution,
                   kh: float = DEFAULT_KH, rho: float = DEFAULT_RHO, integration: str = "trapezoid",
                   window: Optional[Tuple[int, int]] = None, refine_tmax: bool = False) -> dict:
    """All maps for curves ``(n_voxels, t)``: dict of ``(n_voxels,)`` float64 arrays.

    ``deconvolution`` is a :class:`perfusionai.dsc.deconvolution.DeconvolutionResult` for the
    same curves. Keys: ``cbv`` (mL/100 g), ``cbf`` (mL/100 g/min), ``mtt``, ``tmax``, ``ttp`` (s).
    """
    times = np.asarray(times, dtype=np.float64).ravel()
    cbv = cbv_map(concentration, aif, deconvolution.dt, kh, rho, integration, window)
    cbf = cbf_map(deconvolution.cbf, kh, rho)
    return {
        "cbv": cbv,
        "cbf": cbf,
        "mtt": mtt_map(cbv, cbf),
        "tmax": deconvolution.tmax_seconds(refine=refine_tmax),
        "ttp": ttp_map(concentration, times),
    }
