"""PRM figures (matplotlib, PNG): the insp/exp density scatter, the overlay montage, the
cohort agreement figure (Xu et al. Fig. 3: patient-level and lobe-level scatter with Pearson r,
Bland-Altman with mean and mean +- 1.96 SD)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..labels import PRM_LABELS
from ..report.figures import _plt
from .classification import ClassificationOptions, median_prefilter


def prm_scatter_png(insp_hu: np.ndarray, exp_hu: np.ndarray, lung: np.ndarray, path: str | Path,
                    options: Optional[ClassificationOptions] = None, title: str = "PRM") -> Path:
    """2D density of (insp HU, exp HU) over the lung voxels with the threshold lines and class colours.

    The HU are median-filtered as for the classification. Arrays ``[k, j, i]`` on one grid.
    """
    from matplotlib.colors import LogNorm

    opts = options or ClassificationOptions()
    plt = _plt()
    lung = np.asarray(lung, dtype=bool)
    i_f = median_prefilter(insp_hu, opts.median_size, opts.median_2d)[lung]
    e_f = median_prefilter(exp_hu, opts.median_size, opts.median_2d)[lung]
    lo, hi = opts.valid_min_hu, opts.valid_max_hu
    fig, ax = plt.subplots(figsize=(5.0, 4.8))
    ti, te = opts.threshold_insp_hu, opts.threshold_exp_hu
    quads = {1: (ti, hi, te, hi), 2: (ti, hi, lo, te), 3: (lo, ti, lo, te), 4: (lo, ti, te, hi)}
    for label, (x0, x1, y0, y1) in quads.items():
        info = PRM_LABELS[label]
        colour = info.rgb if label != 4 else (0.75, 0.75, 0.75)
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, color=colour, alpha=0.25, lw=0))
        # class names in a legend under the axes, clear of the data and the threshold lines
        ax.add_patch(plt.Rectangle((x0, y0), 0, 0, color=colour, alpha=0.5, lw=0, label=info.name))
    inside = (i_f >= lo - 50) & (i_f <= hi + 50) & (e_f >= lo - 50) & (e_f <= hi + 50)
    if inside.any():
        h = ax.hist2d(i_f[inside], e_f[inside], bins=120, range=[[lo - 50, hi + 50], [lo - 50, hi + 50]],
                      norm=LogNorm(), cmap="viridis", cmin=1)
        fig.colorbar(h[3], ax=ax, label="voxels")
    ax.axvline(ti, color="k", lw=1)
    ax.axhline(te, color="k", lw=1)
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls=":")
    ax.set_xlim(lo - 50, hi + 50)
    ax.set_ylim(lo - 50, hi + 50)
    ax.set_xlabel(f"inspiration [HU] (threshold {ti:g})")
    ax.set_ylabel(f"expiration [HU] (threshold {te:g})")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8, frameon=False)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def prm_overlay_png(background_hu: np.ndarray, prm: np.ndarray, path: str | Path, n_slices: int = 4,
                    title: str = "PRM over the reference CT",
                    spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    """Axial slices and one coronal slice of the PRM classes (standard colours) over the CT
    (window -1000..200 HU).

    ``background_hu`` and ``prm`` are ``[k, j, i]`` arrays on one grid; ``spacing`` is the voxel size
    in mm along (i, j, k), so that every panel shows the anatomy at its true proportions.
    """
    from matplotlib.colors import ListedColormap

    plt = _plt()
    prm = np.asarray(prm)
    bg = np.asarray(background_hu, dtype=float)
    si, sj, sk = (float(v) for v in spacing)
    ks = np.nonzero(prm.reshape(prm.shape[0], -1).any(axis=1))[0]
    if ks.size == 0:
        ks = np.arange(prm.shape[0])
    slices = [int(v) for v in np.linspace(ks.min(), ks.max(), n_slices + 2)[1:-1]]
    colours = [(0, 0, 0, 0)] + [(*PRM_LABELS[v].rgb, 1.0) for v in (1, 2, 3, 4)]
    cmap = ListedColormap(colours)
    js = np.nonzero(prm.any(axis=(0, 2)))[0]
    j_mid = int(np.median(js)) if js.size else prm.shape[1] // 2
    n_k, n_j, n_i = prm.shape
    # panels of one width; the figure is as tall as the tallest panel in mm, so no empty band
    # is left between the title and the images
    panel_in = 2.6
    height_in = panel_in * max(n_j * sj, n_k * sk) / (n_i * si)
    fig, axes = plt.subplots(1, n_slices + 1, figsize=(panel_in * (n_slices + 1), height_in + 1.0))
    fig.subplots_adjust(left=0.01, right=0.99, wspace=0.05, top=1 - 0.45 / (height_in + 1.0),
                        bottom=0.45 / (height_in + 1.0))
    for ax, k in zip(axes[:-1], slices):
        ax.imshow(bg[k], cmap="gray", vmin=-1000, vmax=200, interpolation="nearest", aspect=sj / si)
        ax.imshow(np.ma.masked_equal(prm[k], 0), cmap=cmap, vmin=0, vmax=4, alpha=0.7, interpolation="nearest",
                  aspect=sj / si)
        ax.set_title(f"axial slice k={k}", fontsize=8)
        ax.axis("off")
    ax = axes[-1]
    ax.imshow(bg[::-1, j_mid, :], cmap="gray", vmin=-1000, vmax=200, interpolation="nearest", aspect=sk / si)
    ax.imshow(np.ma.masked_equal(prm[::-1, j_mid, :], 0), cmap=cmap, vmin=0, vmax=4, alpha=0.7,
              interpolation="nearest", aspect=sk / si)
    ax.set_title(f"coronal slice j={j_mid}", fontsize=8)
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=PRM_LABELS[v].rgb, ec="k") for v in (1, 2, 3, 4)]
    fig.legend(handles, [PRM_LABELS[v].name for v in (1, 2, 3, 4)], loc="lower center", ncol=4, fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / (height_in + 1.0), va="top")
    path = Path(path)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def cohort_agreement_png(patient: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                         lobe: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                         path: str | Path) -> Path:
    """Xu et al. Fig. 3: per class a row of (patient scatter + r, lobe scatter + r, Bland-Altman).

    ``patient[cls] = (predicted %, reference %)``; same for ``lobe`` (may be empty).
    """
    from ..metrics import bland_altman, pearson

    plt = _plt()
    classes = list(patient)
    fig, axes = plt.subplots(len(classes), 3, figsize=(11, 3.3 * len(classes)), squeeze=False)
    for row, cls in enumerate(classes):
        for col, data in enumerate((patient.get(cls), lobe.get(cls) if lobe else None)):
            ax = axes[row, col]
            if data is None or len(data[0]) == 0:
                ax.axis("off")
                continue
            pred, ref = np.asarray(data[0], float), np.asarray(data[1], float)
            ax.scatter(ref, pred, s=14, alpha=0.7)
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            label = f"r = {pearson(pred, ref)[0]:.2f}" if pred.size >= 3 else f"n = {pred.size}"
            ax.set_title(f"%{cls} {'patient' if col == 0 else 'lobe'} level: {label}", fontsize=9)
            ax.set_xlabel("reference %")
            ax.set_ylabel("predicted %")
        pred, ref = (np.asarray(v, float) for v in patient[cls])
        ba = bland_altman(pred, ref)
        ax = axes[row, 2]
        ax.scatter(0.5 * (pred + ref), pred - ref, s=14, alpha=0.7)
        ax.axhline(ba.mean_difference, color="r", lw=1)
        ax.axhline(ba.lower_limit, color="r", ls="--", lw=1)
        ax.axhline(ba.upper_limit, color="r", ls="--", lw=1)
        ax.set_title(f"%{cls} Bland-Altman: {ba.mean_difference:.2f} +- {1.96 * ba.sd_difference:.2f}",
                     fontsize=9)
        ax.set_xlabel("mean %")
        ax.set_ylabel("predicted - reference %")
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
