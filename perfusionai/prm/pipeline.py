"""The whole CT PRM pipeline: checks, lung mask, registration, classification, statistics.

The model in the DIPY manner: ``PRMModel(options).fit(insp, exp, lung_mask=..., lobes=...)`` takes
two :class:`perfusionai.io.Volume` (inspiratory and expiratory CT in HU) and returns a
:class:`PRMFit` with ``.labels`` (the PRM map), ``.stats`` (%PRM per region), ``.summary()`` and
``.save(folder)`` (``prm.nii.gz``, ``exp_registered.nii.gz``, the transforms, ``lungs.nii.gz``,
``prm_stats.json``, ``prm_stats.csv``, ``prm_scatter.png``, ``prm_overlay.png``).
:func:`compute_prm` is the same as a function. Everything a fit holds is in memory (the ANTs
transforms too): there is nothing to clean up.

Reference grid: the inspiratory grid for the default ``exp_to_insp`` direction
(Xu et al.), the expiratory grid for ``insp_to_exp`` (Galban/CMI); a user lung or
lobe mask must lie on the reference grid and always replaces the automatic lung mask.
With registration switched off the two scans must already share one grid.

Input guards (each with an override in :class:`PRMOptions`): a scan that does not look like a CT
in Hounsfield units (``allow_non_hu``), and scans given the wrong way round, i.e. "inspiratory"
lungs smaller and denser than the "expiratory" ones (``allow_swapped``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ParameterError, PerfusionAIError, input_error
from ..io import Geometry, Volume, write_json, write_volume
from ..lung import body_midline_x, lung_sides, lungs_from_lobes, segment_lungs
from ..progress import ProgressCallback, as_progress
from .classification import ClassificationOptions, classify_prm
from .registration import RegistrationOptions
from .stats import prm_statistics, write_stats_csv

# Non-HU detection: a chest CT in HU has plenty of air (< -700 HU: lungs, outside air) and
# no large negative values beyond the scanner's padding (-3024 at the lowest).
_MIN_AIR_FRACTION = 0.02
_MIN_PLAUSIBLE_HU = -3100.0


class GuardError(PerfusionAIError):
    """An implausible input that an explicit override (an option of :class:`PRMOptions`) lets through.

    ``problem`` names the file(s) and what is wrong; ``override`` is the option's field name
    (the command line shows its flag instead).
    """

    def __init__(self, problem: str, override: str) -> None:
        super().__init__(f"{problem}; if this is right, set {override}")
        self.problem = problem
        self.override = override


@dataclass
class PRMOptions:
    """Options of :class:`PRMModel` / :func:`compute_prm`.

    Attributes
    ----------
    classification
        Thresholds, valid HU range and the median pre-filter (:class:`ClassificationOptions`).
    registration
        The ANTs recipe (:class:`perfusionai.prm.registration.RegistrationOptions`).
    register
        False when the scans are already aligned on one grid.
    allow_swapped
        Run even when the inspiratory lungs are smaller and denser than the expiratory ones.
    allow_non_hu
        Run even when a scan does not look like a CT in Hounsfield units.
    """

    classification: ClassificationOptions = field(default_factory=ClassificationOptions)
    registration: RegistrationOptions = field(default_factory=RegistrationOptions)
    register: bool = True
    allow_swapped: bool = False
    allow_non_hu: bool = False

    def to_dict(self) -> dict:
        return {"classification": self.classification.to_dict(),
                "registration": self.registration.to_dict() if self.register else None,
                "register": self.register, "allow_swapped": self.allow_swapped, "allow_non_hu": self.allow_non_hu}


@dataclass
class PRMFit:
    """Everything a PRM fit produces (arrays ``[k, j, i]`` on ``geometry``).

    Attributes
    ----------
    prm
        uint8 PRM labels 0-4 on the reference grid (also :attr:`labels`).
    geometry
        The reference grid (inspiratory for ``exp_to_insp``).
    fixed_hu, registered_hu
        The reference scan and the other scan warped onto it (HU, float32).
    lung_labels
        Lungs used (1 right, 2 left) on the reference grid.
    lobes
        Lobes 1-6 on the reference grid, or None.
    stats
        The ``prm_stats.json`` dictionary (%PRM of the whole lung, right, left and each lobe).
    info
        Direction, lung-mask source, lung volumes and mean HU of both scans, registration lung Dice,
        timings per stage (s), options.
    registration
        The :class:`perfusionai.prm.registration.RegistrationResult` (transforms in memory), or None.
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
    def labels(self) -> np.ndarray:
        """The PRM label map (0 excluded, 1 normal, 2 fSAD, 3 emphysema, 4 uncategorized)."""
        return self.prm

    @property
    def direction(self) -> str:
        return self.info.get("direction", "exp_to_insp")

    def insp_exp_on_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """``(insp HU, exp HU)`` on the reference grid, whichever was warped."""
        if self.direction == "exp_to_insp":
            return self.fixed_hu, self.registered_hu
        return self.registered_hu, self.fixed_hu

    def summary(self) -> dict:
        """Whole-lung %PRM: ``{"normal", "fsad", "emph", "uncategorized", "excluded"}`` in %, ``voxels``,
        ``volume_ml``; plus the registration's lung Dice when it ran."""
        whole = self.stats["whole_lung"]
        out = {k: whole[k] for k in ("normal", "fsad", "emph", "uncategorized", "excluded", "voxels", "volume_ml")}
        if self.info.get("lung_dice_after_registration") is not None:
            out["lung_dice_after_registration"] = self.info["lung_dice_after_registration"]
        return out

    def save(self, folder: str | Path, figures: bool = True, inputs: Sequence[str | Path] = ()) -> Path:
        """Write the standard outputs into ``folder`` atomically (see :func:`write_prm_outputs`);
        ``inputs`` are files the folder must not overwrite."""
        with _output_dir(folder, inputs) as stage:
            write_prm_outputs(self, stage, figures=figures)
        return Path(folder)

    def cleanup(self) -> None:
        """Nothing to clean up (kept for older callers)."""


#: The earlier name of :class:`PRMFit`.
PRMResult = PRMFit


def _output_dir(folder, inputs=()):
    """``io.atomic_output_dir`` refusing to overwrite any of ``inputs`` (the run's input files)."""
    from ..io import atomic_output_dir

    return atomic_output_dir(folder, inputs=[str(p) for p in inputs if p])


# ------------------------------------------------------------------------------ input checks


def check_ct_hu(volume: Volume, name: str, allow_non_hu: bool = False) -> None:
    """Refuse data that is not a CT in Hounsfield units (e.g. an MRI, or stored values without the
    DICOM rescale); NaN or infinite values and non-3D images are refused even with ``allow_non_hu``."""
    arr = np.asarray(volume.array)
    where = volume.path or name
    if arr.ndim != 3:
        raise input_error(where, f"{name} must be a 3D image, got {arr.ndim} dimensions")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise input_error(where, f"{name} contains {bad} NaN or infinite values")
    if allow_non_hu:
        return
    lo, hi = float(arr.min()), float(arr.max())
    if lo < _MIN_PLAUSIBLE_HU:
        raise GuardError(f"{where}: {name} has values down to {lo:.0f}, below any CT in Hounsfield units; "
                         f"is the rescale slope/intercept applied?", "allow_non_hu")
    air = float(np.mean(arr < -700))
    if air < _MIN_AIR_FRACTION:
        if lo >= -50 and hi > 1000:
            raise GuardError(f"{where}: {name} is not in Hounsfield units: its values run from {lo:.0f} to "
                             f"{hi:.0f} with no air below -700 HU, like stored CT values without the rescale "
                             f"(HU = value x slope + intercept, the intercept usually -1024)", "allow_non_hu")
        raise GuardError(f"{where}: {name} does not look like a chest CT in Hounsfield units: only "
                         f"{100 * air:.2f} % of voxels are below -700 HU (lungs and air are; "
                         f"an MRI or a non-HU image is refused)", "allow_non_hu")


def lung_volume_and_density(ct: Volume, lung: np.ndarray) -> tuple[float, float]:
    """(lung volume in mL, mean HU inside the lung) of one scan."""
    lung = np.asarray(lung) != 0
    voxel_ml = float(np.prod(ct.geometry.spacing)) / 1000.0
    n = int(lung.sum())
    return n * voxel_ml, (float(np.asarray(ct.array)[lung].mean()) if n else float("nan"))


def check_not_swapped(insp: Volume, exp: Volume, insp_lung: np.ndarray, exp_lung: np.ndarray,
                      allow_swapped: bool = False) -> dict:
    """Refuse a pair whose "inspiratory" lungs are both smaller and denser than the "expiratory" ones.

    At full inspiration the lungs hold more air than at expiration: larger and darker (lower HU).
    Returns ``{insp,exp}_lung_ml`` and ``{insp,exp}_lung_mean_hu`` for the record.
    """
    v_i, hu_i = lung_volume_and_density(insp, insp_lung)
    v_e, hu_e = lung_volume_and_density(exp, exp_lung)
    info = {"insp_lung_ml": v_i, "exp_lung_ml": v_e, "insp_lung_mean_hu": hu_i, "exp_lung_mean_hu": hu_e}
    if not allow_swapped and v_e > v_i and hu_e < hu_i:
        raise GuardError(f"{insp.path or 'inspiratory CT'} and {exp.path or 'expiratory CT'} look swapped: the "
                         f"expiratory lungs are larger ({v_e:.0f} vs {v_i:.0f} mL) and darker (mean {hu_e:.0f} vs "
                         f"{hu_i:.0f} HU) than the inspiratory ones; give the inspiratory scan as the "
                         f"inspiratory CT", "allow_swapped")
    return info


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
        raise input_error(b.path or "expiratory CT", f"the expiratory and inspiratory scans do not overlap in space "
                                             f"({100 * fraction:.1f} % of the smaller field of view is shared); "
                                             f"they must show the same chest in the same patient coordinates")
    return fraction


# ------------------------------------------------------------------------------ pipeline


class PRMModel:
    """CT parametric response mapping in the DIPY manner: options here, data in :meth:`fit`.

    ``PRMModel()`` uses the defaults (Galban 2012 thresholds -950/-856 HU, valid range
    [-1000, -500] HU, 3x3x3 median, the ``fast`` ANTs recipe); pass a :class:`PRMOptions`, or its
    fields as keywords (``PRMModel(register=False)``).
    """

    def __init__(self, options: Optional[PRMOptions] = None, **fields) -> None:
        if options is not None and fields:
            raise TypeError("give either options or keyword fields, not both")
        self.options = options if options is not None else PRMOptions(**fields)

    def __repr__(self) -> str:
        return f"PRMModel({self.options!r})"

    def fit(self, insp: Volume, exp: Volume, lung_mask: Optional[np.ndarray] = None,
            lobes: Optional[np.ndarray] = None, progress: Optional[ProgressCallback] = None) -> PRMFit:
        """PRM of one inspiratory/expiratory CT pair.

        Parameters
        ----------
        insp, exp
            CT volumes in HU (``array[k, j, i]`` with their geometry).
        lung_mask
            Optional lung mask or lung labels (1 right, 2 left) ``[k, j, i]`` on the reference grid;
            wins over the automatic lung mask.
        lobes
            Optional lobe labels 1-6 (project convention; see :func:`perfusionai.lung.import_lobes`
            for others) on the reference grid; without ``lung_mask`` the union of the lobes is the lung.
        progress
            ``progress(fraction, message)``; may raise :class:`perfusionai.errors.Cancelled`.
        """
        return _fit(insp, exp, lung_mask, lobes, self.options, progress)


def compute_prm(
    insp: Volume,
    exp: Volume,
    lung_mask: Optional[np.ndarray] = None,
    lobes: Optional[np.ndarray] = None,
    options: Optional[PRMOptions] = None,
    progress: Optional[ProgressCallback] = None,
) -> PRMFit:
    """``PRMModel(options).fit(insp, exp, lung_mask, lobes, progress)`` (see :meth:`PRMModel.fit`)."""
    return _fit(insp, exp, lung_mask, lobes, options or PRMOptions(), progress)


def _fit(insp, exp, lung_mask, lobes, opts: PRMOptions, progress) -> PRMFit:
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
    check_ct_hu(insp, "inspiratory CT", opts.allow_non_hu)
    check_ct_hu(exp, "expiratory CT", opts.allow_non_hu)
    check_overlap(insp, exp)
    if not opts.register and not insp.geometry.same_grid(exp.geometry):
        raise input_error(exp.path or "expiratory CT", "with registration switched off the expiratory CT must be "
                                                       f"on the inspiratory grid ({exp.geometry.describe()} vs "
                                                       f"{insp.geometry.describe()})")
    ref_geo = fixed.geometry
    if lung_mask is not None and tuple(np.shape(lung_mask)) != tuple(ref_geo.shape):
        raise ParameterError("lung_mask", f"lung mask shape {np.shape(lung_mask)} is not the {fixed_name} grid "
                                          f"{tuple(ref_geo.shape)}")
    if lobes is not None and tuple(np.shape(lobes)) != tuple(ref_geo.shape):
        raise ParameterError("lobes", f"lobe map shape {np.shape(lobes)} is not the {fixed_name} grid "
                                      f"{tuple(ref_geo.shape)}")

    start = time.perf_counter()
    prog(0.02, "lung mask")
    if lung_mask is not None:
        if not np.any(lung_mask):
            raise ParameterError("lung_mask", "the lung mask is empty (no nonzero voxel)")
        lung_labels = lung_sides(lung_mask, ref_geo, body_midline_x(fixed.array, ref_geo))
        lung_source = "user lung mask"
    elif lobes is not None:
        if not np.any(lobes):
            raise ParameterError("lobes", "the lobe map contains no lobe")
        lung_labels = lungs_from_lobes(lobes)
        lung_source = "user lobe map"
    else:
        lung_labels = segment_lungs(fixed.array, ref_geo)
        lung_source = f"automatic (threshold) from the {fixed_name}"
    if lobes is not None:
        lobes = np.asarray(lobes).astype(np.uint8)
    timings["lung_mask"] = time.perf_counter() - start

    info: dict = {"direction": direction, "reference_grid": fixed_name, "lung_mask_source": lung_source}
    start = time.perf_counter()
    prog(0.1, f"lung mask of the {moving_name}")
    try:
        moving_lung = segment_lungs(moving.array, moving.geometry)
    except PerfusionAIError:
        moving_lung = None  # registration still runs, unmasked on the moving side; no swap check
    timings["moving_lung_mask"] = time.perf_counter() - start
    if moving_lung is not None:
        insp_lung, exp_lung = (lung_labels, moving_lung) if fixed is insp else (moving_lung, lung_labels)
        info.update(check_not_swapped(insp, exp, insp_lung, exp_lung, opts.allow_swapped))
    registration = None
    if opts.register:
        from .registration import register_ct

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
    return PRMFit(prm=prm, geometry=ref_geo, fixed_hu=fixed_arr, registered_hu=registered,
                  lung_labels=lung_labels, lobes=lobes, stats=stats, info=info, registration=registration)


def write_prm_outputs(result: PRMFit, out_dir: Path, figures: bool = True) -> list[Path]:
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
        written.append(prm_overlay_png(result.fixed_hu, result.prm, out_dir / "prm_overlay.png",
                                       spacing=result.geometry.spacing))
    return written
