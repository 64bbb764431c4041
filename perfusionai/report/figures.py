"""Report figures: map montages as colour overlays, curves, tables as images.

All functions write a PNG and return its path. Arrays are ``[k, j, i]``; montages
show slices of constant k with row j running down and column i across, as stored: for
an axial acquisition with the usual direction (i to the patient's left, j posterior)
that is the radiological view. No reorientation is done (:func:`display_slice`), so
report montages of other storage orders appear as stored; Slicer shows the true anatomy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Mapping, Optional, Sequence

import numpy as np


def _plt():
    """matplotlib.pyplot on the Agg backend (the ``report`` extra; one line naming it when absent)."""
    from ..deps import require

    matplotlib = require("matplotlib", "the report")
    matplotlib.use("Agg", force=True)
    return require("matplotlib.pyplot", "the report")


#: Colour map and display range rule per map name (range from robust percentiles when None).
MAP_STYLE = {
    "cbf": ("jet", None),
    "cbv": ("jet", None),
    "mtt": ("viridis", None),
    "tmax": ("turbo", None),
    "ttp": ("magma", None),
    "perfusion": ("hot", (0.0, 1.0)),
}
#: Colour map of difference rows (estimate minus truth), drawn on a window symmetric about 0.
DIFFERENCE_CMAP = "RdBu_r"


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


def shared_window(arrays: Sequence[np.ndarray], mask: Optional[np.ndarray] = None, low: float = 1.0,
                  high: float = 99.0) -> tuple[float, float]:
    """One display window ``(lo, hi)`` for several arrays of one quantity (percentiles of them all)."""
    values = []
    for a in arrays:
        a = np.asarray(a, dtype=float)
        keep = np.isfinite(a) & (np.asarray(mask, bool) if mask is not None else True)
        values.append(a[keep])
    vals = np.concatenate(values) if values else np.zeros(0)
    if not vals.size:
        return 0.0, 1.0
    lo, hi = float(np.percentile(vals, low)), float(np.percentile(vals, high))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def comparison_window(truth: np.ndarray, estimates: Sequence[np.ndarray],
                      mask: Optional[np.ndarray] = None) -> tuple[float, float]:
    """One window for a truth map and its estimates: from ``min(0, 1st percentile of the truth)`` to the
    largest of the truth's 99th and each estimate's 95th percentile (a few outlying voxels of one
    estimate do not squeeze everything else into one colour)."""
    lo, hi_truth = shared_window([truth], mask, 1.0, 99.0)
    tops = [hi_truth] + [shared_window([e], mask, 1.0, 95.0)[1] for e in estimates]
    hi = max(tops)
    lo = min(0.0, lo)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def difference_window(arrays: Sequence[np.ndarray], mask: Optional[np.ndarray] = None,
                      percentile: float = 98.0) -> tuple[float, float]:
    """A window symmetric about 0 holding ``percentile`` % of the absolute differences of every array."""
    values = []
    for a in arrays:
        a = np.abs(np.asarray(a, dtype=float))
        keep = np.isfinite(a) & (np.asarray(mask, bool) if mask is not None else True)
        values.append(a[keep])
    vals = np.concatenate(values) if values else np.zeros(0)
    top = float(np.percentile(vals, percentile)) if vals.size else 1.0
    top = top if top > 0 else 1.0
    return -top, top


def scale_windows(maps: Mapping[str, np.ndarray], mask: Optional[np.ndarray] = None,
                  labels: Optional[Mapping[str, str]] = None, scales: Optional[Mapping[str, str]] = None,
                  differences: Collection[str] = (), ranges: Optional[Mapping[str, tuple[float, float]]] = None,
                  cmaps: Optional[Mapping[str, str]] = None):
    """The colour scales of a :func:`montage_png`: ``(scale_of, groups, window, cmap_of)`` with
    ``scale_of[row] -> scale``, ``groups[scale] -> rows``, ``window[scale] -> (lo, hi)`` and
    ``cmap_of[scale] -> colour map name`` (arguments as :func:`montage_png`)."""
    names = list(maps)
    labels, scales, ranges, cmaps = dict(labels or {}), dict(scales or {}), dict(ranges or {}), dict(cmaps or {})
    mask_b = None if mask is None else np.asarray(mask, bool)
    scale_of = {n: scales.get(n, labels.get(n, n)) for n in names}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(scale_of[n], []).append(n)
    window, cmap_of = {}, {}
    for scale, members in groups.items():
        diff = any(m in differences for m in members)
        fixed = ranges.get(scale) or next((ranges[m] for m in members if m in ranges), None)
        style = MAP_STYLE.get(members[0].lower(), MAP_STYLE.get(scale.lower(), ("viridis", None)))
        if fixed is None and not diff:
            fixed = style[1]
        if fixed is None:
            arrays = [maps[m] for m in members]
            fixed = difference_window(arrays, mask_b) if diff else shared_window(arrays, mask_b)
        window[scale] = (float(fixed[0]), float(fixed[1]))
        cmap_of[scale] = cmaps.get(scale) or next((cmaps[m] for m in members if m in cmaps), None) or (
            DIFFERENCE_CMAP if diff else style[0])
    return scale_of, groups, window, cmap_of


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
    *,
    slices: Optional[Sequence[int]] = None,
    labels: Optional[Mapping[str, str]] = None,
    scales: Optional[Mapping[str, str]] = None,
    differences: Collection[str] = (),
    cmaps: Optional[Mapping[str, str]] = None,
    background_window: Optional[tuple[float, float]] = None,
) -> Path:
    """A grid of axial slices: one row per map, drawn as a colour overlay on ``background``.

    Parameters
    ----------
    maps
        Row key -> ``[k, j, i]`` array, in row order.
    slices
        The k indices shown (the same in every figure of a report); default: ``n_slices`` spread over
        ``mask``.
    labels
        Row key -> the row's label in words (default: the key).
    scales
        Row key -> scale name. Rows of one scale share one colour window and one colour bar labelled
        ``"<scale> [<units>]"`` (default: every row its own scale, named by its label). Put truth and every
        estimate of one quantity on one scale so equal colours mean equal values.
    differences
        Row keys holding estimate minus truth: drawn with :data:`DIFFERENCE_CMAP` on a window symmetric
        about 0 (shared by the rows of their scale).
    ranges
        Scale name (or row key) -> fixed ``(lo, hi)``; otherwise percentiles 1-99 of the scale's rows in
        ``mask`` (98th percentile of ``|value|`` for differences).
    units
        Row key or scale name -> units for the colour bar label.
    cmaps
        Scale name or row key -> colour map (default :data:`MAP_STYLE` by the key, else viridis).
    background_window
        ``(lo, hi)`` grey window of the background (default: its 1-99.5 percentiles).

    Voxels outside ``mask`` (or non-finite) are transparent.
    """
    plt = _plt()
    names = list(maps)
    labels = dict(labels or {})
    scales = dict(scales or {})
    ranges = dict(ranges or {})
    units = dict(units or {})
    cmaps = dict(cmaps or {})
    first = np.asarray(maps[names[0]])
    shown = list(slices) if slices is not None else pick_slices(mask, n_slices, first.shape[0])
    mask_b = np.asarray(mask, bool) if mask is not None else np.ones(first.shape, bool)
    scale_of, groups, window, cmap_of = scale_windows(maps, mask_b, labels, scales, differences, ranges, cmaps)
    if background is not None:
        bg_all = np.asarray(background, dtype=float)
        bg_lo, bg_hi = background_window or (float(np.percentile(bg_all, 1)), float(np.percentile(bg_all, 99.5)))
    n_rows, n_cols = len(names), len(shown)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.1 * n_cols + 2.2, 2.0 * n_rows + (0.5 if title else 0.1)),
                             squeeze=False, layout="constrained")
    images = {}
    for row, name in enumerate(names):
        data = np.asarray(maps[name], dtype=float)
        valid = np.isfinite(data) & mask_b
        scale = scale_of[name]
        lo, hi = window[scale]
        for col, k in enumerate(shown):
            ax = axes[row, col]
            if background is not None:
                ax.imshow(display_slice(bg_all, k), cmap="gray", vmin=bg_lo, vmax=bg_hi, interpolation="nearest")
            overlay = np.where(display_slice(valid, k), display_slice(data, k), np.nan)
            images[name] = ax.imshow(overlay, cmap=cmap_of[scale], vmin=lo, vmax=hi,
                                     alpha=alpha if background is not None else 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"slice k = {k}", fontsize=8)
            if col == 0:
                ax.set_ylabel(_wrap(labels.get(name, name), 18), fontsize=9)
    for scale, members in groups.items():
        rows = [names.index(m) for m in members]
        unit = units.get(scale) or next((units[m] for m in members if units.get(m)), "")
        cb = fig.colorbar(images[members[-1]], ax=[axes[r, c] for r in rows for c in range(n_cols)],
                          fraction=0.04, pad=0.02, aspect=12 * len(rows))
        cb.set_label(f"{scale} [{unit}]" if unit else scale, fontsize=8)
        cb.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


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


def metric_points_png(values: Mapping[str, Sequence[float]], path: str | Path,
                      reference: Optional[Mapping[str, tuple[float, float]]] = None,
                      reference_label: str = "reference (mean ± SD)", points_label: str = "cases",
                      title: Optional[str] = None, ylim: tuple[float, float] = (0.0, 1.0)) -> Path:
    """One panel per metric: every case as a dot (for small n, instead of a box plot) and, when given,
    a reference mean ± SD (e.g. a paper's test set) as a bar beside them."""
    plt = _plt()
    names = list(values)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3.2), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        v = np.asarray(values[name], float)
        x = np.zeros(v.size) + np.linspace(-0.08, 0.08, v.size) if v.size > 1 else np.zeros(v.size)
        ax.plot(x, v, "o", color="#4477aa", ms=6, label=points_label)
        if reference and name in reference:
            mean, sd = reference[name]
            ax.errorbar([1.0], [mean], yerr=[sd], fmt="s", color="#cc6677", capsize=6, ms=6, label=reference_label)
        ax.set_xticks([0, 1] if reference else [0], ["phantoms", "paper"] if reference else ["phantoms"], fontsize=8)
        ax.set_xlim(-0.5, 1.5 if reference else 0.5)
        ax.set_ylim(*ylim)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grouped_bars_png(values: Mapping[str, Mapping[str, float]], path: str | Path, ylabel: str = "",
                     title: Optional[str] = None) -> Path:
    """Bars grouped by category: ``values[series][category]`` (e.g. a strategy's value per algorithm),
    category names as horizontal tick labels under each group, one legend entry per series."""
    plt = _plt()
    series = list(values)
    categories = list(dict.fromkeys(c for s in series for c in values[s]))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(1.3 * len(categories) * max(1, len(series)) / 2 + 2.5, 3.4),
                           layout="constrained")
    x = np.arange(len(categories))
    for n, s in enumerate(series):
        heights = [float(values[s].get(c, np.nan)) for c in categories]
        ax.bar(x + (n - (len(series) - 1) / 2) * width, heights, width, label=s)
    ax.set_xticks(x, categories, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=min(4, len(series)), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def panels_png(x: Sequence[float], panels: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
               xlabel: str = "", title: Optional[str] = None) -> Path:
    """Side-by-side line plots sharing ``x``: ``panels[y label][series name] = y values``."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4), squeeze=False, layout="constrained")
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        for name, y in series.items():
            ax.plot(np.asarray(x, float), np.asarray(y, float), "o-", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 or any(series):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
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
