"""Registration (ANTsPy) and the whole CT PRM pipeline against known deformations.

* phantom with a known smooth deformation: %PRM per region and Dice per class against the truth;
* CIP ``ct-64`` and its copy moved by a known rigid transform (stored in the header): the transform
  is recovered (mean lung-surface distance and point error below one voxel);
* Learn2Reg case 012 lung masks (exp -> insp): lung Dice and keypoint TRE before/after.

The external data are read in place from ``../shared/external/lung`` (CIP: BSD-style licence;
Learn2Reg masks: from a GPL-2.0 repository, not redistributable here); tests skip when absent.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("ants", reason="ANTsPy (antspyx) is not installed")

from perfusionai.io import read_volume  # noqa: E402
from perfusionai.metrics import dice  # noqa: E402
from perfusionai.phantoms.prm import make_prm_phantom, truth_statistics  # noqa: E402
from perfusionai.prm.pipeline import compute_prm  # noqa: E402
from perfusionai.prm.registration import RegistrationOptions, register_ct, transform_points  # noqa: E402

EXTERNAL = Path(__file__).resolve().parents[1].parent / "shared" / "external" / "lung"
CIP = EXTERNAL / "cip_ct"
L2R = EXTERNAL / "learn2reg_case012_masks"


def _cip_lung(labels: np.ndarray) -> np.ndarray:
    """CIP label map -> lung mask: regions 9-14 (lung thirds), airway type (2) excluded."""
    labels = np.asarray(labels).astype(np.int64)
    return np.isin(labels & 255, range(9, 15)) & ((labels >> 8) != 2)


def _mean_surface_distance_mm(a: np.ndarray, b: np.ndarray, spacing_kji) -> float:
    """Symmetric mean distance (mm) between the surfaces of two masks ``[k, j, i]``."""
    def surface(m):
        return m & ~ndimage.binary_erosion(m)

    sa, sb = surface(a), surface(b)
    da = ndimage.distance_transform_edt(~sb, sampling=spacing_kji)
    db = ndimage.distance_transform_edt(~sa, sampling=spacing_kji)
    return float(np.concatenate([da[sa], db[sb]]).mean())


def test_phantom_with_known_deformation_matches_truth():
    """Acceptance: whole lung within 2 points, each lobe within 5, Dice of each class >= 0.85."""
    ph = make_prm_phantom()
    truth = truth_statistics(ph)
    result = compute_prm(ph.insp, ph.exp, lobes=ph.lobes)
    try:
        assert result.info["lung_dice_after_registration"] > result.info["lung_dice_before_registration"]
        assert result.info["lung_dice_after_registration"] > 0.98
        for key in ("normal", "fsad", "emph"):
            assert abs(result.stats["whole_lung"][key] - truth["whole_lung"][key]) <= 2.0, key
            for lobe in truth["lobes"]:
                assert abs(result.stats["lobes"][lobe][key] - truth["lobes"][lobe][key]) <= 5.0, (lobe, key)
        for label in (1, 2, 3):
            assert dice(result.prm == label, ph.truth_prm == label) >= 0.85, label
    finally:
        result.cleanup()


def test_registration_recovers_most_of_a_known_deformation_on_a_small_phantom():
    """Fast plumbing check (mean-squares SyN; the default CC recipe is checked against the acceptance
    limits by the acceptance test above): lung overlap and class Dice improve well beyond no registration."""
    from perfusionai.prm.pipeline import PRMOptions

    ph = make_prm_phantom(shape=(40, 56, 64), spacing_mm=5.0, seed=3)
    options = PRMOptions(registration=RegistrationOptions(syn_metric="meansquares"))
    result = compute_prm(ph.insp, ph.exp, lobes=ph.lobes, options=options)
    try:
        before = result.info["lung_dice_before_registration"]
        after = result.info["lung_dice_after_registration"]
        assert before < 0.92 and after > 0.97
        assert dice(result.prm == 3, ph.truth_prm == 3) > 0.85
        assert dice(result.prm == 1, ph.truth_prm == 1) > 0.85
    finally:
        result.cleanup()


def test_registration_recipes_and_unknown_quality():
    """The default options are the ``fast`` recipe; ``accurate`` iterates down to a 2 mm grid; a wrong name
    is a user error naming the option."""
    from perfusionai.errors import PerfusionAIError
    from perfusionai.prm.registration import registration_recipe

    assert registration_recipe("fast") == RegistrationOptions()
    accurate = registration_recipe("accurate", threads=1)
    assert accurate.registration_spacing_mm == 2.0 and accurate.syn_iterations == (40, 20, 10)
    assert accurate.threads == 1
    with pytest.raises(PerfusionAIError, match="registration_quality"):
        registration_recipe("fastest")


@pytest.mark.skipif(not (CIP / "ct-64.nrrd").exists(), reason=f"CIP test data not found in {CIP}")
def test_cip_ct64_known_rigid_transform_is_recovered():
    fixed = read_volume(CIP / "ct-64.nrrd")
    moving = read_volume(CIP / "ct-64-transformed.nrrd")
    fixed_lung = _cip_lung(read_volume(CIP / "GeneratePartialLungLabelMap_Test_ct-64.nrrd").array)
    moving_lung = _cip_lung(read_volume(CIP / "lm-64-transformed.nrrd").array)
    # The moved copy keeps the voxels and changes the header: voxel (i, j, k) of one image is
    # the same anatomy as voxel (i, j, k) of the other; that gives the exact answer.
    assert np.array_equal(fixed.array, moving.array)
    reg = register_ct(fixed.array, fixed.geometry, moving.array, moving.geometry, fixed_lung, moving_lung,
                      RegistrationOptions(linear_only=True, registration_spacing_mm=4.0))
    try:
        spacing_kji = np.asarray(fixed.geometry.spacing)[::-1]
        voxel = float(min(fixed.geometry.spacing))
        msd = _mean_surface_distance_mm(fixed_lung, reg.warped_lung > 0, spacing_kji)
        assert msd < voxel, f"mean lung-surface distance {msd:.2f} mm >= one voxel ({voxel:.2f} mm)"
        # 20 degrees of rotation resample a 4 mm label map with partial-volume loss, hence 0.9, not 1
        assert reg.lung_dice_after > 0.9 and reg.lung_dice_before < 0.7
        ijk = np.argwhere(fixed_lung)[::50][:, ::-1].astype(float)  # (i, j, k)
        homog = np.c_[ijk, np.ones(len(ijk))]
        p_fixed = (fixed.geometry.ijk_to_lps() @ homog.T).T[:, :3]
        p_true = (moving.geometry.ijk_to_lps() @ homog.T).T[:, :3]
        p_found = transform_points(p_fixed, reg)
        error = np.linalg.norm(p_found - p_true, axis=1)
        assert error.mean() < voxel, f"mean point error {error.mean():.2f} mm"
    finally:
        reg.cleanup()


def _read_keypoints(path: Path) -> np.ndarray:
    with path.open() as fh:
        rows = [[float(v) for v in row] for row in csv.reader(fh) if row]
    return np.asarray(rows)


@pytest.mark.skipif(not (L2R / "case_012_insp_lungmask.nii.gz").exists(),
                    reason=f"Learn2Reg case 012 masks not found in {L2R}")
def test_learn2reg_case012_masks_register_and_keypoint_error_shrinks(capsys):
    insp = read_volume(L2R / "case_012_insp_lungmask.nii.gz")
    exp = read_volume(L2R / "case_012_exp_lungmask.nii.gz")
    insp_lung = insp.array > 0
    exp_lung = exp.array > 0
    # Masks as pseudo-CT (lung -850 HU in +40 HU tissue), lightly smoothed so the metric has gradients.
    insp_hu = ndimage.gaussian_filter(np.where(insp_lung, -850.0, 40.0).astype(np.float32), 1.0)
    exp_hu = ndimage.gaussian_filter(np.where(exp_lung, -850.0, 40.0).astype(np.float32), 1.0)
    reg = register_ct(insp_hu, insp.geometry, exp_hu, exp.geometry, insp_lung, exp_lung, RegistrationOptions())
    try:
        assert reg.lung_dice_after >= 0.95
        points = _read_keypoints(L2R / "case_012_keypoints.csv")
        exp_ijk, insp_ijk = points[:, 0:3], points[:, 3:6]
        to_lps = lambda g, ijk: (g.ijk_to_lps() @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]  # noqa: E731
        p_insp, p_exp = to_lps(insp.geometry, insp_ijk), to_lps(exp.geometry, exp_ijk)
        tre_before = np.linalg.norm(p_insp - p_exp, axis=1).mean()
        tre_after = np.linalg.norm(transform_points(p_insp, reg) - p_exp, axis=1).mean()
        with capsys.disabled():
            print(f"\nLearn2Reg case 012: lung Dice {reg.lung_dice_before:.3f} -> {reg.lung_dice_after:.3f}; "
                  f"keypoint TRE {tre_before:.2f} mm -> {tre_after:.2f} mm")
        assert tre_after < tre_before
    finally:
        reg.cleanup()
