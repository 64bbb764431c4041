"""DL-CTPM evaluation with the pinned definitions (research/translation.md 1.2; issue 7 item 4).

* Ground truth = SPECT / P75(SPECT inside the lung) (:func:`~.preprocessing.normalise_spect`),
  not discretised.
* **Spearman R** over the lung voxels (prediction vs normalised SPECT, the
  latter *not* clipped: ranks above 1 still count).
* **SSIM** (:func:`perfusionai.metrics.ssim3d`): 3D, Gaussian window sigma 1.5
  voxels, K1 0.01, K2 0.03, population covariance, data range 1; both maps
  clipped to [0, 1], voxels outside the lung set to 0, on the lung's bounding box.
* **Dice** of high (>= 0.66) and low (< 0.66) function inside the lung.

The paper compares at the SPECT's resolution ("the DL-CTPM images were
up-sampled to the original SPECT resolution"): :func:`evaluate_files` resamples
the prediction (linear) and the lung mask (linear, >= 0.5) onto the SPECT grid
by default (``grid="spect"``); ``grid="prediction"`` resamples the SPECT onto
the prediction's (CT) grid instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import metrics
from ..errors import ParameterError, input_error
from ..io import Geometry, read_labels, read_volume
from .preprocessing import coverage, normalise_spect, resample_onto

HIGH_FUNCTION_THRESHOLD = 0.66
#: Fraction of the lung that must lie inside the SPECT's field of view.
MIN_SPECT_COVERAGE = 0.9


def evaluate_maps(prediction: np.ndarray, spect_normalised: np.ndarray, lung_mask: np.ndarray,
                  threshold: float = HIGH_FUNCTION_THRESHOLD) -> dict:
    """The four pinned numbers for maps on one grid (arrays ``[k, j, i]``).

    Parameters
    ----------
    prediction
        Predicted perfusion in [0, 1].
    spect_normalised
        SPECT / P75 (dimensionless, not clipped).
    lung_mask
        Lung voxels (bool or labels > 0).

    Returns
    -------
    dict
        ``{"spearman", "ssim", "dice_high", "dice_low", "lung_voxels"}``.
    """
    lung = np.asarray(lung_mask) > 0
    if not lung.any():
        raise input_error("lung mask", "is empty on the evaluation grid")
    pred = np.asarray(prediction, dtype=np.float64)
    ref = np.asarray(spect_normalised, dtype=np.float64)
    high_pred, high_ref = (pred >= threshold) & lung, (ref >= threshold) & lung
    return {
        "spearman": metrics.spearman(pred[lung], ref[lung]),
        "ssim": metrics.ssim3d(pred, ref, lung),
        "dice_high": metrics.dice(high_pred, high_ref),
        "dice_low": metrics.dice(lung & ~high_pred, lung & ~high_ref),
        "lung_voxels": int(lung.sum()),
    }


@dataclass
class EvaluationInputs:
    """Prediction, normalised SPECT and lung mask on the evaluation grid."""

    prediction: np.ndarray
    spect_normalised: np.ndarray
    lung: np.ndarray
    geometry: Geometry
    p75: float


def align_for_evaluation(prediction: np.ndarray, prediction_geometry: Geometry, lung_mask: np.ndarray,
                         spect: np.ndarray, spect_geometry: Geometry, grid: str = "spect",
                         percentile: float = 75.0, spect_name: str = "SPECT") -> EvaluationInputs:
    """Bring prediction, lung mask (both on the prediction's grid) and SPECT onto one grid.

    Raises a clear error when the SPECT covers less than 90 % of the lung.
    """
    lung_pred_grid = np.asarray(lung_mask) > 0
    if grid not in ("spect", "prediction"):
        raise ParameterError("grid", f"must be 'spect' or 'prediction', got {grid!r}")
    covered = coverage(spect_geometry, prediction_geometry, lung_pred_grid)
    if covered < MIN_SPECT_COVERAGE:
        raise input_error(spect_name, f"covers only {100 * covered:.0f} % of the lung (at least "
                                      f"{100 * MIN_SPECT_COVERAGE:.0f} % needed): the SPECT does not overlap "
                                      f"the CT; register it to the CT first")
    if grid == "spect":
        pred = resample_onto(prediction.astype(np.float32), prediction_geometry, spect_geometry)
        lung = resample_onto(lung_pred_grid.astype(np.float32), prediction_geometry, spect_geometry) >= 0.5
        spect_on_grid = np.asarray(spect, dtype=np.float32)
        geometry = spect_geometry
    else:
        pred = np.asarray(prediction, dtype=np.float32)
        lung = lung_pred_grid
        spect_on_grid = resample_onto(np.asarray(spect, dtype=np.float32), spect_geometry, prediction_geometry)
        geometry = prediction_geometry
    if not lung.any():
        raise input_error("lung mask", "has no voxel left on the SPECT grid (the lung is smaller than "
                                       "one SPECT voxel)")
    spect_norm = normalise_spect(spect_on_grid, lung, percentile, spect_name)
    p75 = float(np.percentile(spect_on_grid[lung], percentile))
    return EvaluationInputs(pred, spect_norm, lung, geometry, p75)


def evaluate_files(prediction_path: str | os.PathLike, spect_path: str | os.PathLike,
                   lung_mask_path: str | os.PathLike, grid: str = "spect") -> dict:
    """``perfusionai ctpm evaluate``: the pinned numbers from three files.

    The lung mask must lie on the prediction's grid (the CT grid of
    ``perfusionai ctpm predict``); the SPECT may be on its own grid (it is
    placed by its physical coordinates).
    """
    pred_vol = read_volume(prediction_path, "prediction")
    pred = np.asarray(pred_vol.array, dtype=np.float32)
    if not np.all(np.isfinite(pred)):
        raise input_error(prediction_path, "prediction contains NaN or infinite values")
    if pred.min() < -1e-3 or pred.max() > 1 + 1e-3:
        raise input_error(prediction_path, f"prediction values span [{pred.min():.3g}, {pred.max():.3g}]; "
                                           f"a perfusion map in [0, 1] was expected")
    lung = read_labels(lung_mask_path, pred_vol.geometry, "lung mask") > 0
    if not lung.any():
        raise input_error(lung_mask_path, "lung mask is empty")
    spect_vol = read_volume(spect_path, "SPECT")
    aligned = align_for_evaluation(pred, pred_vol.geometry, lung, np.asarray(spect_vol.array),
                                   spect_vol.geometry, grid, spect_name=str(spect_path))
    result = evaluate_maps(aligned.prediction, aligned.spect_normalised, aligned.lung)
    result.update(grid=grid, spect_p75=aligned.p75)
    return result


def summarise_cohort(rows: Sequence[dict], keys: Sequence[str] = ("spearman", "ssim", "dice_high", "dice_low")) -> dict:
    """Mean, SD, median, min and max of each metric over cases (``rows`` of :func:`evaluate_maps`)."""
    out = {}
    for key in keys:
        values = np.array([r[key] for r in rows], dtype=float)
        out[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                    "median": float(np.median(values)), "min": float(values.min()), "max": float(values.max()),
                    "n": int(values.size)}
    return out


def cohort_box_plots(groups: dict[str, Sequence[dict]], path: str | os.PathLike) -> Path:
    """Box plots of R, SSIM (as the paper's Fig. 4c/d) and Dice high/low (Fig. 6) per group.

    ``groups`` maps a group name (e.g. "fold 1", "test") to its per-case rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    panels = (("spearman", "Spearman R"), ("ssim", "SSIM"), ("dice_high", "Dice high function"),
              ("dice_low", "Dice low function"))
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for ax, (key, title) in zip(axes, panels):
        data = [[r[key] for r in groups[n]] for n in names]
        ax.boxplot(data, whis=1.5)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(min(0.0, min(min(d) for d in data if d)), 1.0)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def evaluate_arrays(prediction: np.ndarray, prediction_geometry: Geometry, lung_mask: np.ndarray,
                    spect: np.ndarray, spect_geometry: Geometry, grid: str = "spect") -> dict:
    """:func:`evaluate_files` on arrays (prediction and lung mask on one grid, SPECT on its own)."""
    aligned = align_for_evaluation(np.asarray(prediction, dtype=np.float32), prediction_geometry, lung_mask,
                                   np.asarray(spect), spect_geometry, grid)
    result = evaluate_maps(aligned.prediction, aligned.spect_normalised, aligned.lung)
    result.update(grid=grid, spect_p75=aligned.p75)
    return result


def evaluate_cohort(cohort_csv: str | os.PathLike, out_dir: str | os.PathLike, grid: str = "spect") -> dict:
    """Evaluate every row of a CSV (columns ``pred, spect, lung_mask`` and optional ``group``, paths
    relative to the CSV) and write ``cases.csv``, ``summary.json`` and ``boxplots.png`` (R, SSIM as the
    paper's Fig. 4c/d; Dice high/low as its Fig. 6) into ``out_dir``. Returns the summary per group."""
    import csv

    from ..io import atomic_output_dir, write_json

    path = Path(cohort_csv)
    if not path.is_file():
        raise input_error(path, "cohort CSV not found")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if not {"pred", "spect", "lung_mask"} <= set(columns):
            raise input_error(path, f"needs columns pred, spect, lung_mask (optional group); found {columns}")
        entries = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not entries:
        raise input_error(path, "has no rows")

    def resolve(value):
        p = Path(value)
        return p if p.is_absolute() else path.parent / p

    groups: dict[str, list[dict]] = {}
    cases = []
    for entry in entries:
        result = evaluate_files(resolve(entry["pred"]), resolve(entry["spect"]), resolve(entry["lung_mask"]), grid)
        group = entry.get("group") or "all"
        groups.setdefault(group, []).append(result)
        cases.append({"group": group, "pred": entry["pred"], **{k: result[k] for k in
                                                                ("spearman", "ssim", "dice_high", "dice_low")}})
    summary = {group: summarise_cohort(rows) for group, rows in groups.items()}
    with atomic_output_dir(out_dir) as stage:
        with open(stage / "cases.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(cases[0]))
            writer.writeheader()
            writer.writerows(cases)
        write_json(json_safe(summary), stage / "summary.json")
        cohort_box_plots(groups, stage / "boxplots.png")
    return summary


#: Why a metric can be undefined (written as null in JSON, never NaN).
UNDEFINED_REASONS = {
    "spearman": "the prediction or the SPECT is constant over the lung, so the rank correlation is undefined",
    "ssim": "SSIM is undefined for these maps",
    "dice_high": "neither map has high-function voxels (>= 0.66) in the lung",
    "dice_low": "neither map has low-function voxels (< 0.66) in the lung",
}


def json_safe(result: dict) -> dict:
    """A copy of ``result`` with every non-finite number replaced by None (valid, strict JSON) and an
    ``"undefined"`` entry saying why each such metric has no value."""
    out, undefined = {}, {}
    for key, value in result.items():
        if isinstance(value, dict):
            out[key] = json_safe(value)
        elif isinstance(value, (float, np.floating)) and not np.isfinite(value):
            out[key] = None
            undefined[key] = UNDEFINED_REASONS.get(key, "not defined for these inputs")
        else:
            out[key] = value
    if undefined:
        out["undefined"] = undefined
    return out


def evaluate_command(pred=None, spect=None, lung_mask=None, cohort=None, out=None, grid: str = "spect") -> dict:
    """``perfusionai ctpm evaluate``: one case (``pred``, ``spect``, ``lung_mask``) or a ``cohort`` CSV.

    One case: returns the metrics (non-finite values as None, see :func:`json_safe`) and, with
    ``out``, writes them as JSON to that file (to ``out/evaluation.json`` when ``out`` is an existing
    folder). A cohort: :func:`evaluate_cohort` into the folder ``out`` (required).
    """
    from ..errors import ParameterError
    from ..io import write_json

    if cohort:
        if not out:
            raise ParameterError("out", "a cohort evaluation needs an output folder")
        return json_safe(evaluate_cohort(cohort, out, grid=grid))
    missing = [name for name, value in (("pred", pred), ("spect", spect), ("lung_mask", lung_mask)) if not value]
    if missing:
        raise ParameterError(missing[0], f"required for one case ({', '.join(missing)} missing), or give a cohort CSV "
                                         f"and an output folder")
    result = json_safe(evaluate_files(pred, spect, lung_mask, grid=grid))
    if out:
        target = Path(out)
        if target.is_dir():
            target = target / "evaluation.json"
        if not target.parent.is_dir():
            raise input_error(target.parent, "folder for the evaluation JSON does not exist")
        try:
            write_json(result, target)
        except OSError as exc:
            raise input_error(target, f"cannot write the evaluation JSON ({exc.strerror})") from None
    return result
