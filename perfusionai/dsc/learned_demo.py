"""Demo/report fragment for the learned DSC methods: the PHAE trained on the demo phantom,
its CBF and MTT maps beside oSVD and Tikhonov, with timings and ROI medians against truth."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..progress import ProgressCallback, as_progress


def run_learned_demo(out_dir: Path, phantom, progress: Optional[ProgressCallback] = None,
                     max_training_seconds: Optional[float] = None, *, slices: Optional[Sequence[int]] = None,
                     windows: Optional[Mapping[str, tuple[float, float]]] = None,
                     reference_maps: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
                     background: Optional[np.ndarray] = None,
                     max_training_voxels: int = 8000, epochs: int = 6) -> tuple[str, list, dict]:
    """Train the PHAE on ``phantom`` (a :class:`perfusionai.phantoms.dsc.DSCPhantom`) and compare.

    Parameters
    ----------
    slices, windows, background
        The k slices, the CBF/MTT colour windows (``{"cbf": (lo, hi), "mtt": ...}``) and the grey
        underlay of the DSC section's other figures, so this figure compares with them.
    reference_maps
        ``{method label: {"cbf": [k, j, i], "mtt": [k, j, i]}}`` already computed (e.g. the demo's oSVD
        and Tikhonov runs); None computes oSVD and Tikhonov here.
    epochs, max_training_voxels, max_training_seconds
        Training runs ``epochs`` epochs of ``max_training_voxels`` randomly drawn brain voxels each (seeded:
        deterministic); ``max_training_seconds`` (wall clock, None: no limit, the demo's choice so that its
        numbers do not depend on the machine's load) stops it earlier, and the report says so. The maps
        cover every brain voxel.

    Returns ``(html_fragment, figures, timings)``; ``timings`` in seconds per step. Figures
    (:class:`perfusionai.report.html.Figure`) are written into ``out_dir``.
    """
    from . import maps as maps_mod
    from .concentration import signal_to_concentration
    from .phae import phae_maps, prepare_subject, train_phae

    report = as_progress(progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask = np.asarray(phantom.brain_mask, bool)
    times = np.asarray(phantom.times, float)
    dt = float(np.median(np.diff(times)))
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
    # a fixed number of short epochs, batch 512 and Adam 5e-3 (measured on this phantom: grey-matter CBF
    # within 5 % of truth in about 100 steps)
    training = train_phae(subject, batch_size=512, learning_rate=5e-3, epochs=epochs, early_stopping_patience=None,
                          max_seconds=max_training_seconds, max_training_voxels=max_training_voxels, seed=0,
                          progress=report.sub(0.0, 0.8), trained_on_phantoms=True,
                          training_description="the demo phantom itself")
    timings["PHAE training"] = time.perf_counter() - started
    report(0.8, "PHAE maps")
    started = time.perf_counter()
    kh = getattr(phantom, "analysis_kh", phantom.kh)  # kH / tissue kappa: the truth's units
    phae = phae_maps(training.model, conc, aif, times, mask, kh=kh, rho=phantom.rho)
    timings["PHAE maps (every brain voxel)"] = time.perf_counter() - started
    maps["PHAE (trained on phantoms)"] = {k: np.asarray(phae[k], float) for k in ("cbf", "mtt")}

    if reference_maps is None:
        from .deconvolution import deconvolve

        curves = conc[mask]
        cbv = maps_mod.cbv_map(curves, aif, dt, kh, phantom.rho)
        reference_maps = {}
        for name, method in (("oSVD", "oSVD"), ("Tikhonov (GCV)", "Tikhonov")):
            started = time.perf_counter()
            result = deconvolve(curves, aif, dt, method)
            cbf = maps_mod.cbf_map(result.cbf, kh, phantom.rho)
            timings[name] = time.perf_counter() - started
            volumes = {}
            for key, values in (("cbf", cbf), ("mtt", maps_mod.mtt_map(cbv, cbf))):
                v = np.zeros(mask.shape, np.float32)
                v[mask] = values
                volumes[key] = v
            reference_maps[name] = volumes
    for name, volumes in reference_maps.items():
        maps[name] = {k: np.asarray(volumes[k], float) for k in ("cbf", "mtt")}

    report(0.95, "figures")
    from ..report.figures import montage_png, pick_slices, shared_window
    from ..report.html import Figure

    tissue = np.asarray(phantom.tissue_mask, bool) & mask
    shown = list(slices) if slices is not None else pick_slices(tissue, 3, tissue.shape[0])
    phae_name = "PHAE (trained on phantoms)"
    names = {"cbf": "CBF", "mtt": "MTT"}
    rows, labels, scales, diffs, ranges = {}, {}, {}, [], {}
    for key in ("cbf", "mtt"):
        q = names[key]
        truth = np.asarray(phantom.truth[key], float)
        rows[f"truth {key}"] = truth
        labels[f"truth {key}"] = f"{q} truth"
        scales[f"truth {key}"] = q
        for method in maps:
            rows[f"{method} {key}"] = maps[method][key]
            labels[f"{method} {key}"] = f"{q} {method}"
            scales[f"{method} {key}"] = q
        for method in (phae_name, "oSVD"):
            if method in maps:
                rows[f"{method} {key} diff"] = maps[method][key] - truth
                labels[f"{method} {key} diff"] = f"{q} {method.split(' (')[0]} minus truth"
                scales[f"{method} {key} diff"] = f"{q} error"
                diffs.append(f"{method} {key} diff")
        ranges[q] = (windows or {}).get(key) or shared_window([truth] + [maps[m][key] for m in maps], tissue)
    units = {"CBF": "mL/100 g/min", "CBF error": "mL/100 g/min", "MTT": "s", "MTT error": "s"}
    path = montage_png(rows, out_dir / "dsc_learned_maps.png", background=background, mask=tissue, slices=shown,
                       labels=labels, scales=scales, differences=diffs, ranges=ranges, units=units,
                       title="PHAE (trained on phantoms) against oSVD, Tikhonov and the truth")
    images = [Figure(path, "CBF and MTT of the PHAE, trained on this phantom, beside oSVD, Tikhonov and the truth "
                           "on one window per quantity: the PHAE's difference rows are paler than oSVD's (blue for "
                           "CBF, red for MTT) except in the delayed lesion, whose 3 s delay its decoder cannot "
                           "represent (MTT too long there).")]

    rows_t = []
    from ..phantoms.dsc import LABELS

    for region in ("grey_matter", "white_matter", "lesion", "tumour"):
        roi = np.asarray(phantom.rois) == LABELS[region]
        if not roi.any():
            continue
        cells = [region.replace("_", " ")]
        for key in ("cbf", "mtt"):
            cells.append(float(np.median(phantom.truth[key][roi])))
            cells.extend(float(np.nanmedian(maps[m][key][roi])) for m in maps)
        rows_t.append(cells)
    header = (["region", "CBF truth"] + [f"CBF {m}" for m in maps] + ["MTT truth"] + [f"MTT {m}" for m in maps])
    from ..report.html import fmt, table_html

    h = training.history
    requested, epochs = epochs, int(h.epochs_run)
    seconds = timings["PHAE training"]
    stopped = (f" (stopped by the time limit of {fmt(float(max_training_seconds or 0))} s; {requested} epochs "
               "were planned)") if epochs < requested else ""
    timing_text = ", ".join(f"{k} {fmt(v)} s" for k, v in timings.items())
    fragment = (
        "<p>Physics-informed autoencoder (Fayolle et al. 2025), <b>trained on phantoms</b>: trained "
        f"self-supervised on the DSC section's phantom: its {subject.c.shape[0]} brain voxels, {epochs} "
        f"epoch{'s' if epochs != 1 else ''} of {min(subject.c.shape[0], max_training_voxels)} randomly drawn "
        f"voxels each, in {fmt(seconds)} s"
        f"{stopped} (L1 reconstruction, Lorentzian residue, batch 512, Adam 5e-3, encoder width "
        f"{training.model.architecture['hyperparameters']['base_features']}), then applied to every brain voxel. "
        "Its Tmax would come from oSVD (the paper's decoder has no delay), and the lesion's 3 s bolus delay is "
        "absorbed into its MTT.</p>"
        f"<p>Timings: {html.escape(timing_text)}.</p>"
        + table_html(header, rows_t, caption="ROI medians: PHAE (trained on phantoms), oSVD and Tikhonov against "
                                             "the truth (CBF mL/100 g/min, MTT s)"))
    report(1.0, "learned demo done")
    return fragment, images, {k: round(v, 3) for k, v in timings.items()}
