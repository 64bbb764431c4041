"""Loss of the MRI -> PRM network (Xu et al.): 0.3 CE + 0.3 fuzzy CE + 0.4 mean absolute %PRM error.

* ``L_CE``: voxel-wise cross-entropy of the 3-class prediction (normal, fSAD, emphysema) against the
  reference PRM.
* ``L_fuzzy``: cross-entropy against *fuzzy* labels: the one-hot reference blurred by a Gaussian
  filter of size 3x9x9 voxels (k, j, i) and renormalised to sum to 1 over the classes, which
  softens partial-volume and registration errors at class boundaries. The Gaussian's sigma is
  ``(size - 1) / 4`` per axis (0.5 x 2 x 2 voxels), so the kernel spans +-2 sigma.
* ``L_PRM``: ``mean_c |%pred_c - %GT_c|`` over the three classes, with ``%pred_c`` the mean softmax
  probability of class ``c`` over the valid voxels of each sample (differentiable) and ``%GT_c`` the
  reference fraction; computed per sample and averaged over the batch. Fractions (0-1) are used
  instead of percent so that the three terms have comparable size.

Uncategorized voxels (PRM label 4), voxels outside the lung and excluded voxels (label 0) are
ignored by all three terms: they are not voxels of the CE sums, they do not feed the blurred
labels, and they are not in the %PRM denominators.

Tensor axis order: logits ``(batch, 3, k, j, i)``; reference ``(batch, k, j, i)`` PRM labels 0-4.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: PRM label of each output channel (normal, fSAD, emphysema).
CLASS_LABELS = (1, 2, 3)
DEFAULT_WEIGHTS = (0.3, 0.3, 0.4)
DEFAULT_BLUR_SIZE = (3, 9, 9)


def gaussian_kernel_1d(size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1D Gaussian of ``size`` taps."""
    if size <= 1 or sigma <= 0:
        return torch.ones(1, device=device, dtype=dtype)
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def blur_labels(one_hot: torch.Tensor, size: Sequence[int] = DEFAULT_BLUR_SIZE) -> torch.Tensor:
    """Separable Gaussian blur of ``(batch, classes, k, j, i)`` maps with a ``size`` kernel
    (zero padding), sigma ``(size - 1) / 4`` per axis."""
    c = one_hot.shape[1]
    out = one_hot
    for axis, n in enumerate(size):
        n = int(n)
        if n <= 1:
            continue
        g = gaussian_kernel_1d(n, (n - 1) / 4.0, one_hot.device, one_hot.dtype)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = n
        weight = g.reshape(shape).repeat(c, 1, 1, 1, 1)
        padding = [0, 0, 0]
        padding[axis] = n // 2
        out = F.conv3d(out, weight, padding=tuple(padding), groups=c)
    return out


def fuzzy_labels(reference: torch.Tensor, size: Sequence[int] = DEFAULT_BLUR_SIZE) -> torch.Tensor:
    """Fuzzy class probabilities ``(batch, 3, k, j, i)`` of a PRM label map ``(batch, k, j, i)``.

    One-hot of labels 1-3 (other labels contribute nothing), blurred with :func:`blur_labels`
    and renormalised over the classes; voxels with no valid neighbour get all zeros.
    """
    one_hot = torch.stack([(reference == lab) for lab in CLASS_LABELS], dim=1).to(torch.float32)
    blurred = blur_labels(one_hot, size)
    total = blurred.sum(dim=1, keepdim=True)
    return torch.where(total > 1e-6, blurred / total.clamp_min(1e-6), torch.zeros_like(blurred))


def prm_loss_terms(logits: torch.Tensor, reference: torch.Tensor,
                   blur_size: Sequence[int] = DEFAULT_BLUR_SIZE) -> dict[str, torch.Tensor]:
    """The three loss terms (each a scalar tensor): ``ce``, ``fuzzy``, ``prm``.

    A batch without any valid voxel gives zeros (and no gradient) rather than NaN.
    """
    reference = reference.long()
    valid = (reference >= 1) & (reference <= 3)                       # (b, k, j, i)
    log_p = F.log_softmax(logits.float(), dim=1)
    n_valid = valid.sum()
    if int(n_valid) == 0:
        zero = logits.sum() * 0.0
        return {"ce": zero, "fuzzy": zero, "prm": zero}
    target = (reference - 1).clamp(0, 2)
    ce_map = -log_p.gather(1, target[:, None]).squeeze(1)
    ce = (ce_map * valid).sum() / n_valid

    soft = fuzzy_labels(reference, blur_size)
    fuzzy_map = -(soft * log_p).sum(dim=1)
    fuzzy = (fuzzy_map * valid).sum() / n_valid

    probs = log_p.exp()
    valid_f = valid.to(probs.dtype)
    per_sample = valid_f.flatten(1).sum(dim=1)                        # (b,)
    has = per_sample > 0
    pred_frac = (probs * valid_f[:, None]).flatten(2).sum(dim=2) / per_sample.clamp_min(1)[:, None]
    ref_frac = torch.stack([((reference == lab) & valid).flatten(1).sum(dim=1) for lab in CLASS_LABELS],
                           dim=1).to(probs.dtype) / per_sample.clamp_min(1)[:, None]
    prm_err = (pred_frac - ref_frac).abs().mean(dim=1)                # (b,)
    prm = (prm_err * has).sum() / has.sum().clamp_min(1)
    return {"ce": ce, "fuzzy": fuzzy, "prm": prm}


def prm_loss(logits: torch.Tensor, reference: torch.Tensor,
             weights: Sequence[float] = DEFAULT_WEIGHTS,
             blur_size: Sequence[int] = DEFAULT_BLUR_SIZE) -> torch.Tensor:
    """``w_ce * L_CE + w_fuzzy * L_fuzzy + w_prm * L_PRM`` (paper: 0.3, 0.3, 0.4)."""
    terms = prm_loss_terms(logits, reference, blur_size)
    w_ce, w_fuzzy, w_prm = (float(w) for w in weights)
    return w_ce * terms["ce"] + w_fuzzy * terms["fuzzy"] + w_prm * terms["prm"]
