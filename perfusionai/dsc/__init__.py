"""DSC-MRI perfusion: signal -> delta R2*, AIF, deconvolution, CBV/CBF/MTT/Tmax/TTP maps.

The public API, in the DIPY manner::

    from perfusionai.dsc import DSCModel
    fit = DSCModel(te=0.03, tr=1.5, method="oSVD").fit(signal, mask=brain, aif_mask=arteries)
    fit.cbf, fit.summary()["medians_in_mask"], fit.save("out", geometry)

* :class:`DSCModel` / :class:`DSCFit` / :class:`DSCOptions` (:mod:`.model`);
* :class:`DSCMapsJob` (``perfusionai dsc maps`` as one serialisable job) and :class:`DSCMapsResult`;
* the method registry :data:`METHODS` / :func:`resolve_method` (:mod:`.methods`);
* :func:`noise_study` (:mod:`.noise_study`);
* the numerical pieces in :mod:`.concentration`, :mod:`.deconvolution` and :mod:`.maps` (they accept
  concentration curves directly, e.g. the OSIPI test curves). :func:`compute_dsc_maps` is the
  deprecated options-in, maps-out wrapper of :class:`DSCModel`.
"""

from .acquisition import MIN_FRAMES, TR_RANGE_S, frame_interval
from .concentration import detect_bolus_arrival, signal_to_concentration
from .deconvolution import DeconvolutionResult, deconvolve
from .job import DSCMapsJob, DSCMapsResult
from .maps import MAP_NAMES, MAP_UNITS, cbf_map, cbv_map, median_in_mask, mtt_map, perfusion_maps, ttp_map
from .methods import METHODS, DSCMethod, register_method, resolve_method
from .model import DSCFit, DSCModel, DSCOptions
from .noise_study import NoiseStudyResult, noise_study
from .pipeline import DSCResult, compute_dsc_maps

__all__ = [
    "DSCModel", "DSCFit", "DSCOptions", "DSCMapsJob", "DSCMapsResult",
    "METHODS", "DSCMethod", "register_method", "resolve_method",
    "MIN_FRAMES", "TR_RANGE_S", "MAP_NAMES", "MAP_UNITS", "median_in_mask",
    "noise_study", "NoiseStudyResult",
    "DSCResult", "compute_dsc_maps",
    "detect_bolus_arrival", "signal_to_concentration",
    "DeconvolutionResult", "deconvolve", "frame_interval",
    "cbv_map", "cbf_map", "mtt_map", "ttp_map", "perfusion_maps",
]
