"""%PRM per region: whole lung, right lung, left lung and each lobe.

Denominator (research/prm.md section 5, item 2): the *valid* lung voxels of the
region (labels 1-4, i.e. lung voxels with both scans inside the valid HU range
after the median filter). So normal + fsad + emph + uncategorized = 100 % in
every region with valid voxels. ``excluded`` is reported beside them: the share
of the region's lung voxels outside the valid range, in % of all lung voxels of
the region. ``voxels`` counts the valid voxels; ``lung_voxels`` all lung voxels,
``volume_ml`` the valid volume in mL.

Regions: right lung = lung label 1 or lobes 1-3; left = lung label 2 or lobes 4-6.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from ..labels import LEFT_LOBES, RIGHT_LOBES
from .classification import CLASS_KEYS, OUTSIDE

LOBE_NAMES = {1: "right upper", 2: "right middle", 3: "right lower",
              4: "left upper", 5: "lingula", 6: "left lower"}
STAT_KEYS = ("normal", "fsad", "emph", "uncategorized", "excluded", "voxels", "lung_voxels", "volume_ml")


def region_stats(prm: np.ndarray, region: np.ndarray, voxel_volume_ml: float = 0.0) -> dict:
    """%PRM of one region.

    Parameters
    ----------
    prm
        ``[k, j, i]`` PRM labels 0-4.
    region
        ``[k, j, i]`` boolean: the region's lung voxels (valid or not).
    voxel_volume_ml
        Volume of one voxel in mL (for ``volume_ml``).

    Returns
    -------
    dict
        ``normal, fsad, emph, uncategorized`` in % of valid voxels (NaN when none),
        ``excluded`` in % of the region's lung voxels, ``voxels`` (valid), ``lung_voxels``, ``volume_ml``.
    """
    region = np.asarray(region, dtype=bool)
    values = np.asarray(prm)[region]
    counts = np.bincount(values.astype(np.int64), minlength=5)[:5]
    lung_voxels = int(region.sum())
    valid = int(counts[1:].sum())
    out: dict = {}
    for label, key in CLASS_KEYS.items():
        out[key] = float(100.0 * counts[label] / valid) if valid else float("nan")
    out["excluded"] = float(100.0 * counts[OUTSIDE] / lung_voxels) if lung_voxels else float("nan")
    out["voxels"] = valid
    out["lung_voxels"] = lung_voxels
    out["volume_ml"] = float(valid * voxel_volume_ml)
    return out


def prm_statistics(
    prm: np.ndarray,
    lung_labels: np.ndarray,
    lobes: Optional[np.ndarray] = None,
    voxel_volume_ml: float = 0.0,
) -> dict:
    """The ``prm_stats.json`` dictionary.

    Parameters
    ----------
    prm
        ``[k, j, i]`` PRM labels 0-4.
    lung_labels
        ``[k, j, i]`` lung labels (1 right, 2 left; any other nonzero = lung of unknown side).
    lobes
        Optional ``[k, j, i]`` lobe labels 1-6 (ARCHITECTURE.md). When given, right/left come
        from the lobes and the lung region is the union of the lobes.
    voxel_volume_ml
        One voxel's volume in mL.

    Returns
    -------
    dict
        ``{"whole_lung": {...}, "right": {...}, "left": {...}, "lobes": {"1": {...}, ...}}``.
    """
    lung_labels = np.asarray(lung_labels)
    if lobes is not None:
        lobes = np.asarray(lobes)
        whole = lobes > 0
        right = np.isin(lobes, RIGHT_LOBES)
        left = np.isin(lobes, LEFT_LOBES)
    else:
        whole = lung_labels > 0
        right = lung_labels == 1
        left = lung_labels == 2
    stats = {
        "whole_lung": region_stats(prm, whole, voxel_volume_ml),
        "right": region_stats(prm, right, voxel_volume_ml),
        "left": region_stats(prm, left, voxel_volume_ml),
        "lobes": {},
    }
    if lobes is not None:
        for lobe in LOBE_NAMES:
            region = lobes == lobe
            if region.any():
                stats["lobes"][str(lobe)] = region_stats(prm, region, voxel_volume_ml)
    return stats


def stats_rows(stats: dict) -> list[dict]:
    """Flat rows (one per region) for the CSV and for tables."""
    rows = []
    for name in ("whole_lung", "right", "left"):
        rows.append({"region": name, "lobe": "", **{k: stats[name][k] for k in STAT_KEYS}})
    for lobe, values in sorted(stats.get("lobes", {}).items(), key=lambda kv: int(kv[0])):
        rows.append({"region": LOBE_NAMES.get(int(lobe), f"lobe {lobe}"), "lobe": lobe,
                     **{k: values[k] for k in STAT_KEYS}})
    return rows


def write_stats_csv(stats: dict, path: str | Path) -> Path:
    """Write ``prm_stats.csv``: region, lobe, %normal, %fsad, %emph, %uncategorized, %excluded, voxels, ..."""
    p = Path(path)
    rows = stats_rows(stats)
    with p.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["region", "lobe", *STAT_KEYS])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return p
