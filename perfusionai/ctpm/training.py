"""DL-CTPM training: cohort -> per-lung samples -> ARNN via the shared :func:`perfusionai.nn.fit`.

A *cohort CSV* has columns ``ct, spect`` and optionally ``lung_mask`` (paths
relative to the CSV's folder or absolute). Each patient gives two samples
(right and left lung, as in the paper). Per sample, on the lung's network grid:

* input  = enhanced CT (:func:`~.preprocessing.enhance_ct`),
* target = SPECT / P75 (P75 over both lungs on the SPECT grid), resampled with
  SimpleITK in physical coordinates directly onto the lung's network grid (which
  lies in the CT's frame: one interpolation instead of SPECT -> CT -> crop) and
  discretised into 11 levels,
* weight = the lung mask (the BCE of Eq. 3 is averaged over lung voxels).

Validation: a patient-level random split (``val_fraction``) drives early
stopping; or ``folds`` > 1 runs the paper's k-fold cross-validation (each fold
trained from scratch, its validation metrics reported) and then fits the final
model on all patients for the number of epochs the folds found best. Both
lungs of a patient always stay in the same partition.

Optimiser: Adam (the paper's), learning rate ``lr`` (default 1e-3, not given
in the paper), batch size 2, no augmentation (none is described).
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ParameterError, PerfusionAIError, input_error
from ..io import read_labels, read_volume
from ..progress import as_progress
from .arnn import ARCHITECTURE
from .evaluation import MIN_SPECT_COVERAGE, evaluate_maps, summarise_cohort
from .predict import lung_labels_for
from .preprocessing import (PreprocessConfig, coverage, discretise, preprocess_ct, resample_onto,
                            spect_reference_level)


@dataclass
class LungSample:
    """One lung on its network grid: enhanced CT, lung mask, continuous and discretised target."""

    patient: str
    side: int
    enhanced: np.ndarray
    mask: np.ndarray
    target_continuous: np.ndarray
    target: np.ndarray


@dataclass
class TrainingResult:
    """What :func:`train_ctpm` produced."""

    model: object
    card: dict
    history: dict
    fold_metrics: list = field(default_factory=list)
    validation_metrics: dict = field(default_factory=dict)


def read_cohort(csv_path: str | os.PathLike) -> list[dict]:
    """Rows ``{"ct", "spect", "lung_mask"|None}`` with resolved paths; clear errors for a bad CSV."""
    path = Path(csv_path)
    if not path.is_file():
        raise input_error(path, "cohort CSV not found")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        for needed in ("ct", "spect"):
            if needed not in columns:
                raise input_error(path, f"cohort CSV needs columns 'ct' and 'spect' (optional 'lung_mask'); "
                                        f"found {columns}")
        rows = []
        for n, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            resolved = {}
            for key in ("ct", "spect", "lung_mask"):
                value = row.get(key, "")
                if not value:
                    if key != "lung_mask":
                        raise input_error(path, f"line {n}: empty '{key}'")
                    resolved[key] = None
                    continue
                p = Path(value)
                resolved[key] = p if p.is_absolute() else path.parent / p
            rows.append(resolved)
    if len(rows) < 2:
        raise input_error(path, f"cohort has {len(rows)} patient(s); at least 2 are needed (training and validation)")
    return rows


def prepare_patient(ct_path, spect_path, lung_mask_path=None,
                    config: PreprocessConfig = PreprocessConfig()) -> list[LungSample]:
    """The two lung samples of one patient (see the module docstring)."""
    ct = read_volume(ct_path, "CT")
    mask = read_labels(lung_mask_path, ct.geometry, "lung mask") if lung_mask_path else None
    spect = read_volume(spect_path, "SPECT")
    return prepare_arrays(np.asarray(ct.array), ct.geometry, np.asarray(spect.array, dtype=np.float32),
                          spect.geometry, mask, config, patient=str(ct_path), spect_name=str(spect_path))


def prepare_arrays(ct_hu, geometry, spect, spect_geometry, lung_mask=None,
                   config: PreprocessConfig = PreprocessConfig(), patient: str = "",
                   spect_name: str = "SPECT") -> list[LungSample]:
    """:func:`prepare_patient` on arrays (``[k, j, i]``; CT in HU, SPECT in counts)."""
    labels = lung_labels_for(ct_hu, geometry, lung_mask)
    lung = labels > 0
    if coverage(spect_geometry, geometry, lung) < MIN_SPECT_COVERAGE:
        raise input_error(spect_name, "does not overlap the CT's lungs (less than 90 % of the lung lies inside "
                                      "the SPECT); register the SPECT to the CT first")
    # P75 over both lungs, on the SPECT grid (as the evaluation does).
    lung_on_spect = resample_onto(lung.astype(np.float32), geometry, spect_geometry) >= 0.5
    if not lung_on_spect.any():
        raise input_error(spect_name, "no SPECT voxel lies inside the lung")
    level = spect_reference_level(spect, lung_on_spect, config.spect_percentile, spect_name)
    crops = preprocess_ct(ct_hu, geometry, labels, config)
    samples = []
    for crop in crops:
        target = resample_onto(spect, spect_geometry, crop.grid, interpolation="linear") / level
        samples.append(LungSample(patient, crop.side, crop.enhanced, crop.mask, target.astype(np.float32),
                                  discretise(target, config.spect_levels)))
    return samples


def _tensors(samples: Sequence[LungSample]):
    import torch

    x = torch.from_numpy(np.stack([s.enhanced for s in samples])[:, None].astype(np.float32))
    y = torch.from_numpy(np.stack([s.target for s in samples])[:, None].astype(np.float32))
    m = torch.from_numpy(np.stack([s.mask for s in samples])[:, None].astype(np.float32))
    return x, y, m


def _step(model, batch):
    from .arnn import masked_bce

    x, y, m = batch
    return masked_bce(model.logits(x), y, m)


def predict_samples(model, samples: Sequence[LungSample], batch_size: int = 4) -> list[np.ndarray]:
    """Network-grid predictions of samples (eval mode, no gradients)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            x = torch.from_numpy(np.stack([s.enhanced for s in chunk])[:, None].astype(np.float32)).to(device)
            out.extend(p[0].float().cpu().numpy() for p in model(x))
    return out


def sample_metrics(model, samples: Sequence[LungSample]) -> list[dict]:
    """Pinned metrics per lung on the network grid against the continuous target."""
    preds = predict_samples(model, samples)
    return [evaluate_maps(p, s.target_continuous, s.mask) for p, s in zip(preds, samples)]


def _fit_once(train: Sequence[LungSample], val: Optional[Sequence[LungSample]], hparams: dict,
              epochs: int, lr: float, batch_size: int, patience: Optional[int], seed: int,
              device, progress, max_seconds: Optional[float], architecture: str = ARCHITECTURE):
    import torch

    from ..nn import TensorBatchLoader, build_model, fit, seed_everything, set_threads

    set_threads()
    generator = seed_everything(seed)
    model = build_model(architecture, **hparams)
    x, y, m = _tensors(train)
    loader = TensorBatchLoader(x, y, m, batch_size=batch_size, shuffle=True, generator=generator,
                               drop_last=len(train) > batch_size)
    val_loader = None
    if val:
        vx, vy, vm = _tensors(val)
        val_loader = TensorBatchLoader(vx, vy, vm, batch_size=batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = fit(model, loader, val_loader, None, optimizer, epochs, early_stopping_patience=patience,
                  progress=progress, device=device, step_fn=_step, max_seconds=max_seconds, progress_every=0)
    return model, history


def step_seconds(architecture: str, hparams: dict, input_shape: Sequence[int], batch_size: int,
                 device="auto") -> float:
    """Measured wall time (s) of one training step (forward, backward, Adam) of a fresh network on a
    random batch of ``batch_size`` lungs of ``input_shape`` on ``device`` (the faster of two steps
    after a warm-up step; the warm-up step alone when it takes over 5 s)."""
    import torch

    from ..nn import build_model, choose_device, set_threads

    set_threads()
    dev = choose_device(device)
    model = build_model(architecture, **hparams).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand((batch_size, 1, *input_shape), device=dev)
    y = (torch.rand_like(x) * 10).round() / 10
    m = torch.ones_like(x)
    times = []
    for n in range(3):  # the first step pays one-time costs (allocation, kernel choice): keep the fastest
        if n == 1 and times[0] > 5.0:
            return times[0]  # a slow network: one step is estimate enough (hours either way), do not wait
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = _step(model, (x, y, m))
        loss.backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times[1:])


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def train_ctpm(samples: Sequence[LungSample], *, config: PreprocessConfig = PreprocessConfig(),
               channels: Sequence[int] = (16, 32, 64, 128), kernel_size: int = 5, epochs: int = 500,
               lr: float = 1e-3, batch_size: int = 2, val_fraction: float = 0.25, folds: int = 1,
               patience: Optional[int] = 30, seed: int = 0, device="auto", trained_on_phantoms: bool = False,
               training_data: str = "", max_seconds: Optional[float] = None, architecture: str = ARCHITECTURE,
               progress=None, announce=None) -> TrainingResult:
    """Train an ARNN on lung samples (from :func:`prepare_patient`); returns model + card.

    ``folds`` > 1: k-fold cross-validation by patient, then a final fit on all
    patients for the mean best epoch count of the folds. Otherwise a random
    patient split with ``val_fraction`` of the patients for validation and
    early stopping (``patience`` epochs; the best epoch's weights are kept).
    ``architecture``: ``"ctpm.arnn"`` (the paper's) or ``"ctpm.attention_unet"`` (MONAI baseline).
    ``announce``: optional ``callable(message)`` told the time estimate (one measured training step
    times the steps of every fit) before training starts.
    """
    report = as_progress(progress)
    patients = sorted({s.patient for s in samples})
    if len(patients) < 2:
        raise PerfusionAIError("training needs at least 2 patients")
    from .arnn import ATTENTION_UNET

    if architecture == ATTENTION_UNET:
        hparams = dict(channels=[int(c) for c in channels], kernel_size=int(kernel_size), dropout=0.1, in_channels=1)
    elif architecture == ARCHITECTURE:
        hparams = dict(channels=[int(c) for c in channels], kernel_size=int(kernel_size), dropout=0.1,
                       prelu_init=0.2, roi_channels=4, attention_skips=2, in_channels=1)
    else:
        raise ParameterError("architecture", f"unknown architecture {architecture!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ParameterError("val_fraction", f"must be in [0, 1), got {val_fraction}")
    if announce is not None:
        step = step_seconds(architecture, hparams, config.input_shape, batch_size, device)
        fits = folds + 1 if folds > 1 else 1
        steps = max(1, int(np.ceil(len(samples) / batch_size))) * epochs * fits
        total = 1.2 * step * steps  # + validation passes
        shape = "x".join(str(n) for n in config.input_shape)
        from ..nn import choose_device

        announce(f"ctpm train: up to {epochs} epochs x {fits} fit(s) on {len(samples)} lungs at {shape}: about "
                 f"{_duration(total)} on {choose_device(device).type} (one step {step:.2f} s); early stopping "
                 f"may end it sooner, "
                 f"--max-minutes caps each fit; 'perfusionai ctpm train --help' gives a quick CPU recipe")
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(patients))
    started = time.perf_counter()
    fold_metrics: list[dict] = []
    validation: dict = {}
    if folds > 1:
        if folds > len(patients):
            raise ParameterError("folds", f"{folds} folds need at least {folds} patients, the cohort has {len(patients)}")
        groups = [order[f::folds] for f in range(folds)]
        best_epochs = []
        for f, held in enumerate(groups):
            train = [s for s in samples if s.patient not in held]
            val = [s for s in samples if s.patient in held]
            model, history = _fit_once(train, val, hparams, epochs, lr, batch_size, patience, seed + f, device,
                                       report.sub(f / (folds + 1), (f + 1) / (folds + 1)), max_seconds,
                                       architecture)
            rows = sample_metrics(model, val)
            fold_metrics.append({"fold": f + 1, "patients": len(held), "best_epoch": history.best_epoch + 1,
                                 "summary": summarise_cohort(rows), "cases": rows})
            best_epochs.append(history.best_epoch + 1)
        final_epochs = max(1, int(round(float(np.mean(best_epochs)))))
        model, history = _fit_once(samples, None, hparams, final_epochs, lr, batch_size, None, seed, device,
                                   report.sub(folds / (folds + 1), 1.0), max_seconds, architecture)
        validation = {"k_fold": folds,
                      "summary": summarise_cohort([r for fm in fold_metrics for r in fm["cases"]])}
        split = {"k_fold": folds, "final_epochs": final_epochs}
    else:
        n_val = max(1, int(round(val_fraction * len(patients)))) if val_fraction > 0 else 0
        held = set(order[:n_val])
        train = [s for s in samples if s.patient not in held]
        val = [s for s in samples if s.patient in held]
        model, history = _fit_once(train, val or None, hparams, epochs, lr, batch_size, patience, seed, device,
                                   report, max_seconds, architecture)
        if val:
            validation = {"split": "patients", "summary": summarise_cohort(sample_metrics(model, val))}
        split = {"validation_patients": len(held), "training_patients": len(patients) - len(held)}
    from ..nn import count_parameters

    card = {
        "architecture": {"name": architecture, "hyperparameters": hparams},
        "inputs": {"modality": "CT in HU, one lung per sample", "channels": 1,
                   "input_shape": list(config.input_shape), "preprocessing": config.to_dict(),
                   "normalisation": "histogram equalisation of HU in the window over the lung, median and "
                                    "uniform filters (Ren et al. 2021, Eq. 1)"},
        "outputs": {"perfusion": "SPECT / P75 inside the lung, in [0, 1] (sigmoid)",
                    "high_function_threshold": 0.66},
        "training_data": training_data or f"{len(patients)} patients ({len(samples)} lungs)",
        "trained_on_phantoms": bool(trained_on_phantoms),
        "metrics": {"validation": validation, "folds": [{k: v for k, v in fm.items() if k != "cases"}
                                                         for fm in fold_metrics]},
        "training": {"epochs_max": epochs, "epochs_run": history.epochs_run, "best_epoch": history.best_epoch + 1,
                     "learning_rate": lr, "batch_size": batch_size, "optimizer": "Adam",
                     "loss": "BCE over lung voxels (Eq. 3)", "seed": seed, "patience": patience,
                     "seconds": round(time.perf_counter() - started, 1), **split,
                     "parameters": int(count_parameters(model))},
    }
    if trained_on_phantoms:
        card["note"] = "trained on phantoms: not for clinical use"
    return TrainingResult(model, card, history.to_dict(), fold_metrics, validation)


def train_from_cohort(cohort_csv: str | os.PathLike, out_model: str | os.PathLike, *,
                      config: PreprocessConfig = PreprocessConfig(), trained_on_phantoms: Optional[bool] = None,
                      progress=None, **train_kwargs) -> TrainingResult:
    """``perfusionai ctpm train``: read the cohort, prepare samples, train, save the model folder/zip."""
    from ..nn import save_model

    report = as_progress(progress)
    rows = read_cohort(cohort_csv)
    if trained_on_phantoms is None:
        from ..cohorts import is_phantom_cohort  # the marker 'ctpm phantom' writes beside its cohort.csv

        trained_on_phantoms = is_phantom_cohort(cohort_csv)
    samples: list[LungSample] = []
    prep = report.sub(0.0, 0.2)
    for n, row in enumerate(rows):
        prep(n / len(rows), f"preprocessing patient {n + 1}/{len(rows)}")
        samples.extend(prepare_patient(row["ct"], row["spect"], row["lung_mask"], config))
    description = (f"{len(rows)} patients from {Path(cohort_csv).name} ({len(samples)} lungs)"
                   + ("; trained on phantoms (perfusionai.phantoms.ctpm)" if trained_on_phantoms else ""))
    result = train_ctpm(samples, config=config, trained_on_phantoms=trained_on_phantoms,
                        training_data=description, progress=report.sub(0.2, 0.98), **train_kwargs)
    save_model(out_model, result.model, result.card)
    report(1.0, "model saved")
    return result


#: Reduced configuration for demos, self-tests and CPU tests: the paper's architecture at 32x16x16
#: crops with channels 8-16-32-64 and the filter windows scaled to the smaller grid.
REDUCED_CONFIG = PreprocessConfig(input_shape=(32, 16, 16), median_size=3, uniform_size=1)
REDUCED_CHANNELS = (8, 16, 32, 64)
