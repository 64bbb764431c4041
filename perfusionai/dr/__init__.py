"""Diffusion-relaxation MRI: clinical mono-exponential metrics, the T2-IVIM-Kurtosis model, classic IVIM,
and learned prediction of the advanced protocol from the clinical one (Macarro et al., JMRI 2025).

Public API (DIPY style)::

    from perfusionai.dr import DRModel, Protocol
    fit = DRModel(Protocol(bvals, tes), model="t2ivimkurtosis").fit(dwi, mask=tumour)   # dwi [k, j, i, n]
    fit.dt, fit.summary(), fit.save("out/", geometry)

* :class:`DRModel` / :class:`DRFit` -- one acquisition + options, ``.fit(dwi, mask)`` -> named maps;
* :class:`DRFitJob` (``perfusionai dr fit``) and :class:`DRPredictJob` (``perfusionai dr predict``) --
  file-to-folder runs, serialisable to the command line and JSON; :class:`DRPrediction` the result of a
  learned prediction;
* :mod:`.models` -- protocols, signal models, map names and units (b s/mm^2, D um^2/ms, T2 ms);
* :mod:`.fitting` -- fits vectorised over voxels (log-linear; grid + batched Levenberg-Marquardt);
* :mod:`.pipeline` -- arrays and files in, maps on the input grid out (used by the jobs and Slicer);
* :mod:`.learners` -- signal-to-signal and maps-to-maps learners, model folders (scikit-learn or torch);
* :mod:`.evaluation` -- leave-one-patient-out BI/DI and the training-set-size study.

Importing this package needs neither torch nor scikit-learn (only the learners do).
"""

from .jobs import DRFitJob, DRPredictJob
from .model import DRFit, DRModel, DRPrediction
from .models import ADVANCED_MAPS, CLINICAL_MAPS, IVIM_MAPS, MAP_UNITS, MODEL_MAPS, MODELS, Protocol

__all__ = ["ADVANCED_MAPS", "CLINICAL_MAPS", "DRFit", "DRFitJob", "DRModel", "DRPrediction", "DRPredictJob",
           "IVIM_MAPS", "MAP_UNITS", "MODEL_MAPS", "MODELS", "Protocol"]
