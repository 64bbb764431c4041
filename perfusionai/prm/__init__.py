"""Parametric response mapping (PRM) of the lungs: paired inspiratory/expiratory CT, and PRM from MRI.

CT PRM in the DIPY manner::

    from perfusionai.prm import PRMModel
    fit = PRMModel().fit(insp, exp, lobes=lobes)     # two perfusionai.io.Volume in HU
    fit.labels, fit.stats["whole_lung"]["emph"], fit.save("prm/")

* :class:`PRMModel` / :class:`PRMFit` (:func:`compute_prm` as a function), :class:`PRMOptions`,
  :class:`ClassificationOptions` (thresholds -950/-856 HU, valid range, median),
  :class:`RegistrationOptions` / :func:`registration_recipe` (ANTs recipes ``fast``/``accurate``);
* :class:`PRMCTJob` (``prm ct``) and :class:`PRMPredictJob` (``prm predict``): one job specification per
  verb, serialised to argv and JSON, ``job.run()`` returns the typed result;
* PRM from MRI: :func:`predict_subject` -> :class:`MRIPRMResult`; :func:`train_from_cohort`,
  :func:`run_ablation` (these two need torch and are imported on first use);
* :func:`classify_prm`, :func:`prm_statistics`, :func:`evaluate_case`, :func:`evaluate_files`.

Lung masks, the right/left split and lobe conventions are in :mod:`perfusionai.lung`. Importing this
package imports neither ANTsPy nor torch (they are required, through :mod:`perfusionai.deps`, by
registration and by the MRI network only).
"""

from .classification import ClassificationOptions, classify_prm
from .evaluation import evaluate_case, evaluate_files
from .jobs import PRMCTJob, PRMPredictJob
from .mri_subject import MRIPRMResult, predict_subject
from .pipeline import GuardError, PRMFit, PRMModel, PRMOptions, PRMResult, compute_prm, write_prm_outputs
from .registration import RegistrationOptions, registration_recipe
from .stats import prm_statistics



def __getattr__(name):  # the torch-backed MRI functions, imported on first use
    if name == "train_from_cohort":
        from .mri_training import train_from_cohort

        return train_from_cohort
    if name in ("run_ablation", "AblationResult"):
        from . import mri_evaluation

        return getattr(mri_evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ClassificationOptions", "GuardError", "MRIPRMResult", "PRMCTJob", "PRMFit", "PRMModel", "PRMOptions",
           "PRMPredictJob", "PRMResult", "RegistrationOptions", "classify_prm", "compute_prm", "evaluate_case",
           "evaluate_files", "predict_subject", "prm_statistics", "registration_recipe", "write_prm_outputs",
           "train_from_cohort", "run_ablation", "AblationResult"]
