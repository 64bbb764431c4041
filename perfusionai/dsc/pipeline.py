"""The one DSC entry point for front ends: signal series in, perfusion maps out.

:func:`compute_dsc_maps` chains signal -> delta R2* (automatic baseline), AIF (mask mean or
automatic selection), optional BSW leakage correction, deconvolution (sSVD, cSVD, oSVD,
Tikhonov) or a learned method (phae, tmax-net), and the maps of ARCHITECTURE.md:

=====  ===============  =====================================================
key    unit             definition
=====  ===============  =====================================================
cbv    mL/100 g         100 kH/rho * int C_t / int C_a
cbf    mL/100 g/min     6000 kH/rho * max residue
mtt    s                CBV / CBF * 60
tmax   s                time of the residue maximum (AIF time origin)
ttp    s                time of the concentration peak from the series start
k2     1/s              BSW leakage term (only with leakage correction)
=====  ===============  =====================================================

Maps are ``[k, j, i]`` float32; voxels outside the mask are 0, and NaN marks values that are
undefined inside the mask (MTT where CBF <= 0).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from ..errors import PerfusionAIError, input_error
from ..io import check_finite_values
from ..progress import ProgressCallback, as_progress
from . import concentration as conc_mod
from . import deconvolution as dec
from . import maps as maps_mod

MIN_FRAMES = 10
LEARNED_METHODS = ("phae", "tmax-net")
ALL_METHODS = dec.METHODS + LEARNED_METHODS
MAP_KEYS = ("cbv", "cbf", "mtt", "tmax", "ttp")


@dataclass
class DSCOptions:
    """Options of :func:`compute_dsc_maps` (times in seconds).

    te: echo time [s] (required). method: sSVD, cSVD, oSVD (default), Tikhonov, phae,
    tmax-net (case-insensitive). threshold: sSVD/cSVD truncation relative to s_max (None:
    0.2 / 0.1). oi_threshold: oSVD oscillation-index limit. tikhonov_lambda: fixed lambda
    relative to s_max (None: automatic per voxel by ``tikhonov_criterion`` "gcv" (default) |
    "lcurve", or "fixed" meaning 0.1). discretisation: "rectangle" | "simpson". kh, rho: haematocrit
    and density factors. baseline_frames: pre-bolus frames for S0 (None: detected).
    leakage_correction: Boxerman-Schmainda-Weisskoff correction. model_path: model for the
    learned methods (None: PHAE trains on the series itself; tmax-net refuses, no model is packaged). cbv_integration: "trapezoid" | "sum";
    cbv_window: "full" | "first_pass"; refine_tmax: parabolic sub-sample Tmax.
    """

    te: Optional[float] = None
    method: str = "oSVD"
    threshold: Optional[float] = None
    oi_threshold: float = dec.DEFAULT_OI_THRESHOLD
    tikhonov_lambda: Optional[float] = None
    tikhonov_criterion: str = "gcv"
    discretisation: str = "rectangle"
    kh: float = maps_mod.DEFAULT_KH
    rho: float = maps_mod.DEFAULT_RHO
    baseline_frames: Optional[int] = None
    leakage_correction: bool = False
    model_path: Optional[str] = None
    cbv_integration: str = "trapezoid"
    cbv_window: str = "full"
    refine_tmax: bool = False
    chunk_voxels: int = dec.DEFAULT_CHUNK_VOXELS


@dataclass
class DSCResult:
    """Output of :func:`compute_dsc_maps`.

    maps: ``{key: float32 [k, j, i]}`` (see the module table). aif: arterial curve ``(t,)`` in
    1/s. times: ``(t,)`` s. aif_voxels: ``(n, 3)`` int (k, j, i) of the AIF voxels, or None.
    tissue_curve: mean concentration ``(t,)`` inside the mask (after leakage correction).
    baseline_frames: frames used for S0. bolus_arrival_s: time of the detected signal drop
    (None when the baseline was given). summary: JSON-ready dict (inputs, options, medians
    inside the mask, AIF, regularisation). residue_threshold: regularisation actually used.
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


def _method_key(method: str) -> str:
    key = str(method).strip().lower().replace("_", "-")
    if key not in ALL_METHODS:
        raise input_error("--method", f"unknown method {method!r}; choose one of sSVD, cSVD, oSVD, "
                          "Tikhonov, phae, tmax-net")
    return key


def _check_volume_mask(mask, shape, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise input_error(name, f"the mask has shape {m.shape} but the DSC series has {tuple(shape)} "
                          "voxels per frame; it must be on the same grid")
    m = m.astype(bool)
    if not m.any():
        raise input_error(name, "the mask is empty (no voxel is set)")
    return m


def _local_aif_from_mask(concentration: np.ndarray, aif_mask: np.ndarray) -> np.ndarray:
    return concentration[aif_mask].astype(np.float64).mean(axis=0)


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


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


def _median(values: np.ndarray) -> Optional[float]:
    v = values[np.isfinite(values)]
    return float(np.median(v)) if v.size else None


def compute_dsc_maps(signal: np.ndarray, times: np.ndarray, options: DSCOptions,
                     mask: Optional[np.ndarray] = None, aif_mask: Optional[np.ndarray] = None,
                     aif_auto: bool = False, progress: Optional[ProgressCallback] = None) -> DSCResult:
    """Perfusion maps from a DSC signal series.

    Parameters
    ----------
    signal
        DSC signal ``[k, j, i, t]`` (time last), any real dtype; not modified.
    times
        Frame times in seconds, shape ``(t,)``; must be uniform within 1 %.
    options
        :class:`DSCOptions` (``te`` required).
    mask
        Brain mask ``[k, j, i]`` bool; None uses every voxel.
    aif_mask, aif_auto
        Exactly one AIF source: the mean curve of ``aif_mask`` voxels, or automatic selection
        (perfusionai.dsc.aif) inside ``mask``. Neither given -> automatic.
    progress
        ``progress(fraction, message)``; may raise :class:`perfusionai.errors.Cancelled`.
    """
    report = as_progress(progress)
    te = conc_mod.validate_te(options.te)
    key = _method_key(options.method)
    s = np.asarray(signal)
    if s.ndim != 4:
        raise input_error("DSC series", f"expected a 4D series [k, j, i, t], got {s.ndim} dimensions")
    n_frames = s.shape[-1]
    if n_frames < MIN_FRAMES:
        raise input_error("DSC series", f"the series has {n_frames} frames; DSC needs at least {MIN_FRAMES}")
    t = np.asarray(times, dtype=np.float64).ravel()
    if t.size != n_frames:
        raise input_error("frame times", f"{t.size} frame times for {n_frames} frames")
    dt = dec.frame_interval(t)
    shape3 = s.shape[:3]
    brain = np.ones(shape3, bool) if mask is None else _check_volume_mask(mask, shape3, "mask")
    if aif_mask is not None and aif_auto:
        raise input_error("--aif-mask/--aif-auto", "give either an AIF mask or automatic AIF selection, not both")
    arterial = None
    if aif_mask is not None:
        arterial = _check_volume_mask(aif_mask, shape3, "AIF mask")
    else:
        aif_auto = True
    check_finite_values(s, brain if arterial is None else brain | arterial, "DSC series", "the DSC series")

    report(0.0, "concentration and AIF")
    prepared = prepare_concentration_and_aif(s, t, te, brain, arterial, options.baseline_frames)
    concentration, aif, aif_info = prepared.concentration, prepared.aif, prepared.aif_info
    baseline, arrival_s, aif_voxels = prepared.baseline_frames, prepared.arrival_s, prepared.aif_voxels
    report(0.2, "AIF")

    extra_maps = {}
    if options.leakage_correction:
        report(0.3, "leakage correction")
        leakage = _optional("perfusionai.dsc.leakage")
        if leakage is None or not hasattr(leakage, "bsw_correct"):
            raise PerfusionAIError("leakage correction is not available in this installation")
        corrected = leakage.bsw_correct(concentration, brain, t)
        concentration = np.where(brain[..., None], corrected.corrected, concentration).astype(np.float32)
        extra_maps["k2"] = np.where(brain, corrected.k2, 0.0)
        extra_maps["k1"] = np.where(brain, corrected.k1, 0.0)
    deconv_progress = report.sub(0.5 if options.leakage_correction else 0.3, 0.95)

    curves = concentration[brain]  # (n_voxels, t)
    window = None
    if options.cbv_window == "first_pass":
        window = maps_mod.first_pass_window(aif)
    elif options.cbv_window != "full":
        raise input_error("--cbv-window", f"unknown CBV window {options.cbv_window!r}; choose full or first_pass")
    flat_maps = {
        "cbv": maps_mod.cbv_map(curves, aif, dt, options.kh, options.rho, options.cbv_integration, window),
        "ttp": maps_mod.ttp_map(curves, t),
    }
    regularisation: dict = {}
    learned_maps: dict = {}
    if key in LEARNED_METHODS:
        learned = _optional("perfusionai.dsc.learned")
        if learned is None or not hasattr(learned, "compute_learned_maps"):
            raise input_error("--method", f"the learned method {options.method!r} is not available "
                              "in this installation")
        learned_maps = learned.compute_learned_maps(key, concentration, aif, t, brain, options,
                                                    deconv_progress.sub(0.0, 0.7))
        regularisation = {"method": key, "model_path": options.model_path}
    missing = [k for k in ("cbf", "mtt", "tmax") if k not in learned_maps]
    if missing:
        solver = "osvd" if key in LEARNED_METHODS else key
        result = dec.deconvolve(
            curves, aif, dt, solver, threshold=options.threshold, oi_threshold=options.oi_threshold,
            tikhonov_lambda=options.tikhonov_lambda, tikhonov_criterion=options.tikhonov_criterion,
            discretisation=options.discretisation, chunk_voxels=options.chunk_voxels,
            progress=deconv_progress.sub(0.7 if learned_maps else 0.0, 1.0))
        flat_maps["cbf"] = maps_mod.cbf_map(result.cbf, options.kh, options.rho)
        flat_maps["mtt"] = maps_mod.mtt_map(flat_maps["cbv"], flat_maps["cbf"])
        flat_maps["tmax"] = result.tmax_seconds(refine=options.refine_tmax)
        info = dict(result.info)
        info.update(per_voxel_median=float(np.median(result.regularisation)),
                    per_voxel_min=float(np.min(result.regularisation)),
                    per_voxel_max=float(np.max(result.regularisation)))
        if result.oscillation_index is not None:
            info["oscillation_index_median"] = _median(result.oscillation_index)
        if key in LEARNED_METHODS:
            regularisation["fallback_for"] = missing
            regularisation["fallback"] = info
        else:
            regularisation = info
    report(0.95, "maps")

    maps: dict = {}
    for name in MAP_KEYS:
        volume = np.zeros(shape3, dtype=np.float32)
        if name in learned_maps:
            volume[brain] = np.asarray(learned_maps[name], dtype=np.float32)[brain]
        else:
            volume[brain] = flat_maps[name]
        maps[name] = volume
    for name, value in extra_maps.items():
        maps[name] = np.asarray(value, dtype=np.float32)
    tissue_curve = curves.astype(np.float64).mean(axis=0)

    medians = {name: _median(volume[brain].astype(np.float64)) for name, volume in maps.items()}
    summary = {
        "inputs": {"shape_kji": list(shape3), "n_frames": int(n_frames), "frame_interval_s": dt,
                   "te_s": te, "mask_voxels": int(brain.sum()),
                   "voxels_without_valid_baseline": prepared.invalid_voxels,
                   "clipped_signal_samples": prepared.clipped_samples},
        "options": asdict(options),
        "baseline_frames": int(baseline),
        "bolus_arrival_s": arrival_s,
        "aif": aif_info,
        "regularisation": regularisation,
        "medians_in_mask": medians,
        "units": {**maps_mod.MAP_UNITS, "aif": "1/s (delta R2*)"},
    }
    if key in LEARNED_METHODS:
        card = learned_maps.get("model_card") or {}
        summary["learned_method"] = {
            "label": learned_maps.get("label"),
            "notes": list(learned_maps.get("notes") or []),
            "trained_on_phantoms": bool(card.get("trained_on_phantoms", False)),
        }
    report(1.0, "done")
    return DSCResult(maps=maps, aif=aif, times=t, aif_voxels=aif_voxels, tissue_curve=tissue_curve,
                     baseline_frames=int(baseline), bolus_arrival_s=arrival_s, summary=summary,
                     residue_threshold=regularisation)


@dataclass
class PreparedDSC:
    """Concentration and AIF of a series as :func:`compute_dsc_maps` derives them.

    ``concentration`` ``[k, j, i, t]`` float32 delta R2* (1/s, zero outside the converted
    voxels); ``aif`` ``(t,)`` 1/s; ``baseline_frames`` pre-bolus frames used for S0;
    ``arrival_s`` the detected earliest bolus arrival (s from the first frame; None when
    ``baseline_frames`` was given); ``aif_voxels`` ``(n, 3)`` [k, j, i] indices; ``aif_info``
    the summary entry; ``invalid_voxels`` / ``clipped_samples`` as
    :func:`perfusionai.dsc.concentration.signal_to_concentration` counts them.
    """

    concentration: np.ndarray
    aif: np.ndarray
    baseline_frames: int
    arrival_s: Optional[float]
    aif_voxels: np.ndarray
    aif_info: dict
    invalid_voxels: int = 0
    clipped_samples: int = 0


def prepare_concentration_and_aif(s: np.ndarray, t: np.ndarray, te: float, brain: np.ndarray,
                                  arterial: Optional[np.ndarray] = None,
                                  baseline_frames: Optional[int] = None) -> PreparedDSC:
    """Signal ``[k, j, i, t]`` -> delta R2* and the AIF, the one way every DSC path does it.

    The baseline ends before the *earliest* bolus arrival in the brain or the arteries (unless
    ``baseline_frames`` is given); the AIF is the mean of ``arterial`` voxels, or selected
    automatically inside ``brain`` when ``arterial`` is None. ``t`` frame times in s, ``te`` s.
    Used by :func:`compute_dsc_maps`, the learned-method training verbs and the noise study.
    """
    arrival_s = None
    baseline = baseline_frames
    if baseline is None:
        bolus = conc_mod.earliest_bolus_arrival(s, brain, arterial)
        baseline = bolus.baseline_frames
        arrival_s = float(t[bolus.arrival_index] - t[0])
    convert = brain if arterial is None else (brain | arterial)
    converted = conc_mod.signal_to_concentration(s, te, baseline, convert, check_frames=False)
    concentration = converted.concentration  # float32 [k, j, i, t]

    aif_voxels = None
    aif_module = _optional("perfusionai.dsc.aif")
    if arterial is not None:
        source = "AIF mask"
        if aif_module is not None and hasattr(aif_module, "aif_from_mask"):
            aif = aif_module.aif_from_mask(concentration, arterial)
        else:
            aif = _local_aif_from_mask(concentration, arterial)
        aif_voxels = np.argwhere(arterial).astype(int)
        aif_info = {"source": "mask", "n_voxels": int(arterial.sum())}
    else:
        source = "automatic AIF"
        if aif_module is None or not hasattr(aif_module, "select_aif_auto"):
            raise PerfusionAIError("automatic AIF selection is not available in this installation; "
                                   "give an AIF mask (--aif-mask)")
        selection = aif_module.select_aif_auto(concentration, brain, t, baseline_frames=baseline)
        aif = selection.curve
        aif_voxels = np.asarray(selection.voxels, dtype=int).reshape(-1, 3)
        aif_info = {"source": "automatic", "n_voxels": int(aif_voxels.shape[0]),
                    "voxels_kji": aif_voxels.tolist()}
    aif = _validate_aif(aif, source)
    if arterial is not None:
        # an artery's bolus is higher than that of the typical tissue voxel; a mask drawn on tissue
        # (or on the wrong series) would give CBV and CBF many times too high without a word
        tissue_peak = float(np.median(concentration[brain].max(axis=1)))
        if tissue_peak > 0 and aif.max() <= tissue_peak:
            raise input_error(source, f"the AIF peaks at {aif.max():.3g} 1/s, no higher than the median tissue "
                                      f"voxel ({tissue_peak:.3g} 1/s): the AIF mask does not cover an artery")
    aif_info.update(peak=float(aif.max()), peak_time_s=float(t[int(np.argmax(aif))] - t[0]))
    return PreparedDSC(concentration, aif, int(baseline), arrival_s, aif_voxels, aif_info,
                       int(converted.invalid_voxels), int(converted.clipped_samples))
