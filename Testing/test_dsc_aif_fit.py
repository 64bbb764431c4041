"""Gamma-variate AIF fit with recirculation removed (perfusionai.dsc.aif_fit) and the FWHM map,
from the library and from ``perfusionai dsc maps`` (--aif-gamma-fit, --fwhm-map)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perfusionai.dsc.aif_fit import fit_gamma_variate, gamma_variate
from perfusionai.errors import PerfusionAIError
from perfusionai.phantoms.dsc import arterial_input, make_dsc_phantom


@pytest.mark.parametrize("tr, noise", [(1.0, 0.0), (1.5, 0.0), (1.5, 0.8)])
def test_first_pass_recovered_and_recirculation_removed(tr, noise):
    t = np.arange(60) * tr
    measured = arterial_input(t, 10.0, 40.0, 3.0, 1.5, recirculation=True)
    truth = arterial_input(t, 10.0, 40.0, 3.0, 1.5, recirculation=False)
    measured = measured + noise * np.random.default_rng(7).standard_normal(t.size)
    fit = fit_gamma_variate(measured, t)
    assert np.linalg.norm(fit.first_pass - truth) / np.linalg.norm(truth) < 0.03
    assert np.trapezoid(fit.first_pass, t) == pytest.approx(np.trapezoid(truth, t), rel=0.02)
    assert fit.peak == pytest.approx(40.0, rel=0.03)
    assert fit.t0 + fit.t_peak == pytest.approx(10.0 + 4.5, abs=0.3)          # time of the first-pass peak
    # the recirculation (12 % of the peak, 9 s later) is what is left
    late = t > 20
    assert np.max(fit.recirculation[late]) == pytest.approx(0.12 * 40.0, rel=0.25)
    assert fit.first_pass[t > 35].max() < 0.01 * 40.0
    np.testing.assert_allclose(fit.first_pass, gamma_variate(t, fit.t0, fit.peak, fit.alpha, fit.t_peak))


def test_refuses_a_curve_without_bolus():
    with pytest.raises(PerfusionAIError, match="AIF"):
        fit_gamma_variate(np.zeros(30), np.arange(30.0))


def test_dsc_maps_with_gamma_fit_and_fwhm_map(tmp_path):
    from perfusionai import io
    from perfusionai.cli import main

    phantom = make_dsc_phantom(shape=(2, 20, 20), n_frames=50, tr=1.0, snr=200, seed=3, recirculation=True,
                               lesion=False, tumour=False, tissue_kappa=10, aif_peak=35)
    phantom.save(tmp_path / "ph")
    out = tmp_path / "maps"
    code = main(["dsc", "maps", "--dsc", str(tmp_path / "ph" / "dsc.nii.gz"), "--te", "0.03",
                 "--aif-mask", str(tmp_path / "ph" / "aif_mask.nii.gz"), "--mask", str(tmp_path / "ph" / "brain_mask.nii.gz"),
                 "--kh", str(phantom.analysis_kh), "--aif-gamma-fit", "--fwhm-map", "--progress", "none",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    details = summary.get("details", summary)
    gamma = details["aif"]["gamma_fit"]
    assert gamma["peak_per_s"] == pytest.approx(35.0, rel=0.05) and gamma["r2"] > 0.99
    # the AIF written is the fitted first pass: no recirculation bump 9 s after the first arrival
    rows = np.loadtxt(out / "aif.csv", delimiter=",", skiprows=1)
    first_pass = arterial_input(rows[:, 0], 10.0, 35.0, 3.0, 1.5, recirculation=False)
    assert np.max(np.abs(rows[:, 1] - first_pass)) < 0.03 * 35.0
    # FWHM of the concentration curves (s): the noise-free grey-matter curve's width, read on the frames
    fwhm = io.read_volume(out / "fwhm.nii.gz").array
    assert summary["units"]["fwhm"] == "s"
    gm_curve = phantom.curve(1)
    above = np.flatnonzero(gm_curve >= 0.5 * gm_curve.max())
    expected = above[-1] - above[0]                     # frames = s at TR 1 s (within one frame)
    assert abs(np.median(fwhm[phantom.rois == 1]) - expected) <= 1.0
    cbf = io.read_volume(out / "cbf.nii.gz").array
    assert np.median(cbf[phantom.rois == 1]) == pytest.approx(60.0, rel=0.35)
