"""The CT/SPECT lung phantom carries the designed perfusion truth and CT signs of it."""

import csv

import numpy as np
import pytest

from perfusionai.phantoms.ctpm import SPECT_VOXEL_MM, _lps_grid, make_ctpm_phantom, phantom_geometry

GEOMETRY = phantom_geometry(spacing_mm=(5.0, 5.0, 5.0))


def test_gravity_gradient_in_perfusion_and_density():
    ph = make_ctpm_phantom(1, GEOMETRY, n_emphysema=0, n_dense=0, n_defects=0, gravity=1.2)
    x, y, z = _lps_grid(ph.geometry)
    lung = ph.lung_labels > 0
    lo, hi = np.percentile(y[lung], [15, 85])
    anterior, posterior = lung & (y < lo), lung & (y > hi)
    ratio = ph.perfusion[posterior].mean() / ph.perfusion[anterior].mean()
    assert 1.6 < ratio < 2.4  # 1 + 1.2 * y_rel between the two bands
    assert ph.ct_hu[posterior].mean() > ph.ct_hu[anterior].mean() + 30  # dependent lung is denser


def test_emphysema_is_dark_on_ct_and_poorly_perfused():
    ph = make_ctpm_phantom(2, GEOMETRY, n_emphysema=1, n_dense=0, n_defects=0)
    blob = ph.params["emphysema"][0]
    x, y, z = _lps_grid(ph.geometry)
    c = blob["centre_mm"]
    r2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
    core = (r2 < (0.5 * blob["radius_mm"]) ** 2) & (ph.lung_labels > 0)
    ring = (r2 > (1.6 * blob["radius_mm"]) ** 2) & (r2 < (2.2 * blob["radius_mm"]) ** 2) & (ph.lung_labels > 0)
    assert core.sum() > 10
    assert ph.ct_hu[core].mean() < -940
    assert ph.perfusion[core].mean() < 0.45 * ph.perfusion[ring].mean()


def test_spect_grid_noise_and_blur():
    ph = make_ctpm_phantom(3, GEOMETRY)
    assert ph.spect_geometry.spacing == (SPECT_VOXEL_MM,) * 3
    assert np.all(ph.spect >= 0) and np.array_equal(ph.spect, np.round(ph.spect))  # Poisson counts
    from perfusionai.ctpm.preprocessing import coverage

    assert coverage(ph.spect_geometry, ph.geometry, ph.lung_labels > 0) == 1.0


def test_cli_writes_a_phantom_cohort(tmp_path, capsys):
    from perfusionai.cli import main

    assert main(["ctpm", "phantoms", "--out", str(tmp_path / "c"), "--n", "2", "--spacing", "8",
                 "--progress", "none"]) == 0
    with open(tmp_path / "c" / "cohort.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all((tmp_path / "c" / r["ct"]).exists() for r in rows)
    assert (tmp_path / "c" / "phantom_cohort.json").exists()
