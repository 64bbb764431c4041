"""The delay-aware parametric deconvolution (perfusionai.dsc.parametric, ``--method parametric``)
and the voxel-wise DSC DRO it is tested on (perfusionai.phantoms.dsc_dro).

The accuracy tests use the targets of issue 15 (SNR 50, TR 1.5 s, delays 0-4 s continuous, CBF
30-220, MTT 2.5-13 s, fine-grid simulation): CBF median relative error <= 15 % (exponential), 20 %
(gamma), 25 % (linear residue, outside the model's gamma family), CBF Spearman >= 0.95, CBV
median error <= 5 %, Tmax mean absolute error <= 1 s -- with residue shapes and noise seeds of
their own (the gamma shapes 2.5 and 4.5 are not nodes of the start grid).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from perfusionai.dsc import maps
from perfusionai.dsc.concentration import signal_to_concentration
from perfusionai.dsc.parametric import fit_parametric
from perfusionai.errors import ParameterError, PerfusionAIError
from perfusionai.phantoms.dsc_dro import dro_residue, make_dsc_dro


def _curves(dro):
    tissue = signal_to_concentration(dro.signal, dro.te, dro.baseline_frames).concentration
    aif = signal_to_concentration(dro.aif_signal, dro.te, dro.baseline_frames).concentration
    return tissue, aif.astype(np.float64).mean(axis=0)


def _scores(dro, result, tissue, aif):
    cbf = maps.cbf_map(result.cbf, dro.analysis_kh, dro.rho)
    cbv = maps.cbv_map(tissue, aif, dro.tr, dro.analysis_kh, dro.rho)
    truth = dro.truth
    return {"cbf_error": float(np.median(np.abs(cbf / truth["cbf"] - 1))),
            "cbf_spearman": float(stats.spearmanr(cbf, truth["cbf"])[0]),
            "cbv_error": float(np.median(np.abs(cbv / truth["cbv"] - 1))),
            "tmax_mae": float(np.mean(np.abs(result.tmax - truth["tmax"])))}


@pytest.mark.parametrize("residue, gamma_shape, seed, cbf_limit", [
    ("exponential", 1.0, 101, 0.15),
    ("gamma", 2.5, 102, 0.20),
    ("gamma", 4.5, 103, 0.20),
    ("linear", 1.0, 104, 0.25),
])
def test_issue15_targets_on_the_dro(residue, gamma_shape, seed, cbf_limit):
    dro = make_dsc_dro(1000, residue=residue, gamma_shape=gamma_shape, snr=50, tr=1.5, seed=seed,
                       delay_range=(0.0, 4.0), cbf_range=(30.0, 220.0), mtt_range=(2.5, 13.0), fine_step_s=0.02)
    tissue, aif = _curves(dro)
    result = fit_parametric(tissue, aif, dro.tr)
    score = _scores(dro, result, tissue, aif)
    assert score["cbf_error"] <= cbf_limit, score
    assert score["cbf_spearman"] >= 0.95, score
    assert score["cbv_error"] <= 0.05, score
    assert score["tmax_mae"] <= 1.0, score
    # every voxel is accounted for: converged or flagged, none dropped
    assert result.cbf.shape == (1000,) and np.all(np.isfinite(result.cbf))
    assert result.info["n_converged"] + result.info["n_not_converged"] == 1000
    assert result.info["n_not_converged"] <= 10
    assert np.nanmedian(result.r2) > 0.95


def test_beats_osvd_tmax_and_cbf_where_svd_is_biased():
    from perfusionai.dsc import deconvolution as dec

    dro = make_dsc_dro(600, residue="exponential", snr=50, seed=105, fine_step_s=0.02)
    tissue, aif = _curves(dro)
    par = _scores(dro, fit_parametric(tissue, aif, dro.tr), tissue, aif)
    osvd = dec.deconvolve(tissue, aif, dro.tr, "oSVD")
    osvd_cbf = maps.cbf_map(osvd.cbf, dro.analysis_kh, dro.rho)
    osvd_error = float(np.median(np.abs(osvd_cbf / dro.truth["cbf"] - 1)))
    osvd_tmax = float(np.mean(np.abs(osvd.tmax_seconds() - dro.truth["tmax"])))
    assert osvd_error > 0.2 and osvd_tmax > 1.5          # the known SVD bias on this DRO
    assert par["cbf_error"] < osvd_error / 3 and par["tmax_mae"] < osvd_tmax / 5


def test_noise_free_exponential_is_recovered_with_continuous_delays():
    dro = make_dsc_dro(300, residue="exponential", snr=np.inf, seed=106, delay_range=(-1.0, 6.0))
    tissue, aif = _curves(dro)
    result = fit_parametric(tissue, aif, dro.tr, shape=1.0)
    cbf = maps.cbf_map(result.cbf, dro.analysis_kh, dro.rho)
    assert np.median(np.abs(cbf / dro.truth["cbf"] - 1)) < 0.01
    assert np.max(np.abs(cbf / dro.truth["cbf"] - 1)) < 0.05
    assert np.median(np.abs(result.delay - dro.truth["delay"])) < 0.03     # seconds, TR 1.5 s
    assert np.median(np.abs(result.mtt_residue / dro.truth["mtt"] - 1)) < 0.02
    assert result.info["shape_mode"] == "fixed" and np.all(result.shape == 1.0)


def test_population_shape_is_estimated():
    dro = make_dsc_dro(600, residue="gamma", gamma_shape=3.0, snr=np.inf, seed=107, fine_step_s=0.02)
    tissue, aif = _curves(dro)
    result = fit_parametric(tissue, aif, dro.tr)
    assert result.info["shape_mode"] == "population"
    assert 2.5 < result.info["shape"] < 3.5
    cbf = maps.cbf_map(result.cbf, dro.analysis_kh, dro.rho)
    assert np.median(np.abs(cbf / dro.truth["cbf"] - 1)) < 0.03


@pytest.mark.parametrize("prior", [None, 0.3])
def test_per_voxel_shape_paths(prior):
    """Free per-voxel shapes (``shape_prior_sd=None``) and a Gaussian prior on log alpha (0.3)."""
    dro = make_dsc_dro(200, residue="exponential", snr=np.inf, seed=108)
    tissue, aif = _curves(dro)
    result = fit_parametric(tissue, aif, dro.tr, shape_prior_sd=prior)
    assert result.info["shape_mode"] == ("free" if prior is None else "prior")
    cbf = maps.cbf_map(result.cbf, dro.analysis_kh, dro.rho)
    assert np.median(np.abs(cbf / dro.truth["cbf"] - 1)) < 0.03
    assert np.median(result.shape) < 1.3
    assert np.mean(np.abs(result.tmax - dro.truth["tmax"])) < 0.2


def test_non_converged_and_non_finite_voxels_are_flagged_and_counted():
    dro = make_dsc_dro(300, residue="exponential", snr=50, seed=109)
    tissue, aif = _curves(dro)
    tissue = np.array(tissue, dtype=np.float64)
    tissue[5, 20] = np.nan
    before = tissue.copy()
    result = fit_parametric(tissue, aif, dro.tr, max_iterations=1)
    np.testing.assert_array_equal(np.isnan(tissue), np.isnan(before))      # input not modified
    assert not result.converged[5] and result.info["n_non_finite_curves"] == 1
    assert result.info["n_not_converged"] == int((~result.converged).sum()) > 10
    assert result.cbf.shape == (300,) and np.all(np.isfinite(result.cbf))  # kept, not dropped
    full = fit_parametric(tissue, aif, dro.tr)
    assert full.info["n_not_converged"] < result.info["n_not_converged"]


def test_errors_name_the_input_or_parameter():
    dro = make_dsc_dro(20, snr=np.inf, seed=110)
    tissue, aif = _curves(dro)
    with pytest.raises(PerfusionAIError, match="AIF"):
        fit_parametric(tissue, aif[:-1], dro.tr)
    with pytest.raises(PerfusionAIError, match="AIF"):
        fit_parametric(tissue, np.zeros_like(aif), dro.tr)
    with pytest.raises(ParameterError, match="parametric_delay_bounds"):
        fit_parametric(tissue, aif, dro.tr, delay_bounds=(3.0, 1.0))
    with pytest.raises(ParameterError, match="parametric_shape"):
        fit_parametric(tissue, aif, dro.tr, shape=-1.0)


def test_method_parametric_through_dscmodel_and_the_registry():
    from perfusionai.dsc import DSCModel
    from perfusionai.dsc.methods import resolve_method

    assert resolve_method("Parametric").name == "parametric"
    dro = make_dsc_dro(400, residue="gamma", gamma_shape=3.0, snr=50, seed=111)
    signal, tissue_mask, _ = dro.as_series(width=32)
    _, aif = _curves(dro)
    fit = DSCModel(dro.te, tr=dro.tr, method="parametric", kh=dro.analysis_kh, rho=dro.rho,
                   baseline_frames=dro.baseline_frames).fit(signal, mask=tissue_mask, aif=aif)
    assert {"cbv", "cbf", "mtt", "tmax", "ttp", "fit_r2", "converged"} <= set(fit.maps)
    cbf = fit.cbf[tissue_mask]
    assert np.median(np.abs(cbf / dro.truth["cbf"] - 1)) < 0.15
    assert np.mean(np.abs(fit.tmax[tissue_mask] - dro.truth["tmax"])) < 1.0
    np.testing.assert_allclose(fit.mtt[tissue_mask], 60 * fit.cbv[tissue_mask] / cbf, rtol=1e-4)
    summary = fit.summary()
    assert summary["method"] == "parametric"
    assert summary["regularisation"]["n_not_converged"] == int((fit.maps["converged"][tissue_mask] == 0).sum())


# --------------------------------------------------------------------------------------
# the DRO itself


def test_dro_truth_is_consistent():
    t = np.linspace(0, 200, 200001)
    for shape in ("exponential", "gamma", "linear"):
        r = dro_residue(t, 6.0, shape, 3.0)
        assert r[0] == pytest.approx(1.0)
        assert np.trapezoid(r, t) == pytest.approx(6.0, rel=1e-3)     # integral of R = MTT
    dro = make_dsc_dro(200, residue="linear", snr=np.inf, seed=112)
    np.testing.assert_allclose(dro.truth["cbv"], dro.truth["cbf"] * dro.truth["mtt"] / 60)
    # noise-free integral ratio = CBV (fine-grid simulation; the window holds the whole first pass)
    cbv = maps.cbv_map(dro.concentration, dro.aif, dro.tr, dro.analysis_kh, dro.rho)
    assert np.median(np.abs(cbv / dro.truth["cbv"] - 1)) < 0.01
    assert 0 <= dro.truth["delay"].min() and dro.truth["delay"].max() <= 4
    signal, tissue, arterial = dro.as_series(width=16)
    assert signal.shape[:3] == tissue.shape == arterial.shape and signal.shape[-1] == dro.times.size
    assert tissue.sum() == 200 and arterial.sum() == dro.aif_signal.shape[0] and not (tissue & arterial).any()
    np.testing.assert_array_equal(signal[tissue], dro.signal)


def test_command_line_writes_fit_quality_and_true_tmax(tmp_path):
    """``perfusionai dsc maps --method parametric`` on a phantom whose lesion's bolus is 3 s late."""
    import json

    from perfusionai import io
    from perfusionai.cli import main
    from perfusionai.phantoms.dsc import make_dsc_phantom

    phantom = make_dsc_phantom(shape=(2, 24, 24), n_frames=50, tr=1.5, snr=100, seed=113, discretisation="fine",
                               tissue_kappa=10, aif_peak=35, lesion_delay_s=3.0, tumour=False)
    phantom.save(tmp_path / "ph")
    out = tmp_path / "maps"
    code = main(["dsc", "maps", "--dsc", str(tmp_path / "ph" / "dsc.nii.gz"), "--te", "0.03",
                 "--aif-mask", str(tmp_path / "ph" / "aif_mask.nii.gz"), "--mask", str(tmp_path / "ph" / "brain_mask.nii.gz"),
                 "--kh", str(phantom.analysis_kh), "--method", "parametric", "--progress", "none", "--out", str(out)])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"cbf.nii.gz", "tmax.nii.gz", "fit_r2.nii.gz", "converged.nii.gz", "summary.json"} <= names
    tmax = io.read_volume(out / "tmax.nii.gz").array
    cbf = io.read_volume(out / "cbf.nii.gz").array
    for label, delay, flow in ((1, 0.0, 60.0), (3, 3.0, 15.0)):     # grey matter, delayed lesion
        roi = phantom.rois == label
        assert abs(np.median(tmax[roi]) - delay) < 0.5
        assert np.median(cbf[roi]) == pytest.approx(flow, rel=0.15)
    summary = json.loads((out / "summary.json").read_text())
    details = summary.get("details", summary)
    assert details["method"] == "parametric"
    assert details["regularisation"]["n_not_converged"] == int((io.read_volume(out / "converged.nii.gz").array[phantom.brain_mask] == 0).sum())


def test_parametric_shape_option_fixes_the_residue_shape():
    from perfusionai.dsc import DSCModel
    from perfusionai.dsc.job import DSCMapsJob

    dro = make_dsc_dro(200, residue="exponential", snr=np.inf, seed=114)
    signal, tissue_mask, _ = dro.as_series(width=20)
    _, aif = _curves(dro)
    fit = DSCModel(dro.te, tr=dro.tr, method="parametric", parametric_shape=1.0, kh=dro.analysis_kh, rho=dro.rho,
                   baseline_frames=dro.baseline_frames).fit(signal, mask=tissue_mask, aif=aif)
    info = fit.summary()["regularisation"]
    assert info["shape_mode"] == "fixed" and info["shape"] == 1.0
    assert np.median(np.abs(fit.cbf[tissue_mask] / dro.truth["cbf"] - 1)) < 0.02
    job = DSCMapsJob.from_argv(["--dsc", "x.nii.gz", "--out", "o", "--method", "parametric", "--parametric-shape", "2"])
    assert job.parametric_shape == 2.0 and DSCMapsJob.from_argv(job.to_argv()) == job


def test_dispersion_option_models_a_dispersed_bolus():
    from perfusionai.dsc.parametric import dispersed_residue_peak

    mtt = np.array([3.0, 6.0, 12.0])                       # exponential residue and kernel: closed-form peak
    np.testing.assert_allclose(dispersed_residue_peak(1.0, mtt, 2.0), np.log(mtt / 2) * mtt * 2 / (mtt - 2), rtol=1e-4)
    dro = make_dsc_dro(500, residue="exponential", snr=50, seed=115, dispersion_s=2.0, fine_step_s=0.02)
    tissue, aif = _curves(dro)
    ignored = _scores(dro, fit_parametric(tissue, aif, dro.tr), tissue, aif)
    modelled = _scores(dro, fit_parametric(tissue, aif, dro.tr, dispersion_s=2.0), tissue, aif)
    assert ignored["cbf_error"] > 0.2                        # dispersion not modelled: CBF reads low
    assert modelled["cbf_error"] < 0.1 and modelled["tmax_mae"] < 0.5 and modelled["cbf_spearman"] > 0.95
    with pytest.raises(ParameterError, match="parametric_dispersion_s"):
        fit_parametric(tissue, aif, dro.tr, dispersion_s=1.0, shape_prior_sd=None)
