"""Job specification of ``perfusionai ctpm predict`` (see :mod:`perfusionai.jobs`).

:class:`CTPMPredictJob` names the CT, the optional lung mask, the model and the output folder;
``job.run()`` loads the model once (or takes a loaded :class:`~.predict.CTPMModel`), reads and
checks every input before anything is written, predicts both lungs and writes
``perfusion.nii.gz``, ``function_high_low.nii.gz``, ``lungs.nii.gz`` and ``summary.json`` into
``out`` atomically (never over one of its inputs), returning the typed
:class:`~.predict.PerfusionPrediction` (``perfusion``, ``function_high_low``, ``volumes``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np

from ..io import read_labels
from ..jobs import Job, option, register_job
from ..progress import as_progress
from .predict import CTPMModel, PerfusionPrediction, read_ct, summary_of, write_prediction


@register_job
@dataclass(frozen=True)
class CTPMPredictJob(Job):
    """``perfusionai ctpm predict``: SPECT-like perfusion of both lungs of a CT, on the CT's exact grid."""

    DOMAIN = "ctpm"
    VERB = "predict"

    ct: str = option(None, help="CT in HU: NIfTI/NRRD file or DICOM folder")
    model: str = option(None, help="model folder or .zip from 'perfusionai ctpm train'")
    out: str = option(None, help="output folder")
    lung_mask: Optional[str] = option(None, help="lung mask on the CT grid (default: automatic)")
    device: str = option("auto", help="auto | cpu | cuda")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, f.name, os.fspath(value))

    def run(self, progress=None, predictor: Optional[CTPMModel] = None) -> PerfusionPrediction:
        """Run the job; ``predictor``: a model already loaded from ``self.model`` (batch runs load it once)."""
        report = as_progress(progress)
        timings = {}
        t0 = time.perf_counter()
        model = predictor if predictor is not None else CTPMModel.load(self.model, device=self.device)
        ct = read_ct(self.ct)
        mask = read_labels(self.lung_mask, ct.geometry, "lung mask") if self.lung_mask else None
        timings["read"] = time.perf_counter() - t0
        result = model.predict(np.asarray(ct.array), ct.geometry, mask, progress=report.sub(0.0, 0.9))
        timings.update(result.seconds)
        summary = summary_of(result, ct.geometry, model, self.ct, self.lung_mask)
        summary["job"] = self.to_json()
        summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
        write_prediction(result, self.out, summary, inputs=[self.ct, self.lung_mask, self.model])
        report(1.0, "written")
        return result
