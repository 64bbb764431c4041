"""Digital phantoms with known truth, used by the tests, the demo and the benchmarks.

* :mod:`perfusionai.phantoms.dsc` -- 4D DSC-MRI series with known CBF, CBV, MTT, Tmax,
  TTP, residue shape, dispersion, recirculation, BSW leakage and Rician noise.
"""

from ..cohorts import PHANTOM_COHORT_MARKER, is_phantom_cohort
from .dsc import DSCPhantom, Tissue, make_brain_phantom, make_dsc_phantom

__all__ = ["DSCPhantom", "PHANTOM_COHORT_MARKER", "Tissue", "is_phantom_cohort", "make_dsc_phantom",
           "make_brain_phantom"]
