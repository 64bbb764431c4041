"""Chest CT phantoms with paired SPECT-like lung perfusion and known truth (DL-CTPM).

Everything is defined in physical LPS coordinates (mm; x towards the
patient's left, y posterior, z head), so a phantom can be sampled on any grid:
anisotropic, oblique, any storage order. The patient lies supine (gravity
along +y).

CT (HU, ``ct_hu[k, j, i]``)
    air -1000 outside an elliptic body of soft tissue (40 HU); two lungs
    (right larger; a cardiac notch on the left); parenchyma -870 HU at the most
    anterior point rising to about -800 HU posteriorly (gravity-dependent
    density); a tree of vessels (+40 HU blood, tapering) branching from each
    hilum; correlated tissue texture (about 5 HU SD) and scanner noise
    (``ct_noise_hu``, default 20 HU).
Lesions (they change CT *and* perfusion, so the CT carries what a network
needs, as in real disease)
    * emphysema: low-attenuation blobs (-975 HU with bullae at -1000, vessels
      pruned), perfusion x 0.25;
    * dense lung (fibrosis / consolidation): -250 HU blobs, perfusion x 0.3;
    * vascular defects (embolic wedges from the hilum to the pleura):
      mosaic oligaemia (-60 HU, vessels pruned), perfusion x 0.2.
Perfusion truth (``perfusion[k, j, i]`` on the CT grid, arbitrary units)
    ``lung * (1 + gravity * y_rel) * lesion factors``, smoothed by 2 mm;
    ``y_rel`` is 0 at the lung's most anterior and 1 at its most posterior point.
SPECT (counts, ``spect[k, j, i]`` on its own 4.42 mm isotropic grid)
    the truth averaged onto the SPECT grid, blurred by the system response
    (Gaussian, ``spect_fwhm_mm`` default 12 mm), scaled to ``mean_counts`` in
    the lung and Poisson-sampled (the count noise of a real acquisition).

:func:`make_ctpm_phantom` builds one; :func:`write_ctpm_cohort` writes a
cohort (NIfTI files + ``cohort.csv`` with columns ``ct, spect, lung_mask``) for
``perfusionai ctpm train``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..io import Geometry, atomic_output_dir, write_json, write_volume
from ..cohorts import PHANTOM_COHORT_MARKER

SPECT_VOXEL_MM = 4.42


@dataclass
class CTPMPhantom:
    """One synthetic patient.

    Attributes
    ----------
    ct_hu
        CT in HU, int16 ``[k, j, i]`` on ``geometry``.
    lung_labels
        uint8 ``[k, j, i]``: 1 right lung, 2 left lung.
    perfusion
        Noise-free, unblurred perfusion truth on the CT grid (0 outside the lung).
    spect
        SPECT counts (float32) on ``spect_geometry``.
    params
        Seed and the lesions drawn (centres in LPS mm, radii in mm).
    """

    ct_hu: np.ndarray
    geometry: Geometry
    lung_labels: np.ndarray
    perfusion: np.ndarray
    spect: np.ndarray
    spect_geometry: Geometry
    params: dict = field(default_factory=dict)


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def phantom_geometry(spacing_mm: Sequence[float] = (3.0, 3.0, 3.0),
                     fov_mm: Sequence[float] = (390.0, 300.0, 330.0),
                     rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
                     flip_k: bool = False) -> Geometry:
    """A grid centred on the body: ``fov_mm`` (x, y, z) covered by voxels of ``spacing_mm`` (i, j, k).

    ``rotation_deg`` tilts the grid (an oblique acquisition); ``flip_k`` stores
    the slices feet-first (the k axis then points to -z).
    """
    spacing = np.asarray(spacing_mm, dtype=float)
    shape_ijk = np.maximum(np.round(np.asarray(fov_mm, dtype=float) / spacing).astype(int), 8)
    direction = _rotation(rotation_deg)
    if flip_k:
        direction = direction @ np.diag([1.0, 1.0, -1.0])
    centre_index = (shape_ijk - 1) / 2.0
    origin = -direction @ (centre_index * spacing)
    return Geometry(tuple(int(s) for s in shape_ijk[::-1]), tuple(float(s) for s in spacing),
                    tuple(float(o) for o in origin), tuple(float(d) for d in direction.ravel()))


def _lps_grid(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS x, y, z (mm, float32 ``[k, j, i]``) of every voxel centre."""
    m = geometry.ijk_to_lps().astype(np.float32)
    k, j, i = (np.arange(n, dtype=np.float32) for n in geometry.shape)
    out = []
    for row in range(3):
        out.append(m[row, 0] * i[None, None, :] + m[row, 1] * j[None, :, None]
                   + m[row, 2] * k[:, None, None] + m[row, 3])
    return tuple(np.broadcast_to(a, geometry.shape).astype(np.float32) for a in out)


def _segment_distance(x, y, z, p0, p1) -> np.ndarray:
    """Distance (mm) of every point to the segment p0-p1 and the position t in [0, 1] along it."""
    d = np.asarray(p1, dtype=np.float32) - np.asarray(p0, dtype=np.float32)
    length2 = float(d @ d) or 1.0
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    dx = x - (p0[0] + t * d[0])
    dy = y - (p0[1] + t * d[1])
    dz = z - (p0[2] + t * d[2])
    return np.sqrt(dx * dx + dy * dy + dz * dz), t


def make_ctpm_phantom(seed: int = 0, geometry: Optional[Geometry] = None, *,
                      ct_noise_hu: float = 20.0, gravity: float = 1.2, mean_counts: float = 300.0,
                      spect_fwhm_mm: float = 12.0, n_emphysema: Optional[int] = None,
                      n_dense: Optional[int] = None, n_defects: Optional[int] = None,
                      n_vessels: int = 14) -> CTPMPhantom:
    """One chest CT phantom with SPECT-like perfusion (see the module docstring).

    Parameters
    ----------
    seed
        Random seed: anatomy scale, lesion count/position/size, textures, noise.
    geometry
        CT grid; default :func:`phantom_geometry` (3 mm isotropic, 130 x 100 x 110).
    gravity
        Posterior/anterior perfusion ratio minus one (1.2: 2.2x more posteriorly).
    n_emphysema, n_dense, n_defects
        Lesion counts; None draws 0-2, 0-1 and 1-3.
    """
    rng = np.random.default_rng(seed)
    geometry = geometry or phantom_geometry()
    x, y, z = _lps_grid(geometry)
    scale = rng.uniform(0.9, 1.08, size=3)

    # --- anatomy -------------------------------------------------------------------
    body = (x / (170 * scale[0])) ** 2 + ((y - 5) / (120 * scale[1])) ** 2 <= 1.0
    lungs = np.zeros(geometry.shape, dtype=np.uint8)
    lung_specs = {}
    for side, sign, width in ((1, -1.0, 58.0), (2, 1.0, 52.0)):
        cx, cy, cz = sign * 78.0 * scale[0], 8.0, 0.0
        ax, ay, az = width * scale[0], 82.0 * scale[1], 125.0 * scale[2]
        # A dome-shaped base: the lung narrows towards the apex (z > 0).
        zr = (z - cz) / az
        taper = np.clip(1.0 - 0.35 * np.clip(zr, 0, None) ** 2, 0.3, 1.0)
        inside = (((x - cx) / (ax * taper)) ** 2 + ((y - cy) / (ay * taper)) ** 2 + zr ** 2) <= 1.0
        if side == 2:  # cardiac notch
            inside &= ((x - 25.0) / 55.0) ** 2 + ((y + 35.0) / 50.0) ** 2 + ((z + 60.0) / 70.0) ** 2 > 1.0
        lungs[inside & body] = side
        lung_specs[side] = dict(centre=(cx, cy, cz), semi_axes=(ax, ay, az))
    lung = lungs > 0

    # Relative posterior position inside each lung: 0 most anterior, 1 most posterior.
    y_rel = np.zeros(geometry.shape, dtype=np.float32)
    for side, spec in lung_specs.items():
        cy, ay = spec["centre"][1], spec["semi_axes"][1]
        y_rel = np.where(lungs == side, np.clip((y - (cy - ay)) / (2 * ay), 0, 1), y_rel)

    # --- lesions -------------------------------------------------------------------
    emph = np.zeros(geometry.shape, dtype=np.float32)
    dense = np.zeros(geometry.shape, dtype=np.float32)
    defect = np.zeros(geometry.shape, dtype=np.float32)
    pruned = np.zeros(geometry.shape, dtype=np.float32)  # where vessels are thinned out
    params = {"seed": int(seed), "emphysema": [], "dense": [], "defects": []}
    n_emphysema = int(rng.integers(0, 3)) if n_emphysema is None else n_emphysema
    n_dense = int(rng.integers(0, 2)) if n_dense is None else n_dense
    n_defects = int(rng.integers(1, 4)) if n_defects is None else n_defects

    def random_lung_point(bias_z: float = 0.0, bias_y: float = 0.0):
        side = int(rng.integers(1, 3))
        spec = lung_specs[side]
        (cx, cy, cz), (ax, ay, az) = spec["centre"], spec["semi_axes"]
        u = rng.uniform(-0.6, 0.6, size=3)
        u[2] = np.clip(u[2] + bias_z, -0.75, 0.75)
        u[1] = np.clip(u[1] + bias_y, -0.7, 0.7)
        return side, (cx + u[0] * ax * 0.8, cy + u[1] * ay, cz + u[2] * az)

    def blob(centre, radius):
        r2 = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / radius ** 2
        return np.clip(1.5 - r2, 0.0, 1.0).astype(np.float32)  # soft edge over ~0.6 radius

    for _ in range(n_emphysema):  # centrilobular emphysema favours the upper lobes
        side, c = random_lung_point(bias_z=0.35)
        r = float(rng.uniform(22, 40))
        emph = np.maximum(emph, blob(c, r))
        params["emphysema"].append({"lung": side, "centre_mm": c, "radius_mm": r})
    for _ in range(n_dense):  # fibrosis favours the dependent lower lung
        side, c = random_lung_point(bias_z=-0.35, bias_y=0.3)
        r = float(rng.uniform(18, 32))
        dense = np.maximum(dense, blob(c, r))
        params["dense"].append({"lung": side, "centre_mm": c, "radius_mm": r})
    for _ in range(n_defects):  # embolic wedge: a cone from the hilum to the pleura
        side = int(rng.integers(1, 3))
        cx, cy, cz = lung_specs[side]["centre"]
        hilum = np.array([cx - np.sign(cx) * 25.0, cy, cz + 10.0], dtype=np.float32)
        direction = rng.normal(size=3)
        direction[0] = np.sign(cx) * abs(direction[0])  # towards the lateral pleura
        direction /= np.linalg.norm(direction)
        half_angle = np.deg2rad(rng.uniform(18, 28))
        vx, vy, vz = x - hilum[0], y - hilum[1], z - hilum[2]
        dist = np.sqrt(vx * vx + vy * vy + vz * vz) + 1e-3
        cosang = (vx * direction[0] + vy * direction[1] + vz * direction[2]) / dist
        wedge = np.clip((cosang - np.cos(half_angle)) / 0.03, 0, 1) * np.clip((dist - 35.0) / 15.0, 0, 1)
        defect = np.maximum(defect, wedge.astype(np.float32))
        params["defects"].append({"lung": side, "apex_mm": hilum.tolist(), "direction": direction.tolist(),
                                  "half_angle_deg": float(np.rad2deg(half_angle))})
    defect *= lung
    emph *= lung
    dense *= lung
    pruned = np.maximum(emph, defect)

    # --- vessels: straight tapering branches from each hilum ---------------------------
    vessel = np.zeros(geometry.shape, dtype=np.float32)
    for side, spec in lung_specs.items():
        (cx, cy, cz), (ax, ay, az) = spec["centre"], spec["semi_axes"]
        hilum = np.array([cx - np.sign(cx) * 25.0, cy, cz + 10.0], dtype=np.float32)
        box = ndimage.find_objects((lungs == side).astype(np.uint8))
        if not box or box[0] is None:
            continue
        box = box[0]  # vessels only matter inside this lung: compute on its bounding box
        bx, by, bz, sub = x[box], y[box], z[box], vessel[box]
        for _ in range(n_vessels):
            target = np.array([cx + rng.uniform(-0.8, 0.8) * ax, cy + rng.uniform(-0.8, 0.8) * ay,
                               cz + rng.uniform(-0.85, 0.85) * az], dtype=np.float32)
            dist, t = _segment_distance(bx, by, bz, hilum, target)
            radius = 4.0 - 2.8 * t  # tapering from 4 mm to 1.2 mm
            np.maximum(sub, np.clip(radius + 0.5 - dist, 0, 1), out=sub)
    vessel *= lung * (1.0 - 0.85 * pruned)

    # --- CT ------------------------------------------------------------------------
    texture = ndimage.gaussian_filter(rng.standard_normal(geometry.shape).astype(np.float32), 1.2) * 40.0
    parenchyma = -870.0 + 70.0 * y_rel + texture
    parenchyma = parenchyma * (1 - emph) + emph * (-975.0 + 0.3 * texture)
    bullae = (ndimage.gaussian_filter(rng.standard_normal(geometry.shape).astype(np.float32), 1.0) > 0.25)
    parenchyma = np.where(bullae & (emph > 0.5), -1000.0, parenchyma)
    parenchyma = parenchyma - 60.0 * defect * (1 - emph)
    parenchyma = parenchyma * (1 - dense) + dense * (-250.0 + 2 * texture)
    parenchyma = parenchyma * (1 - vessel) + vessel * 40.0
    ct = np.where(body, 40.0 + 0.5 * texture, -1000.0).astype(np.float32)
    ct = np.where(lung, parenchyma, ct)
    ct += rng.normal(0.0, ct_noise_hu, size=geometry.shape).astype(np.float32)
    ct_hu = np.clip(np.rint(ct), -1024, 3000).astype(np.int16)

    # --- perfusion truth ----------------------------------------------------------
    perf = (1.0 + gravity * y_rel) * (1 - 0.75 * emph) * (1 - 0.7 * dense) * (1 - 0.8 * defect)
    perf = np.where(lung, perf, 0.0).astype(np.float32)
    sigma_vox = [2.0 / s for s in geometry.spacing[::-1]]
    perf_smooth = ndimage.gaussian_filter(perf, sigma_vox)
    weight = ndimage.gaussian_filter(lung.astype(np.float32), sigma_vox)
    perfusion = np.where(lung, perf_smooth / np.maximum(weight, 1e-3), 0.0).astype(np.float32)

    # --- SPECT ----------------------------------------------------------------------
    spect_geometry = _spect_grid(geometry)
    spect = _simulate_spect(perfusion, geometry, spect_geometry, spect_fwhm_mm, mean_counts, rng)
    params.update(gravity=gravity, ct_noise_hu=ct_noise_hu, spect_fwhm_mm=spect_fwhm_mm,
                  mean_counts=mean_counts, scale=scale.tolist())
    return CTPMPhantom(ct_hu, geometry, lungs, perfusion, spect, spect_geometry, params)


def _spect_grid(ct_geometry: Geometry, voxel_mm: float = SPECT_VOXEL_MM) -> Geometry:
    """Axis-aligned 4.42 mm grid covering the CT's physical extent (SPECT/CT share one frame)."""
    m = ct_geometry.ijk_to_lps()
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, ct_geometry.shape[2] - 0.5)
                        for j in (-0.5, ct_geometry.shape[1] - 0.5) for k in (-0.5, ct_geometry.shape[0] - 0.5)])
    pts = corners @ m.T
    lo, hi = pts[:, :3].min(0), pts[:, :3].max(0)
    n = np.ceil((hi - lo) / voxel_mm).astype(int)
    origin = lo + voxel_mm / 2
    return Geometry(tuple(int(v) for v in n[::-1]), (voxel_mm,) * 3, tuple(float(o) for o in origin))


def _simulate_spect(perfusion: np.ndarray, ct_geometry: Geometry, spect_geometry: Geometry,
                    fwhm_mm: float, mean_counts: float, rng: np.random.Generator) -> np.ndarray:
    from ..ctpm.preprocessing import resample_onto

    # Average the truth over each SPECT voxel: smooth to the SPECT voxel size, then sample.
    sigma_ct = [0.4 * SPECT_VOXEL_MM / s for s in ct_geometry.spacing[::-1]]
    smooth = ndimage.gaussian_filter(perfusion, sigma_ct)
    activity = resample_onto(smooth, ct_geometry, spect_geometry, interpolation="linear", default=0.0)
    blurred = ndimage.gaussian_filter(activity, fwhm_mm / 2.3548 / SPECT_VOXEL_MM)
    lung_level = float(np.mean(activity[activity > 0.5 * activity.max()])) if activity.max() > 0 else 1.0
    expected = np.clip(blurred / lung_level * mean_counts, 0, None)
    return rng.poisson(expected).astype(np.float32)


def write_ctpm_cohort(out_dir: str | Path, n: int, seed: int = 0,
                      geometry: Optional[Geometry] = None, **phantom_kwargs) -> Path:
    """Write ``n`` phantoms as ``case_XX_{ct,spect,lungs,perfusion_truth}.nii.gz`` and ``cohort.csv``.

    Returns the path of ``cohort.csv`` (columns ``ct, spect, lung_mask``, paths
    relative to the CSV's folder) as ``perfusionai ctpm train`` reads it.
    """
    out = Path(out_dir)
    with atomic_output_dir(out) as stage:
        rows = []
        for case in range(n):
            ph = make_ctpm_phantom(seed * 1000 + case, geometry, **phantom_kwargs)
            stem = f"case_{case:02d}"
            write_volume(ph.ct_hu, ph.geometry, stage / f"{stem}_ct.nii.gz")
            write_volume(ph.spect, ph.spect_geometry, stage / f"{stem}_spect.nii.gz")
            write_volume(ph.lung_labels, ph.geometry, stage / f"{stem}_lungs.nii.gz")
            write_volume(ph.perfusion, ph.geometry, stage / f"{stem}_perfusion_truth.nii.gz")
            rows.append({"ct": f"{stem}_ct.nii.gz", "spect": f"{stem}_spect.nii.gz",
                         "lung_mask": f"{stem}_lungs.nii.gz"})
            write_json(ph.params, stage / f"{stem}_params.json")
        # Marks the folder as synthetic so models trained on it are labelled "trained on phantoms".
        write_json({"generator": "perfusionai.phantoms.ctpm", "n": n, "seed": seed}, stage / PHANTOM_COHORT_MARKER)
        with open(stage / "cohort.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["ct", "spect", "lung_mask"])
            writer.writeheader()
            writer.writerows(rows)
    return out / "cohort.csv"


def train_phantom_model(out_path: str | os.PathLike, n_patients: int = 10, seed: int = 0, epochs: int = 10,
                        spacing_mm: float = 4.0, channels: Optional[Sequence[int]] = None, config=None,
                        lr: float = 3e-3, device="auto", progress=None):
    """Train a reduced-size ARNN on ``n_patients`` phantoms (no files needed) and save it (labelled
    "trained on phantoms"). About a minute on 2 CPU cores with the defaults.

    ``channels`` and ``config`` default to :data:`perfusionai.ctpm.training.REDUCED_CHANNELS` and
    ``REDUCED_CONFIG``; returns the :class:`perfusionai.ctpm.training.TrainingResult`.
    """
    # the domain's training code is loaded only here: it needs torch, the phantoms do not
    from ..ctpm.training import REDUCED_CHANNELS, REDUCED_CONFIG, prepare_arrays, train_ctpm
    from ..nn import save_model
    from ..progress import as_progress

    channels = REDUCED_CHANNELS if channels is None else channels
    config = REDUCED_CONFIG if config is None else config
    report = as_progress(progress)
    geometry = phantom_geometry(spacing_mm=(spacing_mm,) * 3)
    samples = []
    for n in range(n_patients):
        report(0.15 * n / n_patients, f"phantom {n + 1}/{n_patients}")
        ph = make_ctpm_phantom(seed * 1000 + n, geometry)
        samples.extend(prepare_arrays(ph.ct_hu, ph.geometry, ph.spect, ph.spect_geometry, ph.lung_labels, config,
                                      patient=f"phantom {n}"))
    result = train_ctpm(samples, config=config, channels=channels, epochs=epochs, lr=lr, val_fraction=0,
                        patience=None, seed=seed, device=device, trained_on_phantoms=True,
                        training_data=f"{n_patients} CT/SPECT phantoms (perfusionai.phantoms.ctpm, {spacing_mm:g} mm); "
                                      f"trained on phantoms",
                        progress=report.sub(0.15, 0.98))
    save_model(out_path, result.model, result.card)
    report(1.0, "model saved")
    return result
