"""DL-CTPM prediction: maps on the CT's exact grid, seamless left/right recombination, bad inputs."""

import json

import numpy as np
import pytest

from perfusionai.ctpm import preprocessing as pp
from perfusionai.ctpm.predict import high_low_labels, load_ctpm_model, paste_back
from perfusionai.errors import PerfusionAIError
from perfusionai.io import Geometry, read_volume, write_volume
from perfusionai.phantoms.ctpm import _lps_grid, _rotation, make_ctpm_phantom, phantom_geometry

SMALL = pp.PreprocessConfig(input_shape=(32, 16, 16), median_size=3, uniform_size=1)


def _oblique_ct():
    return Geometry((44, 40, 48), spacing=(1.3, 1.9, 3.1), origin=(-40.0, -45.0, -60.0),
                    direction=tuple(_rotation((10.0, -7.0, 15.0)).ravel()))


def _touching_lungs(geometry):
    """Two half-boxes of one connected air block: the lungs touch along the mid-plane."""
    x, y, z = _lps_grid(geometry)
    block = (np.abs(x) < 30) & (np.abs(y) < 20) & (np.abs(z) < 45)
    labels = np.zeros(geometry.shape, np.uint8)
    labels[block & (x < 0)] = pp.RIGHT_LUNG
    labels[block & (x >= 0)] = pp.LEFT_LUNG
    return labels


def test_paste_back_lies_on_the_oblique_anisotropic_ct_grid_without_seam():
    ct = _oblique_ct()
    labels = _touching_lungs(ct)
    lungs = pp.split_lungs(labels, ct)
    x, y, z = _lps_grid(ct)
    crops = [pp.crop_lung(np.zeros(ct.shape, np.float32), ct, lungs[s], s, SMALL) for s in (1, 2)]

    def field(gx, gy, gz):  # a smooth physical field spanning both lungs
        return 0.5 + 0.004 * gx + 0.003 * gy - 0.002 * gz

    maps = []
    for crop in crops:
        gx, gy, gz = _lps_grid(crop.grid)
        maps.append(field(gx, gy, gz).astype(np.float32))
    out = paste_back(maps, crops, lungs, ct)
    lung = labels > 0
    truth = field(x, y, z)
    # Every lung voxel written with its own position's value (interpolation error only), nothing outside.
    assert np.all(out[~lung] == 0)
    assert np.abs(out[lung] - truth[lung]).max() < 0.02
    # No seam: neighbours across the right/left boundary differ only as much as the field does.
    right, left = labels == 1, labels == 2
    across = right[:, :, :-1] & left[:, :, 1:] | left[:, :, :-1] & right[:, :, 1:]
    assert across.sum() > 50
    jump = np.abs(out[:, :, 1:] - out[:, :, :-1])[across]
    field_step = np.abs(truth[:, :, 1:] - truth[:, :, :-1])[across]
    assert jump.max() < field_step.max() + 0.02


def test_paste_back_no_overlap_no_gap():
    ct = _oblique_ct()
    labels = _touching_lungs(ct)
    lungs = pp.split_lungs(labels, ct)
    crops = [pp.crop_lung(np.zeros(ct.shape, np.float32), ct, lungs[s], s, SMALL) for s in (1, 2)]
    out = paste_back([np.full(SMALL.input_shape, 0.3, np.float32), np.full(SMALL.input_shape, 0.7, np.float32)],
                     crops, lungs, ct)
    np.testing.assert_allclose(out[labels == 1], 0.3, atol=1e-6)
    np.testing.assert_allclose(out[labels == 2], 0.7, atol=1e-6)
    assert np.all(out[labels == 0] == 0)


def test_high_low_labels_threshold():
    perf = np.array([0.0, 0.65, 0.66, 0.9]).reshape(1, 1, 4)
    lung = np.array([0, 1, 1, 1], bool).reshape(1, 1, 4)
    assert high_low_labels(perf, lung).ravel().tolist() == [0, 1, 2, 2]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """An (untrained) small ARNN saved as a model folder: enough to test grids and errors."""
    import torch

    from perfusionai.ctpm.training import train_ctpm
    from perfusionai.nn import save_model

    torch.manual_seed(0)
    geometry = phantom_geometry(spacing_mm=(6.0, 6.0, 6.0))
    from perfusionai.ctpm.training import prepare_arrays

    samples = []
    for seed in (0, 1):
        ph = make_ctpm_phantom(seed, geometry, n_vessels=4)
        samples += prepare_arrays(ph.ct_hu, ph.geometry, ph.spect, ph.spect_geometry, ph.lung_labels, SMALL,
                                  patient=str(seed))
    result = train_ctpm(samples, config=SMALL, channels=(4, 8, 8, 8), kernel_size=3, epochs=1, val_fraction=0.5,
                        device="cpu", trained_on_phantoms=True, training_data="2 phantoms (test)")
    path = tmp_path_factory.mktemp("model") / "ctpm_model"
    save_model(path, result.model, result.card)
    return path


def test_predict_files_on_oblique_anisotropic_ct(tmp_path, small_model):
    from perfusionai.cli import main

    # anisotropic voxels, a tilted grid, slices stored feet-first
    geometry = phantom_geometry(spacing_mm=(5.0, 4.2, 6.5), rotation_deg=(8.0, 0.0, -12.0), flip_k=True)
    ph = make_ctpm_phantom(7, geometry, n_vessels=4)
    write_volume(ph.ct_hu, ph.geometry, tmp_path / "ct.nii.gz")
    write_volume(ph.lung_labels, ph.geometry, tmp_path / "lungs.nii.gz")
    out = tmp_path / "out"
    assert main(["ctpm", "predict", "--ct", str(tmp_path / "ct.nii.gz"), "--lung-mask", str(tmp_path / "lungs.nii.gz"),
                 "--model", str(small_model), "--out", str(out), "--progress", "none", "--device", "cpu"]) == 0
    perf = read_volume(out / "perfusion.nii.gz")
    hl = read_volume(out / "function_high_low.nii.gz")
    ct = read_volume(tmp_path / "ct.nii.gz")
    assert perf.geometry.same_grid(ct.geometry) and hl.geometry.same_grid(ct.geometry)
    lung = ph.lung_labels > 0
    assert perf.array.min() >= 0 and perf.array.max() <= 1
    assert np.all(perf.array[~lung] == 0) and np.all(perf.array[lung] > 0)
    assert np.array_equal(hl.array, high_low_labels(perf.array, lung))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["trained_on_phantoms"] is True
    assert "trained on phantoms" in summary["model"]["label"]
    voxel_ml = np.prod(geometry.spacing) / 1000
    assert summary["volumes"]["both"]["lung_ml"] == pytest.approx(lung.sum() * voxel_ml)


def test_ct_without_lungs_is_refused_and_nothing_written(tmp_path, small_model, capsys):
    from perfusionai.cli import main

    geometry = phantom_geometry(spacing_mm=(6.0, 6.0, 6.0))
    x, y, z = _lps_grid(geometry)
    body = (x / 170) ** 2 + (y / 120) ** 2 <= 1
    ct = np.where(body, 40, -1000).astype(np.int16)  # a chest without lungs
    write_volume(ct, geometry, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert main(["ctpm", "predict", "--ct", str(tmp_path / "ct.nii.gz"), "--model", str(small_model),
                 "--out", str(out), "--progress", "none", "--device", "cpu"]) == 2
    assert "no lung" in capsys.readouterr().err
    assert not out.exists()
    # an empty given mask is refused the same way
    write_volume(np.zeros(geometry.shape, np.uint8), geometry, tmp_path / "empty.nii.gz")
    assert main(["ctpm", "predict", "--ct", str(tmp_path / "ct.nii.gz"), "--lung-mask", str(tmp_path / "empty.nii.gz"),
                 "--model", str(small_model), "--out", str(out), "--progress", "none"]) == 2
    assert "no lung voxel" in capsys.readouterr().err
    assert not out.exists()


def test_model_for_another_input_size_is_refused(tmp_path, small_model, capsys):
    from perfusionai.cli import main
    from perfusionai.nn import load_model, save_model

    with pytest.raises(PerfusionAIError, match=r"made for lung crops of \(32, 16, 16\)"):
        load_ctpm_model(small_model, expected_input_shape=(128, 64, 64))
    network, card = load_model(small_model)
    card["inputs"]["preprocessing"]["input_shape"] = [30, 16, 16]
    bad = tmp_path / "bad_model"
    save_model(bad, network, card)
    with pytest.raises(PerfusionAIError, match="not three sizes divisible by 8"):
        load_ctpm_model(bad)
    ph = make_ctpm_phantom(3, phantom_geometry(spacing_mm=(6.0, 6.0, 6.0)), n_vessels=2)
    write_volume(ph.ct_hu, ph.geometry, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert main(["ctpm", "predict", "--ct", str(tmp_path / "ct.nii.gz"), "--model", str(bad), "--out", str(out),
                 "--progress", "none"]) == 2
    assert "divisible by 8" in capsys.readouterr().err
    assert not out.exists()


def test_spect_off_the_ct_is_refused_for_training():
    from perfusionai.ctpm.training import prepare_arrays

    ph = make_ctpm_phantom(2, phantom_geometry(spacing_mm=(6.0, 6.0, 6.0)), n_vessels=2)
    far = Geometry(ph.spect_geometry.shape, ph.spect_geometry.spacing,
                   tuple(np.array(ph.spect_geometry.origin) + [0.0, 0.0, 900.0]))
    with pytest.raises(PerfusionAIError, match="does not overlap"):
        prepare_arrays(ph.ct_hu, ph.geometry, ph.spect, far, ph.lung_labels, SMALL, spect_name="spect.nii.gz")


def test_background_command_gives_progress_lines_and_the_in_process_result(tmp_path, small_model):
    """What the Slicer module runs in its background process, read back as the module does."""
    import subprocess
    import sys

    from perfusionai.ctpm.predict import (build_predict_command, load_ctpm_model, predict_perfusion,
                                          read_prediction, volume_rows, write_predict_inputs)
    from perfusionai.slicer_support import parse_progress_line

    ph = make_ctpm_phantom(4, phantom_geometry(spacing_mm=(6.0, 6.0, 6.0)), n_vessels=2)
    ct_path, mask_path = write_predict_inputs(tmp_path / "inputs", ph.ct_hu, ph.geometry, ph.lung_labels)
    out = tmp_path / "prediction"
    command = build_predict_command(sys.executable, ct_path, small_model, out, mask_path, device="cpu")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    progress = [parse_progress_line(line) for line in done.stdout.splitlines()]
    fractions = [p[0] for p in progress if p is not None]
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    result, geometry, summary = read_prediction(out)
    assert geometry.same_grid(ph.geometry)
    expected = predict_perfusion(ph.ct_hu, ph.geometry, load_ctpm_model(small_model, device="cpu"), ph.lung_labels)
    np.testing.assert_allclose(result.perfusion, expected.perfusion, atol=1e-5)
    rows = volume_rows(result, geometry)
    assert [r["Region"] for r in rows] == ["Right lung", "Left lung", "Both lungs"]
    assert rows[2]["Lung (mL)"] == pytest.approx(rows[0]["Lung (mL)"] + rows[1]["Lung (mL)"], abs=0.2)
    assert rows[2]["Lung (mL)"] == pytest.approx(summary["volumes"]["both"]["lung_ml"], abs=0.1)
