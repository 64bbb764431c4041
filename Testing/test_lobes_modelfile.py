"""Lobe model files never unpickle a user's nnU-Net checkpoint (issue 13.2), and LobeSegmentJob
serialises to argv and JSON and back (issue 14). No training here: each test runs in seconds."""

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from perfusionai.cli import main
from perfusionai.io import Geometry, write_volume

pytest.importorskip("torch")


class _Payload:
    """Unpickling this writes a marker file: what a code-running checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_nnunet_folder(root: Path, marker: Path) -> Path:
    import torch
    from perfusionai.lobes.model import NNUNET_LABELS

    model = root / "Dataset501_Lobes" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "VIBE"}, "labels": NNUNET_LABELS,
                                                    "numTraining": 2, "file_ending": ".nii.gz"}))
    (model / "plans.json").write_text(json.dumps({"configurations": {}}))
    torch.save({"network_weights": {"w": torch.zeros(2)}, "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "payload": _Payload(marker)},
               str(model / "fold_0" / "checkpoint_final.pth"))
    # the payload really runs code when unpickled without restriction: shown on the payload object itself
    # (pickled and unpickled in memory by this test), never by an unrestricted torch.load of a model file
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
    marker.unlink()
    return model


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def hostile(tmp_path):
    marker = tmp_path / "MARKER_code_ran"
    model = _hostile_nnunet_folder(tmp_path / "results", marker)
    image = tmp_path / "vibe.nii.gz"
    write_volume(np.ones((4, 5, 6), np.float32), Geometry((4, 5, 6)), image)
    return model, marker, image


def test_lobes_segment_refuses_an_nnunet_folder_without_unpickling(hostile, tmp_path, capsys):
    model, marker, image = hostile
    for given in (model, model.parent.parent):                     # the model folder and the results folder
        rc = main(["lobes", "segment", "--image", str(image), "--model", str(given), "--out", str(tmp_path / "o"),
                   "--progress", "none"])
        assert rc == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "import-model" in line and "pickled" in line
        assert not marker.exists() and not (tmp_path / "o").exists()
    # the same checkpoint in an nnU-Net export zip
    with zipfile.ZipFile(tmp_path / "export.zip", "w") as zf:
        for p in model.rglob("*"):
            if p.is_file():
                zf.write(p, p.relative_to(model.parent.parent).as_posix())
    rc = main(["lobes", "segment", "--image", str(image), "--model", str(tmp_path / "export.zip"),
               "--out", str(tmp_path / "o"), "--progress", "none"])
    assert rc == 2 and "import-model" in _one_error_line(capsys.readouterr().err)
    assert not marker.exists()


def test_import_model_refuses_a_code_running_checkpoint(hostile, tmp_path, capsys):
    model, marker, _ = hostile
    for given in (model, model.parent.parent):
        rc = main(["lobes", "import-model", "--nnunet-folder", str(given), "--out", str(tmp_path / "m"),
                   "--progress", "none"])
        assert rc == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "checkpoint_final.pth" in line and "refused" in line and "nothing of it was run" in line
        assert not marker.exists() and not (tmp_path / "m").exists()
    # the help states the risk
    with pytest.raises(SystemExit):
        main(["lobes", "import-model", "--help"])
    assert "RISK" in capsys.readouterr().out


def test_prm_predict_refuses_a_code_running_lobe_model(hostile, tmp_path, capsys):
    import torch

    from perfusionai.nn import build_model
    from perfusionai.phantoms.prm_mri import make_prm_mri_phantom
    from perfusionai.prm.mri_network import ARCHITECTURE_NAME, SEQUENCES
    from perfusionai.prm.mri_training import save_prm_model

    model, marker, _ = hostile
    ph = make_prm_mri_phantom(seed=1)
    write_volume(ph.sequences["vibe"], ph.geometry, tmp_path / "vibe.nii.gz")
    write_volume(ph.sequences["irmax"], ph.geometry, tmp_path / "irmax.nii.gz")
    torch.manual_seed(0)
    save_prm_model(tmp_path / "prm_model", build_model(ARCHITECTURE_NAME, kernel_size=3).eval(),
                   {"inputs": {"sequences": list(SEQUENCES), "trained_with": list(SEQUENCES),
                               "shape": list(ph.geometry.shape)},
                    "training_data": "untrained (plumbing test)", "trained_on_phantoms": True})
    rc = main(["prm", "predict", "--vibe", str(tmp_path / "vibe.nii.gz"), "--irmax", str(tmp_path / "irmax.nii.gz"),
               "--lobe-model", str(model), "--model", str(tmp_path / "prm_model"), "--out", str(tmp_path / "o"),
               "--device", "cpu", "--progress", "none"])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "import-model" in line
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_restricted_loader_reads_plain_checkpoints_with_numpy_log_values(tmp_path):
    import torch

    from perfusionai.lobes.model import read_checkpoint_restricted

    path = tmp_path / "c.pth"
    torch.save({"network_weights": {"w": torch.arange(3.0)}, "logging": {"dice": [np.float32(0.5), np.float64(0.25)]},
                "init_args": {"configuration": "3d_fullres", "device": torch.device("cpu")},
                "inference_allowed_mirroring_axes": (0, 1, 2)}, str(path))
    ckpt = read_checkpoint_restricted(path)
    assert torch.equal(ckpt["network_weights"]["w"], torch.arange(3.0))
    assert float(ckpt["logging"]["dice"][1]) == 0.25
    # a pickle with an arbitrary global (not via torch.save) is refused too
    bad = tmp_path / "bad.pth"
    bad.write_bytes(pickle.dumps({"network_weights": {}, "x": Path}))       # a class: a global
    from perfusionai.errors import PerfusionAIError

    with pytest.raises(PerfusionAIError, match="refused|not a readable"):
        read_checkpoint_restricted(bad)


def test_lobe_segment_job_round_trips_through_argv_and_json(tmp_path):
    from perfusionai.lobes import LobeSegmentJob

    job = LobeSegmentJob(image=tmp_path / "vibe.nii.gz", model=str(tmp_path / "model"), out=str(tmp_path / "o"),
                         configuration="3d_fullres", folds=("0", "all"), tile_step_size=0.75, mirroring=True,
                         device="cpu", threads=2)
    argv = job.to_argv()
    assert argv[:2] == ["lobes", "segment"] and "--tile-step-size" in argv and argv[argv.index("--folds") + 2] == "all"
    assert LobeSegmentJob.from_argv(argv) == job
    assert LobeSegmentJob.from_json(json.dumps(job.to_json())) == job
    default = LobeSegmentJob(image="v.nii.gz", model="m", out="o")
    assert LobeSegmentJob.from_argv(default.to_argv()) == default
    assert default.configuration == "auto" and default.folds == ("0",) and not default.mirroring


def test_segment_errors_name_parameters_and_flags(tmp_path, capsys):
    from perfusionai.errors import ParameterError
    from perfusionai.lobes import segment_lobes

    image = tmp_path / "vibe.nii.gz"
    write_volume(np.ones((4, 5, 6), np.float32), Geometry((4, 5, 6)), image)
    with pytest.raises(ParameterError, match="^tile_step_size: must be in"):
        segment_lobes(image, tmp_path / "none", tile_step_size=1.5)
    rc = main(["lobes", "segment", "--image", str(image), "--model", str(tmp_path / "none"),
               "--out", str(tmp_path / "o"), "--progress", "none"])
    assert rc == 2 and "lobe model not found" in _one_error_line(capsys.readouterr().err)


def test_missing_nnunet_names_the_lobes_extra(monkeypatch):
    import sys

    from perfusionai.deps import INSTALL_HINT
    from perfusionai.errors import MissingDependency
    from perfusionai.lobes.model import _nnunet

    monkeypatch.setitem(sys.modules, "nnunetv2", None)          # import nnunetv2 -> ModuleNotFoundError
    with pytest.raises(MissingDependency) as info:
        _nnunet()
    assert INSTALL_HINT["lobes"] in str(info.value) and "torchvision==" in str(info.value)


def test_missing_torch_names_the_lobes_extra(monkeypatch):
    import sys

    from perfusionai.deps import INSTALL_HINT
    from perfusionai.errors import MissingDependency
    from perfusionai.lobes.model import _nnunet

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependency) as info:
        _nnunet()
    assert INSTALL_HINT["lobes"] in str(info.value)
