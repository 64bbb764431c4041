"""PRM from MRI for one subject, from files: read, check, (segment lobes,) predict, summarise, save.

:func:`predict_subject` is what ``perfusionai prm predict`` and the Slicer module run: it reads any
subset of the four sequences (VIBE, post-contrast VIBE, IRmax, PBF), a lung mask or a lobe model
(nnU-Net, Xu et al. Fig. 1: the lobes segmented on VIBE are the lung mask and the lobes), optional
lobes and a reference CT PRM, runs the trained network (:func:`perfusionai.prm.mri_predict.predict_prm_mri`)
and returns a :class:`MRIPRMResult` with the labels, %PRM per region and the comparison with the
reference; ``.save(folder)`` writes ``prm.nii.gz``, ``prm_stats.json/.csv``, ``summary.json`` (and
``lobes.nii.gz`` when segmented) atomically.

Grids: the first sequence given (in the order VIBE, post-VIBE, IRmax, PBF) is the reference grid;
every other file must lie on it and an error names the file that does not. NaN or infinite values
inside the lung are refused naming the file (the package's NaN rule); outside the lung they are
never used. Arrays are ``[k, j, i]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ParameterError, input_error
from ..io import Geometry, read_labels, read_volume, write_json, write_volume
from ..lung import lung_labels_of
from ..progress import ProgressCallback, as_progress

#: Sequence keys in reference order (the first one given is the reference grid); same as mri_network.SEQUENCES.
SEQUENCE_KEYS = ("vibe", "post_vibe", "irmax", "pbf")
_LABELS = {"vibe": "VIBE", "post_vibe": "post-contrast VIBE", "irmax": "IRmax", "pbf": "PBF"}


@dataclass
class MRIPRMResult:
    """One subject's PRM from MRI (arrays ``[k, j, i]`` on ``geometry``).

    Attributes
    ----------
    labels
        uint8 PRM labels (0 outside the lung, 1 normal, 2 fSAD, 3 emphysema).
    geometry
        The reference grid (the first sequence given).
    stats
        ``prm_stats.json`` dictionary (%PRM of the whole lung, right, left and each lobe; volumes in mL).
    summary
        ``summary.json``: model label (says "trained on phantoms" when so), sequences used,
        the sequences the model was trained with, lung voxels outside the network window, whole-lung
        %PRM, and ``comparison_with_reference`` (Dice, %PRM) when a reference was given.
    lobes
        The lobes used (given or segmented), or None.
    segmented_lobes
        True when the lobes come from the lobe model (``lobes.nii.gz`` is written then).
    """

    labels: np.ndarray
    geometry: Geometry
    stats: dict
    summary: dict
    lobes: Optional[np.ndarray] = None
    segmented_lobes: bool = False
    probabilities: Optional[np.ndarray] = field(default=None, repr=False)

    def save(self, folder: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
        """Write the outputs into ``folder`` atomically; ``inputs`` are files it must not overwrite."""
        from .pipeline import _output_dir
        from .stats import write_stats_csv

        with _output_dir(folder, inputs) as stage:
            write_volume(self.labels, self.geometry, stage / "prm.nii.gz", np.uint8)
            write_json(self.stats, stage / "prm_stats.json")
            write_stats_csv(self.stats, stage / "prm_stats.csv")
            if self.segmented_lobes and self.lobes is not None:
                write_volume(self.lobes, self.geometry, stage / "lobes.nii.gz", np.uint8)
            write_json(self.summary, stage / "summary.json")
        return Path(folder)


def _read_sequence(path, key: str):
    vol = read_volume(path, _LABELS[key])
    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise input_error(path, f"{_LABELS[key]} must be a 3D volume, got {arr.ndim} dimensions")
    return vol


def _on_grid(path, geometry: Geometry, reference: Geometry, name: str, reference_path, reference_name: str):
    """Refuse a file not on the reference grid, naming that file (and the reference it should match)."""
    if not geometry.same_grid(reference):
        raise input_error(path, f"the {name} is not on the grid of the {reference_name} {reference_path} "
                                f"({geometry.differences(reference)}); resample it onto that grid first")


def _check_finite_inside(arr: np.ndarray, lung: np.ndarray, path, name: str) -> None:
    """The NaN rule: NaN or infinite values inside the lung are refused naming the file."""
    if not np.issubdtype(arr.dtype, np.floating):
        return
    bad = int((~np.isfinite(arr[lung])).sum())
    if bad:
        raise input_error(path, f"{name} has {bad} NaN or infinite voxels inside the lung mask "
                                f"(of {int(lung.sum())}); repair or mask them")


def predict_subject(
    *,
    model: str | Path,
    vibe: Optional[str | Path] = None,
    post_vibe: Optional[str | Path] = None,
    irmax: Optional[str | Path] = None,
    pbf: Optional[str | Path] = None,
    lung_mask: Optional[str | Path] = None,
    lobes: Optional[str | Path] = None,
    lobe_model: Optional[str | Path] = None,
    reference: Optional[str | Path] = None,
    device: str = "auto",
    progress: Optional[ProgressCallback] = None,
) -> MRIPRMResult:
    """Predict one subject's PRM from MRI files (see the module docstring).

    Parameters
    ----------
    model
        MRI -> PRM model folder or zip (``prm train``).
    vibe, post_vibe, irmax, pbf
        Sequence files (any non-empty subset the model was trained with); PBF in mL/100 mL/min.
    lung_mask
        Lung mask, 1/2 lung labels or a 1-6 lobe map (nonzero = lung); default: from ``lobe_model``.
    lobes
        Lobes 1-6 for per-lobe statistics.
    lobe_model
        nnU-Net lobe model: segments the lobes of ``vibe`` first (lung mask and lobes).
    reference
        CT-derived PRM 0-4 on the same grid: Dice and %PRM comparison in the summary.
    device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    """
    from ..deps import require

    report = as_progress(progress)
    paths = {"vibe": vibe, "post_vibe": post_vibe, "irmax": irmax, "pbf": pbf}
    given = [k for k in SEQUENCE_KEYS if paths[k]]
    if not given:
        raise ParameterError("vibe", "no MRI sequence given; give at least one of VIBE, post-contrast VIBE, IRmax, PBF")
    if lung_mask is None and lobe_model is None:
        raise ParameterError("lung_mask", "give a lung mask or a lobe model")
    if lobe_model is not None and not vibe:
        raise ParameterError("lobe_model", "lobes are segmented on VIBE: give the VIBE as well")
    require("torch", "PRM prediction from MRI")

    ref_key = given[0]
    volumes = {k: _read_sequence(paths[k], k) for k in given}
    ref_geo = volumes[ref_key].geometry
    ref_path, ref_name = paths[ref_key], _LABELS[ref_key]
    for k in given[1:]:
        _on_grid(paths[k], volumes[k].geometry, ref_geo, _LABELS[k], ref_path, ref_name)

    segmented = None
    if lobe_model is not None:
        from ..lobes.nnunet import segment_lobes

        segmented = segment_lobes(vibe, lobe_model, device=device, progress=report.sub(0.0, 0.5))
        report = report.sub(0.5, 1.0)

    def labels_file(path, name):
        vol = read_volume(path, name)
        _on_grid(path, vol.geometry, ref_geo, name, ref_path, ref_name)
        return read_labels(path, vol.geometry, name)

    if lung_mask is not None:
        lung_map = labels_file(lung_mask, "lung mask")
        if not np.any(lung_map):
            raise input_error(lung_mask, "the lung mask is empty (no nonzero voxel)")
    else:
        lung_map = segmented.lobes
        if not np.any(lung_map):
            raise input_error(vibe, "the lobe model found no lung in this VIBE")
    lung = np.asarray(lung_map) != 0
    lobe_map = labels_file(lobes, "lobe map") if lobes else None
    if lobe_map is None and segmented is not None:
        lobe_map = segmented.lobes
    reference_map = labels_file(reference, "reference PRM") if reference else None
    arrays = {}
    for k in given:
        arr = np.asarray(volumes[k].array)
        _check_finite_inside(arr, lung, paths[k], ref_name if k == ref_key else _LABELS[k])
        arr = np.asarray(arr, dtype=np.float32)
        # NaN outside the lung is never used; zero it so no NaN reaches the normalisation
        arrays[k] = arr if np.isfinite(arr).all() else np.where(np.isfinite(arr), arr, 0).astype(np.float32)

    from .mri_evaluation import case_metrics
    from .mri_predict import predict_prm_mri
    from .mri_training import load_prm_model
    from .stats import prm_statistics

    net, card = load_prm_model(model)
    result = predict_prm_mri(arrays, lung, net, card, device=device, progress=report)
    voxel_ml = float(np.prod(ref_geo.spacing)) / 1000.0
    # right (1) / left (2): from the lobes when there are any, else the mask's own labels or its two lungs
    sides = lung_labels_of(lung_map, ref_geo, lobe_map)
    stats = prm_statistics(result.labels, sides.astype(np.uint8), lobe_map, voxel_ml)
    summary = {"model": result.model, "trained_on_phantoms": bool(card.get("trained_on_phantoms")),
               "sequences_used": result.sequences_used, "trained_with": card["inputs"].get("trained_with"),
               "voxels_outside_window": result.voxels_outside_window, "whole_lung": stats["whole_lung"]}
    if reference_map is not None:
        summary["comparison_with_reference"] = case_metrics(result.labels, reference_map, lung, lobe_map)
    if segmented is not None:
        summary["lobe_model"] = segmented.model
    return MRIPRMResult(result.labels, ref_geo, stats, summary, lobe_map, segmented is not None,
                        result.probabilities)
