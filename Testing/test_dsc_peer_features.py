"""Peer features of issue 15 item 3 for DSC, each against a known truth: the automatic brain mask
(--auto-mask), frame-to-frame rigid motion correction (--motion-correction) and the quadratic
blood delta-R2* of the AIF (--aif-relaxivity quadratic)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perfusionai.dsc import DSCModel
from perfusionai.dsc.brain_mask import automatic_brain_mask, otsu_threshold
from perfusionai.phantoms.dsc import LABELS, make_dsc_phantom


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# ---------------------------------------------------------------------------------- automatic mask


def test_otsu_splits_two_classes():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(10, 2, 5000), rng.normal(100, 5, 3000)])
    assert 20 < otsu_threshold(values) < 85


@pytest.mark.parametrize("snr, seed", [(50.0, 1), (20.0, 2)])
def test_automatic_mask_matches_the_phantom_brain_and_keeps_the_arteries(snr, seed):
    p = make_dsc_phantom(shape=(8, 48, 48), n_frames=40, snr=snr, seed=seed)
    auto = automatic_brain_mask(p.signal)
    assert _dice(auto, p.brain_mask) >= 0.9
    assert np.count_nonzero(auto & ~p.brain_mask) == 0          # nothing of the background
    assert np.count_nonzero(auto & p.aif_mask) >= 0.9 * np.count_nonzero(p.aif_mask)


def test_auto_mask_fit_finds_arteries_and_matches_the_given_mask():
    p = make_dsc_phantom(shape=(8, 48, 48), n_frames=40, snr=50.0, seed=4)
    model = DSCModel(p.te, p.times, method="oSVD", auto_mask=True)
    fit = model.fit(p.signal)
    assert fit.inputs["mask"] == "automatic"
    assert _dice(fit.mask, p.brain_mask) >= 0.9
    chosen = fit.aif_voxels
    assert np.mean(p.aif_mask[tuple(chosen.T)]) >= 0.8            # the automatic AIF lies in the arteries
    assert fit.aif_info["looks_arterial"]
    given = DSCModel(p.te, p.times, method="oSVD").fit(p.signal, mask=p.brain_mask)
    gm = (p.rois == LABELS["grey_matter"]) & fit.mask
    assert np.median(fit.cbf[gm]) == pytest.approx(np.median(given.cbf[gm]), rel=0.05)
    whole = DSCModel(p.te, p.times, method="oSVD").fit(p.signal)
    assert whole.inputs["mask"] == "whole image" and whole.mask.all()


def test_dsc_maps_auto_mask_from_the_command_line(tmp_path):
    from perfusionai import io
    from perfusionai.cli import main

    p = make_dsc_phantom(shape=(8, 48, 48), n_frames=40, snr=50.0, seed=5)
    p.save(tmp_path / "ph")
    assert main(["dsc", "maps", "--dsc", str(tmp_path / "ph" / "dsc.nii.gz"), "--te", "0.03", "--auto-mask",
                 "--progress", "none", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["inputs"]["mask"] == "automatic" and summary["options"]["auto_mask"] is True
    cbf = io.read_volume(tmp_path / "out" / "cbf.nii.gz").array
    assert np.count_nonzero(cbf[~p.brain_mask]) == 0               # maps only inside the head
    assert summary["aif"]["looks_arterial"]
    # the mask the maps were computed in is written, for review: the phantom's head, as many voxels as used
    found = io.read_volume(tmp_path / "out" / "auto_mask.nii.gz").array != 0
    assert int(found.sum()) == summary["inputs"]["mask_voxels"]
    assert 2 * (found & p.brain_mask).sum() / (found.sum() + p.brain_mask.sum()) >= 0.9
    assert np.count_nonzero(cbf[~found]) == 0
    assert main(["dsc", "maps", "--dsc", str(tmp_path / "ph" / "dsc.nii.gz"), "--te", "0.03", "--mask",
                 str(tmp_path / "ph" / "brain_mask.nii.gz"), "--progress", "none", "--out", str(tmp_path / "given")]) == 0
    assert not (tmp_path / "given" / "auto_mask.nii.gz").exists()   # a given mask is not written again


# ---------------------------------------------------------------------------------- motion correction


def test_motion_correction_recovers_known_shifts_and_the_motion_free_cbf(tmp_path):
    pytest.importorskip("ants")
    from scipy import ndimage

    from perfusionai import io
    from perfusionai.dsc import DSCMapsJob

    p = make_dsc_phantom(shape=(6, 32, 32), n_frames=24, snr=50.0, seed=6, baseline_frames=8)
    spacing = np.asarray(p.geometry.spacing)                      # mm along (i, j, k)
    shifts_kji = {3: (0.0, 0.0, 1.5), 13: (0.0, 1.5, -1.0), 16: (0.0, -2.0, 1.0), 22: (0.0, 1.0, 2.0)}
    moved = p.signal.copy()
    for frame, shift in shifts_kji.items():     # voxels [k, j, i]: 1.8-3.6 mm in-plane, before and in the bolus
        moved[..., frame] = ndimage.shift(p.signal[..., frame], shift, order=3, mode="nearest")
    rotated = 18                                  # and one frame turned 4 degrees in-plane at the bolus peak
    moved[..., rotated] = ndimage.rotate(p.signal[..., rotated], 4.0, axes=(1, 2), reshape=False, order=3,
                                         mode="nearest")
    p.save(tmp_path / "ph")
    io.write_series(moved, p.geometry, tmp_path / "moved.nii.gz", tr=p.tr)
    common = dict(te=p.te, mask=str(tmp_path / "ph" / "brain_mask.nii.gz"),
                  aif_mask=str(tmp_path / "ph" / "aif_mask.nii.gz"))
    corrected = DSCMapsJob(dsc=str(tmp_path / "moved.nii.gz"), out=str(tmp_path / "corrected"),
                           motion_correction=True, **common).run()
    still = DSCMapsJob(dsc=str(tmp_path / "ph" / "dsc.nii.gz"), out=str(tmp_path / "still"), **common).run()
    summary = json.loads((tmp_path / "corrected" / "summary.json").read_text())
    motion = summary["inputs"]["motion_correction"]
    assert "motion correction" in summary["inputs"]["preprocessing_applied"]
    estimated = np.asarray(motion["translation_mm_ijk"])
    for frame in range(p.signal.shape[-1]):
        shift = shifts_kji.get(frame, (0.0, 0.0, 0.0))
        applied_mm = np.asarray(shift[::-1]) * spacing             # (i, j, k) mm
        assert np.abs(estimated[frame] - applied_mm).max() < 0.5, frame
    rotation = np.asarray(motion["rotation_deg"])
    assert rotation[rotated] == pytest.approx(4.0, abs=0.5)
    assert np.delete(rotation, rotated).max() < 0.5
    gm = p.rois == LABELS["grey_matter"]
    cbf_corrected = np.median(corrected.maps["cbf"][gm])
    cbf_still = np.median(still.maps["cbf"][gm])
    assert cbf_corrected == pytest.approx(cbf_still, rel=0.10)
    uncorrected = DSCModel(p.te, p.times).fit(moved, mask=p.brain_mask, aif_mask=p.aif_mask)
    assert abs(np.median(uncorrected.cbf[gm]) / cbf_still - 1) > 0.3   # the motion matters
    assert np.array_equal(moved[..., 0], io.read_series(tmp_path / "moved.nii.gz").array[..., 0])  # input untouched


# ---------------------------------------------------------------------------------- quadratic blood delta R2*

A, B = 7.6, 0.57   # test values of the order reported for whole blood at 1.5 T (1/(s mM), 1/(s mM^2))


def _quadratic_phantom():
    from perfusionai.dsc.relaxivity import linear_to_quadratic

    p = make_dsc_phantom(shape=(4, 24, 24), n_frames=50, snr=np.inf, seed=1)
    signal = p.signal.copy()
    signal[p.aif_mask] = (p.s0 * np.exp(-p.te * linear_to_quadratic(p.aif, A, B)))[None, :]
    return p, signal


def test_quadratic_relaxivity_inverts_exactly():
    from perfusionai.dsc.relaxivity import linear_to_quadratic, quadratic_to_linear

    x = np.linspace(-2.0, 150.0, 500)
    np.testing.assert_allclose(quadratic_to_linear(linear_to_quadratic(x, A, B), A, B), x, atol=1e-9)
    np.testing.assert_allclose(quadratic_to_linear(x, A, 0.0), x)


def test_quadratic_aif_recovers_cbv_and_cbf_and_linear_is_biased():
    p, signal = _quadratic_phantom()
    gm = p.rois == LABELS["grey_matter"]
    wm = p.rois == LABELS["white_matter"]

    def ratios(fit):
        return [float(np.median(fit.maps[m][r] / p.truth[t][r])) for m, t in (("cbv", "cbv_discrete"), ("cbf", "cbf"))
                for r in (gm, wm)]

    def fit(quadratic, aif_mask=p.aif_mask):   # noise-free, inverse-crime: sSVD at a tiny threshold is exact
        return DSCModel(p.te, p.times, method="sSVD", threshold=0.001, aif_quadratic=quadratic).fit(
            signal, mask=p.brain_mask, aif_mask=aif_mask)

    with_option = fit((A, B))
    assert np.allclose(ratios(with_option), 1.0, atol=0.02)
    assert with_option.aif.max() == pytest.approx(p.aif.max(), rel=0.01)
    assert "quadratic AIF relaxivity" in with_option.inputs["preprocessing_applied"]
    linear = ratios(fit(None))
    assert max(linear) < 0.9                                      # CBV ~ -33 %, CBF ~ -13 % without it
    automatic = fit((A, B), aif_mask=None)                         # per-voxel on the automatic AIF too
    assert np.mean(p.aif_mask[tuple(automatic.aif_voxels.T)]) == 1.0
    assert np.allclose(ratios(automatic), 1.0, atol=0.02)


def test_dsc_maps_aif_quadratic_from_the_command_line(tmp_path, capsys):
    from perfusionai import io
    from perfusionai.cli import main

    p, signal = _quadratic_phantom()
    p.save(tmp_path / "ph")
    io.write_series(signal, p.geometry, tmp_path / "quadratic.nii.gz", tr=p.tr)
    common = ["dsc", "maps", "--dsc", str(tmp_path / "quadratic.nii.gz"), "--te", str(p.te), "--aif-mask",
              str(tmp_path / "ph" / "aif_mask.nii.gz"), "--mask", str(tmp_path / "ph" / "brain_mask.nii.gz"),
              "--method", "sSVD", "--threshold", "0.001", "--progress", "none"]
    assert main(common + ["--aif-quadratic", str(A), str(B), "--out", str(tmp_path / "q")]) == 0
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["aif"]["relaxivity"] == {"model": "quadratic", "A_per_s_per_mM": A, "B_per_s_per_mM2": B}
    assert summary["job"]["options"]["aif_quadratic"] == [A, B]
    gm = p.rois == LABELS["grey_matter"]
    cbv = io.read_volume(tmp_path / "q" / "cbv.nii.gz").array
    assert np.median(cbv[gm] / p.truth["cbv_discrete"][gm]) == pytest.approx(1.0, abs=0.02)
    assert main(common + ["--aif-quadratic", "0", str(B), "--out", str(tmp_path / "bad")]) == 2
    assert "--aif-quadratic" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_peer_feature_options_round_trip_through_the_command_line():
    from perfusionai.dsc import DSCMapsJob

    job = DSCMapsJob(dsc="series.nii.gz", out="out", te=0.03, auto_mask=True, motion_correction=True,
                     aif_quadratic=(A, B))
    argv = job.to_argv()
    assert "--auto-mask" in argv and "--motion-correction" in argv
    assert argv[argv.index("--aif-quadratic") + 1:argv.index("--aif-quadratic") + 3] == [str(A), str(B)]
    assert DSCMapsJob.from_argv(argv) == job
    assert DSCMapsJob.from_json(job.to_json()) == job
