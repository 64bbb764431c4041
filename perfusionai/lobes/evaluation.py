"""Dice of a lobe segmentation against a reference: whole lung and each lobe.

Labels (ARCHITECTURE.md): 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 lingula, 6 LLL. References in another
convention are imported with :func:`perfusionai.lung.lobes.import_lobes`. For 5-lobe
references (no lingula, e.g. the Tustison proton-MRI atlas or TotalSegmentator), ``merge_lingula``
maps the lingula (5) into the left upper lobe (4) in both maps before comparing. Lobes absent from
both maps are not reported; a lobe present in only one map gets Dice 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import input_error
from ..io import from_sitk, read_volume, to_sitk
from ..metrics import dice

from ..labels import LOBE_LABELS

LOBE_KEYS = {value: info.short for value, info in LOBE_LABELS.items()}  # 1 "rul" ... 6 "lll"


def lobe_dice(pred: np.ndarray, ref: np.ndarray, merge_lingula: bool = False) -> dict:
    """``{"whole_lung": d, "right_lung": d, "left_lung": d, "lobes": {"rul": d, ...}, "mean_lobe": d}``.

    ``pred`` and ``ref`` are ``[k, j, i]`` label maps in the project convention on the same grid.
    """
    pred = np.asarray(pred).astype(np.uint8)
    ref = np.asarray(ref).astype(np.uint8)
    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {ref.shape}")
    if merge_lingula:
        pred = np.where(pred == 5, 4, pred)
        ref = np.where(ref == 5, 4, ref)
    out = {"whole_lung": dice(pred > 0, ref > 0),
           "right_lung": dice(np.isin(pred, (1, 2, 3)), np.isin(ref, (1, 2, 3))),
           "left_lung": dice(np.isin(pred, (4, 5, 6)), np.isin(ref, (4, 5, 6))),
           "lobes": {}, "merge_lingula": bool(merge_lingula)}
    for lab, key in LOBE_KEYS.items():
        if (pred == lab).any() or (ref == lab).any():
            out["lobes"][key] = dice(pred == lab, ref == lab)
    out["mean_lobe"] = float(np.mean(list(out["lobes"].values()))) if out["lobes"] else float("nan")
    return out


def read_aligned_labels(pred_path: str | Path, ref_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read both label maps; when the reference is on the same voxel grid but stored with another
    axis order/orientation (a permutation or flip of the axes), reorient it onto the prediction's
    grid. Anything else (another grid) is refused with a clear message."""
    import SimpleITK as sitk
    from .nnunet import orientation_code

    pred = read_volume(pred_path, "predicted lobes")
    ref = read_volume(ref_path, "reference lobes")
    if ref.geometry.same_grid(pred.geometry):
        return np.asarray(pred.array), np.asarray(ref.array)
    ref_img = to_sitk(np.asarray(ref.array), ref.geometry)
    turned = from_sitk(sitk.DICOMOrient(ref_img, orientation_code(pred.geometry.direction)))
    if turned.geometry.same_grid(pred.geometry):
        return np.asarray(pred.array), np.asarray(turned.array)
    raise input_error(ref_path, f"reference lobes are not on the grid of {pred_path} "
                                f"({ref.geometry.describe()} vs {pred.geometry.describe()}); resample them first")


def evaluate_lobe_files(pred_path: str | Path, ref_path: str | Path, ref_convention: str = "project",
                        pred_convention: str = "project", merge_lingula: Optional[bool] = None) -> dict:
    """Dice of two label files (see :func:`lobe_dice`). ``merge_lingula=None`` merges automatically
    when the reference has no lingula."""
    from ..lung.lobes import import_lobes

    pred_arr, ref_arr = read_aligned_labels(pred_path, ref_path)
    pred = import_lobes(np.round(pred_arr).astype(np.int64), pred_convention, str(pred_path))
    ref = import_lobes(np.round(ref_arr).astype(np.int64), ref_convention, str(ref_path))
    if merge_lingula is None:
        merge_lingula = not (ref == 5).any()
    result = lobe_dice(pred, ref, merge_lingula)
    result.update({"prediction": str(pred_path), "reference": str(ref_path),
                   "reference_convention": ref_convention})
    return result
