"""Report figures: map montages as colour overlays, curves, tables as images.

All functions write a PNG and return its path. Arrays are ``[k, j, i]``; montages
show slices of constant k with row j running down and column i across, as stored: for
an axial acquisition with the usual direction (i to the patient's left, j posterior)
that is the radiological view. No reorientation is done (:func:`display_slice`), so
report montages of other storage orders appear as stored; Slicer shows the true anatomy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


#: Colour map and display range rule per map name (range from robust percentiles when None).
MAP_STYLE = {
    "cbf": ("jet", None),
    "cbv": ("jet", None),
    "mtt": ("viridis", None),
    "tmax": ("turbo", None),
    "ttp": ("magma", None),
    "perfusion": ("hot", (0.0, 1.0)),
}


def display_slice(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a ``[k, j, i]`` array, oriented for display (row = j)."""
    return np.asarray(volume)[k]


def pick_slices(mask: Optional[np.ndarray], n_slices: int, depth: int) -> list[int]:
    """Evenly spaced slice indices covering the mask's extent along k."""
    if mask is not None and np.asarray(mask).any():
        ks = np.nonzero(np.asarray(mask).reshape(depth, -1).any(axis=1))[0]
        lo, hi = int(ks.min()), int(ks.max())
    else:
        lo, hi = 0, depth - 1
    n = max(1, min(n_slices, hi - lo + 1))
    return sorted(set(int(round(x)) for x in np.linspace(lo, hi, n + 2)[1:-1] if n > 1) or {(lo + hi) // 2})


def montage_png(
    maps: Mapping[str, np.ndarray],
    path: str | Path,
    background: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
    n_slices: int = 4,
    ranges: Optional[Mapping[str, tuple[float, float]]] = None,
    units: Optional[Mapping[str, str]] = None,
    alpha: float = 0.75,
    title: Optional[str] = None,
) -> Path:
    """A grid of axial slices: one row per map, drawn as a colour overlay on ``background``.

    Voxels outside ``mask`` (or non-finite) are transparent. Each row has its own
    colour bar with units.
    """
    plt = _plt()
    names = list(maps)
    first = np.asarray(maps[names[0]])
    slices = pick_slices(mask, n_slices, first.shape[0])
    fig, axes = plt.subplots(len(names), len(slices), figsize=(2.6 * len(slices) + 1.0, 2.5 * len(names)),
                             squeeze=False)
    for row, name in enumerate(names):
        data = np.asarray(maps[name], dtype=float)
        valid = np.isfinite(data) & (mask.astype(bool) if mask is not None else True)
        cmap, fixed = MAP_STYLE.get(name.lower(), ("viridis", None))
        rng = (ranges or {}).get(name) or fixed
        if rng is None:
            vals = data[valid]
            rng = (float(np.percentile(vals, 1)), float(np.percentile(vals, 99))) if vals.size else (0.0, 1.0)
            if rng[1] <= rng[0]:
                rng = (rng[0], rng[0] + 1.0)
        im = None
        for col, k in enumerate(slices):
            ax = axes[row, col]
            if background is not None:
                bg = display_slice(background, k)
                ax.imshow(bg, cmap="gray", interpolation="nearest")
            overlay = np.where(display_slice(valid, k), display_slice(data, k), np.nan)
            im = ax.imshow(overlay, cmap=cmap, vmin=rng[0], vmax=rng[1], alpha=alpha if background is not None else 1,
                           interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"slice {k}", fontsize=8)
            if col == 0:
                ax.set_ylabel(name.upper(), fontsize=10)
        cb = fig.colorbar(im, ax=axes[row, :].tolist(), fraction=0.025, pad=0.01)
        cb.set_label((units or {}).get(name, ""), fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def curves_png(
    times: np.ndarray,
    curves: Mapping[str, np.ndarray],
    path: str | Path,
    xlabel: str = "time [s]",
    ylabel: str = "",
    title: Optional[str] = None,
    styles: Optional[Mapping[str, str]] = None,
) -> Path:
    """Line plot of named curves sampled at ``times``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, y in curves.items():
        ax.plot(times, np.asarray(y, float), (styles or {}).get(name, "-"), label=name, lw=1.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bar_png(values: Mapping[str, float], path: str | Path, ylabel: str = "", title: Optional[str] = None) -> Path:
    """A bar chart of named values (e.g. timings)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.0))
    ax.bar(list(values), [float(v) for v in values.values()], color="#4477aa")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def scatter_identity_png(x: Sequence[float], y: Sequence[float], path: str | Path, xlabel: str, ylabel: str,
                         title: Optional[str] = None) -> Path:
    """Scatter of predicted against reference values with the identity line."""
    plt = _plt()
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.scatter(x, y, s=12, alpha=0.7)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bland_altman_png(a: Sequence[float], b: Sequence[float], path: str | Path, label: str = "",
                     title: Optional[str] = None) -> Path:
    """Bland-Altman plot of ``a - b`` against their mean, with mean and 95 % limits."""
    from ..metrics import bland_altman

    plt = _plt()
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    ba = bland_altman(a, b)
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    ax.scatter((a + b) / 2, a - b, s=12, alpha=0.7)
    for value, style in ((ba.mean_difference, "-"), (ba.lower_limit, "--"), (ba.upper_limit, "--")):
        ax.axhline(value, color="k", ls=style, lw=1)
    ax.set_xlabel(f"mean {label}".strip())
    ax.set_ylabel(f"difference {label}".strip())
    if title:
        ax.set_title(title)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
