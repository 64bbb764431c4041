"""PRM classification, statistics, lobe import and lung mask against hand-computed cases and phantom truth."""

from __future__ import annotations

import numpy as np
import pytest

from perfusionai.errors import PerfusionAIError
from perfusionai.io import Geometry
from perfusionai.metrics import dice
from perfusionai.phantoms.prm import make_prm_phantom, truth_statistics
from perfusionai.prm.classification import ClassificationOptions, classify_prm
from perfusionai.lung import import_lobes, lung_labels_of, lungs_from_lobes, segment_lungs
from perfusionai.prm.pipeline import PRMOptions, compute_prm
from perfusionai.prm.stats import prm_statistics

NO_FILTER = ClassificationOptions(median_size=0)


def _classify_pairs(pairs):
    """Classify (I, E) pairs laid out as a 1 x 1 x n volume, no median filter."""
    insp = np.array([[[p[0] for p in pairs]]], dtype=np.float32)
    expi = np.array([[[p[1] for p in pairs]]], dtype=np.float32)
    return classify_prm(insp, expi, np.ones_like(insp, dtype=bool), NO_FILTER)[0, 0].tolist()


def test_threshold_boundaries_follow_the_cmi_convention():
    # Exactly on a threshold goes to the diseased side: E = -856 is air trapping, I = -950 is emphysema.
    cases = [
        ((-949.9, -855.9), 1),   # just above both thresholds: normal
        ((-950.0, -855.9), 4),   # I on the threshold, E above: uncategorized
        ((-949.9, -856.0), 2),   # E on the threshold: fSAD
        ((-950.0, -856.0), 3),   # both on the thresholds: emphysema
        ((-1000.0, -1000.0), 3),  # lower end of the valid range is valid
        ((-500.0, -500.0), 1),   # upper end of the valid range is valid
        ((-1000.1, -900.0), 0),  # below the valid range on insp: excluded
        ((-900.0, -499.9), 0),   # above the valid range on exp: excluded
        ((-700.0, -870.0), 2),
        ((-960.0, -700.0), 4),
    ]
    got = _classify_pairs([c[0] for c in cases])
    assert got == [c[1] for c in cases]


def test_outside_lung_is_zero_and_options_move_thresholds():
    insp = np.full((1, 1, 2), -900.0, dtype=np.float32)
    expi = np.full((1, 1, 2), -870.0, dtype=np.float32)
    lung = np.array([[[True, False]]])
    assert classify_prm(insp, expi, lung, NO_FILTER)[0, 0].tolist() == [2, 0]
    shifted = ClassificationOptions(threshold_exp_hu=-880.0, median_size=0)
    assert classify_prm(insp, expi, lung, shifted)[0, 0].tolist() == [1, 0]


def test_median_prefilter_removes_single_voxel_outliers():
    insp = np.full((5, 5, 5), -900.0, dtype=np.float32)
    expi = np.full((5, 5, 5), -800.0, dtype=np.float32)
    insp[2, 2, 2] = -990.0  # a lone dark voxel would be uncategorized without the filter
    lung = np.ones_like(insp, dtype=bool)
    assert classify_prm(insp, expi, lung, NO_FILTER)[2, 2, 2] == 4
    assert classify_prm(insp, expi, lung)[2, 2, 2] == 1


def test_percentages_sum_to_100_over_valid_voxels_and_excluded_beside():
    rng = np.random.default_rng(3)
    prm = rng.integers(0, 5, size=(6, 7, 8)).astype(np.uint8)
    lungs = np.zeros(prm.shape, np.uint8)
    lungs[:, :, :4] = 1
    lungs[:, :, 4:] = 2
    lungs[0] = 0
    lobes = np.where(lungs == 1, 1 + (np.arange(8)[None, None, :] % 3), 4 + (np.arange(8)[None, None, :] % 3))
    lobes = np.where(lungs > 0, lobes, 0).astype(np.uint8)
    stats = prm_statistics(prm, lungs, lobes, voxel_volume_ml=0.001)
    regions = [stats["whole_lung"], stats["right"], stats["left"], *stats["lobes"].values()]
    assert len(stats["lobes"]) == 6
    for region in regions:
        assert region["normal"] + region["fsad"] + region["emph"] + region["uncategorized"] == pytest.approx(100.0)
    inside = prm[lungs > 0]
    whole = stats["whole_lung"]
    assert whole["voxels"] == int((inside > 0).sum())
    assert whole["emph"] == pytest.approx(100.0 * (inside == 3).sum() / (inside > 0).sum())
    assert whole["excluded"] == pytest.approx(100.0 * (inside == 0).sum() / inside.size)
    right = prm[lobes == 2]
    assert stats["lobes"]["2"]["fsad"] == pytest.approx(100.0 * (right == 2).sum() / (right > 0).sum())


@pytest.mark.parametrize("convention, labels, expected", [
    ("totalsegmentator", [10, 11, 12, 13, 14, 7], [4, 6, 1, 2, 3, 0]),
    ("totalsegmentator1", [13, 14, 15, 16, 17], [4, 6, 1, 2, 3]),
    ("lungmask", [1, 2, 3, 4, 5], [4, 6, 1, 2, 3]),
    ("cip", [4, 5, 6, 7, 8, 512 + 4, 256 + 7], [1, 2, 3, 4, 6, 0, 4]),
    ("yacta", [10, 20, 30, 40, 50, 60], [1, 2, 3, 4, 5, 6]),
    ("imbio", [11, 12, 13, 21, 22], [1, 3, 2, 4, 6]),
])
def test_lobe_conventions_map_to_the_project_lobes(convention, labels, expected):
    got = import_lobes(np.array(labels).reshape(1, 1, -1), convention)
    assert got.ravel().tolist() == expected


def test_lobe_import_refuses_unknown_and_empty():
    with pytest.raises(PerfusionAIError, match="unknown lobe convention"):
        import_lobes(np.ones((1, 1, 2)), "nonsense")
    with pytest.raises(PerfusionAIError, match="no lobe"):
        import_lobes(np.full((1, 1, 2), 99), "yacta", "lobes.nii.gz")


@pytest.fixture(scope="module")
def phantom():
    return make_prm_phantom(shape=(44, 64, 76), spacing_mm=4.5)


def test_lung_mask_matches_the_phantom_lungs_and_sides(phantom):
    labels = segment_lungs(phantom.insp.array, phantom.geometry)
    assert dice(labels == 1, phantom.lung_labels == 1) > 0.95
    assert dice(labels == 2, phantom.lung_labels == 2) > 0.95
    # the trachea is not lung; the main bronchi open into the lung at their far end, where the
    # slice-wise tracking stops as soon as the bronchus merges with parenchyma in-plane
    lumen = phantom.airway_lumen
    carina_k = int(np.nonzero(lumen.any(axis=(1, 2)))[0].min())
    trachea = lumen.copy()
    trachea[: carina_k + 8] = False
    assert trachea.sum() > 50
    assert not (trachea & (labels > 0)).any()
    assert (lumen & (labels > 0)).sum() < 0.5 * lumen.sum()


def test_lung_mask_on_low_dose_severe_emphysema_and_touching_lungs():
    ph = make_prm_phantom(shape=(44, 64, 76), spacing_mm=4.5, noise_hu=70.0, emphysema_scale=2.2,
                          junction_bridge=True, seed=5)
    assert (ph.truth_prm == 3).sum() > 0.25 * (ph.lung_labels > 0).sum()  # really emphysematous
    labels = segment_lungs(ph.insp.array, ph.geometry)
    assert dice(labels > 0, ph.lung_labels > 0) > 0.95
    assert dice(labels == 1, ph.lung_labels == 1) > 0.9
    assert dice(labels == 2, ph.lung_labels == 2) > 0.9


def test_lung_mask_refuses_an_image_without_lungs():
    soft = np.full((10, 20, 20), 40.0, dtype=np.float32)
    with pytest.raises(PerfusionAIError, match="no lung"):
        segment_lungs(soft, Geometry((10, 20, 20)))


def test_aligned_pair_without_registration_is_exact():
    ph = make_prm_phantom(shape=(44, 64, 76), spacing_mm=4.5, noise_hu=0.0, deform=False, uncategorized=True)
    options = PRMOptions(classification=ClassificationOptions(median_size=0), register=False)
    result = compute_prm(ph.insp, ph.exp, lung_mask=ph.lung_labels, lobes=ph.lobes, options=options)
    assert np.array_equal(result.prm, ph.truth_prm)
    truth = truth_statistics(ph)
    for key in ("normal", "fsad", "emph", "uncategorized", "excluded"):
        assert result.stats["whole_lung"][key] == pytest.approx(truth["whole_lung"][key], abs=1e-9)
        for lobe in truth["lobes"]:
            assert result.stats["lobes"][lobe][key] == pytest.approx(truth["lobes"][lobe][key], abs=1e-9)
    assert (result.prm == 4).any() and (result.prm == 3).any() and (result.prm == 2).any()


def test_aligned_noisy_pair_with_median_stays_within_truth(phantom):
    ph = make_prm_phantom(shape=(44, 64, 76), spacing_mm=4.5, noise_hu=25.0, deform=False, seed=2)
    result = compute_prm(ph.insp, ph.exp, options=PRMOptions(register=False))
    truth = truth_statistics(ph, use_lobes=False)["whole_lung"]
    for key in ("normal", "fsad", "emph"):
        assert abs(result.stats["whole_lung"][key] - truth[key]) < 2.0


def test_lobe_to_lung_grouping_and_lung_labels_for_statistics():
    """One grouping (labels.RIGHT_LOBES/LEFT_LOBES): lobes 1-3 right (1), 4-6 left (2); a 1-6 lobe map given
    as the lung mask is read as lobes, a binary mask is split into its two lungs."""
    from perfusionai.io import Geometry

    lobes = np.zeros((2, 4, 12), np.uint8)
    lobes[:, :, 0:2], lobes[:, :, 2:4], lobes[:, :, 4:6] = 1, 2, 3      # right lung: small LPS x
    lobes[:, :, 7:9], lobes[:, :, 9:10], lobes[:, :, 10:12] = 4, 5, 6
    expected = np.where(lobes == 0, 0, np.where(lobes <= 3, 1, 2))
    assert np.array_equal(lungs_from_lobes(lobes), expected)
    g = Geometry(lobes.shape)
    assert np.array_equal(lung_labels_of(lobes, g), expected)                   # the mask is a lobe map
    assert np.array_equal(lung_labels_of(lobes > 0, g), expected)               # binary: its two components
    assert np.array_equal(lung_labels_of(lobes > 0, g, lobes=lobes), expected)  # lobes win
