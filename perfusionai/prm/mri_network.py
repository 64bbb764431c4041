"""Multi-sequence MRI -> PRM network (Xu et al., adapted from the Seq2Seq / TSF-Seq2Seq design of Han et al.).

Inputs are up to four co-registered inspiratory MRI volumes, in the fixed order
:data:`SEQUENCES` (``vibe``, ``post_vibe``, ``irmax``, ``pbf``), each normalised to
[-1, 1] inside the lung mask (:func:`normalise_sequence`). Any non-empty subset may
be present; an availability mask says which.

Structure (research/prm.md 2.4):

* **Shared encoder**, applied to every available input separately:
  ConvNormAct(1->8, 5x5x5) -> ConvNormAct(8->16, 5x5x5, stride 2) -> ConvNormAct(16->32, 5x5x5, stride 2)
  (batch norm, LeakyReLU 0.2). A 60x256x256 volume gives a 32x15x64x64 latent.
* **Fusion robust to any missing subset**: missing inputs get all-zero features; weights
  ``p = softmax(Linear(m))`` of the availability mask ``m`` are restricted to the available
  inputs and renormalised, ``fused = sum_i m_i p_i f_i / sum_i m_i p_i``; a residual
  refinement convolves the concatenated (zero-filled) features and is gated per channel by
  a sigmoid of ``Linear(m)`` (the availability-conditioned channel attention of TSF-Seq2Seq
  with plain layers, since the target is fixed). In training, random input dropout removes
  inputs per sample (never all), so the network learns every subset.
* **Decoder** (channels 32, 8, 3): ConvNormAct(32->32, 5x5x5) at 1/4 resolution, x2 upsampling,
  ConvNormAct(32->8, 5x5x5) at 1/2 resolution, x2 upsampling, Conv(8->3, 5x5x5) logits at full
  resolution. Output classes in the order of :data:`CLASS_LABELS`: normal, fSAD, emphysema
  (PRM labels 1, 2, 3).
* **Skip connections** (``skips=True``, a deviation from the paper's plain encoder-decoder): the
  fused 1/2- and full-resolution encoder features (fused with the same availability weights)
  are concatenated to the decoder inputs at those resolutions. Without them, class boundaries on
  coarse MRI grids are only as sharp as the 1/4-resolution latent; ``skips=False`` gives the
  paper's structure.

Array axis order everywhere: ``(batch, sequence, k, j, i)`` for inputs, ``(batch, class, k, j, i)``
for logits; volumes are ``[k, j, i]`` (slices, rows, columns) as in :mod:`perfusionai.io`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ConvNormAct, register_architecture

#: Input sequences in network channel order.
SEQUENCES: tuple[str, ...] = ("vibe", "post_vibe", "irmax", "pbf")
#: Display names of the sequences (paper's wording).
SEQUENCE_NAMES = {"vibe": "VIBE", "post_vibe": "post VIBE", "irmax": "IRmax", "pbf": "PBF"}
#: PRM label of each output class (ARCHITECTURE.md PRM labels).
CLASS_LABELS: tuple[int, ...] = (1, 2, 3)
CLASS_KEYS: tuple[str, ...] = ("normal", "fsad", "emph")
#: Default network grid (k, j, i) of the paper: 60 x 256 x 256.
DEFAULT_SHAPE: tuple[int, int, int] = (60, 256, 256)
ARCHITECTURE_NAME = "prm.mri_multiseq"


class MultiSequencePRMNet(nn.Module):
    """Shared encoder, availability-masked fusion, decoder (see module docstring).

    Parameters
    ----------
    n_inputs
        Number of input sequences (4: VIBE, post VIBE, IRmax, PBF).
    encoder_channels
        Channels of the three encoder blocks (8, 16, 32).
    decoder_channels
        Channels of the decoder: (32, 8, 3); the last is the number of classes.
    kernel_size
        Convolution kernel size of every block (5).
    input_dropout
        Probability of removing each available input per sample in training mode (at least
        one input is always kept). 0 disables it.
    negative_slope
        LeakyReLU slope.
    """

    def __init__(self, n_inputs: int = 4, encoder_channels: Sequence[int] = (8, 16, 32),
                 decoder_channels: Sequence[int] = (32, 8, 3), kernel_size: int = 5,
                 input_dropout: float = 0.3, negative_slope: float = 0.2, norm: str = "batch",
                 skips: bool = True) -> None:
        super().__init__()
        self.skips = bool(skips)
        e1, e2, e3 = (int(c) for c in encoder_channels)
        d1, d2, n_classes = (int(c) for c in decoder_channels)
        k = int(kernel_size)
        self.n_inputs = int(n_inputs)
        self.input_dropout = float(input_dropout)
        act = dict(norm=norm, act="leaky_relu", negative_slope=negative_slope)
        self.encoder = nn.ModuleList([
            ConvNormAct(3, 1, e1, k, 1, **act),
            ConvNormAct(3, e1, e2, k, 2, **act),
            ConvNormAct(3, e2, e3, k, 2, **act),
        ])
        self.fusion_logits = nn.Linear(self.n_inputs, self.n_inputs)
        self.refine = ConvNormAct(3, self.n_inputs * e3, e3, 3, 1, **act)
        self.refine_gate = nn.Linear(self.n_inputs, e3)
        self.decoder_low = ConvNormAct(3, e3, d1, k, 1, **act)
        self.decoder_mid = ConvNormAct(3, d1 + (e2 if self.skips else 0), d2, k, 1, **act)
        self.head = nn.Conv3d(d2 + (e1 if self.skips else 0), n_classes, k, padding=k // 2)
        # Start from equal fusion weights and a half-open gate.
        nn.init.zeros_(self.fusion_logits.weight)
        nn.init.zeros_(self.fusion_logits.bias)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # oneDNN's 3D convolution backward is ~8x faster on CPU with channels-last tensors.
        return block(x.contiguous(memory_format=torch.channels_last_3d))

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for block in self.encoder:
            x = self._run(block, x)
            levels.append(x)
        return levels

    def _drop_inputs(self, available: torch.Tensor) -> torch.Tensor:
        """Random input dropout (training only): drop each available input with probability p,
        then restore one random available input where everything was dropped."""
        if not self.training or self.input_dropout <= 0:
            return available
        keep = (torch.rand_like(available) >= self.input_dropout).to(available.dtype) * available
        empty = keep.sum(dim=1) == 0
        if empty.any():
            # choose one of the originally available inputs uniformly
            scores = torch.rand_like(available) * available
            choice = F.one_hot(scores.argmax(dim=1), self.n_inputs).to(available.dtype)
            keep = torch.where(empty[:, None], choice, keep)
        return keep

    def forward(self, x: torch.Tensor, available: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(batch, 3, k, j, i)`` of inputs ``(batch, n_inputs, k, j, i)``.

        ``available`` is ``(batch, n_inputs)`` with 1 for present inputs (default: all);
        missing inputs' channels are never looked at. Any spatial size works: the volume is
        padded to a multiple of 4 internally and the output cropped back.
        """
        if x.dim() != 5 or x.shape[1] != self.n_inputs:
            raise ValueError(f"expected input (batch, {self.n_inputs}, k, j, i), got {tuple(x.shape)}")
        b = x.shape[0]
        if available is None:
            available = torch.ones(b, self.n_inputs, dtype=x.dtype, device=x.device)
        available = available.to(dtype=x.dtype, device=x.device)
        if bool((available.sum(dim=1) == 0).any()):
            raise ValueError("every sample needs at least one available input")
        available = self._drop_inputs(available)

        size = x.shape[2:]
        pad = [(-s) % 4 for s in size]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")

        # Encode each present input with the shared encoder; missing ones stay zero.
        per_input: list[Optional[list[torch.Tensor]]] = []
        for s in range(self.n_inputs):
            present = available[:, s] > 0
            if bool(present.all()):
                levels = self._encode(x[:, s:s + 1])
            elif bool(present.any()):
                idx = present.nonzero(as_tuple=True)[0]
                selected = self._encode(x[idx, s:s + 1])
                levels = [f.new_zeros((b,) + tuple(f.shape[1:])).index_copy(0, idx, f) for f in selected]
            else:
                levels = None
            per_input.append(levels)
        template = next(f for f in per_input if f is not None)
        per_input = [f if f is not None else [torch.zeros_like(t) for t in template] for f in per_input]

        weights = torch.softmax(self.fusion_logits(available), dim=1) * available
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-8)

        def fuse(level: int) -> torch.Tensor:
            stacked_level = torch.stack([f[level] for f in per_input], dim=1)
            return (stacked_level * weights[:, :, None, None, None, None]).sum(dim=1)

        stacked = torch.stack([f[-1] for f in per_input], dim=1)       # (b, n, c, k', j', i')
        fused = (stacked * weights[:, :, None, None, None, None]).sum(dim=1)
        refined = self._run(self.refine, stacked.flatten(1, 2))
        gate = torch.sigmoid(self.refine_gate(available))[:, :, None, None, None]
        latent = fused + gate * refined

        h = self._run(self.decoder_low, latent)
        half = tuple(template[1].shape[2:])
        h = F.interpolate(h, size=half, mode="trilinear", align_corners=False)
        if self.skips:
            h = torch.cat([h, fuse(1)], dim=1)
        h = self._run(self.decoder_mid, h)
        h = F.interpolate(h, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        if self.skips:
            h = torch.cat([h, fuse(0)], dim=1)
        logits = self._run(self.head, h)
        if any(pad):
            logits = logits[:, :, :size[0], :size[1], :size[2]]
        return logits


@register_architecture(ARCHITECTURE_NAME)
def build_prm_mri_network(n_inputs: int = 4, encoder_channels=(8, 16, 32), decoder_channels=(32, 8, 3),
                          kernel_size: int = 5, input_dropout: float = 0.3,
                          negative_slope: float = 0.2, norm: str = "batch", skips: bool = True) -> MultiSequencePRMNet:
    """Registry builder (``perfusionai.nn.build_model("prm.mri_multiseq", ...)``)."""
    return MultiSequencePRMNet(n_inputs, tuple(encoder_channels), tuple(decoder_channels), kernel_size,
                               input_dropout, negative_slope, norm, skips)


# ---------------------------------------------------------------------------------------- preprocessing


def normalise_sequence(volume: np.ndarray, lung_mask: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Map one MRI volume to [-1, 1] inside the lung mask (research/prm.md 2.4, Han et al.).

    Values are clipped to ``[0, 2 * P99]`` with ``P99`` the 99th percentile inside the lung,
    then mapped linearly to [-1, 1]; voxels outside the lung are set to -1 (the paper applies
    the lung mask before normalising). Scaling by a bright-tissue percentile rather than by
    min/max keeps a patient's amount of low-signal (emphysematous) lung from changing the scale.

    Parameters
    ----------
    volume
        ``[k, j, i]`` signal or map (any unit).
    lung_mask
        ``[k, j, i]`` boolean or label map (nonzero = lung).

    Returns
    -------
    numpy.ndarray
        float32 ``[k, j, i]`` in [-1, 1].
    """
    vol = np.asarray(volume, dtype=np.float32)
    lung = np.asarray(lung_mask) != 0
    values = vol[lung]
    values = values[np.isfinite(values)]
    scale = float(np.percentile(values, percentile)) if values.size else 0.0
    if not scale > 0:
        scale = float(np.abs(values).max()) if values.size and np.abs(values).max() > 0 else 1.0
    out = np.clip(np.nan_to_num(vol, nan=0.0), 0.0, 2.0 * scale) / scale - 1.0
    out[~lung] = -1.0
    return out.astype(np.float32)


def crop_pad_box(shape: Sequence[int], target: Sequence[int], centre: Sequence[float]
                 ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices that place a ``target``-sized window centred on ``centre`` (voxel ``k, j, i``).

    Returns ``(source, dest)``: ``window[dest] = volume[source]`` crops/pads a volume of
    ``shape`` into the window; ``volume[source] = window[dest]`` pastes back. Axes shorter
    than the target are padded (centred), longer ones cropped around ``centre``.
    """
    src, dst = [], []
    for n, t, c in zip(shape, target, centre):
        n, t = int(n), int(t)
        if n <= t:
            offset = (t - n) // 2
            src.append(slice(0, n))
            dst.append(slice(offset, offset + n))
        else:
            start = int(round(float(c) - t / 2.0))
            start = min(max(start, 0), n - t)
            src.append(slice(start, start + t))
            dst.append(slice(0, t))
    return tuple(src), tuple(dst)


def lung_centre(lung_mask: np.ndarray) -> tuple[float, float, float]:
    """Centre ``(k, j, i)`` of the lung mask's bounding box (the volume centre when empty)."""
    lung = np.asarray(lung_mask) != 0
    if not lung.any():
        return tuple((s - 1) / 2.0 for s in lung.shape)
    idx = [np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple((float(i[0]) + float(i[-1])) / 2.0 for i in idx)


def prepare_inputs(volumes: dict, lung_mask: np.ndarray, target_shape: Sequence[int],
                   sequences: Sequence[str] = SEQUENCES) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """Normalise, crop/pad and stack the available sequences.

    Parameters
    ----------
    volumes
        ``{sequence name: [k, j, i] array or None}``; absent or None = missing.
    lung_mask
        ``[k, j, i]`` lung mask on the same grid.
    target_shape
        Network grid ``(k, j, i)``, e.g. (60, 256, 256).

    Returns
    -------
    (x, available, source, dest)
        ``x``: float32 ``(n_sequences, *target_shape)`` (missing channels zero),
        ``available``: float32 ``(n_sequences,)``, and the crop/pad slices of
        :func:`crop_pad_box`.
    """
    lung = np.asarray(lung_mask) != 0
    source, dest = crop_pad_box(lung.shape, target_shape, lung_centre(lung))
    x = np.zeros((len(sequences),) + tuple(int(t) for t in target_shape), dtype=np.float32)
    available = np.zeros(len(sequences), dtype=np.float32)
    for s, name in enumerate(sequences):
        vol = volumes.get(name)
        if vol is None:
            continue
        norm = normalise_sequence(vol, lung)
        x[s].fill(-1.0)
        x[s][dest] = norm[source]
        available[s] = 1.0
    return x, available, source, dest


def crop_labels(labels: np.ndarray, target_shape: Sequence[int], source: tuple, dest: tuple,
                fill: int = 0) -> np.ndarray:
    """Crop/pad a ``[k, j, i]`` label map with the slices of :func:`prepare_inputs`."""
    out = np.full(tuple(int(t) for t in target_shape), fill, dtype=np.asarray(labels).dtype)
    out[dest] = np.asarray(labels)[source]
    return out
