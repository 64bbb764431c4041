"""CT PRM as a library (PRMModel -> PRMFit), its job specification (PRMCTJob) and the CT input guards.

Fast: a 40x56x64 phantom at 5 mm, no registration (the phantom built without deformation is
already aligned), so every case runs in about a second.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from perfusionai.cli import main
from perfusionai.io import read_volume, write_volume
from perfusionai.metrics import dice
from perfusionai.phantoms.prm import make_prm_phantom, truth_statistics
from perfusionai.prm import PRMCTJob, PRMFit, PRMModel, PRMPredictJob, evaluate_files


@pytest.fixture(scope="module")
def aligned():
    """A phantom pair without breathing deformation: insp and exp on one grid, voxel for voxel."""
    return make_prm_phantom(shape=(40, 56, 64), spacing_mm=5.0, deform=False, seed=5)


@pytest.fixture(scope="module")
def breathing(tmp_path_factory):
    """A phantom pair with the breathing deformation, written to files (insp lungs larger and darker)."""
    ph = make_prm_phantom(shape=(40, 56, 64), spacing_mm=5.0, seed=3)
    root = tmp_path_factory.mktemp("prm_pair")
    write_volume(ph.insp.array, ph.insp.geometry, root / "insp.nii.gz")
    write_volume(ph.exp.array, ph.exp.geometry, root / "exp.nii.gz")
    return root, ph


def test_ct_job_round_trips_through_argv_and_json():
    job = PRMCTJob(insp="a/insp.nii.gz", exp="a/exp.nii.gz", out="o", lung_mask="m.nii.gz", lobes="l.nii.gz",
                   lobe_convention="totalsegmentator", no_registration=False, direction="insp_to_exp", threads=3,
                   registration_quality="accurate", registration_spacing=2.5, syn_iterations="30x10",
                   threshold_insp=-940.0, threshold_exp=-850.0, valid_range=(-1024.0, -400.0), median=5,
                   median_2d=True, no_figures=True, allow_swapped=True, allow_non_hu=True)
    assert PRMCTJob.from_argv(job.to_argv()) == job
    assert PRMCTJob.from_json(json.dumps(job.to_json())) == job
    assert job.to_argv()[:2] == ["prm", "ct"] and "--allow-swapped" in job.to_argv()
    # defaults: the command line and the job agree, and thresholds come from ClassificationOptions
    plain = PRMCTJob(insp="i", exp="e", out="o")
    assert PRMCTJob.from_argv(plain.to_argv()) == plain
    opts = plain.options()
    assert (opts.classification.threshold_insp_hu, opts.classification.threshold_exp_hu) == (-950.0, -856.0)
    assert job.options().registration.syn_iterations == (30, 10)


def test_predict_job_round_trips_through_argv_and_json():
    job = PRMPredictJob(model="m", out="o", vibe="v.nii.gz", pbf="p.nii.gz", lung_mask="l.nii.gz",
                        lobes="lobes.nii.gz", reference="ref.nii.gz", device="cpu")
    assert PRMPredictJob.from_argv(job.to_argv()) == job
    assert PRMPredictJob.from_json(job.to_json()) == job


def test_importing_prm_imports_neither_torch_nor_ants():
    code = ("import sys, perfusionai.prm, perfusionai.lung; "
            "print(sorted(m for m in ('torch', 'ants', 'matplotlib', 'sklearn', 'nnunetv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_prm_model_fit_on_an_aligned_pair_matches_the_truth(aligned, tmp_path):
    fit = PRMModel(register=False).fit(aligned.insp, aligned.exp, lobes=aligned.lobes)
    assert isinstance(fit, PRMFit) and fit.labels is fit.prm
    truth = truth_statistics(aligned)
    for key in ("normal", "fsad", "emph"):
        assert abs(fit.stats["whole_lung"][key] - truth["whole_lung"][key]) < 1.5, key
    for label in (1, 2, 3):
        assert dice(fit.labels == label, aligned.truth_prm == label) > 0.93, label
    # lung volume of the valid voxels: voxel count x 0.125 mL (5 mm voxels)
    assert fit.summary()["volume_ml"] == pytest.approx(fit.stats["whole_lung"]["voxels"] * 0.125)
    fit.save(tmp_path / "out", figures=False)
    written = read_volume(tmp_path / "out" / "prm.nii.gz")
    assert np.array_equal(written.array, fit.labels) and written.geometry.same_grid(aligned.insp.geometry)
    assert not list(tmp_path.glob(".*partial*"))


def test_swapped_scans_are_refused_naming_both_files_unless_allowed(breathing, tmp_path, capsys):
    root, _ = breathing
    out = tmp_path / "swapped"
    # expiratory given as inspiratory and the other way round
    rc = main(["prm", "ct", "--insp", str(root / "exp.nii.gz"), "--exp", str(root / "insp.nii.gz"),
               "--out", str(out), "--no-figures", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "look swapped" in err and str(root / "exp.nii.gz") in err and str(root / "insp.nii.gz") in err
    assert "--allow-swapped" in err and not out.exists()
    # --allow-swapped lets the same pair through (the scans share one grid: no registration needed here)
    rc = main(["prm", "ct", "--insp", str(root / "exp.nii.gz"), "--exp", str(root / "insp.nii.gz"),
               "--out", str(out), "--no-figures", "--no-registration", "--allow-swapped", "--progress", "none"])
    assert rc == 0 and (out / "prm.nii.gz").is_file()
    stats = json.loads((out / "prm_stats.json").read_text())
    assert stats["info"]["insp_lung_ml"] < stats["info"]["exp_lung_ml"]
    assert stats["info"]["job"]["options"]["allow_swapped"] is True


def test_ct_without_the_rescale_is_refused_unless_allowed(aligned, tmp_path, capsys):
    # stored values (HU + 1024) as a scanner writes them before the rescale intercept is applied
    raw_i = tmp_path / "insp_raw.nii.gz"
    raw_e = tmp_path / "exp_raw.nii.gz"
    write_volume(np.clip(aligned.insp.array + 1024, 0, 4095).astype(np.int16), aligned.insp.geometry, raw_i)
    write_volume(np.clip(aligned.exp.array + 1024, 0, 4095).astype(np.int16), aligned.exp.geometry, raw_e)
    out = tmp_path / "raw"
    rc = main(["prm", "ct", "--insp", str(raw_i), "--exp", str(raw_e), "--no-registration", "--out", str(out),
               "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and str(raw_i) in err and "not in Hounsfield units" in err and "--allow-non-hu" in err
    assert not out.exists()
    # with the override and a lung mask it runs; nothing lies in the valid HU range, so no voxel is classified
    mask = tmp_path / "lungs.nii.gz"
    write_volume(aligned.lung_labels.astype(np.uint8), aligned.insp.geometry, mask)
    rc = main(["prm", "ct", "--insp", str(raw_i), "--exp", str(raw_e), "--no-registration", "--lung-mask",
               str(mask), "--allow-non-hu", "--no-figures", "--out", str(out), "--progress", "none"])
    assert rc == 0 and not read_volume(out / "prm.nii.gz").array.any()


def test_prm_evaluate_reports_real_volumes(tmp_path):
    """Hand-computed case: 2x2x2 mm voxels (8 uL), 10 normal + 6 emphysema voxels predicted."""
    from perfusionai.io import Geometry

    g = Geometry((4, 4, 4), spacing=(2.0, 2.0, 2.0))
    pred = np.zeros((4, 4, 4), np.uint8)
    pred.flat[:10] = 1
    pred.flat[10:16] = 3
    ref = pred.copy()
    ref.flat[10:13] = 2  # three emphysema voxels are fSAD in the reference
    write_volume(pred, g, tmp_path / "pred.nii.gz")
    write_volume(ref, g, tmp_path / "ref.nii.gz")
    result = evaluate_files(pred=tmp_path / "pred.nii.gz", ref=tmp_path / "ref.nii.gz")
    assert result["pred"]["whole_lung"]["volume_ml"] == pytest.approx(16 * 0.008)
    assert result["ref"]["whole_lung"]["volume_ml"] == pytest.approx(16 * 0.008)
    assert result["dice"]["emph"] == pytest.approx(2 * 3 / (6 + 3))
    rc = main(["prm", "evaluate", "--pred", str(tmp_path / "pred.nii.gz"), "--ref", str(tmp_path / "ref.nii.gz"),
               "--out", str(tmp_path / "ev"), "--progress", "none"])
    written = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert rc == 0 and written["pred"]["whole_lung"]["volume_ml"] == pytest.approx(0.128)


def test_prm_help_has_a_description_and_every_option_help():
    from perfusionai.cli import build_parser

    parser = build_parser()
    prm = parser._subparsers._group_actions[0].choices["prm"]
    assert prm.description and "parametric response" in prm.description.lower()
    for name, verb in prm._subparsers._group_actions[0].choices.items():
        assert verb.description, name
        for action in verb._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)


def test_prm_ct_never_overwrites_its_inputs(aligned, tmp_path, capsys):
    """Issue 13.1 for prm ct: a lung mask named like an output (lungs.nii.gz) in the --out folder."""
    case = tmp_path / "C"
    case.mkdir()
    write_volume(aligned.insp.array, aligned.insp.geometry, case / "insp.nii.gz")
    write_volume(aligned.exp.array, aligned.exp.geometry, case / "exp.nii.gz")
    write_volume((aligned.lung_labels > 0).astype(np.uint8) * 255, aligned.insp.geometry, case / "lungs.nii.gz")
    before = (case / "lungs.nii.gz").read_bytes()
    rc = main(["prm", "ct", "--insp", str(case / "insp.nii.gz"), "--exp", str(case / "exp.nii.gz"), "--lung-mask",
               str(case / "lungs.nii.gz"), "--no-registration", "--no-figures", "--out", str(case),
               "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "lungs.nii.gz" in err and len(err.strip().splitlines()) == 1
    assert (case / "lungs.nii.gz").read_bytes() == before and not (case / "prm.nii.gz").exists()


def test_prm_ct_refuses_inf_and_nan_naming_the_file(aligned, tmp_path, capsys):
    """Issue 13.3: Inf/-Inf in a CT were read as 0 HU; now restored by the reader and refused by file name."""
    arr = aligned.insp.array.astype(np.float32).copy()
    arr[20, 28, 20:23] = [np.inf, -np.inf, np.nan]
    bad = tmp_path / "insp_inf.nii.gz"
    write_volume(arr, aligned.insp.geometry, bad)
    write_volume(aligned.exp.array, aligned.exp.geometry, tmp_path / "exp.nii.gz")
    rc = main(["prm", "ct", "--insp", str(bad), "--exp", str(tmp_path / "exp.nii.gz"), "--no-registration",
               "--out", str(tmp_path / "o"), "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "3 NaN or infinite" in err and not (tmp_path / "o").exists()
