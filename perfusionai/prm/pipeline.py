"""The whole CT PRM pipeline: checks, lung mask, registration, classification, statistics.

:func:`compute_prm` takes two :class:`perfusionai.io.Volume` (inspiratory and
expiratory CT in HU) and returns a :class:`PRMResult`; :func:`write_prm_outputs`
writes ``prm.nii.gz``, ``exp_registered.nii.gz``, the transforms, ``prm_stats.json``,
``prm_stats.csv``, ``prm_scatter.png`` and ``prm_overlay.png``.

Reference grid: the inspiratory grid for the default ``exp_to_insp`` direction
(Xu et al.), the expiratory grid for ``insp_to_exp`` (Galban/CMI); a user lung or
lobe mask must lie on the reference grid and always replaces the automatic lung mask.
With registration switched off the two scans must already share one grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import PerfusionAIError, input_error
from ..io import Geometry, Volume, write_json, write_volume
from ..progress import ProgressCallback, as_progress
from ..lung import body_midline_x, lung_sides, lungs_from_lobes, segment_lungs
from .classification import ClassificationOptions, classify_prm
from .registration import RegistrationOptions
from .stats import prm_statistics, write_stats_csv

# Non-HU detection: a chest CT in HU has plenty of air (< -700 HU: lungs, outside air) and
# no large negative values beyond the scanner's padding (-3024 at the lowest).
_MIN_AIR_FRACTION = 0.02
_MIN_PLAUSIBLE_HU = -3100.0


@dataclass
class PRMOptions:
    """Options of :func:`compute_prm`."""

    classification: ClassificationOptions = field(default_factory=ClassificationOptions)
    registration: RegistrationOptions = field(default_factory=RegistrationOptions)
    register: bool = True

    def to_dict(self) -> dict:
        return {"classification": self.classification.to_dict(),
                "registration": self.registration.to_dict() if self.register else None,
                "register": self.register}


@dataclass
class PRMResult:
    """Everything :func:`compute_prm` produces (arrays ``[k, j, i]`` on ``geometry``).

    Attributes
    ----------
    prm
        uint8 PRM labels 0-4 on the reference grid.
    geometry
        The reference grid (inspiratory for ``exp_to_insp``).
    fixed_hu, registered_hu
        The reference scan and the other scan warped onto it (HU, float32).
    lung_labels
        Lungs used (1 right, 2 left) on the reference grid.
    lobes
        Lobes 1-6 on the reference grid, or None.
    stats
        The ``prm_stats.json`` dictionary.
    info
        Direction, lung-mask source, registration lung Dice, timings per stage (s), options.
    registration
        The :class:`perfusionai.prm.registration.RegistrationResult` (transform files), or None.
    """

    prm: np.ndarray
    geometry: Geometry
    fixed_hu: np.ndarray
    registered_hu: np.ndarray
    lung_labels: np.ndarray
    lobes: Optional[np.ndarray]
    stats: dict
    info: dict
    registration: Optional[object] = None

    @property
    def direction(self) -> str:
        return self.info.get("direction", "exp_to_insp")

    def insp_exp_on_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """``(insp HU, exp HU)`` on the reference grid, whichever was warped."""
        if self.direction == "exp_to_insp":
            return self.fixed_hu, self.registered_hu
        return self.registered_hu, self.fixed_hu

    def cleanup(self) -> None:
        if self.registration is not None:
            self.registration.cleanup()


# ------------------------------------------------------------------------------ input checks


def check_ct_hu(volume: Volume, name: str) -> None:
    """Refuse data that is not a CT in Hounsfield units (e.g. an MRI given as CT)."""
    arr = np.asarray(volume.array)
    where = volume.path or name
    if arr.ndim != 3:
        raise input_error(where, f"{name} must be a 3D image, got {arr.ndim} dimensions")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise input_error(where, f"{name} contains NaN or infinite values")
    lo = float(arr.min())
    if lo < _MIN_PLAUSIBLE_HU:
        raise input_error(where, f"{name} has values down to {lo:.0f}, below any CT in Hounsfield units; "
                                 f"is the rescale slope/intercept applied?")
    air = float(np.mean(arr < -700))
    if air < _MIN_AIR_FRACTION:
        raise input_error(where, f"{name} does not look like a chest CT in Hounsfield units: only "
                                 f"{100 * air:.2f} % of voxels are below -700 HU (lungs and air are; "
                                 f"an MRI or a non-HU image is refused)")


def _bounds_lps(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, geometry.shape[2] - 0.5)
                        for j in (-0.5, geometry.shape[1] - 0.5) for k in (-0.5, geometry.shape[0] - 0.5)])
    pts = (geometry.ijk_to_lps() @ corners.T).T[:, :3]
    return pts.min(axis=0), pts.max(axis=0)


def check_overlap(a: Volume, b: Volume, min_fraction: float = 0.1) -> float:
    """Fraction of the smaller scan's bounding box inside the other one's; refuses < ``min_fraction``."""
    lo_a, hi_a = _bounds_lps(a.geometry)
    lo_b, hi_b = _bounds_lps(b.geometry)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None).prod()
    smaller = min((hi_a - lo_a).prod(), (hi_b - lo_b).prod())
    fraction = float(inter / smaller) if smaller > 0 else 0.0
    if fraction < min_fraction:
        raise input_error(b.path or "--exp", f"the expiratory and inspiratory scans do not overlap in space "
                                             f"({100 * fraction:.1f} % of the smaller field of view is shared); "
                                             f"they must show the same chest in the same patient coordinates")
    return fraction


# ------------------------------------------------------------------------------ pipeline


def compute_prm(
    insp: Volume,
    exp: Volume,
    lung_mask: Optional[np.ndarray] = None,
    lobes: Optional[np.ndarray] = None,
    options: Optional[PRMOptions] = None,
    progress: Optional[ProgressCallback] = None,
) -> PRMResult:
    """Parametric response map of an inspiratory/expiratory CT pair.

    Parameters
    ----------
    insp, exp
        CT volumes in HU (``array[k, j, i]`` with their geometry).
    lung_mask
        Optional lung mask or lung labels (1 right, 2 left) on the reference grid; wins over the
        automatic lung mask.
    lobes
        Optional lobe labels 1-6 (project convention, see :mod:`perfusionai.lung.lobes`) on the
        reference grid; without ``lung_mask`` the union of the lobes is the lung.
    options
        :class:`PRMOptions`.
    progress
        ``progress(fraction, message)``; may raise :class:`perfusionai.errors.Cancelled`.

    Returns
    -------
    PRMResult
    """
    opts = options or PRMOptions()
    opts.classification.validate()
    if opts.register:
        opts.registration.validate()
    prog = as_progress(progress)
    timings: dict[str, float] = {}
    direction = opts.registration.direction if opts.register else "exp_to_insp"
    fixed, moving = (insp, exp) if direction == "exp_to_insp" else (exp, insp)
    fixed_name, moving_name = ("inspiratory CT", "expiratory CT") if direction == "exp_to_insp" \
        else ("expiratory CT", "inspiratory CT")

    prog(0.0, "checking inputs")
    check_ct_hu(insp, "inspiratory CT")
    check_ct_hu(exp, "expiratory CT")
    check_overlap(insp, exp)
    if not opts.register and not insp.geometry.same_grid(exp.geometry):
        raise input_error(exp.path or "--exp", "with registration switched off the expiratory CT must be on the "
                                               f"inspiratory grid ({exp.geometry.describe()} vs "
                                               f"{insp.geometry.describe()})")
    ref_geo = fixed.geometry
    if lung_mask is not None and tuple(np.shape(lung_mask)) != tuple(ref_geo.shape):
        raise input_error("--lung-mask", f"lung mask shape {np.shape(lung_mask)} is not the {fixed_name} grid "
                                         f"{tuple(ref_geo.shape)}")
    if lobes is not None and tuple(np.shape(lobes)) != tuple(ref_geo.shape):
        raise input_error("--lobes", f"lobe map shape {np.shape(lobes)} is not the {fixed_name} grid "
                                     f"{tuple(ref_geo.shape)}")

    start = time.perf_counter()
    prog(0.02, "lung mask")
    if lung_mask is not None:
        if not np.any(lung_mask):
            raise input_error("--lung-mask", "the lung mask is empty (no nonzero voxel)")
        lung_labels = lung_sides(lung_mask, ref_geo, body_midline_x(fixed.array, ref_geo))
        lung_source = "user lung mask"
    elif lobes is not None:
        if not np.any(lobes):
            raise input_error("--lobes", "the lobe map contains no lobe")
        lobes_arr = np.asarray(lobes)
        lung_labels = lungs_from_lobes(lobes_arr)
        lung_source = "user lobe map"
    else:
        lung_labels = segment_lungs(fixed.array, ref_geo)
        lung_source = f"automatic (threshold) from the {fixed_name}"
    if lobes is not None:
        lobes = np.asarray(lobes).astype(np.uint8)
    timings["lung_mask"] = time.perf_counter() - start

    info: dict = {"direction": direction, "reference_grid": fixed_name, "lung_mask_source": lung_source}
    registration = None
    if opts.register:
        from .registration import register_ct

        start = time.perf_counter()
        prog(0.1, f"lung mask of the {moving_name}")
        try:
            moving_lung = segment_lungs(moving.array, moving.geometry)
        except PerfusionAIError:
            moving_lung = None  # registration still runs, unmasked on the moving side
        timings["moving_lung_mask"] = time.perf_counter() - start
        start = time.perf_counter()
        registration = register_ct(fixed.array, ref_geo, moving.array, moving.geometry, lung_labels, moving_lung,
                                   opts.registration, prog.sub(0.15, 0.85))
        timings["registration"] = time.perf_counter() - start
        registered = registration.warped
        info["lung_dice_before_registration"] = registration.lung_dice_before
        info["lung_dice_after_registration"] = registration.lung_dice_after
        info["registration"] = registration.info
    else:
        registered = np.asarray(moving.array, dtype=np.float32)
        info["registration"] = "off (scans already aligned)"

    prog(0.87, "classification")
    start = time.perf_counter()
    fixed_arr = np.asarray(fixed.array, dtype=np.float32)
    insp_arr, exp_arr = (fixed_arr, registered) if direction == "exp_to_insp" else (registered, fixed_arr)
    prm = classify_prm(insp_arr, exp_arr, lung_labels > 0, opts.classification)
    timings["classification"] = time.perf_counter() - start

    prog(0.95, "statistics")
    start = time.perf_counter()
    voxel_ml = float(np.prod(ref_geo.spacing)) / 1000.0
    stats = prm_statistics(prm, lung_labels, lobes, voxel_ml)
    timings["statistics"] = time.perf_counter() - start
    info["timings_s"] = timings
    info["options"] = opts.to_dict()
    prog(1.0, "PRM done")
    return PRMResult(prm=prm, geometry=ref_geo, fixed_hu=fixed_arr, registered_hu=registered,
                     lung_labels=lung_labels, lobes=lobes, stats=stats, info=info, registration=registration)


def write_prm_outputs(result: PRMResult, out_dir: Path, figures: bool = True) -> list[Path]:
    """Write the standard outputs into ``out_dir`` (normally an atomic staging folder)."""
    out_dir = Path(out_dir)
    written = [write_volume(result.prm, result.geometry, out_dir / "prm.nii.gz", dtype=np.uint8)]
    moved = "exp" if result.direction == "exp_to_insp" else "insp"
    written.append(write_volume(result.registered_hu, result.geometry, out_dir / f"{moved}_registered.nii.gz",
                                dtype=np.float32))
    written.append(write_volume(result.lung_labels, result.geometry, out_dir / "lungs.nii.gz", dtype=np.uint8))
    info = dict(result.info)
    if result.registration is not None:
        names = result.registration.save_transforms(out_dir, prefix=f"{result.direction}_")
        info["transforms"] = names
        written += [out_dir / n for n in names]
    stats = dict(result.stats)
    stats["info"] = info
    written.append(write_json(stats, out_dir / "prm_stats.json"))
    written.append(write_stats_csv(result.stats, out_dir / "prm_stats.csv"))
    if figures:
        from .figures import prm_overlay_png, prm_scatter_png

        insp_hu, exp_hu = result.insp_exp_on_grid()
        opts = ClassificationOptions(**result.info["options"]["classification"])
        written.append(prm_scatter_png(insp_hu, exp_hu, result.lung_labels > 0, out_dir / "prm_scatter.png", opts))
        written.append(prm_overlay_png(result.fixed_hu, result.prm, out_dir / "prm_overlay.png"))
    return written
