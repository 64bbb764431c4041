"""Lung and lobe anatomy shared by every lung domain (CT PRM, PRM from MRI, CT-to-perfusion, lobes).

* :func:`segment_lungs` -- right/left lung mask of a chest CT in HU (threshold pipeline, no learning);
* :func:`lung_sides` -- right (1) / left (2) labels of a user's binary or 1/2 lung mask;
  :func:`lungs_from_lobes` -- the same from a lobe map (lobes 1-3 right, 4-6 left:
  :data:`perfusionai.labels.RIGHT_LOBES` / :data:`~perfusionai.labels.LEFT_LOBES`);
  :func:`lung_labels_of` -- either, for statistics;
* :func:`import_lobes` -- third-party lobe maps (TotalSegmentator, lungmask, CIP, ...) onto the project's
  lobes 1-6 (:data:`LOBE_CONVENTIONS`).

Arrays are ``[k, j, i]`` with a :class:`perfusionai.io.Geometry` (LPS, mm). Only numpy, scipy and
the project's io/labels below it: the domains import this package, never the reverse.
"""

from ..labels import LEFT_LOBES, LEFT_LUNG, LUNG_OF_LOBE, RIGHT_LOBES, RIGHT_LUNG
from .lobes import CONVENTIONS as LOBE_CONVENTIONS
from .lobes import import_lobes, normalise_convention
from .mask import segment_lungs
from .sides import body_midline_x, lps_x, lung_labels_of, lung_sides, lungs_from_lobes

__all__ = ["LEFT_LOBES", "LEFT_LUNG", "LOBE_CONVENTIONS", "LUNG_OF_LOBE", "RIGHT_LOBES", "RIGHT_LUNG",
           "body_midline_x", "import_lobes", "lps_x", "lung_labels_of", "lung_sides", "lungs_from_lobes",
           "normalise_convention", "segment_lungs"]
