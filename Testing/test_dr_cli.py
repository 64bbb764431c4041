"""``perfusionai dr ...`` end to end on phantom files: outputs on the input grid, clear errors, nothing half-written."""

import json

import numpy as np
import pytest

from perfusionai.cli import main
from perfusionai.dr import fitting
from perfusionai.io import read_volume, write_series, write_volume
from perfusionai.phantoms.dr import make_dr_phantom


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dr_phantom")
    ph = make_dr_phantom(shape=(2, 20, 20), snr=None, seed=7)
    write_series(ph.dwi, ph.geometry, folder / "dwi.nii.gz")
    (folder / "bvals").write_text(" ".join(f"{b:g}" for b in ph.protocol.bvals) + "\n")
    (folder / "tes").write_text(" ".join(f"{t:g}" for t in ph.protocol.tes) + "\n")
    write_volume(ph.body.astype(np.uint8), ph.geometry, folder / "body.nii.gz")
    return folder, ph


def _run(argv):
    return main([*argv, "--progress", "none"])


def test_fit_advanced_writes_maps_on_the_input_grid(phantom_files, tmp_path):
    folder, ph = phantom_files
    out = tmp_path / "adv"
    rc = _run(["dr", "fit", "--dwi", str(folder / "dwi.nii.gz"), "--bvals", str(folder / "bvals"),
               "--tes", str(folder / "tes"), "--mask", str(folder / "body.nii.gz"), "--model", "t2ivimkurtosis",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "t2ivimkurtosis" and summary["fit"]["voxels_fitted"] == int(ph.body.sum())
    assert summary["units"]["dt"] == "um2/ms" and summary["units"]["t2t"] == "ms"
    for name in ("s0", "f", "dv", "t2v", "dt", "k", "t2t"):
        vol = read_volume(out / f"{name}.nii.gz")
        assert vol.geometry.same_grid(ph.geometry)
        rel = np.abs(vol.array[ph.body] / ph.truth[name][ph.body] - 1)
        assert rel.max() < 1e-3, name
        assert np.all(vol.array[~ph.body] == 0)


def test_fit_clinical_matches_the_core_and_needs_no_tes(phantom_files, tmp_path):
    folder, ph = phantom_files
    clinical, protocol = ph.clinical()
    write_series(clinical, ph.geometry, tmp_path / "clin.nii.gz")
    (tmp_path / "clin_bvals").write_text(" ".join(f"{b:g}" for b in protocol.bvals))
    out = tmp_path / "clin"
    assert _run(["dr", "fit", "--dwi", str(tmp_path / "clin.nii.gz"), "--bvals", str(tmp_path / "clin_bvals"),
                 "--model", "clinical", "--out", str(out)]) == 0
    body = ph.body
    direct = fitting.fit_clinical(clinical[body].astype(float), protocol.bvals)
    for name in ("s0", "adc", "adc_fast", "adc_slow", "f_proxy"):
        np.testing.assert_allclose(read_volume(out / f"{name}.nii.gz").array[body], direct.maps[name], rtol=1e-5,
                                   atol=1e-7)


def _expect_error(argv, out, capsys, *phrases):
    rc = _run(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "perfusionai: error:" in err and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_bad_inputs_give_clear_errors_and_write_nothing(phantom_files, tmp_path, capsys):
    folder, ph = phantom_files
    dwi = str(folder / "dwi.nii.gz")
    tes = str(folder / "tes")
    out = tmp_path / "never"
    short = tmp_path / "short_bvals"
    short.write_text(" ".join(f"{b:g}" for b in ph.protocol.bvals[:-1]))
    _expect_error(["dr", "fit", "--dwi", dwi, "--bvals", str(short), "--tes", tes, "--model", "t2ivimkurtosis",
                   "--out", str(out)], out, capsys, "short_bvals", "20 b-values", "21 volumes")
    negative = tmp_path / "neg_bvals"
    values = ph.protocol.bvals.copy()
    values[3] = -400
    negative.write_text(" ".join(f"{b:g}" for b in values))
    _expect_error(["dr", "fit", "--dwi", dwi, "--bvals", str(negative), "--tes", tes, "--model", "clinical",
                   "--out", str(out)], out, capsys, "neg_bvals", "negative b-values")
    _expect_error(["dr", "fit", "--dwi", dwi, "--bvals", str(folder / "bvals"), "--model", "t2ivimkurtosis",
                   "--out", str(out)], out, capsys, "--tes", "echo time")
    zeros = tmp_path / "zeros.nii.gz"
    write_series(np.zeros_like(ph.dwi), ph.geometry, zeros)
    _expect_error(["dr", "fit", "--dwi", str(zeros), "--bvals", str(folder / "bvals"), "--tes", tes,
                   "--model", "t2ivimkurtosis", "--out", str(out)], out, capsys, "zeros.nii.gz", "zero")
    text = tmp_path / "words"
    text.write_text("0 50 hundred")
    _expect_error(["dr", "fit", "--dwi", dwi, "--bvals", str(text), "--model", "clinical", "--out", str(out)],
                  out, capsys, "words", "'hundred'")
    one_te = tmp_path / "one_te"
    one_te.write_text("80")
    _expect_error(["dr", "fit", "--dwi", dwi, "--bvals", str(folder / "bvals"), "--tes", str(one_te),
                   "--model", "t2ivimkurtosis", "--out", str(out)], out, capsys, "2 different echo times")


def test_mask_with_only_zero_voxels_is_refused(phantom_files, tmp_path, capsys):
    folder, ph = phantom_files
    dwi = ph.dwi.copy()
    dwi[0] = 0  # slice 0 has no signal at all
    write_series(dwi, ph.geometry, tmp_path / "dwi0.nii.gz")
    mask = np.zeros(ph.geometry.shape, np.uint8)
    mask[0, 5:10, 5:10] = 1
    write_volume(mask, ph.geometry, tmp_path / "m.nii.gz")
    out = tmp_path / "none"
    _expect_error(["dr", "fit", "--dwi", str(tmp_path / "dwi0.nii.gz"), "--bvals", str(folder / "bvals"),
                   "--mask", str(tmp_path / "m.nii.gz"), "--model", "clinical", "--out", str(out)], out, capsys,
                  "inside the mask is zero")
