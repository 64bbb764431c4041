"""Evaluation the learned-DSC papers report: ROI ratios, glioma grading (ROC/AUC with bootstrap
CI, Youden cut-off, sensitivity/specificity, Mann-Whitney U) and the noise-robustness study.

Statistics come from :mod:`perfusionai.metrics` (lead-owned); this module adds the DSC-specific
pieces: the lesion / contralateral normal-appearing white matter ratio of Fayolle et al. (mean of
the map in each ROI), the grading table, and the degradation of a series to a target SNR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..deps import require
from ..errors import ParameterError, input_error
from .. import metrics


def roi_ratio(values: np.ndarray, lesion: np.ndarray, reference: np.ndarray, statistic: str = "mean",
              name: str = "map") -> float:
    """Mean (or median) of ``values`` in ``lesion`` divided by that in ``reference``.

    All arrays ``[k, j, i]``; non-finite voxels are ignored. Fayolle et al. use the mean CBF of
    the tumour over the mean of contralateral normal-appearing white matter.
    """
    v = np.asarray(values, dtype=np.float64)
    les, ref = np.asarray(lesion, bool), np.asarray(reference, bool)
    if les.shape != v.shape or ref.shape != v.shape:
        raise input_error(name, f"map shape {v.shape} differs from the ROI shapes {les.shape} / {ref.shape}")
    reduce = {"mean": np.mean, "median": np.median}.get(statistic)
    if reduce is None:
        raise ValueError(f"statistic must be mean or median, got {statistic!r}")
    a, b = v[les & np.isfinite(v)], v[ref & np.isfinite(v)]
    if a.size == 0:
        raise input_error(name, "the lesion ROI contains no voxel with a finite value")
    if b.size == 0:
        raise input_error(name, "the reference ROI contains no voxel with a finite value")
    denominator = float(reduce(b))
    if not denominator > 0:
        raise input_error(name, f"the reference ROI {statistic} is {denominator:g}; cannot form a ratio")
    return float(reduce(a)) / denominator


@dataclass
class GradingResult:
    """Discrimination of two groups (label 1 = positive, e.g. high-grade glioma) by a score."""

    n_positive: int
    n_negative: int
    auc: float
    auc_ci: tuple[float, float]
    cutoff: float
    sensitivity: float
    specificity: float
    accuracy: float
    youden_j: float
    mann_whitney_u: float
    mann_whitney_p: float
    fpr: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    tpr: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict:
        return {"n_positive": self.n_positive, "n_negative": self.n_negative, "auc": self.auc,
                "auc_ci95": list(self.auc_ci), "youden_cutoff": self.cutoff, "youden_j": self.youden_j,
                "sensitivity": self.sensitivity, "specificity": self.specificity, "accuracy": self.accuracy,
                "mann_whitney_u": self.mann_whitney_u, "mann_whitney_p": self.mann_whitney_p,
                "rule": "score >= cutoff is called positive",
                "roc": {"fpr": self.fpr.tolist(), "tpr": self.tpr.tolist()}}


def grade(scores: Sequence[float], labels: Sequence[int], n_bootstrap: int = 2000, seed: int = 0) -> GradingResult:
    """ROC AUC (percentile-bootstrap 95 % CI over subjects), Youden cut-off with its sensitivity,
    specificity and accuracy, and the two-sided Mann-Whitney U of positives vs negatives."""
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels).astype(int).ravel()
    if s.size != y.size:
        raise ValueError("scores and labels differ in length")
    if not np.all(np.isfinite(s)):
        raise input_error("grading table", "some scores are not finite")
    if set(np.unique(y)) != {0, 1}:
        raise input_error("grading table", "grading needs both classes (label 0 and 1) among the subjects")
    roc = metrics.roc_auc(s, y, n_bootstrap=n_bootstrap, seed=seed)
    yj = metrics.youden(s, y)
    u, p = metrics.mann_whitney(s[y == 1], s[y == 0])
    called = s >= yj.cutoff
    accuracy = float(np.mean(called == (y == 1)))
    return GradingResult(n_positive=int((y == 1).sum()), n_negative=int((y == 0).sum()), auc=roc.auc,
                         auc_ci=(roc.ci_low, roc.ci_high), cutoff=yj.cutoff, sensitivity=yj.sensitivity,
                         specificity=yj.specificity, accuracy=accuracy, youden_j=yj.j, mann_whitney_u=u,
                         mann_whitney_p=p, fpr=np.asarray(roc.fpr), tpr=np.asarray(roc.tpr))


def roc_png(results: dict, path, title: str = "ROC") -> None:
    """One ROC curve per entry of ``{name: GradingResult}`` with AUC in the legend."""
    matplotlib = require("matplotlib", "the ROC figure")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "the ROC figure")

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    for name, res in results.items():
        ax.step(res.fpr, res.tpr, where="post",
                label=f"{name}: AUC {res.auc:.2f} ({res.auc_ci[0]:.2f}-{res.auc_ci[1]:.2f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------ noise study


def baseline_snr(signal: np.ndarray, baseline_frames: int, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-voxel SNR = mean / standard deviation of the pre-bolus frames (Fayolle 2.3).

    ``signal`` ``[k, j, i, t]``; returns ``[k, j, i]`` (or the masked voxels).
    """
    s = np.asarray(signal, dtype=np.float64)[..., :baseline_frames]
    if mask is not None:
        s = s[np.asarray(mask, bool)]
    sd = s.std(axis=-1, ddof=1)
    return np.where(sd > 0, s.mean(axis=-1) / np.where(sd > 0, sd, 1.0), np.inf)


def degrade_to_snr(signal: np.ndarray, snr: float, baseline_frames: int, seed: int = 0) -> np.ndarray:
    """Add Gaussian noise so that every voxel's baseline SNR (mean / SD of the first
    ``baseline_frames`` frames) becomes ``snr``; voxels already noisier are left as they are.

    ``signal`` ``[k, j, i, t]`` (not modified); returns float32 of the same shape.
    """
    if not snr > 0:
        raise ParameterError("snr", f"SNR must be positive, got {snr}")
    s = np.asarray(signal, dtype=np.float32)
    base = s[..., :baseline_frames].astype(np.float64)
    mean = base.mean(axis=-1)
    current = base.std(axis=-1, ddof=1) if baseline_frames > 1 else np.zeros_like(mean)
    wanted = np.abs(mean) / float(snr)
    sigma = np.sqrt(np.clip(wanted ** 2 - current ** 2, 0.0, None)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return s + sigma[..., None] * rng.standard_normal(s.shape, dtype=np.float32)
