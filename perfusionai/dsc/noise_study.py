"""The noise-robustness study of the learned-DSC papers, as a library function.

:func:`noise_study` degrades a series to each SNR level (Gaussian noise so that every voxel's
baseline SNR, mean / SD of the pre-bolus frames, becomes the level), fits every method with
:class:`perfusionai.dsc.DSCModel` and tabulates the median of CBF, MTT and Tmax inside the mask
(and per ROI label), with the error against truth maps when they are given: the median
absolute relative error for CBF and MTT, the median absolute error in seconds for Tmax (whose
truth is often 0). :func:`write_noise_study` writes ``noise_study.csv/.json/.png``.

Time: each level refits every method; PHAE without a model retrains on every degraded series
(about 4 min per level on 2 CPU cores, so the default 5 levels take about 20 min; pass a
trained ``phae_model`` or fewer levels/methods for a quick run).

Arrays: signal ``[k, j, i, t]``, masks and truth maps ``[k, j, i]``, times ``(t,)`` s.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..deps import require
from ..errors import ParameterError
from ..io import atomic_output_dir, write_json
from ..progress import ProgressCallback, as_progress
from . import concentration as conc_mod
from .evaluation import degrade_to_snr
from .maps import DEFAULT_KH, DEFAULT_RHO, median_in_mask
from .methods import resolve_method
from .model import DSCModel

DEFAULT_SNR_LEVELS = (50.0, 40.0, 30.0, 20.0, 10.0)
DEFAULT_METHODS = ("oSVD", "Tikhonov", "sSVD", "cSVD", "phae")
STUDY_MAPS = ("cbf", "mtt", "tmax")
#: maps whose error is absolute (seconds) rather than relative: their truth can be 0
ABSOLUTE_ERROR_MAPS = ("tmax",)
SNR_DEFINITION = "mean / SD of the baseline frames per voxel (Gaussian noise added)"


@dataclass
class NoiseStudyResult:
    """Rows ``{snr, method, region, map, median, [truth_median, median_abs_rel_error |
    median_abs_error_s], seconds}`` and the settings they were made with."""

    rows: list
    snr_levels: list
    methods: list
    baseline_frames: int
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"snr_levels": self.snr_levels, "methods": self.methods, "baseline_frames": int(self.baseline_frames),
                "snr_definition": SNR_DEFINITION, "notes": self.notes, "rows": self.rows}


def noise_study(signal: np.ndarray, times: np.ndarray, te: float, mask: Optional[np.ndarray] = None,
                aif_mask: Optional[np.ndarray] = None, snr_levels: Sequence[float] = DEFAULT_SNR_LEVELS,
                methods: Sequence[str] = DEFAULT_METHODS, baseline_frames: Optional[int] = None,
                rois: Optional[np.ndarray] = None, truth: Optional[Mapping[str, np.ndarray]] = None,
                kh: float = DEFAULT_KH, rho: float = DEFAULT_RHO, seed: int = 0,
                phae_model: Optional[str] = None, tmax_model: Optional[str] = None,
                series_is_phantom: bool = False, source: str = "DSC series",
                progress: Optional[ProgressCallback] = None) -> NoiseStudyResult:
    """Degrade ``signal`` to each SNR of ``snr_levels`` and fit every method (module doc).

    ``rois`` int labels ``[k, j, i]`` (statistics per label too); ``truth`` ``{"cbf"|"mtt"|"tmax":
    [k, j, i]}`` adds the errors; the baseline is detected once (as :class:`DSCModel` would) and
    shared by every level and method; the AIF is recomputed at every level (automatic without
    ``aif_mask``). ``phae_model`` / ``tmax_model``: model paths (PHAE without one retrains on
    each degraded series; tmax-net needs one).
    """
    report = as_progress(progress)
    entries = [resolve_method(m) for m in methods]
    if any(e.name == "tmax-net" for e in entries) and tmax_model is None:
        raise ParameterError("tmax_model", "the noise study of tmax-net needs a trained Tmax network")
    for level in snr_levels:
        if not level > 0:
            raise ParameterError("snr", f"SNR levels must be positive, got {level}")
    truth = dict(truth or {})
    brain = np.ones(np.asarray(signal).shape[:3], bool) if mask is None else np.asarray(mask, bool)
    baseline = baseline_frames or conc_mod.earliest_bolus_arrival(signal, mask, aif_mask, name=source).baseline_frames
    regions = {"mask": brain}
    if rois is not None:
        for label in np.unique(rois[rois > 0]):
            regions[f"label_{int(label)}"] = rois == label
    levels = sorted((float(x) for x in snr_levels), reverse=True)
    rows = []
    total = len(levels) * len(entries)
    done = 0
    for level in levels:
        noisy = degrade_to_snr(signal, level, baseline, seed=seed)
        for entry in entries:
            model_path = phae_model if entry.name == "phae" else (tmax_model if entry.name == "tmax-net" else None)
            step = report.sub(done / total, (done + 1) / total)
            step(0.0, f"SNR {level:g}: {entry.name}")
            started = time.perf_counter()
            fit = DSCModel(te, times, method=entry.name, kh=kh, rho=rho, model_path=model_path,
                           baseline_frames=baseline, series_is_phantom=series_is_phantom,
                           timing_source=source).fit(noisy, mask=mask, aif_mask=aif_mask, progress=step,
                                                     source=source)
            seconds = time.perf_counter() - started
            for region, selection in regions.items():
                for name in STUDY_MAPS:
                    median = median_in_mask(fit.maps[name], selection)
                    row = {"snr": level, "method": entry.name, "region": region, "map": name,
                           "median": float("nan") if median is None else median, "seconds": round(seconds, 3)}
                    if name in truth:
                        row.update(_errors(fit.maps[name][selection], np.asarray(truth[name])[selection], name))
                    rows.append(row)
            done += 1
    report(1.0, "done")
    notes = ["Tmax error is the median absolute error in seconds (its truth is often 0); CBF and MTT errors "
             "are median absolute relative errors"] if truth else []
    return NoiseStudyResult(rows=rows, snr_levels=levels, methods=[e.name for e in entries],
                            baseline_frames=int(baseline), notes=notes)


def _errors(estimate: np.ndarray, truth: np.ndarray, name: str) -> dict:
    finite = np.isfinite(truth) & np.isfinite(estimate)
    if name in ABSOLUTE_ERROR_MAPS:
        if not finite.any():
            return {}
        return {"truth_median": float(np.median(truth[finite])),
                "median_abs_error_s": float(np.median(np.abs(estimate[finite] - truth[finite])))}
    ok = finite & (truth != 0)
    if not ok.any():
        return {}
    return {"truth_median": float(np.median(truth[ok])),
            "median_abs_rel_error": float(np.median(np.abs(estimate[ok] - truth[ok]) / np.abs(truth[ok])))}


CSV_KEYS = ("snr", "method", "region", "map", "median", "truth_median", "median_abs_rel_error",
            "median_abs_error_s", "seconds")


def write_noise_study(result: NoiseStudyResult, out, inputs=()) -> Path:
    """Write ``noise_study.csv``, ``noise_study.json`` and ``noise_study.png`` into ``out`` atomically
    (refused when they would replace one of the ``inputs`` files)."""
    with atomic_output_dir(out, inputs=[p for p in inputs if p]) as stage:
        with open(stage / "noise_study.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(CSV_KEYS))
            w.writeheader()
            for row in result.rows:
                w.writerow({k: row.get(k, "") for k in CSV_KEYS})
        write_json(result.to_json(), stage / "noise_study.json")
        noise_plot(result.rows, stage / "noise_study.png")
    return Path(out)


def noise_plot(rows: list, path) -> None:
    """One panel per map: the error against truth (or the median) versus SNR, one line per method."""
    matplotlib = require("matplotlib", "the noise-study figure")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "the noise-study figure")
    with_truth = any("truth_median" in r for r in rows)
    fig, axes = plt.subplots(1, len(STUDY_MAPS), figsize=(11, 3.4), dpi=100)
    for ax, name in zip(axes, STUDY_MAPS):
        key = ("median_abs_error_s" if name in ABSOLUTE_ERROR_MAPS else "median_abs_rel_error") if with_truth \
            else "median"
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["snr"], r.get(key)) for r in rows if r["method"] == method and r["map"] == name
                   and r["region"] == "mask" and r.get(key) is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="o", label=method)
        ax.set_xlabel("SNR")
        ax.set_title(name.upper())
        ax.set_ylabel({"median_abs_error_s": "median |error| (s)", "median_abs_rel_error": "median |relative error|",
                       "median": "median in mask"}[key])
        ax.invert_xaxis()
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
