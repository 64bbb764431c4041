"""Cross-check of the classic IVIM fit with DIPY's ``dipy.reconst.ivim`` (test-only dependency).

Same noise-free signals, DIPY's TRR fit with bounds that do not cap f (DIPY's default caps f at 0.2),
b-values of DIPY's own IVIM test. Both fits must agree with each other and with the truth.
"""

import numpy as np
import pytest

from perfusionai.dr.fitting import fit_ivim
from perfusionai.dr.models import ivim

dipy_ivim = pytest.importorskip("dipy.reconst.ivim", reason="DIPY is not installed (pip install dipy, dev/test only)")
gradients = pytest.importorskip("dipy.core.gradients", reason="DIPY is not installed")

BVALS = np.array([0.0, 10, 20, 30, 40, 60, 80, 100, 120, 140, 160, 180, 200, 300, 400, 500, 600, 700, 800, 900, 1000])
# S0, f, D* (mm2/s), D (mm2/s): DIPY's test voxel, then liver/tumour-like voxels with f above DIPY's default cap
CASES = np.array([
    [1000.0, 0.132, 0.00885, 0.000921],
    [1000.0, 0.30, 0.020, 0.0011],
    [800.0, 0.25, 0.050, 0.0015],
    [1200.0, 0.08, 0.012, 0.0008],
])


def _dipy_fit(signals):
    bvecs = np.tile([1.0, 0.0, 0.0], (len(BVALS), 1))
    bvecs[0] = 0
    gtab = gradients.gradient_table(BVALS, bvecs=bvecs, b0_threshold=0)
    model = dipy_ivim.IvimModel(gtab, fit_method="trr",
                                bounds=([0.0, 0.0, 0.0, 0.0], [np.inf, 1.0, 1.0, 1.0]))
    fit = model.fit(signals)
    return np.asarray(fit.model_params)


def test_ivim_fit_agrees_with_dipy_trr_on_noise_free_signals():
    s0, f, dstar, d = CASES.T
    signals = ivim(BVALS, s0, f, dstar * 1e3, d * 1e3)
    ours = fit_ivim(signals, BVALS, lower=(0.5, 0.0, 3.0, 0.0), upper=(2.0, 1.0, 300.0, 5.0))
    ours_params = np.stack([ours.maps["s0"], ours.maps["f"], ours.maps["dstar"] * 1e-3, ours.maps["d"] * 1e-3], axis=1)
    theirs = _dipy_fit(signals)
    # both recover the truth of noise-free signals ...
    np.testing.assert_allclose(ours_params, CASES, rtol=1e-4)
    np.testing.assert_allclose(theirs, CASES, rtol=1e-3)
    # ... and therefore each other, f above DIPY's default 0.2 cap included
    np.testing.assert_allclose(ours_params, theirs, rtol=1e-3)
    assert ours.maps["f"][1] > 0.2
