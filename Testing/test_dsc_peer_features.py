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
