"""Arterial input function: the mean curve of a mask, or automatic selection.

Automatic selection (:func:`select_aif_auto`) follows the cluster approach of
Mouridsen et al. (MRM 2006; 56:1119) with the explicit rejection rules reviewed by
Peruzzo et al. (2011): every step is one array operation over all voxels.

1. Features per voxel from its delta-R2* curve: peak, time to peak, arrival
   (first crossing of 10 % of the peak before it), FWHM, area, baseline SD (frames
   before the global bolus arrival), roughness (sum of squared second differences
   over the curve's energy) and the post-bolus tail level.
2. Rejection, counted per criterion: non-finite curves; no positive peak; peak
   inside the baseline (noise spike); contrast-to-noise ``peak / baseline SD``
   below ``min_cnr`` or roughness above ``max_roughness`` (white noise scores about
   6, a bolus well below 1) or a FWHM below one frame (noise, background); negative excursions below
   ``-max_negative * peak`` (oscillating / signal-overshoot voxels); a high tail
   ``tail / peak > max_tail_ratio`` (partial volume with tissue or veins keeps a
   high late level); a first pass wider than ``max_fwhm_ratio`` times the median
   FWHM of the candidates (partial volume flattens and widens the arterial peak).
3. Candidates: the ``candidate_fraction`` survivors with the largest area, minus
   the ``roughness_quantile`` roughest of them (Mouridsen: 10 % and 25 %).
4. Clustering: k-means (k = ``n_clusters``) of area-normalised curves, keep the
   cluster whose centroid has the smallest first moment (earliest, narrowest
   bolus; merged with the next-earliest while smaller than ``n_voxels``), repeat
   once on that cluster.
5. The ``n_voxels`` voxels of that cluster with the best score
   ``peak / (FWHM * time from global arrival to peak)`` (high, narrow, early)
   form the AIF, their mean curve.

Arrays: concentration ``[k, j, i, t]`` (delta-R2*, 1/s), masks ``[k, j, i]``,
``times`` ``(t,)`` seconds. Reported voxel indices are ``(k, j, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import ParameterError, PerfusionAIError, input_error


@dataclass
class AIFSelection:
    """Result of :func:`select_aif_auto`.

    Attributes
    ----------
    curve
        ``(t,)`` mean delta-R2* (1/s) of the chosen voxels.
    voxels
        ``(n, 3)`` int ``(k, j, i)`` indices of the chosen voxels, best first.
    arrival_s, ttp_s, fwhm_s
        Bolus arrival (10 % of the peak), time to peak and FWHM of ``curve`` (s).
    peak
        Maximum of ``curve`` (1/s).
    scores
        ``(n,)`` selection score of each chosen voxel (1/s^3, larger is better).
    rejected
        Voxels removed by each criterion, in the order applied.
    candidates
        Voxels entering the clustering.
    cluster_sizes
        Size of the chosen cluster after each clustering round.
    """

    curve: np.ndarray
    voxels: np.ndarray
    arrival_s: float
    peak: float
    fwhm_s: float
    ttp_s: float
    scores: np.ndarray
    rejected: dict = field(default_factory=dict)
    candidates: int = 0
    cluster_sizes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary (for ``summary.json``)."""
        return {
            "method": "automatic (Mouridsen 2006 clustering with noise and partial-volume rejection)",
            "n_voxels": int(len(self.voxels)),
            "voxels_kji": self.voxels.tolist(),
            "scores": [float(s) for s in self.scores],
            "arrival_s": float(self.arrival_s),
            "ttp_s": float(self.ttp_s),
            "fwhm_s": float(self.fwhm_s),
            "peak_per_s": float(self.peak),
            "rejected": {k: int(v) for k, v in self.rejected.items()},
            "candidates": int(self.candidates),
            "cluster_sizes": [int(c) for c in self.cluster_sizes],
        }


def _check_shapes(concentration: np.ndarray, mask: Optional[np.ndarray], name: str) -> None:
    if concentration.ndim != 4:
        raise ValueError(f"concentration must be [k, j, i, t], got shape {concentration.shape}")
    if mask is not None and tuple(mask.shape) != tuple(concentration.shape[:3]):
        raise input_error(name, f"has shape {tuple(mask.shape)} but the series has "
                                f"{tuple(concentration.shape[:3])} (k, j, i)")


def aif_from_mask(concentration: np.ndarray, aif_mask: np.ndarray, name: str = "AIF mask") -> np.ndarray:
    """Mean delta-R2* curve (1/s, shape ``(t,)``) of the voxels in ``aif_mask``.

    Voxels whose curve is not finite (no valid baseline) are left out. Raises
    :class:`PerfusionAIError` naming ``name`` when the mask selects no voxel, no
    voxel has a finite curve, or the mean curve is all zero / flat / never positive.
    """
    concentration = np.asarray(concentration)
    aif_mask = np.asarray(aif_mask, dtype=bool)
    _check_shapes(concentration, aif_mask, name)
    n = int(np.count_nonzero(aif_mask))
    if n == 0:
        raise input_error(name, "selects no voxel; draw the AIF mask on arterial voxels of the series")
    curves = concentration[aif_mask].astype(np.float64)
    finite = np.isfinite(curves).all(axis=1)
    if not finite.any():
        raise input_error(name, f"none of its {n} voxels has a valid concentration curve "
                                f"(zero or non-finite signal)")
    curve = curves[finite].mean(axis=0)
    peak = float(curve.max())
    spread = float(curve.max() - curve.min())
    if peak <= 0 or spread <= 1e-6 * max(1.0, abs(peak)):
        raise input_error(name, "gives an all-zero or flat AIF (no signal drop during the bolus); "
                                "the mask is probably not on an artery")
    return curve


# --------------------------------------------------------------------------------------
# features (all vectorised over voxels: curves are (V, t))


def _crossings(curves: np.ndarray, times: np.ndarray, peak_idx: np.ndarray, level: np.ndarray):
    """Linearly interpolated times (s) where each curve last rises above / first falls below
    ``level`` around its peak; clipped to the series ends. Returns (left, right)."""
    v, n = curves.shape
    idx = np.arange(n)[None, :]
    below = curves < level[:, None]
    rows = np.arange(v)
    left = np.where(below & (idx < peak_idx[:, None]), idx, -1).max(axis=1)
    right = np.where(below & (idx > peak_idx[:, None]), idx, n).min(axis=1)
    l0 = np.clip(left, 0, n - 2)
    c0, c1 = curves[rows, l0], curves[rows, l0 + 1]
    frac = np.clip((level - c0) / np.where(c1 != c0, c1 - c0, 1.0), 0.0, 1.0)
    t_left = np.where(left < 0, times[0], times[l0] + frac * (times[l0 + 1] - times[l0]))
    r1 = np.clip(right, 1, n - 1)
    d0, d1 = curves[rows, r1 - 1], curves[rows, r1]
    frac = np.clip((d0 - level) / np.where(d0 != d1, d0 - d1, 1.0), 0.0, 1.0)
    t_right = np.where(right >= n, times[-1], times[r1 - 1] + frac * (times[r1] - times[r1 - 1]))
    return t_left, t_right


def curve_features(curves: np.ndarray, times: np.ndarray, baseline_frames: int) -> dict:
    """Per-curve features of ``curves`` ``(V, t)`` (1/s) on ``times`` (s).

    Returns a dict of ``(V,)`` arrays: ``peak`` (1/s), ``ttp_index``, ``ttp_s``,
    ``arrival_s`` (10 % crossing), ``fwhm_s``, ``auc`` (1/s * s), ``baseline_sd``,
    ``roughness`` (dimensionless), ``tail_ratio`` (mean of the last 15 % of frames
    over the peak), ``min_after`` (lowest value after the baseline, 1/s).
    """
    n = curves.shape[1]
    peak_idx = np.argmax(curves, axis=1)
    peak = curves[np.arange(curves.shape[0]), peak_idx]
    nb = int(np.clip(baseline_frames, 2, n - 2))
    baseline = curves[:, :nb]
    baseline_sd = baseline.std(axis=1, ddof=1)
    arrival, _ = _crossings(curves, times, peak_idx, 0.1 * peak)
    left, right = _crossings(curves, times, peak_idx, 0.5 * peak)
    energy = np.einsum("vt,vt->v", curves, curves)
    second = np.diff(curves, n=2, axis=1)
    roughness = np.einsum("vt,vt->v", second, second) / np.maximum(energy, 1e-30)
    tail = curves[:, max(nb, n - max(3, int(round(0.15 * n)))):].mean(axis=1)
    return {
        "peak": peak,
        "ttp_index": peak_idx,
        "ttp_s": times[peak_idx],
        "arrival_s": arrival,
        "fwhm_s": np.maximum(right - left, 1e-6),
        "auc": np.trapezoid(curves, times, axis=1),
        "baseline_sd": baseline_sd,
        "roughness": roughness,
        "tail_ratio": tail / np.where(peak > 0, peak, 1.0),
        "min_after": curves[:, nb:].min(axis=1),
    }


def global_arrival_index(curves: np.ndarray, fraction: float = 0.1) -> int:
    """Frame where the median curve of ``curves`` ``(V, t)`` first exceeds ``fraction`` of its
    peak (before the peak): the bolus arrival used to delimit the baseline."""
    median = np.median(curves, axis=0)
    peak_idx = int(np.argmax(median))
    peak = median[peak_idx]
    if peak <= 0:
        return max(2, curves.shape[1] // 6)
    below = np.flatnonzero(median[:peak_idx] < fraction * peak)
    return int(below[-1] + 1) if below.size else max(2, peak_idx // 2)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 50) -> np.ndarray:
    """Labels of a k-means++ clustering of rows of ``x`` (loop over iterations only)."""
    n = x.shape[0]
    k = min(k, n)
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)
    for c in range(1, k):
        total = d2.sum()
        pick = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centres[c] = x[pick]
        d2 = np.minimum(d2, ((x - centres[c]) ** 2).sum(axis=1))
    sq = (x * x).sum(axis=1)[:, None]
    labels = np.full(n, -1)
    for _ in range(iterations):
        dist = sq - 2.0 * x @ centres.T + (centres * centres).sum(axis=1)[None, :]
        new = np.argmin(dist, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, x)
        nonempty = counts > 0
        centres[nonempty] = sums[nonempty] / counts[nonempty, None]
    return labels


def select_aif_auto(
    concentration: np.ndarray,
    mask: Optional[np.ndarray],
    times: np.ndarray,
    n_voxels: int = 10,
    baseline_frames: Optional[int] = None,
    candidate_fraction: float = 0.10,
    roughness_quantile: float = 0.25,
    min_cnr: float = 8.0,
    max_roughness: float = 2.0,
    max_negative: float = 0.2,
    max_tail_ratio: float = 0.3,
    max_fwhm_ratio: float = 2.0,
    n_clusters: int = 5,
    rounds: int = 2,
    seed: int = 0,
) -> AIFSelection:
    """Select arterial voxels automatically and return their mean curve (module doc).

    Parameters
    ----------
    concentration
        ``[k, j, i, t]`` delta-R2* in 1/s.
    mask
        ``[k, j, i]`` bool search region (the brain mask), or None for every voxel
        with a finite curve.
    times
        ``(t,)`` frame times in s.
    n_voxels
        Number of voxels averaged into the AIF.
    baseline_frames
        Frames before the bolus; detected from the median curve when None.
    candidate_fraction, roughness_quantile, min_cnr, max_roughness, max_negative,
    max_tail_ratio, max_fwhm_ratio, n_clusters, rounds, seed
        Rejection and clustering settings (module doc); ``seed`` makes k-means
        deterministic.

    Raises
    ------
    PerfusionAIError
        When no voxel survives the rejection (e.g. no artery in the mask).
    """
    concentration = np.asarray(concentration)
    _check_shapes(concentration, mask, "brain mask")
    times = np.asarray(times, dtype=float)
    if times.shape != (concentration.shape[-1],):
        raise ValueError(f"times has shape {times.shape}, expected ({concentration.shape[-1]},)")
    if n_voxels < 1:
        raise ParameterError("n_voxels", f"must be at least 1, got {n_voxels}")
    search = np.ones(concentration.shape[:3], bool) if mask is None else np.asarray(mask, bool)
    coords = np.argwhere(search)
    if coords.shape[0] == 0:
        raise input_error("brain mask", "is empty; automatic AIF selection needs voxels to search")
    curves = concentration[search].astype(np.float64)
    rejected: dict[str, int] = {}

    def keep(selector: np.ndarray, reason: str):
        nonlocal curves, coords, feats
        rejected[reason] = rejected.get(reason, 0) + int(np.count_nonzero(~selector))
        curves, coords = curves[selector], coords[selector]
        if feats is not None:
            feats = {k: v[selector] for k, v in feats.items()}

    feats = None
    keep(np.isfinite(curves).all(axis=1), "non-finite curve")
    if curves.shape[0] == 0:
        raise PerfusionAIError("automatic AIF selection: no voxel has a finite concentration curve")
    nb = baseline_frames if baseline_frames is not None else global_arrival_index(curves)
    nb = int(np.clip(nb, 2, curves.shape[1] - 3))
    feats = curve_features(curves, times, nb)
    keep(feats["peak"] > 0, "no positive peak")
    keep(feats["ttp_index"] >= nb, "peak within the baseline")
    keep(feats["peak"] >= min_cnr * np.maximum(feats["baseline_sd"], 1e-12), "noisy (low peak/baseline SD)")
    keep(feats["roughness"] <= max_roughness, "noisy (rough curve)")
    keep(feats["fwhm_s"] >= float(np.median(np.diff(times))), "noise spike (FWHM below one frame)")
    keep(feats["min_after"] >= -max_negative * feats["peak"], "negative or oscillating")
    keep(feats["tail_ratio"] <= max_tail_ratio, "partial volume (high tail)")
    if curves.shape[0] == 0:
        raise PerfusionAIError("automatic AIF selection found no voxel with a clear, low-noise bolus; the search "
                               "region (the brain mask) must contain arteries; check it or give an AIF mask")

    # Candidates: largest areas, then drop the roughest (Mouridsen 2006).
    n_keep = max(min(curves.shape[0], 4 * n_voxels), int(np.ceil(candidate_fraction * curves.shape[0])))
    order = np.argsort(-feats["auc"], kind="stable")
    top = np.zeros(curves.shape[0], bool)
    top[order[:n_keep]] = True
    keep(top, "small area")
    if curves.shape[0] > 2 * n_voxels:
        limit = np.quantile(feats["roughness"], 1.0 - roughness_quantile)
        keep(feats["roughness"] <= limit, "rough (noisy)")
    wide = feats["fwhm_s"] <= max_fwhm_ratio * np.median(feats["fwhm_s"])
    keep(wide, "partial volume (wide first pass)")
    candidates = curves.shape[0]

    rng = np.random.default_rng(seed)
    cluster_sizes = []
    for _ in range(max(1, rounds)):
        if curves.shape[0] <= max(n_voxels, n_clusters):
            break
        norm = curves / np.maximum(feats["auc"], 1e-12)[:, None]
        labels = _kmeans(norm, n_clusters, rng)
        k = int(labels.max()) + 1
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros((k, norm.shape[1]))
        np.add.at(sums, labels, norm)
        centroids = sums / np.maximum(counts, 1)[:, None]
        first_moment = (centroids * times[None, :]).sum(axis=1) / np.maximum(centroids.sum(axis=1), 1e-30)
        first_moment[counts == 0] = np.inf
        # earliest cluster; merge the next-earliest ones while it holds fewer than n_voxels
        order = np.argsort(first_moment, kind="stable")
        n_take = int(np.searchsorted(np.cumsum(counts[order]), n_voxels) + 1)
        keep(np.isin(labels, order[:n_take]), "later cluster")
        cluster_sizes.append(curves.shape[0])

    t_arrival = times[nb]
    dt = float(np.median(np.diff(times)))
    scores = feats["peak"] / (feats["fwhm_s"] * np.maximum(feats["ttp_s"] - t_arrival, dt))
    chosen = np.argsort(-scores, kind="stable")[:n_voxels]
    curve = curves[chosen].mean(axis=0)
    f = curve_features(curve[None, :], times, nb)
    return AIFSelection(
        curve=curve,
        voxels=coords[chosen].astype(int),
        arrival_s=float(f["arrival_s"][0]),
        peak=float(f["peak"][0]),
        fwhm_s=float(f["fwhm_s"][0]),
        ttp_s=float(f["ttp_s"][0]),
        scores=scores[chosen],
        rejected=rejected,
        candidates=candidates,
        cluster_sizes=cluster_sizes,
    )


#: An automatic AIF is reported as not arterial when its peak is below this multiple of the peak of
#: the bright-tissue curve (the 90th percentile of the tissue curves, frame by frame): arteries peak
#: several times above tissue (x 10-25 on the phantoms at SNR 10-50; x 2 even with the phantom's
#: clinical tissue contrast), a tissue "AIF" at most x 1.5.
MIN_PEAK_RATIO = 1.5
#: ... or when its FWHM is at least this fraction of the median tissue curve's (arteries 0.4-0.65).
MAX_WIDTH_RATIO = 0.9


def arterial_warnings(aif: np.ndarray, tissue_curves: np.ndarray, times: np.ndarray) -> list[str]:
    """Why an (automatically chosen) AIF ``(t,)`` does not look arterial, compared with the tissue
    curves ``(V, t)`` (1/s) on ``times`` (s): an empty list when it does.

    An arterial curve peaks before the median tissue curve, is narrower (FWHM below
    ``MAX_WIDTH_RATIO`` of the tissue's) and peaks well above the bright tissue (``MIN_PEAK_RATIO``
    times the peak of the per-frame 90th percentile of the tissue curves, which noise and the few
    arterial voxels do not move). A search region without arteries (a brain mask that excludes
    the vessels) gives a tissue "AIF" that fails these checks, and CBV/CBF many times too high.
    """
    a = np.asarray(aif, dtype=np.float64)
    tissue = np.asarray(tissue_curves, dtype=np.float64)
    tissue = tissue[np.isfinite(tissue).all(axis=1)]
    if tissue.shape[0] < 10:
        return []
    nb = max(2, global_arrival_index(tissue))
    mine = curve_features(a[None, :], times, nb)
    typical = curve_features(np.median(tissue, axis=0)[None, :], times, nb)
    bright = float(np.percentile(tissue, 90, axis=0).max())
    warnings = []
    ttp, tissue_ttp = float(mine["ttp_s"][0]) - times[0], float(typical["ttp_s"][0]) - times[0]
    if ttp >= tissue_ttp > 0:
        warnings.append(f"the automatic AIF peaks at {ttp:.3g} s, no earlier than the median tissue curve "
                        f"({tissue_ttp:.3g} s)")
    fwhm, tissue_fwhm = float(mine["fwhm_s"][0]), float(typical["fwhm_s"][0])
    if typical["peak"][0] > 0 and fwhm >= MAX_WIDTH_RATIO * tissue_fwhm:
        warnings.append(f"the automatic AIF is {fwhm:.3g} s wide (FWHM), about as wide as the median tissue "
                        f"curve ({tissue_fwhm:.3g} s)")
    peak = float(mine["peak"][0])
    if bright > 0 and peak < MIN_PEAK_RATIO * bright:
        warnings.append(f"the automatic AIF peaks at {peak:.3g} 1/s, less than {MIN_PEAK_RATIO:g} times the "
                        f"bright tissue ({bright:.3g} 1/s)")
    if warnings:
        warnings.append("it does not look arterial: the search region (the brain mask) must contain arteries; "
                        "check the AIF or give an AIF mask")
    return warnings
