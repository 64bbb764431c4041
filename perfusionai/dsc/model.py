"""The DSC model in the DIPY manner: ``DSCModel(te, times, method=...).fit(signal, ...) -> DSCFit``.

:class:`DSCModel` holds the acquisition (TE, frame times) and every option; :meth:`DSCModel.fit`
chains signal -> delta R2* (automatic baseline), the AIF (mask mean, a given curve or automatic
selection), optional BSW leakage correction, the method of :mod:`perfusionai.dsc.methods`
(deconvolution or a learned method) and the maps of ARCHITECTURE.md:

=====  ===============  =====================================================
key    unit             definition
=====  ===============  =====================================================
cbv    mL/100 g         100 kH/rho * int C_t / int C_a
cbf    mL/100 g/min     6000 kH/rho * max residue
mtt    s                CBV / CBF * 60
tmax   s                time of the residue maximum (AIF time origin)
ttp    s                time of the concentration peak from the series start
k2     1/s              BSW leakage term (only with leakage correction)
k1     1                scaling of the reference curve (only with leakage correction)
=====  ===============  =====================================================

Maps are ``[k, j, i]`` float32; voxels outside the mask are 0, and NaN marks values that are
undefined inside the mask (MTT where CBF <= 0). Signals are ``[k, j, i, t]`` (time last),
times in seconds.

>>> from perfusionai.phantoms import make_dsc_phantom
>>> p = make_dsc_phantom(shape=(4, 16, 16), n_frames=40)
>>> fit = DSCModel(p.te, p.times, method="oSVD").fit(p.signal, mask=p.brain_mask, aif_mask=p.aif_mask)
>>> round(fit.summary()["medians_in_mask"]["cbf"])  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np

from .. import __version__
from ..errors import ParameterError, PerfusionAIError, input_error
from ..io import Geometry, atomic_output_dir, check_finite_values, write_json, write_series, write_volume
from ..progress import ProgressCallback, as_progress
from . import acquisition
from . import aif as aif_mod
from . import aif_fit as aif_fit_mod
from . import brain_mask as brain_mask_mod
from . import motion as motion_mod
from . import relaxivity as relaxivity_mod
from . import dual_echo as dual_echo_mod
from . import concentration as conc_mod
from . import deconvolution as dec
from . import leakage as leakage_mod
from . import learned as learned_mod
from . import maps as maps_mod
from .methods import DEFAULT_METHOD, METHODS, DSCMethod, resolve_method
from .parametric import run_parametric


@dataclass
class DSCOptions:
    """Every option of a DSC fit (times in seconds); the fields of :class:`DSCModel`.

    te: echo time [s] (required). method: a name of :mod:`perfusionai.dsc.methods` (sSVD, cSVD,
    oSVD (default), Tikhonov, phae, tmax-net; case-insensitive). threshold: sSVD/cSVD truncation
    relative to s_max, in (0, 1) (None: the method's default 0.2 / 0.1). oi_threshold: oSVD
    oscillation-index limit (> 0). tikhonov_lambda: fixed lambda relative to s_max (None:
    automatic per voxel by ``tikhonov_criterion`` "gcv" (default) | "lcurve", or "fixed" meaning
    0.1). tikhonov_floor: the automatic per-voxel lambda is at least the volume's GCV lambda divided
    by this (default 2; 0: no floor, the plain per-voxel criterion). discretisation: "rectangle" | "simpson". kh, rho: haematocrit and density factors.
    baseline_frames: pre-bolus frames for S0 (None: detected). leakage_correction:
    Boxerman-Schmainda-Weisskoff correction. model_path: model for the learned methods (None:
    PHAE trains on the series itself; tmax-net refuses, no model is packaged). cbv_integration:
    "trapezoid" | "sum"; cbv_window: "full" | "first_pass"; refine_tmax: parabolic sub-sample
    Tmax. allow_unusual_tr: accept a frame interval outside 0.1-10 s. device: "auto" | "cpu" |
    "cuda" for the learned methods; seed, phae_epochs, phae_max_seconds (-1: 240 s on CPU),
    phae_residue, phae_estimate_delay: PHAE training on the series itself. series_is_phantom: the
    series is a digital phantom (a PHAE trained on it is marked "trained on phantoms"; set by
    :class:`perfusionai.dsc.DSCMapsJob` from the mark ``dsc phantom`` writes). aif_gamma_fit: replace
    the AIF by a gamma-variate fit of its first pass (recirculation removed, :mod:`.aif_fit`).
    fwhm_map: add the map ``fwhm`` (s), the full width at half maximum of each concentration curve.
    te2: echo time [s] of a second echo passed to :meth:`DSCModel.fit` (``echo2``): dual-echo delta R2*.
    leakage_max_k2_cv: with leakage correction, correct only voxels whose K2 coefficient of variation
    is at most this (None: every voxel); the ``k2_cv`` map is written either way.
    parametric_shape: the parametric method's gamma shape alpha (1 = exponential residue; None: fitted,
    one shape per volume). parametric_dispersion_s: the parametric method's assumed dispersion of the tissue's input,
    the mean time of an exponential kernel (s; 0: none). save_residue: also give the flow-scaled residue ``k(t) = CBF R(t)``
    (1/s, time last) as the series ``residue`` and, for the SVD/Tikhonov methods, the per-voxel
    regularisation (``regularisation`` map) and oscillation index (``oscillation_index``, oSVD).
    auto_mask: without a mask, compute one (:func:`perfusionai.dsc.brain_mask.automatic_brain_mask`:
    Otsu on the pre-bolus image, largest component, holes filled, one voxel eroded) instead of using
    every voxel; the automatic AIF then searches inside it (it keeps the vessels).
    motion_correction: register every frame rigidly to the median baseline image with ANTsPy
    (:mod:`.motion`; the per-frame motion goes to ``inputs["motion_correction"]`` of the summary).
    aif_quadratic: ``(A, B)``: the arterial voxels' delta R2* is ``A C + B C^2`` (whole blood,
    :mod:`.relaxivity`); the AIF is converted to ``A C`` per voxel, the tissue stays linear.
    """

    te: Optional[float] = None
    method: str = DEFAULT_METHOD
    threshold: Optional[float] = None
    oi_threshold: float = dec.DEFAULT_OI_THRESHOLD
    tikhonov_lambda: Optional[float] = None
    tikhonov_criterion: str = "gcv"
    tikhonov_floor: float = METHODS["Tikhonov"].defaults["tikhonov_floor"]
    discretisation: str = "rectangle"
    kh: float = maps_mod.DEFAULT_KH
    rho: float = maps_mod.DEFAULT_RHO
    baseline_frames: Optional[int] = None
    leakage_correction: bool = False
    model_path: Optional[str] = None
    cbv_integration: str = "trapezoid"
    cbv_window: str = "full"
    refine_tmax: bool = False
    allow_unusual_tr: bool = False
    device: str = "auto"
    seed: int = 0
    phae_epochs: int = 65
    phae_max_seconds: float = -1.0
    phae_residue: str = "lorentzian"
    phae_estimate_delay: bool = False
    series_is_phantom: bool = False
    chunk_voxels: int = dec.DEFAULT_CHUNK_VOXELS
    aif_gamma_fit: bool = False
    fwhm_map: bool = False
    te2: Optional[float] = None
    parametric_shape: Optional[float] = None
    parametric_dispersion_s: float = 0.0
    save_residue: bool = False
    leakage_max_k2_cv: Optional[float] = None
    auto_mask: bool = False
    motion_correction: bool = False
    aif_quadratic: Optional[tuple] = None


def validate_options(options: DSCOptions) -> DSCOptions:
    """``options`` with TE validated and the method name canonical; bad values raise
    :class:`ParameterError` naming the option (the one place DSC options are checked)."""
    method = resolve_method(options.method)
    te = acquisition.validate_te(options.te)
    if options.threshold is not None and not (0.0 < float(options.threshold) < 1.0):
        raise ParameterError("threshold", f"the SVD truncation threshold is a fraction of the largest singular "
                                          f"value and must lie in (0, 1), got {options.threshold}")
    if not (np.isfinite(options.oi_threshold) and options.oi_threshold > 0):
        raise ParameterError("oi_threshold", f"the oscillation-index limit must be positive, got {options.oi_threshold}")
    if options.tikhonov_lambda is not None and not (np.isfinite(options.tikhonov_lambda)
                                                    and options.tikhonov_lambda > 0):
        raise ParameterError("tikhonov_lambda", f"lambda (relative to the largest singular value) must be "
                                                f"positive, got {options.tikhonov_lambda}")
    if not (options.tikhonov_floor == 0 or options.tikhonov_floor >= 1):
        raise ParameterError("tikhonov_floor", f"must be 0 (no floor) or at least 1, got {options.tikhonov_floor}")
    for name, allowed in (("tikhonov_criterion", dec.TIKHONOV_CRITERIA), ("discretisation", dec.DISCRETISATIONS),
                          ("cbv_integration", maps_mod.INTEGRATIONS), ("cbv_window", maps_mod.CBV_WINDOWS)):
        if getattr(options, name) not in allowed:
            raise ParameterError(name, f"unknown value {getattr(options, name)!r}; choose one of {', '.join(allowed)}")
    maps_mod.cbf_map(np.zeros(1), options.kh, options.rho)  # kH and rho positive
    if options.aif_quadratic is not None:
        options = dataclasses.replace(options, aif_quadratic=relaxivity_mod.validate_quadratic(options.aif_quadratic))
    if options.baseline_frames is not None and int(options.baseline_frames) < 1:
        raise ParameterError("baseline_frames", f"must be at least 1, got {options.baseline_frames}")
    return dataclasses.replace(options, te=te, method=method.name)


# --------------------------------------------------------------------------------------
# concentration and AIF, the one way every DSC path derives them


@dataclass
class PreparedDSC:
    """Concentration and AIF of a series as :meth:`DSCModel.fit` derives them.

    ``concentration`` ``[k, j, i, t]`` float32 delta R2* (1/s, zero outside the converted
    voxels); ``aif`` ``(t,)`` 1/s; ``baseline_frames`` pre-bolus frames used for S0;
    ``arrival_s`` the detected earliest bolus arrival (s from the first frame; None when
    ``baseline_frames`` was given); ``aif_voxels`` ``(n, 3)`` [k, j, i] indices (None for a given
    curve); ``aif_info`` the summary entry; ``invalid_voxels`` / ``clipped_samples`` as
    :func:`perfusionai.dsc.concentration.signal_to_concentration` counts them; ``warnings`` what
    the automatic AIF check found.
    """

    concentration: np.ndarray
    aif: np.ndarray
    baseline_frames: int
    arrival_s: Optional[float]
    aif_voxels: Optional[np.ndarray]
    aif_info: dict
    invalid_voxels: int = 0
    clipped_samples: int = 0
    warnings: list = field(default_factory=list)


def _validate_aif(aif: np.ndarray, source: str) -> np.ndarray:
    a = np.asarray(aif, dtype=np.float64).ravel()
    if not np.all(np.isfinite(a)):
        raise input_error(source, "the AIF curve contains NaN or infinite values; check the AIF mask")
    peak = float(np.max(a)) if a.size else 0.0
    spread = float(np.ptp(a)) if a.size else 0.0
    if peak <= 0 or spread <= 1e-9 * max(1.0, abs(peak)):
        raise input_error(source, "the AIF curve is zero or flat (no bolus in the AIF voxels); "
                          "check the AIF mask")
    return a


def prepare_concentration_and_aif(s: np.ndarray, t: np.ndarray, te: float, brain: np.ndarray,
                                  arterial: Optional[np.ndarray] = None,
                                  baseline_frames: Optional[int] = None, aif_curve: Optional[np.ndarray] = None,
                                  source: str = "DSC series", aif_source: str = "AIF mask",
                                  echo2: Optional[np.ndarray] = None, te2: Optional[float] = None) -> PreparedDSC:
    """Signal ``[k, j, i, t]`` -> delta R2* and the AIF, the one way every DSC path does it.

    The baseline ends before the *earliest* bolus arrival in the brain or the arteries (unless
    ``baseline_frames`` is given); the AIF is ``aif_curve`` when given (delta R2* in 1/s, shape
    ``(t,)``), else the mean of ``arterial`` voxels, else selected automatically inside ``brain``
    (the search region must contain arteries; a curve that does not look arterial is reported in
    ``warnings``). ``t`` frame times in s, ``te`` s. Used by :meth:`DSCModel.fit`, the
    learned-method training verbs and the noise study.
    """
    arrival_s = None
    baseline = baseline_frames
    if baseline is None:
        bolus = conc_mod.earliest_bolus_arrival(s, brain, arterial, name=source)
        baseline = bolus.baseline_frames
        arrival_s = float(t[bolus.arrival_index] - t[0])
    convert = brain if arterial is None else (brain | arterial)
    if echo2 is not None:  # dual echo: delta R2* from the two echoes (T1 effects cancel), dsc.dual_echo
        if te2 is None:
            raise ParameterError("te2", "give the echo time of the second echo (seconds)")
        converted = dual_echo_mod.dual_echo_delta_r2star(s, echo2, te, te2, baseline, convert)
        concentration = converted.delta_r2star
    else:
        converted = conc_mod.signal_to_concentration(s, te, baseline, convert, name=source, check_frames=False)
        concentration = converted.concentration  # float32 [k, j, i, t]

    warnings: list = []
    aif_voxels = None
    if aif_curve is not None:
        aif = np.asarray(aif_curve, dtype=np.float64).ravel()
        if aif.size != s.shape[-1]:
            raise ParameterError("aif", f"the AIF curve has {aif.size} samples but the series {s.shape[-1]} frames")
        source_name = "AIF curve"
        aif_info = {"source": "curve", "n_voxels": 0}
    elif arterial is not None:
        source_name = aif_source
        aif = aif_mod.aif_from_mask(concentration, arterial, name=aif_source)
        aif_voxels = np.argwhere(arterial).astype(int)
        aif_info = {"source": "mask", "n_voxels": int(arterial.sum())}
    else:
        source_name = "automatic AIF"
        selection = aif_mod.select_aif_auto(concentration, brain, t, baseline_frames=baseline)
        aif = selection.curve
        aif_voxels = np.asarray(selection.voxels, dtype=int).reshape(-1, 3)
        aif_info = {"source": "automatic", "n_voxels": int(aif_voxels.shape[0]),
                    "voxels_kji": aif_voxels.tolist(), "fwhm_s": float(selection.fwhm_s)}
    aif = _validate_aif(aif, source_name)
    if arterial is not None:
        # an artery's bolus is higher than that of the typical tissue voxel; a mask drawn on tissue
        # (or on the wrong series) would give CBV and CBF many times too high without a word
        tissue_peak = float(np.median(concentration[brain].max(axis=1)))
        if tissue_peak > 0 and aif.max() <= tissue_peak:
            raise input_error(source_name, f"the AIF peaks at {aif.max():.3g} 1/s, no higher than the median tissue "
                                           f"voxel ({tissue_peak:.3g} 1/s): the AIF mask does not cover an artery")
    if aif_curve is None and arterial is None:
        exclude = np.zeros(brain.shape, bool)
        exclude[tuple(aif_voxels.T)] = True
        warnings = aif_mod.arterial_warnings(aif, concentration[brain & ~exclude], t)
        aif_info["looks_arterial"] = not warnings
        aif_info["warnings"] = list(warnings)
    aif_info.update(peak=float(aif.max()), peak_time_s=float(t[int(np.argmax(aif))] - t[0]))
    return PreparedDSC(concentration, aif, int(baseline), arrival_s, aif_voxels, aif_info,
                       int(converted.invalid_voxels), int(converted.clipped_samples), warnings)


# --------------------------------------------------------------------------------------
# method runners (one per kind of the registry)


@dataclass
class FitProblem:
    """What a method runner gets: curves ``(n_voxels, t)`` of the masked voxels (1/s), the AIF
    ``(t,)``, frame ``times`` ``(t,)`` and ``dt`` (s), the 4D ``concentration`` and the ``mask``
    ``[k, j, i]``, the validated ``options`` and the resolved ``method``."""

    curves: np.ndarray
    aif: np.ndarray
    times: np.ndarray
    dt: float
    concentration: np.ndarray
    mask: np.ndarray
    options: DSCOptions
    method: DSCMethod


@dataclass
class MethodOutput:
    """What a runner returns: ``maps`` ``{name: (n_voxels,)}`` of the five maps (:data:`maps.MAP_NAMES`),
    ``regularisation`` (JSON-ready), ``extra_maps`` (further ``(n_voxels,)`` maps, e.g. a fit
    quality), ``learned`` (label, notes, trained_on_phantoms for the summary; None for classical),
    ``series`` (``(n_voxels, L)`` curves written as 4D series, e.g. the residue with ``save_residue``)."""

    maps: Dict[str, np.ndarray]
    regularisation: dict = field(default_factory=dict)
    extra_maps: Dict[str, np.ndarray] = field(default_factory=dict)
    learned: Optional[dict] = None
    series: Dict[str, np.ndarray] = field(default_factory=dict)


def _deconvolution_maps(problem: FitProblem, method: DSCMethod, progress) -> MethodOutput:
    o = problem.options
    result = dec.deconvolve(
        problem.curves, problem.aif, problem.dt, method.solver, threshold=method.default("threshold", o.threshold),
        oi_threshold=o.oi_threshold, tikhonov_lambda=o.tikhonov_lambda, tikhonov_criterion=o.tikhonov_criterion,
        tikhonov_floor=o.tikhonov_floor or None,
        discretisation=o.discretisation, chunk_voxels=o.chunk_voxels, progress=progress)
    window = maps_mod.cbv_window_frames(problem.aif, o.cbv_window)
    maps = maps_mod.perfusion_maps(problem.curves, problem.aif, problem.times, result, o.kh, o.rho,
                                   o.cbv_integration, window, o.refine_tmax)
    info = dict(result.info)
    info.update(per_voxel_median=float(np.median(result.regularisation)),
                per_voxel_min=float(np.min(result.regularisation)),
                per_voxel_max=float(np.max(result.regularisation)))
    if result.oscillation_index is not None:
        info["oscillation_index_median"] = maps_mod.median_in_mask(result.oscillation_index)
    extra: Dict[str, np.ndarray] = {}
    series: Dict[str, np.ndarray] = {}
    if o.save_residue:
        extra["regularisation"] = result.regularisation
        if result.oscillation_index is not None:
            extra["oscillation_index"] = result.oscillation_index
        series["residue"] = result.residue
    return MethodOutput(maps=maps, regularisation=info, extra_maps=extra, series=series)


def run_deconvolution(problem: FitProblem, progress) -> MethodOutput:
    """Runner of kind ``"deconvolution"``: sSVD, cSVD, oSVD, Tikhonov."""
    return _deconvolution_maps(problem, problem.method, progress)


def run_learned(problem: FitProblem, progress) -> MethodOutput:
    """Runner of kind ``"learned"``: the learned maps, the others from the method's fallback (oSVD)."""
    report = as_progress(progress)
    learned = learned_mod.compute_learned_maps(problem.method.name, problem.concentration, problem.aif,
                                               problem.times, problem.mask, problem.options, report.sub(0.0, 0.7))
    fallback = resolve_method(problem.method.fallback)
    base = _deconvolution_maps(problem, fallback, report.sub(0.7, 1.0))
    maps = dict(base.maps)
    for name, volume in learned.maps.items():
        if name in maps:
            maps[name] = np.asarray(volume, dtype=np.float32)[problem.mask]
    regularisation: dict = {"method": problem.method.name, "model_path": problem.options.model_path}
    missing = [name for name in ("cbf", "mtt", "tmax") if name not in learned.maps]
    if missing:
        regularisation["fallback_for"] = missing
        regularisation["fallback"] = base.regularisation
    return MethodOutput(maps=maps, regularisation=regularisation,
                        learned={"label": learned.label, "notes": list(learned.notes),
                                 "trained_on_phantoms": learned.trained_on_phantoms})


#: The code that runs each ``kind`` of :mod:`perfusionai.dsc.methods`: ``runner(problem, progress)``.
RUNNERS: Dict[str, Callable[[FitProblem, Any], MethodOutput]] = {
    "deconvolution": run_deconvolution,
    "learned": run_learned,
    "parametric": run_parametric,
}


# --------------------------------------------------------------------------------------
# the model and its fit


def _check_volume_mask(mask, shape, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise input_error(name, f"the mask has shape {m.shape} but the DSC series has {tuple(shape)} "
                          "voxels per frame; it must be on the same grid")
    m = m.astype(bool)
    if not m.any():
        raise input_error(name, "the mask is empty (no voxel is set)")
    return m


class DSCModel:
    """A DSC acquisition plus the analysis options; :meth:`fit` gives a :class:`DSCFit`.

    Parameters
    ----------
    te
        Echo time in seconds.
    times, tr
        Frame times ``(t,)`` in seconds, or the frame interval ``tr`` in seconds (frames
        ``0, tr, 2 tr, ...``). Refused outside 0.1-10 s unless ``allow_unusual_tr``.
    method
        A method of :mod:`perfusionai.dsc.methods` (case-insensitive): ``"oSVD"`` (default),
        ``"sSVD"``, ``"cSVD"``, ``"Tikhonov"``, ``"phae"``, ``"tmax-net"``.
    **options
        Any field of :class:`DSCOptions` (``kh``, ``rho``, ``threshold``, ``oi_threshold``,
        ``tikhonov_lambda``, ``tikhonov_criterion``, ``leakage_correction``, ``model_path``, ...).
    timing_source
        Where ``times``/``tr`` came from (a file path), named when the TR is refused.
    """

    def __init__(self, te: float, times=None, tr: Optional[float] = None, method: str = DEFAULT_METHOD, *,
                 timing_source: Optional[str] = None, **options):
        names = {f.name for f in dataclasses.fields(DSCOptions)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"DSCModel got unknown option(s) {', '.join(unknown)}")
        self.options = validate_options(DSCOptions(te=te, method=method, **options))
        self.method = resolve_method(self.options.method)
        if times is None and tr is None:
            raise ParameterError("tr", "give the frame times (times) or the frame interval (tr) in seconds")
        if times is not None:
            self.times: Optional[np.ndarray] = np.asarray(times, dtype=np.float64).ravel()
            dt = acquisition.frame_interval(self.times, source=timing_source or "frame times")
        else:
            self.times = None
            dt = tr
        self.tr = acquisition.validate_tr(dt, self.options.allow_unusual_tr, source=timing_source)

    @classmethod
    def from_options(cls, options: DSCOptions, times, timing_source: Optional[str] = None) -> "DSCModel":
        """The model of a :class:`DSCOptions` and frame times (s)."""
        values = asdict(options)
        te = values.pop("te")
        method = values.pop("method")
        return cls(te, times, method=method, timing_source=timing_source, **values)

    @property
    def te(self) -> float:
        return float(self.options.te)

    def frame_times(self, n_frames: int) -> np.ndarray:
        """Frame times (s), shape ``(n_frames,)``."""
        if self.times is None:
            return np.arange(int(n_frames), dtype=np.float64) * self.tr
        if self.times.size != int(n_frames):
            raise ParameterError("times", f"{self.times.size} frame times for {int(n_frames)} frames")
        return self.times

    def fit(self, signal: np.ndarray, mask: Optional[np.ndarray] = None, aif_mask: Optional[np.ndarray] = None,
            aif: Optional[np.ndarray] = None, progress: Optional[ProgressCallback] = None, *,
            source: str = "DSC series", mask_source: str = "brain mask",
            aif_source: str = "AIF mask", echo2: Optional[np.ndarray] = None,
            spacing: Optional[tuple] = None) -> "DSCFit":
        """Fit the model to a DSC signal.

        Parameters
        ----------
        signal
            DSC signal ``[k, j, i, t]`` (time last), any real dtype; not modified.
        mask
            Brain mask ``[k, j, i]`` bool; None uses every voxel.
        aif_mask, aif
            At most one AIF source: the mean curve of the ``aif_mask`` voxels, or a given curve
            ``(t,)`` in delta R2* (1/s). Neither: automatic selection inside ``mask`` (the whole
            image when None); the search region must contain arteries.
        progress
            ``progress(fraction, message)``; may raise :class:`perfusionai.errors.Cancelled`.
        echo2
            The second echo ``[k, j, i, t]`` of a dual-echo series (echo time ``te2``): delta R2* by
            :func:`perfusionai.dsc.dual_echo.dual_echo_delta_r2star` instead of ``-ln(S/S0)/TE``.
        source, mask_source, aif_source
            Names of the inputs (file paths) for messages.
        spacing
            Voxel spacing (mm) along (i, j, k) for the motion correction's millimetres (None: 1 mm).
        """
        report = as_progress(progress)
        o = self.options
        s = np.asarray(signal)
        if s.ndim != 4:
            raise input_error(source, f"expected a 4D series [k, j, i, t], got {s.ndim} dimensions")
        n_frames = acquisition.validate_frame_count(s.shape[-1], source)
        t = self.frame_times(n_frames)
        shape3 = s.shape[:3]
        if mask is not None:
            brain, mask_kind = _check_volume_mask(mask, shape3, mask_source), "given"
        elif o.auto_mask:
            brain, mask_kind = brain_mask_mod.automatic_brain_mask(s, o.baseline_frames, name=source), "automatic"
        else:
            brain, mask_kind = np.ones(shape3, bool), "whole image"
        if aif_mask is not None and aif is not None:
            raise ParameterError("aif", "give either an AIF mask or an AIF curve, not both")
        arterial = _check_volume_mask(aif_mask, shape3, aif_source) if aif_mask is not None else None
        used = brain if arterial is None else brain | arterial
        check_finite_values(s, used, source, "the DSC series")
        acquisition.check_signal_dropout(s, brain, source)

        applied = ["automatic brain mask"] if mask_kind == "automatic" else []
        motion = None
        if o.motion_correction:
            reference_frames = o.baseline_frames or conc_mod.earliest_bolus_arrival(
                s, brain, arterial, name=source).baseline_frames
            motion = motion_mod.correct_motion(s, spacing or (1.0, 1.0, 1.0), reference_frames, seed=o.seed,
                                               progress=report.sub(0.0, 0.15))
            s = motion.signal
            applied.append("motion correction")
        report(0.0 if motion is None else 0.15, "concentration and AIF")
        if echo2 is not None:
            echo2 = np.asarray(echo2)
            check_finite_values(echo2, used, "second echo", "the second echo")
        prepared = prepare_concentration_and_aif(s, t, o.te, brain, arterial, o.baseline_frames, aif,
                                                 source=source, aif_source=aif_source, echo2=echo2, te2=o.te2)
        concentration = prepared.concentration
        if o.aif_quadratic is not None:
            a, b = o.aif_quadratic
            if prepared.aif_voxels is None:  # a given curve
                prepared.aif = relaxivity_mod.quadratic_to_linear(prepared.aif, a, b)
            else:  # per voxel, then the mean: the inverse is not linear
                curves_a = relaxivity_mod.quadratic_to_linear(concentration[tuple(prepared.aif_voxels.T)], a, b)
                prepared.aif = curves_a[np.isfinite(curves_a).all(axis=1)].mean(axis=0)
            prepared.aif = _validate_aif(prepared.aif, "quadratic AIF conversion")
            prepared.aif_info["relaxivity"] = {"model": "quadratic", "A_per_s_per_mM": a, "B_per_s_per_mM2": b}
            applied.append("quadratic AIF relaxivity")
        if o.aif_gamma_fit:
            gamma = aif_fit_mod.fit_gamma_variate(prepared.aif, t, name=aif_source if arterial is not None else "AIF")
            prepared.aif = _validate_aif(gamma.first_pass, "gamma-variate AIF fit")
            prepared.aif_info["gamma_fit"] = gamma.to_dict()
        report(0.2, "AIF")

        extra: Dict[str, np.ndarray] = {}
        if o.leakage_correction:
            report(0.3, "leakage correction")
            corrected = leakage_mod.bsw_correct(concentration, brain, t, max_k2_cv=o.leakage_max_k2_cv)
            concentration = np.where(brain[..., None], corrected.corrected, concentration).astype(np.float32)
            extra["k2"] = np.where(brain, corrected.k2, 0.0)
            extra["k1"] = np.where(brain, corrected.k1, 0.0)
            extra["k2_cv"] = np.where(brain, np.minimum(corrected.k2_cv, 1e6), 0.0)
        curves = concentration[brain]  # (n_voxels, t)
        if o.fwhm_map:
            fwhm = aif_mod.curve_features(curves, t, prepared.baseline_frames)["fwhm_s"]
            extra["fwhm"] = np.zeros(shape3)
            extra["fwhm"][brain] = fwhm
        problem = FitProblem(curves, prepared.aif, t, self.tr, concentration, brain, o, self.method)
        runner = RUNNERS.get(self.method.kind)
        if runner is None:
            raise PerfusionAIError(f"the DSC method {self.method.name} ({self.method.kind}) has no runner")
        output = runner(problem, report.sub(0.5 if o.leakage_correction else 0.3, 0.95))
        report(0.95, "maps")

        maps: Dict[str, np.ndarray] = {}
        for name, flat in list(output.maps.items()) + list(output.extra_maps.items()):
            volume = np.zeros(shape3, dtype=np.float32)
            volume[brain] = flat
            maps[name] = volume
        for name, value in extra.items():
            maps[name] = np.asarray(value, dtype=np.float32)
        series: Dict[str, np.ndarray] = {}
        for name, flat in output.series.items():
            volume = np.zeros(shape3 + (flat.shape[-1],), dtype=np.float32)
            volume[brain] = flat
            series[name] = volume
        inputs = {"shape_kji": list(shape3), "n_frames": int(n_frames), "frame_interval_s": float(self.tr),
                  "te_s": o.te, "mask_voxels": int(brain.sum()), "mask": mask_kind,
                  "voxels_without_valid_baseline": prepared.invalid_voxels,
                  "clipped_signal_samples": prepared.clipped_samples, "preprocessing_applied": applied}
        if motion is not None:
            inputs["motion_correction"] = motion.to_dict()
        report(1.0, "done")
        return DSCFit(maps=maps, aif=prepared.aif, times=t, mask=brain, aif_voxels=prepared.aif_voxels,
                      tissue_curve=curves.astype(np.float64).mean(axis=0), baseline_frames=prepared.baseline_frames,
                      bolus_arrival_s=prepared.arrival_s, aif_info=dict(prepared.aif_info),
                      regularisation=output.regularisation, inputs=inputs, options=o, method=self.method,
                      learned=output.learned, warnings=list(prepared.warnings), series=series)


@dataclass
class DSCFit:
    """The result of :meth:`DSCModel.fit`.

    maps: ``{name: float32 [k, j, i]}`` (module table); also as attributes ``cbv``, ``cbf``,
    ``mtt``, ``tmax``, ``ttp`` (and ``k2``, ``k1`` with leakage correction, else None). aif:
    arterial curve ``(t,)`` in 1/s; times ``(t,)`` s; mask ``[k, j, i]`` bool; aif_voxels ``(n, 3)``
    (k, j, i) or None; tissue_curve: mean concentration ``(t,)`` inside the mask;
    baseline_frames; bolus_arrival_s (None when the baseline was given); aif_info, regularisation,
    inputs: JSON-ready; learned: label/notes/trained_on_phantoms of a learned method (else None);
    warnings: what the user should know (e.g. an automatic AIF that does not look arterial);
    series: ``{name: float32 [k, j, i, L]}`` curves per voxel (``residue`` with ``save_residue``: the
    flow-scaled residue in 1/s at lags ``0, dt, ...``; for cSVD/oSVD ``L = 2 t``, the second half holding
    negative lags).
    """

    maps: Dict[str, np.ndarray]
    aif: np.ndarray
    times: np.ndarray
    mask: np.ndarray
    aif_voxels: Optional[np.ndarray]
    tissue_curve: np.ndarray
    baseline_frames: int
    bolus_arrival_s: Optional[float]
    aif_info: dict
    regularisation: dict
    inputs: dict
    options: DSCOptions
    method: DSCMethod
    learned: Optional[dict] = None
    warnings: list = field(default_factory=list)
    series: Dict[str, np.ndarray] = field(default_factory=dict)

    cbv = property(lambda self: self.maps["cbv"])
    cbf = property(lambda self: self.maps["cbf"])
    mtt = property(lambda self: self.maps["mtt"])
    tmax = property(lambda self: self.maps["tmax"])
    ttp = property(lambda self: self.maps["ttp"])
    k2 = property(lambda self: self.maps.get("k2"))
    k1 = property(lambda self: self.maps.get("k1"))

    def medians(self) -> Dict[str, Optional[float]]:
        """Median of every map inside the mask (None where no finite value)."""
        return {name: maps_mod.median_in_mask(volume, self.mask) for name, volume in self.maps.items()}

    def summary(self, geometry: Optional[Geometry] = None, job=None) -> dict:
        """The one DSC summary (what ``summary.json`` holds): inputs, options, the AIF, the
        regularisation, the median of every map inside the mask, units and warnings; with
        ``geometry`` the AIF voxels in LPS mm too, with ``job`` its :meth:`Job.to_json`."""
        aif_info = dict(self.aif_info)
        if geometry is not None and self.aif_voxels is not None and len(self.aif_voxels):
            kji = np.asarray(self.aif_voxels, dtype=int).reshape(-1, 3)
            lps = (geometry.ijk_to_lps() @ np.c_[kji[:, ::-1], np.ones(len(kji))].T).T[:, :3]
            aif_info["voxels_kji"] = kji.tolist()
            aif_info["voxels_lps_mm"] = np.round(lps, 3).tolist()
        summary = {
            "perfusionai_version": __version__,
            "method": self.method.name,
            "inputs": dict(self.inputs),
            "options": asdict(self.options),
            "baseline_frames": int(self.baseline_frames),
            "bolus_arrival_s": self.bolus_arrival_s,
            "aif": aif_info,
            "regularisation": self.regularisation,
            "medians_in_mask": self.medians(),
            "units": {**{k: maps_mod.MAP_UNITS.get(k, "") for k in self.maps}, "aif": "1/s (delta R2*)"},
            "warnings": list(self.warnings),
        }
        if self.learned is not None:
            summary["learned_method"] = dict(self.learned)
        if job is not None:
            summary["job"] = job.to_json()
        return summary

    def write_aif_csv(self, path) -> Path:
        """``time_s, aif_delta_r2star_per_s, tissue_mean_delta_r2star_per_s`` (the AIF and mean tissue curves)."""
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["time_s", "aif_delta_r2star_per_s", "tissue_mean_delta_r2star_per_s"])
            for i, t in enumerate(self.times):
                w.writerow([f"{t:.6g}", f"{self.aif[i]:.8g}", f"{self.tissue_curve[i]:.8g}"])
        return Path(path)

    def save(self, folder, geometry: Geometry, job=None, extra_summary: Optional[dict] = None,
             inputs=()) -> Path:
        """Write ``<map>.nii.gz`` (float32 on ``geometry``), ``aif.csv`` and ``summary.json`` into
        ``folder`` atomically (a failed write leaves nothing half-written; a folder whose outputs
        would replace one of the ``inputs`` files is refused), and the automatic mask the fit made
        (``auto_mask.nii.gz``, :data:`perfusionai.dsc.brain_mask.AUTO_MASK_FILE`). Returns the folder."""
        with atomic_output_dir(folder, inputs=[p for p in inputs if p]) as stage:
            for name, volume in self.maps.items():
                write_volume(np.asarray(volume, dtype=np.float32), geometry, stage / f"{name}.nii.gz")
            if self.inputs.get("mask") == "automatic":
                write_volume(np.asarray(self.mask, dtype=np.uint8), geometry, stage / brain_mask_mod.AUTO_MASK_FILE,
                             np.uint8)
            for name, volume in self.series.items():
                write_series(volume, geometry, stage / f"{name}.nii.gz", tr=float(self.inputs["frame_interval_s"]))
            self.write_aif_csv(stage / "aif.csv")
            summary = self.summary(geometry, job)
            summary.update(extra_summary or {})
            write_json(summary, stage / "summary.json")
        return Path(folder)
