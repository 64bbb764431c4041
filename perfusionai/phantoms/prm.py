"""Paired inspiratory/expiratory chest CT phantom with known deformation and PRM truth.

Geometry (LPS, identity direction, array ``[k, j, i]`` with k growing towards the head):
an elliptic body cylinder (+40 HU soft tissue) in air (-1000 HU); two lungs
(ellipsoids with a flat base) split into the six lobes of ARCHITECTURE.md by an
oblique major fissure (both lungs) and a horizontal minor fissure (right: middle
lobe; left: lingula); a trachea and two main bronchi (air lumen, soft-tissue
wall) opening into the lungs; radiating soft-tissue vessels; and tissue classes
with known (inspiratory, expiratory) HU:

=================  ==========  ==========  ===========
 region             insp HU     exp HU      PRM truth
=================  ==========  ==========  ===========
 normal lung          -860        -760       1 normal
 air trapping         -890        -900       2 fSAD
 emphysema            -980        -975       3 emph
 uncategorized        -965        -820       4 (small)
 vessels, walls        +40         +40       0 (excluded)
=================  ==========  ==========  ===========

Every value lies at least 15 HU from a threshold so Gaussian noise followed by the
3x3x3 median filter does not move a voxel across a threshold.

The expiratory scan is the same material under a known smooth deformation:
``exp(x) = E_material(phi(x))`` where ``phi`` maps an expiratory position to the
inspiratory (material) position: a craniocaudal compression about the lung
apex (the diaphragm rises), a small anteroposterior compression and a smooth
sinusoidal wobble. The truth PRM map lives on the inspiratory grid, where the
material is defined, so the pipeline's default exp -> insp registration should
reproduce it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..io import Geometry, Volume

# region ids of the material map
_OUTSIDE_AIR, _BODY, _NORMAL, _FSAD, _EMPH, _UNCAT, _VESSEL, _AIRWAY_LUMEN, _AIRWAY_WALL = range(9)
_INSP_HU = np.array([-1000, 40, -860, -890, -980, -965, 40, -1000, 40], dtype=np.float32)
_EXP_HU = np.array([-1000, 40, -760, -900, -975, -820, 40, -1000, 40], dtype=np.float32)
_TRUTH = np.array([0, 0, 1, 2, 3, 4, 0, 0, 0], dtype=np.uint8)


@dataclass
class PRMPhantom:
    """The phantom pair and its truth.

    Attributes
    ----------
    insp, exp
        CT volumes in HU (float32 ``[k, j, i]``); ``exp`` is on the same grid but deformed.
    lung_labels
        Truth lungs on the insp grid, ``[k, j, i]`` uint8: 1 right, 2 left (airways excluded).
    lobes
        Truth lobes 1-6 on the insp grid (ARCHITECTURE.md numbering).
    truth_prm
        Truth PRM labels 0-4 on the insp grid (0 outside the lung, vessels, airway walls).
    exp_lung_labels
        Truth lungs on the exp grid (the deformed insp lungs).
    airway_lumen
        Boolean ``[k, j, i]``: trachea and main-bronchus lumen on the insp grid.
    displacement_mm
        ``[k, j, i, 3]`` LPS displacement (mm) from each exp voxel centre to its material
        (insp) position: ``phi(x) = x + displacement(x)``.
    """

    insp: Volume
    exp: Volume
    lung_labels: np.ndarray
    lobes: np.ndarray
    truth_prm: np.ndarray
    exp_lung_labels: np.ndarray
    displacement_mm: np.ndarray
    airway_lumen: Optional[np.ndarray] = None
    parameters: dict = field(default_factory=dict)

    @property
    def geometry(self) -> Geometry:
        return self.insp.geometry


def _segment_distance(px, py, pz, a, b) -> np.ndarray:
    """Distance (mm) of points to the segment a-b (points as broadcastable arrays)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    d = b - a
    length2 = float(d @ d)
    t = ((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2 + (pz - a[2] - t * d[2]) ** 2)


def _material_map(x, y, z, p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Material ids, lung side (1 right, 2 left) and lobes at LPS points (mm)."""
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    mat = np.full(shape, _OUTSIDE_AIR, dtype=np.uint8)
    body = (x / p["body_ax"]) ** 2 + (y / p["body_ay"]) ** 2 <= 1.0
    mat[body] = _BODY

    side = np.zeros(shape, dtype=np.uint8)
    lobes = np.zeros(shape, dtype=np.uint8)
    rx, ry, rz = p["lung_radii"]
    cz = p["lung_cz"]
    for lung_side, cx in ((1, -p["lung_cx"]), (2, p["lung_cx"])):
        u = y / ry            # anterior < 0 < posterior
        w = (z - cz) / rz     # superior > 0
        inside = (((x - cx) / rx) ** 2 + u ** 2 + w ** 2 <= 1.0) & (w >= -0.7) & body
        if p.get("junction_bridge") and lung_side == 2:
            # a thin parenchyma bridge joining both lungs anteriorly (as the anterior junction line)
            bridge = (np.abs(x) <= p["lung_cx"]) & (np.abs(y + 0.55 * ry) <= 6.0) & (np.abs(w - 0.1) <= 0.25)
            inside |= bridge & body
            side[bridge & body & (x < 0)] = 1
        upper_part = w > 0.75 * u - 0.1
        lobe_here = np.where(upper_part, np.where(w > -0.1 if lung_side == 1 else w > -0.15, 1, 2), 3)
        if lung_side == 2:
            lobe_here = lobe_here + 3
        sel = inside & (side == 0) if lung_side == 1 else inside & ((side == 0) | (x >= 0))
        side[sel] = lung_side
        lobes[sel] = lobe_here[sel] if np.ndim(lobe_here) else lobe_here
        mat[sel] = _NORMAL

    lung = side > 0
    # disease regions (spheres, radius in mm, centre LPS mm)
    for centre, radius, material in p["regions"]:
        c = np.asarray(centre, dtype=np.float32)
        blob = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= radius ** 2) & lung
        mat[blob] = material

    # vessels radiate from each hilum
    for hilum, ends in p["vessels"]:
        for end in ends:
            d = _segment_distance(x, y, z, hilum, end)
            mat[(d <= p["vessel_radius"]) & lung] = _VESSEL

    # airways: trachea to the carina, main bronchi to the hila (walls, then lumen)
    wall = p["airway_wall"]
    segments = [(p["trachea_top"], p["carina"], p["trachea_radius"])]
    segments += [(p["carina"], h, p["bronchus_radius"]) for h in p["bronchus_ends"]]
    lumen = np.zeros(shape, dtype=bool)
    walls = np.zeros(shape, dtype=bool)
    for a, b, r in segments:
        d = _segment_distance(x, y, z, a, b)
        lumen |= d <= r
        walls |= d <= r + wall
    # the bronchi open into the parenchyma at their distal end: no wall cap beyond the end
    mat[walls & ~lumen] = _AIRWAY_WALL
    mat[lumen] = _AIRWAY_LUMEN
    # the open end: lumen touches normal parenchyma a little beyond the end point
    for h in p["bronchus_ends"]:
        cap = ((x - h[0]) ** 2 + (y - h[1]) ** 2 + (z - h[2]) ** 2) <= (p["bronchus_radius"] + wall + 1.0) ** 2
        mat[cap & lung & (mat == _AIRWAY_WALL)] = _AIRWAY_LUMEN
    airway = (mat == _AIRWAY_LUMEN) | (mat == _AIRWAY_WALL)
    side[airway] = 0
    lobes[airway] = 0
    return mat, side, lobes


def _deformation(x, y, z, p: dict):
    """phi(x): exp position -> insp (material) position, LPS mm."""
    s_z, s_y, wobble = p["compression_z"], p["compression_y"], p["wobble_mm"]
    apex = p["lung_cz"] + p["lung_radii"][2]
    # exp lungs are shorter: an exp point at distance d below the apex came from d/(1-s_z) below it
    zi = apex + (z - apex) / (1.0 - s_z)
    yi = y / (1.0 - s_y)
    lx, ly, lz = p["body_ax"], p["body_ay"], p["lung_radii"][2]
    xi = x + wobble * np.sin(np.pi * y / ly) * np.cos(0.5 * np.pi * z / lz)
    yi = yi + 0.5 * wobble * np.sin(np.pi * x / lx)
    zi = zi + wobble * np.sin(np.pi * x / lx) * np.sin(np.pi * y / ly)
    return xi, yi, zi


def make_prm_phantom(
    shape: tuple[int, int, int] = (56, 80, 96),
    spacing_mm: float | tuple[float, float, float] = 3.5,
    noise_hu: float = 15.0,
    deform: bool = True,
    compression_z: float = 0.10,
    compression_y: float = 0.04,
    wobble_mm: float = 3.0,
    emphysema_scale: float = 1.0,
    junction_bridge: bool = False,
    uncategorized: bool = False,
    seed: int = 0,
) -> PRMPhantom:
    """Build the paired phantom.

    Parameters
    ----------
    shape
        ``(k, j, i)`` voxels.
    spacing_mm
        Voxel size (mm), scalar or ``(i, j, k)``. Anatomy is in mm and scales with the field
        of view, so any resolution gives the same lungs.
    noise_hu
        Gaussian noise sigma (HU) added to both scans (low dose: 40-80).
    deform
        False gives an already aligned pair (exp = material exp HU on the insp grid).
    compression_z, compression_y
        Fractional craniocaudal and anteroposterior compression of expiration.
    wobble_mm
        Amplitude (mm) of the smooth sinusoidal part of the deformation.
    emphysema_scale
        Radius multiplier of the emphysema regions (2 = severe emphysema).
    junction_bridge
        Join the lungs by a thin parenchyma bridge (to test the left/right split).
    uncategorized
        Add a small "uncategorized" region (I <= -950, E > -856) in the right middle lobe.
    seed
        Noise seed.
    """
    shape = tuple(int(s) for s in shape)
    spacing = (float(spacing_mm),) * 3 if np.isscalar(spacing_mm) else tuple(float(s) for s in spacing_mm)
    fov = np.array([shape[2] * spacing[0], shape[1] * spacing[1], shape[0] * spacing[2]])  # x, y, z mm
    origin = tuple(float(v) for v in (-0.5 * fov + 0.5 * np.asarray(spacing)))
    geometry = Geometry(shape, spacing, origin)

    # Anatomy scaled to the field of view (the default FOV is 336 x 280 x 196 mm).
    ax, ay = 0.44 * fov[0], 0.40 * fov[1]
    rx, ry, rz = 0.17 * fov[0], 0.30 * fov[1], 0.40 * fov[2]
    lung_cx = rx + 0.045 * fov[0]
    lung_cz = -0.05 * fov[2]
    e = emphysema_scale
    hil_r = (-lung_cx + 0.35 * rx, 0.0, lung_cz + 0.15 * rz)
    hil_l = (lung_cx - 0.35 * rx, 0.0, lung_cz + 0.15 * rz)
    p = {
        "body_ax": ax, "body_ay": ay, "lung_radii": (rx, ry, rz), "lung_cx": lung_cx, "lung_cz": lung_cz,
        "junction_bridge": junction_bridge,
        "regions": [
            # emphysema: right upper and left upper lobes (apical, centrilobular-like)
            ((-lung_cx, -0.1 * ry, lung_cz + 0.55 * rz), 0.70 * rx * e, _EMPH),
            ((lung_cx + 0.1 * rx, 0.1 * ry, lung_cz + 0.5 * rz), 0.60 * rx * e, _EMPH),
            # air trapping (fSAD): both lower lobes
            ((-lung_cx - 0.15 * rx, 0.45 * ry, lung_cz - 0.35 * rz), 0.95 * rx, _FSAD),
            ((lung_cx + 0.1 * rx, 0.5 * ry, lung_cz - 0.3 * rz), 0.90 * rx, _FSAD),
            # a little "uncategorized" (e.g. misregistration) in the right middle lobe
            ((-lung_cx - 0.1 * rx, -0.6 * ry, lung_cz - 0.3 * rz), 0.22 * rx, _UNCAT),
        ][: 5 if uncategorized else 4],
        "vessels": [
            (hil_r, [(-lung_cx - 0.8 * rx, -0.5 * ry, lung_cz + 0.3 * rz), (-lung_cx - 0.7 * rx, 0.6 * ry, lung_cz - 0.4 * rz),
                     (-lung_cx, 0.0, lung_cz + 0.85 * rz), (-lung_cx - 0.3 * rx, -0.7 * ry, lung_cz - 0.5 * rz)]),
            (hil_l, [(lung_cx + 0.8 * rx, -0.5 * ry, lung_cz + 0.3 * rz), (lung_cx + 0.7 * rx, 0.6 * ry, lung_cz - 0.4 * rz),
                     (lung_cx, 0.0, lung_cz + 0.85 * rz), (lung_cx + 0.3 * rx, -0.7 * ry, lung_cz - 0.5 * rz)]),
        ],
        "vessel_radius": max(1.5 * max(spacing), 3.0),
        "trachea_top": (0.0, -0.25 * ry, 0.5 * fov[2] + 5.0),
        "carina": (0.0, -0.1 * ry, lung_cz + 0.45 * rz),
        "trachea_radius": max(8.0, 1.6 * max(spacing)),
        "bronchus_radius": max(5.0, 1.2 * max(spacing)),
        "bronchus_ends": [hil_r, hil_l],
        "airway_wall": max(2.0, 0.6 * max(spacing)),
        "compression_z": compression_z if deform else 0.0,
        "compression_y": compression_y if deform else 0.0,
        "wobble_mm": wobble_mm if deform else 0.0,
    }

    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    x = origin[0] + i * spacing[0]
    y = origin[1] + j * spacing[1]
    z = origin[2] + k * spacing[2]
    mat, side, lobes = _material_map(x, y, z, p)
    insp_clean = _INSP_HU[mat]
    truth = _TRUTH[mat]
    truth[side == 0] = 0

    if deform:
        xi, yi, zi = _deformation(x, y, z, p)
        mat_e, side_e, _ = _material_map(xi, yi, zi, p)
        # The material's expiratory HU evaluated exactly at phi(x) (no partial-volume blur, like the
        # inspiratory scan, so both scans are sampled the same way).
        exp_clean = _EXP_HU[mat_e]
        exp_lungs = side_e
        disp = np.stack([xi - x, yi - y, zi - z], axis=-1).astype(np.float32)
    else:
        exp_clean = _EXP_HU[mat]
        exp_lungs = side.copy()
        disp = np.zeros(shape + (3,), dtype=np.float32)

    rng = np.random.default_rng(seed)
    insp_hu = insp_clean + rng.normal(0.0, noise_hu, shape).astype(np.float32) if noise_hu > 0 else insp_clean.copy()
    exp_hu = exp_clean + rng.normal(0.0, noise_hu, shape).astype(np.float32) if noise_hu > 0 else exp_clean.copy()
    params = {k_: v for k_, v in p.items() if k_ not in ("regions", "vessels")}
    params.update({"noise_hu": noise_hu, "deform": deform, "seed": seed, "shape": shape, "spacing_mm": spacing})
    return PRMPhantom(
        insp=Volume(insp_hu.astype(np.float32), geometry, None, {"phantom": "prm insp"}),
        exp=Volume(exp_hu.astype(np.float32), geometry, None, {"phantom": "prm exp"}),
        lung_labels=side,
        lobes=lobes,
        truth_prm=truth,
        exp_lung_labels=exp_lungs,
        displacement_mm=disp,
        airway_lumen=mat == _AIRWAY_LUMEN,
        parameters=params,
    )


def truth_statistics(phantom: PRMPhantom, use_lobes: bool = True) -> dict:
    """%PRM of the truth map, in the ``prm_stats.json`` layout."""
    from ..prm.stats import prm_statistics

    voxel_ml = float(np.prod(phantom.geometry.spacing)) / 1000.0
    return prm_statistics(phantom.truth_prm, phantom.lung_labels,
                          phantom.lobes if use_lobes else None, voxel_ml)


#: Grid of the default phantom at 3.5 mm; :func:`write_prm_phantom` keeps its field of view at other spacings.
DEFAULT_SHAPE = (56, 80, 96)
DEFAULT_SPACING_MM = 3.5


def write_prm_phantom(out_dir, spacing_mm: float = DEFAULT_SPACING_MM, noise_hu: float = 15.0,
                      emphysema_scale: float = 1.0, seed: int = 0) -> tuple[int, int, int]:
    """``prm phantom``: write a CT pair with known truth into ``out_dir`` (atomically); returns the grid ``(k, j, i)``.

    Files: ``insp.nii.gz``, ``exp.nii.gz`` (HU), ``lung_mask.nii.gz`` (1 right, 2 left), ``lobes.nii.gz``
    (1-6), ``truth_prm.nii.gz`` (0-4) on the inspiratory grid and ``truth.json`` (%PRM per lung and lobe).
    The field of view of the default grid is kept: other spacings resize the grid.
    """
    from ..io import atomic_output_dir, write_json, write_volume

    shape = tuple(max(8, int(round(n * DEFAULT_SPACING_MM / spacing_mm))) for n in DEFAULT_SHAPE)
    phantom = make_prm_phantom(shape=shape, spacing_mm=spacing_mm, noise_hu=noise_hu,
                               emphysema_scale=emphysema_scale, seed=seed)
    g = phantom.geometry
    with atomic_output_dir(out_dir) as stage:
        write_volume(phantom.insp.array, g, stage / "insp.nii.gz")
        write_volume(phantom.exp.array, phantom.exp.geometry, stage / "exp.nii.gz")
        write_volume(phantom.lung_labels.astype(np.uint8), g, stage / "lung_mask.nii.gz")
        write_volume(phantom.lobes.astype(np.uint8), g, stage / "lobes.nii.gz")
        write_volume(phantom.truth_prm.astype(np.uint8), g, stage / "truth_prm.nii.gz")
        write_json({"truth": truth_statistics(phantom), "parameters": phantom.parameters,
                    "labels": {"prm": "0 outside/vessels, 1 normal, 2 fSAD, 3 emphysema, 4 uncategorized",
                               "lungs": "1 right, 2 left", "lobes": "ARCHITECTURE.md numbering 1-6"}},
                   stage / "truth.json")
    return shape
