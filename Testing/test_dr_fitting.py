"""Diffusion-relaxation fits against known truth: hand-computed log-linear values, noise-free phantoms."""

import json
from pathlib import Path

import numpy as np
import pytest

from perfusionai.dr import fitting, models
from perfusionai.phantoms.dr import make_dr_phantom

OSIPI = Path(__file__).resolve().parent / "data" / "osipi_ivim" / "generic.json"
CLIN_B = np.array([0.0, 50.0, 100.0, 400.0, 900.0])


def _hand_loglinear(b, s):
    """Straight-line least squares of log S on b written out (b in ms/um2): returns S0, ADC."""
    x = b / 1000.0
    y = np.log(s)
    slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
    return float(np.exp(y.mean() - slope * x.mean())), float(-slope)


def test_clinical_fit_equals_hand_computed_loglinear_values():
    """Bi-exponential signals from OSIPI truths at the clinical b-values; every map equals the hand recipe."""
    data = json.loads(OSIPI.read_text())
    cases = [k for k in data if k != "config"]
    truth = np.asarray([[data[k]["f"], data[k]["Dp"] * 1e3, data[k]["D"] * 1e3] for k in cases])
    signals = models.ivim(CLIN_B, np.full(len(cases), 800.0), truth[:, 0], truth[:, 1], truth[:, 2])
    result = fitting.fit_clinical(signals, CLIN_B)
    for i in range(len(cases)):
        s0, adc = _hand_loglinear(CLIN_B, signals[i])
        _, adc_fast = _hand_loglinear(CLIN_B[:3], signals[i, :3])
        s0_slow, adc_slow = _hand_loglinear(CLIN_B[2:], signals[i, 2:])
        assert result.maps["s0"][i] == pytest.approx(s0, rel=1e-12)
        assert result.maps["adc"][i] == pytest.approx(adc, rel=1e-12)
        assert result.maps["adc_fast"][i] == pytest.approx(adc_fast, rel=1e-12)
        assert result.maps["adc_slow"][i] == pytest.approx(adc_slow, rel=1e-12)
        assert result.maps["f_proxy"][i] == pytest.approx(1 - s0_slow / s0, rel=1e-10, abs=1e-14)
        # numpy's own straight-line fit agrees (a second, independent hand computation)
        slope, intercept = np.polyfit(CLIN_B / 1000, np.log(signals[i]), 1)
        assert result.maps["adc"][i] == pytest.approx(-slope, rel=1e-10)
    # ADC_slow is close to, and not below, the tissue D for these perfused tissues (log-linear on b >= 100)
    assert np.all(result.maps["adc_slow"] >= truth[:, 2] * 0.999)


def test_clinical_fit_of_monoexponential_signals_is_exact():
    s0 = np.array([1000.0, 432.1, 5.0])
    adc = np.array([0.7, 1.5, 3.0])  # um2/ms
    signals = models.monoexponential(CLIN_B, s0, adc)
    result = fitting.fit_clinical(signals, CLIN_B)
    for name in ("adc", "adc_fast", "adc_slow"):
        np.testing.assert_allclose(result.maps[name], adc, rtol=1e-12)
    np.testing.assert_allclose(result.maps["s0"], s0, rtol=1e-12)
    np.testing.assert_allclose(result.maps["f_proxy"], 0.0, atol=1e-12)


def test_clinical_fit_uses_only_the_minimum_echo_time_of_an_advanced_series():
    ph = make_dr_phantom(shape=(1, 12, 12), snr=None, seed=3)
    body = ph.body
    full = fitting.fit_clinical(ph.dwi[body].astype(float), ph.protocol.bvals, ph.protocol.tes)
    clinical, protocol = ph.clinical()
    subset = fitting.fit_clinical(clinical[body].astype(float), protocol.bvals)
    for name in models.CLINICAL_MAPS:
        np.testing.assert_array_equal(full.maps[name], subset.maps[name])


def test_advanced_fit_recovers_every_parameter_of_a_noise_free_phantom():
    ph = make_dr_phantom(shape=(2, 24, 24), snr=None, seed=11)
    body = ph.body
    assert ph.tumour.sum() > 10 and len(np.unique(ph.labels)) == 5
    result = fitting.fit_t2ivimkurtosis(ph.dwi[body].astype(float), ph.protocol.bvals, ph.protocol.tes)
    assert np.all(result.status == 1)
    for name in models.ADVANCED_MAPS:
        rel = np.abs(result.maps[name] / ph.truth[name][body] - 1)
        assert rel.max() < 1e-3, f"{name}: worst relative error {rel.max():.2e}"


def test_advanced_fit_recovers_random_parameters_inside_the_bounds():
    rng = np.random.default_rng(5)
    n = 400
    truth = dict(s0=rng.uniform(100, 3000, n), f=rng.uniform(0.03, 0.6, n), dv=rng.uniform(8, 80, n),
                 t2v=rng.uniform(160, 240, n), dt=rng.uniform(0.4, 2.5, n), k=rng.uniform(0.0, 1.4, n),
                 t2t=rng.uniform(25, 130, n))
    protocol = models.Protocol.advanced()
    signals = models.signal("t2ivimkurtosis", protocol, truth)
    result = fitting.fit_t2ivimkurtosis(signals, protocol.bvals, protocol.tes)
    for name in models.ADVANCED_MAPS:
        np.testing.assert_allclose(result.maps[name], truth[name], rtol=1e-3, atol=1e-6 if name == "k" else 0,
                                   err_msg=name)


def test_advanced_fit_respects_custom_bounds():
    ph = make_dr_phantom(shape=(1, 16, 16), snr=30, seed=2)
    body = ph.body
    lower = (0.8, 0.0, 4.0, 150.0, 0.2, 0.0, 20.0)
    upper = (12.0, 0.15, 30.0, 250.0, 3.0, 1.0, 140.0)
    result = fitting.fit_t2ivimkurtosis(ph.dwi[body].astype(float), ph.protocol.bvals, ph.protocol.tes,
                                        lower=lower, upper=upper)
    peak = ph.dwi[body].max(axis=1)
    assert np.all(result.maps["s0"] >= 0.8 * peak * (1 - 1e-9))
    for i, name in enumerate(models.ADVANCED_MAPS[1:], start=1):
        assert result.maps[name].min() >= lower[i] - 1e-12 and result.maps[name].max() <= upper[i] + 1e-12
    assert np.any(np.isclose(result.maps["f"], 0.15))  # the liver's f = 0.22 is pushed onto the upper bound


@pytest.mark.parametrize("noise_model", ["rician", "offset"])
def test_noise_floor_correction_reduces_the_rician_bias(noise_model):
    """Low SNR (12): the magnitude floor lifts the late-TE/high-b signals, which biases S0 low and
    T2t long in a plain least-squares fit; both noise-floor models reduce those biases."""
    ph = make_dr_phantom(shape=(2, 32, 32), snr=12, seed=4, heterogeneity=0.0)
    liver = ph.labels == 1
    signals = ph.dwi[liver].astype(float)
    plain = fitting.fit_t2ivimkurtosis(signals, ph.protocol.bvals, ph.protocol.tes)
    corrected = fitting.fit_t2ivimkurtosis(signals, ph.protocol.bvals, ph.protocol.tes, noise_sigma=ph.noise_sigma,
                                           noise_model=noise_model)
    assert corrected.info["noise_floor"] == noise_model

    def bias(result, name):
        return float(np.median(result.maps[name] / ph.truth[name][liver] - 1))

    assert bias(plain, "s0") < -0.08 and bias(plain, "t2t") > 0.08
    # the offset-Gaussian floor over-corrects the high-b decay (Dt biased high instead of low)
    for name in ("s0", "t2t", "t2v") + (("dt",) if noise_model == "rician" else ()):
        assert abs(bias(corrected, name)) < abs(bias(plain, name)), name
    if noise_model == "rician":  # the exact Rician mean removes most of the bias
        for name in ("s0", "t2t", "t2v", "dt"):
            assert abs(bias(corrected, name)) < 0.6 * abs(bias(plain, name)), name


def test_ivim_fit_recovers_noise_free_parameters():
    rng = np.random.default_rng(1)
    n = 300
    b = np.array([0, 10, 20, 40, 60, 80, 100, 150, 200, 300, 400, 600, 800, 1000.0])
    truth = dict(s0=rng.uniform(200, 2000, n), f=rng.uniform(0.05, 0.5, n), dstar=rng.uniform(10, 100, n),
                 d=rng.uniform(0.5, 2.5, n))
    signals = models.ivim(b, truth["s0"], truth["f"], truth["dstar"], truth["d"])
    result = fitting.fit_ivim(signals, b)
    for name in models.IVIM_MAPS:
        np.testing.assert_allclose(result.maps[name], truth[name], rtol=1e-3, err_msg=name)


def test_fits_leave_all_zero_voxels_unfitted():
    protocol = models.Protocol.advanced()
    signals = models.signal("t2ivimkurtosis", protocol, dict(s0=np.array([1000.0, 0.0]), f=np.array([0.1, 0.1]),
                                                              dv=np.array([20.0, 20.0]), t2v=np.array([200.0, 200.0]),
                                                              dt=np.array([1.0, 1.0]), k=np.array([0.8, 0.8]),
                                                              t2t=np.array([60.0, 60.0])))
    result = fitting.fit_t2ivimkurtosis(signals, protocol.bvals, protocol.tes)
    assert result.status.tolist() == [1, 0]
    assert result.maps["dt"][1] == 0 and result.maps["dt"][0] == pytest.approx(1.0, rel=1e-6)
