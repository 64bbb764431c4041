"""Deformable registration of expiratory to inspiratory CT with ANTsPy (``antspyx``).

Recipe (research/prm.md sections 1.2 and 3; Xu et al. use "ANTsPy SyN: rigid, affine and
deformable"):

1. intensities clamped to [-1000, 0] HU (CMI ``lungreg_BH.m``) and rescaled to [0, 1];
2. both images resampled to ``registration_spacing_mm`` when finer, optionally cropped to their lung
   bounding box plus ``margin_mm`` (off by default: on the phantom the crop cost accuracy, lung Dice
   0.971 vs 0.986); transforms live in physical (LPS) space, so they apply to the full-resolution images;
3. ``ants.registration(type_of_transform="SyNRA")``: centre-of-mass initialisation, rigid then
   affine (Mattes MI, 32 bins, 25 % regular sampling with a fixed random seed; ANTsPy's
   2100x1200x1200x10 iterations at shrink 6x4x2x1, ``affine_*`` options), then SyN[0.2,3,0]
   with a neighbourhood cross-correlation metric (radius ``cc_radius`` = 2, as ANTs'
   ``antsRegistrationSyN[s]``; mono-modal CT whose lung density changes between breath holds, which
   CC tolerates and mean squares does not: on the phantom mean squares, the metric of
   ``ntustison/antsCtLungRegistrationExample``, option ``syn_metric="meansquares"``, was off the truth
   %PRM by 3.1 points (whole lung) and 6.9 (worst lobe), affine alone by 5.4), ``syn_iterations``
   coarse to fine (ANTsPy uses shrink factors 2^(n-1)..1 and smoothing n-1..0 voxels for n levels),
   every stage masked by the fixed and moving lung masks dilated by ``mask_dilation_mm`` (CMI and the
   ANTs lung example dilate by 10 voxels/mm).

   Default recipe ``fast`` (:data:`RECIPES`): a 3 mm registration grid and SyN 40x20x0, i.e. 40
   iterations at 12 mm and 20 at 6 mm, none on the 3 mm grid (ANTsPy's own default ``40x20x0``).
   Why: ANTs' CC SyN costs about 2 CPU s per iteration per 0.16 M voxels, so iterations on a 2 mm
   grid (the earlier default, 40x20x10 at 2 mm, now ``accurate``: ~300 s on the 2 mm 128x128x80
   pair) and even on a 4 mm grid (20 iterations: ~45 CPU s) dominate the run time, while on the
   phantom they did not improve %PRM. Measured on the acceptance phantom (3.5 mm, so registered at
   3.5 mm: SyN levels 14 and 7 mm): %PRM within 0.7 points (whole lung) and 4.5 (worst lobe) of the
   truth, class Dice >= 0.93, versus 1.1 and 4.8 for the ``accurate`` recipe; 2 mm 128x128x80 pair:
   0.4 and 2.2 points, registration ~22 s. Rejected: a 4 mm grid with 40x20x0 (levels 16 and 8 mm,
   ~11 s) reached 4.96 points on the worst lobe, too close to the 5-point acceptance; a 4 mm grid
   with 40x20 (levels 8 and 4 mm) and CC radius 1 reached 4.6 points at ~49 CPU s (radius 1 saves
   only ~30 % CPU against radius 2).
   ``accurate`` keeps the slow recipe for real scans with finer structure than the phantom;
4. the moving image is warped onto the fixed full-resolution grid with linear interpolation
   (default value -1024 HU), its lung mask with ``genericLabel``, and the overlap (Dice) of the
   fixed lung mask and the warped moving lung mask is reported.

Direction: ``exp_to_insp`` (default, Xu et al.; %PRM relative to the inspiratory lung volume) or
``insp_to_exp`` (Galban/CMI style; the PRM map is then on the expiratory grid).

Deviations from the public recipes: no per-lung split registration and no B-spline SyN
(ntustison), no elastix B-spline stages (CMI); ANTs' SyN with CC instead, which is what ANTsPy offers
directly. Threads: ANTs (ITK) reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` when it is first used
in a process; :func:`register_ct` sets it before ANTs is imported, so the first call's ``threads``
holds for the whole process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, asdict, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..errors import ParameterError
from ..io import Geometry
from ..metrics import dice
from ..progress import ProgressCallback, as_progress

DIRECTIONS = ("exp_to_insp", "insp_to_exp")


@dataclass(frozen=True)
class RegistrationOptions:
    """Options of :func:`register_ct` (all distances in mm)."""

    direction: str = "exp_to_insp"
    threads: int = 2
    registration_spacing_mm: float = 3.0
    margin_mm: Optional[float] = None
    moving_extra_margin_mm: float = 40.0
    mask_dilation_mm: float = 10.0
    cc_radius: int = 2
    syn_metric: str = "CC"
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    syn_gradient_step: float = 0.2
    affine_iterations: tuple[int, ...] = (2100, 1200, 1200, 10)
    affine_shrink_factors: tuple[int, ...] = (6, 4, 2, 1)
    affine_smoothing_sigmas: tuple[int, ...] = (3, 2, 1, 0)
    linear_only: bool = False
    seed: int = 1

    def validate(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ParameterError("direction", f"must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if int(self.threads) < 1:
            raise ParameterError("threads", f"must be at least 1, got {self.threads}")
        if self.registration_spacing_mm <= 0:
            raise ParameterError("registration_spacing", "must be positive (mm)")
        if not self.syn_iterations or any(int(v) < 0 for v in self.syn_iterations):
            raise ParameterError("syn_iterations", "give non-negative iterations per level, coarse to fine")
        if not (len(self.affine_iterations) == len(self.affine_shrink_factors) == len(self.affine_smoothing_sigmas)):
            raise ParameterError("affine_iterations", "affine iterations, shrink factors and smoothing sigmas "
                                                      "need one value per level")

    def to_dict(self) -> dict:
        return asdict(self)


#: Named recipes (``--registration-quality``). ``fast`` is the default of :class:`RegistrationOptions`;
#: ``accurate`` is the earlier default (SyN iterations down to a 2 mm grid), several times slower.
RECIPES = {
    "fast": dict(registration_spacing_mm=3.0, syn_iterations=(40, 20, 0)),
    "accurate": dict(registration_spacing_mm=2.0, syn_iterations=(40, 20, 10)),
}


def registration_recipe(quality: str = "fast", **overrides) -> RegistrationOptions:
    """:class:`RegistrationOptions` of the named recipe (``fast`` or ``accurate``), with ``overrides``."""
    if quality not in RECIPES:
        raise ParameterError("registration_quality", f"must be one of {', '.join(RECIPES)}, got {quality!r}")
    return RegistrationOptions(**{**RECIPES[quality], **overrides})


@dataclass
class RegistrationResult:
    """Moving image and lung mask warped onto the fixed grid, and the transforms (held in memory).

    Attributes
    ----------
    warped
        ``[k, j, i]`` float32 HU of the moving image on the fixed grid.
    warped_lung
        ``[k, j, i]`` uint8 moving lung labels on the fixed grid (None when not given).
    forward_transforms
        Names of the transforms mapping fixed-space points to moving space (ANTs order for
        ``apply_transforms``): warp the moving image onto the fixed grid with them.
    inverse_transforms
        Names of the transforms for the opposite direction (ANTs order).
    transform_data
        ``{name: file content}`` of every transform: ANTs writes them to a temporary folder that
        :func:`register_ct` reads back and removes, so nothing on disk outlives the call.
    lung_dice_before, lung_dice_after
        Dice of the fixed lung mask with the moving lung mask before (same physical
        positions, resampled) and after registration; None without a moving lung mask.
    """

    warped: np.ndarray
    warped_lung: Optional[np.ndarray]
    forward_transforms: list[str]
    inverse_transforms: list[str]
    transform_data: dict = field(default_factory=dict, repr=False)
    lung_dice_before: Optional[float] = None
    lung_dice_after: Optional[float] = None
    info: dict = field(default_factory=dict)

    def save_transforms(self, out_dir: Path, prefix: str = "exp_to_insp_") -> list[str]:
        """Write the transform files into ``out_dir`` as ``prefix + name``; returns the file names."""
        names = []
        for name in dict.fromkeys(self.forward_transforms + self.inverse_transforms):
            if name not in self.transform_data:
                continue
            (Path(out_dir) / (prefix + name)).write_bytes(self.transform_data[name])
            names.append(prefix + name)
        return names

    def cleanup(self) -> None:
        """Nothing to clean up (the transforms are in memory); kept for older callers."""


_ANTS = None


def _import_ants(threads: int):
    """Import ANTsPy with the ITK thread count set (must precede ITK's first use)."""
    global _ANTS
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    if _ANTS is None:
        from ..deps import require

        _ANTS = require("ants", "CT PRM registration (or run without registration on aligned scans)")
    return _ANTS


def to_ants(array: np.ndarray, geometry: Geometry):
    """ANTs image of a ``[k, j, i]`` array on ``geometry`` (ANTs arrays are ``(x, y, z)`` = ``[i, j, k]``)."""
    ants = _ANTS
    return ants.from_numpy(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)),
                           origin=tuple(geometry.origin), spacing=tuple(geometry.spacing),
                           direction=geometry.direction_matrix)


def from_ants(image) -> np.ndarray:
    """``[k, j, i]`` array of an ANTs image."""
    return np.ascontiguousarray(image.numpy().transpose(2, 1, 0))


def _crop_box(mask: Optional[np.ndarray], geometry: Geometry, margin_mm: float):
    """Index slices ``[k, j, i]`` of the mask's bounding box plus a margin (whole grid without mask)."""
    if mask is None or not np.any(mask):
        return tuple(slice(0, n) for n in geometry.shape)
    box = ndimage.find_objects(np.asarray(mask, dtype=np.uint8))[0]
    spacing_kji = np.asarray(geometry.spacing)[::-1]
    out = []
    for s, n, sp in zip(box, geometry.shape, spacing_kji):
        m = int(np.ceil(margin_mm / sp))
        out.append(slice(max(s.start - m, 0), min(s.stop + m, n)))
    return tuple(out)


def _sub_geometry(geometry: Geometry, box) -> Geometry:
    start_ijk = np.array([box[2].start, box[1].start, box[0].start], dtype=float, ndmin=1)
    origin = geometry.ijk_to_lps()[:3, :3] @ start_ijk + np.asarray(geometry.origin)
    shape = tuple(s.stop - s.start for s in box)
    return Geometry(shape, geometry.spacing, tuple(float(o) for o in origin), geometry.direction)


def _prepare(ct_hu: np.ndarray, lung: Optional[np.ndarray], geometry: Geometry, opts: RegistrationOptions,
             extra_margin_mm: float = 0.0):
    """Cropped, clamped, rescaled and resampled ANTs image and its dilated mask."""
    ants = _ANTS
    if opts.margin_mm is None:
        box = tuple(slice(0, n) for n in geometry.shape)
    else:
        box = _crop_box(lung, geometry, opts.margin_mm + opts.mask_dilation_mm + extra_margin_mm)
    sub_geo = _sub_geometry(geometry, box)
    scaled = (np.clip(np.asarray(ct_hu, dtype=np.float32)[box], -1000.0, 0.0) + 1000.0) / 1000.0
    image = to_ants(scaled, sub_geo)
    mask_img = None
    if lung is not None and np.any(lung):
        mask_img = to_ants((np.asarray(lung)[box] > 0).astype(np.float32), sub_geo)
    target = float(opts.registration_spacing_mm)
    if min(geometry.spacing) < target * 0.95:
        new_spacing = tuple(max(float(s), target) for s in geometry.spacing)
        # Smooth before downsampling against aliasing (sigma in mm ~ half the new voxel).
        sigma = [max(0.0, 0.5 * (ns - s)) for ns, s in zip(new_spacing, geometry.spacing)]
        image = ants.smooth_image(image, sigma, sigma_in_physical_coordinates=True)
        image = ants.resample_image(image, new_spacing, use_voxels=False, interp_type=0)
        if mask_img is not None:
            mask_img = ants.resample_image(mask_img, new_spacing, use_voxels=False, interp_type=1)
    if mask_img is not None:
        radius = max(1, int(round(opts.mask_dilation_mm / max(min(mask_img.spacing), 1e-6))))
        mask_img = ants.iMath(mask_img, "MD", radius)
    return image, mask_img


def _centroid_lps(mask_img) -> np.ndarray:
    """Physical (LPS mm) centroid of a binary ANTs image."""
    arr = mask_img.numpy() > 0  # (x, y, z) = (i, j, k)
    ijk = np.array(np.nonzero(arr), dtype=float).mean(axis=1)
    direction = np.asarray(mask_img.direction, dtype=float)
    return np.asarray(mask_img.origin) + direction @ (ijk * np.asarray(mask_img.spacing))


def register_ct(
    fixed_hu: np.ndarray,
    fixed_geometry: Geometry,
    moving_hu: np.ndarray,
    moving_geometry: Geometry,
    fixed_lung: Optional[np.ndarray] = None,
    moving_lung: Optional[np.ndarray] = None,
    options: Optional[RegistrationOptions] = None,
    progress: Optional[ProgressCallback] = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` (rigid, affine, SyN) and warp it onto the fixed grid.

    Parameters
    ----------
    fixed_hu, moving_hu
        CT in HU, ``[k, j, i]`` on their own grids.
    fixed_geometry, moving_geometry
        Their grids (LPS, mm).
    fixed_lung, moving_lung
        Optional lung labels/masks ``[k, j, i]`` (nonzero = lung) on each image's grid;
        used to crop, to mask the metric and to report the lung overlap.
    options
        :class:`RegistrationOptions`.
    progress
        ``progress(fraction, message)``; cancellation is honoured between stages.

    Returns
    -------
    RegistrationResult
        With the transforms in memory (the temporary ANTs folder is removed before returning).
    """
    opts = options or RegistrationOptions()
    opts.validate()
    prog = as_progress(progress)
    prog(0.0, "registration: preparing images")
    ants = _import_ants(opts.threads)
    fixed_img, fixed_mask = _prepare(fixed_hu, fixed_lung, fixed_geometry, opts)
    # The moving crop is larger: outside it the image reads 0 (= -1000 HU, lung-like), which
    # would pull the deformable stage wherever the fixed domain maps beyond the moving crop.
    has_masks = fixed_lung is not None and moving_lung is not None and np.any(moving_lung)
    moving_img, moving_mask = _prepare(moving_hu, moving_lung if has_masks else None, moving_geometry, opts,
                                       extra_margin_mm=opts.moving_extra_margin_mm)
    workdir = Path(tempfile.mkdtemp(prefix="perfusionai_prm_reg_"))
    try:
        prog(0.1, "registration: rigid + affine + SyN (ANTs)")
        if hasattr(ants.config, "_random_seed"):
            # ANTsPy appends --random-seed when this is set: repeatable metric sampling.
            ants.config._random_seed = int(opts.seed)
        initial = None
        if opts.margin_mm is not None and fixed_mask is not None and moving_mask is not None:
            # The crops differ, so the images' centres of mass do not correspond: initialise
            # with the lung centroids' translation (fixed point -> moving point) instead.
            shift = _centroid_lps(moving_mask) - _centroid_lps(fixed_mask)
            init_tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                                 translation=tuple(float(v) for v in shift))
            initial = str(workdir / "init_translation.mat")
            ants.write_transform(init_tx, initial)
        common = dict(initial_transform=initial, mask=fixed_mask, moving_mask=moving_mask, mask_all_stages=fixed_mask is not None,
                      aff_metric="mattes", aff_sampling=32, aff_random_sampling_rate=0.25,
                      aff_iterations=tuple(int(v) for v in opts.affine_iterations),
                      aff_shrink_factors=tuple(int(v) for v in opts.affine_shrink_factors),
                      aff_smoothing_sigmas=tuple(int(v) for v in opts.affine_smoothing_sigmas),
                      outprefix=str(workdir / "prm_reg_"), verbose=False)
        if opts.linear_only:
            reg = ants.registration(fixed_img, moving_img, type_of_transform="Affine", **common)
        else:
            reg = ants.registration(fixed_img, moving_img, type_of_transform="SyNRA",
                                    syn_metric=opts.syn_metric,
                                    syn_sampling=int(opts.cc_radius) if opts.syn_metric == "CC" else 32,
                                    reg_iterations=tuple(int(v) for v in opts.syn_iterations),
                                    grad_step=float(opts.syn_gradient_step), flow_sigma=3, total_sigma=0,
                                    **common)
        prog(0.8, "registration: warping onto the fixed grid")
        fixed_full = to_ants(np.asarray(fixed_hu, dtype=np.float32), fixed_geometry)
        moving_full = to_ants(np.asarray(moving_hu, dtype=np.float32), moving_geometry)
        warped = ants.apply_transforms(fixed_full, moving_full, reg["fwdtransforms"],
                                       interpolator="linear", defaultvalue=-1024.0)
        warped_arr = from_ants(warped).astype(np.float32)
        warped_lung = None
        dice_before = dice_after = None
        if moving_lung is not None and fixed_lung is not None and np.any(moving_lung):
            moving_lung_img = to_ants(np.asarray(moving_lung, dtype=np.float32), moving_geometry)
            warped_lung_img = ants.apply_transforms(fixed_full, moving_lung_img, reg["fwdtransforms"],
                                                    interpolator="genericLabel", defaultvalue=0)
            warped_lung = np.rint(from_ants(warped_lung_img)).astype(np.uint8)
            unmoved = ants.resample_image_to_target(moving_lung_img, fixed_full, interp_type="genericLabel")
            dice_before = dice(np.asarray(fixed_lung) > 0, np.asarray(from_ants(unmoved)) > 0)
            dice_after = dice(np.asarray(fixed_lung) > 0, warped_lung > 0)
        prog(1.0, "registration done")
        data = {}
        for path in dict.fromkeys(list(reg["fwdtransforms"]) + list(reg["invtransforms"])):
            if Path(path).is_file():
                data[_transform_name(path)] = Path(path).read_bytes()
        return RegistrationResult(
            warped=warped_arr, warped_lung=warped_lung,
            forward_transforms=[_transform_name(p) for p in reg["fwdtransforms"]],
            inverse_transforms=[_transform_name(p) for p in reg["invtransforms"]],
            transform_data=data, lung_dice_before=dice_before, lung_dice_after=dice_after,
            info={"registration_grid_spacing_mm": list(fixed_img.spacing),
                  "registration_grid_shape_xyz": list(fixed_img.shape)},
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _transform_name(path: str) -> str:
    """``.../prm_reg_0GenericAffine.mat`` -> ``0GenericAffine.mat``."""
    return Path(path).name.split("_reg_", 1)[-1]


def transform_points(points_lps: np.ndarray, transforms, whichtoinvert: Optional[Sequence[bool]] = None
                     ) -> np.ndarray:
    """Map LPS points (``(n, 3)`` mm) with ANTs transforms.

    ``transforms`` is a :class:`RegistrationResult` (its ``forward_transforms``) or a list of ANTs
    transform files. With a registration's forward transforms this maps fixed-space points to their
    corresponding moving-space positions (ANTs point convention: opposite to images).
    """
    import pandas as pd  # ANTsPy depends on pandas

    ants = _import_ants(int(os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")))
    pts = pd.DataFrame(np.asarray(points_lps, dtype=float), columns=["x", "y", "z"])
    if isinstance(transforms, RegistrationResult):
        with tempfile.TemporaryDirectory(prefix="perfusionai_prm_tx_") as tmp:
            files = []
            for name in transforms.forward_transforms:
                files.append(str(Path(tmp) / name))
                Path(files[-1]).write_bytes(transforms.transform_data[name])
            out = ants.apply_transforms_to_points(3, pts, files, whichtoinvert=whichtoinvert)
    else:
        out = ants.apply_transforms_to_points(3, pts, list(transforms), whichtoinvert=whichtoinvert)
    return out[["x", "y", "z"]].to_numpy()
