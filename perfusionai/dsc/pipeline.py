"""Deprecated entry point kept for existing callers: :func:`compute_dsc_maps` (options in, maps out).

New code uses :class:`perfusionai.dsc.DSCModel` (``DSCModel(te, times, ...).fit(signal, ...)``),
which this wrapper calls: there is one DSC computation (:mod:`perfusionai.dsc.model`).
:class:`DSCOptions` and :func:`prepare_concentration_and_aif` are re-exported from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import ParameterError
from ..progress import ProgressCallback
from .acquisition import MIN_FRAMES  # noqa: F401  (re-exported)
from .model import DSCFit, DSCModel, DSCOptions, PreparedDSC, prepare_concentration_and_aif

__all__ = ["DSCOptions", "DSCResult", "PreparedDSC", "compute_dsc_maps", "prepare_concentration_and_aif"]


@dataclass
class DSCResult:
    """Output of :func:`compute_dsc_maps` (the fields of :class:`perfusionai.dsc.DSCFit`, with
    ``summary`` as the dict :meth:`DSCFit.summary` returns).

    maps: ``{key: float32 [k, j, i]}``. aif: arterial curve ``(t,)`` in 1/s. times: ``(t,)`` s.
    aif_voxels: ``(n, 3)`` int (k, j, i) of the AIF voxels, or None. tissue_curve: mean
    concentration ``(t,)`` inside the mask. baseline_frames; bolus_arrival_s; summary;
    residue_threshold: the regularisation actually used; fit: the :class:`DSCFit`.
    """

    maps: dict
    aif: np.ndarray
    times: np.ndarray
    aif_voxels: Optional[np.ndarray]
    tissue_curve: np.ndarray
    baseline_frames: int
    bolus_arrival_s: Optional[float]
    summary: dict = field(default_factory=dict)
    residue_threshold: dict = field(default_factory=dict)
    fit: Optional[DSCFit] = None


def compute_dsc_maps(signal: np.ndarray, times: np.ndarray, options: DSCOptions,
                     mask: Optional[np.ndarray] = None, aif_mask: Optional[np.ndarray] = None,
                     aif_auto: bool = False, progress: Optional[ProgressCallback] = None) -> DSCResult:
    """Perfusion maps from a DSC signal ``[k, j, i, t]`` with frame ``times`` (s): deprecated,
    ``DSCModel.from_options(options, times).fit(signal, mask, aif_mask, progress=progress)``.

    ``aif_auto`` True with an ``aif_mask`` is refused; without a mask the AIF is automatic.
    """
    if aif_mask is not None and aif_auto:
        raise ParameterError("aif_auto", "give either an AIF mask or automatic AIF selection, not both")
    fit = DSCModel.from_options(options, times).fit(signal, mask=mask, aif_mask=aif_mask, progress=progress)
    return DSCResult(maps=fit.maps, aif=fit.aif, times=fit.times, aif_voxels=fit.aif_voxels,
                     tissue_curve=fit.tissue_curve, baseline_frames=fit.baseline_frames,
                     bolus_arrival_s=fit.bolus_arrival_s, summary=fit.summary(),
                     residue_threshold=fit.regularisation, fit=fit)
