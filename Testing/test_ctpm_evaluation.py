"""DL-CTPM evaluation: the pinned definitions against hand-computed values and scikit-image."""

import json

import numpy as np
import pytest

from perfusionai.ctpm.evaluation import evaluate_files, evaluate_maps
from perfusionai.errors import PerfusionAIError
from perfusionai.io import Geometry, write_volume


def test_dice_high_and_low_hand_computed():
    pred = np.array([0.9, 0.7, 0.5, 0.2, 0.8, 0.0]).reshape(1, 2, 3)
    ref = np.array([1.2, 0.5, 0.66, 0.1, 0.9, 3.0]).reshape(1, 2, 3)
    lung = np.array([1, 1, 1, 1, 1, 0], bool).reshape(1, 2, 3)
    out = evaluate_maps(pred, ref, lung)
    # high pred {0,1,4}, high ref {0,2,4} (0.66 counts as high): 2*2/6; low pred {2,3}, low ref {1,3}: 2*1/4
    assert out["dice_high"] == pytest.approx(4 / 6)
    assert out["dice_low"] == pytest.approx(0.5)
    assert out["lung_voxels"] == 5


def test_spearman_over_lung_voxels_only_and_unclipped():
    pred = np.array([0.1, 0.2, 0.3, 0.4, 0.0, 0.5]).reshape(1, 2, 3)
    ref = np.array([0.5, 0.9, 1.5, 2.5, 99.0, 0.0]).reshape(1, 2, 3)  # values above 1 keep their ranks
    lung = np.array([1, 1, 1, 1, 0, 0], bool).reshape(1, 2, 3)
    assert evaluate_maps(pred, ref, lung)["spearman"] == pytest.approx(1.0)


def test_ssim_matches_scikit_image_on_the_lung_bounding_box():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(4)
    shape = (30, 26, 28)
    ref = np.clip(rng.normal(0.8, 0.3, shape), 0, None)
    pred = np.clip(ref + rng.normal(0, 0.15, shape), 0, 1)
    lung = np.zeros(shape, bool)
    lung[3:27, 4:22, 5:25] = rng.random((24, 18, 20)) > 0.1
    ours = evaluate_maps(pred, ref, lung)["ssim"]
    box = tuple(slice(ix.min(), ix.max() + 1) for ix in np.nonzero(lung))
    a = np.where(lung, np.clip(pred, 0, 1), 0)[box]
    b = np.where(lung, np.clip(ref, 0, 1), 0)[box]
    expected = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, K1=0.01, K2=0.03)
    assert ours == pytest.approx(expected, abs=1e-4)
    assert 0.2 < ours < 0.99


def _files(tmp_path, spect_origin=(0.0, 0.0, 0.0)):
    grid = Geometry((12, 14, 16), spacing=(2.0, 2.0, 2.5))
    rng = np.random.default_rng(5)
    lung = np.zeros(grid.shape, np.uint8)
    lung[2:10, 3:11, 2:7] = 1
    lung[2:10, 3:11, 9:14] = 2
    spect = rng.uniform(50, 150, grid.shape).astype(np.float32)
    level = np.percentile(spect[lung > 0], 75)
    pred = np.where(lung > 0, np.clip(spect / level, 0, 1), 0).astype(np.float32)
    spect_grid = Geometry(grid.shape, grid.spacing, spect_origin)
    write_volume(pred, grid, tmp_path / "pred.nii.gz")
    write_volume(spect, spect_grid, tmp_path / "spect.nii.gz")
    write_volume(lung, grid, tmp_path / "lungs.nii.gz")
    return tmp_path / "pred.nii.gz", tmp_path / "spect.nii.gz", tmp_path / "lungs.nii.gz"


def _expected_spearman(tmp_path):
    # The prediction is SPECT/P75 clipped at 1: the 25 % above 1 tie in the prediction only.
    from scipy import stats

    from perfusionai.io import read_volume

    pred = read_volume(tmp_path / "pred.nii.gz").array
    spect = read_volume(tmp_path / "spect.nii.gz").array
    lung = read_volume(tmp_path / "lungs.nii.gz").array > 0
    return stats.spearmanr(pred[lung], spect[lung])[0]


def test_evaluate_files_perfect_prediction(tmp_path):
    pred, spect, lungs = _files(tmp_path)
    out = evaluate_files(pred, spect, lungs, grid="prediction")
    assert out["spearman"] == pytest.approx(_expected_spearman(tmp_path), abs=1e-9)
    assert 0.95 < out["spearman"] < 1.0
    assert out["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert out["dice_high"] == pytest.approx(1.0) and out["dice_low"] == pytest.approx(1.0)


def test_cli_evaluate_prints_the_four_numbers(tmp_path, capsys):
    from perfusionai.cli import main

    pred, spect, lungs = _files(tmp_path)
    assert main(["ctpm", "evaluate", "--pred", str(pred), "--spect", str(spect), "--lung-mask", str(lungs),
                 "--progress", "none"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"spearman", "ssim", "dice_high", "dice_low"} <= set(result)
    # Same grid for SPECT and prediction here, so the SPECT-grid comparison is the identity too.
    assert result["spearman"] == pytest.approx(_expected_spearman(tmp_path), abs=1e-6)
    assert result["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_spect_that_does_not_overlap_the_ct_is_refused(tmp_path, capsys):
    from perfusionai.cli import main

    pred, spect, lungs = _files(tmp_path, spect_origin=(500.0, 0.0, 0.0))
    with pytest.raises(PerfusionAIError, match="does not overlap"):
        evaluate_files(pred, spect, lungs)
    out_json = tmp_path / "result.json"
    assert main(["ctpm", "evaluate", "--pred", str(pred), "--spect", str(spect), "--lung-mask", str(lungs),
                 "--out", str(out_json), "--progress", "none"]) == 2
    assert "does not overlap" in capsys.readouterr().err
    assert not out_json.exists()


def test_cohort_evaluation_writes_summary_and_box_plots(tmp_path, capsys):
    import csv

    from perfusionai.cli import main

    rows = []
    for n in range(3):
        case = tmp_path / f"case{n}"
        case.mkdir()
        pred, spect, lungs = _files(case)
        rows.append({"pred": f"case{n}/pred.nii.gz", "spect": f"case{n}/spect.nii.gz",
                     "lung_mask": f"case{n}/lungs.nii.gz", "group": "test" if n else "validation"})
    with open(tmp_path / "cohort.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "summary"
    assert main(["ctpm", "evaluate", "--cohort", str(tmp_path / "cohort.csv"), "--out", str(out),
                 "--grid", "prediction", "--progress", "none"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["test"]["ssim"]["n"] == 2 and summary["validation"]["ssim"]["n"] == 1
    assert summary["test"]["ssim"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert (out / "boxplots.png").stat().st_size > 1000 and (out / "cases.csv").exists()
    assert main(["ctpm", "evaluate", "--pred", "x.nii.gz", "--progress", "none"]) == 2
    assert "--spect, --lung-mask required" in capsys.readouterr().err
