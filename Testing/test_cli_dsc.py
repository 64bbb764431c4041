"""``perfusionai dsc maps`` end to end, and every bad input the issue lists."""

import json
import subprocess
import sys

import numpy as np
import pytest

from perfusionai import io
from perfusionai.cli import main
from perfusionai.phantoms.dsc import make_dsc_phantom

MAPS = ("cbv", "cbf", "mtt", "tmax", "ttp")


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    phantom = make_dsc_phantom(shape=(6, 24, 24), n_frames=40, tr=1.5, te=0.03, snr=np.inf, seed=0)
    phantom.save(folder)
    return folder, phantom


def run(argv, capsys):
    code = main(argv + ["--progress", "none"])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("aif", ["mask", "auto"])
def test_maps_written_on_input_grid(phantom_dir, tmp_path, capsys, aif):
    folder, phantom = phantom_dir
    out = tmp_path / "out"
    aif_args = ["--aif-mask", str(folder / "aif_mask.nii.gz")] if aif == "mask" else ["--aif-auto"]
    code, err = run(["dsc", "maps", "--dsc", str(folder / "dsc.nii.gz"), "--te", "0.03", "--tr", "1.5",
                     *aif_args, "--mask", str(folder / "brain_mask.nii.gz"), "--method", "ssvd",
                     "--threshold", "0.01", "--out", str(out)], capsys)
    assert code == 0, err
    series = io.read_series(folder / "dsc.nii.gz")
    for m in MAPS:
        vol = io.read_volume(out / f"{m}.nii.gz")
        assert vol.geometry.same_grid(series.geometry)
        assert vol.array.dtype == np.float32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["method"] == "sSVD"
    assert summary["aif"]["source"] == ("mask" if aif == "mask" else "automatic")
    if aif == "auto":
        assert len(summary["aif"]["voxels_kji"]) > 0
    # noise-free inverse-crime phantom, almost no regularisation: grey-matter CBF is recovered
    cbf = io.read_volume(out / "cbf.nii.gz").array
    gm = phantom.rois == 1
    assert np.median(cbf[gm]) == pytest.approx(np.median(phantom.truth["cbf"][gm]), rel=0.02)
    assert summary["medians_in_mask"]["cbf"] == pytest.approx(float(np.median(cbf[phantom.brain_mask])), rel=1e-4)
    assert summary["units"]["cbf"] == "mL/100 g/min"
    table = np.genfromtxt(out / "aif.csv", delimiter=",", names=True)
    np.testing.assert_allclose(table["time_s"], np.arange(40) * 1.5, atol=1e-6)
    if aif == "mask":
        np.testing.assert_allclose(table["aif_delta_r2star_per_s"], phantom.aif, rtol=1e-3, atol=1e-3)


def test_console_script_reports_error_without_traceback(phantom_dir, tmp_path):
    folder, _ = phantom_dir
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "perfusionai", "dsc", "maps", "--dsc",
                           str(folder / "brain_mask.nii.gz"), "--te", "0.03", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "brain_mask.nii.gz" in proc.stderr and "4D" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def _write_series(folder, name, arr, tr=1.5):
    return io.write_series(arr, io.Geometry(arr.shape[:3]), folder / name, tr=tr)


def bad_cases(folder, phantom, tmp):
    """(argv, expected message pieces) for every bad input of the issue."""
    geom = io.Geometry(phantom.signal.shape[:3], (1.8, 1.8, 5.0))
    dsc = str(folder / "dsc.nii.gz")
    mask = str(folder / "brain_mask.nii.gz")
    aif = str(folder / "aif_mask.nii.gz")
    nan = phantom.signal.copy()
    nan[..., 20] = np.nan
    nan_path = io.write_series(nan, phantom.geometry, tmp / "nan.nii.gz", tr=1.5)
    short_path = io.write_series(phantom.signal[..., :8], phantom.geometry, tmp / "short.nii.gz", tr=1.5)
    zero_aif = io.write_volume((phantom.rois == 2).astype(np.uint8), phantom.geometry, tmp / "wm_as_aif.nii.gz")
    flat = phantom.signal.copy()
    flat[phantom.aif_mask] = phantom.s0  # arteries without a bolus: an all-zero AIF
    flat_path = io.write_series(flat, phantom.geometry, tmp / "flat_aif.nii.gz", tr=1.5)
    empty = io.write_volume(np.zeros(geom.shape, np.uint8), phantom.geometry, tmp / "empty.nii.gz")
    other = io.write_volume(np.ones((3, 4, 5), np.uint8), io.Geometry((3, 4, 5)), tmp / "other_grid.nii.gz")
    base = ["dsc", "maps", "--tr", "1.5", "--mask", mask]
    return {
        "3d_instead_of_4d": (["dsc", "maps", "--dsc", mask, "--te", "0.03", "--aif-auto"], ["brain_mask.nii.gz", "4D"]),
        "nan_frames": (base + ["--dsc", str(nan_path), "--te", "0.03", "--aif-mask", aif], ["NaN"]),
        "te_missing": (base + ["--dsc", dsc, "--aif-mask", aif], ["dsc.nii.gz", "TE"]),
        "te_zero": (base + ["--dsc", dsc, "--te", "0", "--aif-mask", aif], ["--te"]),
        "te_in_ms": (base + ["--dsc", dsc, "--te", "30", "--aif-mask", aif], ["--te", "milliseconds"]),
        "all_zero_aif": (base + ["--dsc", str(flat_path), "--te", "0.03", "--aif-mask", aif], ["AIF"]),
        "empty_mask": (["dsc", "maps", "--dsc", dsc, "--te", "0.03", "--mask", str(empty), "--aif-auto"],
                       ["empty.nii.gz", "empty"]),
        "mask_other_grid": (["dsc", "maps", "--dsc", dsc, "--te", "0.03", "--mask", str(other), "--aif-auto"],
                            ["other_grid.nii.gz", "grid"]),
        "empty_aif_mask": (base + ["--dsc", dsc, "--te", "0.03", "--aif-mask", str(empty)], ["empty.nii.gz", "empty"]),
        "fewer_than_10_frames": (base + ["--dsc", str(short_path), "--te", "0.03", "--aif-mask", aif],
                                 ["short.nii.gz", "8 frames", "10"]),
        "wm_as_aif": (base + ["--dsc", dsc, "--te", "0.03", "--aif-mask", str(zero_aif)],
                      ["AIF mask", "does not cover an artery"]),
    }


@pytest.mark.parametrize("case", ["3d_instead_of_4d", "nan_frames", "te_missing", "te_zero", "te_in_ms",
                                  "all_zero_aif", "empty_mask", "mask_other_grid", "empty_aif_mask",
                                  "fewer_than_10_frames", "wm_as_aif"])
def test_bad_input_one_clear_error_nothing_written(phantom_dir, tmp_path, capsys, case):
    folder, phantom = phantom_dir
    argv, pieces = bad_cases(folder, phantom, tmp_path)[case]
    out = tmp_path / "out"
    before = sorted(p.name for p in folder.iterdir())
    code, err = run(argv + ["--out", str(out)], capsys)
    assert code == 2, err
    assert err.startswith("perfusionai: error: ")
    assert len(err.strip().splitlines()) == 1
    for piece in pieces:
        assert piece in err, (piece, err)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert sorted(p.name for p in folder.iterdir()) == before


def test_phantom_verb_default_and_clinical_contrast_round_trip_through_maps(tmp_path, capsys):
    # the default (noise-free) phantom, then one with clinical tissue contrast whose printed --kh
    # gives back the truth through 'dsc maps'
    assert run(["dsc", "phantom", "--out", str(tmp_path / "plain")], capsys)[0] == 0
    plain = json.loads((tmp_path / "plain" / "truth.json").read_text())
    assert plain["acquisition"]["snr"] is None and plain["conventions"]["discretisation"] == "fine"
    code = main(["dsc", "phantom", "--out", str(tmp_path / "clinical"), "--tissue-kappa", "10", "--aif-peak", "35",
                 "--progress", "none"])
    out = capsys.readouterr().out
    assert code == 0 and "--kh 0.073" in out
    truth = json.loads((tmp_path / "clinical" / "truth.json").read_text())
    assert truth["conventions"]["tissue_kappa"] == 10.0
    folder = tmp_path / "clinical"
    code, err = run(["dsc", "maps", "--dsc", str(folder / "dsc.nii.gz"), "--te", "0.03", "--aif-mask", str(folder / "aif_mask.nii.gz"),
                     "--mask", str(folder / "brain_mask.nii.gz"), "--kh", str(truth["conventions"]["analysis_kh"]),
                     "--out", str(tmp_path / "maps")], capsys)
    assert code == 0, err
    cbv = io.read_volume(tmp_path / "maps" / "cbv.nii.gz").array
    rois = io.read_volume(folder / "rois.nii.gz").array
    expected = io.read_volume(folder / "truth_cbv_window.nii.gz").array
    for label in (1, 2):  # grey and white matter
        assert np.median(cbv[rois == label]) == pytest.approx(np.median(expected[rois == label]), rel=0.01)


def test_phantom_tumour_cbv_sets_the_tumour_only(tmp_path, capsys):
    # --tumour-cbv 3: the tumour (label 5) has CBV 3 and CBF 36 (MTT stays 5 s); every other region and
    # the series outside the tumour are those of the default phantom
    assert run(["dsc", "phantom", "--out", str(tmp_path / "default"), "--snr", "30"], capsys)[0] == 0
    assert run(["dsc", "phantom", "--out", str(tmp_path / "low"), "--snr", "30", "--tumour-cbv", "3"], capsys)[0] == 0
    rois = io.read_volume(tmp_path / "low" / "rois.nii.gz").array
    tumour = rois == 5
    assert tumour.any()
    for name, default_value, low_value in (("cbv", 7.5, 3.0), ("cbf", 90.0, 36.0), ("mtt", 5.0, 5.0)):
        default = io.read_volume(tmp_path / "default" / f"truth_{name}.nii.gz").array
        low = io.read_volume(tmp_path / "low" / f"truth_{name}.nii.gz").array
        assert np.median(default[tumour]) == pytest.approx(default_value)
        assert np.median(low[tumour]) == pytest.approx(low_value)
        np.testing.assert_array_equal(low[~tumour], default[~tumour])
    series = {k: io.read_series(tmp_path / k / "dsc.nii.gz").array for k in ("default", "low")}
    np.testing.assert_array_equal(series["low"][~tumour], series["default"][~tumour])
    assert not np.array_equal(series["low"][tumour], series["default"][tumour])


def test_library_refuses_nan_inside_the_masks_like_the_command_line(phantom_dir):
    # one NaN policy for 'dsc maps', the Slicer in-process route and the API: refused inside the
    # brain/AIF masks (frames 1-based), harmless outside them
    from perfusionai.dsc.pipeline import DSCOptions, compute_dsc_maps
    from perfusionai.errors import PerfusionAIError

    _, phantom = phantom_dir
    inside = phantom.signal.copy()
    k, j, i = np.argwhere(phantom.brain_mask)[0]
    inside[k, j, i, 20] = np.nan
    with pytest.raises(PerfusionAIError, match=r"frame\(s\) 21 of 40"):
        compute_dsc_maps(inside, phantom.times, DSCOptions(te=0.03), mask=phantom.brain_mask,
                         aif_mask=phantom.aif_mask)
    outside = phantom.signal.copy()
    k, j, i = np.argwhere(~phantom.brain_mask & ~phantom.aif_mask)[0]
    outside[k, j, i, :] = np.nan
    result = compute_dsc_maps(outside, phantom.times, DSCOptions(te=0.03), mask=phantom.brain_mask,
                              aif_mask=phantom.aif_mask)
    assert np.isfinite(result.maps["cbf"][phantom.brain_mask]).all()
