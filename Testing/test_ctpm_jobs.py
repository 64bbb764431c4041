"""CTPM library API and command line: CTPMPredictJob (typed result, argv/JSON round trip), inputs never
overwritten, hostile model cards, evaluate --out on a folder and strict JSON, one option vocabulary."""

import json

import numpy as np
import pytest

from perfusionai.cli import build_parser, main
from perfusionai.ctpm import CTPMModel, CTPMPredictJob, PerfusionPrediction
from perfusionai.ctpm import preprocessing as pp
from perfusionai.io import read_volume, write_volume
from perfusionai.phantoms.ctpm import make_ctpm_phantom, phantom_geometry

SMALL = pp.PreprocessConfig(input_shape=(16, 8, 8), median_size=2, uniform_size=1)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """An untrained tiny ARNN saved as a model folder (labelled trained on phantoms)."""
    import torch

    from perfusionai.ctpm.arnn import ARCHITECTURE
    from perfusionai.nn import build_model, save_model

    torch.manual_seed(0)
    network = build_model(ARCHITECTURE, channels=[2, 4, 4, 4], kernel_size=3, dropout=0.1, prelu_init=0.2,
                          roi_channels=4, attention_skips=2, in_channels=1).eval()
    path = tmp_path_factory.mktemp("ctpm") / "model"
    save_model(path, network, {"inputs": {"preprocessing": SMALL.to_dict(), "channels": 1},
                               "training_data": "none (random weights, test)", "trained_on_phantoms": True})
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    ph = make_ctpm_phantom(3, phantom_geometry(spacing_mm=(7.0, 7.0, 7.0)), n_vessels=2)
    write_volume(ph.ct_hu, ph.geometry, folder / "ct.nii.gz")
    write_volume(ph.lung_labels, ph.geometry, folder / "lungs.nii.gz")
    write_volume(ph.spect, ph.spect_geometry, folder / "spect.nii.gz")
    return folder, ph


def test_job_round_trips_and_runs_to_a_typed_result(small_model, case, tmp_path):
    folder, ph = case
    job = CTPMPredictJob(ct=folder / "ct.nii.gz", lung_mask=folder / "lungs.nii.gz", model=small_model,
                         out=tmp_path / "out", device="cpu")
    assert CTPMPredictJob.from_argv(job.to_argv()) == job
    assert CTPMPredictJob.from_json(json.dumps(job.to_json())) == job
    result = job.run()
    assert isinstance(result, PerfusionPrediction) and result.trained_on_phantoms
    lung = ph.lung_labels > 0
    assert np.array_equal(result.function_high_low > 0, lung)
    voxel_ml = float(np.prod(ph.geometry.spacing)) / 1000
    assert result.volumes["both"]["lung_ml"] == pytest.approx(lung.sum() * voxel_ml)
    written = read_volume(tmp_path / "out" / "perfusion.nii.gz")
    np.testing.assert_allclose(written.array, result.perfusion, atol=1e-6)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert CTPMPredictJob.from_json(summary["job"]) == job
    # the same prediction from a model loaded once, on arrays
    model = CTPMModel.load(small_model, device="cpu")
    again = model.predict(ph.ct_hu, ph.geometry, ph.lung_labels)
    np.testing.assert_allclose(again.perfusion, result.perfusion, atol=1e-6)


def test_out_in_the_input_folder_never_rewrites_the_mask(small_model, tmp_path, capsys):
    ph = make_ctpm_phantom(4, phantom_geometry(spacing_mm=(7.0, 7.0, 7.0)), n_vessels=2)
    labels = np.where(ph.lung_labels > 0, 1, 0).astype(np.uint8)  # a binary mask named like the output
    write_volume(ph.ct_hu, ph.geometry, tmp_path / "ct.nii.gz")
    write_volume(labels, ph.geometry, tmp_path / "lungs.nii.gz")
    before = (tmp_path / "lungs.nii.gz").read_bytes()
    rc = main(["ctpm", "predict", "--ct", str(tmp_path / "ct.nii.gz"), "--lung-mask", str(tmp_path / "lungs.nii.gz"),
               "--model", str(small_model), "--out", str(tmp_path), "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "lungs.nii.gz" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "lungs.nii.gz").read_bytes() == before
    assert not (tmp_path / "perfusion.nii.gz").exists()


def test_negative_channel_counts_in_the_card_give_one_line(small_model, case, tmp_path, capsys):
    folder, _ = case
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("model.json", "weights.safetensors"):
        (bad / name).write_bytes((small_model / name).read_bytes())
    card = json.loads((bad / "model.json").read_text())
    card["architecture"]["hyperparameters"]["channels"] = [-2, 4, 4, 4]
    (bad / "model.json").write_text(json.dumps(card))
    out = tmp_path / "out"
    assert main(["ctpm", "predict", "--ct", str(folder / "ct.nii.gz"), "--model", str(bad), "--out", str(out),
                 "--device", "cpu", "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "model.json" in err and "positive" in err and "Traceback" not in err and not out.exists()


def test_evaluate_out_folder_and_strict_json(case, tmp_path, capsys):
    folder, ph = case
    constant = np.where(ph.lung_labels > 0, 0.5, 0.0).astype(np.float32)  # Spearman R undefined
    write_volume(constant, ph.geometry, tmp_path / "pred.nii.gz")
    existing = tmp_path / "results"
    existing.mkdir()
    rc = main(["ctpm", "evaluate", "--pred", str(tmp_path / "pred.nii.gz"), "--spect", str(folder / "spect.nii.gz"),
               "--lung-mask", str(folder / "lungs.nii.gz"), "--grid", "prediction", "--out", str(existing),
               "--progress", "none"])
    captured = capsys.readouterr()
    assert rc == 0 and "Traceback" not in captured.err
    text = (existing / "evaluation.json").read_text()
    assert "NaN" not in text and "NaN" not in captured.out
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert result["spearman"] is None and "constant" in result["undefined"]["spearman"]
    assert 0 <= result["dice_low"] <= 1 and result["lung_voxels"] > 0


def test_one_vocabulary_with_hidden_old_names(tmp_path):
    parser = build_parser()
    base = ["ctpm", "train", "--cohort", "c.csv", "--out", "m"]
    new = parser.parse_args(base + ["--shape", "32", "16", "16", "--learning-rate", "0.003",
                                    "--trained-on-phantoms"])
    old = parser.parse_args(base + ["--input-shape", "32,16,16", "--lr", "0.003", "--phantom-data"])
    for args in (new, old):
        assert tuple(args.input_shape) == (32, 16, 16) and args.learning_rate == 0.003 and args.trained_on_phantoms
    assert parser.parse_args(["ctpm", "phantoms", "--out", "x"]).handler is \
        parser.parse_args(["ctpm", "phantom", "--out", "x"]).handler
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--shape", "30", "16", "16"])  # not divisible by 8
    ctpm = parser._subparsers._group_actions[0].choices["ctpm"]
    verbs = ctpm._subparsers._group_actions[0]
    listing = ctpm.format_help()
    assert "phantoms" not in listing and "phantom" in listing and "SUPPRESS" not in listing
    train_help = verbs.choices["train"].format_help()
    assert "--learning-rate" in train_help and "--shape K J I" in train_help
    assert "--lr " not in train_help and "--input-shape" not in train_help and "--phantom-data" not in train_help
    dr = parser._subparsers._group_actions[0].choices["dr"]
    dr_train = dr._subparsers._group_actions[0].choices["train"].format_help()
    assert "--trained-on-phantoms" in dr_train and "--phantom-data" not in dr_train
    # every option of every ctpm and dr verb has help text, every domain parser a description
    for domain in (ctpm, dr):
        assert domain.description
        for name, verb in domain._subparsers._group_actions[0].choices.items():
            for action in verb._actions:
                if action.option_strings and action.help is not __import__("argparse").SUPPRESS:
                    assert action.help, (name, action.option_strings)


def test_without_torch_ctpm_imports_and_predict_says_which_extra(case, tmp_path):
    import subprocess
    import sys

    folder, _ = case
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch':
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import perfusionai.ctpm
from perfusionai.cli import main
rc = main(['ctpm', 'predict', '--ct', {str(folder / 'ct.nii.gz')!r}, '--model', 'm', '--out', {str(tmp_path / 'o')!r},
           '--progress', 'none'])
assert rc == 2, rc
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "needs torch" in done.stderr and "perfusionai[learned]" in done.stderr and "Traceback" not in done.stderr
