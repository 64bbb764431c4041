"""Automatic brain (head) mask of a DSC series when none is given, as the peers do.

The mask is computed on the mean pre-bolus image ``S0`` (the first ``baseline_frames`` frames):

1. Otsu's threshold of the ``S0`` histogram (the level that maximises the between-class variance
   of background and head; computed with a numpy histogram, no scikit-image; the middle of
   the plateau when the classes are separated by empty bins);
2. the largest 3D connected component (face connectivity) of ``S0 > threshold``;
3. holes filled slice by slice and in 3D (ventricles, dark lesions);
4. a light erosion (``erosion_iterations`` voxels in-plane, default 1) that takes off the rim of
   partial-volume voxels at the head's edge.

It separates head from background; it does not strip the skull. The automatic AIF searches
*inside* the mask, and the search region must contain arteries: the mask keeps the vessels because
they are bright before the bolus and inside the head (:func:`automatic_brain_mask` does not remove
bright structures). Arrays are ``[k, j, i]`` (signals ``[k, j, i, t]``, time last).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from ..errors import input_error

#: voxels of in-plane erosion after the fill
DEFAULT_EROSION = 1
#: File name of the automatic mask in a ``dsc maps`` output folder (uint8, 1 = inside), so it can be reviewed.
AUTO_MASK_FILE = "auto_mask.nii.gz"


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (1D, finite): the histogram split that maximises the
    between-class variance ``w0 w1 (mu0 - mu1)^2``; returns the bin edge that splits the classes."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or np.ptp(v) <= 0:
        return float(v[0]) if v.size else 0.0
    counts, edges = np.histogram(v, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(counts).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.where(np.isfinite(between), between, -1.0)[:-1]
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))  # a plateau over empty bins: its middle
    return float(0.5 * (edges[best[0] + 1] + edges[best[-1] + 1]))


def automatic_brain_mask(signal: np.ndarray, baseline_frames: Optional[int] = None,
                         erosion_iterations: int = DEFAULT_EROSION, name: str = "DSC series") -> np.ndarray:
    """Head mask ``[k, j, i]`` bool of a DSC series ``[k, j, i, t]`` (module docstring).

    ``baseline_frames``: frames averaged into the ``S0`` image (None: the first 5, at most a
    tenth of the series, at least 1: always before any bolus of a usable series).
    Raises :func:`perfusionai.errors.input_error` naming ``name`` when nothing stands out of the
    background.
    """
    s = np.asarray(signal)
    n = s.shape[-1]
    nb = int(baseline_frames) if baseline_frames is not None else max(1, min(5, n // 10))
    s0 = np.nanmean(s[..., :nb].astype(np.float64), axis=-1)
    s0 = np.where(np.isfinite(s0), s0, 0.0)
    threshold = otsu_threshold(s0)
    foreground = s0 > threshold
    if not foreground.any():
        raise input_error(name, "no automatic brain mask: the pre-bolus image has no foreground; give a brain mask")
    labels, count = ndimage.label(foreground)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        foreground = labels == int(np.argmax(sizes))
    filled = ndimage.binary_fill_holes(foreground)
    for k in range(filled.shape[0]):  # slice by slice too: holes open towards the slab's ends
        filled[k] = ndimage.binary_fill_holes(filled[k])
    if erosion_iterations > 0:
        in_plane = np.zeros((3, 3, 3), bool)
        in_plane[1] = ndimage.generate_binary_structure(2, 1)
        eroded = ndimage.binary_erosion(filled, structure=in_plane, iterations=int(erosion_iterations))
        if eroded.any():
            filled = eroded
    return filled
