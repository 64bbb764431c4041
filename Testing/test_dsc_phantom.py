"""The DSC phantom's own truth: AIF shape and timing, residue areas, noise level, files."""

import json

import numpy as np
import pytest

from perfusionai import io
from perfusionai.phantoms import make_brain_phantom, make_dsc_phantom
from perfusionai.phantoms.dsc import LABELS, arterial_input, residue_function


def _delta_r2(phantom, baseline_frames=10):
    s = phantom.signal.astype(np.float64)
    s0 = s[..., :baseline_frames].mean(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.log(s / s0) / phantom.te


def test_noise_free_aif_peak_timing_and_signal_model():
    p = make_dsc_phantom(tr=0.5, n_frames=120, recirculation=False, aif_peak=70.0, aif_alpha=3.0,
                         aif_beta=1.5, baseline_frames=20)
    # gamma variate: peak 70 /s at arrival (10 s) + alpha*beta (4.5 s) = 14.5 s, on the grid
    assert p.times[np.argmax(p.aif)] == pytest.approx(14.5)
    assert p.aif.max() == pytest.approx(70.0, rel=1e-12)
    assert np.all(p.aif[p.times <= 10.0] == 0)
    # hand-computed value one beta after arrival: 70 * (1/3)^3 * exp(3 - 1)
    assert p.aif[p.times == 11.5][0] == pytest.approx(70 * (1 / 3) ** 3 * np.exp(2), rel=1e-12)
    # S = S0 exp(-TE C): arterial voxels give the AIF back
    conc = _delta_r2(p, 20)
    np.testing.assert_allclose(conc[p.aif_mask].mean(axis=0), p.aif, rtol=0, atol=2e-3)
    # the recirculation adds area after the first pass only
    with_rec = arterial_input(p.times, 10.0, 70.0, 3.0, 1.5, recirculation=True)
    assert np.all(with_rec[p.times < 19.0] == pytest.approx(p.aif[p.times < 19.0]))
    assert with_rec.sum() > 1.05 * p.aif.sum()


@pytest.mark.parametrize("shape", ["exponential", "gamma", "lorentzian"])
def test_residue_functions_start_at_one_and_integrate_to_mtt(shape):
    t = np.linspace(0, 4000.0, 2_000_001)
    r = residue_function(t, 4.0, shape, gamma_shape=3.0)
    assert r[0] == pytest.approx(1.0)
    assert np.all(np.diff(r) <= 1e-15)
    area = np.trapezoid(r, t)
    # the Lorentzian's 1/t^2 tail beyond 4000 s holds (2*MTT/pi)^2 / 4000 s
    tail = (8.0 / np.pi) ** 2 / 4000.0 if shape == "lorentzian" else 0.0
    assert area + tail == pytest.approx(4.0, rel=1e-5)


def test_inverse_crime_tissue_curves_and_discrete_cbv_offset():
    p = make_dsc_phantom(shape=(2, 12, 12), cbf=[30.0, 60.0], cbv=[4.0], tr=1.0, n_frames=100,
                         recirculation=False, kh=1.0, rho=1.0)
    # hand-written left-rectangle convolution for the CBF 60 block
    f = 60.0 / 6000.0
    mtt = 60.0 * 4.0 / 60.0
    r = np.exp(-p.times / mtt)
    expected = np.array([f * 1.0 * np.sum(p.aif[: n + 1] * r[n::-1]) for n in range(p.times.size)])
    np.testing.assert_allclose(p.curve(11), expected, rtol=1e-10, atol=1e-12)
    # sum ratio = 100 F dt sum_m exp(-m dt/MTT) = 100 F dt / (1 - exp(-dt/MTT))
    #           ~ CBV + CBF*dt/120 (research/dsc.md "CBV + CBF*TR/2" with CBF in mL/g/s)
    block = p.rois == 11
    ratio = 100.0 * p.curve(11).sum() / p.aif.sum()
    assert ratio == pytest.approx(100.0 * f / (1.0 - np.exp(-1.0 / mtt)), rel=1e-6)
    assert ratio == pytest.approx(4.0 + 60.0 * 1.0 / 120.0, rel=5e-3)
    assert p.truth["cbv_discrete"][block][0] == pytest.approx(ratio, rel=1e-4)
    assert p.truth["cbv"][block][0] == pytest.approx(4.0)
    assert p.truth["mtt"][block][0] == pytest.approx(4.0)


def test_fine_discretisation_has_no_offset_and_dispersion_moves_tmax():
    p = make_dsc_phantom(shape=(2, 12, 12), cbf=[60.0], cbv=[4.0], delay_s=[1.5], tr=1.0, n_frames=90,
                         discretisation="fine", recirculation=False, kh=1.0, rho=1.0)
    ratio = 100.0 * p.curve(10).sum() / p.aif.sum()
    assert ratio == pytest.approx(4.0, rel=5e-3)
    assert p.truth["tmax"][p.rois == 10][0] == pytest.approx(1.5)
    d = make_dsc_phantom(shape=(2, 12, 12), cbf=[60.0], cbv=[4.0], dispersion_s=3.0, tr=1.0, n_frames=90,
                         discretisation="fine", recirculation=False)
    # exponential kernel (mean 3 s) convolved with exp(-t/4): peak at ln(4/3) * 12 s
    assert d.truth["tmax"][d.rois == 10][0] == pytest.approx(12.0 * np.log(4.0 / 3.0), abs=0.002)


def test_tissue_kappa_scales_tissue_delta_r2_and_analysis_kh_recovers_truth():
    # kappa multiplies the tissue delta-R2* (not the AIF); kh / kappa then gives back the truth
    plain = make_dsc_phantom(shape=(2, 12, 12), cbf=[60.0], cbv=[4.0], tr=1.0, n_frames=90,
                             discretisation="fine", recirculation=False)
    clinical = make_dsc_phantom(shape=(2, 12, 12), cbf=[60.0], cbv=[4.0], tr=1.0, n_frames=90,
                                discretisation="fine", recirculation=False, tissue_kappa=10.0, aif_peak=35.0)
    np.testing.assert_allclose(clinical.curve(10), 10.0 * plain.curve(10) * 35.0 / 80.0, rtol=1e-6, atol=1e-9)
    assert clinical.analysis_kh == pytest.approx(clinical.kh / 10.0)
    ratio = 100.0 * (clinical.analysis_kh / clinical.rho) * clinical.curve(10).sum() / clinical.aif.sum()
    assert ratio == pytest.approx(4.0, rel=5e-3)
    # the point of kappa: clinical signal drops (grey matter 30-40 %) with a 60-70 % arterial drop
    block = clinical.signal[clinical.rois == 10].mean(0)
    artery = clinical.signal[clinical.aif_mask].mean(0)
    assert 0.30 <= 1 - block.min() / block[0] <= 0.45 and 0.6 <= 1 - artery.min() / artery[0] <= 0.7
    assert clinical.describe()["conventions"]["tissue_kappa"] == 10.0
    with pytest.raises(ValueError, match="tissue_kappa"):
        make_dsc_phantom(shape=(2, 12, 12), tissue_kappa=0.0)


def test_rician_noise_matches_requested_snr():
    p = make_dsc_phantom(snr=40.0, seed=3, s0=1000.0)
    sigma = 1000.0 / 40.0
    baseline = p.signal[..., :10][p.rois == LABELS["grey_matter"]].astype(np.float64)
    # at S0/sigma = 40 the Rician magnitude is practically Gaussian
    assert baseline.std(axis=1, ddof=1).mean() == pytest.approx(sigma, rel=0.03)
    assert baseline.mean() == pytest.approx(1000.0 + sigma ** 2 / 2000.0, rel=2e-3)
    background = p.signal[~p.brain_mask].astype(np.float64)
    # pure noise: Rayleigh with mean sigma * sqrt(pi/2)
    assert background.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.02)
    again = make_dsc_phantom(snr=40.0, seed=3, s0=1000.0)
    assert np.array_equal(again.signal, p.signal)


def test_anatomical_regions_and_truth_maps():
    p = make_dsc_phantom(leakage=True, partial_volume=True)
    for name in ("grey_matter", "white_matter", "lesion", "tumour", "artery", "artery_partial_volume"):
        assert np.count_nonzero(p.rois == LABELS[name]) > 20, name
    assert not (p.aif_mask & p.tissue_mask).any()
    gm = p.rois == LABELS["grey_matter"]
    assert np.allclose(p.truth["cbf"][gm], 60.0) and np.allclose(p.truth["mtt"][gm], 4.0)
    lesion = p.rois == LABELS["lesion"]
    assert np.allclose(p.truth["tmax"][lesion], 3.0)
    tumour = p.rois == LABELS["tumour"]
    assert np.allclose(p.truth["k2"][tumour], 0.004) and np.all(p.truth["k2"][gm] == 0)
    # T1 leakage lowers the late tumour curve by k2 * integral of the reference
    assert p.curve(LABELS["tumour"])[-1] < 0
    assert np.all(p.truth["cbf"][~p.tissue_mask] == 0)


def test_brain_phantom_size():
    # generation time (< 3 s on 2 cores) is measured by benchmarks/dsc_speed.py
    p = make_brain_phantom(snr=np.inf)
    assert p.signal.shape == (24, 128, 128, 60) and p.signal.dtype == np.float32
    assert 140_000 <= np.count_nonzero(p.brain_mask) <= 160_000
    assert 200 <= np.count_nonzero(p.aif_mask) <= 2000


def test_save_round_trips_through_io(tmp_path):
    p = make_dsc_phantom(shape=(4, 16, 16), tr=1.5, n_frames=30, snr=50.0, leakage=True)
    out = p.save(tmp_path / "phantom")
    series = io.read_series(out / "dsc.nii.gz")
    assert series.tr == pytest.approx(1.5)
    np.testing.assert_allclose(series.times, p.times)
    np.testing.assert_allclose(series.array, p.signal, rtol=1e-6)
    assert series.geometry.same_grid(p.geometry)
    mask = io.read_mask(out / "aif_mask.nii.gz", series.geometry)
    assert np.array_equal(mask, p.aif_mask)
    assert np.array_equal(io.read_labels(out / "rois.nii.gz", series.geometry), p.rois)
    cbf = io.read_volume(out / "truth_cbf.nii.gz")
    np.testing.assert_allclose(cbf.array, p.truth["cbf"])
    info = json.loads((out / "truth.json").read_text())
    assert info["conventions"]["kh"] == p.kh and info["acquisition"]["tr_s"] == 1.5
    assert {r["name"] for r in info["regions"]} >= {"grey_matter", "tumour"}
    rows = (out / "aif_truth.csv").read_text().splitlines()
    assert len(rows) == 31 and float(rows[15].split(",")[1]) == pytest.approx(p.aif[14], rel=1e-6)
