"""DL-CTPM preprocessing (Ren et al., IJROBP 2021, Fig. 2a and Eqs. 1-2).

Pipeline, one function per step (arrays are ``[k, j, i]``, HU for CT):

1. :func:`split_lungs` -- a lung mask (labels 1 = right, 2 = left, a binary
   mask, or lobe labels 1-6) becomes one boolean mask per lung.
2. :func:`lung_grid` -- each lung's bounding box becomes a *network grid*: a
   :class:`~perfusionai.io.Geometry` of ``input_shape`` voxels (default
   ``(k, j, i) = (128, 64, 64)``) covering exactly the box (voxel edges on the
   box edges), with its axes the CT axes closest to LPS x, y, z (so 128 runs
   along the head-feet axis whatever the CT's storage order or obliquity).
3. :func:`resample_onto` -- CT, lung mask and SPECT are sampled onto that grid
   in physical coordinates (SimpleITK, linear; the mask at >= 0.5).
4. :func:`equalise_histogram` -- Eq. 1: HU clipped to [-1000, -300] and mapped
   through the cumulative histogram of the lung voxels,
   ``(chf(HU) - chf(-1000)) / (chf(-300) - chf(-1000))`` in [0, 1].
5. :func:`masked_median_filter` (10 voxels) then :func:`masked_uniform_filter`
   (5 voxels) -- the paper's "filtering"; :func:`enhance_ct` chains 4-5.
6. :func:`normalise_spect` -- Eq. 2: SPECT / P75(SPECT inside the lung), and
   :func:`discretise` into 11 levels {0, 0.1, ..., 1} (the training target).

Decisions where the paper is silent (each also noted at its function):

* The cumulative histogram is taken over the lung voxels of the down-sampled
  crop (not the whole crop), as exact counts of the continuous values (no
  binning); voxels outside the lung are set to 0 (the network's background).
* Both filters use only lung voxels (a masked median / a normalised box
  mean), so soft tissue and the other lung do not bleed into the lung border;
  an even window (10) covers offsets -5..+4 (scipy's convention); the median of
  an even count is the upper middle value; values are quantised to 256 levels
  for the median (an exact histogram median, 1/255 resolution).
* Down-sampling is linear interpolation at the network voxel centres (the
  paper only says "down-sampled").
* P75 is taken over both lungs of the patient (a patient-level normalisation,
  so the left/right perfusion balance is kept); discretisation rounds to the
  nearest level (halves up) after clipping to [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage

from ..errors import PerfusionAIError, input_error
from ..io import Geometry, to_sitk
from ..labels import LEFT_LOBES, RIGHT_LOBES

RIGHT_LUNG = 1
LEFT_LUNG = 2
SIDE_NAMES = {RIGHT_LUNG: "right", LEFT_LUNG: "left"}

#: Lobe labels of the architecture (1-3 right lobes, 4-6 left lobes).


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings; stored in every model card so prediction repeats training exactly.

    Attributes
    ----------
    input_shape
        Network grid per lung, ``(k, j, i)`` = (head-feet, posterior-anterior, left-right) voxels.
    hu_window
        HU range of the histogram equalisation (Eq. 1).
    median_size, uniform_size
        Filter windows in network-grid voxels (paper: 10 and 5 at 128x64x64).
    spect_percentile
        Percentile of the lung SPECT values used as the reference level (paper: 75).
    spect_levels
        Number of discrete target levels in [0, 1] (paper: 11).
    """

    input_shape: tuple[int, int, int] = (128, 64, 64)
    hu_window: tuple[float, float] = (-1000.0, -300.0)
    median_size: int = 10
    uniform_size: int = 5
    spect_percentile: float = 75.0
    spect_levels: int = 11

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["hu_window"] = list(self.hu_window)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(
            input_shape=tuple(int(v) for v in d["input_shape"]),
            hu_window=tuple(float(v) for v in d["hu_window"]),
            median_size=int(d["median_size"]),
            uniform_size=int(d["uniform_size"]),
            spect_percentile=float(d["spect_percentile"]),
            spect_levels=int(d["spect_levels"]),
        )


# ------------------------------------------------------------------------------ 1. lungs


def split_lungs(labels: np.ndarray, geometry: Geometry, name: str = "lung mask") -> dict[int, np.ndarray]:
    """One boolean ``[k, j, i]`` mask per lung: ``{1: right, 2: left}``.

    Accepted label maps: 1 = right / 2 = left (the CT lung mask convention);
    lobe labels 1-6 (1-3 right, 4-6 left; recognised when a value above 2 is
    present); or a binary mask (one nonzero value: 1, or above 6 such as 255),
    split into right and left by :func:`perfusionai.prm.pipeline.lung_sides`
    (between its two largest components along LPS x, x growing towards the
    patient's left). Raises :class:`PerfusionAIError` when a lung
    is missing.
    """
    arr = np.asarray(labels)
    values = np.unique(arr[arr != 0])
    if values.size == 0:
        raise input_error(name, "contains no lung voxel (the CT has no lungs, or the mask is empty)")
    if values.size == 1 and (values[0] == 1 or values[0] > 6):
        # binary (any single value: 1, 255, ...); the shared right/left split (prm.pipeline.lung_sides)
        # ignores stray blobs smaller than 8 % of the larger lung
        from ..lung import lung_sides

        sides = lung_sides(arr != 0, geometry)
        right, left = sides == RIGHT_LUNG, sides == LEFT_LUNG
    elif values.max() > 2:
        if not set(values.tolist()) <= set(range(1, 7)):
            raise input_error(name, f"has labels {values.tolist()}; expected 1 right / 2 left, "
                                    f"lobes 1-6, or a binary mask")
        right = np.isin(arr, RIGHT_LOBES)
        left = np.isin(arr, LEFT_LOBES)
    else:  # 1 right / 2 left (a mask of label 2 alone has no right lung and is refused below)
        right, left = arr == RIGHT_LUNG, arr == LEFT_LUNG
    for side, mask in ((RIGHT_LUNG, right), (LEFT_LUNG, left)):
        if not mask.any():
            raise input_error(name, f"has no {SIDE_NAMES[side]} lung; both lungs are needed")
    return {RIGHT_LUNG: right, LEFT_LUNG: left}


# ------------------------------------------------------------------------------ 2. network grid


@dataclass
class LungCrop:
    """One lung on its network grid.

    Attributes
    ----------
    side
        1 right, 2 left.
    grid
        The network grid (shape ``input_shape``), LPS geometry.
    bbox
        The lung's bounding box in the CT array, slices ``(k, j, i)``.
    ct_hu
        CT on the grid, HU, float32 ``input_shape``.
    mask
        This lung on the grid, bool ``input_shape``.
    enhanced
        Enhanced CT in [0, 1] (0 outside the lung), or None before :func:`enhance_ct`.
    """

    side: int
    grid: Geometry
    bbox: tuple[slice, slice, slice]
    ct_hu: np.ndarray
    mask: np.ndarray
    enhanced: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """Smallest ``(k, j, i)`` slices holding every nonzero voxel of ``mask``."""
    boxes = ndimage.find_objects(np.asarray(mask, dtype=np.uint8))
    if not boxes or boxes[0] is None:
        raise PerfusionAIError("empty mask has no bounding box")
    return boxes[0]


def lung_grid(bbox: tuple[slice, slice, slice], geometry: Geometry,
              shape_kji: tuple[int, int, int] = (128, 64, 64)) -> Geometry:
    """The network grid of ``shape_kji`` voxels covering the CT voxels of ``bbox``.

    Output axis ``i'`` (``j'``, ``k'``) is the CT index axis closest to LPS x
    (y, z), pointing the same way as that LPS axis; the outer voxel *edges* lie
    on the outer edges of the box's CT voxels, so the spacing along an axis is
    ``box voxels x CT spacing / grid voxels`` (mm).
    """
    d = geometry.direction_matrix
    spacing = np.asarray(geometry.spacing, dtype=float)
    lo = np.array([bbox[2].start, bbox[1].start, bbox[0].start], dtype=float)  # (i, j, k)
    hi = np.array([bbox[2].stop, bbox[1].stop, bbox[0].stop], dtype=float)
    n_out = np.array(shape_kji[::-1], dtype=float)  # (i', j', k')
    # Assign each LPS axis the CT index axis best aligned with it (a permutation).
    order = _nearest_axes(d)
    out_direction = np.zeros((3, 3))
    out_spacing = np.zeros(3)
    start_index = np.zeros(3)  # CT continuous index (i, j, k) of grid voxel (0, 0, 0)
    for lps_axis, ct_axis in enumerate(order):
        sign = 1.0 if d[lps_axis, ct_axis] >= 0 else -1.0
        n_in = hi[ct_axis] - lo[ct_axis]
        step = n_in / n_out[lps_axis]  # CT voxels per grid voxel along this axis
        out_direction[:, lps_axis] = sign * d[:, ct_axis]
        out_spacing[lps_axis] = spacing[ct_axis] * step
        start_index[ct_axis] = (lo[ct_axis] - 0.5 + 0.5 * step) if sign > 0 else (hi[ct_axis] - 0.5 - 0.5 * step)
    origin = geometry.ijk_to_lps() @ np.append(start_index, 1.0)
    return Geometry(tuple(int(s) for s in shape_kji), tuple(float(s) for s in out_spacing),
                    tuple(float(o) for o in origin[:3]), tuple(float(v) for v in out_direction.ravel()))


def _nearest_axes(direction: np.ndarray) -> list[int]:
    """For LPS axes x, y, z: the CT index axis (0 i, 1 j, 2 k) best aligned with each (a permutation)."""
    import itertools

    best, best_score = None, -1.0
    for perm in itertools.permutations(range(3)):
        score = sum(abs(direction[lps, ct]) for lps, ct in enumerate(perm))
        if score > best_score:
            best, best_score = list(perm), score
    return best


# ------------------------------------------------------------------------------ 3. resampling


def resample_onto(array: np.ndarray, geometry: Geometry, target: Geometry, *,
                  interpolation: str = "linear", default: float = 0.0,
                  extrapolate_nearest: bool = False, source_image=None) -> np.ndarray:
    """Sample ``array[k, j, i]`` (on ``geometry``) at the voxel centres of ``target`` (LPS mm).

    ``interpolation`` is ``"linear"`` or ``"nearest"``; points outside the
    source get ``default``, or the nearest source voxel with
    ``extrapolate_nearest``. Returns float32 ``target.shape`` (the source dtype
    for nearest). ``source_image`` lets a caller reuse one SimpleITK image of a
    large source for several targets.
    """
    import SimpleITK as sitk

    src = source_image if source_image is not None else to_sitk(np.asarray(array), geometry)
    ref = sitk.Image(int(target.shape[2]), int(target.shape[1]), int(target.shape[0]), sitk.sitkUInt8)
    ref.SetSpacing(target.spacing)
    ref.SetOrigin(target.origin)
    ref.SetDirection(target.direction)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(ref)
    resampler.SetInterpolator(sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor)
    # Linear samples of an integer image (HU as int16) must not be rounded back to integers.
    resampler.SetOutputPixelType(sitk.sitkFloat32 if interpolation == "linear" else src.GetPixelID())
    resampler.SetDefaultPixelValue(float(default))
    resampler.SetUseNearestNeighborExtrapolator(bool(extrapolate_nearest))
    resampler.SetNumberOfThreads(2)
    out = sitk.GetArrayFromImage(resampler.Execute(src))
    return out.astype(np.float32) if interpolation == "linear" else out


def coverage(source: Geometry, target: Geometry, mask: Optional[np.ndarray] = None) -> float:
    """Fraction of ``target`` voxel centres (within ``mask`` when given) lying inside ``source``'s extent."""
    inside = resample_onto(np.ones(tuple(source.shape), np.uint8), source, target,
                           interpolation="nearest", default=0)
    if mask is None:
        return float(inside.mean())
    mask = np.asarray(mask, dtype=bool)
    return float(inside[mask].mean()) if mask.any() else 0.0


def crop_lung(ct_hu: np.ndarray, geometry: Geometry, lung_mask: np.ndarray, side: int,
              config: PreprocessConfig = PreprocessConfig(), ct_image=None) -> LungCrop:
    """CT and mask of one lung on its network grid (steps 2-3; ``ct_hu[k, j, i]`` in HU)."""
    box = bounding_box(lung_mask)
    grid = lung_grid(box, geometry, config.input_shape)
    ct = resample_onto(ct_hu, geometry, grid, interpolation="linear", extrapolate_nearest=True,
                       source_image=ct_image)
    # Only the box is needed to resample the mask: a much smaller image than the CT.
    box_geometry = sub_geometry(geometry, box)
    mask = resample_onto(np.ascontiguousarray(lung_mask[box]).astype(np.float32), box_geometry, grid,
                         interpolation="linear", extrapolate_nearest=True) >= 0.5
    if not mask.any():
        raise input_error("lung mask", f"the {SIDE_NAMES[side]} lung is too small to be resampled "
                                       f"to {config.input_shape}")
    return LungCrop(side, grid, box, ct, mask)


def sub_geometry(geometry: Geometry, box: tuple[slice, slice, slice]) -> Geometry:
    """Geometry of ``array[box]`` (same spacing and direction, shifted origin)."""
    start = np.array([box[2].start, box[1].start, box[0].start, 1.0])
    origin = geometry.ijk_to_lps() @ start
    shape = tuple(int(s.stop - s.start) for s in box)
    return Geometry(shape, geometry.spacing, tuple(float(o) for o in origin[:3]), geometry.direction)


# ------------------------------------------------------------------------------ 4-5. CT enhancement


def equalise_histogram(ct_hu: np.ndarray, mask: np.ndarray,
                       window: tuple[float, float] = (-1000.0, -300.0)) -> np.ndarray:
    """Eq. 1 before filtering: histogram equalisation of HU within ``window``.

    ``chf(v)`` = number of lung voxels whose clipped HU is <= ``v``; each voxel
    maps to ``(chf(HU) - chf(lo)) / (chf(hi) - chf(lo))`` with HU clipped to
    ``[lo, hi]`` ("outlier voxel values were replaced with the threshold
    values"). Lung voxels at ``lo`` give 0, at ``hi`` give 1. Voxels outside
    ``mask`` are set to 0. Returns float32 in [0, 1], same shape.
    """
    lo, hi = window
    mask = np.asarray(mask, dtype=bool)
    clipped = np.clip(np.asarray(ct_hu, dtype=np.float64), lo, hi)
    lung_sorted = np.sort(clipped[mask])
    if lung_sorted.size == 0:
        raise PerfusionAIError("histogram equalisation needs at least one lung voxel")
    chf_lo = np.searchsorted(lung_sorted, lo, side="right")
    chf_hi = np.searchsorted(lung_sorted, hi, side="right")
    chf = np.searchsorted(lung_sorted, clipped[mask], side="right")
    out = np.zeros(clipped.shape, dtype=np.float32)
    if chf_hi > chf_lo:
        out[mask] = (chf - chf_lo) / float(chf_hi - chf_lo)
    return out


def masked_median_filter(values: np.ndarray, mask: np.ndarray, size: int, levels: int = 256) -> np.ndarray:
    """Median of the lung voxels in a ``size``^3 window around each voxel.

    ``values`` in [0, 1] are quantised to ``levels`` steps for an exact
    histogram median (scikit-image's rank filter). Window offsets
    ``-(size // 2) .. size - size // 2 - 1`` per axis (scipy's centring);
    only voxels inside ``mask`` and inside the volume count; of an even count
    the upper middle value is taken. Output 0 outside ``mask``.
    """
    from skimage.filters import rank

    mask = np.asarray(mask, dtype=bool)
    if size <= 1:
        return np.where(mask, values, 0).astype(np.float32)
    top = levels - 1
    quantised = np.rint(np.clip(values, 0.0, 1.0) * top).astype(np.uint8 if levels <= 256 else np.uint16)
    footprint = np.ones((size,) * 3, dtype=bool)
    med = rank.median(quantised, footprint=footprint, mask=mask)
    return np.where(mask, med.astype(np.float32) / top, np.float32(0))


def masked_uniform_filter(values: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """Mean of the lung voxels in a ``size``^3 window (a normalised box filter); 0 outside ``mask``.

    Windows are centred as in :func:`masked_median_filter`; voxels outside the
    volume do not count.
    """
    mask = np.asarray(mask, dtype=bool)
    if size <= 1:
        return np.where(mask, values, 0).astype(np.float32)
    weight = mask.astype(np.float64)
    num = ndimage.uniform_filter(np.where(mask, values, 0).astype(np.float64), size=size,
                                 mode="constant", cval=0.0)
    den = ndimage.uniform_filter(weight, size=size, mode="constant", cval=0.0)
    out = np.zeros(mask.shape, dtype=np.float32)
    ok = mask & (den > 1e-12)
    out[ok] = (num[ok] / den[ok]).astype(np.float32)
    return out


def enhance_ct(ct_hu: np.ndarray, mask: np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Eq. 1: histogram equalisation, median filter, uniform filter; float32 [0, 1], 0 outside the lung."""
    eq = equalise_histogram(ct_hu, mask, config.hu_window)
    med = masked_median_filter(eq, mask, config.median_size)
    return masked_uniform_filter(med, mask, config.uniform_size)


# ------------------------------------------------------------------------------ 6. SPECT


def spect_reference_level(spect: np.ndarray, lung_mask: np.ndarray, percentile: float = 75.0,
                          name: str = "SPECT") -> float:
    """The paper's HIR: the ``percentile`` of the SPECT values inside ``lung_mask`` (counts)."""
    lung = np.asarray(spect, dtype=np.float64)[np.asarray(lung_mask, dtype=bool)]
    if lung.size == 0:
        raise input_error(name, "no SPECT voxel lies inside the lung mask")
    if not np.all(np.isfinite(lung)):
        raise input_error(name, "contains NaN or infinite values inside the lung")
    level = float(np.percentile(lung, percentile))
    if not level > 0:
        raise input_error(name, f"the {percentile:g}th percentile inside the lung is {level:g}; "
                                f"a perfusion image with positive counts in the lung was expected")
    return level


def normalise_spect(spect: np.ndarray, lung_mask: np.ndarray, percentile: float = 75.0,
                    name: str = "SPECT") -> np.ndarray:
    """Eq. 2 without discretisation: ``SPECT / P75(SPECT in the lung)`` (float32, not clipped)."""
    level = spect_reference_level(spect, lung_mask, percentile, name)
    return (np.asarray(spect, dtype=np.float64) / level).astype(np.float32)


def discretise(normalised: np.ndarray, levels: int = 11) -> np.ndarray:
    """Eq. 2's discretisation: clip to [0, 1], round to the nearest of ``levels`` equal steps (halves up)."""
    steps = levels - 1
    x = np.clip(np.asarray(normalised, dtype=np.float64), 0.0, 1.0)
    return (np.floor(x * steps + 0.5) / steps).astype(np.float32)


# ------------------------------------------------------------------------------ whole CT


def preprocess_ct(ct_hu: np.ndarray, geometry: Geometry, lung_labels: np.ndarray,
                  config: PreprocessConfig = PreprocessConfig(), mask_name: str = "lung mask",
                  progress=None) -> list[LungCrop]:
    """Steps 1-5 for both lungs: ``[right, left]`` crops with ``enhanced`` filled in."""
    from ..progress import as_progress

    report = as_progress(progress)
    lungs = split_lungs(lung_labels, geometry, mask_name)
    image = to_sitk(np.asarray(ct_hu), geometry)  # converted once, sampled twice
    crops = []
    for n, side in enumerate((RIGHT_LUNG, LEFT_LUNG)):
        report(n / 2, f"preprocessing the {SIDE_NAMES[side]} lung")
        crop = crop_lung(ct_hu, geometry, lungs[side], side, config, ct_image=image)
        crop.enhanced = enhance_ct(crop.ct_hu, crop.mask, config)
        crops.append(crop)
    report(1.0, "preprocessed")
    return crops
