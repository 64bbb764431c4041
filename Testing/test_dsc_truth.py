"""Noise-free "inverse-crime" phantoms through the DSC pipeline: exact recovery.

The phantom (perfusionai.phantoms.dsc, discretisation "inverse-crime") is built with
the solver's own left-rectangle convolution, so with vanishing regularisation every
deconvolution must return CBF within 1 %, CBV within 0.5 % of the discrete sum-ratio
value CBV + CBF*dt/120 (research/dsc.md), and Tmax exactly at whole-frame delays.
The series is 100 frames long so that every curve is back at baseline before the end:
the block-circulant solvers (cSVD, oSVD) are exact only then (no wrap-around).

The baseline length is given (10 frames, the phantom's pre-bolus frames): with
delayed tissue blocks the detected arrival of the brain-mean signal falls a few
frames after the AIF's, which is a baseline-detection matter tested elsewhere.
"""

import numpy as np
import pytest

from perfusionai.dsc import concentration as conc_mod
from perfusionai.dsc import deconvolution as dec
from perfusionai.dsc import maps as maps_mod
from perfusionai.dsc.aif import aif_from_mask
from perfusionai.dsc.pipeline import DSCOptions, compute_dsc_maps
from perfusionai.phantoms import make_dsc_phantom

CBF = [20.0, 45.0, 90.0]      # mL/100 g/min
CBV = [2.0, 4.0]              # mL/100 g  -> MTT 1.3 ... 12 s
DELAYS = [0.0, 2.0, 4.0]      # s, whole frames at TR 1 s
BASELINE_FRAMES = 10

SOLVERS = {
    "sSVD": dict(threshold=1e-6),
    "cSVD": dict(threshold=1e-4),
    "Tikhonov": dict(tikhonov_lambda=1e-5, tikhonov_criterion="fixed"),
}


@pytest.fixture(scope="module", params=["exponential", "gamma", "lorentzian"])
def phantom(request):
    return make_dsc_phantom(shape=(2, 16, 16), tr=1.0, n_frames=100, cbf=CBF, cbv=CBV, delay_s=DELAYS,
                            residue=request.param, gamma_shape=3.0, recirculation=True,
                            baseline_frames=BASELINE_FRAMES)


def _check_maps(maps, p, cbv_key):
    tissue = p.tissue_mask
    cbf_err = np.abs(maps["cbf"][tissue] / p.truth["cbf"][tissue] - 1.0)
    assert cbf_err.max() < 0.01, f"CBF max relative error {cbf_err.max():.4f}"
    cbv_err = np.abs(maps["cbv"][tissue] / p.truth[cbv_key][tissue] - 1.0)
    assert cbv_err.max() < 0.005, f"CBV max relative error {cbv_err.max():.4f} against {cbv_key}"
    np.testing.assert_allclose(maps["tmax"][tissue], p.truth["tmax"][tissue], rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps["ttp"][tissue], p.truth["ttp"][tissue], rtol=0, atol=1e-6)
    mtt_expected = 60.0 * p.truth[cbv_key][tissue] / p.truth["cbf"][tissue]
    np.testing.assert_allclose(maps["mtt"][tissue], mtt_expected, rtol=0.015)


def _cbv_key(p):
    # the Lorentzian's 1/t^2 tail runs past any acquisition: compare with the window value
    return "cbv_window" if p.residue == "lorentzian" else "cbv_discrete"


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_pipeline_recovers_truth_exactly(phantom, method):
    p = phantom
    options = DSCOptions(te=p.te, method=method, kh=p.kh, rho=p.rho, baseline_frames=BASELINE_FRAMES,
                         **SOLVERS[method])
    result = compute_dsc_maps(p.signal, p.times, options, mask=p.brain_mask, aif_mask=p.aif_mask)
    np.testing.assert_allclose(result.aif, p.aif, rtol=0, atol=1e-3 * p.aif.max())
    _check_maps(result.maps, p, _cbv_key(p))


def test_discrete_cbv_offset_is_what_the_solver_sees(phantom):
    p = phantom
    tissue = p.tissue_mask
    cbf, cbv = p.truth["cbf"][tissue].astype(float), p.truth["cbv"][tissue].astype(float)
    discrete = p.truth["cbv_discrete"][tissue]
    if p.residue == "exponential":
        # 100 F dt sum_m exp(-m dt/MTT) = 100 F dt / (1 - exp(-dt/MTT)), F = CBF/6000
        mtt = 60.0 * cbv / cbf
        np.testing.assert_allclose(discrete, 100 * cbf / 6000 * p.tr / (1 - np.exp(-p.tr / mtt)), rtol=1e-5)
    elif p.residue == "gamma":
        # R'(0) = 0 for shape 3: Euler-Maclaurin leaves CBV + CBF*dt/120 up to higher-order terms
        np.testing.assert_allclose(discrete, cbv + cbf * p.tr / 120.0, rtol=5e-3)
    else:
        pytest.skip("the Lorentzian tail beyond the window makes the infinite-sum value unreachable")


@pytest.mark.parametrize("residue", ["exponential", "gamma"])
def test_osvd_with_fine_candidate_thresholds_is_exact(residue):
    """oSVD picks, per voxel, the first candidate threshold whose residue is smooth enough;
    with a 0.1 % candidate first, noise-free inverse-crime data are solved exactly."""
    p = make_dsc_phantom(shape=(2, 16, 16), tr=1.0, n_frames=100, cbf=CBF, cbv=CBV, delay_s=DELAYS,
                         residue=residue, baseline_frames=BASELINE_FRAMES)
    conc = conc_mod.signal_to_concentration(p.signal, p.te, BASELINE_FRAMES,
                                            p.brain_mask).concentration
    aif = aif_from_mask(conc, p.aif_mask)
    curves = conc[p.tissue_mask]
    result = dec.deconvolve(curves, aif, p.tr, "oSVD",
                            osvd_thresholds=(0.001, 0.01, 0.05, 0.1, 0.2))
    assert np.all(result.regularisation == 0.001)
    flat = maps_mod.perfusion_maps(curves, aif, p.times, result, p.kh, p.rho)
    maps = {}
    for key, values in flat.items():
        vol = np.zeros(p.tissue_mask.shape)
        vol[p.tissue_mask] = values
        maps[key] = vol
    _check_maps(maps, p, "cbv_discrete")


def test_default_regularisation_underestimates_high_flow():
    """Sanity of the truth itself: the default sSVD threshold 0.2 must lose CBF at high flow
    (truncation bias), so the exact results above are not an artefact of the comparison."""
    p = make_dsc_phantom(shape=(2, 16, 16), tr=1.0, n_frames=100, cbf=[90.0], cbv=[4.0],
                         baseline_frames=BASELINE_FRAMES)
    options = DSCOptions(te=p.te, method="sSVD", kh=p.kh, rho=p.rho, baseline_frames=BASELINE_FRAMES)
    result = compute_dsc_maps(p.signal, p.times, options, mask=p.brain_mask, aif_mask=p.aif_mask)
    ratio = np.median(result.maps["cbf"][p.tissue_mask]) / 90.0
    assert 0.3 < ratio < 0.9
