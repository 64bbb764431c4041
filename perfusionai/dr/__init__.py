"""Diffusion-relaxation MRI: clinical mono-exponential metrics, the T2-IVIM-Kurtosis model, classic IVIM,
and learned prediction of the advanced protocol from the clinical one (Macarro et al., JMRI 2025).

* :mod:`.models` -- protocols, signal models, map names and units (b s/mm^2, D um^2/ms, T2 ms);
* :mod:`.fitting` -- fits vectorised over voxels (log-linear; grid + batched Levenberg-Marquardt);
* :mod:`.pipeline` -- 4D series in, maps on the input grid out (used by the CLI and Slicer);
* :mod:`.learners` -- signal-to-signal and maps-to-maps learners, model directories;
* :mod:`.evaluation` -- leave-one-patient-out BI/DI and the training-set-size study.
"""

from .models import ADVANCED_MAPS, CLINICAL_MAPS, IVIM_MAPS, MODEL_MAPS, MODELS, Protocol

__all__ = ["ADVANCED_MAPS", "CLINICAL_MAPS", "IVIM_MAPS", "MODEL_MAPS", "MODELS", "Protocol"]
