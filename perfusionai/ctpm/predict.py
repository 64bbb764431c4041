"""DL-CTPM prediction: both lungs of a CT through the ARNN, back on the CT's exact grid.

:func:`predict_perfusion` (arrays) and :func:`predict_files` (``perfusionai
ctpm predict``). Each lung is preprocessed on its own network grid
(:mod:`.preprocessing`), both go through the network as one batch, and each
lung's map is resampled onto the CT grid *inside that lung's CT mask only*:
the right and left masks are disjoint and cover the lung, so the recombined
map has no overlap and no gap (no seam). Before resampling, network-grid voxels
outside the lung take the value of the nearest lung voxel, so the lung border
is not darkened by the network's (untrained) background output.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from ..errors import PerfusionAIError, input_error
from ..io import Geometry, atomic_output_dir, read_labels, read_volume, write_json, write_volume
from ..progress import as_progress
from .evaluation import HIGH_FUNCTION_THRESHOLD
from .preprocessing import (LEFT_LUNG, RIGHT_LUNG, LungCrop, PreprocessConfig, preprocess_ct, resample_onto,
                            split_lungs, sub_geometry)

LOW_FUNCTION_LABEL = 1
HIGH_FUNCTION_LABEL = 2


@dataclass
class CTPMModel:
    """A loaded DL-CTPM network with its card and preprocessing settings: load once, predict many CTs.

    >>> model = CTPMModel.load("ctpm_model/")                                 # doctest: +SKIP
    >>> prediction = model.predict(ct_hu, geometry, lung_mask=labels)         # doctest: +SKIP
    """

    network: object
    card: dict
    config: PreprocessConfig
    label: str
    path: Optional[str] = None

    @classmethod
    def load(cls, path: str | os.PathLike, device="auto",
             expected_input_shape: Optional[tuple[int, int, int]] = None) -> "CTPMModel":
        """:func:`load_ctpm_model` (a model folder or zip; needs torch)."""
        return load_ctpm_model(path, expected_input_shape=expected_input_shape, device=device)

    @property
    def trained_on_phantoms(self) -> bool:
        return bool(self.card.get("trained_on_phantoms", False))

    def predict(self, ct_hu: np.ndarray, geometry: Geometry, lung_mask: Optional[np.ndarray] = None,
                progress=None) -> "PerfusionPrediction":
        """:func:`predict_perfusion` of ``ct_hu[k, j, i]`` (HU) on ``geometry`` with this model."""
        return predict_perfusion(ct_hu, geometry, self, lung_mask, progress=progress)


@dataclass
class PerfusionPrediction:
    """Output of :func:`predict_perfusion` (all arrays ``[k, j, i]`` on the CT grid).

    Attributes
    ----------
    perfusion
        Predicted SPECT/P75-like perfusion in [0, 1], 0 outside the lung (float32).
    high_low
        uint8: 0 outside the lung, 1 low function (< 0.66), 2 high function (>= 0.66).
    lung_labels
        uint8: 1 right, 2 left (as used).
    seconds
        Wall time per stage.
    model_label
        The model's label (says "trained on phantoms" when its card does).
    geometry
        The CT grid (for volumes in mL and for :meth:`save`).
    """

    perfusion: np.ndarray
    high_low: np.ndarray
    lung_labels: np.ndarray
    seconds: dict = field(default_factory=dict)
    model_label: str = ""
    geometry: Optional[Geometry] = None
    trained_on_phantoms: bool = False

    @property
    def function_high_low(self) -> np.ndarray:
        """uint8 ``[k, j, i]``: 0 outside the lung, 1 low, 2 high function (the written ``function_high_low``)."""
        return self.high_low

    @property
    def volumes(self) -> dict:
        """Per region (``right``, ``left``, ``both``): ``lung_ml``, ``high_function_ml``, ``low_function_ml``
        and ``mean_perfusion`` (needs :attr:`geometry`)."""
        if self.geometry is None:
            raise ValueError("the prediction has no geometry; volumes need the CT's voxel size")
        return lung_volumes(self, self.geometry)


def load_ctpm_model(path: str | os.PathLike, expected_input_shape: Optional[tuple[int, int, int]] = None,
                    device="auto") -> CTPMModel:
    """Load a DL-CTPM model (folder or zip) and check its card.

    Refuses, with a message naming the file: another architecture, a card
    without preprocessing settings, an input shape not divisible by 8, a
    network that does not take one input channel, and (when
    ``expected_input_shape`` is given) a model made for another input size.
    """
    from ..nn import load_model, model_label

    from ..deps import require

    require("torch", "DL-CTPM prediction")
    from .arnn import ARCHITECTURE, ATTENTION_UNET  # needs torch, like every network

    network, card = load_model(path, expected_architecture=(ARCHITECTURE, ATTENTION_UNET), device=device)
    card_name = Path(path) / "model.json" if Path(path).is_dir() else Path(path)
    inputs = card.get("inputs", {})
    if "preprocessing" not in inputs:
        raise input_error(card_name, "the model card has no 'preprocessing' settings; it was not written by "
                                     "perfusionai ctpm train")
    try:
        config = PreprocessConfig.from_dict(inputs["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise input_error(card_name, f"the model card's preprocessing settings are invalid ({exc})") from None
    if len(config.input_shape) != 3 or any(n <= 0 or n % 8 for n in config.input_shape):
        raise input_error(card_name, f"input size {config.input_shape} is not three sizes divisible by 8 "
                                     f"(the network halves the grid three times)")
    if int(card["architecture"]["hyperparameters"].get("in_channels", 1)) != 1:
        raise input_error(card_name, "the network takes more than one input channel; DL-CTPM takes the CT only")
    if expected_input_shape is not None and tuple(expected_input_shape) != tuple(config.input_shape):
        raise input_error(card_name, f"the model was made for lung crops of {tuple(config.input_shape)} voxels, "
                                     f"not {tuple(expected_input_shape)}")
    return CTPMModel(network, card, config, model_label(card), str(path))


def network_forward(model: CTPMModel, crops: list[LungCrop]) -> list[np.ndarray]:
    """Run the network on the enhanced crops (one batch); returns one ``input_shape`` map per crop."""
    import torch

    from ..nn import set_threads

    set_threads()
    network = model.network
    device = next(network.parameters()).device
    batch = torch.from_numpy(np.stack([c.enhanced for c in crops])[:, None].astype(np.float32)).to(device)
    network.eval()
    with torch.inference_mode():
        out = network(batch)
    return [o[0].float().cpu().numpy() for o in out]


def fill_outside_with_nearest(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Copy of ``values`` where every voxel outside ``mask`` takes its nearest voxel inside ``mask``."""
    if mask.all():
        return values.copy()
    _, nearest = ndimage.distance_transform_edt(~mask, return_indices=True)
    return values[tuple(nearest)]


def paste_back(lung_maps: list[np.ndarray], crops: list[LungCrop], lung_masks: dict[int, np.ndarray],
               geometry: Geometry) -> np.ndarray:
    """Each lung's network-grid map onto the CT grid inside that lung's CT mask; 0 elsewhere.

    Resampling is linear in physical coordinates, restricted to the lung's
    bounding box; the masks are disjoint, so every lung voxel is written once.
    """
    out = np.zeros(geometry.shape, dtype=np.float32)
    for values, crop in zip(lung_maps, crops):
        filled = fill_outside_with_nearest(values.astype(np.float32), crop.mask)
        box_geometry = sub_geometry(geometry, crop.bbox)
        on_box = resample_onto(filled, crop.grid, box_geometry, interpolation="linear", extrapolate_nearest=True)
        inside = lung_masks[crop.side][crop.bbox]
        region = out[crop.bbox]
        region[inside] = on_box[inside]
    return np.clip(out, 0.0, 1.0)


def high_low_labels(perfusion: np.ndarray, lung: np.ndarray, threshold: float = HIGH_FUNCTION_THRESHOLD) -> np.ndarray:
    """uint8 map: 2 where ``perfusion >= threshold`` in the lung, 1 elsewhere in the lung, 0 outside."""
    lung = np.asarray(lung, dtype=bool)
    out = np.zeros(lung.shape, dtype=np.uint8)
    out[lung] = np.where(perfusion[lung] >= threshold, HIGH_FUNCTION_LABEL, LOW_FUNCTION_LABEL)
    return out


def lung_labels_for(ct_hu: np.ndarray, geometry: Geometry, lung_mask: Optional[np.ndarray],
                    mask_name: str = "lung mask") -> np.ndarray:
    """Right/left labels (1/2) from a given mask, or from the CT lung mask when none is given."""
    if lung_mask is None:
        from ..lung import segment_lungs

        labels = segment_lungs(ct_hu, geometry)
        mask_name = "CT (automatic lung mask)"
    else:
        labels = lung_mask
    lungs = split_lungs(labels, geometry, mask_name)
    out = np.zeros(geometry.shape, dtype=np.uint8)
    out[lungs[RIGHT_LUNG]] = RIGHT_LUNG
    out[lungs[LEFT_LUNG]] = LEFT_LUNG
    return out


def predict_perfusion(ct_hu: np.ndarray, geometry: Geometry, model: CTPMModel,
                      lung_mask: Optional[np.ndarray] = None, progress=None) -> PerfusionPrediction:
    """Predict the perfusion map of both lungs of ``ct_hu[k, j, i]`` (HU) on ``geometry``.

    ``lung_mask``: labels 1 right / 2 left, lobes 1-6, or binary; None runs
    :func:`perfusionai.lung.segment_lungs`. Raises
    :class:`PerfusionAIError` for a CT without lungs.
    """
    report = as_progress(progress)
    seconds = {}
    t0 = time.perf_counter()
    report(0.0, "lung mask")
    labels = lung_labels_for(ct_hu, geometry, lung_mask)
    seconds["lung_mask"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    crops = preprocess_ct(ct_hu, geometry, labels, model.config, progress=report.sub(0.05, 0.4))
    seconds["preprocessing"] = time.perf_counter() - t0
    report(0.4, "network")
    t0 = time.perf_counter()
    maps = network_forward(model, crops)
    seconds["network"] = time.perf_counter() - t0
    report(0.85, "back onto the CT grid")
    t0 = time.perf_counter()
    masks = {RIGHT_LUNG: labels == RIGHT_LUNG, LEFT_LUNG: labels == LEFT_LUNG}
    perfusion = paste_back(maps, crops, masks, geometry)
    high_low = high_low_labels(perfusion, labels > 0)
    seconds["recombination"] = time.perf_counter() - t0
    report(1.0, "predicted")
    return PerfusionPrediction(perfusion, high_low, labels, seconds, model.label, geometry,
                               bool(model.card.get("trained_on_phantoms", False)))


def read_ct(ct_path: str | os.PathLike):
    """Read a CT in HU (file or DICOM folder) and check it: finite values, air near -1000 HU."""
    ct = read_volume(ct_path, "CT")
    ct_hu = np.asarray(ct.array)
    if not np.issubdtype(ct_hu.dtype, np.number) or not np.all(np.isfinite(ct_hu)):
        raise input_error(ct_path, "CT contains non-finite values")
    if float(ct_hu.min()) > -500:
        raise input_error(ct_path, f"the lowest value is {float(ct_hu.min()):g}; a CT in Hounsfield units "
                                   f"with air near -1000 HU was expected")
    return ct


def predict_files(ct_path: str | os.PathLike, model_path: str | os.PathLike, out_dir: str | os.PathLike,
                  lung_mask_path: Optional[str | os.PathLike] = None, device="auto", progress=None) -> dict:
    """``perfusionai ctpm predict`` (:class:`perfusionai.ctpm.CTPMPredictJob`); returns the summary dict."""
    from .jobs import CTPMPredictJob

    job = CTPMPredictJob(ct=ct_path, model=model_path, out=out_dir, lung_mask=lung_mask_path, device=device)
    job.run(progress)
    import json

    return json.loads((Path(out_dir) / "summary.json").read_text())


def write_prediction(result: "PerfusionPrediction", out_dir: str | os.PathLike, summary: dict,
                     inputs: Optional[list] = None) -> Path:
    """Write ``perfusion.nii.gz``, ``function_high_low.nii.gz``, ``lungs.nii.gz`` and ``summary.json``
    into ``out_dir`` atomically; ``inputs`` (files the run read) are never overwritten."""
    geometry = result.geometry
    with atomic_output_dir(out_dir, inputs=[p for p in (inputs or []) if p is not None]) as stage:
        write_volume(result.perfusion, geometry, stage / "perfusion.nii.gz", dtype=np.float32)
        write_volume(result.high_low, geometry, stage / "function_high_low.nii.gz", dtype=np.uint8)
        write_volume(result.lung_labels, geometry, stage / "lungs.nii.gz", dtype=np.uint8)
        write_json(summary, stage / "summary.json")
    return Path(out_dir)


def lung_volumes(result: "PerfusionPrediction", geometry: Geometry) -> dict:
    """Volumes (mL) of lung and high/low-function lung and the mean perfusion per side and both."""
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    volumes = {}
    for side, name in ((RIGHT_LUNG, "right"), (LEFT_LUNG, "left"), (None, "both")):
        lung = result.lung_labels > 0 if side is None else result.lung_labels == side
        volumes[name] = {
            "lung_ml": float(lung.sum() * voxel_ml),
            "high_function_ml": float(((result.high_low == HIGH_FUNCTION_LABEL) & lung).sum() * voxel_ml),
            "low_function_ml": float(((result.high_low == LOW_FUNCTION_LABEL) & lung).sum() * voxel_ml),
            "mean_perfusion": float(result.perfusion[lung].mean()) if lung.any() else 0.0,
        }
    return volumes


def summary_of(result: PerfusionPrediction, geometry: Geometry, model: CTPMModel,
               ct_path=None, lung_mask_path=None) -> dict:
    """Volumes (mL) of lung and high/low-function lung per side, and the model used."""
    volumes = lung_volumes(result, geometry)
    return {
        "inputs": {"ct": str(ct_path) if ct_path else None,
                   "lung_mask": str(lung_mask_path) if lung_mask_path else "automatic (perfusionai.lung)"},
        "model": {"path": model.path, "label": model.label,
                  "trained_on_phantoms": bool(model.card.get("trained_on_phantoms", False))},
        "high_function_threshold": HIGH_FUNCTION_THRESHOLD,
        "labels": {"1": "low function", "2": "high function"},
        "volumes": volumes,
    }


# ------------------------------------------------------------------------------ Slicer / background support

def _function_labels():
    from ..labels import FUNCTIONAL_LUNG_LABELS

    assert set(FUNCTIONAL_LUNG_LABELS) == {LOW_FUNCTION_LABEL, HIGH_FUNCTION_LABEL}
    return FUNCTIONAL_LUNG_LABELS


#: Segment names and colours of ``function_high_low`` (1 low, 2 high): the package's one table.
FUNCTION_LABELS = _function_labels()


def volume_rows(result: PerfusionPrediction, geometry: Geometry) -> list[dict]:
    """Table rows per region (right, left, both): lung, high- and low-function volumes (mL), share, mean."""
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    rows = []
    for side, name in ((RIGHT_LUNG, "Right lung"), (LEFT_LUNG, "Left lung"), (None, "Both lungs")):
        lung = result.lung_labels > 0 if side is None else result.lung_labels == side
        high = int(((result.high_low == HIGH_FUNCTION_LABEL) & lung).sum())
        total = int(lung.sum())
        rows.append({"Region": name, "Lung (mL)": round(total * voxel_ml, 1),
                     "High function (mL)": round(high * voxel_ml, 1),
                     "Low function (mL)": round((total - high) * voxel_ml, 1),
                     "High function (%)": round(100.0 * high / total, 1) if total else 0.0,
                     "Mean perfusion": round(float(result.perfusion[lung].mean()), 3) if total else 0.0})
    return rows


def lung_labels_on_ct_grid(labels: np.ndarray, labels_geometry: Geometry, ct_geometry: Geometry,
                           name: str = "lung mask") -> np.ndarray:
    """A lung label map that must lie on the CT grid (clear error otherwise); returned as int16."""
    if not labels_geometry.same_grid(ct_geometry):
        raise input_error(name, f"is not on the CT grid ({labels_geometry.describe()} vs "
                                f"{ct_geometry.describe()}); resample it onto the CT first")
    return np.asarray(labels).astype(np.int16)


def write_predict_inputs(work_dir: str | os.PathLike, ct_hu: np.ndarray, geometry: Geometry,
                         lung_labels: Optional[np.ndarray] = None) -> tuple[Path, Optional[Path]]:
    """Files for a background ``perfusionai ctpm predict``: ``(ct path, lung mask path or None)``."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ct_path = write_volume(ct_hu, geometry, work / "ct.nii.gz")
    mask_path = None
    if lung_labels is not None:
        mask_path = write_volume(np.asarray(lung_labels).astype(np.uint8), geometry, work / "lungs.nii.gz")
    return ct_path, mask_path


def build_predict_command(launcher: str, ct_path, model_path, out_dir, lung_mask_path=None,
                          device: str = "auto") -> list[str]:
    """Argument list running ``perfusionai ctpm predict`` with machine-readable progress lines."""
    command = [str(launcher), "-m", "perfusionai", "ctpm", "predict", "--ct", str(ct_path), "--model",
               str(model_path), "--out", str(out_dir), "--device", device, "--progress", "lines"]
    if lung_mask_path is not None:
        command += ["--lung-mask", str(lung_mask_path)]
    return command


def read_prediction(out_dir: str | os.PathLike) -> tuple[PerfusionPrediction, Geometry, dict]:
    """Read what ``perfusionai ctpm predict`` wrote: ``(prediction, CT geometry, summary)``."""
    import json

    out = Path(out_dir)
    perfusion = read_volume(out / "perfusion.nii.gz", "perfusion map")
    high_low = read_labels(out / "function_high_low.nii.gz", perfusion.geometry, "high/low function map")
    lungs = read_labels(out / "lungs.nii.gz", perfusion.geometry, "lung labels")
    summary = json.loads((out / "summary.json").read_text())
    result = PerfusionPrediction(np.asarray(perfusion.array, dtype=np.float32), high_low.astype(np.uint8),
                                 lungs.astype(np.uint8), summary.get("seconds", {}),
                                 summary.get("model", {}).get("label", ""))
    return result, perfusion.geometry, summary
