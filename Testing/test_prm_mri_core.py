"""MRI -> PRM: loss terms on hand-made tensors, the network's handling of missing inputs,
normalisation/cropping, model files, and the MRI phantom's physics."""

import json
import math

import numpy as np
import pytest
import torch

from perfusionai.errors import PerfusionAIError
from perfusionai.prm.mri_losses import fuzzy_labels, prm_loss, prm_loss_terms
from perfusionai.prm.mri_network import (SEQUENCES, MultiSequencePRMNet, crop_labels, crop_pad_box,
                                         normalise_sequence, prepare_inputs)


# ------------------------------------------------------------------------------------------ losses

def test_fuzzy_labels_of_a_uniform_region_are_one_hot_and_ignore_uncategorized():
    ref = torch.ones(1, 5, 12, 12, dtype=torch.long)           # all normal
    ref[0, 2, 6, 6] = 4                                          # one uncategorized voxel
    soft = fuzzy_labels(ref)
    assert soft.shape == (1, 3, 5, 12, 12)
    # the uncategorized voxel contributes to no class: its neighbourhood is 100 % normal
    assert torch.allclose(soft[0, 0, 2, 6, 6], torch.tensor(1.0))
    assert torch.allclose(soft[0, 1:], torch.zeros_like(soft[0, 1:]))


def test_fuzzy_labels_blur_a_boundary_symmetrically_along_i():
    ref = torch.ones(1, 3, 9, 20, dtype=torch.long)
    ref[..., 10:] = 3                                            # emphysema on the right half
    soft = fuzzy_labels(ref, size=(3, 9, 9))
    sums = soft.sum(dim=1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    # symmetric Gaussian: the two voxels beside the boundary mirror each other
    assert soft[0, 0, 1, 4, 9].item() == pytest.approx(soft[0, 2, 1, 4, 10].item(), abs=1e-6)
    assert 0.5 < soft[0, 0, 1, 4, 9].item() < 0.9
    # far from the boundary (> 2 sigma = 4 voxels) the labels are still crisp
    assert soft[0, 0, 1, 4, 2].item() == pytest.approx(1.0, abs=1e-6)
    # the blur does not cross slices that much: kernel size 3 along k
    g = math.exp(-0.5 * (1 / 0.5) ** 2)
    assert g / (1 + 2 * g) < 0.12


def test_cross_entropy_and_prm_terms_match_hand_computation():
    ref = torch.tensor([[[[1, 1, 2, 3, 4, 0]]]])                 # (b=1, k=1, j=1, i=6)
    logits = torch.zeros(1, 3, 1, 1, 6)
    logits[0, 0, 0, 0, 0] = math.log(2.0)                       # p = (1/2, 1/4, 1/4) at voxel 0
    terms = prm_loss_terms(logits, ref, blur_size=(1, 1, 1))    # no blur: fuzzy == crisp CE
    p = torch.softmax(logits, dim=1)[0, :, 0, 0]
    expected_ce = -(math.log(p[0, 0]) + math.log(p[0, 1]) + math.log(p[1, 2]) + math.log(p[2, 3])) / 4
    assert terms["ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert terms["fuzzy"].item() == pytest.approx(expected_ce, rel=1e-5)
    # %PRM: valid voxels 0-3; reference fractions (2/4, 1/4, 1/4); predicted = mean probabilities
    pred_frac = p[:, :4].mean(dim=1)
    ref_frac = torch.tensor([0.5, 0.25, 0.25])
    assert terms["prm"].item() == pytest.approx((pred_frac - ref_frac).abs().mean().item(), rel=1e-5)
    total = prm_loss(logits, ref, blur_size=(1, 1, 1))
    assert total.item() == pytest.approx(0.3 * terms["ce"].item() + 0.3 * terms["fuzzy"].item()
                                         + 0.4 * terms["prm"].item(), rel=1e-6)


def test_prm_term_of_uniform_prediction():
    ref = torch.tensor([1, 1, 2, 3]).reshape(1, 1, 1, 4)
    terms = prm_loss_terms(torch.zeros(1, 3, 1, 1, 4), ref)
    assert terms["prm"].item() == pytest.approx((1 / 6 + 1 / 12 + 1 / 12) / 3, rel=1e-6)


def test_loss_ignores_uncategorized_and_outside_voxels_entirely():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6, 6, requires_grad=True)
    ref = torch.randint(1, 4, (2, 4, 6, 6))
    base = prm_loss(logits, ref)
    ref_ignored = ref.clone()
    ref_ignored[:, :, :, 5] = 4                                    # last column uncategorized
    ref_ignored[:, :, :, 4] = 0                                    # and one outside the lung
    loss = prm_loss(logits, ref_ignored)
    loss.backward()
    assert logits.grad[..., 4:].abs().max().item() == 0.0
    assert loss.item() != pytest.approx(base.item())


def test_loss_without_valid_voxels_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    loss = prm_loss(logits, torch.full((1, 2, 2, 2), 4))
    assert loss.item() == 0.0


# ------------------------------------------------------------------------------------------ network

def test_network_ignores_missing_inputs_and_refuses_none():
    torch.manual_seed(0)
    net = MultiSequencePRMNet(kernel_size=3).eval()
    x = torch.randn(2, 4, 9, 14, 11)
    avail = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    with torch.no_grad():
        out = net(x, avail)
        x2 = x.clone()
        x2[0, 1] = 100.0                                           # garbage in a missing channel
        x2[1, :3] = -7.0
        out2 = net(x2, avail)
    assert out.shape == (2, 3, 9, 14, 11)
    assert torch.allclose(out, out2, atol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        net(x, torch.zeros(2, 4))


def test_input_dropout_keeps_at_least_one_input():
    net = MultiSequencePRMNet(kernel_size=3, input_dropout=0.95).train()
    torch.manual_seed(1)
    avail = torch.ones(200, 4)
    avail[:100, 2:] = 0
    kept = net._drop_inputs(avail)
    assert (kept.sum(dim=1) >= 1).all()
    assert (kept <= avail).all()                                   # never adds a missing input
    assert kept.sum() < avail.sum() * 0.5


def test_normalisation_maps_lung_to_minus_one_one():
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 50, (6, 8, 8)).astype(np.float32)
    lung = np.zeros(vol.shape, bool)
    lung[1:5, 2:6, 2:6] = True
    out = normalise_sequence(vol, lung)
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert np.all(out[~lung] == -1.0)
    p99 = np.percentile(vol[lung], 99)
    v = vol[lung][0]
    assert out[lung][0] == pytest.approx(min(v, 2 * p99) / p99 - 1.0, rel=1e-5)


def test_crop_pad_round_trip_keeps_the_lung():
    lung = np.zeros((10, 40, 30), np.uint8)
    lung[3:7, 12:30, 5:25] = 1
    src, dst = crop_pad_box(lung.shape, (16, 24, 24), (5, 21, 15))
    window = crop_labels(lung, (16, 24, 24), src, dst)
    assert window.shape == (16, 24, 24)
    assert window.sum() == lung.sum()                              # lung fully inside the window
    x, avail, s2, d2 = prepare_inputs({"vibe": lung.astype(np.float32) * 10, "pbf": None}, lung, (16, 24, 24))
    assert avail.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert np.all(x[1:] == 0)
    window2 = crop_labels(lung, (16, 24, 24), s2, d2)
    assert window2.sum() == lung.sum()
    assert np.all(x[0][window2 == 0] == -1.0) and np.all(x[0][window2 == 1] > -1.0)


# ------------------------------------------------------------------------------------------ model files

def _tiny_model_and_card():
    from perfusionai.nn import build_model
    from perfusionai.prm.mri_network import ARCHITECTURE_NAME

    torch.manual_seed(3)
    model = build_model(ARCHITECTURE_NAME, kernel_size=3)
    card = {"inputs": {"sequences": list(SEQUENCES), "trained_with": ["vibe", "irmax"], "shape": [8, 12, 12]},
            "training_data": "test", "trained_on_phantoms": True}
    return model.eval(), card


def test_model_files_round_trip_and_reject_mismatches(tmp_path):
    from perfusionai.prm.mri_training import load_prm_model, save_prm_model

    model, card = _tiny_model_and_card()
    save_prm_model(tmp_path / "m", model, card)
    loaded, card2 = load_prm_model(tmp_path / "m")
    x = torch.randn(1, 4, 8, 12, 12)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)
    assert card2["trained_on_phantoms"] is True and card2["inputs"]["trained_with"] == ["vibe", "irmax"]
    # zip round trip
    save_prm_model(tmp_path / "m.zip", model, card)
    load_prm_model(tmp_path / "m.zip")
    # tampered weights
    w = tmp_path / "m" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(PerfusionAIError, match="sha256"):
        load_prm_model(tmp_path / "m")
    # a card whose input sequences differ
    save_prm_model(tmp_path / "m3", model, card)
    c = json.loads((tmp_path / "m3" / "model.json").read_text())
    c["inputs"]["sequences"] = ["vibe", "pbf", "irmax", "post_vibe"]
    (tmp_path / "m3" / "model.json").write_text(json.dumps(c))
    with pytest.raises(PerfusionAIError, match="input sequences"):
        load_prm_model(tmp_path / "m3")
    # hyperparameters that do not rebuild the stored weights
    c["inputs"]["sequences"] = list(SEQUENCES)
    c["architecture"]["hyperparameters"]["kernel_size"] = 5
    (tmp_path / "m3" / "model.json").write_text(json.dumps(c))
    with pytest.raises(PerfusionAIError, match="do not fit"):
        load_prm_model(tmp_path / "m3")


def test_prediction_refuses_sequences_the_model_was_not_trained_with():
    from perfusionai.prm.mri_predict import predict_prm_mri

    model, card = _tiny_model_and_card()
    lung = np.zeros((8, 12, 12), np.uint8)
    lung[2:6, 3:9, 3:9] = 1
    vol = np.ones(lung.shape, np.float32)
    with pytest.raises(PerfusionAIError, match="cannot use PBF"):
        predict_prm_mri({"vibe": vol, "pbf": vol}, lung, model, card, device="cpu")
    with pytest.raises(PerfusionAIError, match="no MRI sequence"):
        predict_prm_mri({}, lung, model, card, device="cpu")
    res = predict_prm_mri({"irmax": vol}, lung, model, card, device="cpu")
    assert set(np.unique(res.labels[lung > 0])) <= {1, 2, 3}
    assert np.all(res.labels[lung == 0] == 0)
    assert res.sequences_used == ["irmax"] and "trained on phantoms" in res.model


# ------------------------------------------------------------------------------------------ phantom

def test_mri_phantom_signals_follow_the_tissue_physics():
    from perfusionai.phantoms.prm_mri import make_prm_mri_phantom

    ph = make_prm_mri_phantom(seed=5, emphysema_scale=1.2, extra_emphysema=1, extra_fsad=2, noise=0.0)
    ref = ph.reference_prm
    lung = ph.lung_labels > 0
    assert {1, 2, 3} <= set(np.unique(ref[lung]))
    assert set(np.unique(ph.lobes[lung])) == {1, 2, 3, 4, 5, 6}
    mean = {name: {c: float(np.median(a[lung & (ph.tissue == t)])) for c, t in (("normal", 3), ("fsad", 4), ("emph", 5))}
            for name, a in ph.sequences.items()}
    # emphysema: less tissue signal and less perfusion
    assert mean["vibe"]["emph"] < 0.6 * mean["vibe"]["normal"]
    assert mean["pbf"]["emph"] < 0.6 * mean["pbf"]["normal"]
    # air trapping: perfusion reduced clearly; the structural signal much less than in emphysema
    # (the normal-lung median includes vessel partial volume, so VIBE differs a little)
    assert mean["pbf"]["fsad"] < 0.75 * mean["pbf"]["normal"]
    assert mean["irmax"]["fsad"] < 0.85 * mean["irmax"]["normal"]
    assert (mean["vibe"]["normal"] - mean["vibe"]["fsad"]) < 0.5 * (mean["vibe"]["normal"] - mean["vibe"]["emph"])
    # reference PRM from the CT pair agrees with the tissue classes where they are pure
    assert np.mean(ref[lung & (ph.tissue == 5)] == 3) > 0.7
    assert np.mean(ref[lung & (ph.tissue == 4)] == 2) > 0.7


def test_cohort_writer_and_reader(tmp_path):
    from perfusionai.phantoms.prm_mri import cohort_splits, make_prm_mri_cohort, write_cohort
    from perfusionai.prm.mri_training import is_phantom_cohort, load_case, read_cohort

    splits = cohort_splits(104)
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (60, 14, 30)
    cohort = make_prm_mri_cohort(2, seed=9)
    csv_path = write_cohort(cohort, tmp_path, ["train", "test"], drop={"mri001": ("post_vibe",)})
    rows = read_cohort(csv_path)
    assert is_phantom_cohort(csv_path)
    case = load_case(rows[1])
    assert case.available == ["vibe", "irmax", "pbf"]
    assert np.array_equal(case.prm, cohort[1].reference_prm)
    bad = tmp_path / "bad.csv"
    bad.write_text("subject,split,vibe,lung_mask,prm\nx,train,missing.nii.gz,lm.nii.gz,p.nii.gz\n")
    with pytest.raises(PerfusionAIError, match="does not exist"):
        read_cohort(bad)
