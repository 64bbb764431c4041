"""Learned Tmax maps from the 4D DSC series (Sossin, Carlson, Radzihovsky, Stanford CS230 2021).

The time axis is the channel axis of 3D convolutions (Keras ``Conv3D`` channels-last in the
paper; ``[batch, t, k, j, i]`` here) and the networks output one Tmax value per voxel:

* ``conv1`` (``dsc.tmaxnet.conv1``): one Conv3d(T -> 1, 1x1x1): T + 1 parameters (61 at 60 frames).
* ``conv2`` (``dsc.tmaxnet.conv2``): BatchNorm(T) -> Conv3d(T -> 12, 1x1x1) -> BatchNorm(12) ->
  ReLU -> Conv3d(12 -> 1, 1x1x1). Counted as Keras counts (batch-norm moving mean and
  variance included) this is **1033 parameters at 60 frames**, the paper's number:
  4*60 + (60*12 + 12) + 4*12 + (12 + 1) (research/translation.md 2.1).
* ``unet`` (``dsc.tmaxnet.unet``): a small 3D U-Net over the same time-as-channels input
  (3 levels, ``base_features`` 16-32-64, two ConvNormAct 3x3x3 per level, max-pool 2,
  transposed-conv up-sampling, 1x1x1 output) -- a compact variant, not the paper's
  13.1 M-parameter network whose exact layout is not recoverable (research note).

Loss: MSE against reference Tmax maps (paper), which are user-supplied (e.g. from
commercial software) or produced by this project's oSVD as teacher (``teacher="osvd"``).

Units and axes: concentration ``[k, j, i, t]`` delta R2* (1/s), AIF ``(t,)`` 1/s, times ``(t,)``
s, masks ``[k, j, i]``, Tmax ``[k, j, i]`` in s.

Deviations from the paper (documented choices where it is silent or where we differ)
-------------------------------------------------------------------------------------
1. Input: the delta R2* concentration (not the raw signal), each curve divided by its own
   peak (``normalisation="voxel"``, default; ``"aif"`` divides by the AIF peak; the paper
   normalises the skull-stripped signal to [0, 1]; the mode is stored in the model card and
   reused at inference); the series is shifted by
   whole frames so that the AIF peak falls on the frame recorded at training, so that Tmax,
   defined relative to the AIF, is learnable from the voxel curve alone (frames shifted in
   from the edge repeat the edge frame).
2. Activation: the paper does not state one; the 2-layer network uses ReLU after the second
   batch norm (without it the network is affine, no better than one layer).
3. The 1x1x1 networks are trained on masked voxels as the batch (identical maths to
   whole-volume training, but background voxels do not dilute the loss or the batch-norm
   statistics). The U-Net trains on whole volumes with the MSE inside the mask.
4. Target scale: the network predicts Tmax / 10 s (MSE on that scale); maps are in s.
5. Optimiser: Adam lr 1e-3 (the paper's best), batch 4096 voxels (1 volume for the U-Net),
   up to ``epochs`` with early stopping on held-out voxels / subjects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ParameterError, input_error
from ..nn import (ConvNormAct, TensorBatchLoader, TrainingHistory, build_model, choose_device, fit,
                  keras_parameter_count, register_architecture, seed_everything, set_threads)
from ..progress import ProgressCallback, as_progress
from .deconvolution import deconvolve, frame_interval
from .phae import check_model_inputs  # the one frame-count / frame-interval check of DSC models

ARCHITECTURES = {"conv1": "dsc.tmaxnet.conv1", "conv2": "dsc.tmaxnet.conv2", "unet": "dsc.tmaxnet.unet"}
TARGET_SCALE_S = 10.0


class TmaxConv1(nn.Module):
    """One 1x1x1 Conv3d over time-as-channels: ``(B, T, K, J, I) -> (B, 1, K, J, I)``."""

    def __init__(self, n_frames: int):
        super().__init__()
        self.conv = nn.Conv3d(int(n_frames), 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TmaxConv2(nn.Module):
    """BN(T) -> 1x1x1 Conv(T->hidden) -> BN(hidden) -> ReLU -> 1x1x1 Conv(hidden->1)."""

    def __init__(self, n_frames: int, hidden: int = 12, activation: str = "relu"):
        super().__init__()
        self.norm_in = nn.BatchNorm3d(int(n_frames))
        self.hidden = ConvNormAct(3, int(n_frames), int(hidden), kernel_size=1, norm="batch", act=activation,
                                  bias=True)
        self.out = nn.Conv3d(int(hidden), 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.norm_in(x)))


class TmaxUNet(nn.Module):
    """Small 3D U-Net, time as input channels; spatial size must be divisible by 2**(levels-1)
    (:func:`tmax_maps` pads)."""

    def __init__(self, n_frames: int, base_features: int = 16, levels: int = 3):
        super().__init__()
        self.levels = int(levels)
        widths = [int(base_features) * 2 ** level for level in range(self.levels)]
        self.down = nn.ModuleList()
        channels = int(n_frames)
        for w in widths:
            self.down.append(nn.Sequential(ConvNormAct(3, channels, w, 3), ConvNormAct(3, w, w, 3)))
            channels = w
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose3d(channels, w, kernel_size=2, stride=2))
            self.merge.append(nn.Sequential(ConvNormAct(3, 2 * w, w, 3), ConvNormAct(3, w, w, 3)))
            channels = w
        self.out = nn.Conv3d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < self.levels - 1:
                skips.append(x)
                x = self.pool(x)
        for up, merge in zip(self.up, self.merge):
            x = up(x)
            x = merge(torch.cat((x, skips.pop()), dim=1))
        return self.out(x)


register_architecture(ARCHITECTURES["conv1"], TmaxConv1)
register_architecture(ARCHITECTURES["conv2"], TmaxConv2)
register_architecture(ARCHITECTURES["unet"], TmaxUNet)


# --------------------------------------------------------------------------------------------
# inputs


@dataclass
class TmaxSubject:
    """One series for Tmax learning: normalised, AIF-aligned curves ``[k, j, i, t]`` and targets.

    ``reference`` ``[k, j, i]`` Tmax in s (None at inference); ``mask`` ``[k, j, i]`` bool.
    """

    curves: np.ndarray
    mask: np.ndarray
    reference: Optional[np.ndarray]
    dt: float
    n_frames: int
    aif_peak_frame: int
    normalisation: str = "voxel"


def aif_peak_frame(aif: np.ndarray) -> int:
    return int(np.argmax(np.asarray(aif, dtype=float)))


def prepare_tmax_subject(concentration: np.ndarray, aif: np.ndarray, times: np.ndarray,
                         mask: Optional[np.ndarray] = None, reference_tmax: Optional[np.ndarray] = None,
                         target_peak_frame: Optional[int] = None, name: str = "DSC series",
                         normalisation: str = "voxel") -> TmaxSubject:
    """Normalise (divide by the AIF peak) and align (shift the AIF peak to ``target_peak_frame``).

    Parameters
    ----------
    concentration
        ``[k, j, i, t]`` delta R2* in 1/s; ``aif`` ``(t,)`` 1/s; ``times`` ``(t,)`` s.
    mask
        ``[k, j, i]`` (None: all voxels). ``reference_tmax`` ``[k, j, i]`` s (training only).
    target_peak_frame
        Frame the AIF peak is moved to (None: leave the series as it is).
    """
    conc = np.asarray(concentration)
    if conc.ndim != 4:
        raise input_error(name, f"expected a 4D series [k, j, i, t], got {conc.ndim} dimensions")
    a = np.asarray(aif, dtype=np.float64).ravel()
    if a.size != conc.shape[-1]:
        raise input_error(name, f"{conc.shape[-1]} frames but the AIF has {a.size}")
    dt = frame_interval(times)
    peak = float(a.max())
    if not peak > 0:
        raise input_error("AIF", "the AIF has no positive peak; check the AIF mask")
    m = np.ones(conc.shape[:3], bool) if mask is None else np.asarray(mask, bool)
    if m.shape != conc.shape[:3]:
        raise input_error("mask", f"mask shape {m.shape} differs from the series {conc.shape[:3]}")
    curves = np.nan_to_num(conc.astype(np.float32) / np.float32(peak), nan=0.0, posinf=0.0, neginf=0.0)
    own_peak = aif_peak_frame(a)
    if target_peak_frame is not None and int(target_peak_frame) != own_peak:
        shift = int(target_peak_frame) - own_peak
        index = np.clip(np.arange(a.size) - shift, 0, a.size - 1)
        curves = curves[..., index]
    if normalisation == "voxel":
        # Tmax is a timing feature: scale each curve by its own peak so the small 1x1x1
        # networks do not have to learn invariance to CBV x CBF amplitude
        peaks = np.abs(curves).max(axis=-1, keepdims=True)
        curves = curves / np.maximum(peaks, np.float32(1e-6))
    elif normalisation != "aif":
        raise ValueError(f"unknown normalisation {normalisation!r}")
    curves = curves * m[..., None]
    ref = None
    if reference_tmax is not None:
        ref = np.asarray(reference_tmax, dtype=np.float32)
        if ref.shape != m.shape:
            raise input_error("reference Tmax", f"shape {ref.shape} differs from the series {m.shape}")
        ref = np.nan_to_num(ref, nan=0.0)
    return TmaxSubject(curves=curves, mask=m, reference=ref, dt=dt, n_frames=a.size,
                       aif_peak_frame=own_peak if target_peak_frame is None else int(target_peak_frame),
                       normalisation=normalisation)


def osvd_teacher_tmax(concentration: np.ndarray, aif: np.ndarray, times: np.ndarray, mask: np.ndarray,
                      progress: Optional[ProgressCallback] = None) -> np.ndarray:
    """Reference Tmax ``[k, j, i]`` (s) from this project's oSVD (the teacher)."""

    m = np.asarray(mask, bool)
    dt = frame_interval(times)
    result = deconvolve(np.asarray(concentration)[m], aif, dt, "oSVD", progress=progress)
    out = np.zeros(m.shape, np.float32)
    out[m] = result.tmax_seconds()
    return out


# --------------------------------------------------------------------------------------------
# training


@dataclass
class TmaxTraining:
    model: nn.Module
    card: dict
    history: TrainingHistory
    seconds: float


def _voxel_tensors(subjects: Sequence[TmaxSubject]):
    xs, ys = [], []
    for s in subjects:
        xs.append(torch.from_numpy(np.ascontiguousarray(s.curves[s.mask])))
        ys.append(torch.from_numpy(s.reference[s.mask] / TARGET_SCALE_S))
    x = torch.cat(xs)[:, :, None, None, None]
    y = torch.cat(ys)[:, None, None, None, None]
    return x, y


def _pad_to(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    shape = x.shape[:3]
    target = [((n + multiple - 1) // multiple) * multiple for n in shape]
    pads = [(0, t - n) for t, n in zip(target, shape)] + [(0, 0)] * (x.ndim - 3)
    return np.pad(x, pads), tuple(shape)


def _volume_tensors(subjects: Sequence[TmaxSubject], multiple: int):
    xs, ys, ms = [], [], []
    for s in subjects:
        x, _ = _pad_to(s.curves, multiple)
        y, _ = _pad_to(s.reference / TARGET_SCALE_S, multiple)
        m, _ = _pad_to(s.mask.astype(np.float32), multiple)
        xs.append(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0))))
        ys.append(torch.from_numpy(y)[None])
        ms.append(torch.from_numpy(m)[None])
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise ParameterError("dsc", "the U-Net trains on whole volumes; all series must have the same grid")
    return torch.stack(xs), torch.stack(ys), torch.stack(ms)


def train_tmax(subjects: Sequence[TmaxSubject], arch: str = "conv2", *, epochs: int = 200,
               learning_rate: float = 1e-3, batch_size: int = 4096, validation_fraction: float = 0.1,
               early_stopping_patience: int = 15, max_seconds: Optional[float] = None, seed: int = 0,
               device=None, progress: Optional[ProgressCallback] = None, trained_on_phantoms: bool = False,
               training_description: str = "", reference_source: str = "user",
               unet_base_features: int = 16) -> TmaxTraining:
    """Train a learned-Tmax network (MSE) on prepared subjects (:func:`prepare_tmax_subject`,
    all aligned to the same AIF peak frame and with ``reference`` maps).

    ``arch`` is ``"conv1"``, ``"conv2"`` or ``"unet"``. ``reference_source`` ("user" or "osvd")
    is recorded in the card.
    """
    started = time.perf_counter()
    report = as_progress(progress)
    if arch not in ARCHITECTURES:
        raise ParameterError("arch", f"unknown architecture {arch!r}; choose conv1, conv2 or unet")
    subjects = list(subjects)
    if not subjects:
        raise ParameterError("dsc", "no training series")
    n_frames, dt, peak = subjects[0].n_frames, subjects[0].dt, subjects[0].aif_peak_frame
    for s in subjects:
        if s.reference is None:
            raise ParameterError("reference_tmax", "every training series needs a reference Tmax map")
        if s.n_frames != n_frames:
            raise ParameterError("dsc", f"all training series must have the same number of frames "
                                       f"({n_frames} and {s.n_frames} found)")
        if abs(s.dt - dt) > 0.02 * dt:
            raise ParameterError("dsc", f"all training series must share the frame interval ({dt} and {s.dt} s)")
        if s.aif_peak_frame != peak:
            raise ValueError("subjects must be aligned to the same AIF peak frame")
        if s.normalisation != subjects[0].normalisation:
            raise ValueError("subjects must share one normalisation")
    device = choose_device(device)
    if device.type == "cpu":
        # the 1x1x1 networks are a few thousand multiply-adds per voxel: one thread avoids the
        # synchronisation cost that dominates such small operations; the U-Net uses every core
        set_threads(None if arch == "unet" else 1)
    generator = seed_everything(seed)
    hyper = {"n_frames": int(n_frames)}
    if arch == "conv2":
        hyper.update(hidden=12, activation="relu")
    if arch == "unet":
        hyper.update(base_features=int(unet_base_features), levels=3)
    model = build_model(ARCHITECTURES[arch], **hyper)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)

    if arch == "unet":
        x, y, m = _volume_tensors(subjects, 4)
        n_val = int(round(validation_fraction * x.shape[0])) if x.shape[0] >= 4 else 0
        order = torch.randperm(x.shape[0], generator=generator)
        val_i, train_i = order[:n_val], order[n_val:]
        train_loader = TensorBatchLoader(x[train_i], y[train_i], m[train_i], batch_size=1, shuffle=True,
                                         generator=generator)
        val_loader = TensorBatchLoader(x[val_i], y[val_i], m[val_i], batch_size=1) if n_val else None

        def step(net, batch):
            inputs, target, weight = batch
            return torch.sum(weight * (net(inputs) - target) ** 2) / weight.sum().clamp(min=1.0)
        n_samples = int(sum(s.mask.sum() for s in subjects))
    else:
        x, y = _voxel_tensors(subjects)
        order = torch.randperm(x.shape[0], generator=generator)
        n_val = int(round(validation_fraction * x.shape[0])) if x.shape[0] >= 50 else 0
        val_i, train_i = order[:n_val], order[n_val:]
        train_loader = TensorBatchLoader(x[train_i], y[train_i], batch_size=batch_size, shuffle=True,
                                         generator=generator, drop_last=train_i.numel() > batch_size)
        val_loader = TensorBatchLoader(x[val_i], y[val_i], batch_size=65536) if n_val else None

        def step(net, batch):
            inputs, target = batch
            return torch.mean((net(inputs) - target) ** 2)
        n_samples = int(x.shape[0])

    history = fit(model, train_loader, val_loader, None, optimizer, epochs=epochs,
                  early_stopping_patience=early_stopping_patience, progress=report.sub(0, 0.98),
                  device=device, step_fn=step, max_seconds=max_seconds)
    model = model.to("cpu").eval()
    seconds = time.perf_counter() - started
    rmse = float(np.sqrt(history.best_loss)) * TARGET_SCALE_S if np.isfinite(history.best_loss) else None
    card = {
        "architecture": model.architecture,
        "inputs": {"n_frames": int(n_frames), "frame_interval_s": float(dt), "aif_peak_frame": int(peak),
                   "channels": "time frames as channels",
                   "normalisation_mode": subjects[0].normalisation,
                   "normalisation": ("each curve divided by its own peak" if subjects[0].normalisation == "voxel"
                                     else "delta R2* divided by the AIF peak")
                                    + "; series shifted so the AIF peak is on aif_peak_frame",
                   "units": "delta R2* in 1/s before normalisation"},
        "outputs": {"tmax": "s", "target_scale_s": TARGET_SCALE_S},
        "training_data": training_description or f"{len(subjects)} series, {n_samples} voxels",
        "trained_on_phantoms": bool(trained_on_phantoms),
        "reference_tmax": reference_source,
        "metrics": {"validation_rmse_s": rmse, "keras_parameter_count": keras_parameter_count(model)},
        "training": {"epochs_run": history.epochs_run, "best_epoch": history.best_epoch + 1,
                     "learning_rate": learning_rate, "loss": "MSE", "optimizer": "Adam", "seed": seed,
                     "device": device.type, "seconds": round(seconds, 2)},
        "method": "Sossin et al. 2021 learned Tmax (see perfusionai.dsc.tmaxnet)",
    }
    report(1.0, f"Tmax network trained in {seconds:.0f} s")
    return TmaxTraining(model=model, card=card, history=history, seconds=seconds)


# --------------------------------------------------------------------------------------------
# inference


def tmax_maps(model: nn.Module, card: dict, concentration: np.ndarray, aif: np.ndarray, times: np.ndarray,
              mask: Optional[np.ndarray] = None, device=None, model_name: str = "model",
              progress: Optional[ProgressCallback] = None, chunk: int = 65536) -> np.ndarray:
    """Tmax ``[k, j, i]`` in s (0 outside the mask) from a trained network and its card.

    Refuses a series whose frame count or frame interval (2 %) differs from the training data.
    """

    report = as_progress(progress)
    inputs = card.get("inputs", {})
    check_model_inputs(card, int(np.asarray(concentration).shape[-1]), frame_interval(times), model_name)
    subject = prepare_tmax_subject(concentration, aif, times, mask, None, inputs.get("aif_peak_frame"),
                                   normalisation=inputs.get("normalisation_mode", "voxel"))
    device = choose_device(device)
    if device.type == "cpu":
        set_threads()
    net = model.to(device).eval()
    out = np.zeros(subject.mask.shape, np.float32)
    with torch.inference_mode():
        if isinstance(model, TmaxUNet):
            x, shape = _pad_to(subject.curves, 4)
            pred = net(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[None].to(device))
            full = pred[0, 0].float().cpu().numpy()[: shape[0], : shape[1], : shape[2]]
            out[subject.mask] = full[subject.mask] * TARGET_SCALE_S
        else:
            curves = subject.curves[subject.mask]
            values = np.empty(curves.shape[0], np.float32)
            for start in range(0, curves.shape[0], chunk):
                block = torch.from_numpy(np.ascontiguousarray(curves[start:start + chunk]))
                pred = net(block[:, :, None, None, None].to(device))
                values[start:start + chunk] = pred.reshape(-1).float().cpu().numpy()
                report(min(1.0, (start + chunk) / max(curves.shape[0], 1)), "Tmax network")
            out[subject.mask] = values * TARGET_SCALE_S
    report(1.0, "Tmax network")
    return out
