"""Agreement of a PRM map (or its %PRM) with a reference, for one case and for a cohort.

One case (:func:`evaluate_case`): Dice of each class (normal, fSAD, emphysema, uncategorized)
and of PRM_abnormal = fSAD + emphysema (Xu et al.), and the %PRM of both maps with their
difference (predicted - reference) for the whole lung, right, left and each lobe.

Cohort (:func:`evaluate_cohort`): Pearson r (and p) of predicted against reference %PRM per
class at patient level and at lobe level, Bland-Altman (mean difference, SD, limits
mean +- 1.96 SD) per class, and the Fig. 3 figure of Xu et al. The cohort CSV has one row
per patient with columns ``patient, pred, ref`` and optionally ``lobes``: paths (relative
to the CSV's folder) of PRM label maps, or of ``prm_stats.json`` files for ``pred``/``ref``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ParameterError, input_error
from ..io import read_labels, read_volume
from ..metrics import agreement, dice
from .classification import CLASS_KEYS, EMPH, FSAD
from .stats import prm_statistics

PERCENT_CLASSES = ("normal", "fsad", "emph", "uncategorized")


def voxel_volume_ml(geometry) -> float:
    """One voxel's volume in mL (spacing in mm)."""
    return float(np.prod(geometry.spacing)) / 1000.0


def _check_labels(prm: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(prm)
    if arr.size and (arr.min() < 0 or arr.max() > 4):
        raise input_error(name, f"is not a PRM label map: values must be 0-4, found {int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.uint8)


def evaluate_case(pred: np.ndarray, ref: np.ndarray, lobes: Optional[np.ndarray] = None,
                  lung: Optional[np.ndarray] = None, voxel_volume_ml: float = 0.0) -> dict:
    """Dice per class and %PRM differences of two PRM maps ``[k, j, i]`` on one grid.

    Parameters
    ----------
    pred, ref
        PRM labels 0-4.
    lobes
        Optional lobes 1-6 on the same grid (adds right/left/lobe percentages).
    lung
        Optional lung mask restricting both maps; default: voxels labelled in either map.
    voxel_volume_ml
        One voxel's volume in mL (for the ``volume_ml`` of each region; the product of the spacing / 1000).

    Returns
    -------
    dict
        ``dice`` ({class: Dice}, plus ``abnormal``), ``pred`` and ``ref`` (prm_stats dictionaries),
        ``difference`` ({region: {class: pred% - ref%}}).
    """
    pred = _check_labels(pred, "pred")
    ref = _check_labels(ref, "ref")
    if pred.shape != ref.shape:
        raise ParameterError("pred", f"shape {pred.shape} differs from the reference {ref.shape}")
    region = (pred > 0) | (ref > 0) if lung is None else np.asarray(lung, dtype=bool)
    p = np.where(region, pred, 0)
    r = np.where(region, ref, 0)
    result: dict = {"dice": {key: dice(p == label, r == label) for label, key in CLASS_KEYS.items()}}
    result["dice"]["abnormal"] = dice(np.isin(p, (FSAD, EMPH)), np.isin(r, (FSAD, EMPH)))
    # Each map's %PRM over its own valid voxels of the region (the %PRM a user would read off it).
    sides = np.zeros(region.shape, dtype=np.uint8)
    sides[region] = 1 if lobes is None else 0
    result["pred"] = prm_statistics(p, np.where(p > 0, sides, 0) if lobes is None else sides, lobes, voxel_volume_ml)
    result["ref"] = prm_statistics(r, np.where(r > 0, sides, 0) if lobes is None else sides, lobes, voxel_volume_ml)
    if lobes is None:
        for stats in (result["pred"], result["ref"]):
            stats.pop("right", None)
            stats.pop("left", None)
    result["difference"] = percent_differences(result["pred"], result["ref"])
    return result


def _regions(stats: dict) -> dict[str, dict]:
    out = {k: v for k, v in stats.items() if k in ("whole_lung", "right", "left") and isinstance(v, dict)}
    for lobe, values in stats.get("lobes", {}).items():
        out[f"lobe_{lobe}"] = values
    return out


def percent_differences(pred_stats: dict, ref_stats: dict) -> dict:
    """``{region: {class: pred% - ref%}}`` for the regions both dictionaries have."""
    pr, rr = _regions(pred_stats), _regions(ref_stats)
    return {name: {c: float(pr[name][c] - rr[name][c]) for c in PERCENT_CLASSES}
            for name in pr if name in rr}


def _load_stats(path: Path, lobes_path: Optional[Path], lobe_convention: str) -> dict:
    if path.name.endswith(".json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise input_error(path, f"cannot be read as prm_stats.json ({exc})") from None
        if "whole_lung" not in data:
            raise input_error(path, "is not a prm_stats.json file (no 'whole_lung' entry)")
        return data
    vol = read_volume(path, "PRM map")
    prm = _check_labels(vol.array, str(path))
    lobes = None
    if lobes_path is not None:
        from ..lung import import_lobes

        lobes = import_lobes(read_labels(lobes_path, vol.geometry, "lobe map"), lobe_convention, str(lobes_path))
    sides = (prm > 0).astype(np.uint8) if lobes is None else np.zeros(prm.shape, np.uint8)
    return prm_statistics(prm, sides, lobes, voxel_volume_ml(vol.geometry))


def read_cohort_csv(path: str | Path) -> list[dict]:
    """Rows ``{patient, pred, ref, lobes}`` of a cohort CSV (paths resolved against its folder)."""
    p = Path(path)
    if not p.exists():
        raise input_error(p, "cohort CSV does not exist")
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        missing = {"pred", "ref"} - set(fields)
        if missing:
            raise input_error(p, f"cohort CSV needs the columns pred and ref (missing: {', '.join(sorted(missing))})")
        rows = []
        for n, raw in enumerate(reader, start=1):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            entry = {"patient": row.get("patient") or f"case{n}"}
            for key in ("pred", "ref", "lobes"):
                value = row.get(key, "")
                entry[key] = (p.parent / value) if value else None
            if entry["pred"] is None or entry["ref"] is None:
                raise input_error(p, f"row {n}: pred and ref must both be given")
            rows.append(entry)
    if len(rows) < 3:
        raise input_error(p, f"a cohort needs at least 3 patients for Pearson r, found {len(rows)}")
    return rows


def evaluate_cohort(rows: list[dict], lobe_convention: str = "project", figure: Optional[Path] = None) -> dict:
    """Pearson r and Bland-Altman of predicted vs reference %PRM, patient and lobe level.

    Returns ``{"patients": [...], "patient_level": {cls: {...}}, "lobe_level": {cls: {...}}}``.
    """
    patients = []
    patient_pairs: dict[str, tuple[list, list]] = {c: ([], []) for c in PERCENT_CLASSES[:3]}
    lobe_pairs: dict[str, tuple[list, list]] = {c: ([], []) for c in PERCENT_CLASSES[:3]}
    for row in rows:
        ps = _load_stats(Path(row["pred"]), row.get("lobes"), lobe_convention)
        rs = _load_stats(Path(row["ref"]), row.get("lobes"), lobe_convention)
        entry = {"patient": row["patient"], "pred": ps["whole_lung"], "ref": rs["whole_lung"]}
        patients.append(entry)
        for c in patient_pairs:
            patient_pairs[c][0].append(ps["whole_lung"][c])
            patient_pairs[c][1].append(rs["whole_lung"][c])
        for lobe, values in ps.get("lobes", {}).items():
            if lobe in rs.get("lobes", {}):
                for c in lobe_pairs:
                    lobe_pairs[c][0].append(values[c])
                    lobe_pairs[c][1].append(rs["lobes"][lobe][c])

    def summarise(pairs):
        levels = {c: agreement(pred, ref) for c, (pred, ref) in pairs.items()}
        return {c: a for c, a in levels.items() if a["n"] >= 3}

    result = {"patients": patients, "patient_level": summarise(patient_pairs), "lobe_level": summarise(lobe_pairs)}
    if figure is not None:
        from .figures import cohort_agreement_png

        lobe_data = {c: v for c, v in lobe_pairs.items() if len(v[0])}
        cohort_agreement_png(patient_pairs, lobe_data, figure)
        result["figure"] = str(Path(figure).name)
    return result


def evaluate_files(pred: Optional[str | Path] = None, ref: Optional[str | Path] = None,
                   lobes: Optional[str | Path] = None, cohort: Optional[str | Path] = None,
                   lobe_convention: str = "project", out: Optional[str | Path] = None) -> dict:
    """``prm evaluate``: one case (``pred``, ``ref``, optional ``lobes`` files) or a ``cohort`` CSV.

    With ``out`` the result is written to ``out/evaluation.json`` (and ``prm_agreement.png`` for a
    cohort) atomically. Volumes (``volume_ml``) come from the label maps' voxel size.
    """
    from ..io import write_json
    from ..lung import import_lobes
    from .pipeline import _output_dir

    if cohort is not None:
        if pred is not None or ref is not None:
            raise ParameterError("cohort", "give either a cohort CSV or pred/ref maps, not both")
        rows = read_cohort_csv(cohort)
        if out is None:
            return evaluate_cohort(rows, lobe_convention)
        with _output_dir(out, [cohort]) as stage:
            result = evaluate_cohort(rows, lobe_convention, figure=stage / "prm_agreement.png")
            write_json(result, stage / "evaluation.json")
        return result
    if pred is None or ref is None:
        raise ParameterError("pred", "give the predicted and the reference PRM maps (or a cohort CSV)")
    pred_vol = read_volume(pred, "predicted PRM map")
    pred_labels = _check_labels(pred_vol.array, str(pred))
    ref_labels = _check_labels(read_labels(ref, pred_vol.geometry, "reference PRM map"), str(ref))
    lobe_map = None
    if lobes is not None:
        lobe_map = import_lobes(read_labels(lobes, pred_vol.geometry, "lobe map"), lobe_convention, str(lobes))
    result = evaluate_case(pred_labels, ref_labels, lobe_map, voxel_volume_ml=voxel_volume_ml(pred_vol.geometry))
    if out is not None:
        with _output_dir(out, [p for p in (pred, ref, lobes) if p]) as stage:
            write_json(result, stage / "evaluation.json")
    return result
