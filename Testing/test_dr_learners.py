"""Learned prediction of the advanced protocol on a phantom cohort (Macarro et al. 2025's claims)."""

import json

import numpy as np
import pytest

from perfusionai.cli import main
from perfusionai.dr import evaluation as E
from perfusionai.dr import learners as L
from perfusionai.errors import PerfusionAIError
from perfusionai.metrics import bias_dispersion_index
from perfusionai.phantoms.dr import make_dr_cohort, write_dr_cohort


@pytest.fixture(scope="module")
def cohort():
    phantoms = make_dr_cohort(10, shape=(3, 32, 32), snr=60, seed=1)
    return [L.patient_features(p.dwi, p.protocol, p.tumour, p.name) for p in phantoms]


def test_signal_to_signal_beats_maps_to_maps_on_bi_and_di(cohort):
    rows = E.leave_one_patient_out(cohort[:7], algorithms=("lr", "etr"))
    summary = {(s["strategy"], s["algorithm"]): s for s in E.summarise(rows)}
    for algorithm in ("lr", "etr"):
        s2s = summary[("signal-to-signal", algorithm)]
        m2m = summary[("maps-to-maps", algorithm)]
        assert s2s["n_rows"] == m2m["n_rows"] == 7 * 6
        assert s2s["mean_abs_bi"] < m2m["mean_abs_bi"], algorithm
        assert s2s["mean_di"] < m2m["mean_di"], algorithm
    # rows are true per-patient BI/DI of the relative error against the reference fit
    row = rows[0]
    assert set(row) == {"patient", "strategy", "algorithm", "n_train", "metric", "bi", "di"} and row["di"] > 0


def test_five_training_patients_give_di_within_20_percent_of_all(cohort):
    rows = E.training_size_study(cohort, sizes=(5, len(cohort) - 1), algorithms=("lr",))
    by_size = {s["n_train"]: s for s in E.summarise(rows, by=("n_train",))}
    di_five = by_size[5]["mean_di"]
    di_all = by_size[len(cohort) - 1]["mean_di"]
    assert abs(di_five - di_all) <= 0.2 * di_all
    # and the five-patient learner has learned something: far better than predicting the population median
    baseline = E.summarise(E.population_baseline(cohort))[0]
    assert di_five < 0.75 * baseline["mean_di"]
    assert by_size[5]["mean_abs_bi"] < 0.75 * baseline["mean_abs_bi"]


def test_predict_scores_match_the_shared_bi_di_definition(cohort):
    model = L.train(cohort[1:4], "lr", "maps-to-maps")
    predicted = L.predict(model, cohort[0])
    scores = E.score_patient(predicted, cohort[0])
    error = (predicted["dt"] - cohort[0].y_maps["dt"]) / cohort[0].y_maps["dt"]
    q25, q50, q75 = np.percentile(error, [25, 50, 75])
    assert scores["dt"] == pytest.approx((q50, q75 - q25))
    assert scores["dt"] == bias_dispersion_index(predicted["dt"], cohort[0].y_maps["dt"])


@pytest.mark.parametrize("algorithm,strategy", [("lr", "signal-to-signal"), ("etr", "maps-to-maps"),
                                                ("gbr", "maps-to-maps"), ("slnn", "signal-to-signal"),
                                                ("patchnn", "maps-to-maps")])
def test_model_folder_round_trip_reproduces_predictions(cohort, tmp_path, algorithm, strategy):
    model = L.train(cohort[1:3], algorithm, strategy, trained_on_phantoms=True)
    folder = L.save_model(model, tmp_path / "model")
    card = json.loads((folder / "model.json").read_text())
    assert card["trained_on_phantoms"] is True and card["dr_learner"]["algorithm"] == algorithm
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.pt"))
    loaded = L.load_model(folder)
    x = L._inputs(cohort[0], strategy, algorithm)
    np.testing.assert_allclose(loaded.learner.predict(x), model.learner.predict(x), rtol=1e-12, atol=1e-12)
    # a modified weights file is refused
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PerfusionAIError, match="sha256"):
        L.load_model(folder)


def test_cli_train_predict_evaluate(tmp_path, capsys):
    csv_path = write_dr_cohort(make_dr_cohort(4, shape=(2, 24, 24), snr=60, seed=3), tmp_path / "cohort")
    model_dir = tmp_path / "model"
    # no --phantom-data: the marker 'dr phantom' writes beside cohort.csv labels the model by itself
    assert main(["dr", "train", "--cohort", str(csv_path), "--algorithm", "lr",
                 "--out", str(model_dir), "--progress", "none"]) == 0
    assert "trained on phantoms" in capsys.readouterr().out
    patient = tmp_path / "cohort" / "patient01"
    out = tmp_path / "pred"
    assert main(["dr", "predict", "--dwi", str(patient / "dwi.nii.gz"), "--bvals", str(patient / "bvals"),
                 "--tes", str(patient / "tes"), "--mask", str(patient / "tumour.nii.gz"), "--model", str(model_dir),
                 "--out", str(out), "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trained_on_phantoms"] and summary["strategy"] == "signal-to-signal"
    for name in ("s0", "f", "dv", "t2v", "dt", "k", "t2t", "predicted_signals"):
        assert (out / f"{name}.nii.gz").is_file()
    from perfusionai.io import read_volume

    dt = read_volume(out / "dt.nii.gz")
    tumour = read_volume(patient / "tumour.nii.gz").array > 0
    assert dt.geometry.same_grid(read_volume(patient / "tumour.nii.gz").geometry)
    assert np.all(np.isfinite(dt.array)) and np.all(dt.array[tumour] > 0) and np.all(dt.array[~tumour] == 0)
    ev = tmp_path / "eval"
    assert main(["dr", "evaluate", "--cohort", str(csv_path), "--algorithms", "lr", "--sizes", "1,3",
                 "--out", str(ev), "--progress", "none"]) == 0
    result = json.loads((ev / "summary.json").read_text())
    assert {s["strategy"] for s in result["summary"]} == {"signal-to-signal", "maps-to-maps", "baseline"}
    assert {s["n_train"] for s in result["training_size"]} == {1, 3}
    for name in ("lopo.csv", "summary.csv", "bi_di.png", "training_size.csv", "training_size.png"):
        assert (ev / name).stat().st_size > 0
    # a model needs its clinical b-values: a series without b = 900 is refused, nothing written
    (tmp_path / "few_bvals").write_text(" ".join(["0"] * 7 + ["50"] * 7 + ["100"] * 7))
    bad_out = tmp_path / "bad"
    assert main(["dr", "predict", "--dwi", str(patient / "dwi.nii.gz"), "--bvals", str(tmp_path / "few_bvals"),
                 "--model", str(model_dir), "--out", str(bad_out), "--progress", "none"]) == 2
    assert "b = 400" in capsys.readouterr().err and not bad_out.exists()
