"""Evaluation metrics shared by every domain.

Overlap (Dice), agreement (Pearson, Spearman, Bland-Altman), classification
(ROC/AUC with bootstrap CI, Youden cut-off, Mann-Whitney U), image similarity
(3D SSIM with the settings pinned in ``research/translation.md``) and the
bias/dispersion indices of the diffusion-relaxation paper. Thin, tested wrappers
over scipy and scikit-learn where those already do the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


# ------------------------------------------------------------------------------ overlap


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A and B| / (|A| + |B|) of two boolean arrays of the same shape.

    Two empty sets give 1.0 (perfect agreement on absence).
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


# ------------------------------------------------------------------------------ agreement


def pearson(x, y) -> tuple[float, float]:
    """Pearson correlation ``(r, two-sided p)`` of two 1D samples."""
    from scipy import stats

    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.size < 3:
        raise ValueError("Pearson r needs at least 3 pairs")
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # undefined for a constant sample (scipy warns and gives NaN)
        return float("nan"), float("nan")
    res = stats.pearsonr(x, y)
    return float(res[0]), float(res[1])


def spearman(x, y) -> float:
    """Spearman rank correlation of two 1D samples (NaN when either is constant)."""
    from scipy import stats

    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.size and (np.ptp(x) == 0 or np.ptp(y) == 0):
        return float("nan")
    return float(stats.spearmanr(x, y)[0])


@dataclass
class BlandAltman:
    """Bland-Altman agreement of ``a`` against ``b`` (differences ``a - b``)."""

    mean_difference: float
    sd_difference: float
    lower_limit: float
    upper_limit: float
    n: int

    def to_dict(self) -> dict:
        return dict(mean_difference=self.mean_difference, sd_difference=self.sd_difference,
                    lower_limit=self.lower_limit, upper_limit=self.upper_limit, n=self.n)


def bland_altman(a, b) -> BlandAltman:
    """Mean difference and 95 % limits of agreement (mean +- 1.96 SD, sample SD)."""
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    d = a - b
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return BlandAltman(mean, sd, mean - 1.96 * sd, mean + 1.96 * sd, int(d.size))


# ------------------------------------------------------------------------------ classification


@dataclass
class ROCResult:
    """ROC analysis of a score against binary labels (1 = positive, e.g. high grade)."""

    auc: float
    ci_low: float
    ci_high: float
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_auc(scores, labels, n_bootstrap: int = 2000, seed: int = 0, ci: float = 0.95) -> ROCResult:
    """Area under the ROC curve with a percentile bootstrap confidence interval.

    Bootstrap resamples subjects with replacement; resamples that contain one
    class only are skipped.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    scores = np.asarray(scores, dtype=float).ravel()
    labels = np.asarray(labels).astype(int).ravel()
    if len(np.unique(labels)) != 2:
        raise ValueError("ROC needs both classes among the labels")
    auc = float(roc_auc_score(labels, scores))
    fpr, tpr, thr = roc_curve(labels, scores)
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, scores.size, size=(n_bootstrap, scores.size))
    # all replicates at once: AUC = Mann-Whitney U / (n1 n0) from the within-replicate ranks (ties averaged,
    # as roc_auc_score counts them one half)
    lab = labels[idx]
    n1 = lab.sum(axis=1)
    n0 = lab.shape[1] - n1
    both = (n1 > 0) & (n0 > 0)
    ranks = rankdata(scores[idx[both]], axis=1)
    boot = ((ranks * lab[both]).sum(axis=1) - n1[both] * (n1[both] + 1) / 2) / (n1[both] * n0[both])
    alpha = (1 - ci) / 2
    lo, hi = (np.quantile(boot, [alpha, 1 - alpha]) if boot.size else (np.nan, np.nan))
    return ROCResult(auc, float(lo), float(hi), fpr, tpr, thr)


@dataclass
class YoudenResult:
    cutoff: float
    sensitivity: float
    specificity: float
    j: float


def youden(scores, labels) -> YoudenResult:
    """Cut-off maximising sensitivity + specificity - 1 (a score >= cut-off is called positive)."""
    scores = np.asarray(scores, dtype=float).ravel()
    labels = np.asarray(labels).astype(int).ravel()
    candidates = np.unique(scores)
    pos = labels == 1
    neg = ~pos
    called = scores[None, :] >= candidates[:, None]  # (n_candidates, n_subjects)
    sens = (called & pos[None, :]).sum(1) / max(pos.sum(), 1)
    spec = (~called & neg[None, :]).sum(1) / max(neg.sum(), 1)
    j = sens + spec - 1
    best = int(np.argmax(j))
    return YoudenResult(float(candidates[best]), float(sens[best]), float(spec[best]), float(j[best]))


def mann_whitney(a, b) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test: ``(U of a, p)``."""
    from scipy import stats

    res = stats.mannwhitneyu(np.asarray(a, float), np.asarray(b, float), alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


# ------------------------------------------------------------------------------ image similarity


def ssim3d(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None,
           sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03, data_range: float = 1.0,
           truncate: float = 3.5) -> float:
    """Structural similarity of two 3D maps with the settings pinned for DL-CTPM.

    Gaussian window (``sigma`` voxels, truncated at ``truncate`` sigma, i.e. an
    11-voxel window for 1.5), K1 = 0.01, K2 = 0.03, population (biased)
    covariance, data range 1. With ``mask`` (the lung), both images are clipped
    to [0, 1], voxels outside the mask are set to 0 and SSIM is computed on the
    mask's bounding box. As in scikit-image, the mean is taken over the volume
    after cropping half a window at each border (when the box is large enough).
    Arrays are ``[k, j, i]``.
    """
    from scipy import ndimage

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            raise ValueError("SSIM mask is empty")
        a = np.where(mask, np.clip(a, 0, 1), 0.0)
        b = np.where(mask, np.clip(b, 0, 1), 0.0)
        box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(mask))
        a, b = a[box], b[box]

    def blur(x):
        return ndimage.gaussian_filter(x, sigma=sigma, truncate=truncate, mode="reflect")

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    pad = (2 * int(truncate * sigma + 0.5) + 1 - 1) // 2
    if all(n > 2 * pad for n in s.shape):
        s = s[tuple(slice(pad, n - pad) for n in s.shape)]
    return float(s.mean())


# ------------------------------------------------------------------------------ relative errors


def relative_error(pred, truth) -> np.ndarray:
    """Voxel-wise relative error ``(pred - truth) / truth`` (NaN where truth is 0)."""
    pred = np.asarray(pred, dtype=float)
    truth = np.asarray(truth, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(truth != 0, (pred - truth) / truth, np.nan)


def agreement(pred, ref, min_n: int = 3) -> dict:
    """Agreement of paired measurements (e.g. %PRM per patient or lobe), NaN pairs left out.

    ``{"pearson_r", "p", "n", "bland_altman"}``: Pearson r and p are NaN with fewer than
    ``min_n`` pairs or a constant side; Bland-Altman (pred - ref) is given from 2 pairs on.
    """
    x = np.asarray(pred, float).ravel()
    y = np.asarray(ref, float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    r = p = float("nan")
    if x.size >= min_n and np.ptp(x) > 0 and np.ptp(y) > 0:
        r, p = pearson(x, y)
    out = {"pearson_r": float(r), "p": float(p), "n": int(x.size)}
    if x.size >= 2:
        out["bland_altman"] = bland_altman(x, y).to_dict()
    return out


def bias_dispersion_index(pred, truth) -> tuple[float, float]:
    """BI = median and DI = interquartile range of the relative error (Macarro et al.).

    NaNs (e.g. zero truth) are ignored.
    """
    e = relative_error(pred, truth).ravel()
    e = e[np.isfinite(e)]
    if e.size == 0:
        raise ValueError("no finite relative error to summarise")
    q25, q50, q75 = np.percentile(e, [25, 50, 75])
    return float(q50), float(q75 - q25)
