"""Demo/report fragment for the learned DSC methods: the PHAE trained on the demo phantom,
its CBF and MTT maps beside oSVD and Tikhonov, with timings and ROI medians against truth."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..progress import ProgressCallback, as_progress


def run_learned_demo(out_dir: Path, phantom, progress: Optional[ProgressCallback] = None,
                     max_training_seconds: float = 45.0) -> tuple[str, list[Path], dict]:
    """Train the PHAE on ``phantom`` (a :class:`perfusionai.phantoms.dsc.DSCPhantom`) and compare.

    Returns ``(html_fragment, images, timings)``; ``timings`` in seconds per step. Images are
    written into ``out_dir``. Training is capped at ``max_training_seconds``.
    """
    from . import maps as maps_mod
    from .concentration import signal_to_concentration
    from .deconvolution import deconvolve, frame_interval
    from .phae import phae_maps, prepare_subject, train_phae

    report = as_progress(progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask = np.asarray(phantom.brain_mask, bool)
    times = np.asarray(phantom.times, float)
    dt = frame_interval(times)
    try:  # frames before the AIF arrives: the phantom's baseline
        baseline = max(2, int(round(phantom.parameters["aif"]["arrival_s"] / dt)))
    except (KeyError, TypeError, AttributeError):
        from .concentration import detect_bolus_arrival
        baseline = detect_bolus_arrival(phantom.signal, mask).baseline_frames
    conc = signal_to_concentration(phantom.signal, phantom.te, baseline, mask | phantom.aif_mask).concentration
    aif = conc[np.asarray(phantom.aif_mask, bool)].mean(axis=0).astype(np.float64)
    timings: dict = {}
    maps: dict = {}

    report(0.0, "training the PHAE on the demo phantom")
    started = time.perf_counter()
    subject = prepare_subject(conc, aif, times, mask)
    # the small demo phantom gets the settings of the accuracy test: batch 256, lr 3e-3, a fixed
    # 30 epochs (~800 steps) unless the time cap is reached first
    training = train_phae(subject, batch_size=256, learning_rate=3e-3, epochs=30, early_stopping_patience=None,
                          max_seconds=max_training_seconds, seed=0, progress=report.sub(0.0, 0.7),
                          trained_on_phantoms=True, training_description="the demo phantom itself")
    timings["phae_training"] = time.perf_counter() - started
    started = time.perf_counter()
    kh = getattr(phantom, "analysis_kh", phantom.kh)  # kH / tissue kappa: the truth's units
    phae = phae_maps(training.model, conc, aif, times, mask, kh=kh, rho=phantom.rho)
    timings["phae_inference"] = time.perf_counter() - started
    maps["PHAE"] = phae

    curves = conc[mask]
    cbv = maps_mod.cbv_map(curves, aif, dt, kh, phantom.rho)
    for step, (name, method) in enumerate((("oSVD", "oSVD"), ("Tikhonov", "Tikhonov"))):
        report(0.75 + 0.1 * step, name)
        started = time.perf_counter()
        result = deconvolve(curves, aif, dt, method)
        cbf = maps_mod.cbf_map(result.cbf, kh, phantom.rho)
        timings[name.lower()] = time.perf_counter() - started
        volumes = {}
        for key, values in (("cbf", cbf), ("mtt", maps_mod.mtt_map(cbv, cbf))):
            v = np.zeros(mask.shape, np.float32)
            v[mask] = values
            volumes[key] = v
        maps[name] = volumes

    report(0.95, "figures")
    images = []
    panels = {}
    for key in ("cbf", "mtt"):
        for method in maps:
            panels[f"{method} {key.upper()}"] = maps[method][key]
    ranges = {}
    tissue = np.asarray(phantom.tissue_mask, bool)
    for name in panels:
        key = "cbf" if name.endswith("CBF") else "mtt"
        hi = float(np.percentile(phantom.truth[key][tissue], 99)) * 1.5 if tissue.any() else None
        ranges[name] = (0.0, hi if hi else float(np.nanpercentile(panels[name][mask], 99)))
    units = {name: ("mL/100 g/min" if name.endswith("CBF") else "s") for name in panels}
    path = out_dir / "dsc_learned_maps.png"
    try:
        from ..report.figures import montage_png

        montage_png(panels, path, mask=mask, n_slices=3, ranges=ranges, units=units,
                    title="PHAE (trained on phantoms) vs oSVD vs Tikhonov")
    except ImportError:  # pragma: no cover - the report package is part of the foundation
        _simple_montage(panels, path, mask, ranges)
    images.append(path)

    rows = []
    from ..phantoms.dsc import LABELS

    for region in ("grey_matter", "white_matter", "lesion", "tumour"):
        roi = np.asarray(phantom.rois) == LABELS[region]
        if not roi.any():
            continue
        cells = [region.replace("_", " ")]
        for key in ("cbf", "mtt"):
            cells.append(f"{np.median(phantom.truth[key][roi]):.3g}")
            cells.extend(f"{np.nanmedian(maps[m][key][roi]):.3g}" for m in maps)
        rows.append(cells)
    header = ["region", "CBF truth"] + [f"CBF {m}" for m in maps] + ["MTT truth"] + [f"MTT {m}" for m in maps]
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    for cells in rows:
        table += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
    table += "</table>"
    h = training.history
    timing_text = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in timings.items())
    fragment = (
        "<p>Physics-informed autoencoder (Fayolle et al. 2025), <b>trained on phantoms</b>: trained "
        f"self-supervised on the demo phantom's {subject.c.shape[0]} brain voxels for {h.epochs_run} epochs "
        f"(L1 reconstruction, Lorentzian residue, encoder width "
        f"{training.model.architecture['hyperparameters']['base_features']}). Tmax of the PHAE comes from oSVD "
        "(the paper's decoder has no delay). The lesion has a 3 s bolus delay, which the paper's model "
        "absorbs into MTT.</p>"
        f"<p>Timings: {html.escape(timing_text)}.</p>" + table)  # the report draws ``images`` itself
    report(1.0, "learned demo done")
    return fragment, images, {k: round(v, 3) for k, v in timings.items()}


def _simple_montage(panels: dict, path: Path, mask: np.ndarray, ranges: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(np.argmax(mask.sum(axis=(1, 2))))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.4), dpi=100)
    for ax, (name, vol) in zip(np.atleast_1d(axes), panels.items()):
        ax.imshow(np.where(mask[k], vol[k], np.nan), cmap="viridis", vmin=ranges[name][0], vmax=ranges[name][1])
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
