"""A series written by ``dsc phantom`` is marked, and every PHAE trained on it says "trained on
phantoms" (issue 16); PHAE training progress follows the time budget without jumps."""

import json

import numpy as np
import pytest

from perfusionai.cli import main
from perfusionai.dsc.acquisition import is_marked_phantom
from perfusionai.phantoms.dsc import make_dsc_phantom

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ph")
    ph = make_dsc_phantom(shape=(3, 14, 14), n_frames=40, snr=100, seed=2)
    ph.save(folder)
    return folder, ph


def test_phantom_series_is_marked_and_other_series_are_not(phantom, tmp_path):
    folder, ph = phantom
    assert is_marked_phantom(folder / "dsc.nii.gz")
    assert json.loads((folder / "dsc.json").read_text())["PerfusionAIPhantom"] is True
    from perfusionai.io import read_series, write_series

    assert read_series(folder / "dsc.nii.gz").te is None  # the sidecar carries no TE: still given by the user
    other = write_series(ph.signal, ph.geometry, tmp_path / "scan.nii.gz", tr=ph.tr)
    assert not is_marked_phantom(other)


def test_phae_trained_on_a_phantom_series_says_so(phantom, tmp_path, capsys):
    folder, ph = phantom
    series = ["--dsc", str(folder / "dsc.nii.gz"), "--te", str(ph.te), "--aif-mask", str(folder / "aif_mask.nii.gz"),
              "--mask", str(folder / "brain_mask.nii.gz"), "--progress", "none"]
    # dsc maps --method phae without a model trains on the series itself
    assert main(["dsc", "maps", *series, "--method", "phae", "--phae-epochs", "1", "--device", "cpu",
                 "--out", str(tmp_path / "maps")]) == 0
    summary = json.loads((tmp_path / "maps" / "summary.json").read_text())
    assert summary["learned_method"]["trained_on_phantoms"] is True
    assert "trained on phantoms" in summary["learned_method"]["notes"][0]
    # dsc train-phae without --trained-on-phantoms: the mark sets it
    assert main(["dsc", "train-phae", *series, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "model.json").read_text())["trained_on_phantoms"] is True
    capsys.readouterr()


def test_phae_progress_is_continuous_when_the_time_budget_stops_training(phantom):
    from perfusionai.dsc.concentration import signal_to_concentration
    from perfusionai.dsc.phae import prepare_subject, train_phae

    _, ph = phantom
    conc = signal_to_concentration(ph.signal, ph.te, 8, ph.brain_mask).concentration
    aif = conc[ph.aif_mask].mean(axis=0)
    seen = []
    training = train_phae(prepare_subject(conc, aif, ph.times, ph.brain_mask), epochs=10000, max_seconds=2.0,
                          early_stopping_patience=10000,  # only the time budget may stop it, on any machine speed
                          device="cpu", progress=lambda f, m: seen.append((f, m)))
    assert training.history.stopped_by_time and training.history.epochs_run < 10000
    fractions = np.array([f for f, _ in seen])
    assert np.all(np.diff(fractions) >= -1e-12)  # never backwards
    # the epochs done are a tiny share of the 10000 asked for; progress follows the budget instead, so
    # the last epoch's report is near the end (it said epochs-done/10000, then jumped to 100 %)
    assert training.history.epochs_run / 10000 < 0.05
    last_epoch = [f for f, m in seen if m.startswith(f"epoch {training.history.epochs_run}/10000:")]
    assert last_epoch and last_epoch[-1] >= 0.9, seen
    assert fractions[-1] == pytest.approx(1.0)
