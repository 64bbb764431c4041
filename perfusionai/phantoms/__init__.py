"""Digital phantoms with known truth, used by the tests, the demo and the benchmarks.

* :mod:`perfusionai.phantoms.dsc` -- 4D DSC-MRI series with known CBF, CBV, MTT, Tmax,
  TTP, residue shape, dispersion, recirculation, BSW leakage and Rician noise.
"""

from pathlib import Path

from .dsc import DSCPhantom, Tissue, make_brain_phantom, make_dsc_phantom

#: The file every phantom-cohort writer puts beside its cohort CSV (or in its dataset folder), so
#: that a model trained on it is labelled "trained on phantoms" without the user saying so.
PHANTOM_COHORT_MARKER = "phantom_cohort.json"


def is_phantom_cohort(path) -> bool:
    """True when ``path`` (a cohort CSV, or a folder) lies beside / contains the phantom marker."""
    p = Path(path)
    return ((p if p.is_dir() else p.parent) / PHANTOM_COHORT_MARKER).is_file()


__all__ = ["DSCPhantom", "PHANTOM_COHORT_MARKER", "Tissue", "is_phantom_cohort", "make_dsc_phantom",
           "make_brain_phantom"]
