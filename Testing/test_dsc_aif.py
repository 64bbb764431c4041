"""AIF from a mask and automatic AIF selection on phantoms with arteries among tissue and noise."""

import numpy as np
import pytest

from perfusionai.dsc.aif import aif_from_mask, select_aif_auto
from perfusionai.errors import PerfusionAIError
from perfusionai.phantoms import make_dsc_phantom
from perfusionai.phantoms.dsc import LABELS


def _delta_r2(phantom, baseline_frames=10):
    s = phantom.signal.astype(np.float64)
    s0 = s[..., :baseline_frames].mean(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.log(np.maximum(s, 1e-12) / s0) / phantom.te


def _chosen(mask, voxels):
    return mask[voxels[:, 0], voxels[:, 1], voxels[:, 2]]


@pytest.mark.parametrize("snr, search_whole_volume", [(np.inf, False), (50.0, False), (30.0, True), (20.0, True)])
def test_automatic_aif_finds_the_arteries(snr, search_whole_volume):
    # arteries, their 50 % partial-volume ring, grey/white matter, lesion, leaky tumour,
    # and pure-noise background when the whole volume is searched
    p = make_dsc_phantom(snr=snr, seed=11, partial_volume=True, leakage=True)
    conc = _delta_r2(p)
    selection = select_aif_auto(conc, None if search_whole_volume else p.brain_mask, p.times, n_voxels=10)
    assert selection.voxels.shape == (10, 3)
    assert _chosen(p.aif_mask, selection.voxels).mean() >= 0.8
    assert _chosen(p.brain_mask, selection.voxels).all()
    assert not _chosen(p.rois == LABELS["artery_partial_volume"], selection.voxels).any()
    assert np.corrcoef(selection.curve, p.aif)[0, 1] > 0.98
    # reported timing of the chosen curve matches the phantom's AIF (arrival 10 s, peak 14.5 s)
    assert abs(selection.ttp_s - 14.5) <= 1.0
    assert 9.0 <= selection.arrival_s <= 12.0
    assert 3.0 <= selection.fwhm_s <= 9.0
    if search_whole_volume:
        assert selection.rejected["noisy (rough curve)"] > 0
    summary = selection.to_dict()
    assert summary["n_voxels"] == 10 and len(summary["voxels_kji"]) == 10


def test_automatic_aif_prefers_early_narrow_arteries_over_high_area_tissue():
    # a tumour with huge blood volume has a larger area than some arteries would,
    # but its bolus is later and wider: the clustering must not pick it
    from perfusionai.phantoms.dsc import Tissue
    tissues = [Tissue("grey_matter", 1, 60.0, 4.0), Tissue("white_matter", 2, 22.0, 2.0),
               Tissue("tumour", 5, 200.0, 60.0)]
    p = make_dsc_phantom(tissues=tissues, snr=60.0, seed=5)
    conc = _delta_r2(p)
    tumour_auc = np.trapezoid(p.curve(5), p.times)
    assert tumour_auc > 0.5 * np.trapezoid(p.aif, p.times)
    selection = select_aif_auto(conc, p.brain_mask, p.times)
    assert _chosen(p.aif_mask, selection.voxels).mean() >= 0.8


def test_automatic_aif_fails_clearly_without_bolus():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 5, size=(4, 8, 8, 40))
    with pytest.raises(PerfusionAIError, match="AIF"):
        select_aif_auto(noise, None, np.arange(40.0))


def test_aif_from_mask_is_the_mean_curve_and_rejects_bad_masks():
    p = make_dsc_phantom(shape=(4, 16, 16), snr=np.inf)
    conc = _delta_r2(p)
    curve = aif_from_mask(conc, p.aif_mask)
    np.testing.assert_allclose(curve, p.aif, atol=1e-6 * p.aif.max())
    mixed = p.aif_mask | (p.rois == LABELS["white_matter"])
    expected = conc[mixed].mean(axis=0)
    np.testing.assert_allclose(aif_from_mask(conc, mixed), expected)
    with pytest.raises(PerfusionAIError, match="selects no voxel"):
        aif_from_mask(conc, np.zeros(p.aif_mask.shape, bool), name="aif.nii.gz")
    with pytest.raises(PerfusionAIError, match="aif.nii.gz: gives an all-zero or flat AIF"):
        aif_from_mask(np.zeros_like(conc), p.aif_mask, name="aif.nii.gz")
    with pytest.raises(PerfusionAIError, match="has shape"):
        aif_from_mask(conc, p.aif_mask[:2])


def test_pipeline_with_automatic_aif_matches_the_drawn_aif():
    from perfusionai.dsc.pipeline import DSCOptions, compute_dsc_maps

    p = make_dsc_phantom(snr=80.0, seed=4)
    options = DSCOptions(te=p.te, method="cSVD", kh=p.kh, rho=p.rho)
    drawn = compute_dsc_maps(p.signal, p.times, options, mask=p.brain_mask, aif_mask=p.aif_mask)
    auto = compute_dsc_maps(p.signal, p.times, options, mask=p.brain_mask, aif_auto=True)
    assert _chosen(p.aif_mask, np.asarray(auto.aif_voxels)).mean() >= 0.8
    gm = p.rois == LABELS["grey_matter"]
    for key in ("cbf", "cbv"):
        ratio = np.median(auto.maps[key][gm]) / np.median(drawn.maps[key][gm])
        assert abs(ratio - 1) < 0.1, key
