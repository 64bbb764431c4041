"""Learned DSC: model files of the PHAE and Tmax networks, parameter counts, grading, noise degradation."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from perfusionai.dsc import evaluation
from perfusionai.dsc.learned import compute_learned_maps
from perfusionai.dsc.phae import PHAE, causal_convolution
from perfusionai.dsc.tmaxnet import TmaxConv1, TmaxConv2, TmaxUNet
from perfusionai.errors import PerfusionAIError
from perfusionai.io import Geometry, write_volume
from perfusionai.nn import build_model, count_parameters, keras_parameter_count, load_model, save_model


def test_tmax_networks_parameter_counts_match_the_paper():
    # Sossin et al.: 1-layer = one 1x1x1 filter over 60 frames (61), 2-layer = 1033 (Keras count)
    assert count_parameters(TmaxConv1(60)) == 61
    two = TmaxConv2(60)
    assert keras_parameter_count(two) == 1033 == 4 * 60 + (60 * 12 + 12) + 4 * 12 + (12 + 1)
    out = TmaxUNet(60, base_features=4)(torch.randn(1, 60, 4, 8, 8))
    assert out.shape == (1, 1, 4, 8, 8)


def test_phae_encoder_structure_follows_the_paper():
    net = PHAE(base_features=32)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(c.kernel_size == (3,) and c.stride == (1,) and c.padding == (1,) for c in convs)
    slopes = [m.negative_slope for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert slopes == [0.02] * 4
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()) == 4


def test_decoder_convolution_matches_hand_computed_sums():
    aif = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    residue = torch.tensor([[1.0, 0.5, 0.25, 0.125]])
    dt = torch.tensor([[2.0]])
    rect = causal_convolution(aif, residue, dt, "rectangle")
    # dt * sum_k a[k] r[n-k]: n=1: 2*(2*1)=4; n=2: 2*(2*0.5+1*1)=4; n=3: 2*(2*0.25+1*0.5+0)=2
    assert torch.allclose(rect, torch.tensor([[0.0, 4.0, 4.0, 2.0]]), atol=1e-6)
    trap = causal_convolution(aif, residue, dt, "trapezoid")
    # halve the k=0 and k=n terms: n=1: 2*(0.5*2*1)=2; n=2: 2*(2*0.5+0.5*1*1)=3; n=3: 2*(2*0.25+1*0.5)=2
    assert torch.allclose(trap, torch.tensor([[0.0, 2.0, 3.0, 2.0]]), atol=1e-6)


def _series(n_frames=30, shape=(2, 3, 4), seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames, dtype=float)
    aif = 50 * np.clip(t - 5, 0, None) ** 2 * np.exp(-np.clip(t - 5, 0, None) / 1.5)
    conc = rng.random(shape + (n_frames,)).astype(np.float32) + np.interp(t - 2, t, aif / 20)[None, None, None]
    return conc, aif, t, np.ones(shape, bool)


def test_phae_model_file_round_trip_and_refusals(tmp_path):
    model = build_model("dsc.phae", base_features=4, residue="lorentzian")
    card = {"inputs": {"n_frames": 30, "frame_interval_s": 1.0}, "training_data": "unit test",
            "trained_on_phantoms": True}
    save_model(tmp_path / "phae.zip", model, card)
    loaded, loaded_card = load_model(tmp_path / "phae.zip", expected_architecture="dsc.phae")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    conc, aif, t, mask = _series()

    import dataclasses

    from perfusionai.dsc import DSCOptions

    @dataclasses.dataclass
    class Options(DSCOptions):  # the typed options, with a mutable model_path for the cases below
        model_path: str = str(tmp_path / "phae.zip")
        kh: float = 1.0
        rho: float = 1.0
        device: str = "cpu"

    out = compute_learned_maps("phae", conc, aif, t, mask, Options())
    # maps apart from the notes, label and model card (typed result)
    assert set(out.maps) >= {"cbv", "cbf", "mtt"} and "tmax" not in out.maps
    assert out.notes[0] == "trained on phantoms" and out.label.endswith("(trained on phantoms)")
    assert out.trained_on_phantoms
    assert np.allclose(out.maps["cbf"], 60 * out.maps["cbv"] / out.maps["mtt"], rtol=1e-4)
    # wrong input length: the model was trained on 30 frames
    conc40, aif40, t40, _ = _series(40)
    with pytest.raises(PerfusionAIError, match=r"phae\.zip.*30 frames.*40"):
        compute_learned_maps("phae", conc40, aif40, t40, mask, Options())
    # wrong architecture: a Tmax network offered to the PHAE
    save_model(tmp_path / "tmax", build_model("dsc.tmaxnet.conv2", n_frames=30),
               {"inputs": {"n_frames": 30, "frame_interval_s": 1.0, "aif_peak_frame": 8},
                "training_data": "unit test", "trained_on_phantoms": False})
    tmax_options = Options(model_path=str(tmp_path / "tmax"))
    with pytest.raises(PerfusionAIError, match=r"model\.json.*'dsc\.tmaxnet\.conv2' network.*'dsc\.phae'"):
        compute_learned_maps("phae", conc, aif, t, mask, tmax_options)
    # the Tmax network itself applies, and refuses a 40-frame series
    tmax = compute_learned_maps("tmax-net", conc, aif, t, mask, tmax_options)
    assert set(tmax.maps) == {"tmax"} and tmax.maps["tmax"].shape == mask.shape
    assert "trained on phantoms" not in tmax.notes
    with pytest.raises(PerfusionAIError, match="30 frames"):
        compute_learned_maps("tmax-net", conc40, aif40, t40, mask, tmax_options)
    # tampered weights
    weights = tmp_path / "tmax" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PerfusionAIError, match="sha256"):
        compute_learned_maps("tmax-net", conc, aif, t, mask, tmax_options)


def test_tmax_net_without_model_is_a_clear_error():
    conc, aif, t, mask = _series()
    with pytest.raises(PerfusionAIError, match="^model_path: .*train-tmax"):
        compute_learned_maps("tmax-net", conc, aif, t, mask, None)


# Hand-computed grading table: positives (label 1) 1.5, 2.5, 3.0, 3.2; negatives 1.0, 1.2, 2.0.
# AUC = P(pos > neg) = (2 + 3 + 3 + 3) / 12 = 11/12; U(pos) = 11. Youden: cut-off 1.5 gives
# sens 1, spec 2/3 (J 0.667); 2.5 gives sens 3/4, spec 1 (J 0.75, the maximum); accuracy 6/7.
SCORES = [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.2]
LABELS = [0, 0, 1, 0, 1, 1, 1]


def test_grading_reproduces_hand_computed_auc_and_youden():
    res = evaluation.grade(SCORES, LABELS, n_bootstrap=200)
    assert res.auc == pytest.approx(11 / 12)
    assert res.cutoff == pytest.approx(2.5)
    assert res.sensitivity == pytest.approx(0.75) and res.specificity == pytest.approx(1.0)
    assert res.accuracy == pytest.approx(6 / 7)
    assert res.mann_whitney_u == pytest.approx(11.0)
    assert res.auc_ci[0] <= res.auc <= res.auc_ci[1] <= 1.0


def test_roi_ratio_is_mean_lesion_over_mean_reference():
    values = np.array([[[1.0, 3.0, 2.0, 2.0, np.nan]]])
    lesion = np.array([[[1, 1, 0, 0, 0]]], bool)
    reference = np.array([[[0, 0, 1, 1, 1]]], bool)
    assert evaluation.roi_ratio(values, lesion, reference) == pytest.approx(1.0)
    with pytest.raises(PerfusionAIError, match="reference ROI"):
        evaluation.roi_ratio(values, lesion, np.zeros_like(lesion))


def test_grade_command_end_to_end(tmp_path):
    geometry = Geometry((1, 2, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    lesion = np.zeros((1, 2, 4), np.uint8)
    lesion[0, 0, :2] = 1
    reference = np.zeros((1, 2, 4), np.uint8)
    reference[0, 1, :] = 1
    write_volume(lesion, geometry, tmp_path / "lesion.nii.gz")
    write_volume(reference, geometry, tmp_path / "ref.nii.gz")
    rows = []
    for n, (score, label) in enumerate(zip(SCORES, LABELS)):
        cbf = np.full((1, 2, 4), 20.0, np.float32)
        cbf[0, 0, :2] = 20.0 * score  # lesion mean / reference mean = score
        write_volume(cbf, geometry, tmp_path / f"cbf{n}.nii.gz")
        rows.append({"subject": f"s{n}", "map": f"cbf{n}.nii.gz", "roi_lesion": "lesion.nii.gz",
                     "roi_reference": "ref.nii.gz", "label": "HGG" if label else "LGG"})
    with open(tmp_path / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    proc = subprocess.run([sys.executable, "-m", "perfusionai", "dsc", "grade", "--table", str(tmp_path / "table.csv"),
                           "--out", str(tmp_path / "out"), "--bootstrap", "200", "--progress", "none"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "grading.json").read_text())["methods"]["map"]
    assert result["auc"] == pytest.approx(11 / 12) and result["youden_cutoff"] == pytest.approx(2.5, rel=1e-5)
    assert (tmp_path / "out" / "roc.png").stat().st_size > 0
    ratios = list(csv.DictReader(open(tmp_path / "out" / "ratios.csv")))
    assert [float(r["roi_ratio"]) for r in ratios] == pytest.approx(SCORES, rel=1e-5)
    bad = subprocess.run([sys.executable, "-m", "perfusionai", "dsc", "grade", "--table", str(tmp_path / "nope.csv"),
                          "--out", str(tmp_path / "o2")], capture_output=True, text=True)
    assert bad.returncode != 0 and "nope.csv" in bad.stderr and "Traceback" not in bad.stderr


def test_degrade_to_snr_reaches_the_requested_baseline_snr():
    rng = np.random.default_rng(0)
    signal = (1000 + rng.normal(0, 2, (20, 20, 4, 40))).astype(np.float32)  # SNR 500
    noisy = evaluation.degrade_to_snr(signal, 20.0, baseline_frames=40, seed=1)
    snr = evaluation.baseline_snr(noisy, 40)
    assert np.median(snr) == pytest.approx(20.0, rel=0.05)
    assert np.array_equal(signal, (1000 + np.random.default_rng(0).normal(0, 2, signal.shape)).astype(np.float32))


def test_noise_study_cli_degrades_to_each_snr_and_reports_every_method(tmp_path):
    # two SNR levels, two classical methods on a small phantom with truth: rows per level and method,
    # the measured baseline SNR near the requested one, errors growing as the SNR falls (sSVD CBF)
    import csv

    from perfusionai.cli import main
    from perfusionai.phantoms.dsc import make_dsc_phantom

    ph = make_dsc_phantom(shape=(4, 24, 24), snr=np.inf, discretisation="fine", seed=0)
    ph.save(tmp_path / "ph")
    out = tmp_path / "study"
    assert main(["dsc", "noise-study", "--dsc", str(tmp_path / "ph" / "dsc.nii.gz"), "--te", str(ph.te),
                 "--aif-mask", str(tmp_path / "ph" / "aif_mask.nii.gz"),
                 "--mask", str(tmp_path / "ph" / "brain_mask.nii.gz"), "--snr", "50", "10",
                 "--methods", "sSVD", "oSVD", "--truth-dir", str(tmp_path / "ph"), "--out", str(out),
                 "--progress", "none"]) == 0
    for name in ("noise_study.csv", "noise_study.json", "noise_study.png"):
        assert (out / name).is_file()
    rows = list(csv.DictReader(open(out / "noise_study.csv")))
    assert {(float(r["snr"]), r["method"]) for r in rows} >= {(50.0, "sSVD"), (10.0, "sSVD"), (50.0, "oSVD"),
                                                             (10.0, "oSVD")}
    error = {(float(r["snr"]), r["method"]): float(r["median_abs_rel_error"]) for r in rows
             if r["region"] == "mask" and r["map"] == "cbf"}
    truth = {float(r["truth_median"]) for r in rows if r["map"] == "cbf"}
    assert truth == {float(np.median(ph.truth["cbf"][ph.brain_mask]))}
    for method in ("sSVD", "oSVD"):
        assert error[(10.0, method)] > error[(50.0, method)], (method, error)
    # Tmax, whose truth is 0 s in most regions, gets an absolute error in seconds, not a relative one
    tmax_rows = [r for r in rows if r["map"] == "tmax" and r["region"] == "mask"]
    assert all(r["median_abs_rel_error"] == "" and float(r["median_abs_error_s"]) >= 0 for r in tmax_rows)
    summary = json.loads((out / "noise_study.json").read_text())
    assert summary["snr_levels"] == [50.0, 10.0] and len(summary["rows"]) == len(rows)
    # the baseline is the one 'dsc maps' chooses (frames before the earliest arrival)
    assert summary["baseline_frames"] == round(ph.parameters["aif"]["arrival_s"] / ph.tr)


def test_train_tmax_cli_with_osvd_teacher_then_maps(tmp_path):
    from perfusionai.cli import main
    from perfusionai.io import read_volume
    from perfusionai.phantoms.dsc import make_dsc_phantom

    ph = make_dsc_phantom(shape=(4, 20, 20), delay_s=[0.0, 3.0], snr=100, discretisation="fine", seed=1)
    ph.save(tmp_path / "ph")
    series = ["--dsc", str(tmp_path / "ph" / "dsc.nii.gz"), "--te", str(ph.te),
              "--aif-mask", str(tmp_path / "ph" / "aif_mask.nii.gz"), "--mask", str(tmp_path / "ph" / "brain_mask.nii.gz")]
    model = tmp_path / "tmax_model"
    assert main(["dsc", "train-tmax", *series, "--teacher", "osvd", "--architecture", "conv1", "--epochs", "3",
                 "--trained-on-phantoms", "--out", str(model), "--progress", "none"]) == 0
    card = json.loads((model / "model.json").read_text())
    assert card["inputs"]["n_frames"] == ph.times.size and card["trained_on_phantoms"] is True
    assert main(["dsc", "maps", *series, "--method", "tmax-net", "--model", str(model), "--out", str(tmp_path / "maps"),
                 "--progress", "none"]) == 0
    tmax = read_volume(tmp_path / "maps" / "tmax.nii.gz").array
    assert np.isfinite(tmax[ph.tissue_mask]).all() and tmax[ph.tissue_mask].max() > 0
    # a series of another length is refused by the model card check, with nothing written
    short = tmp_path / "short.nii.gz"
    from perfusionai.io import write_series

    write_series(ph.signal[..., :40], ph.geometry, short, tr=ph.tr)
    assert main(["dsc", "maps", "--dsc", str(short), *series[2:], "--method", "tmax-net", "--model", str(model),
                 "--out", str(tmp_path / "never"), "--progress", "none"]) == 2
    assert not (tmp_path / "never").exists()


def test_grade_takes_rois_as_labels_of_a_label_map(tmp_path):
    # the same cohort as above, with both ROIs as labels of one label map: the same ratios and AUC
    geometry = Geometry((1, 2, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    rois = np.zeros((1, 2, 4), np.uint8)
    rois[0, 0, :2] = 5   # lesion
    rois[0, 1, :] = 2    # reference
    write_volume(rois, geometry, tmp_path / "rois.nii.gz")
    rows = []
    for n, (score, label) in enumerate(zip(SCORES, LABELS)):
        cbf = np.full((1, 2, 4), 20.0, np.float32)
        cbf[0, 0, :2] = 20.0 * score
        write_volume(cbf, geometry, tmp_path / f"cbf{n}.nii.gz")
        rows.append({"subject": f"s{n}", "map": f"cbf{n}.nii.gz", "roi_lesion": "rois.nii.gz", "roi_lesion_label": "5",
                     "roi_reference": "rois.nii.gz", "roi_reference_label": "2", "label": label})
    with open(tmp_path / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    from perfusionai.cli import main

    assert main(["dsc", "grade", "--table", str(tmp_path / "table.csv"), "--out", str(tmp_path / "out"),
                 "--bootstrap", "50", "--progress", "none"]) == 0
    ratios = list(csv.DictReader(open(tmp_path / "out" / "ratios.csv")))
    assert [float(r["roi_ratio"]) for r in ratios] == pytest.approx(SCORES, rel=1e-5)
    result = json.loads((tmp_path / "out" / "grading.json").read_text())["methods"]["map"]
    assert result["auc"] == pytest.approx(11 / 12)
    rows[3]["roi_lesion_label"] = "4"  # a label the map does not hold: one clear error naming the file
    with open(tmp_path / "bad.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main(["dsc", "grade", "--table", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o2"),
                 "--progress", "none"]) == 2
    assert not (tmp_path / "o2").exists()
