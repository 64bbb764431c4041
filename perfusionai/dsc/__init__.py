"""DSC-MRI perfusion: signal -> delta R2*, AIF, deconvolution, CBV/CBF/MTT/Tmax/TTP maps.

Front ends call :func:`compute_dsc_maps` with :class:`DSCOptions`; the numerical pieces are
in :mod:`.concentration`, :mod:`.deconvolution` and :mod:`.maps` (they accept concentration
curves directly, e.g. the OSIPI test curves).
"""

from .concentration import detect_bolus_arrival, signal_to_concentration
from .deconvolution import DeconvolutionResult, deconvolve, frame_interval
from .maps import cbf_map, cbv_map, mtt_map, perfusion_maps, ttp_map
from .pipeline import DSCOptions, DSCResult, compute_dsc_maps

__all__ = [
    "DSCOptions", "DSCResult", "compute_dsc_maps",
    "detect_bolus_arrival", "signal_to_concentration",
    "DeconvolutionResult", "deconvolve", "frame_interval",
    "cbv_map", "cbf_map", "mtt_map", "ttp_map", "perfusion_maps",
]
