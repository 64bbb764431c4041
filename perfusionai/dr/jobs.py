"""Job specifications of ``perfusionai dr fit`` and ``perfusionai dr predict`` (see :mod:`perfusionai.jobs`).

A job names its input files, options and output folder; ``job.run()`` reads and checks every
input before anything is written, runs the core (:class:`~.model.DRModel` or a trained learner)
and writes the outputs into ``out`` atomically, returning the typed result
(:class:`~.model.DRFit` or :class:`~.model.DRPrediction`). The same object is the command line
(``job.to_argv()``) and the JSON recorded in ``summary.json`` (``job.to_json()``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from typing import Optional

from ..io import read_mask
from ..jobs import Job, option, register_job
from ..progress import as_progress
from .model import DRFit, DRModel, DRPrediction


def _paths_as_text(job: Job) -> None:
    """Paths given as ``os.PathLike`` are stored as text, so a job equals its parsed command line."""
    for f in fields(job):
        value = getattr(job, f.name)
        if isinstance(value, os.PathLike):
            object.__setattr__(job, f.name, os.fspath(value))


@register_job
@dataclass(frozen=True)
class DRFitJob(Job):
    """``perfusionai dr fit``: fit a signal model to a 4D diffusion series.

    Writes ``out/<map>.nii.gz`` on the input grid, ``out/status.nii.gz`` (1 converged, -1 iteration
    limit, 0 not fitted) and ``out/summary.json``.
    """

    DOMAIN = "dr"
    VERB = "fit"

    dwi: str = option(None, help="4D diffusion series (volumes last)")
    bvals: str = option(None, help="b-values in s/mm2, one per volume (FSL bvals style)")
    out: str = option(None, help="output folder")
    tes: Optional[str] = option(None, help="echo times in ms, one per volume (or one for all)")
    mask: Optional[str] = option(None, help="mask on the series grid")
    model: str = option("clinical", help="clinical | t2ivimkurtosis | ivim")
    noise_sigma: Optional[float] = option(None, help="noise SD (signal units) for the noise-floor correction")
    noise_model: str = option("rician", help="rician | offset")
    grid_points: int = option(4, help="t2ivimkurtosis start grid values per non-linear parameter")

    def __post_init__(self) -> None:
        _paths_as_text(self)

    def run(self, progress=None) -> DRFit:
        from .pipeline import read_dwi_and_protocol

        progress = as_progress(progress)
        started = time.perf_counter()
        series, protocol = read_dwi_and_protocol(self.dwi, self.bvals, self.tes, self.model)
        model = DRModel(protocol, self.model, noise_sigma=self.noise_sigma, noise_model=self.noise_model,
                        grid_points=self.grid_points)
        mask = read_mask(self.mask, series.geometry) if self.mask is not None else None
        progress(0.05, "data read")
        fit = model.fit(series.array, mask, progress=progress.sub(0.05, 0.9), source=self.dwi)
        fit.inputs = {"dwi": self.dwi, "bvals": self.bvals, "tes": self.tes, "mask": self.mask}
        fit.seconds = time.perf_counter() - started
        fit.save(self.out, series.geometry, extra={"job": self.to_json()},
                 inputs=[self.dwi, self.bvals, self.tes, self.mask])
        progress(1.0, "maps written")
        return fit


@register_job
@dataclass(frozen=True)
class DRPredictJob(Job):
    """``perfusionai dr predict``: advanced T2-IVIM-Kurtosis maps from a clinical series and a trained model.

    Writes ``out/<map>.nii.gz``, for signal-to-signal models also ``out/predicted_signals.nii.gz``
    (21 volumes) with ``out/predicted_bvals`` and ``out/predicted_tes``, and ``out/summary.json``.
    """

    DOMAIN = "dr"
    VERB = "predict"

    dwi: str = option(None, help="4D clinical diffusion series")
    bvals: str = option(None, help="b-values in s/mm2 (FSL style)")
    model: str = option(None, help="model folder written by 'perfusionai dr train'")
    out: str = option(None, help="output folder")
    tes: Optional[str] = option(None, help="echo times in ms (optional; the minimum TE is used)")
    mask: Optional[str] = option(None, help="region to predict")

    def __post_init__(self) -> None:
        _paths_as_text(self)

    def run(self, progress=None) -> DRPrediction:
        from .learners import load_model
        from .pipeline import predict_series, read_dwi_and_protocol

        progress = as_progress(progress)
        started = time.perf_counter()
        model = load_model(self.model)
        series, protocol = read_dwi_and_protocol(self.dwi, self.bvals, self.tes, "clinical")
        mask = read_mask(self.mask, series.geometry) if self.mask else None
        progress(0.1, "predicting")
        maps, signals, info = predict_series(series.array, protocol, model, mask, progress=progress.sub(0.1, 0.9),
                                             source=self.dwi)
        result = DRPrediction(maps, signals, info,
                              inputs={"dwi": self.dwi, "bvals": self.bvals, "tes": self.tes, "mask": self.mask},
                              model_path=self.model)
        result.seconds = time.perf_counter() - started
        result.save(self.out, series.geometry, extra={"job": self.to_json()},
                    inputs=[self.dwi, self.bvals, self.tes, self.mask, self.model])
        progress(1.0, "done")
        return result
