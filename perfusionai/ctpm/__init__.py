"""DL-CTPM: CT-to-perfusion translation (Ren et al., IJROBP 2021).

Public API::

    from perfusionai.ctpm import CTPMModel, CTPMPredictJob
    model = CTPMModel.load("ctpm_model/")                       # once (needs torch)
    prediction = model.predict(ct_hu, geometry, lung_mask)      # arrays [k, j, i], CT in HU
    prediction.perfusion, prediction.function_high_low, prediction.volumes["both"]["lung_ml"]
    CTPMPredictJob(ct="ct.nii.gz", model="ctpm_model/", out="out/").run()   # files -> folder

* :class:`CTPMPredictJob` -- ``perfusionai ctpm predict`` as a job (argv/JSON round trip);
* :class:`CTPMModel` -- a loaded network with its checked card; :class:`PerfusionPrediction` the result;
* :mod:`.preprocessing` -- lung split, crop + resample to 128x64x64, CT enhancement (Eq. 1),
  SPECT normalisation and discretisation (Eq. 2);
* :mod:`.arnn` -- the 3D attention residual network and the lung-masked BCE (Eq. 3) (torch);
* :mod:`.training` -- cohort CSV -> per-lung samples -> :func:`perfusionai.nn.fit` (torch);
* :mod:`.predict` -- both lungs predicted and put back on the CT grid;
* :mod:`.evaluation` -- Spearman R, SSIM, Dice high/low with the pinned definitions;
* :mod:`.cli` -- ``perfusionai ctpm train|predict|evaluate|phantom``; :mod:`.demo` -- the demo section.

Importing this package needs no torch; loading, predicting with and training a network do.
"""

from .evaluation import evaluate_arrays, evaluate_files, evaluate_maps
from .jobs import CTPMPredictJob
from .predict import CTPMModel, PerfusionPrediction, load_ctpm_model, predict_perfusion

#: The typed result of a CTPM prediction (alias).
CTPMPrediction = PerfusionPrediction

__all__ = ["CTPMModel", "CTPMPrediction", "CTPMPredictJob", "PerfusionPrediction", "evaluate_arrays",
           "evaluate_files", "evaluate_maps", "load_ctpm_model", "predict_perfusion"]
