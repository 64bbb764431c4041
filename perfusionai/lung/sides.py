"""Right/left lung labels: from a lobe map, from a user's lung mask, at the body's midline.

Every lung domain (CT PRM, PRM from MRI, CT-to-perfusion, lobe evaluation) uses these, so a
binary mask, a 1/2 lung map and a 1-6 lobe map are turned into right (1) / left (2) lungs the
same way everywhere. Arrays are ``[k, j, i]`` on a :class:`perfusionai.io.Geometry` (LPS, mm);
LPS x grows towards the patient's left, so the right lung has the smaller x.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from ..io import Geometry
from ..labels import LEFT_LOBES, LEFT_LUNG, RIGHT_LOBES, RIGHT_LUNG

#: A second component smaller than this fraction of the largest is a stray blob, not a lung.
SECOND_LUNG_MIN_FRACTION = 0.08


def lps_x(geometry: Geometry) -> np.ndarray:
    """LPS x (mm) of every voxel centre, ``[k, j, i]`` float32."""
    m = geometry.ijk_to_lps()
    k, j, i = (np.arange(n, dtype=np.float32) for n in geometry.shape)
    x = m[0, 0] * i[None, None, :] + m[0, 1] * j[None, :, None] + m[0, 2] * k[:, None, None] + m[0, 3]
    return np.broadcast_to(x, tuple(geometry.shape)).astype(np.float32)


def body_midline_x(ct_hu: np.ndarray, geometry: Geometry) -> float:
    """LPS x (mm) of the body's centre: mean x of the voxels denser than -500 HU."""
    body = np.asarray(ct_hu) > -500
    x = lps_x(geometry)
    return float(x[body].mean()) if body.any() else float(x.mean())


def lungs_from_lobes(lobes: np.ndarray) -> np.ndarray:
    """Right (1) / left (2) lung labels of a lobe map ``[k, j, i]`` (lobes 1-3 right, 4-6 left; else 0)."""
    arr = np.asarray(lobes)
    return np.where(np.isin(arr, RIGHT_LOBES), RIGHT_LUNG,
                    np.where(np.isin(arr, LEFT_LOBES), LEFT_LUNG, 0)).astype(np.uint8)


def lung_sides(mask: np.ndarray, geometry: Geometry, midline_x: Optional[float] = None) -> np.ndarray:
    """Right (1) / left (2) labels of a user lung mask ``[k, j, i]``.

    A mask with both labels 1 and 2 is kept. Any other mask (binary, one lung only) is split at
    ``midline_x`` (LPS mm, the body's centre; right = smaller x) when given, else between its two
    largest components, or at the lung's median x when the lungs touch.
    """
    arr = np.asarray(mask)
    values = set(np.unique(arr[arr != 0]).tolist())
    if values == {RIGHT_LUNG, LEFT_LUNG}:
        return arr.astype(np.uint8)
    lung = arr != 0
    x = lps_x(geometry)
    if midline_x is not None:
        return np.where(lung, np.where(x < midline_x, RIGHT_LUNG, LEFT_LUNG), 0).astype(np.uint8)
    labels, n = ndimage.label(lung)
    out = np.zeros(lung.shape, dtype=np.uint8)
    if n >= 2:
        sizes = ndimage.sum_labels(lung, labels, np.arange(1, n + 1))
        order = np.argsort(sizes)[::-1]
        if sizes[order[1]] > SECOND_LUNG_MIN_FRACTION * sizes[order[0]]:
            xa = float(x[labels == order[0] + 1].mean())
            xb = float(x[labels == order[1] + 1].mean())
            split = 0.5 * (xa + xb)
            out[lung & (x < split)] = RIGHT_LUNG
            out[lung & (x >= split)] = LEFT_LUNG
            return out
    split = float(np.median(x[lung]))
    out[lung & (x < split)] = RIGHT_LUNG
    out[lung & (x >= split)] = LEFT_LUNG
    return out


def lung_labels_of(mask: np.ndarray, geometry: Geometry, lobes: Optional[np.ndarray] = None,
                   midline_x: Optional[float] = None) -> np.ndarray:
    """Right/left lung labels for statistics: from ``lobes`` when it has any lobe, else :func:`lung_sides`
    of ``mask`` (binary, 1/2, or a lobe map itself), restricted to ``mask`` nonzero."""
    lung = np.asarray(mask) != 0
    if lobes is not None and np.any(lobes):
        return np.where(lung, lungs_from_lobes(lobes), 0).astype(np.uint8)
    arr = np.asarray(mask)
    values = set(np.unique(arr[lung]).tolist())
    if values and values <= set(RIGHT_LOBES + LEFT_LOBES) and max(values) > LEFT_LUNG:
        return lungs_from_lobes(arr)
    return lung_sides(arr, geometry, midline_x)
