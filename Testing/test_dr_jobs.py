"""The DR library API (DRModel -> DRFit, DRFitJob, DRPredictJob): DIPY shape, job round trips, parameter errors,
the NaN rule, single-echo models on multi-echo series, and no torch/scikit-learn for the classical path."""

import json
import subprocess
import sys

import numpy as np
import pytest

from perfusionai.cli import main
from perfusionai.dr import DRFit, DRFitJob, DRModel, DRPredictJob, Protocol, fitting
from perfusionai.errors import ParameterError, PerfusionAIError
from perfusionai.io import read_volume, write_series, write_volume
from perfusionai.phantoms.dr import make_dr_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_dr_phantom(shape=(2, 16, 16), snr=None, seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, phantom):
    folder = tmp_path_factory.mktemp("dr_jobs")
    write_series(phantom.dwi, phantom.geometry, folder / "dwi.nii.gz")
    (folder / "bvals").write_text(" ".join(f"{b:g}" for b in phantom.protocol.bvals) + "\n")
    (folder / "tes").write_text(" ".join(f"{t:g}" for t in phantom.protocol.tes) + "\n")
    write_volume(phantom.body.astype(np.uint8), phantom.geometry, folder / "body.nii.gz")
    return folder


def test_model_fit_returns_named_maps_equal_to_the_truth(phantom):
    fit = DRModel(phantom.protocol, model="t2ivimkurtosis").fit(phantom.dwi, mask=phantom.body)
    assert isinstance(fit, DRFit) and set(fit.maps) == {"s0", "f", "dv", "t2v", "dt", "k", "t2t"}
    body = phantom.body
    np.testing.assert_allclose(fit.dt[body], phantom.truth["dt"][body], rtol=1e-3)
    assert np.all(fit.dt[~body] == 0) and np.array_equal(fit.fitted, body)
    summary = fit.summary()
    assert summary["units"]["dt"] == "um2/ms"
    assert summary["median_in_fitted_voxels"]["k"] == pytest.approx(float(np.median(phantom.truth["k"][body])),
                                                                      rel=1e-3)
    with pytest.raises(AttributeError):
        fit.adc  # not a map of this model


def test_fit_save_writes_maps_and_summary(phantom, tmp_path):
    clinical, protocol = phantom.clinical()
    fit = DRModel(protocol).fit(clinical, mask=phantom.body)
    fit.save(tmp_path / "out", phantom.geometry)
    adc = read_volume(tmp_path / "out" / "adc.nii.gz")
    assert adc.geometry.same_grid(phantom.geometry)
    np.testing.assert_allclose(adc.array, fit.adc, rtol=1e-6)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == "clinical" and summary["fit"]["voxels_fitted"] == int(phantom.body.sum())


def test_jobs_round_trip_through_the_command_line_and_json(tmp_path):
    job = DRFitJob(dwi=tmp_path / "dwi.nii.gz", bvals="b.txt", tes="te.txt", mask="m.nii.gz",
                   model="t2ivimkurtosis", noise_sigma=3.5, noise_model="offset", grid_points=3, out="o")
    assert job.dwi == str(tmp_path / "dwi.nii.gz")  # paths kept as text
    assert DRFitJob.from_argv(job.to_argv()) == job
    assert DRFitJob.from_json(json.dumps(job.to_json())) == job
    assert DRFitJob.from_argv(DRFitJob(dwi="d", bvals="b", out="o").to_argv()).model == "clinical"
    predict = DRPredictJob(dwi="c.nii.gz", bvals="cb", tes="ct", model="m/", out="p", mask="t.nii.gz")
    assert DRPredictJob.from_argv(predict.to_argv()) == predict
    assert DRPredictJob.from_json(predict.to_json()) == predict


def test_library_errors_name_parameters(phantom):
    with pytest.raises(ParameterError) as err:
        DRModel(Protocol(phantom.protocol.bvals), model="t2ivimkurtosis").fit(phantom.dwi)
    assert err.value.parameter == "tes" and "--" not in str(err.value)
    with pytest.raises(ParameterError, match="^grid_points: must be between 2 and 8"):
        DRModel(phantom.protocol, model="t2ivimkurtosis", grid_points=9)
    with pytest.raises(ParameterError, match="^model: unknown model"):
        DRModel(phantom.protocol, model="dki")
    with pytest.raises(ParameterError, match="^bvals: has 20 b-values"):
        DRModel(Protocol(phantom.protocol.bvals[:-1], phantom.protocol.tes[:-1])).fit(phantom.dwi)


def test_nan_inside_the_mask_is_refused_naming_the_file(phantom, files, tmp_path, capsys):
    dwi = phantom.dwi.astype(np.float32).copy()
    dwi[1, 8, 8, 4] = np.nan  # inside the body
    write_series(dwi, phantom.geometry, tmp_path / "nan.nii.gz")
    out = tmp_path / "out"
    assert main(["dr", "fit", "--dwi", str(tmp_path / "nan.nii.gz"), "--bvals", str(files / "bvals"),
                 "--tes", str(files / "tes"), "--mask", str(files / "body.nii.gz"), "--model", "clinical",
                 "--out", str(out), "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "nan.nii.gz" in err and "NaN" in err and "frame(s) 5" in err and "Traceback" not in err
    assert not out.exists()
    # outside the mask a NaN is never used
    dwi_out = phantom.dwi.astype(np.float32).copy()
    dwi_out[0, 0, 0, :] = np.nan
    assert not phantom.body[0, 0, 0]
    fit = DRModel(phantom.protocol).fit(dwi_out, mask=phantom.body)
    assert int(fit.fitted.sum()) == int(phantom.body.sum())
    with pytest.raises(PerfusionAIError, match="NaN"):
        DRModel(phantom.protocol).fit(dwi_out)  # no mask: the whole series is used


def test_clinical_model_on_a_multi_echo_series(phantom, files, tmp_path, capsys):
    # without echo times the three b = 0 volumes (TE 80, 105, 120 ms) disagree: refused, naming --tes
    out = tmp_path / "out"
    assert main(["dr", "fit", "--dwi", str(files / "dwi.nii.gz"), "--bvals", str(files / "bvals"),
                 "--model", "clinical", "--out", str(out), "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("perfusionai: error: --tes:") and "several echo times" in err and not out.exists()
    # with echo times: the shortest-TE volumes only, identical to fitting the clinical protocol alone
    assert main(["dr", "fit", "--dwi", str(files / "dwi.nii.gz"), "--bvals", str(files / "bvals"),
                 "--tes", str(files / "tes"), "--mask", str(files / "body.nii.gz"), "--model", "clinical",
                 "--out", str(out), "--progress", "none"]) == 0
    clinical, protocol = phantom.clinical()
    direct = fitting.fit_clinical(clinical[phantom.body].astype(float), protocol.bvals)
    s0 = read_volume(out / "s0.nii.gz").array[phantom.body]
    np.testing.assert_allclose(s0, direct.maps["s0"], rtol=1e-5)
    # a single-TE series with repeated b = 0 volumes (averages) is fitted without --tes
    repeated = np.concatenate([clinical, clinical[..., :1]], axis=-1)
    bvals = np.concatenate([protocol.bvals, [0.0]])
    fit = DRModel(Protocol(bvals)).fit(repeated, mask=phantom.body)
    both = fitting.fit_clinical(repeated[phantom.body].astype(float), bvals)
    np.testing.assert_allclose(fit.s0[phantom.body], both.maps["s0"], rtol=1e-6)


def test_fit_job_run_returns_the_typed_result_and_records_itself(files, tmp_path):
    job = DRFitJob(dwi=str(files / "dwi.nii.gz"), bvals=str(files / "bvals"), tes=str(files / "tes"),
                   mask=str(files / "body.nii.gz"), model="ivim", out=str(tmp_path / "ivim"))
    fit = job.run()
    assert isinstance(fit, DRFit) and set(fit.maps) == {"s0", "f", "dstar", "d"}
    summary = json.loads((tmp_path / "ivim" / "summary.json").read_text())
    assert DRFitJob.from_json(summary["job"]) == job


def test_classical_dr_needs_neither_torch_nor_scikit_learn(files, tmp_path):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'sklearn', 'safetensors'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import perfusionai.dr
from perfusionai.cli import main
rc = main(['dr', 'fit', '--dwi', {str(files / 'dwi.nii.gz')!r}, '--bvals', {str(files / 'bvals')!r},
           '--tes', {str(files / 'tes')!r}, '--model', 'clinical', '--out', {str(tmp_path / 'o')!r},
           '--progress', 'none'])
assert rc == 0, rc
assert not any(m.split('.')[0] in ('torch', 'sklearn') for m in sys.modules)
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    assert (tmp_path / "o" / "adc.nii.gz").is_file()


# ------------------------------------------------------------------ one model-file format


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    from perfusionai.phantoms.dr import make_dr_cohort, write_dr_cohort

    folder = tmp_path_factory.mktemp("dr_cohort")
    return write_dr_cohort(make_dr_cohort(3, shape=(2, 20, 20), snr=60, seed=9), folder, clinical=True)


@pytest.fixture(scope="module")
def trained(cohort_dir):
    from perfusionai.dr import learners as L
    from perfusionai.dr.pipeline import read_cohort

    return L, read_cohort(cohort_dir)


@pytest.mark.parametrize("algorithm,strategy", [("lr", "maps-to-maps"), ("rf", "signal-to-signal"),
                                                ("gbr", "signal-to-signal")])
def test_every_learner_uses_the_shared_model_file(trained, tmp_path, algorithm, strategy):
    from perfusionai.nn import read_card

    L, patients = trained
    model = L.train(patients[1:], algorithm, strategy, trained_on_phantoms=True)
    folder = L.save_model(model, tmp_path / "m")
    card = read_card(folder)  # the shared card format and its checks
    assert card["format"] == "perfusionai-model" and card["architecture"]["name"] == f"dr.{algorithm}"
    assert card["weights"]["kind"] == "arrays" and card["trained_on_phantoms"] is True
    assert not {"train_x", "train_y"} & set(card["weights"]["shapes"])  # parameters, not training data
    for name in ("model.json", "weights.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644
    x = L._inputs(patients[0], strategy, algorithm)
    loaded = L.load_model(folder)
    assert loaded.learner._estimator is None  # no refit: the stored parameters predict
    np.testing.assert_allclose(loaded.learner.predict(x), model.learner.predict(x), rtol=1e-12, atol=1e-12)


def _predict_argv(cohort_dir, model, out):
    patient = cohort_dir.parent / "patient01"
    return ["dr", "predict", "--dwi", str(patient / "clinical.nii.gz"), "--bvals", str(patient / "clinical_bvals"),
            "--tes", str(patient / "clinical_tes"), "--model", str(model), "--out", str(out), "--progress", "none"]


def test_dr_predict_refuses_hostile_model_folders_in_one_line(trained, cohort_dir, tmp_path, capsys):
    import hashlib

    L, patients = trained
    good = L.save_model(L.train(patients[1:], "lr", "maps-to-maps"), tmp_path / "good")
    card = json.loads((good / "model.json").read_text())
    out = tmp_path / "out"

    def hostile(name, card_text=None, weights=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.json").write_text(card_text if card_text is not None else json.dumps(card))
        (folder / "weights.safetensors").write_bytes(weights if weights is not None else
                                                     (good / "weights.safetensors").read_bytes())
        return folder

    pickle_bytes = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."
    with_sha = dict(card, weights=dict(card["weights"], sha256=hashlib.sha256(pickle_bytes).hexdigest()))
    cases = {
        "truncated": hostile("truncated", json.dumps(card)[:200]),
        "a_list": hostile("a_list", "[1, 2, 3]"),
        "no_learner": hostile("no_learner", json.dumps({k: v for k, v in card.items() if k != "dr_learner"})),
        "bad_algorithm": hostile("bad_algorithm", json.dumps(dict(card, dr_learner=dict(card["dr_learner"],
                                                                                        algorithm="svm")))),
        "no_std": hostile("no_std", json.dumps(dict(card, inputs={"clinical_bvals_s_per_mm2": [0, 50]}))),
        "pickle_weights": hostile("pickle_weights", json.dumps(with_sha), pickle_bytes),
        "changed_weights": hostile("changed_weights", None, b"x" * 64),
    }
    for name, folder in cases.items():
        assert main(_predict_argv(cohort_dir, folder, out)) == 2, name
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("perfusionai: error:") and "Traceback" not in err, (name, err)
        assert str(folder) in err and "--algorithm" not in err, (name, err)
        assert not out.exists()
    assert main(_predict_argv(cohort_dir, good, out)) == 0


def test_lr_model_predicts_without_torch_or_scikit_learn(trained, cohort_dir, tmp_path):
    L, patients = trained
    model = L.save_model(L.train(patients[1:], "lr", "maps-to-maps", trained_on_phantoms=True), tmp_path / "lr")
    argv = _predict_argv(cohort_dir, model, tmp_path / "pred")
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'sklearn'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
from perfusionai.cli import main
assert main({argv!r}) == 0
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["trained_on_phantoms"] and summary["algorithm"] == "lr"
    assert DRPredictJob.from_json(summary["job"]).model == str(model)
