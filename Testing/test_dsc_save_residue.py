"""``dsc maps --save-residue``: the residue series and the regularisation / oscillation-index maps."""

from __future__ import annotations

import numpy as np
import pytest

from perfusionai import io
from perfusionai.cli import main
from perfusionai.dsc.deconvolution import DEFAULT_OI_THRESHOLD, OSVD_CANDIDATE_THRESHOLDS
from perfusionai.phantoms.dsc import make_dsc_phantom


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ph")
    phantom = make_dsc_phantom(shape=(2, 16, 16), n_frames=40, tr=1.0, snr=200, seed=31, tumour=False)
    phantom.save(folder)
    return phantom, folder


def _run(phantom, folder, out, method):
    return main(["dsc", "maps", "--dsc", str(folder / "dsc.nii.gz"), "--te", "0.03",
                 "--aif-mask", str(folder / "aif_mask.nii.gz"), "--mask", str(folder / "brain_mask.nii.gz"),
                 "--method", method, "--save-residue", "--progress", "none", "--out", str(out)])


def test_osvd_residue_regularisation_and_oi(phantom_files, tmp_path):
    phantom, folder = phantom_files
    assert _run(phantom, folder, tmp_path / "o", "oSVD") == 0
    residue = io.read_series(tmp_path / "o" / "residue.nii.gz").array
    assert residue.shape == phantom.brain_mask.shape + (2 * phantom.times.size,)     # circulant: 2N lags
    cbf = io.read_volume(tmp_path / "o" / "cbf.nii.gz").array
    brain = phantom.brain_mask
    np.testing.assert_allclose(6000 * phantom.kh / phantom.rho * residue[brain].max(axis=1), cbf[brain], rtol=1e-4)
    reg = io.read_volume(tmp_path / "o" / "regularisation.nii.gz").array[brain]
    candidates = np.asarray(OSVD_CANDIDATE_THRESHOLDS)
    assert np.all(np.min(np.abs(reg[:, None] - candidates[None, :]), axis=1) < 1e-6)
    oi = io.read_volume(tmp_path / "o" / "oscillation_index.nii.gz").array[brain]
    accepted = reg < OSVD_CANDIDATE_THRESHOLDS[-1]
    assert accepted.any() and np.all(oi[accepted] < DEFAULT_OI_THRESHOLD)


def test_parametric_residue_series(phantom_files, tmp_path):
    phantom, folder = phantom_files
    assert _run(phantom, folder, tmp_path / "p", "parametric") == 0
    residue = io.read_series(tmp_path / "p" / "residue.nii.gz").array
    brain = phantom.brain_mask
    assert residue.shape == brain.shape + (phantom.times.size,)
    cbf = io.read_volume(tmp_path / "p" / "cbf.nii.gz").array
    np.testing.assert_allclose(6000 * phantom.kh / phantom.rho * residue[brain][:, 0], cbf[brain], rtol=1e-4)
    assert np.all(np.diff(residue[brain], axis=1) <= 1e-9)                            # monotonic residue
