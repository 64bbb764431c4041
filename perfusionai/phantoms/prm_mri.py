"""Inspiratory multi-sequence lung MRI phantoms with a CT-derived reference PRM (Xu et al. setting).

Built on the paired CT PRM phantom of :mod:`perfusionai.phantoms.prm` (helper F): the
inspiratory/expiratory CT pair is made without deformation (already co-registered, as after the
paper's CT -> VIBE registration), random extra emphysema and air-trapping regions are painted
into both CT scans with the phantom's HU values, the **reference PRM** is computed from the CT
pair with :func:`perfusionai.prm.classification.classify_prm` (3x3x3 median, -950/-856 HU), and
four co-registered inspiratory MRI volumes are rendered from the tissue classes:

================  =========  ==============  ================  =============================
 tissue            VIBE (au)  blood volume v  perfusion f       why
================  =========  ==============  ================  =============================
 air / airway        0         0               0
 soft tissue       100         0.3             0.3
 vessels            70         4.0             3.0              bright blood pool
 normal lung        14         1.0             1.0              proton density ~14 % at TLC
 fSAD               13.3       0.6             0.45             near-normal at inspiration;
                                                                 hypoxic vasoconstriction
 emphysema           3         0.25            0.15             tissue and capillaries lost
 uncategorized      10         0.7             0.6
================  =========  ==============  ================  =============================

* VIBE = table value; post-contrast VIBE = VIBE x (1 + 0.15 v) (T1 shortening by the blood pool);
  IRmax = 60 v (maximum relative enhancement, %); PBF = 80 f (mL/100 mL/min).
* Partial volume: the signals are rendered on the CT grid and block-averaged onto the coarser MRI
  grid (``downsample`` voxels per axis), then blurred by a Gaussian PSF (0.5 MRI voxels for the
  VIBEs, 1.0 for the lower-resolution DCE maps).
* Coil shading: a smooth random multiplicative field (15-30 % for the VIBEs, 5 % for the
  quantitative maps, whose ratios cancel most receive-field shading).
* Noise: Gaussian (sigma 1.5 / 1.8 au, 8 %, 12 mL/100 mL/min).

So emphysema changes structural signal and perfusion, air trapping mainly perfusion: with IRmax and
PBF removed, fSAD is barely visible, which is what the ablation shows.

The reference PRM, lungs and lobes are taken to the MRI grid by block majority. Array axis order
is ``[k, j, i]`` everywhere (LPS geometry of :mod:`perfusionai.io`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..io import Geometry, Volume, write_volume
from .prm import make_prm_phantom

#: Tissue classes of the MRI rendering.
AIR, SOFT, VESSEL, NORMAL, FSAD, EMPH, UNCAT = range(7)
_VIBE = np.array([0.0, 100.0, 70.0, 14.0, 13.3, 3.0, 10.0], dtype=np.float32)
_BLOOD_VOLUME = np.array([0.0, 0.3, 4.0, 1.0, 0.6, 0.25, 0.7], dtype=np.float32)
_PERFUSION = np.array([0.0, 0.3, 3.0, 1.0, 0.45, 0.15, 0.6], dtype=np.float32)
#: (insp HU, exp HU) painted for extra disease regions (the CT phantom's values).
_DISEASE_HU = {FSAD: (-890.0, -900.0), EMPH: (-980.0, -975.0)}

SEQUENCE_FILES = {"vibe": "vibe", "post_vibe": "post_vibe", "irmax": "irmax", "pbf": "pbf"}


@dataclass
class PRMMRIPhantom:
    """One MRI phantom subject.

    Attributes
    ----------
    sequences
        ``{"vibe", "post_vibe", "irmax", "pbf"}`` -> float32 ``[k, j, i]`` on ``geometry``.
    lung_labels
        ``[k, j, i]`` uint8, 1 right lung, 2 left lung.
    lobes
        ``[k, j, i]`` uint8 lobes 1-6 (ARCHITECTURE.md).
    reference_prm
        ``[k, j, i]`` uint8 PRM labels 0-4 computed from the CT pair (0 outside the lung or excluded).
    tissue
        ``[k, j, i]`` uint8 dominant tissue class of the rendering (for checks).
    """

    subject: str
    geometry: Geometry
    sequences: dict
    lung_labels: np.ndarray
    lobes: np.ndarray
    reference_prm: np.ndarray
    tissue: np.ndarray
    parameters: dict = field(default_factory=dict)


def _block_mean(arr: np.ndarray, f: int) -> np.ndarray:
    k, j, i = (s // f for s in arr.shape)
    a = arr[:k * f, :j * f, :i * f].reshape(k, f, j, f, i, f)
    return a.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def _block_mode(labels: np.ndarray, f: int, n_labels: int) -> np.ndarray:
    """Most frequent label of each ``f^3`` block (ties to the lower label)."""
    counts = np.stack([_block_mean((labels == v).astype(np.float32), f) for v in range(n_labels)])
    return counts.argmax(axis=0).astype(np.uint8)


def _shading(shape, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative receive-field shading with mean ~1 and +-``amplitude`` range."""
    grids = np.meshgrid(*(np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape), indexing="ij")
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    ramp = sum(d * g for d, g in zip(direction, grids))
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.cos(np.pi * (grids[1] * rng.uniform(0.5, 1.0) + grids[2] * rng.uniform(0.5, 1.0)) + phase)
    field_ = 0.7 * ramp + 0.3 * wave
    return (1.0 + amplitude * field_ / (np.abs(field_).max() + 1e-9)).astype(np.float32)


def make_prm_mri_phantom(
    subject: str = "mri000",
    ct_shape: tuple[int, int, int] = (32, 56, 64),
    ct_spacing_mm: float = 5.25,
    downsample: int = 2,
    emphysema_scale: Optional[float] = None,
    extra_emphysema: Optional[int] = None,
    extra_fsad: Optional[int] = None,
    noise: float = 1.0,
    seed: int = 0,
) -> PRMMRIPhantom:
    """Build one subject.

    Parameters
    ----------
    ct_shape, ct_spacing_mm
        Grid ``(k, j, i)`` and isotropic spacing (mm) of the underlying CT phantom.
    downsample
        CT voxels per MRI voxel along each axis (2: a 32x56x64 CT gives a 16x28x32 MRI grid).
    emphysema_scale
        Radius multiplier of the CT phantom's two apical emphysema regions (None: random 0-1.6).
    extra_emphysema, extra_fsad
        Number of extra random spherical regions (None: random 0-3 each).
    noise
        Multiplier of all MRI noise levels (0 = noise free).
    seed
        Seeds every random choice of this subject.
    """
    rng = np.random.default_rng(seed)
    if emphysema_scale is None:
        emphysema_scale = float(rng.uniform(0.0, 1.6))
    n_emph = int(rng.integers(0, 4)) if extra_emphysema is None else int(extra_emphysema)
    n_fsad = int(rng.integers(0, 4)) if extra_fsad is None else int(extra_fsad)
    ct = make_prm_phantom(ct_shape, ct_spacing_mm, noise_hu=15.0, deform=False,
                          emphysema_scale=emphysema_scale, seed=int(rng.integers(0, 2**31)))
    insp = ct.insp.array.astype(np.float32).copy()
    expi = ct.exp.array.astype(np.float32).copy()
    lung = ct.lung_labels > 0

    # Tissue classes on the CT grid, from the phantom's truth (noise free).
    tissue = np.where(insp > -500.0, SOFT, AIR).astype(np.uint8)
    tissue[lung] = VESSEL
    truth_to_tissue = np.array([VESSEL, NORMAL, FSAD, EMPH, UNCAT], dtype=np.uint8)
    tissue[lung] = truth_to_tissue[ct.truth_prm[lung]]
    parenchyma = lung & (ct.truth_prm > 0)

    # Random extra disease regions painted into both CT scans (so the reference PRM sees them).
    spacing = np.asarray(ct.geometry.spacing, dtype=np.float32)
    kk, jj, ii = np.nonzero(parenchyma)
    regions = []
    for cls, count in ((FSAD, n_fsad), (EMPH, n_emph)):
        for _ in range(count):
            if kk.size == 0:
                break
            c = int(rng.integers(0, kk.size))
            centre = np.array([kk[c], jj[c], ii[c]], dtype=np.float32)
            radius_mm = float(rng.uniform(12.0, 30.0))
            kg, jg, ig = np.ogrid[:ct_shape[0], :ct_shape[1], :ct_shape[2]]
            d2 = (((kg - centre[0]) * spacing[2]) ** 2 + ((jg - centre[1]) * spacing[1]) ** 2
                  + ((ig - centre[2]) * spacing[0]) ** 2)
            blob = (d2 <= radius_mm ** 2) & parenchyma
            hu_i, hu_e = _DISEASE_HU[cls]
            insp[blob] = hu_i + rng.normal(0.0, 15.0, int(blob.sum()))
            expi[blob] = hu_e + rng.normal(0.0, 15.0, int(blob.sum()))
            tissue[blob] = cls
            regions.append({"class": "emph" if cls == EMPH else "fsad", "centre_kji": centre.tolist(),
                            "radius_mm": radius_mm})

    from ..prm.classification import classify_prm

    reference_ct = classify_prm(insp, expi, lung)

    # MRI signals on the CT grid, then partial volume onto the MRI grid.
    f = int(downsample)
    vibe_fine = _VIBE[tissue]
    blood = _BLOOD_VOLUME[tissue]
    perf = _PERFUSION[tissue]
    fine = {
        "vibe": vibe_fine,
        "post_vibe": vibe_fine * (1.0 + 0.15 * blood),
        "irmax": 60.0 * blood,
        "pbf": 80.0 * perf,
    }
    psf = {"vibe": 0.5, "post_vibe": 0.5, "irmax": 1.0, "pbf": 1.0}
    shading_amp = {"vibe": float(rng.uniform(0.15, 0.3)), "post_vibe": float(rng.uniform(0.15, 0.3)),
                   "irmax": 0.05, "pbf": 0.05}
    sigma = {"vibe": 1.5, "post_vibe": 1.8, "irmax": 8.0, "pbf": 12.0}
    sequences = {}
    for name, arr in fine.items():
        coarse = _block_mean(arr, f) if f > 1 else arr.astype(np.float32)
        coarse = ndimage.gaussian_filter(coarse, psf[name])
        coarse = coarse * _shading(coarse.shape, shading_amp[name], rng)
        if noise > 0:
            coarse = coarse + rng.normal(0.0, sigma[name] * noise, coarse.shape).astype(np.float32)
        sequences[name] = np.clip(coarse, 0.0, None).astype(np.float32)

    if f > 1:
        lung_labels = _block_mode(ct.lung_labels, f, 3)
        lobes = _block_mode(ct.lobes, f, 7)
        lobes[lung_labels == 0] = 0
        lung_labels[lobes == 0] = 0
        prm = _block_mode(np.where(lung, reference_ct, 0), f, 5)
        # a lung voxel whose block is mostly excluded (vessel) stays 0; keep the majority class otherwise
        prm[lung_labels == 0] = 0
        tissue_mri = _block_mode(tissue, f, 7)
        sp = tuple(float(s) * f for s in ct.geometry.spacing)
        shape = lung_labels.shape
        origin = tuple(float(o) + 0.5 * (f - 1) * s for o, s in zip(ct.geometry.origin, ct.geometry.spacing))
        geometry = Geometry(shape, sp, origin, ct.geometry.direction)
    else:
        lung_labels, lobes, prm, tissue_mri = ct.lung_labels, ct.lobes, reference_ct, tissue
        geometry = ct.geometry
    params = {"emphysema_scale": emphysema_scale, "extra_regions": regions, "ct_shape": list(ct_shape),
              "ct_spacing_mm": ct_spacing_mm, "downsample": f, "noise": noise, "seed": seed}
    return PRMMRIPhantom(subject, geometry, sequences, lung_labels.astype(np.uint8), lobes.astype(np.uint8),
                         prm.astype(np.uint8), tissue_mri.astype(np.uint8), params)


def make_prm_mri_cohort(n_subjects: int = 36, seed: int = 0, **kwargs) -> list[PRMMRIPhantom]:
    """``n_subjects`` independent subjects (ids ``mri000``, ``mri001``, ...); kwargs go to
    :func:`make_prm_mri_phantom`."""
    return [make_prm_mri_phantom(f"mri{n:03d}", seed=seed * 100003 + n, **kwargs) for n in range(int(n_subjects))]


def cohort_splits(n_subjects: int, fractions: Sequence[float] = (60, 14, 30), seed: int = 0) -> list[str]:
    """Random ``train``/``val``/``test`` assignment with the paper's 60/14/30 proportions."""
    fr = np.asarray(fractions, dtype=float) / float(np.sum(fractions))
    n_val = max(1, int(round(fr[1] * n_subjects)))
    n_test = max(1, int(round(fr[2] * n_subjects)))
    n_train = n_subjects - n_val - n_test
    labels = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test)
    rng = np.random.default_rng(seed)
    return list(labels[rng.permutation(n_subjects)])


COHORT_COLUMNS = ("subject", "split", "vibe", "post_vibe", "irmax", "pbf", "lung_mask", "lobes", "prm")


def write_cohort(phantoms: Sequence[PRMMRIPhantom], out_dir: str | Path,
                 splits: Optional[Sequence[str]] = None, drop: Optional[dict] = None) -> Path:
    """Write every subject's volumes as NIfTI and ``cohort.csv`` (columns :data:`COHORT_COLUMNS`,
    paths relative to the CSV).

    ``drop`` maps a subject id to sequence names left out of the CSV (an empty cell), to exercise
    missing inputs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = list(splits) if splits is not None else cohort_splits(len(phantoms))
    rows = []
    for ph, split in zip(phantoms, splits):
        sub = out / ph.subject
        row = {"subject": ph.subject, "split": split}
        for name, arr in ph.sequences.items():
            write_volume(arr, ph.geometry, sub / f"{SEQUENCE_FILES[name]}.nii.gz")
            row[name] = "" if drop and name in drop.get(ph.subject, ()) else f"{ph.subject}/{name}.nii.gz"
        write_volume(ph.lung_labels, ph.geometry, sub / "lung_mask.nii.gz", np.uint8)
        write_volume(ph.lobes, ph.geometry, sub / "lobes.nii.gz", np.uint8)
        write_volume(ph.reference_prm, ph.geometry, sub / "prm.nii.gz", np.uint8)
        row.update(lung_mask=f"{ph.subject}/lung_mask.nii.gz", lobes=f"{ph.subject}/lobes.nii.gz",
                   prm=f"{ph.subject}/prm.nii.gz")
        rows.append(row)
    # marks the folder as a phantom cohort: models trained on it are labelled "trained on phantoms"
    from ..cohorts import PHANTOM_COHORT_MARKER

    (out / PHANTOM_COHORT_MARKER).write_text('{"phantom": "perfusionai.phantoms.prm_mri", "subjects": %d}\n'
                                             % len(rows))
    csv_path = out / "cohort.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COHORT_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def phantom_volume(ph: PRMMRIPhantom, name: str) -> Volume:
    """One sequence of a phantom as a :class:`perfusionai.io.Volume`."""
    return Volume(ph.sequences[name], ph.geometry, None, {"phantom": f"prm mri {name}"})


def write_mri_cohort(out_dir: str | Path, n_subjects: int = 12, seed: int = 0, **kwargs) -> Path:
    """``prm phantom --mri-cohort``: ``n_subjects`` MRI-PRM phantoms with ``cohort.csv`` (train/val/test
    60/14/30) and the phantom-cohort marker, written atomically into ``out_dir``; returns the CSV path
    as it lies in ``out_dir``. ``prm train``, ``prm predict`` and ``prm ablation`` take the cohort as written.
    """
    from ..io import atomic_output_dir

    phantoms = make_prm_mri_cohort(n_subjects, seed=seed, **kwargs)
    with atomic_output_dir(out_dir) as stage:
        write_cohort(phantoms, stage, cohort_splits(n_subjects, seed=seed))
    return Path(out_dir) / "cohort.csv"
