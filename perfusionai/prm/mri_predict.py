"""PRM prediction from inspiratory MRI with a trained multi-sequence network.

:func:`predict_prm_mri` takes any non-empty subset of the four sequences (VIBE, post-contrast
VIBE, IRmax, PBF) on one grid with a lung mask, normalises and crops/pads them exactly as in
training (the grid comes from the model card), runs the network on the CPU or CUDA and puts the
result back on the input grid: PRM labels 1 normal, 2 fSAD, 3 emphysema inside the lung mask and
0 outside (the network has no "uncategorized" class). Lung voxels that fall outside the network
window (a lung larger than the model's grid) are left 0 and counted in ``voxels_outside_window``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from ..errors import ParameterError
from ..nn import choose_device, fold_batchnorm, model_label, set_threads
from ..progress import ProgressCallback, as_progress
from .mri_network import CLASS_LABELS, SEQUENCE_NAMES, SEQUENCES, prepare_inputs


@dataclass
class MRIPRMPrediction:
    """Result of :func:`predict_prm_mri`.

    Attributes
    ----------
    labels
        ``[k, j, i]`` uint8 PRM labels (0 outside the lung, 1 normal, 2 fSAD, 3 emphysema).
    probabilities
        ``[3, k, j, i]`` float32 softmax probabilities (normal, fSAD, emphysema); 0 outside the window.
    sequences_used
        Names of the sequences that were given to the network.
    model
        Model label (architecture, "trained on phantoms" when so).
    voxels_outside_window
        Lung voxels outside the network's crop window (left unlabelled).
    """

    labels: np.ndarray
    probabilities: np.ndarray
    sequences_used: list
    model: str
    voxels_outside_window: int = 0


def check_sequences(volumes: Mapping[str, Optional[np.ndarray]], card: dict, lung_shape) -> list[str]:
    """Validate the given sequences against the model card; returns the names used."""
    unknown = [k for k, v in volumes.items() if v is not None and k not in SEQUENCES]
    if unknown:
        raise ParameterError(unknown[0], f"unknown sequence; the network takes {', '.join(SEQUENCES)}")
    given = [s for s in SEQUENCES if volumes.get(s) is not None]
    if not given:
        raise ParameterError("vibe", "no MRI sequence given; give at least one of VIBE, post-contrast VIBE, IRmax, PBF")
    trained_with = card.get("inputs", {}).get("trained_with", list(SEQUENCES))
    not_trained = [s for s in given if s not in trained_with]
    if not_trained:
        names = ", ".join(SEQUENCE_NAMES[s] for s in not_trained)
        raise ParameterError(not_trained[0],
                             f"the model was trained with {', '.join(SEQUENCE_NAMES[s] for s in trained_with)} "
                             f"only; it cannot use {names} (leave it out)")
    for s in given:
        if np.shape(volumes[s]) != tuple(lung_shape):
            raise ParameterError(s, f"{SEQUENCE_NAMES[s]} has shape {np.shape(volumes[s])}, "
                                    f"the lung mask {tuple(lung_shape)}")
    return given


def predict_prm_mri(volumes: Mapping[str, Optional[np.ndarray]], lung_mask: np.ndarray, model: torch.nn.Module,
                    card: dict, device: str | torch.device | None = "auto",
                    progress: Optional[ProgressCallback] = None) -> MRIPRMPrediction:
    """Predict the PRM map of one subject.

    Parameters
    ----------
    volumes
        ``{"vibe"|"post_vibe"|"irmax"|"pbf": [k, j, i] array or None}``, all on the lung mask's grid.
    lung_mask
        ``[k, j, i]`` (nonzero = lung), e.g. from ``perfusionai lobes segment``.
    model, card
        From :func:`perfusionai.prm.mri_training.load_prm_model`.
    device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    """
    report = as_progress(progress)
    lung = np.asarray(lung_mask) != 0
    if not lung.any():
        raise ParameterError("lung_mask", "the lung mask is empty")
    used = check_sequences(volumes, card, lung.shape)
    shape = tuple(int(s) for s in card["inputs"]["shape"])
    report(0.05, "normalising inputs")
    x, avail, source, dest = prepare_inputs({s: volumes.get(s) for s in used}, lung, shape)
    dev = choose_device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cpu":
        set_threads()
    net = fold_batchnorm(model).to(dev).eval()
    report(0.2, f"running the network on {dev.type}")
    with torch.inference_mode():
        logits = net(torch.from_numpy(x)[None].to(dev), torch.from_numpy(avail)[None].to(dev))
        probs_window = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
    report(0.9, "writing labels back on the input grid")
    probs = np.zeros((len(CLASS_LABELS),) + lung.shape, dtype=np.float32)
    probs[(slice(None),) + tuple(source)] = probs_window[(slice(None),) + tuple(dest)]
    covered = np.zeros(lung.shape, dtype=bool)
    covered[tuple(source)] = True
    labels = np.zeros(lung.shape, dtype=np.uint8)
    inside = lung & covered
    lut = np.asarray(CLASS_LABELS, dtype=np.uint8)
    labels[inside] = lut[probs.argmax(axis=0)[inside]]
    report(1.0, "PRM predicted")
    return MRIPRMPrediction(labels, probs, used, model_label(card), int((lung & ~covered).sum()))
