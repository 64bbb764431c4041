"""Diffusion-relaxation phantom: a multi-b, multi-TE 4D series with known T2-IVIM-Kurtosis maps.

The series follows the advanced protocol of Macarro et al. (2025): 7 b-values (0, 50, 100, 400,
900, 1200, 1600 s/mm^2) at each of 3 echo times (80, 105, 120 ms), 21 volumes in TE-major order;
the clinical protocol (b 0-900 at the minimum TE) is a subset (:meth:`DRPhantom.clinical`).

Layout (axial slices ``[k, j, i]``): an elliptical abdomen of liver-like tissue inside a muscle
rim, a kidney-like high-perfusion region and a tumour whose microstructure varies continuously
between a cellular rim (low Dt, high K, intermediate T2) and a necrotic core (high Dt, low K, long
T2) through a smooth random mixing field, the "tumour-like heterogeneity". Every tissue parameter
is further modulated by smooth random fields (+-8 %). Rician noise of standard deviation
``sigma = S(b=0, TE_min of liver) / snr`` is added to the magnitude signal.

Units: b s/mm^2, TE and T2 ms, Dv/Dt um^2/ms, f and K dimensionless, S0 arbitrary.
A cohort of "patients" (:func:`make_dr_cohort`) varies the tumour's size, position, composition
and its prototypes' parameters from patient to patient.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..dr.models import ADVANCED_MAPS, Protocol, t2ivimkurtosis
from ..io import Geometry

#: Tissue prototypes: (label, name, s0, f, dv, t2v, dt, k, t2t).
TISSUES = {
    "liver": (1, 1000.0, 0.22, 35.0, 190.0, 1.15, 0.75, 48.0),
    "muscle": (2, 900.0, 0.07, 22.0, 170.0, 1.55, 0.45, 36.0),
    "kidney": (3, 1100.0, 0.30, 45.0, 200.0, 1.90, 0.40, 80.0),
    "tumour_cellular": (4, 1050.0, 0.12, 18.0, 200.0, 0.85, 1.25, 62.0),
    "tumour_necrotic": (5, 1150.0, 0.05, 12.0, 225.0, 2.10, 0.30, 110.0),
}
LABEL_NAMES = {0: "background", 1: "liver", 2: "muscle", 3: "kidney", 4: "tumour"}


@dataclass
class DRPhantom:
    """A diffusion-relaxation phantom with known maps.

    Attributes
    ----------
    dwi
        ``[k, j, i, n]`` float32 magnitude series (n = 21, TE-major order of ``protocol``).
    protocol
        b-values (s/mm^2) and echo times (ms) of the volumes.
    truth
        name -> ``[k, j, i]`` true T2-IVIM-Kurtosis parameters (``s0, f, dv, t2v, dt, k, t2t``);
        zero outside the body.
    labels
        ``[k, j, i]`` int16: 0 background, 1 liver, 2 muscle, 3 kidney, 4 tumour.
    tumour_mix
        ``[k, j, i]`` necrotic fraction of the tumour (0 cellular .. 1 necrotic), 0 elsewhere.
    noise_sigma
        Rician noise standard deviation (signal units); 0 for a noise-free phantom.
    """

    dwi: np.ndarray
    protocol: Protocol
    truth: dict
    labels: np.ndarray
    tumour_mix: np.ndarray
    geometry: Geometry
    noise_sigma: float
    name: str = "patient"
    info: dict = field(default_factory=dict)

    @property
    def body(self) -> np.ndarray:
        return self.labels > 0

    @property
    def tumour(self) -> np.ndarray:
        return self.labels == 4

    def clinical(self) -> tuple[np.ndarray, Protocol]:
        """The clinical protocol's volumes ``[k, j, i, 5]`` and their protocol."""
        idx = self.protocol.clinical_indices()
        return self.dwi[..., idx], Protocol(self.protocol.bvals[idx], self.protocol.tes[idx])


def _smooth_field(rng: np.random.Generator, shape, sigma_vox: Sequence[float]) -> np.ndarray:
    """Smooth zero-mean, unit-SD random field ``[k, j, i]`` (Gaussian-filtered white noise)."""
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="reflect")
    return (x - x.mean()) / (x.std() + 1e-12)


def make_dr_phantom(
    shape: tuple[int, int, int] = (4, 40, 40),
    snr: Optional[float] = 60.0,
    seed: int = 0,
    spacing: tuple[float, float, float] = (2.0, 2.0, 5.0),
    protocol: Optional[Protocol] = None,
    tumour_centre: Optional[tuple[float, float]] = None,
    tumour_radius: Optional[float] = None,
    necrotic_share: Optional[float] = None,
    prototype_scale: Optional[dict] = None,
    heterogeneity: float = 0.08,
    name: str = "patient",
) -> DRPhantom:
    """Simulate one diffusion-relaxation phantom (see the module doc).

    Parameters
    ----------
    shape
        ``(k, j, i)`` voxels.
    snr
        S(b=0, TE_min) of liver over the Rician noise SD; None or inf for noise-free signals.
    seed
        Random seed of the layout, the heterogeneity fields and the noise.
    protocol
        b-values/TEs; default :meth:`Protocol.advanced` (21 volumes).
    tumour_centre, tumour_radius
        In-plane tumour centre as fractions of ``(j, i)`` and radius as a fraction of the in-plane
        size; random when None.
    necrotic_share
        Mean necrotic fraction of the tumour (0..1); random when None.
    prototype_scale
        Optional parameter name -> multiplicative factor applied to both tumour prototypes
        (patient-to-patient variation of the cohort).
    heterogeneity
        Relative SD of the smooth parameter modulation in every tissue.
    """
    rng = np.random.default_rng(seed)
    protocol = protocol or Protocol.advanced()
    nk, nj, ni = shape
    jj, ii = np.meshgrid(np.linspace(-1, 1, nj), np.linspace(-1, 1, ni), indexing="ij")
    body2d = (jj / 0.85) ** 2 + (ii / 0.95) ** 2 <= 1.0
    inner2d = (jj / 0.72) ** 2 + (ii / 0.82) ** 2 <= 1.0
    kidney2d = ((jj - 0.35) / 0.18) ** 2 + ((ii + 0.55) / 0.14) ** 2 <= 1.0
    if tumour_centre is None:
        tumour_centre = (rng.uniform(-0.3, 0.15), rng.uniform(-0.1, 0.45))
    if tumour_radius is None:
        tumour_radius = rng.uniform(0.22, 0.32)
    if necrotic_share is None:
        necrotic_share = rng.uniform(0.25, 0.6)
    tj, ti = tumour_centre
    r2d = np.sqrt((jj - tj) ** 2 + (ii - ti) ** 2) / tumour_radius
    kk = np.linspace(-1, 1, nk)[:, None, None] if nk > 1 else np.zeros((1, 1, 1))
    # the tumour is an ellipsoid: smaller on the outer slices
    r3d = np.sqrt(r2d[None] ** 2 + (kk / 1.6) ** 2)
    labels = np.zeros(shape, np.int16)
    labels[:, body2d] = 2
    labels[:, inner2d] = 1
    labels[:, kidney2d & inner2d] = 3
    tumour = (r3d <= 1.0) & inner2d[None]
    labels[tumour] = 4

    # necrotic fraction: high in the core, patchy (smooth random field), within [0, 1]
    field_mix = _smooth_field(rng, shape, (0.6, 2.5, 2.5))
    core = np.clip(1.0 - r3d, 0.0, 1.0)
    mix = 1.0 / (1.0 + np.exp(-(2.2 * field_mix + 4.0 * (core - 0.5) + 3.0 * (necrotic_share - 0.45))))
    mix = np.where(tumour, mix, 0.0)

    truth = {name_: np.zeros(shape) for name_ in ADVANCED_MAPS}
    by_label = {1: "liver", 2: "muscle", 3: "kidney"}
    for label, tissue in by_label.items():
        values = TISSUES[tissue][1:]
        sel = labels == label
        for name_, v in zip(ADVANCED_MAPS, values):
            truth[name_][sel] = v
    cell = np.asarray(TISSUES["tumour_cellular"][1:])
    necr = np.asarray(TISSUES["tumour_necrotic"][1:])
    for pi, name_ in enumerate(ADVANCED_MAPS):
        factor = (prototype_scale or {}).get(name_, 1.0)
        values = (1 - mix) * cell[pi] + mix * necr[pi]
        truth[name_][tumour] = (values * factor)[tumour]
    for name_ in ADVANCED_MAPS:
        modulation = 1.0 + heterogeneity * np.clip(_smooth_field(rng, shape, (0.8, 3.0, 3.0)), -2.5, 2.5)
        truth[name_] = np.where(labels > 0, truth[name_] * modulation, 0.0)
    # keep truths strictly inside the fitter's default bounds and the kurtosis monotonic up to b_max
    truth["f"] = np.clip(truth["f"], 0.0, 0.9)
    truth["t2v"] = np.clip(truth["t2v"], 155.0, 245.0)
    b_max = float(np.max(protocol.bvals)) / 1000.0
    truth["k"] = np.minimum(truth["k"], 2.5 / (b_max * np.maximum(truth["dt"], 1e-6)))

    body = labels > 0
    clean = np.zeros(tuple(shape) + (protocol.n,))
    clean[body] = t2ivimkurtosis(protocol.bvals, protocol.tes, *(truth[n][body] for n in ADVANCED_MAPS))
    sigma = 0.0
    if snr is not None and np.isfinite(snr):
        liver = TISSUES["liver"]
        sigma = liver[1] * (liver[2] * np.exp(-protocol.tes.min() / liver[4])
                            + (1 - liver[2]) * np.exp(-protocol.tes.min() / liver[7])) / float(snr)
        real = clean + rng.normal(0.0, sigma, clean.shape)
        imag = rng.normal(0.0, sigma, clean.shape)
        dwi = np.sqrt(real * real + imag * imag)
    else:
        dwi = clean
    geometry = Geometry(tuple(shape), tuple(float(s) for s in spacing),
                        (-spacing[0] * ni / 2, -spacing[1] * nj / 2, 0.0))
    return DRPhantom(dwi.astype(np.float32), protocol, truth, labels, mix, geometry, float(sigma), name,
                     info={"seed": seed, "snr": snr, "tumour_radius": float(tumour_radius),
                           "necrotic_share": float(necrotic_share)})


def make_dr_cohort(
    n_patients: int = 8,
    shape: tuple[int, int, int] = (4, 40, 40),
    snr: Optional[float] = 60.0,
    seed: int = 0,
    variation: float = 0.06,
) -> list[DRPhantom]:
    """A cohort of phantoms ("patients") with different tumours.

    Each patient has its own tumour position, size and necrotic share, and its tumour prototypes'
    parameters are scaled by patient-specific factors drawn from N(1, ``variation``).
    """
    rng = np.random.default_rng(seed)
    cohort = []
    for p in range(n_patients):
        scale = {name: float(np.clip(rng.normal(1.0, variation), 0.8, 1.2)) for name in ADVANCED_MAPS if name != "s0"}
        cohort.append(make_dr_phantom(shape=shape, snr=snr, seed=int(rng.integers(0, 2 ** 31)),
                                      prototype_scale=scale, name=f"patient{p + 1:02d}"))
    return cohort


def write_dr_cohort(cohort: Sequence[DRPhantom], folder: str | Path, truth: bool = False,
                    clinical: bool = False) -> Path:
    """Write each patient's 4D series, bvals, TEs and tumour mask, and ``cohort.csv`` listing them.

    ``cohort.csv`` columns: ``patient, dwi, bvals, tes, mask`` (paths relative to the CSV), the
    input of ``perfusionai dr train`` and ``perfusionai dr evaluate``. ``truth``: also
    ``truth_<map>.nii.gz`` per patient; ``clinical``: also the clinical-protocol series
    (``clinical.nii.gz``, b 0, 50, 100, 400, 900 s/mm2 at the minimum TE) with ``clinical_bvals``
    and ``clinical_tes``, the input of ``perfusionai dr predict``. Returns the CSV path.
    """
    from ..io import write_series, write_volume

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for ph in cohort:
        d = folder / ph.name
        d.mkdir(exist_ok=True)
        write_series(ph.dwi, ph.geometry, d / "dwi.nii.gz")
        (d / "bvals").write_text(" ".join(f"{b:g}" for b in ph.protocol.bvals) + "\n")
        (d / "tes").write_text(" ".join(f"{t:g}" for t in ph.protocol.tes) + "\n")
        write_volume(ph.tumour.astype(np.uint8), ph.geometry, d / "tumour.nii.gz")
        if truth:
            for name, values in ph.truth.items():
                write_volume(np.asarray(values, np.float32), ph.geometry, d / f"truth_{name}.nii.gz")
        if clinical:
            series, protocol = ph.clinical()
            write_series(series, ph.geometry, d / "clinical.nii.gz")
            (d / "clinical_bvals").write_text(" ".join(f"{b:g}" for b in protocol.bvals) + "\n")
            (d / "clinical_tes").write_text(" ".join(f"{t:g}" for t in protocol.tes) + "\n")
        rows.append([ph.name, f"{ph.name}/dwi.nii.gz", f"{ph.name}/bvals", f"{ph.name}/tes", f"{ph.name}/tumour.nii.gz"])
    csv_path = folder / "cohort.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient", "dwi", "bvals", "tes", "mask"])
        w.writerows(rows)
    from ..cohorts import PHANTOM_COHORT_MARKER

    (folder / PHANTOM_COHORT_MARKER).write_text('{"generator": "perfusionai.phantoms.dr"}\n')
    return csv_path
