"""Physics-informed autoencoder (PHAE) for DSC-MRI perfusion (Fayolle et al., ISBI 2025).

Self-supervised: the network is trained on the user's own concentration curves (all
masked voxels of one series, or a cohort) with no reference maps. Per voxel:

* **Encoder** (a 1D fully convolutional network, paper Fig. 2): the pair of curves
  ``C(t)`` and ``C_a(t)`` as two input channels -> 4 blocks of Conv1d (kernel 3, stride 1,
  padding 1) + BatchNorm1d + LeakyReLU(0.02), ``base_features`` channels doubling per block
  -> global average pooling -> linear layer -> **MTT** (s).
* **CBV** by the integral ratio (paper eq. 2), computed beforehand, never learned:
  ``CBV = 100 kH/rho * int C / int C_a`` (mL/100 g, trapezoid rule over the whole series,
  :func:`perfusionai.dsc.maps.cbv_map`); **CBF** = CBV / MTT (eq. 3; x 60 for mL/100 g/min).
* **Decoder** (eqs. 4-6): residue ``R(t)`` of the chosen shape with mean transit time MTT
  (Lorentzian ``1 / (1 + (pi t / (2 MTT))^2)`` as in the paper; exponential ``exp(-t/MTT)``
  or gamma survival with integer shape as options), TRF = CBF * R, and
  ``C_hat = C_a (x) TRF`` by discrete convolution with the AIF.
* **Loss** L1 between ``C`` and ``C_hat``; Adam without weight decay, batch 1536.

Units and axes: concentration ``[k, j, i, t]`` and AIF ``(t,)`` in 1/s (delta R2*), frame
times ``(t,)`` in s, mask ``[k, j, i]``; maps ``[k, j, i]``: CBV mL/100 g, CBF mL/100 g/min,
MTT s, Tmax s (only with ``estimate_delay``).

Deviations from the paper (each is a hyperparameter or option; the paper's value is stated)
------------------------------------------------------------------------------------------
1. **Width.** The paper's first block has 32 features (``base_features=32``): 15.5 MFLOP per
   voxel, about 40 s to map a 150k-voxel brain on 2 CPU cores, against the 5 s target of
   this product. ``base_features=None`` (default) picks 32 when training on CUDA and 8 on a
   CPU (4 blocks 8-16-32-64, same structure; about 2 s per 150k voxels on two cores, with
   batch norm folded into channels-last convolutions, :func:`perfusionai.nn.inference_copy`). The width is stored in
   the model file, so inference always uses the trained width.
2. **Schedule.** The paper trains 65 epochs at lr 1e-4 over ~39 patients (~165k steps of
   batch 1536, 37 min on their hardware). One series has ~100 batches per epoch, so the
   default here is lr 1e-3 (Adam, no weight decay, batch 1536), up to 65 epochs, stopping
   early when the L1 of 5 % held-out voxels stops improving (patience 6) or after
   ``max_seconds`` (default 240 s on CPU, none on CUDA); the best-validation weights are kept.
3. **MTT output.** The paper's linear output is unconstrained; a negative or zero MTT makes
   the Lorentzian undefined, so the linear output ``z`` is mapped to
   ``MTT = mtt_init_s * exp(z)``, clamped to [0.1, 120] s.
4. **Normalisation.** Each subject's curves are divided by the subject maximum (paper):
   the AIF by its own peak, the tissue curves by the 90th percentile of the masked voxel
   peaks (a robust maximum: arteries inside the brain mask would otherwise squash every
   tissue curve to a few percent). The decoder undoes both scales, so CBV/CBF keep units.
   The *encoder* additionally sees each tissue curve divided by its own peak
   (``encoder_input="voxel"``, default; ``"subject"`` is the paper's input): MTT is a shape
   parameter, and removing the CBV x CBF amplitude from the encoder input made training
   converge in a few hundred steps instead of thousands (the CPU time budget).
5. **Discretisation.** The convolution (eq. 6) is the trapezoid (Volterra) rule,
   ``C_hat[n] = dt * sum_k w_k C_a[k] R[n-k]`` with half weights at ``k = 0`` and ``k = n``;
   with sampled curves the left-rectangle rule ``w = 1`` adds ``CBF*dt/2`` to the area
   (research/dsc.md section 3). ``convolution="rectangle"`` reproduces the Ostergaard
   Toeplitz model (matching "inverse-crime" phantoms).
6. **Tmax / delay.** The paper's decoder has no delay term: tracer arrival after the AIF is
   absorbed into a longer MTT, and the paper does not generate Tmax ("future work", section 4).
   The default reproduces that (``estimate_delay=False``); :func:`compute_learned_maps`
   then takes Tmax from oSVD and says so. ``estimate_delay=True`` (an extension, not in the
   paper) adds a second linear output ``delay = softplus(z2)`` s; the decoder convolves with
   the AIF shifted by that delay (linear interpolation) and Tmax = delay, the time of the
   residue maximum.

The model-mismatch floor (research/dsc.md 3, 6.2): the Lorentzian decoder cannot reproduce
exponential or gamma residues exactly; a perfect encoder still misses CBF/MTT by up to
~35 % on such data. The tests assert that band and the ordering of CBF between regions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ParameterError, input_error
from ..nn import (ConvNormAct, GlobalAvgPool, TensorBatchLoader, TrainingHistory, build_model,
                  choose_device, fit, inference_copy, register_architecture, seed_everything, set_threads)
from ..progress import ProgressCallback, as_progress
from . import maps as maps_mod
from .deconvolution import frame_interval

ARCHITECTURE = "dsc.phae"
RESIDUE_SHAPES = ("lorentzian", "exponential", "gamma")
CONVOLUTIONS = ("trapezoid", "rectangle")
PAPER_BASE_FEATURES = 32
CPU_BASE_FEATURES = 8
MTT_RANGE_S = (0.1, 120.0)
TISSUE_SCALE_PERCENTILE = 90.0


def _residue(t: torch.Tensor, mtt: torch.Tensor, shape: str, gamma_shape: int) -> torch.Tensor:
    """R(t) with R(0) = 1 and area MTT; ``t`` (B, T) s >= 0, ``mtt`` (B, 1) s."""
    if shape == "lorentzian":
        return 1.0 / (1.0 + (math.pi * t / (2.0 * mtt)) ** 2)
    if shape == "exponential":
        return torch.exp(-t / mtt)
    if shape == "gamma":
        # survival function of a gamma(shape k, mean MTT) transit-time distribution; for integer
        # k it is the Poisson sum exp(-x) sum_{i<k} x^i / i!, x = k t / MTT (differentiable)
        x = gamma_shape * t / mtt
        term = torch.ones_like(x)
        total = torch.ones_like(x)
        for i in range(1, gamma_shape):
            term = term * x / i
            total = total + term
        return torch.exp(-x) * total
    raise ValueError(f"unknown residue shape {shape!r}")


def causal_convolution(aif: torch.Tensor, residue: torch.Tensor, dt: torch.Tensor,
                       rule: str = "trapezoid") -> torch.Tensor:
    """``dt * sum_k w_k aif[k] residue[n-k]`` for every row, ``(B, T)`` -> ``(B, T)``.

    ``rule="trapezoid"`` halves the weights at ``k = 0`` and ``k = n`` (the Volterra rule),
    ``"rectangle"`` uses ``w = 1`` (the Ostergaard Toeplitz model). FFT-based.
    """
    n = aif.shape[-1]
    size = 1 << int(math.ceil(math.log2(2 * n)))
    full = torch.fft.irfft(torch.fft.rfft(aif, size) * torch.fft.rfft(residue, size), size)[..., :n]
    if rule == "trapezoid":
        full = full - 0.5 * (aif * residue[..., :1] + aif[..., :1] * residue)
    return full * dt


class PHAE(nn.Module):
    """The PHAE: 1D FCN encoder (MTT, optional delay) + analytic residue decoder.

    ``forward(c, ca, gain, dt)`` with ``c``, ``ca`` ``(B, T)`` normalised curves, ``gain``
    ``(B,)`` = (integral ratio) x (AIF scale / tissue scale) and ``dt`` ``(B,)`` s returns
    the reconstruction ``(B, T)`` in the units of ``c``.
    """

    def __init__(self, base_features: int = PAPER_BASE_FEATURES, n_blocks: int = 4,
                 residue: str = "lorentzian", gamma_shape: int = 3, estimate_delay: bool = False,
                 convolution: str = "trapezoid", negative_slope: float = 0.02, mtt_init_s: float = 5.0,
                 encoder_input: str = "voxel"):
        super().__init__()
        if encoder_input not in ("subject", "voxel"):
            raise ValueError(f"encoder_input must be 'subject' or 'voxel', got {encoder_input!r}")
        self.encoder_input = encoder_input
        if residue not in RESIDUE_SHAPES:
            raise ValueError(f"residue must be one of {RESIDUE_SHAPES}, got {residue!r}")
        if convolution not in CONVOLUTIONS:
            raise ValueError(f"convolution must be one of {CONVOLUTIONS}, got {convolution!r}")
        if int(gamma_shape) != gamma_shape or gamma_shape < 1:
            raise ValueError("gamma_shape must be a positive integer")
        self.residue, self.gamma_shape = residue, int(gamma_shape)
        self.estimate_delay, self.convolution = bool(estimate_delay), convolution
        self.mtt_init_s = float(mtt_init_s)
        blocks, channels = [], 2
        for b in range(int(n_blocks)):
            out = int(base_features) * 2 ** b
            blocks.append(ConvNormAct(1, channels, out, kernel_size=3, stride=1, padding=1, norm="batch",
                                      act="leaky_relu", negative_slope=negative_slope))
            channels = out
        self.features = nn.Sequential(*blocks)
        self.pool = GlobalAvgPool(1)
        self.head = nn.Linear(channels, 2 if self.estimate_delay else 1)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(0.1)  # start near MTT = mtt_init_s, delay ~0.7 s

    def encode(self, c: torch.Tensor, ca: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """MTT ``(B,)`` in s and delay ``(B,)`` in s (None without ``estimate_delay``)."""
        if self.encoder_input == "voxel":
            c = c / c.amax(dim=1, keepdim=True).clamp(min=1e-3)
        z = self.head(self.pool(self.features(torch.stack((c, ca), dim=1))))
        log_lo, log_hi = math.log(MTT_RANGE_S[0] / self.mtt_init_s), math.log(MTT_RANGE_S[1] / self.mtt_init_s)
        mtt = self.mtt_init_s * torch.exp(z[:, 0].clamp(log_lo, log_hi))
        delay = nn.functional.softplus(z[:, 1]) if self.estimate_delay else None
        return mtt, delay

    def decode(self, mtt: torch.Tensor, delay: Optional[torch.Tensor], ca: torch.Tensor, gain: torch.Tensor,
               dt: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``c`` from MTT (s), delay (s), normalised AIF ``(B, T)``, gain, dt (s)."""
        n = ca.shape[-1]
        steps = torch.arange(n, device=ca.device, dtype=ca.dtype)
        t = steps[None, :] * dt[:, None]
        if delay is not None:
            # AIF reaching this voxel delay s later: linear interpolation (differentiable in delay)
            position = (steps[None, :] - delay[:, None] / dt[:, None]).clamp(min=0.0)
            lower = position.floor().clamp(max=n - 1)
            frac = position - lower
            lower = lower.long()
            upper = (lower + 1).clamp(max=n - 1)
            ca = torch.gather(ca, 1, lower) * (1 - frac) + torch.gather(ca, 1, upper) * frac
            ca = ca * (steps[None, :] * dt[:, None] >= delay[:, None]).to(ca.dtype)
        residue = _residue(t, mtt[:, None], self.residue, self.gamma_shape)
        amplitude = (gain / mtt)[:, None]  # CBF = CBV / MTT in the normalised units
        return amplitude * causal_convolution(ca, residue, dt[:, None], self.convolution)

    def forward(self, c: torch.Tensor, ca: torch.Tensor, gain: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        mtt, delay = self.encode(c, ca)
        return self.decode(mtt, delay, ca, gain, dt)


register_architecture(ARCHITECTURE, PHAE)


# --------------------------------------------------------------------------------------------
# data preparation


@dataclass
class PHAESubject:
    """One series prepared for the PHAE (curves of the masked voxels, flat order of the mask).

    ``c`` ``(n, T)`` tissue curves / ``tissue_scale``; ``ca`` ``(T,)`` AIF / ``aif_scale``;
    ``ratio`` ``(n,)`` = int C / int C_a (dimensionless, trapezoid); ``dt`` s.
    """

    c: np.ndarray
    ca: np.ndarray
    ratio: np.ndarray
    dt: float
    tissue_scale: float
    aif_scale: float
    n_frames: int

    @property
    def gain(self) -> np.ndarray:
        return self.ratio * (self.aif_scale / self.tissue_scale)


def prepare_subject(concentration: np.ndarray, aif: np.ndarray, times: np.ndarray,
                    mask: Optional[np.ndarray] = None, name: str = "DSC series",
                    integration: str = "trapezoid") -> PHAESubject:
    """Normalise one series for the PHAE.

    Parameters
    ----------
    concentration
        ``[k, j, i, t]`` (or ``(n, t)``) delta R2* in 1/s.
    aif
        ``(t,)`` arterial delta R2* in 1/s.
    times
        ``(t,)`` frame times in s (uniform within 1 %).
    mask
        ``[k, j, i]`` voxels to use (None: all).
    """
    conc = np.asarray(concentration)
    a = np.asarray(aif, dtype=np.float64).ravel()
    dt = frame_interval(times)
    if conc.shape[-1] != a.size:
        raise input_error(name, f"{conc.shape[-1]} frames but the AIF has {a.size}")
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != conc.shape[:-1]:
            raise input_error("mask", f"mask shape {m.shape} differs from the series {conc.shape[:-1]}")
        curves = conc[m]
    else:
        curves = conc.reshape(-1, conc.shape[-1])
    if curves.shape[0] == 0:
        raise input_error("mask", "the mask selects no voxel")
    curves = np.nan_to_num(curves.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    aif_scale = float(a.max())
    if not aif_scale > 0:
        raise input_error("AIF", "the AIF has no positive peak; check the AIF mask")
    peaks = curves.max(axis=1)
    tissue_scale = float(np.percentile(peaks, TISSUE_SCALE_PERCENTILE)) if peaks.size else 0.0
    if not tissue_scale > 0:
        raise input_error(name, "the tissue curves inside the mask never rise above baseline")
    ratio = maps_mod.cbv_map(curves, a, dt, 1.0, 1.0, integration) / 100.0
    return PHAESubject(c=curves / tissue_scale, ca=(a / aif_scale).astype(np.float32),
                       ratio=ratio.astype(np.float32), dt=dt, tissue_scale=tissue_scale,
                       aif_scale=aif_scale, n_frames=a.size)


def _tensors(subjects: Sequence[PHAESubject], index: Optional[Sequence[np.ndarray]] = None):
    cs, cas, gains, dts = [], [], [], []
    for s, subject in enumerate(subjects):
        sel = slice(None) if index is None else index[s]
        c = torch.from_numpy(np.ascontiguousarray(subject.c[sel]))
        n = c.shape[0]
        cs.append(c)
        cas.append(torch.from_numpy(subject.ca).expand(n, -1))
        gains.append(torch.from_numpy(subject.gain[sel].astype(np.float32)))
        dts.append(torch.full((n,), subject.dt, dtype=torch.float32))
    return torch.cat(cs), torch.cat(cas).contiguous(), torch.cat(gains), torch.cat(dts)


# --------------------------------------------------------------------------------------------
# training


@dataclass
class PHAETraining:
    """Result of :func:`train_phae`: the network, its model card and the training history."""

    model: PHAE
    card: dict
    history: TrainingHistory
    seconds: float
    device: str
    extra: dict = field(default_factory=dict)


def default_base_features(device: torch.device) -> int:
    """Encoder width: the paper's 32 on CUDA, 8 on CPU (speed target; module doc, deviation 1)."""
    return PAPER_BASE_FEATURES if device.type == "cuda" else CPU_BASE_FEATURES


def train_phae(subjects: PHAESubject | Sequence[PHAESubject], *, residue: str = "lorentzian",
               gamma_shape: int = 3, estimate_delay: bool = False, convolution: str = "trapezoid",
               base_features: Optional[int] = None, epochs: int = 65, learning_rate: float = 1e-3,
               batch_size: Optional[int] = None, validation_fraction: float = 0.05, early_stopping_patience: int = 6,
               max_seconds: Optional[float] = -1.0, max_training_voxels: Optional[int] = None,
               seed: int = 0, device=None, progress: Optional[ProgressCallback] = None,
               trained_on_phantoms: bool = False, training_description: str = "",
               encoder_input: str = "voxel") -> PHAETraining:
    """Train the PHAE self-supervised on one or more prepared series (:func:`prepare_subject`).

    Parameters
    ----------
    residue, gamma_shape
        Decoder residue: ``"lorentzian"`` (paper), ``"exponential"`` or ``"gamma"`` (integer shape).
    estimate_delay
        Learn a per-voxel bolus delay and report Tmax (extension, module doc deviation 6).
    convolution
        ``"trapezoid"`` (default) or ``"rectangle"`` discretisation of eq. 6.
    base_features
        First-block width; None = 32 on CUDA, 8 on CPU.
    epochs, learning_rate, batch_size
        Adam without weight decay; paper: 65 epochs, 1e-4, 1536 (see deviation 2). ``batch_size``
        None uses 1536 when the series has at least 40 batches of it, else ``n / 40`` (>= 128)
        so that a small series still gets 40 optimisation steps per epoch.
    validation_fraction, early_stopping_patience
        Held-out voxels for early stopping (best weights restored).
    max_seconds
        Wall-clock budget for the training loop; -1 = 240 s on CPU and unlimited on CUDA;
        None = unlimited.
    max_training_voxels
        Train on a random subset of this many voxels per epoch (None: all).
    seed
        Seeds initialisation, the validation split and shuffling.
    trained_on_phantoms, training_description
        Recorded in the model card.
    """
    started = time.perf_counter()
    report = as_progress(progress)
    if isinstance(subjects, PHAESubject):
        subjects = [subjects]
    subjects = list(subjects)
    if not subjects:
        raise ParameterError("dsc", "no series to train on")
    n_frames = subjects[0].n_frames
    dts = [s.dt for s in subjects]
    if any(s.n_frames != n_frames for s in subjects):
        raise ParameterError("dsc", "all training series must have the same number of frames "
                                   f"({sorted({s.n_frames for s in subjects})} found)")
    if max(dts) > 1.01 * min(dts):
        raise ParameterError("dsc", f"all training series must share the frame interval ({sorted(set(dts))} s found)")
    device = choose_device(device)
    if device.type == "cpu":
        set_threads()
    if max_seconds is not None and max_seconds < 0:
        max_seconds = 240.0 if device.type == "cpu" else None
    width = int(base_features) if base_features else default_base_features(device)
    generator = seed_everything(seed)
    rng = np.random.default_rng(seed)

    train_index, val_index = [], []
    for s in subjects:
        order = rng.permutation(s.c.shape[0])
        n_val = int(round(validation_fraction * order.size)) if order.size >= 40 else 0
        val_index.append(np.sort(order[:n_val]))
        train_index.append(np.sort(order[n_val:]))
    train = _tensors(subjects, train_index)
    val = _tensors(subjects, val_index)
    n_train = int(train[0].shape[0])
    if n_train < 2:
        raise ParameterError("mask", "the mask selects fewer than 2 voxels; the PHAE needs many curves")
    if not batch_size:
        batch_size = 1536 if n_train >= 40 * 1536 else max(128, n_train // 40)
    train_loader = TensorBatchLoader(*train, batch_size=batch_size, shuffle=True, generator=generator,
                                     samples_per_epoch=max_training_voxels, drop_last=n_train > batch_size)
    val_loader = TensorBatchLoader(*val, batch_size=8192) if val[0].shape[0] > 0 else None

    model = build_model(ARCHITECTURE, base_features=width, n_blocks=4, residue=residue,
                        gamma_shape=int(gamma_shape), estimate_delay=bool(estimate_delay),
                        convolution=convolution, negative_slope=0.02, mtt_init_s=5.0,
                        encoder_input=encoder_input)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=0.0)

    def step(net: PHAE, batch) -> torch.Tensor:
        c, ca, gain, dt = batch
        return torch.mean(torch.abs(net(c, ca, gain, dt) - c))

    report(0.0, f"training the PHAE on {n_train} curves ({device.type})")
    history = fit(model, train_loader, val_loader, None, optimizer, epochs=epochs,
                  early_stopping_patience=early_stopping_patience,
                  progress=_budget_progress(report.sub(0.0, 0.98), max_seconds),
                  device=device, step_fn=step, max_seconds=max_seconds, progress_every=5)
    model = model.to("cpu").eval()
    seconds = time.perf_counter() - started
    card = {
        "architecture": model.architecture,
        "inputs": {
            "n_frames": int(n_frames),
            "frame_interval_s": float(np.median(dts)),
            "channels": ["tissue delta R2* / subject tissue scale", "AIF delta R2* / AIF peak"],
            "normalisation": (f"per subject: tissue curves divided by the {TISSUE_SCALE_PERCENTILE}th percentile "
                              "of masked voxel peaks, AIF by its peak (Fayolle 2025 2.1.3)"),
            "units": "delta R2* in 1/s before normalisation",
        },
        "outputs": {"mtt": "s", "delay": "s" if estimate_delay else None,
                    "cbv": "mL/100 g (integral ratio, not learned)", "cbf": "mL/100 g/min = 60 CBV / MTT"},
        "training_data": training_description or f"{len(subjects)} series, {n_train} voxel curves (self-supervised)",
        "trained_on_phantoms": bool(trained_on_phantoms),
        "metrics": {"validation_l1": history.best_loss if history.val_loss else None,
                    "train_l1": history.train_loss[history.best_epoch] if history.train_loss else None},
        "training": {"epochs_run": history.epochs_run, "best_epoch": history.best_epoch + 1,
                     "stopped_early": history.stopped_early, "stopped_by_time": history.stopped_by_time,
                     "learning_rate": learning_rate, "batch_size": batch_size, "optimizer": "Adam",
                     "loss": "L1", "seed": seed, "device": device.type, "seconds": round(seconds, 2),
                     "voxels": n_train, "validation_voxels": int(val[0].shape[0])},
        "method": "Fayolle et al. ISBI 2025 physics-informed autoencoder (see perfusionai.dsc.phae)",
    }
    report(1.0, f"PHAE trained in {seconds:.0f} s")
    return PHAETraining(model=model, card=card, history=history, seconds=seconds, device=device.type)


def _budget_progress(report, max_seconds: Optional[float]):
    """Training progress that moves with the epochs or the time budget, whichever is further, and
    never backwards: a run stopped by its budget at 40 % of its epochs reaches 100 % smoothly
    instead of jumping."""
    started = time.perf_counter()
    reached = [0.0]

    def progress(fraction: float, message: str) -> None:
        if max_seconds:
            fraction = max(fraction, (time.perf_counter() - started) / max_seconds)
        reached[0] = max(reached[0], min(1.0, float(fraction)))
        report(reached[0], message)

    return progress


# --------------------------------------------------------------------------------------------
# inference


def check_model_inputs(card: dict, n_frames: int, dt: float, model_name: str = "model") -> None:
    """Refuse a series a DSC model (PHAE or Tmax net) was not trained for: frame count, and frame
    interval (s) within 2 %, as recorded in the card's ``inputs``."""
    inputs = card.get("inputs", {})
    if int(inputs.get("n_frames", -1)) != int(n_frames):
        raise input_error(model_name, f"the model was trained on series of {inputs.get('n_frames')} frames; "
                                      f"this series has {n_frames}")
    trained_dt = float(inputs.get("frame_interval_s", float("nan")))
    if not abs(trained_dt - dt) <= 0.02 * dt:
        raise input_error(model_name, f"the model was trained with a frame interval of {trained_dt:g} s; "
                                      f"this series has {dt:g} s")


def encode_curves(model: PHAE, subject: PHAESubject, device=None, chunk: Optional[int] = None,
                  progress: Optional[ProgressCallback] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Run the encoder only (paper 2.3): MTT ``(n,)`` s and delay ``(n,)`` s or None.

    ``chunk`` curves go through the network at a time; None = 256 on a CPU, where the
    activations of a small chunk (4 MB at 64 channels x 60 frames) stay in cache and the
    encoder runs about 2x faster than with chunks of thousands, and 16384 on CUDA.
    """
    report = as_progress(progress)
    device = choose_device(device)
    if device.type == "cpu":
        set_threads()
    if chunk is None:
        chunk = 256 if device.type == "cpu" else 16384
    net = inference_copy(model, device)
    n = subject.c.shape[0]
    mtt = np.empty(n, np.float32)
    delay = np.empty(n, np.float32) if model.estimate_delay else None
    ca = torch.from_numpy(subject.ca).to(device)
    with torch.inference_mode():
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            c = torch.from_numpy(np.ascontiguousarray(subject.c[start:stop])).to(device)
            m, d = net.encode(c, ca.expand(stop - start, -1))
            mtt[start:stop] = m.float().cpu().numpy()
            if delay is not None:
                delay[start:stop] = d.float().cpu().numpy()
            if stop == n or (start // chunk) % 16 == 15:  # ~40 updates per brain, not one per chunk
                report(stop / n, "PHAE encoder")
    return mtt, delay


def phae_maps(model: PHAE, concentration: np.ndarray, aif: np.ndarray, times: np.ndarray,
              mask: Optional[np.ndarray] = None, kh: float = maps_mod.DEFAULT_KH,
              rho: float = maps_mod.DEFAULT_RHO, card: Optional[dict] = None, device=None,
              progress: Optional[ProgressCallback] = None) -> dict[str, np.ndarray]:
    """CBV, CBF, MTT (and Tmax with a delay-estimating model) maps ``[k, j, i]`` from a trained PHAE.

    Parameters
    ----------
    model
        Trained :class:`PHAE` (e.g. ``load_model(path, expected_architecture="dsc.phae")[0]``).
    concentration, aif, times, mask
        As :func:`prepare_subject` (``[k, j, i, t]`` 1/s, ``(t,)`` 1/s, ``(t,)`` s, ``[k, j, i]``).
    kh, rho
        CBV/CBF scale factors (ARCHITECTURE.md).
    card
        The model card; when given the series must match its frame count and interval.

    Returns
    -------
    dict
        ``cbv`` mL/100 g, ``cbf`` mL/100 g/min, ``mtt`` s, optionally ``tmax``/``delay`` s;
        zero outside the mask.
    """
    conc = np.asarray(concentration)
    shape3 = conc.shape[:-1]
    m = np.ones(shape3, bool) if mask is None else np.asarray(mask, bool)
    subject = prepare_subject(conc, aif, times, m)
    if card is not None:
        check_model_inputs(card, subject.n_frames, subject.dt)
    mtt, delay = encode_curves(model, subject, device=device, progress=progress)
    scale = 100.0 * maps_mod._scale(kh, rho)
    cbv = scale * subject.ratio.astype(np.float64)
    out = {"cbv": cbv, "mtt": mtt.astype(np.float64), "cbf": 60.0 * cbv / mtt}
    if delay is not None:
        out["tmax"] = delay.astype(np.float64)
        out["delay"] = out["tmax"]
    volumes = {}
    for key, values in out.items():
        volume = np.zeros(shape3, np.float32)
        volume[m] = values
        volumes[key] = volume
    return volumes
