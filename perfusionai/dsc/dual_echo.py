"""Dual-echo DSC: delta R2* free of T1 effects, and the signal extrapolated to TE = 0.

With two gradient echoes ``TE1 < TE2`` per frame, ``S_e(t) = S(TE=0, t) exp(-TE_e R2*(t))``, so

    delta R2*(t) = ln[(S1(t) / S1,0) / (S2(t) / S2,0)] / (TE2 - TE1)          (1/s)
    S(TE=0, t)  = exp[(TE2 ln S1(t) - TE1 ln S2(t)) / (TE2 - TE1)]

(Vonken et al. 1999; the dual-echo formula of the OSIPI LCB_BNI_USA ``dsc.py``, written from the
equations, not copied). ``S1,0``, ``S2,0`` are the means of the baseline frames. Any change of the
TE = 0 signal -- T1 shortening by contrast leaking out of the vessels, inflow -- cancels in the
ratio, which single-echo ``-ln(S/S0)/TE`` does not do: on OSIPI's real tumour curves
(``shared/external/dsc/osipi_lcb_dual_echo``) the single-echo TE2 curve ends 6 1/s *below* baseline
while the dual-echo curve stays positive and ``S(TE=0)`` rises by half (Testing/test_dsc_dual_echo.py).

Arrays: signals ``[..., t]`` (time last, e.g. ``[k, j, i, t]``), both echoes on one grid; TE in s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ParameterError, input_error

#: non-positive samples are raised to this fraction of the voxel's baseline before the logarithm
MIN_SIGNAL_RATIO = 1e-3


@dataclass
class DualEchoResult:
    """``delta_r2star`` (1/s, float32, the signals' shape), ``s_te0_ratio`` (S(TE=0, t) / its
    baseline mean, float32, same shape), ``r2star_baseline`` (1/s, ``[...]``: the baseline R2*),
    ``baseline_frames`` and the number of ``invalid_voxels`` (non-positive baseline, set to 0)."""

    delta_r2star: np.ndarray
    s_te0_ratio: np.ndarray
    r2star_baseline: np.ndarray
    baseline_frames: int
    invalid_voxels: int
    clipped_samples: int = 0


def dual_echo_delta_r2star(echo1: np.ndarray, echo2: np.ndarray, te1: float, te2: float, baseline_frames: int,
                           mask: Optional[np.ndarray] = None, name: str = "second echo") -> DualEchoResult:
    """delta R2* and the TE = 0 signal from two echoes ``[..., t]`` (module docstring).

    ``mask`` ``[...]`` (bool, the signals' shape without time) limits the computation (0 outside).
    """
    s1 = np.asarray(echo1)
    s2 = np.asarray(echo2)
    if s1.shape != s2.shape:
        raise input_error(name, f"the second echo has shape {s2.shape} but the first {s1.shape}; "
                                "both echoes must be on one grid with the same frames")
    if not (np.isfinite(te1) and np.isfinite(te2) and 0 <= te1 < te2):
        raise ParameterError("te2", f"need 0 <= TE1 < TE2 (seconds), got TE1={te1}, TE2={te2}")
    n = s1.shape[-1]
    nb = int(baseline_frames)
    if not 1 <= nb < n:
        raise ParameterError("baseline_frames", f"need 1 <= baseline frames < {n}, got {baseline_frames}")
    inside = np.ones(s1.shape[:-1], bool) if mask is None else np.asarray(mask, bool)
    a = s1[inside].astype(np.float64)
    b = s2[inside].astype(np.float64)
    base1 = a[:, :nb].mean(axis=1, keepdims=True)
    base2 = b[:, :nb].mean(axis=1, keepdims=True)
    valid = (base1[:, 0] > 0) & (base2[:, 0] > 0) & np.isfinite(base1[:, 0]) & np.isfinite(base2[:, 0])
    safe1 = np.where(valid[:, None], base1, 1.0)
    safe2 = np.where(valid[:, None], base2, 1.0)
    log1 = np.log(np.maximum(np.nan_to_num(a, nan=0.0), MIN_SIGNAL_RATIO * safe1))
    log2 = np.log(np.maximum(np.nan_to_num(b, nan=0.0), MIN_SIGNAL_RATIO * safe2))
    gap = te2 - te1
    delta = ((log1 - np.log(safe1)) - (log2 - np.log(safe2))) / gap
    log_s0 = (te2 * log1 - te1 * log2) / gap
    log_s0_base = (te2 * np.log(safe1) - te1 * np.log(safe2)) / gap
    ratio = np.exp(log_s0 - log_s0_base)
    r2_base = (np.log(safe1) - np.log(safe2))[:, 0] / gap
    delta[~valid] = 0.0
    ratio[~valid] = 0.0
    r2_base[~valid] = 0.0
    out_delta = np.zeros(s1.shape, np.float32)
    out_ratio = np.zeros(s1.shape, np.float32)
    out_r2 = np.zeros(s1.shape[:-1])
    out_delta[inside] = delta
    out_ratio[inside] = ratio
    out_r2[inside] = r2_base
    return DualEchoResult(out_delta, out_ratio, out_r2, nb, int((~valid).sum()))
