"""From a 4D diffusion series to maps on the input grid (shared by the CLI and the Slicer module).

* :func:`read_scheme_file` reads FSL-style ``bvals`` (s/mm^2) and echo-time files (ms):
  whitespace-separated numbers on one row (one column is accepted too).
* :func:`check_protocol` refuses every inconsistent input with a message naming it.
* :func:`fit_series` fits one model over a ``[k, j, i, n]`` array (vectorised over voxels).
* :func:`read_dwi_and_protocol` reads a series and its scheme files; :func:`read_cohort` a cohort CSV
  (``perfusionai dr fit`` itself is :class:`perfusionai.dr.DRFitJob`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ParameterError, PerfusionAIError, input_error
from ..io import check_finite_values, read_mask, read_series
from ..progress import as_progress
from . import fitting
from . import models as M


def read_scheme_file(path: str | os.PathLike, name: str = "b-value file") -> np.ndarray:
    """Numbers of an FSL-style scheme file (one row, whitespace separated; one column accepted).

    Returns ``(n,)`` float64. Raises a clear error for a missing, empty, non-numeric or 2D file.
    """
    p = Path(path)
    if not p.is_file():
        raise input_error(p, f"{name} not found")
    text = p.read_text(errors="replace")
    rows = [line.split() for line in text.replace(",", " ").splitlines() if line.strip()]
    if not rows:
        raise input_error(p, f"{name} is empty")
    if len(rows) > 1 and any(len(r) > 1 for r in rows):
        raise input_error(p, f"{name} has {len(rows)} rows of several numbers; expected one row "
                             f"(FSL bvals style) or one column")
    tokens = [t for r in rows for t in r]
    try:
        values = np.asarray([float(t) for t in tokens])
    except ValueError:
        bad = next(t for t in tokens if not _is_number(t))
        raise input_error(p, f"{name} contains {bad!r}, which is not a number") from None
    if not np.all(np.isfinite(values)):
        raise input_error(p, f"{name} contains non-finite values")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _problem(file, parameter: str, problem: str) -> PerfusionAIError:
    """The error for a bad b-value/TE list: named by its file when it came from one, else by parameter."""
    return input_error(file, problem) if file is not None else ParameterError(parameter, problem)


def check_protocol(n_volumes: int, bvals: np.ndarray, tes: Optional[np.ndarray], model: str,
                   bvals_name=None, tes_name=None) -> M.Protocol:
    """Validate b-values (s/mm^2) and echo times (ms) against the series and the model.

    Raises :class:`PerfusionAIError` naming the offending input: counts differing from the number of
    volumes, negative b, non-positive or second-looking TEs, missing TEs or a single TE for the
    advanced model, too few distinct b-values for the model. ``bvals_name``/``tes_name`` are the
    files the values came from (the message names them); when None, the error is a
    :class:`ParameterError` on ``bvals``/``tes`` (the command line shows the flag).
    """
    if model not in M.MODELS:
        raise ParameterError("model", f"unknown model {model!r}; choose from {', '.join(M.MODELS)}")
    bvals = np.asarray(bvals, float).reshape(-1)
    if bvals.size != n_volumes:
        raise _problem(bvals_name, "bvals",
                       f"has {bvals.size} b-values but the diffusion series has {n_volumes} volumes")
    if np.any(bvals < 0):
        raise _problem(bvals_name, "bvals",
                       f"contains negative b-values ({', '.join(f'{b:g}' for b in bvals[bvals < 0])}); "
                       f"b must be >= 0 s/mm^2")
    if tes is not None:
        tes = np.asarray(tes, float).reshape(-1)
        if tes.size == 1 and n_volumes > 1:
            tes = np.full(n_volumes, tes[0])
        if tes.size != n_volumes:
            raise _problem(tes_name, "tes",
                           f"has {tes.size} echo times but the diffusion series has {n_volumes} volumes")
        if np.any(tes <= 0):
            raise _problem(tes_name, "tes", "echo times must be positive (in ms)")
        if np.all(tes < 1.0):
            raise _problem(tes_name, "tes", f"echo times are in ms; {tes.max():g} looks like seconds "
                                            f"({tes.max() * 1000:g} ms?)")
    if model == "t2ivimkurtosis":
        if tes is None:
            raise ParameterError("tes", "the t2ivimkurtosis model needs the echo time (ms) of every volume")
        if np.unique(tes).size < 2:
            raise _problem(tes_name, "tes", "the t2ivimkurtosis model needs at least 2 different echo times; "
                                            "for single-TE data use the ivim or clinical model")
        if np.unique(bvals).size < 4 or n_volumes < 7:
            raise _problem(bvals_name, "bvals", "the t2ivimkurtosis model needs at least 7 volumes and 4 "
                                                "different b-values")
    if model == "ivim":
        te_sel = np.ones(n_volumes, bool) if tes is None else np.isclose(tes, tes.min())
        if np.unique(bvals[te_sel]).size < 4:
            raise _problem(bvals_name, "bvals", "the ivim model needs at least 4 different b-values at one "
                                                "echo time")
    return M.Protocol(bvals, tes)


#: Repeated b = 0 volumes whose median signals differ by more than this factor were acquired at
#: different echo times (or are broken): a single-TE model must not mix them.
B0_REPEAT_TOLERANCE = 1.10


def check_single_echo(dwi: np.ndarray, protocol: M.Protocol, region: np.ndarray, model: str) -> None:
    """Refuse a series without echo times whose repeated b = 0 volumes differ like different TEs.

    The clinical and IVIM models assume one echo time; without ``tes`` every volume enters the fit.
    b = 0 has no diffusion weighting (and no direction), so repeated b = 0 volumes at one TE agree
    within noise; medians over ``region`` that differ by more than 10 % mean the series holds
    several echo times (e.g. the advanced protocol), whose mixing would bias S0 and the ADCs. With
    ``tes`` given, the models use the volumes at the shortest TE, as the clinical protocol does.
    """
    if protocol.tes is not None:
        return
    b0 = np.flatnonzero(np.isclose(protocol.bvals, 0.0, atol=0.5))
    if b0.size < 2:
        return
    medians = np.array([float(np.median(dwi[..., n][region])) for n in b0])
    low, high = float(medians.min()), float(medians.max())
    if low <= 0 or high / low > B0_REPEAT_TOLERANCE:
        raise ParameterError("tes", f"the {b0.size} volumes at b = 0 have median signals from {low:.4g} to "
                                    f"{high:.4g} ({100 * (high / max(low, 1e-30) - 1):.0f} % apart): the series "
                                    f"looks like several echo times; give the echo times (the {model} model "
                                    f"then uses the volumes at the shortest TE)")


def _fit_region(dwi: np.ndarray, mask: Optional[np.ndarray], source) -> np.ndarray:
    """Voxels to fit ``[k, j, i]``: inside the mask (or the whole image) with a finite, non-zero signal."""
    finite = np.all(np.isfinite(dwi), axis=-1)
    signal = np.any(dwi > 0, axis=-1) & finite
    region = signal if mask is None else (mask & signal)
    if not region.any():
        where = "inside the mask" if mask is not None else "in the series"
        raise input_error(source, f"every voxel {where} is zero (or not finite) in all volumes; "
                                  f"there is no signal to fit")
    return region


def fit_series(
    dwi: np.ndarray,
    protocol: M.Protocol,
    model: str,
    mask: Optional[np.ndarray] = None,
    noise_sigma: Optional[float] = None,
    progress=None,
    source: str = "diffusion series",
    **options,
) -> tuple[dict, np.ndarray, dict]:
    """Fit ``model`` to every voxel of a diffusion series.

    Parameters
    ----------
    dwi
        ``[k, j, i, n]`` magnitude series (volume axis last).
    protocol
        b-values (s/mm^2) and echo times (ms), checked by :func:`check_protocol`.
    model
        ``clinical``, ``t2ivimkurtosis`` or ``ivim``.
    mask
        Optional ``[k, j, i]`` boolean; voxels outside it (and voxels without signal) get 0.
    noise_sigma
        Noise SD for the noise-floor correction of the non-linear fits (signal units).
    options
        Passed to the fit function (bounds, grid_points, clinical b subsets, ...).

    Returns
    -------
    maps
        name -> ``[k, j, i]`` float32 (names and units in :mod:`.models`).
    status
        ``[k, j, i]`` int8: 1 converged, -1 iteration limit, 0 not fitted.
    info
        What was done (method, b-values used, voxel counts).
    """
    dwi = np.asarray(dwi)
    protocol = check_protocol(dwi.shape[-1], protocol.bvals, protocol.tes, model)
    check_finite_values(dwi, None if mask is None else np.asarray(mask, bool), source, "diffusion series")
    region = _fit_region(dwi, mask, source)
    if model in ("clinical", "ivim"):
        check_single_echo(dwi, protocol, region, model)
    signals = dwi[region].astype(np.float64)
    progress = as_progress(progress)
    if model == "clinical":
        try:
            result = fitting.fit_clinical(signals, protocol.bvals, protocol.tes, **options)
        except ValueError as exc:
            raise ParameterError("bvals", str(exc)) from None
    elif model == "ivim":
        sel = np.ones(protocol.n, bool) if protocol.tes is None else np.isclose(protocol.tes, protocol.tes.min())
        result = fitting.fit_ivim(signals[:, sel], protocol.bvals[sel], noise_sigma=noise_sigma,
                                  progress=progress, **options)
        result.info["volumes_used"] = int(sel.sum())
    else:
        result = fitting.fit_t2ivimkurtosis(signals, protocol.bvals, protocol.tes, noise_sigma=noise_sigma,
                                            progress=progress, **options)
    maps = {}
    for name, values in result.maps.items():
        full = np.zeros(region.shape, np.float32)
        full[region] = values
        maps[name] = full
    status = np.zeros(region.shape, np.int8)
    status[region] = result.status
    info = dict(result.info)
    info["voxels_fitted"] = int(region.sum())
    if mask is not None:
        info["mask_voxels_without_signal"] = int((mask & ~region).sum())
    info["voxels_at_iteration_limit"] = int((status == -1).sum())
    return maps, status, info


def read_dwi_and_protocol(dwi_path, bvals_path, tes_path, model: str):
    """Read a series and its scheme files and check them together; returns ``(series, protocol)``."""
    series = read_series(dwi_path, name="diffusion series", min_frames=2)
    bvals = read_scheme_file(bvals_path, "b-value file")
    tes = read_scheme_file(tes_path, "echo-time file") if tes_path is not None else None
    protocol = check_protocol(series.n_frames, bvals, tes, model, bvals_name=bvals_path, tes_name=tes_path)
    return series, protocol


def read_cohort(path: str | os.PathLike, progress=None) -> list:
    """Read a cohort CSV (columns patient, dwi, bvals, tes, mask; paths relative to the CSV) and build
    every patient's learning data (:class:`perfusionai.dr.learners.PatientFeatures`: clinical inputs,
    advanced references). Each dwi must hold the advanced protocol."""
    import csv

    from .learners import patient_features

    progress = as_progress(progress)
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "cohort CSV not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = {"patient", "dwi", "bvals", "tes", "mask"}
    if not rows:
        raise input_error(path, "the cohort CSV lists no patient")
    if not needed <= set(rows[0]):
        raise input_error(path, f"the cohort CSV lacks the columns {', '.join(sorted(needed - set(rows[0])))} "
                                f"(expected: patient, dwi, bvals, tes, mask)")
    base = path.parent
    patients = []
    for i, row in enumerate(rows):
        progress(i / len(rows), f"reading {row['patient']}")
        series, protocol = read_dwi_and_protocol(base / row["dwi"], base / row["bvals"], base / row["tes"],
                                                 "t2ivimkurtosis")
        mask = read_mask(base / row["mask"], series.geometry)
        check_finite_values(series.array, mask, base / row["dwi"], "diffusion series")
        try:
            protocol.clinical_indices()
        except ValueError as exc:
            raise input_error(base / row["bvals"], f"{exc}; the cohort must hold the advanced protocol") from None
        patients.append(patient_features(series.array, protocol, mask, row["patient"]))
    progress(1.0, "cohort read")
    return patients



def protocol_from_attributes(attributes, n_volumes: int, source: str = "series") -> tuple:
    """b-values (s/mm^2) and echo times (ms) from header keys or node attributes, when present.

    Understood keys (values whitespace- or comma-separated):

    * ``PerfusionAI.bvals`` / ``bvals`` and ``PerfusionAI.tes`` / ``tes`` (one value per volume; a
      single TE applies to all volumes);
    * DWMRI NRRD keys: ``DWMRI_b-value`` (the nominal b) with ``DWMRI_gradient_0000`` ... (one
      vector per volume); b of volume n = nominal b x |g_n|^2 (the NA-MIC convention);
    * ``EchoTime`` (ms, one value for all volumes).

    Returns ``(bvals or None, tes or None)`` as float arrays; raises a clear error for keys that
    are present but malformed or of the wrong length.
    """
    attrs = {str(k): str(v) for k, v in dict(attributes).items() if v is not None}

    def numbers(key: str) -> np.ndarray:
        try:
            values = np.asarray([float(t) for t in attrs[key].replace(",", " ").split()], float)
        except ValueError:
            raise input_error(source, f"attribute {key} is not a list of numbers: {attrs[key][:60]!r}") from None
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise input_error(source, f"attribute {key} holds no usable numbers")
        return values

    bvals = None
    for key in ("PerfusionAI.bvals", "bvals"):
        if key in attrs:
            bvals = numbers(key)
            break
    if bvals is None and "DWMRI_b-value" in attrs:
        nominal = numbers("DWMRI_b-value")[0]
        gradients = [numbers(f"DWMRI_gradient_{n:04d}") for n in range(n_volumes) if f"DWMRI_gradient_{n:04d}" in attrs]
        if len(gradients) != n_volumes:
            raise input_error(source, f"has DWMRI_b-value but {len(gradients)} DWMRI_gradient_NNNN keys for "
                                      f"{n_volumes} volumes")
        bvals = nominal * np.asarray([float(np.sum(g[:3] ** 2)) for g in gradients])
    tes = None
    for key in ("PerfusionAI.tes", "tes", "EchoTime"):
        if key in attrs:
            tes = numbers(key)
            break
    if bvals is not None and bvals.size != n_volumes:
        raise input_error(source, f"lists {bvals.size} b-values for {n_volumes} volumes")
    if tes is not None:
        if tes.size == 1:
            tes = np.full(n_volumes, tes[0])
        elif tes.size != n_volumes:
            raise input_error(source, f"lists {tes.size} echo times for {n_volumes} volumes")
    return bvals, tes


def predict_series(dwi: np.ndarray, protocol: M.Protocol, model, mask: Optional[np.ndarray] = None,
                   progress=None, source: str = "diffusion series") -> tuple[dict, Optional[np.ndarray], dict]:
    """Apply a trained learner (:func:`perfusionai.dr.learners.load_model`) to a clinical series.

    Parameters
    ----------
    dwi
        ``[k, j, i, n]`` series containing the model's clinical b-values (at the minimum TE when
        ``protocol.tes`` is given).
    protocol
        b-values (s/mm^2) and optional TEs (ms) of ``dwi``.
    mask
        Optional ``[k, j, i]`` region; default every voxel with signal.

    Returns
    -------
    maps
        name -> ``[k, j, i]`` float32 predicted T2-IVIM-Kurtosis maps (0 outside the region).
    signals
        ``[k, j, i, 21]`` predicted advanced-protocol signals (signal-to-signal), else None.
    info
        algorithm, strategy, voxels, "trained_on_phantoms".
    """
    from .learners import clinical_features, predict

    protocol = check_protocol(dwi.shape[-1], protocol.bvals, protocol.tes, "clinical")
    try:
        idx = protocol.clinical_indices(model.clinical_bvals)
    except ValueError as exc:
        raise ParameterError("bvals", f"{exc}; the model needs b = "
                                      f"{', '.join(f'{b:g}' for b in model.clinical_bvals)} s/mm2") from None
    clinical = np.asarray(dwi)[..., idx]
    check_finite_values(clinical, None if mask is None else np.asarray(mask, bool), source, "diffusion series")
    region = _fit_region(clinical, mask, source)
    clinical_protocol = M.Protocol(protocol.bvals[idx], None if protocol.tes is None else protocol.tes[idx])
    feats = clinical_features(clinical, clinical_protocol, region, "input")
    out = predict(model, feats, progress=progress)
    maps = {}
    for name, values in out.items():
        if name == "signals":
            continue
        full = np.zeros(region.shape, np.float32)
        full[region] = values
        maps[name] = full
    signals = None
    if "signals" in out:
        signals = np.zeros(region.shape + (out["signals"].shape[1],), np.float32)
        signals[region] = out["signals"]
    card = model.description.get("card", {})
    info = {"algorithm": model.algorithm, "strategy": model.strategy, "voxels": int(region.sum()),
            "trained_on_phantoms": bool(card.get("trained_on_phantoms", model.description.get("trained_on_phantoms"))),
            "advanced_protocol": model.advanced_protocol}
    return maps, signals, info


def roi_statistics(maps: dict, roi: np.ndarray, roi_name: str = "ROI") -> list[dict]:
    """Per-map statistics inside a region: rows ``{roi, map, units, voxels, mean, sd, median, p25, p75}``.

    ``maps`` name -> ``[k, j, i]``; ``roi`` ``[k, j, i]`` boolean. Non-finite voxels are left out.
    """
    roi = np.asarray(roi, bool)
    rows = []
    for name, values in maps.items():
        v = np.asarray(values, float)[roi]
        v = v[np.isfinite(v)]
        if v.size == 0:
            rows.append({"roi": roi_name, "map": name, "units": M.MAP_UNITS.get(name, ""), "voxels": 0,
                         "mean": None, "sd": None, "median": None, "p25": None, "p75": None})
            continue
        p25, p50, p75 = np.percentile(v, [25, 50, 75])
        rows.append({"roi": roi_name, "map": name, "units": M.MAP_UNITS.get(name, ""), "voxels": int(v.size),
                     "mean": float(v.mean()), "sd": float(v.std()), "median": float(p50), "p25": float(p25),
                     "p75": float(p75)})
    return rows


def fitted_region(maps: dict) -> np.ndarray:
    """``[k, j, i]`` boolean: voxels where any map is non-zero (the fitted or predicted voxels)."""
    region = None
    for values in maps.values():
        nonzero = np.asarray(values) != 0
        region = nonzero if region is None else (region | nonzero)
    if region is None:
        raise ValueError("no maps")
    return region
