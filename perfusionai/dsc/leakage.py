"""Boxerman-Schmainda-Weisskoff (BSW) contrast-agent leakage correction.

Model (Weisskoff 1994; Boxerman, Schmainda & Weisskoff, AJNR 2006;27:859): in an
enhancing voxel the measured delta-R2* is

    C(t) = K1 * Cref(t) - K2 * integral_0^t Cref(tau) dtau,

where ``Cref`` is the mean delta-R2* of non-enhancing brain. ``K2 > 0`` means T1
leakage (the extravasated agent shortens T1, the signal rises, delta-R2* drops);
``K2 < 0`` means T2*-dominant leakage. The corrected curve is

    C_corrected(t) = C(t) + K2 * integral_0^t Cref(tau) dtau.

Fitting is one linear least-squares problem for all voxels at once: the design
matrix is shared, so the coefficients of every voxel are one product with its
pseudo-inverse (no per-voxel fitting). The cumulative integral is trapezoidal on
the frame times. Two models:

* ``model="bsw"``: the classic 2-column design ``[Cref, -cumint(Cref)]``.
* ``model="bsw-transit"`` (default): the same leakage column, but the non-leaky
  part is a combination of ``Cref`` delayed by ``delays_s`` (0, 2, 4 s) and
  dispersed by exponential kernels of mean ``dispersions_s`` (0, 4, 10 s). The
  classic fit mistakes tissue whose transit time or arrival differs from the
  reference (white matter, an ischaemic lesion) for leakage -- a known bias of
  BSW (Bjornerud et al., JCBFM 2011; Leigh et al., AJNR 2012); on the phantoms
  here (noise-free) the classic model changes a delayed (3 s), long-MTT (10 s)
  lesion's CBV by -50 % and white matter's by -8 %, the extended one by < 1 %. K1 is then the sum of the
  non-leaky coefficients (every column has the reference's area). The price is
  more noise in K2 per voxel.

Automatic reference: brain voxels whose first-pass peak is ordinary (within a
factor ``peak_factor`` of the median peak: no artery, no noise-only voxel) and
whose post-bolus tail is close to the median tail (within ``tail_mad`` robust
standard deviations: neither T1-leaky, tail below baseline, nor T2*-leaky, tail
above). Most of a brain is non-enhancing, so the median describes it.

Arrays: concentration ``[k, j, i, t]`` delta-R2* (1/s); masks ``[k, j, i]`` bool;
``times`` ``(t,)`` s; ``K1`` dimensionless, ``K2`` 1/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import ParameterError, PerfusionAIError, input_error


@dataclass
class LeakageResult:
    """Output of :func:`bsw_correct`.

    Attributes
    ----------
    corrected
        ``[k, j, i, t]`` leakage-corrected delta-R2* (1/s); voxels outside the mask
        are copied unchanged.
    k1
        ``[k, j, i]`` scale of the reference curve (dimensionless), 0 outside the mask.
    k2
        ``[k, j, i]`` leakage rate in 1/s (positive = T1 leakage), 0 outside the mask.
    reference_curve
        ``(t,)`` mean delta-R2* of the reference (non-enhancing) voxels, 1/s.
    reference_mask
        ``[k, j, i]`` bool, the reference voxels used.
    k2_cv
        ``[k, j, i]`` coefficient of variation of K2 (its least-squares standard error over |K2|,
        from the residual variance of each voxel's fit); inf where K2 = 0, 0 outside the mask.
    corrected_mask
        ``[k, j, i]`` bool, the voxels whose curves were corrected (all masked voxels, or those with
        ``k2_cv <= max_k2_cv`` when that is given).
    """

    corrected: np.ndarray
    k1: np.ndarray
    k2: np.ndarray
    reference_curve: np.ndarray
    reference_mask: np.ndarray
    k2_cv: Optional[np.ndarray] = None
    corrected_mask: Optional[np.ndarray] = None

    def summary(self, mask: Optional[np.ndarray] = None) -> dict:
        """Median and 5/95 percentiles of K2 (1/s) inside ``mask`` and the reference size."""
        sel = self.k2[mask] if mask is not None else self.k2[self.reference_mask | (self.k2 != 0)]
        q = np.percentile(sel, [5, 50, 95]) if sel.size else [np.nan] * 3
        return {"reference_voxels": int(np.count_nonzero(self.reference_mask)),
                "k2_median_per_s": float(q[1]), "k2_p05_per_s": float(q[0]), "k2_p95_per_s": float(q[2])}


def cumulative_integral(curves: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Trapezoidal ``integral_0^t`` of ``curves`` ``[..., t]`` over ``times`` (s); starts at 0."""
    steps = 0.5 * (curves[..., 1:] + curves[..., :-1]) * np.diff(times)
    out = np.zeros(curves.shape, dtype=np.result_type(curves, np.float64))
    np.cumsum(steps, axis=-1, out=out[..., 1:])
    return out


def _delayed(curve: np.ndarray, times: np.ndarray, delay_s: float) -> np.ndarray:
    """``curve(t - delay_s)`` by linear interpolation, 0 before the series start."""
    if delay_s == 0:
        return curve
    return np.interp(times - delay_s, times, curve, left=0.0)


def _dispersed(curve: np.ndarray, times: np.ndarray, mean_s: float) -> np.ndarray:
    """``curve`` convolved with a unit-area exponential kernel of mean ``mean_s`` s."""
    if mean_s == 0:
        return curve
    kernel = np.exp(-(times - times[0]) / mean_s)
    kernel /= kernel.sum()
    return np.convolve(curve, kernel)[: curve.size]


def automatic_reference_mask(concentration: np.ndarray, mask: np.ndarray, tail_fraction: float = 0.25,
                             peak_factor: float = 3.0, tail_mad: float = 2.0) -> np.ndarray:
    """Non-enhancing reference voxels inside ``mask`` (module doc), ``[k, j, i]`` bool."""
    curves = concentration[mask].astype(np.float64)
    finite = np.isfinite(curves).all(axis=1)
    n = curves.shape[1]
    peak = np.where(finite, np.nanmax(np.where(np.isfinite(curves), curves, -np.inf), axis=1), 0.0)
    ok = finite & (peak > 0)
    if not ok.any():
        raise PerfusionAIError("leakage correction: no voxel in the mask has a positive bolus curve")
    median_peak = np.median(peak[ok])
    ok &= (peak > median_peak / peak_factor) & (peak < median_peak * peak_factor)
    tail = np.where(ok, curves[:, n - max(2, int(round(tail_fraction * n))):].mean(axis=1), 0.0)
    ratio = tail / np.where(peak > 0, peak, 1.0)
    centre = np.median(ratio[ok])
    spread = 1.4826 * np.median(np.abs(ratio[ok] - centre))
    spread = max(spread, 1e-3)
    ok &= np.abs(ratio - centre) <= tail_mad * spread
    out = np.zeros(mask.shape, bool)
    out[mask] = ok
    return out


def bsw_correct(
    concentration: np.ndarray,
    mask: np.ndarray,
    times: np.ndarray,
    reference_mask: Optional[np.ndarray] = None,
    fit_start_index: Optional[int] = None,
    reference_name: str = "leakage reference mask",
    model: str = "bsw-transit",
    delays_s: Sequence[float] = (0.0, 2.0, 4.0),
    dispersions_s: Sequence[float] = (0.0, 4.0, 10.0),
    max_k2_cv: Optional[float] = None,
) -> LeakageResult:
    """Fit the BSW model in every masked voxel and return the corrected curves.

    Parameters
    ----------
    concentration
        ``[k, j, i, t]`` delta-R2* in 1/s (not modified).
    mask
        ``[k, j, i]`` bool voxels to correct (the brain mask).
    times
        ``(t,)`` frame times in s.
    reference_mask
        ``[k, j, i]`` bool non-enhancing voxels for ``Cref``; automatic (module doc)
        when None.
    fit_start_index
        First frame used in the fit (default 0: all frames; the baseline carries no
        information but does no harm since both model columns are ~0 there).
    model, delays_s, dispersions_s
        ``"bsw"`` (classic) or ``"bsw-transit"`` with the reference delayed by
        ``delays_s`` and dispersed by ``dispersions_s`` (module doc).
    max_k2_cv
        Correct only the voxels whose K2 is reliable: coefficient of variation (standard error /
        |K2|) at most this value (e.g. 0.5); None corrects every masked voxel. K1, K2 and ``k2_cv``
        are reported for every voxel either way.

    Returns
    -------
    LeakageResult
        ``corrected = C + K2 * cumint(Cref)``, with ``K1``, ``K2`` maps and ``Cref``.
    """
    concentration = np.asarray(concentration)
    mask = np.asarray(mask, dtype=bool)
    times = np.asarray(times, dtype=float)
    if concentration.ndim != 4 or mask.shape != concentration.shape[:3]:
        raise ValueError(f"need concentration [k, j, i, t] and mask [k, j, i]; got "
                         f"{concentration.shape} and {mask.shape}")
    if times.shape != (concentration.shape[-1],):
        raise ValueError(f"times has shape {times.shape}, expected ({concentration.shape[-1]},)")
    if not mask.any():
        raise input_error("brain mask", "is empty; leakage correction needs voxels")
    if reference_mask is None:
        reference_mask = automatic_reference_mask(concentration, mask)
    else:
        reference_mask = np.asarray(reference_mask, dtype=bool)
        if reference_mask.shape != mask.shape:
            raise input_error(reference_name, f"has shape {reference_mask.shape}, the series {mask.shape}")
    ref_curves = concentration[reference_mask].astype(np.float64)
    ref_curves = ref_curves[np.isfinite(ref_curves).all(axis=1)]
    if ref_curves.shape[0] == 0:
        raise input_error(reference_name, "selects no voxel with a valid curve")
    reference = ref_curves.mean(axis=0)
    if reference.max() <= 0:
        raise input_error(reference_name, "has no bolus (its mean curve is never positive)")
    ref_integral = cumulative_integral(reference, times)

    start = int(fit_start_index or 0)
    if model == "bsw":
        vascular = [reference]
    elif model == "bsw-transit":
        vascular = [_dispersed(_delayed(reference, times, d), times, tau)
                    for d in delays_s for tau in dispersions_s]
    else:
        raise ParameterError("leakage_model", f"unknown model {model!r}; choose bsw or bsw-transit")
    design = np.stack(vascular + [-ref_integral], axis=1)[start:]  # (t', p)
    pinv = np.linalg.pinv(design)  # (p, t')
    curves = concentration[mask].astype(np.float64)
    finite = np.isfinite(curves).all(axis=1)
    coeffs = np.zeros((curves.shape[0], design.shape[1]))
    coeffs[finite] = curves[finite, start:] @ pinv.T
    corrected = np.array(concentration, copy=True)
    k2_vox = coeffs[:, -1]
    # standard error of K2: residual variance x the K2 diagonal of (D^T D)^-1 = |last row of pinv|^2
    dof = max(design.shape[0] - design.shape[1], 1)
    residual = np.zeros(curves.shape[0])
    residual[finite] = np.sum((curves[finite, start:] - coeffs[finite] @ design.T) ** 2, axis=1)
    se_k2 = np.sqrt(residual / dof * float(np.sum(pinv[-1] ** 2)))
    with np.errstate(divide="ignore", invalid="ignore"):
        cv_vox = np.where(k2_vox != 0, se_k2 / np.abs(k2_vox), np.inf)
    if max_k2_cv is not None and not (np.isfinite(max_k2_cv) and max_k2_cv > 0):
        raise ParameterError("leakage_max_k2_cv", f"must be a positive number, got {max_k2_cv}")
    apply = finite if max_k2_cv is None else finite & (cv_vox <= max_k2_cv)
    k2_applied = np.where(apply, k2_vox, 0.0)
    corrected[mask] = (curves + k2_applied[:, None] * ref_integral[None, :]).astype(corrected.dtype)
    k1 = np.zeros(mask.shape)
    k2 = np.zeros(mask.shape)
    k2_cv = np.zeros(mask.shape)
    corrected_mask = np.zeros(mask.shape, bool)
    k1[mask] = coeffs[:, :-1].sum(axis=1)
    k2[mask] = k2_vox
    k2_cv[mask] = cv_vox
    corrected_mask[mask] = apply
    return LeakageResult(corrected=corrected, k1=k1, k2=k2, reference_curve=reference,
                         reference_mask=reference_mask, k2_cv=k2_cv, corrected_mask=corrected_mask)
