"""The 3D attention residual network (ARNN) of DL-CTPM (Ren et al. 2021, Fig. 2b/2c).

Input ``(batch, 1, K, J, I)``: the enhanced CT of one lung on its network grid
(K, J, I divisible by 8; the paper's 128 x 64 x 64). Output ``(batch, 1, K, J, I)``:
the predicted normalised perfusion in [0, 1] (sigmoid).

What the paper fixes and this network keeps: a 3D encoder-decoder; residual
convolution blocks (ResConv); three stride-2 strided convolutions (StriConv,
2 x 2 x 2) halving the map S1 -> S2 -> S3 -> S4 and transposed convolutions
(ConvT) recovering it; two skip-attention modules "similar to the attention
U-Net"; the ROI attention module (conv to 4 channels, threshold at 0, sigmoid
of the binary map, spatial multiplication); 5 x 5 x 5 kernels; at most 128
channels; every convolution followed by batch norm, PReLU (initial slope 0.2)
and dropout 0.1; a sigmoid last layer.

Decisions on what the paper leaves open (deviations are named as such):

* **Channel ladder** 16-32-64-128 at S1-S4 (``channels``), one ResConv per
  encoder scale and one per decoder scale, plus a 5^3 stem convolution 1 -> 16.
* **ResConv** = conv-BN-PReLU-dropout, conv-BN, add the shortcut (identity,
  or 1^3 conv + BN when the channel count changes), PReLU (ResNet's order; the
  second convolution's PReLU comes after the addition, and its dropout is
  dropped so the residual sum is not masked twice).
* **StriConv and ConvT** use 2^3 kernels with stride 2 (the text's "2 x 2 x 2
  strided convolution"; "all filters 5 x 5 x 5" is read as all other convolutions).
* **Skips** are concatenated with the up-sampled decoder features; the two
  attention gates sit on the two deepest skips (S3 and S2), the S1 skip is
  plain. Gates are Oktay's additive gates with 1^3 projections to half the
  skip channels, ReLU and a sigmoid coefficient; the gating signal is the
  decoder feature after ConvT (same resolution as the skip).
* **ROI attention** is applied to the last decoder feature map: conv 5^3 to 4
  channels (+ BN, PReLU, dropout), ``binary = (f > 0)``, ``f * sigmoid(binary)``;
  the threshold has no gradient, so gradients flow through ``f`` only.
* **Last layer**: the paper's "sigmoid sums the results of the previous
  layers" is a 1^3 convolution 4 -> 1 (a learned weighted sum) and a sigmoid.
* Parameter counts: 7,657,557 at channels 16-32-64-128 (the default), 1,917,813 at 8-16-32-64
  (the reduced CPU configuration of the tests and the demo); the model card records the count.
* Dropout is element-wise (``nn.Dropout3d`` would drop whole channels; the
  paper gives a rate only). Dropout layers use the shared
  :class:`perfusionai.nn.blocks.ConvNormAct` (conv -> BN -> PReLU -> dropout).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn.blocks import ConvNormAct, count_parameters
from ..nn.modelfile import register_architecture

#: Registry name (a dotted path below ``perfusionai`` so :func:`perfusionai.nn.load_model` finds it).
ARCHITECTURE = "ctpm.arnn"


class _ElementDropoutConvNormAct(ConvNormAct):
    """ConvNormAct with element-wise dropout (the shared block uses channel dropout in 3D)."""

    def __init__(self, *args, dropout: float = 0.0, **kwargs) -> None:
        super().__init__(*args, dropout=0.0, **kwargs)
        if dropout > 0:
            self.append(nn.Dropout(dropout))


def _cna(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding=None, dropout: float = 0.1,
         prelu_init: float = 0.2, act: str | None = "prelu") -> ConvNormAct:
    return _ElementDropoutConvNormAct(3, in_ch, out_ch, kernel, stride, padding, norm="batch", act=act,
                                      prelu_init=prelu_init, dropout=dropout)


class ResConv(nn.Module):
    """Residual block: ``PReLU(conv_bn(cna(x)) + shortcut(x))``; spatial size kept."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dropout: float, prelu_init: float) -> None:
        super().__init__()
        self.first = _cna(in_ch, out_ch, kernel, dropout=dropout, prelu_init=prelu_init)
        self.second = _cna(out_ch, out_ch, kernel, dropout=0.0, act=None)
        self.shortcut = (nn.Identity() if in_ch == out_ch
                         else _cna(in_ch, out_ch, 1, padding=0, dropout=0.0, act=None))
        self.act = nn.PReLU(out_ch, init=prelu_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.second(self.first(x)) + self.shortcut(x))


class UpConv(nn.Sequential):
    """ConvT 2^3 stride 2 -> BN -> PReLU -> dropout: doubles each spatial size."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, prelu_init: float) -> None:
        layers = [nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2, bias=False), nn.BatchNorm3d(out_ch),
                  nn.PReLU(out_ch, init=prelu_init)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class SkipAttention(nn.Module):
    """Additive attention gate (Oktay et al. 2018) on a skip connection.

    ``skip * sigmoid(psi(relu(Wx skip + Wg gate)))`` with 1^3 projections;
    ``skip`` and ``gate`` have the same spatial size.
    """

    def __init__(self, skip_ch: int, gate_ch: int, inter_ch: int) -> None:
        super().__init__()
        self.wx = nn.Sequential(nn.Conv3d(skip_ch, inter_ch, 1, bias=False), nn.BatchNorm3d(inter_ch))
        self.wg = nn.Sequential(nn.Conv3d(gate_ch, inter_ch, 1, bias=False), nn.BatchNorm3d(inter_ch))
        self.psi = nn.Sequential(nn.Conv3d(inter_ch, 1, 1, bias=False), nn.BatchNorm3d(1), nn.Sigmoid())

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * self.psi(torch.relu(self.wx(skip) + self.wg(gate)))


class ROIAttention(nn.Module):
    """Fig. 2c: conv to ``roi_channels``, binary map ``f > 0``, ``f * sigmoid(binary)``."""

    def __init__(self, in_ch: int, roi_channels: int, kernel: int, dropout: float, prelu_init: float) -> None:
        super().__init__()
        self.conv = _cna(in_ch, roi_channels, kernel, dropout=dropout, prelu_init=prelu_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        binary = (features > 0).to(features.dtype)  # no gradient through the threshold
        return features * torch.sigmoid(binary)


class ARNN(nn.Module):
    """Attention residual network; see the module docstring for every design decision.

    Parameters
    ----------
    channels
        Channels at S1..S4 (four entries, each <= 128).
    kernel_size
        Kernel of every non-strided convolution (paper: 5).
    dropout
        Dropout rate after every convolution (paper: 0.1).
    prelu_init
        Initial PReLU slope (paper: 0.2).
    roi_channels
        Channels of the ROI attention map (paper: 4).
    attention_skips
        How many of the deepest skips carry an attention gate (paper: 2).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128), kernel_size: int = 5,
                 dropout: float = 0.1, prelu_init: float = 0.2, roi_channels: int = 4,
                 attention_skips: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 4:
            raise ValueError("ARNN needs four channel counts (S1..S4)")
        if max(channels) > 128:
            raise ValueError("the paper caps the channel count at 128")
        self.hparams = dict(channels=channels, kernel_size=int(kernel_size), dropout=float(dropout),
                            prelu_init=float(prelu_init), roi_channels=int(roi_channels),
                            attention_skips=int(attention_skips), in_channels=int(in_channels))
        k, p, a = kernel_size, dropout, prelu_init
        self.stem = _cna(in_channels, channels[0], k, dropout=p, prelu_init=a)
        self.encoders = nn.ModuleList(ResConv(c, c, k, p, a) for c in channels)
        self.downs = nn.ModuleList(_cna(channels[s], channels[s + 1], 2, stride=2, padding=0, dropout=p,
                                        prelu_init=a) for s in range(3))
        self.ups = nn.ModuleList(UpConv(channels[s + 1], channels[s], p, a) for s in range(3))
        self.gates = nn.ModuleDict({
            str(s): SkipAttention(channels[s], channels[s], max(channels[s] // 2, 1))
            for s in range(3) if s >= 3 - attention_skips})
        self.decoders = nn.ModuleList(ResConv(2 * channels[s], channels[s], k, p, a) for s in range(3))
        self.roi = ROIAttention(channels[0], roi_channels, k, p, a)
        self.head = nn.Conv3d(roi_channels, 1, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid output ``(batch, 1, K, J, I)``."""
        if any(n % 8 for n in x.shape[2:]):
            raise ValueError(f"ARNN input size {tuple(x.shape[2:])} must be divisible by 8")
        x = self.stem(x)
        skips = []
        for s in range(3):
            x = self.encoders[s](x)
            skips.append(x)
            x = self.downs[s](x)
        x = self.encoders[3](x)
        for s in (2, 1, 0):
            up = self.ups[s](x)
            skip = skips[s]
            if str(s) in self.gates:
                skip = self.gates[str(s)](skip, up)
            x = self.decoders[s](torch.cat([up, skip], dim=1))
        return self.head(self.roi(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


@register_architecture(ARCHITECTURE)
def build_arnn(**hparams) -> ARNN:
    """Builder used by the model registry (``architecture = "ctpm.arnn"``)."""
    _check_sizes(hparams)
    return ARNN(**hparams)


def _check_sizes(hparams: dict) -> None:
    """Refuse channel counts and kernel sizes that are not positive whole numbers (ValueError)."""
    channels = hparams.get("channels", (16, 32, 64, 128))
    if not isinstance(channels, (list, tuple)) or not channels or any(
            isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in channels):
        raise ValueError(f"channels must be positive whole numbers, got {channels!r}")
    for key in ("kernel_size", "in_channels", "roi_channels"):
        value = hparams.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive whole number, got {value!r}")


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 3: binary cross-entropy averaged over the lung voxels (``mask`` > 0) only.

    ``logits``, ``target`` (discretised perfusion in [0, 1]) and ``mask`` have the
    same shape ``(batch, 1, K, J, I)``. Computed from logits for numerical
    stability (identical to BCE on the sigmoid output).
    """
    weight = (mask > 0).to(logits.dtype)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def parameter_count(model: nn.Module) -> int:
    return count_parameters(model)


#: Registry name of the optional second architecture (MONAI's attention U-Net).
ATTENTION_UNET = "ctpm.attention_unet"


class AttentionUNet(nn.Module):
    """MONAI's ``AttentionUnet`` (Oktay et al. 2018) as a DL-CTPM baseline, with a sigmoid output.

    Not the paper's network: conv-BN-ReLU blocks (no residuals, no PReLU), attention
    gates on every skip, no ROI attention. Same inputs/outputs as :class:`ARNN`
    (``logits`` and a sigmoid ``forward``), 5^3 kernels, dropout 0.1, strides 2 x 3.
    Needs the ``monai`` package (``pip install monai``; it uses the installed torch).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128), kernel_size: int = 5,
                 dropout: float = 0.1, in_channels: int = 1) -> None:
        super().__init__()
        try:
            from monai.networks.nets import AttentionUnet as MonaiAttentionUnet
        except ImportError:
            from ..errors import PerfusionAIError

            raise PerfusionAIError("the attention U-Net architecture needs the 'monai' package "
                                   "(pip install monai)") from None
        channels = [int(c) for c in channels]
        if len(channels) != 4 or max(channels) > 128:
            raise ValueError("four channel counts, each <= 128, are needed")
        self.hparams = dict(channels=channels, kernel_size=int(kernel_size), dropout=float(dropout),
                            in_channels=int(in_channels))
        self.net = MonaiAttentionUnet(spatial_dims=3, in_channels=in_channels, out_channels=1, channels=channels,
                                      strides=(2, 2, 2), kernel_size=kernel_size, up_kernel_size=kernel_size,
                                      dropout=dropout)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if any(n % 8 for n in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} must be divisible by 8")
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


@register_architecture(ATTENTION_UNET)
def build_attention_unet(**hparams) -> AttentionUNet:
    """Builder used by the model registry (``architecture = "ctpm.attention_unet"``)."""
    _check_sizes(hparams)
    return AttentionUNet(**hparams)


#: Architectures ``perfusionai ctpm train --architecture`` offers.
ARCHITECTURES = {"arnn": ARCHITECTURE, "attention-unet": ATTENTION_UNET}
