"""Lung mask from a chest CT in Hounsfield units (no learning, no downloads).

:func:`segment_lungs` returns a label map ``[k, j, i]`` uint8 with **1 = right
lung, 2 = left lung**, 0 elsewhere (trachea and main bronchi excluded, vessels
and other holes inside each lung filled). It is used by every lung domain
(CT PRM, CT-to-perfusion) when the user gives no lung or lobe mask (a user mask always wins).

Method (classic threshold pipeline, robust rather than exact):

1. light Gaussian smoothing (sigma 1.5 mm, at most one voxel) so low-dose noise does not break the
   lungs into speckle nor connect them to the outside air;
2. air-like voxels: smoothed HU below ``air_threshold_hu`` (default -400 HU;
   emphysematous lung lies far below it, so severe emphysema stays inside);
3. air connected to the in-plane border of any slice (outside the body, the
   table) is removed: 3D components touching the i/j border are dropped, the
   superior/inferior faces are allowed because scans are often cropped there;
4. trachea and main bronchi: a small round air region near the left-right centre
   of the most superior slices is tracked slice by slice towards the feet while
   its in-plane cross-section stays airway-sized; the tracked voxels (dilated by
   one voxel for the wall partial volume) are removed;
5. the remaining large components are the lungs; when both lungs form one
   component (touching at the anterior junction) they are split by successive
   erosion into two cores, and every voxel goes to its nearest core;
6. right/left from the LPS x of the centroids (LPS x grows towards the patient's
   left); in-plane holes (vessels, nodules) are filled and each lung is closed
   with a small ball so juxta-pleural vessels stay inside.

All steps are whole-volume array operations except the airway tracking, which
loops over slices (a few hundred 2D labelings).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from ..errors import PerfusionAIError
from ..io import Geometry
from ..labels import LEFT_LUNG, RIGHT_LUNG
from .sides import lps_x

# A trachea cross-section is about 1.5-3 cm wide: 0.8-6 cm^2; main bronchi are smaller.
_TRACHEA_AREA_MM2 = (60.0, 700.0)
# While tracking, a branch cross-section above this is parenchyma, not airway.
_AIRWAY_MAX_AREA_MM2 = 900.0
# The smaller lung must have at least this fraction of the larger one's volume.
_SECOND_LUNG_MIN_FRACTION = 0.08
# Below this total volume (mL) there is no lung in the image.
_MIN_LUNG_VOLUME_ML = 20.0


def _superior_first(geometry: Geometry) -> tuple[int, bool]:
    """Array axis (of ``[k, j, i]``) closest to the body's head-feet axis, and whether to flip it
    so that index 0 is the most superior slice."""
    d = geometry.direction_matrix
    index_axis = int(np.argmax(np.abs(d[2, :])))  # 0 = i, 1 = j, 2 = k
    array_axis = 2 - index_axis
    # LPS z grows towards the head; flip when the index grows towards the head.
    flip = bool(d[2, index_axis] > 0)
    return array_axis, flip


def _to_axial(arr: np.ndarray, axis: int, flip: bool) -> np.ndarray:
    out = np.moveaxis(arr, axis, 0)
    return out[::-1] if flip else out


def _from_axial(arr: np.ndarray, axis: int, flip: bool) -> np.ndarray:
    out = arr[::-1] if flip else arr
    return np.moveaxis(out, 0, axis)


def _inplane_spacing(geometry: Geometry, axis: int) -> tuple[float, float]:
    """Spacing (mm) of the two in-plane array axes after moving ``axis`` first."""
    spacing_kji = np.asarray(geometry.spacing, dtype=float)[::-1]
    rest = [a for a in range(3) if a != axis]
    return float(spacing_kji[rest[0]]), float(spacing_kji[rest[1]])


def _remove_outside_air(air: np.ndarray) -> np.ndarray:
    """Drop air components touching the in-plane border of the (axial-first) volume."""
    labels, n = ndimage.label(air)
    if n == 0:
        return air
    border = np.zeros(n + 1, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[np.unique(face)] = True
    border[0] = True
    return ~border[labels] & air


def _track_airways(air: np.ndarray, pixel_area_mm2: float, centre_col: float,
                   body_width_cols: float) -> np.ndarray:
    """Trachea + main bronchi voxels, tracked from the top slices (axial-first volume)."""
    airway = np.zeros_like(air)
    n_slices = air.shape[0]
    lo_px = _TRACHEA_AREA_MM2[0] / pixel_area_mm2
    hi_px = _TRACHEA_AREA_MM2[1] / pixel_area_mm2
    max_px = _AIRWAY_MAX_AREA_MM2 / pixel_area_mm2
    start = None
    # Seed: in the top fifth of the slices, the most central compact small component.
    for s in range(max(1, n_slices // 5)):
        labels, n = ndimage.label(air[s])
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        areas = ndimage.sum_labels(np.ones_like(labels), labels, idx)
        cents = np.asarray(ndimage.center_of_mass(np.ones_like(labels), labels, idx)).reshape(-1, 2)
        ok = (areas >= lo_px) & (areas <= hi_px) & (np.abs(cents[:, 1] - centre_col) < 0.15 * body_width_cols)
        if ok.any():
            best = idx[ok][np.argmin(np.abs(cents[ok, 1] - centre_col))]
            airway[s] = labels == best
            start = s
            break
    if start is None:
        return airway
    # Tracking upwards too: the seed slice may lie below the top slice.
    for direction in (1, -1):
        s = start
        while 0 <= s + direction < n_slices:
            nxt = s + direction
            labels, n = ndimage.label(air[nxt])
            if n == 0:
                break
            touching = np.unique(labels[airway[s] & (labels > 0)])
            touching = touching[touching > 0]
            if touching.size == 0:
                break
            areas = ndimage.sum_labels(np.ones_like(labels), labels, touching)
            keep = touching[areas <= max_px]
            if keep.size == 0:
                break
            airway[nxt] = np.isin(labels, keep)
            s = nxt
    return airway


def _split_two_lungs(component: np.ndarray, max_erosions: int = 30) -> Optional[np.ndarray]:
    """Split one connected two-lung component into two labels 1/2 (order arbitrary), or None."""
    core = component.copy()
    ball = ndimage.generate_binary_structure(3, 1)
    for _ in range(max_erosions):
        core = ndimage.binary_erosion(core, ball)
        labels, n = ndimage.label(core)
        if n < 2:
            if n == 0:
                return None
            continue
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, n + 1))
        order = np.argsort(sizes)[::-1]
        if sizes[order[1]] < _SECOND_LUNG_MIN_FRACTION * sizes[order[0]]:
            # A small piece broke off (an apex tip); keep eroding the big core only.
            core = labels == order[0] + 1
            continue
        seeds = np.zeros(component.shape, dtype=np.uint8)
        seeds[labels == order[0] + 1] = 1
        seeds[labels == order[1] + 1] = 2
        # Every lung voxel goes to its nearest core.
        _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        out = seeds[tuple(nearest)]
        out[~component] = 0
        return out
    return None


def _fill_and_close(lung: np.ndarray, closing_radius: int) -> np.ndarray:
    """Fill in-plane holes (vessels) and close small border notches of one lung (axial-first)."""
    if not lung.any():
        return lung
    # Work inside the bounding box (plus margin) for speed.
    pad = closing_radius + 1
    sl = ndimage.find_objects(lung.astype(np.uint8))[0]
    sl = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(sl, lung.shape))
    sub = lung[sl]
    if closing_radius > 0:
        r = closing_radius
        zz, yy, xx = np.ogrid[-r:r + 1, -r:r + 1, -r:r + 1]
        ball = (zz * zz + yy * yy + xx * xx) <= r * r
        padded = np.pad(sub, r)
        sub = ndimage.binary_closing(padded, ball)[r:-r, r:-r, r:-r]
    inplane = np.zeros((3, 3, 3), dtype=bool)
    inplane[1] = ndimage.generate_binary_structure(2, 1)
    sub = ndimage.binary_fill_holes(sub, structure=inplane)
    out = np.zeros_like(lung)
    out[sl] = sub
    return out


def segment_lungs(
    ct_hu: np.ndarray,
    geometry: Geometry,
    *,
    air_threshold_hu: float = -400.0,
    smoothing_mm: float = 1.5,
    remove_airways: bool = True,
    closing_mm: float = 3.0,
) -> np.ndarray:
    """Segment the right and left lungs of a chest CT.

    Parameters
    ----------
    ct_hu
        CT in Hounsfield units, ``[k, j, i]`` (any axial/coronal/sagittal
        orientation: the head-feet axis is found from ``geometry``).
    geometry
        The grid of ``ct_hu`` (spacing in mm, LPS direction).
    air_threshold_hu
        Smoothed HU below this are air-like (lung, airway, outside air).
    smoothing_mm
        Gaussian sigma in mm applied before thresholding (0 = none; at most one voxel per axis,
        so thin walls of coarse scans are not blurred away).
    remove_airways
        Track and remove the trachea and main bronchi.
    closing_mm
        Radius (mm) of the per-lung morphological closing; 0 = none.

    Returns
    -------
    numpy.ndarray
        ``[k, j, i]`` uint8: 1 right lung, 2 left lung, 0 elsewhere.

    Raises
    ------
    PerfusionAIError
        When no lung-sized air region is found (not a chest CT in HU).
    """
    ct = np.asarray(ct_hu, dtype=np.float32)
    if ct.ndim != 3 or tuple(ct.shape) != tuple(geometry.shape):
        raise ValueError(f"ct_hu shape {ct.shape} does not match geometry {geometry.shape}")
    axis, flip = _superior_first(geometry)
    vol = _to_axial(ct, axis, flip)
    dy, dx = _inplane_spacing(geometry, axis)
    spacing_kji = np.asarray(geometry.spacing, dtype=float)[::-1]
    voxel_ml = float(np.prod(spacing_kji)) / 1000.0

    axial_spacing = np.asarray([spacing_kji[axis]] + [spacing_kji[a] for a in range(3) if a != axis])
    sigma = np.minimum(smoothing_mm / axial_spacing, 1.0)
    smooth = ndimage.gaussian_filter(vol, sigma) if smoothing_mm > 0 else vol
    air = smooth < air_threshold_hu
    inside_air = _remove_outside_air(air)

    airway = np.zeros(vol.shape, dtype=bool)
    if remove_airways and inside_air.any():
        body = ~(air & ~inside_air)
        cols = np.nonzero(body.any(axis=(0, 1)))[0]
        centre_col = 0.5 * (cols[0] + cols[-1]) if cols.size else vol.shape[2] / 2
        width = float(cols[-1] - cols[0] + 1) if cols.size else float(vol.shape[2])
        airway = _track_airways(inside_air, dy * dx, centre_col, width)
        if airway.any():
            airway = ndimage.binary_dilation(airway, ndimage.generate_binary_structure(3, 1))
            inside_air &= ~airway

    labels, n = ndimage.label(inside_air)
    if n == 0:
        raise PerfusionAIError("no lung found in the CT: no air-filled region inside the body "
                               "(is this a chest CT in Hounsfield units?)")
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, n + 1))
    order = np.argsort(sizes)[::-1]
    if sizes[order[0]] * voxel_ml < _MIN_LUNG_VOLUME_ML:
        raise PerfusionAIError(f"no lung found in the CT: the largest air region inside the body is "
                               f"{sizes[order[0]] * voxel_ml:.1f} mL (is this a chest CT in Hounsfield units?)")

    two = np.zeros(vol.shape, dtype=np.uint8)
    if n >= 2 and sizes[order[1]] >= _SECOND_LUNG_MIN_FRACTION * sizes[order[0]]:
        two[labels == order[0] + 1] = 1
        two[labels == order[1] + 1] = 2
    else:
        biggest = labels == order[0] + 1
        split = _split_two_lungs(biggest)
        if split is None:
            # A single lung (pneumonectomy) or inseparable: keep one component.
            two[biggest] = 1
        else:
            two = split

    # Right lung has the smaller LPS x (x grows towards the patient's left).
    back = _from_axial(two, axis, flip)
    lps_x_mm = lps_x(geometry)
    out = np.zeros(ct.shape, dtype=np.uint8)
    present = [v for v in (1, 2) if (back == v).any()]
    if len(present) == 2:
        x1 = float(lps_x_mm[back == 1].mean())
        x2 = float(lps_x_mm[back == 2].mean())
        right, left = (1, 2) if x1 < x2 else (2, 1)
    else:
        only = present[0]
        cx = float(lps_x_mm[back == only].mean())
        body_cx = float(lps_x_mm[(ct > -500)].mean()) if (ct > -500).any() else cx
        right, left = (only, -1) if cx < body_cx else (-1, only)

    radius = int(round(closing_mm / max(min(spacing_kji), 1e-6))) if closing_mm > 0 else 0
    radius = min(radius, 4)
    for src, dst in ((right, RIGHT_LUNG), (left, LEFT_LUNG)):
        if src < 0:
            continue
        lung_axial = _fill_and_close(two == src, radius)
        lung = _from_axial(lung_axial, axis, flip)
        out[lung & (out == 0)] = dst
    # Hole filling and closing put the removed airway lumen back inside; take it out again.
    out[_from_axial(airway, axis, flip)] = 0
    return out
