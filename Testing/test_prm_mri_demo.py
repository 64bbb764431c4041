"""The demo's "PRM from MRI" part on a tiny configuration: what it reports must be what it wrote.

The numbers in the HTML table and in ``mri_prm_table.csv`` are recomputed here from the written
NIfTI files (predicted map, reference map, lung mask) with plain numpy counting; the predicted map
is reproduced by the saved model from the written inputs; the ablation's all-four row is the mean
of the per-subject Dice; everything is labelled as trained on phantoms during the demo.
"""

import csv
import html
import json
import re

import numpy as np
import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from perfusionai.prm.demo_mri import run_mri_demo

    out = tmp_path_factory.mktemp("prm_mri_demo")
    messages = []
    body, images = run_mri_demo(out, lambda f, m: messages.append((f, m)), n_subjects=8, train_seconds=5.0,
                                epochs=3, n_montage=1)
    return out, body, images, messages


def _labels(path):
    from perfusionai.io import read_volume

    return np.rint(read_volume(path).array).astype(np.int64)


def _percent(prm, lung, label):
    """% of the lung's categorised voxels (labels 1-4) carrying ``label``."""
    inside = prm[lung]
    valid = (inside >= 1) & (inside <= 4)
    return 100.0 * np.count_nonzero(inside == label) / np.count_nonzero(valid)


def _dice_abnormal(pred, ref, lung):
    valid = lung & (ref >= 1) & (ref <= 3)
    a = valid & ((pred == 2) | (pred == 3))
    b = valid & ((ref == 2) | (ref == 3))
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _html_table(body, caption_start):
    """Rows (lists of cell strings) of the HTML table whose caption starts with ``caption_start``."""
    for table in re.findall(r"<table>(.*?)</table>", body, flags=re.S):
        cap = re.search(r"<caption>(.*?)</caption>", table, flags=re.S)
        if cap and html.unescape(cap.group(1)).startswith(caption_start):
            tbody = re.search(r"<tbody>(.*)</tbody>", table, flags=re.S).group(1)
            return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]
                    for row in re.findall(r"<tr>(.*?)</tr>", tbody, flags=re.S)]
    raise AssertionError(f"no table captioned {caption_start!r}")


def test_reported_prm_table_matches_written_maps(demo):
    out, body, _, _ = demo
    data = out / "prm_mri"
    with (data / "mri_prm_table.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    held_out = json.loads((data / "mri_demo.json").read_text())["subjects"]["test"]
    assert [r["subject"] for r in rows] == held_out and len(held_out) >= 2
    shown = _html_table(body, "PRM from MRI, trained on phantoms during this demo")
    assert [r[0] for r in shown] == held_out
    for row, cells in zip(rows, shown):
        sub = data / row["subject"]
        lung = _labels(sub / "lung_mask.nii.gz") != 0
        pred = _labels(sub / "predicted_prm.nii.gz")
        ref = _labels(sub / "reference_prm.nii.gz")
        assert set(np.unique(pred[~lung])) <= {0}                 # nothing predicted outside the lung
        assert set(np.unique(pred[lung])) <= {1, 2, 3}            # the network has no uncategorized class
        for col, (cls, label) in enumerate((("normal", 1), ("fsad", 2), ("emph", 3)), start=1):
            p, r = _percent(pred, lung, label), _percent(ref, lung, label)
            assert float(row[f"pred_{cls}"]) == pytest.approx(p, abs=1e-4)
            assert float(row[f"ref_{cls}"]) == pytest.approx(r, abs=1e-4)
            assert cells[col] == f"{p:.1f} / {r:.1f}"
        d = _dice_abnormal(pred, ref, lung)
        assert float(row["dice_abnormal"]) == pytest.approx(d, abs=1e-5)
        assert cells[4] == f"{d:.3f}"
        # predicted %PRM sum to 100 % of the valid lung voxels
        assert sum(float(row[f"pred_{c}"]) for c in ("normal", "fsad", "emph")) == pytest.approx(100.0, abs=1e-3)


def test_shown_map_is_the_saved_models_prediction_and_ablation_agrees(demo):
    from perfusionai.io import read_volume
    from perfusionai.prm.mri_predict import predict_prm_mri
    from perfusionai.prm.mri_training import load_prm_model

    out, body, _, _ = demo
    data = out / "prm_mri"
    model, card = load_prm_model(data / "model")
    assert card["trained_on_phantoms"] is True
    assert "trained on phantoms during this demo" in card["training_data"]
    with (data / "mri_prm_table.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    sub = data / rows[0]["subject"]
    vols = {s: read_volume(sub / f"{s}.nii.gz").array for s in ("vibe", "post_vibe", "irmax", "pbf")}
    again = predict_prm_mri(vols, _labels(sub / "lung_mask.nii.gz"), model, card, device="cpu")
    np.testing.assert_array_equal(again.labels, _labels(sub / "predicted_prm.nii.gz"))

    with (data / "mri_ablation.csv").open() as fh:
        ablation = {r["inputs"]: r for r in csv.DictReader(fh)}
    assert set(ablation) == {"All 4", "VIBE, post VIBE"}
    dices = np.array([float(r["dice_abnormal"]) for r in rows])
    assert float(ablation["All 4"]["dice_abnormal_mean"]) == pytest.approx(dices.mean(), abs=1e-5)
    assert int(ablation["VIBE, post VIBE"]["n"]) == len(rows)
    shown = _html_table(body, "Ablation (trained on phantoms during this demo)")
    assert shown[0][2].startswith(f"{dices.mean():.3f} ± ")
    assert shown[1][2].startswith(f"{float(ablation['VIBE, post VIBE']['dice_abnormal_mean']):.3f} ± ")


def test_figure_labels_and_training_cap(demo):
    out, body, images, messages = demo
    assert [p.name for p in images] == ["prm_mri_overlay.png"]
    png = images[0].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert body.count("trained on phantoms during this demo") >= 3
    info = json.loads((out / "prm_mri" / "mri_demo.json").read_text())
    assert 1 <= info["history"]["epochs_run"] <= 3
    assert info["training"]["max_seconds"] == 5.0
    assert not set(info["subjects"]["test"]) & set(info["subjects"]["train"] + info["subjects"]["val"])
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_the_demo_keeps_its_cohort_with_cohort_csv(demo):
    # the report names the kept cohort.csv; its rows are the demo's subjects and splits, the files exist
    from perfusionai.cli import build_parser

    out, body, _images, _messages = demo
    named = re.search(r"prm train --cohort (\S+) ", html.unescape(body)).group(1)
    cohort_csv = out.parent / named
    assert cohort_csv == out / "prm_mri" / "cohort" / "cohort.csv" and cohort_csv.is_file()
    rows = list(csv.DictReader(cohort_csv.open()))
    written = json.loads((out / "prm_mri" / "mri_demo.json").read_text())["subjects"]
    assert sorted(r["subject"] for r in rows) == sorted(sum(written.values(), []))
    assert {r["subject"]: r["split"] for r in rows} == {s: split for split, subs in written.items() for s in subs}
    for row in rows:
        for column in ("vibe", "post_vibe", "irmax", "pbf", "lung_mask", "lobes", "prm"):
            assert (cohort_csv.parent / row[column]).is_file(), (row["subject"], column)
    build_parser().parse_args(["prm", "train", "--cohort", str(cohort_csv), "--out", "m"])
