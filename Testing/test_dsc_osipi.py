"""DSC deconvolution on the OSIPI DSC test curves (Testing/data/osipi_dsc, Apache-2.0).

14 simulated tissue/AIF concentration pairs (SNR 200) with known CBV and CBF. We check
OSIPI's own tolerance for every case and method, accuracy bounds equal to the best peer per
method (research/dsc.md sections 0 and 6.2), and CBV against the discrete-convolution value
cbv + cbf*TR/2 of this left-rectangle simulator.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from perfusionai.dsc.deconvolution import deconvolve
from perfusionai.dsc.maps import cbf_map, cbv_map

DATA = Path(__file__).resolve().parent / "data" / "osipi_dsc" / "dsc_data.csv"


def _load():
    with open(DATA, newline="") as handle:
        rows = list(csv.DictReader(handle))
    tissue = np.array([np.array(r["C_tis"].split(), dtype=float) for r in rows])
    aif = np.array(rows[0]["C_aif"].split(), dtype=float)
    for r in rows:  # one shared AIF, so all curves can be deconvolved as one volume
        assert np.array_equal(np.array(r["C_aif"].split(), dtype=float), aif)
    tr = float(rows[0]["tr"])
    assert all(float(r["tr"]) == tr for r in rows)
    return {
        "labels": [r["label"] for r in rows],
        "tissue": tissue,
        "aif": aif,
        "cbv": np.array([float(r["cbv"]) for r in rows]),
        "cbf": np.array([float(r["cbf"]) for r in rows]),
        "tr": tr,
    }


@pytest.fixture(scope="module")
def osipi():
    return _load()


# (method, keyword options, mean limit, max limit): limits = best peer per method
# (dsc-mri-toolbox sSVD 11.4/18.6, cSVD 18.3/40.5, oSVD 15.5/29.0; OSIPI L-curve 8.6/18.9 %).
ACCURACY_CASES = [
    ("sSVD", {"threshold": 0.2}, 0.12, 0.19),
    ("cSVD", {"threshold": 0.1}, 0.19, 0.41),
    # oSVD with the dsc-mri-toolbox discretisation (the peer defining the bound); the
    # rectangle default is checked against OSIPI's tolerance below (17.3 % / 30.4 % here).
    ("oSVD", {"discretisation": "simpson"}, 0.16, 0.30),
    ("Tikhonov", {"tikhonov_criterion": "gcv"}, 0.09, 0.19),
    ("Tikhonov", {"tikhonov_criterion": "lcurve"}, 0.09, 0.19),
]


@pytest.mark.parametrize("method,options,mean_limit,max_limit", ACCURACY_CASES,
                         ids=[f"{m}-{'-'.join(str(v) for v in o.values())}" for m, o, _, _ in ACCURACY_CASES])
def test_cbf_accuracy_matches_best_peer(osipi, method, options, mean_limit, max_limit):
    result = deconvolve(osipi["tissue"], osipi["aif"], osipi["tr"], method, **options)
    cbf = cbf_map(result.cbf, kh=1.0, rho=1.0)
    error = np.abs(cbf - osipi["cbf"]) / osipi["cbf"]
    assert error.mean() <= mean_limit, (method, options, error.mean(), cbf)
    assert error.max() <= max_limit, (method, options, error.max(), cbf)


ALL_METHOD_OPTIONS = [
    ("sSVD", {}), ("cSVD", {}), ("oSVD", {}), ("oSVD", {"discretisation": "simpson"}),
    ("Tikhonov", {}), ("Tikhonov", {"tikhonov_criterion": "lcurve"}),
    ("Tikhonov", {"tikhonov_criterion": "fixed"}),
]


@pytest.mark.parametrize("method,options", ALL_METHOD_OPTIONS,
                         ids=[f"{m}-{'-'.join(str(v) for v in o.values()) or 'default'}" for m, o in ALL_METHOD_OPTIONS])
def test_osipi_tolerance_every_case(osipi, method, options):
    """OSIPI's pytest criterion: assert_allclose(meas, ref, rtol=0.1, atol=15 CBF / 1 CBV)."""
    result = deconvolve(osipi["tissue"], osipi["aif"], osipi["tr"], method, **options)
    cbf = cbf_map(result.cbf, kh=1.0, rho=1.0)
    cbv = cbv_map(osipi["tissue"], osipi["aif"], osipi["tr"], kh=1.0, rho=1.0)
    np.testing.assert_allclose(cbf, osipi["cbf"], rtol=0.1, atol=15)
    np.testing.assert_allclose(cbv, osipi["cbv"], rtol=0.1, atol=1)


def test_cbv_matches_discrete_convolution_value(osipi):
    cbv = cbv_map(osipi["tissue"], osipi["aif"], osipi["tr"], kh=1.0, rho=1.0)
    expected = osipi["cbv"] + osipi["cbf"] / 6000.0 * osipi["tr"] / 2.0 * 100.0
    error = np.abs(cbv - expected) / expected
    assert error.mean() <= 0.02, error
    assert error.max() <= 0.07, error
    # and the nominal value is clearly further away: the offset is real, not noise
    assert np.mean(np.abs(cbv - osipi["cbv"]) / osipi["cbv"]) > 2 * error.mean()


def test_truncation_underestimates_high_flow(osipi):
    """Regularisation bias grows with CBF: grey-matter relative CBF falls from 10 to 70."""
    result = deconvolve(osipi["tissue"], osipi["aif"], osipi["tr"], "cSVD")
    ratio = cbf_map(result.cbf, 1.0, 1.0) / osipi["cbf"]
    grey = osipi["cbv"] == 4
    order = np.argsort(osipi["cbf"][grey])
    assert ratio[grey][order][-1] < 0.8 < ratio[grey][order][0] + 0.1
    assert np.corrcoef(osipi["cbf"][grey], ratio[grey])[0, 1] < -0.8


def test_float32_input_gives_the_same_answer(osipi):
    for method in ("sSVD", "cSVD", "oSVD", "Tikhonov"):
        exact = deconvolve(osipi["tissue"], osipi["aif"], osipi["tr"], method)
        fast = deconvolve(osipi["tissue"].astype(np.float32), osipi["aif"], osipi["tr"], method)
        assert fast.residue.dtype == np.float32
        np.testing.assert_allclose(fast.cbf, exact.cbf, rtol=1e-4)
        np.testing.assert_array_equal(fast.regularisation, exact.regularisation)
