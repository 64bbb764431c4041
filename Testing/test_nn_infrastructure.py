"""perfusionai.nn: device, seeding, blocks, training loop, model files."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from perfusionai.errors import Cancelled, PerfusionAIError
from perfusionai.nn import (ChannelsLastConv1d, ConvNormAct, GlobalAvgPool, ResidualBlock, TensorBatchLoader,
                            build_model, choose_device, count_parameters, fit, fold_batchnorm, inference_copy,
                            keras_parameter_count, load_checkpoint,
                            load_model, model_label, read_card, register_architecture, save_model,
                            seed_everything, set_threads)


class _TinyRegressor(nn.Module):
    def __init__(self, n_inputs: int = 4, hidden: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_inputs, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))

    def forward(self, x):
        return self.body(x)


register_architecture("test.tiny", _TinyRegressor)


def _card(**extra):
    card = {"inputs": {"n_features": 4, "normalisation": "none"}, "training_data": "unit test",
            "trained_on_phantoms": True, "metrics": {"mse": 0.5}}
    card.update(extra)
    return card


def test_choose_device_cpu_and_auto():
    assert choose_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device("auto").type == expected
    assert choose_device(None).type == expected
    with pytest.raises(PerfusionAIError, match="^device: 'tpu' is not a device name"):
        choose_device("tpu")  # a parameter name; the command line shows it as --device
    if not torch.cuda.is_available():
        with pytest.raises(PerfusionAIError, match="no CUDA"):
            choose_device("cuda")


def test_set_threads_defaults_to_available_cores(monkeypatch):
    import os
    previous = torch.get_num_threads()
    monkeypatch.delenv("PERFUSIONAI_THREADS", raising=False)
    try:
        assert set_threads() == len(os.sched_getaffinity(0))
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_seed_everything_reproduces_initialisation_and_numpy():
    seed_everything(7)
    a, na = nn.Linear(3, 3).weight.detach().clone(), np.random.rand(3)
    seed_everything(7)
    b, nb = nn.Linear(3, 3).weight.detach().clone(), np.random.rand(3)
    assert torch.equal(a, b) and np.array_equal(na, nb)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv_norm_act_shapes_and_fold_batchnorm_is_exact(dims):
    seed_everything(0)
    net = nn.Sequential(ConvNormAct(dims, 2, 6, 3, act="leaky_relu", negative_slope=0.02),
                        ResidualBlock(dims, 6, 6))
    x = torch.randn(4, 2, *([5] * dims))
    net.train()
    for _ in range(3):  # give batch norm non-trivial running statistics
        net(x + torch.randn_like(x))
    net.eval()
    with torch.no_grad():
        reference = net(x)
        folded = fold_batchnorm(net)(x)
    assert reference.shape == (4, 6, *([5] * dims))
    assert torch.allclose(reference, folded, atol=1e-5)
    # conv bias disappears under batch norm; the count is conv weights + BN affine
    block = ConvNormAct(dims, 2, 6, 3)
    assert count_parameters(block) == 2 * 6 * 3 ** dims + 2 * 6
    assert keras_parameter_count(block) == count_parameters(block) + 2 * 6


def test_inference_copy_swaps_conv1d_for_channels_last_twin_with_equal_outputs():
    seed_everything(0)
    net = nn.Sequential(ConvNormAct(1, 2, 8, 3, act="leaky_relu", negative_slope=0.02),
                        nn.Conv1d(8, 16, 5, stride=2, padding=2, dilation=1),
                        nn.Conv1d(16, 4, 3, padding=2, dilation=2, groups=4, bias=False),
                        GlobalAvgPool(1))
    x = torch.randn(64, 2, 37)
    net.train()
    for _ in range(3):
        net(x + torch.randn_like(x))
    net.eval()
    with torch.no_grad():
        reference = net(x)
        fast = inference_copy(net, "cpu")
        got = fast(x)
    assert not any(type(m) is nn.Conv1d for m in fast.modules())
    assert sum(isinstance(m, ChannelsLastConv1d) for m in fast.modules()) == 3
    assert any(type(m) is nn.Conv1d for m in net.modules())  # the original is left alone
    assert torch.allclose(reference, got, atol=1e-5)
    # the output of a twin is channels-last in memory, so stacked twins never copy between layers
    twin = ChannelsLastConv1d(nn.Conv1d(2, 8, 3, padding=1))
    assert twin(x).stride() == (8 * 37, 1, 8)
    with pytest.raises(ValueError, match="zero padding"):
        ChannelsLastConv1d(nn.Conv1d(2, 8, 3, padding=1, padding_mode="reflect"))


def _toy_data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def test_fit_learns_validates_checkpoints_and_restores_best(tmp_path):
    seed_everything(1)
    x, y = _toy_data()
    model = build_model("test.tiny", n_inputs=4, hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    calls = []
    hist = fit(model, TensorBatchLoader(x[:400], y[:400], batch_size=100, shuffle=True),
               TensorBatchLoader(x[400:], y[400:], batch_size=128), nn.MSELoss(), opt, epochs=25,
               early_stopping_patience=5, checkpoint_dir=tmp_path / "ckpt",
               progress=lambda f, m: calls.append(f), device="cpu")
    assert hist.epochs_run >= 5 and len(hist.val_loss) == hist.epochs_run
    assert hist.best_loss == min(hist.val_loss) == hist.val_loss[hist.best_epoch]
    assert hist.best_loss < 0.1 * float(y[400:].var())
    assert calls and calls[-1] == pytest.approx(1.0) and all(0 <= c <= 1 for c in calls)
    # the model ends with the best epoch's weights: its validation loss equals the best one
    model.eval()
    with torch.no_grad():
        val = float(nn.MSELoss()(model(x[400:]), y[400:]))
    assert val == pytest.approx(hist.best_loss, rel=1e-5)
    # best.safetensors holds the same weights
    twin = load_checkpoint(_TinyRegressor(4, 16), tmp_path / "ckpt" / "best.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(twin(x[400:]), model(x[400:]))
    assert (tmp_path / "ckpt" / "last.safetensors").is_file()


def test_fit_early_stopping_stops_when_validation_does_not_improve():
    seed_everything(2)
    x, y = _toy_data(256)
    noise = torch.randn(256, 1)  # unlearnable targets: validation cannot keep improving
    model = _TinyRegressor(4, 8)
    hist = fit(model, TensorBatchLoader(x[:128], noise[:128], batch_size=32), TensorBatchLoader(x[128:], noise[128:]),
               nn.MSELoss(), torch.optim.Adam(model.parameters(), lr=5e-2), epochs=200,
               early_stopping_patience=3, device="cpu")
    assert hist.stopped_early and hist.epochs_run < 200
    assert hist.epochs_run - 1 - hist.best_epoch == 3


def test_fit_honours_cancellation():
    x, y = _toy_data(256)
    model = _TinyRegressor()

    def cancel_after_epoch_two(fraction, message):
        if fraction >= 2 / 10:
            raise Cancelled()

    with pytest.raises(Cancelled):
        fit(model, TensorBatchLoader(x, y, batch_size=32), None, nn.MSELoss(),
            torch.optim.SGD(model.parameters(), lr=1e-2), epochs=10, progress=cancel_after_epoch_two, device="cpu")


def test_tensor_batch_loader_covers_every_sample_once():
    idx = torch.arange(10)
    seen = torch.cat([b[0] for b in TensorBatchLoader(idx, batch_size=3, shuffle=True,
                                                       generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    assert len(TensorBatchLoader(idx, batch_size=3, samples_per_epoch=6)) == 2


@pytest.mark.parametrize("as_zip", [False, True])
def test_model_file_round_trip_is_exact(tmp_path, as_zip):
    seed_everything(3)
    model = build_model("test.tiny", n_inputs=4, hidden=8)
    model.train()
    model(torch.randn(16, 4))  # non-trivial BN statistics
    target = tmp_path / ("m.zip" if as_zip else "m")
    save_model(target, model, _card())
    loaded, card = load_model(target, expected_architecture="test.tiny", expected_inputs={"n_features": 4})
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert card["trained_on_phantoms"] is True and card["metrics"] == {"mse": 0.5}
    assert card["architecture"] == {"name": "test.tiny", "hyperparameters": {"n_inputs": 4, "hidden": 8}}
    assert len(card["weights"]["sha256"]) == 64 and card["format_version"] == 1
    assert model_label(card) == "test.tiny (trained on phantoms)"
    assert read_card(target)["inputs"]["n_features"] == 4
    if as_zip:
        assert sorted(zipfile.ZipFile(target).namelist()) == ["model.json", "weights.safetensors"]


def test_model_file_refuses_tampered_weights(tmp_path):
    model = build_model("test.tiny", n_inputs=4, hidden=8)
    save_model(tmp_path / "m", model, _card())
    weights = tmp_path / "m" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(PerfusionAIError, match=r"weights\.safetensors.*sha256"):
        load_model(tmp_path / "m")


def test_model_file_refuses_wrong_architecture_and_mismatched_shapes(tmp_path):
    model = build_model("test.tiny", n_inputs=4, hidden=8)
    save_model(tmp_path / "m", model, _card())
    with pytest.raises(PerfusionAIError, match=r"model\.json.*'test\.tiny' network.*'dsc\.phae'"):
        load_model(tmp_path / "m", expected_architecture="dsc.phae")
    # a card whose hyperparameters no longer match the stored tensors
    card_path = tmp_path / "m" / "model.json"
    card = json.loads(card_path.read_text())
    card["architecture"]["hyperparameters"]["hidden"] = 9
    card_path.write_text(json.dumps(card))
    with pytest.raises(PerfusionAIError, match=r"weights\.safetensors.*shape"):
        load_model(tmp_path / "m")
    card["architecture"]["name"] = "test.unknown"
    card_path.write_text(json.dumps(card))
    with pytest.raises(PerfusionAIError, match="unknown architecture 'test.unknown'"):
        load_model(tmp_path / "m")


def test_model_file_refuses_wrong_input_length(tmp_path):
    save_model(tmp_path / "m.zip", build_model("test.tiny", n_inputs=4, hidden=8), _card())
    with pytest.raises(PerfusionAIError, match=r"m\.zip.*expects n_features = 4.*n_features = 5"):
        load_model(tmp_path / "m.zip", expected_inputs={"n_features": 5})


def test_model_file_refuses_non_models(tmp_path):
    with pytest.raises(PerfusionAIError, match="model not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PerfusionAIError, match="model.json is missing"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="trained_on_phantoms"):
        save_model(tmp_path / "x", build_model("test.tiny"), {"inputs": {}, "training_data": "x"})


def test_array_models_share_the_card_and_its_checks(tmp_path):
    """save_arrays/load_arrays: the same two files and checks for models that are not networks."""
    import os
    import subprocess
    import sys

    from perfusionai.nn import load_arrays, save_arrays

    arrays = {"coef": np.arange(6.0).reshape(2, 3), "intercept": np.array([1.0, 2.0, 3.0])}
    card = {"architecture": {"name": "test.linear", "hyperparameters": {"n": 2}}, "inputs": {"features": 2},
            "training_data": "test", "trained_on_phantoms": True}
    for target in (tmp_path / "folder", tmp_path / "model.zip"):
        save_arrays(target, arrays, card)
        loaded, read = load_arrays(target, expected_architecture="test.linear", required=("coef",))
        np.testing.assert_array_equal(loaded["coef"], arrays["coef"])
        assert read["weights"]["kind"] == "arrays" and read["weights"]["shapes"]["coef"] == [2, 3]
        assert model_label(read) == "test.linear (trained on phantoms)"
        mode = (target / "weights.safetensors" if target.is_dir() else target).stat().st_mode & 0o777
        assert mode == 0o666 & ~_umask()
    with pytest.raises(PerfusionAIError, match="'test.linear' model, but this needs 'other'"):
        load_arrays(tmp_path / "folder", expected_architecture="other")
    with pytest.raises(PerfusionAIError, match="lacks the arrays bias"):
        load_arrays(tmp_path / "folder", required=("bias",))
    with pytest.raises(PerfusionAIError, match="unknown architecture|does not store"):
        load_model(tmp_path / "folder")  # not a network
    weights = tmp_path / "folder" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(PerfusionAIError, match="sha256"):
        load_arrays(tmp_path / "folder")
    # the model-file module needs no torch for array models
    code = ("import sys\n"
            "class B:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError(name)\n"
            "sys.meta_path.insert(0, B())\n"
            "from perfusionai.nn import load_arrays\n"
            f"a, c = load_arrays({str(tmp_path / 'model.zip')!r})\n"
            "assert a['intercept'].tolist() == [1.0, 2.0, 3.0]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-1500:]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
