"""``perfusionai prm ct`` / ``prm evaluate`` on files: outputs, formats and bad input refused cleanly."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from perfusionai.cli import main
from perfusionai.io import Geometry, read_volume, write_series, write_volume
from perfusionai.phantoms.prm import make_prm_phantom, truth_statistics


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An already aligned phantom pair on disk (no registration needed: fast)."""
    d = tmp_path_factory.mktemp("prm_pair")
    ph = make_prm_phantom(shape=(40, 56, 64), spacing_mm=5.0, deform=False, seed=4)
    paths = {
        "insp": write_volume(ph.insp.array, ph.geometry, d / "insp.nii.gz"),
        "exp": write_volume(ph.exp.array, ph.geometry, d / "exp.nii.gz"),
        "lobes": write_volume(ph.lobes, ph.geometry, d / "lobes.nii.gz"),
        "truth": write_volume(ph.truth_prm, ph.geometry, d / "truth.nii.gz"),
        "lungs": write_volume(ph.lung_labels, ph.geometry, d / "lungs.nii.gz"),
    }
    return ph, paths


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prm_ct_writes_the_documented_outputs(pair, tmp_path, capsys):
    ph, p = pair
    out = tmp_path / "out"
    code, stdout, _ = _run(["prm", "ct", "--insp", str(p["insp"]), "--exp", str(p["exp"]), "--lobes", str(p["lobes"]),
                            "--no-registration", "--out", str(out), "--progress", "none"], capsys)
    assert code == 0
    for name in ("prm.nii.gz", "exp_registered.nii.gz", "prm_stats.json", "prm_stats.csv", "prm_scatter.png",
                 "prm_overlay.png"):
        assert (out / name).exists(), name
    prm = read_volume(out / "prm.nii.gz")
    assert prm.geometry.same_grid(ph.geometry)
    stats = json.loads((out / "prm_stats.json").read_text())
    assert set(stats) >= {"whole_lung", "right", "left", "lobes"}
    assert set(stats["whole_lung"]) >= {"normal", "fsad", "emph", "uncategorized", "excluded", "voxels"}
    assert sorted(stats["lobes"]) == ["1", "2", "3", "4", "5", "6"]
    truth = truth_statistics(ph)
    for key in ("normal", "fsad", "emph"):
        assert abs(stats["whole_lung"][key] - truth["whole_lung"][key]) < 2.0
    rows = list(csv.DictReader((out / "prm_stats.csv").open()))
    assert [r["region"] for r in rows[:3]] == ["whole_lung", "right", "left"] and len(rows) == 9
    assert float(rows[0]["emph"]) == pytest.approx(stats["whole_lung"]["emph"], abs=1e-3)


def test_prm_evaluate_case_and_cohort(pair, tmp_path, capsys):
    ph, p = pair
    # one case: the prediction loses n of the N reference emphysema voxels to normal, so
    # Dice(emph) = 2 (N - n) / (2N - n) and the predicted whole-lung %emph is lower
    emph_voxels = np.argwhere(ph.truth_prm == 3)
    n_lost = len(emph_voxels) // 4
    pred = ph.truth_prm.copy()
    pred[tuple(emph_voxels[:n_lost].T)] = 1
    write_volume(pred, ph.geometry, tmp_path / "pred_case.nii.gz")
    code, stdout, _ = _run(["prm", "evaluate", "--pred", str(tmp_path / "pred_case.nii.gz"), "--ref", str(p["truth"]),
                            "--lobes", str(p["lobes"])], capsys)
    assert code == 0
    result = json.loads(stdout)
    total = len(emph_voxels)
    assert result["dice"]["emph"] == pytest.approx(2 * (total - n_lost) / (2 * total - n_lost), rel=1e-9)
    assert result["dice"]["fsad"] == pytest.approx(1.0)
    assert result["difference"]["whole_lung"]["emph"] < 0 < result["difference"]["whole_lung"]["normal"]
    # A cohort of 4 "patients": references lose n/20 of the emphysema voxels to normal, predictions n/10
    # (nested subsets), so predicted %emph < reference %emph and both fall together with n.
    rows = []
    rng = np.random.default_rng(0)
    emph = np.argwhere(ph.truth_prm == 3)
    order = rng.permutation(len(emph))
    write_volume(ph.lobes, ph.geometry, tmp_path / "lobes.nii.gz")
    for n in range(1, 5):
        maps = {}
        for kind, fraction in (("ref", n / 20), ("pred", n / 10)):
            labels = ph.truth_prm.copy()
            flip = emph[order[: int(len(emph) * fraction)]]
            labels[tuple(flip.T)] = 1
            maps[kind] = write_volume(labels, ph.geometry, tmp_path / f"{kind}{n}.nii.gz").name
        rows.append({"patient": f"p{n}", "pred": maps["pred"], "ref": maps["ref"], "lobes": "lobes.nii.gz"})
    with (tmp_path / "cohort.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["patient", "pred", "ref", "lobes"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "eval"
    code, _, _ = _run(["prm", "evaluate", "--cohort", str(tmp_path / "cohort.csv"), "--out", str(out)], capsys)
    assert code == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert (out / "prm_agreement.png").exists()
    ba = result["patient_level"]["emph"]["bland_altman"]
    # every prediction loses emphysema: mean difference negative, and lobe level has 6 lobes x 4 patients
    assert ba["mean_difference"] < 0
    assert result["lobe_level"]["emph"]["n"] == 24
    assert result["patient_level"]["emph"]["pearson_r"] > 0.99
    assert result["patient_level"]["normal"]["pearson_r"] > 0.99


def _expect_refusal(args, capsys, out, match):
    code, _, err = _run(args + ["--out", str(out), "--progress", "none"], capsys)
    assert code == 2
    assert "perfusionai: error:" in err and match in err, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not any(out.parent.glob(f".{out.name}.partial-*"))


def test_bad_inputs_are_refused_and_nothing_is_written(pair, tmp_path, capsys):
    ph, p = pair
    g = ph.geometry
    far = Geometry(g.shape, g.spacing, (g.origin[0] + 5000.0, g.origin[1], g.origin[2]), g.direction)
    far_path = write_volume(ph.exp.array, far, tmp_path / "far.nii.gz")
    _expect_refusal(["prm", "ct", "--insp", str(p["insp"]), "--exp", str(far_path)], capsys, tmp_path / "o1",
                    "do not overlap")
    four_d = write_series(np.stack([ph.exp.array] * 3, axis=-1), g, tmp_path / "exp4d.nii.gz", tr=1.0)
    _expect_refusal(["prm", "ct", "--insp", str(p["insp"]), "--exp", str(four_d)], capsys, tmp_path / "o2", "4D")
    mri = write_volume(np.abs(ph.insp.array + 1000.0) * 2.0, g, tmp_path / "vibe.nii.gz")  # positive MR-like values
    _expect_refusal(["prm", "ct", "--insp", str(mri), "--exp", str(p["exp"])], capsys, tmp_path / "o3",
                    "Hounsfield")
    empty = write_volume(np.zeros(g.shape, np.uint8), g, tmp_path / "empty.nii.gz")
    _expect_refusal(["prm", "ct", "--insp", str(p["insp"]), "--exp", str(p["exp"]), "--lung-mask", str(empty)],
                    capsys, tmp_path / "o4", "empty")
    other = Geometry((20, 28, 32), tuple(2 * s for s in g.spacing), g.origin, g.direction)
    lobes_other = write_volume(ph.lobes[::2, ::2, ::2], other, tmp_path / "lobes_other.nii.gz")
    _expect_refusal(["prm", "ct", "--insp", str(p["insp"]), "--exp", str(p["exp"]), "--lobes", str(lobes_other)],
                    capsys, tmp_path / "o5", "not on the grid")
    _expect_refusal(["prm", "ct", "--insp", str(p["insp"]), "--exp", str(p["exp"]), "--lobes", str(p["lobes"]),
                     "--lobe-convention", "madeup"], capsys, tmp_path / "o6", "unknown lobe convention")


def test_user_lung_mask_wins(pair, tmp_path, capsys):
    ph, p = pair
    half = ph.lung_labels.copy()
    half[half == 2] = 0  # right lung only
    mask = write_volume(half, ph.geometry, tmp_path / "right_only.nii.gz")
    out = tmp_path / "out"
    code, _, _ = _run(["prm", "ct", "--insp", str(p["insp"]), "--exp", str(p["exp"]), "--lung-mask", str(mask),
                       "--no-registration", "--no-figures", "--out", str(out), "--progress", "none"], capsys)
    assert code == 0
    prm = read_volume(out / "prm.nii.gz").array
    assert not prm[ph.lung_labels == 2].any()
    stats = json.loads((out / "prm_stats.json").read_text())
    assert stats["left"]["lung_voxels"] == 0 and stats["right"]["voxels"] > 0


def test_prm_phantom_verb_writes_pair_and_truth_matching_its_maps(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["prm", "phantom", "--out", str(out), "--spacing", "7", "--progress", "none"]) == 0
    capsys.readouterr()
    insp, exp = read_volume(out / "insp.nii.gz"), read_volume(out / "exp.nii.gz")
    truth_prm = read_volume(out / "truth_prm.nii.gz").array
    lungs = read_volume(out / "lung_mask.nii.gz").array
    assert insp.array.shape == exp.array.shape == truth_prm.shape == (28, 40, 48)
    assert insp.geometry.spacing == pytest.approx((7.0, 7.0, 7.0))
    assert set(np.unique(lungs)) == {0, 1, 2} and set(np.unique(read_volume(out / "lobes.nii.gz").array)) <= set(range(7))
    truth = json.loads((out / "truth.json").read_text())["truth"]["whole_lung"]
    in_lung = truth_prm[lungs > 0]
    # the JSON percentages are those of the written truth map (excluded voxels left out)
    assert truth["emph"] == pytest.approx(100 * np.mean(in_lung[in_lung > 0] == 3), abs=1e-6)
    assert truth["normal"] > 30 and truth["emph"] > 5
    # a bad value is one line, exit 2, nothing written
    assert main(["prm", "phantom", "--out", str(tmp_path / "bad"), "--noise-hu", "-1", "--progress", "none"]) == 2
    assert "--noise-hu" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_ctpm_phantom_and_its_old_name_phantoms_both_work(capsys):
    for verb in ("phantom", "phantoms"):  # 'phantom' everywhere (issue 16); 'phantoms' kept as an alias
        with pytest.raises(SystemExit) as done:
            main(["ctpm", verb, "--help"])
        assert done.value.code == 0 and "ctpm phantom" in capsys.readouterr().out
