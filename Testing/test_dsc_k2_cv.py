"""K2 coefficient-of-variation map and BSW correction only where K2 is reliable
(perfusionai.dsc.leakage.bsw_correct(max_k2_cv=...), ``dsc maps --leakage-max-k2-cv``)."""

from __future__ import annotations

import numpy as np

from perfusionai.dsc.concentration import signal_to_concentration
from perfusionai.dsc.leakage import bsw_correct
from perfusionai.phantoms.dsc import LABELS, make_dsc_phantom


def _phantom():
    return make_dsc_phantom(shape=(2, 28, 28), n_frames=60, tr=1.0, snr=100, seed=21, leakage=True,
                            leakage_k2=0.01, tissue_kappa=10, aif_peak=35, discretisation="fine")


def test_k2_cv_separates_leaky_tumour_from_normal_tissue():
    p = _phantom()
    conc = signal_to_concentration(p.signal, p.te, 10, p.brain_mask).concentration
    everywhere = bsw_correct(conc, p.brain_mask, p.times)
    tumour = p.rois == LABELS["tumour"]
    normal = np.isin(p.rois, (LABELS["grey_matter"], LABELS["white_matter"]))
    # K2 is well determined where the tumour leaks, noise elsewhere
    assert np.median(everywhere.k2_cv[tumour]) < 0.3
    assert np.median(everywhere.k2_cv[normal]) > 1.0
    # the standard error is honest: the spread of K2 over normal voxels (truth 0) matches it
    se = everywhere.k2_cv[normal] * np.abs(everywhere.k2[normal])
    assert 0.5 < np.std(everywhere.k2[normal]) / np.median(se) < 2.0
    gated = bsw_correct(conc, p.brain_mask, p.times, max_k2_cv=0.5)
    assert gated.corrected_mask[tumour].mean() > 0.8 and gated.corrected_mask[normal].mean() < 0.5
    # voxels judged unreliable keep their measured curve; reliable ones get the same correction
    untouched = p.brain_mask & ~gated.corrected_mask
    np.testing.assert_array_equal(gated.corrected[untouched], conc[untouched])
    np.testing.assert_allclose(gated.corrected[tumour & gated.corrected_mask],
                               everywhere.corrected[tumour & gated.corrected_mask], rtol=1e-6)


def test_dsc_maps_writes_k2_cv_and_gates_the_correction(tmp_path):
    from perfusionai import io
    from perfusionai.cli import main

    p = _phantom()
    p.save(tmp_path / "ph")
    common = ["dsc", "maps", "--dsc", str(tmp_path / "ph" / "dsc.nii.gz"), "--te", "0.03", "--aif-mask",
              str(tmp_path / "ph" / "aif_mask.nii.gz"), "--mask", str(tmp_path / "ph" / "brain_mask.nii.gz"),
              "--kh", str(p.analysis_kh), "--leakage-correction", "--progress", "none"]
    assert main(common + ["--out", str(tmp_path / "all")]) == 0
    assert main(common + ["--leakage-max-k2-cv", "0.5", "--out", str(tmp_path / "gated")]) == 0
    cv = io.read_volume(tmp_path / "gated" / "k2_cv.nii.gz").array
    tumour = p.rois == LABELS["tumour"]
    assert np.median(cv[tumour]) < 0.3
    truth = p.truth["cbv"]
    cbv_all = io.read_volume(tmp_path / "all" / "cbv.nii.gz").array
    cbv_gated = io.read_volume(tmp_path / "gated" / "cbv.nii.gz").array
    # the tumour is corrected either way (CBV near its truth); normal tissue gated is no worse
    assert abs(np.median(cbv_gated[tumour]) / np.median(truth[tumour]) - 1) < 0.15
    gm = p.rois == LABELS["grey_matter"]
    err_all = np.median(np.abs(cbv_all[gm] / truth[gm] - 1))
    err_gated = np.median(np.abs(cbv_gated[gm] / truth[gm] - 1))
    assert err_gated <= err_all + 0.005
