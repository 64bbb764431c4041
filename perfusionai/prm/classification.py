"""Voxel-wise PRM classification (Galban et al., Nat Med 2012) of co-registered insp/exp CT.

Labels (ARCHITECTURE.md "PRM labels"; research/prm.md 1.5):

===  ==============  ===========================  ======
 0   outside/excl.   outside the lung, or I or E outside the valid HU range
 1   normal          I >  thr_insp and E >  thr_exp   green
 2   fSAD            I >  thr_insp and E <= thr_exp   yellow
 3   emphysema       I <= thr_insp and E <= thr_exp   red
 4   uncategorized   I <= thr_insp and E >  thr_exp   white
===  ==============  ===========================  ======

Boundary convention (CMI / Galban-lab code, research/prm.md 1.2 item 5): a value
exactly on a threshold goes to the *diseased* side (E = -856 is air trapping,
I = -950 is emphysema). The valid range is closed on both ends: -1000 and -500
are valid. Defaults: thresholds -950 (insp) / -856 (exp), valid range
[-1000, -500] HU on both scans, 3x3x3 median pre-filter on both scans (the
filter sees the whole image, not only the lung, as the public implementations do).
"""

from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Optional

import numpy as np
from scipy import ndimage

from ..errors import ParameterError

OUTSIDE = 0
NORMAL = 1
FSAD = 2
EMPH = 3
UNCATEGORIZED = 4

#: label -> key used in prm_stats.json / csv
def _class_keys() -> dict:
    from ..labels import PRM_LABELS

    keys = {value: info.short for value, info in PRM_LABELS.items()}
    assert keys == {NORMAL: "normal", FSAD: "fsad", EMPH: "emph", UNCATEGORIZED: "uncategorized"}
    return keys


CLASS_KEYS = _class_keys()


@dataclass(frozen=True)
class ClassificationOptions:
    """Thresholds in HU; ``median_size`` 3 = 3x3x3 median (0 or 1 = off), ``median_2d`` = 3x3 per slice."""

    threshold_insp_hu: float = -950.0
    threshold_exp_hu: float = -856.0
    valid_min_hu: float = -1000.0
    valid_max_hu: float = -500.0
    median_size: int = 3
    median_2d: bool = False

    def validate(self) -> None:
        if not self.valid_min_hu < self.valid_max_hu:
            raise ParameterError("valid_range", f"lower bound {self.valid_min_hu} must be below the upper "
                                                f"bound {self.valid_max_hu} HU")
        if self.median_size not in (0, 1, 3, 5):
            raise ParameterError("median", f"median filter size must be 0 (off), 3 or 5, got {self.median_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def median_prefilter(volume_hu: np.ndarray, size: int = 3, two_d: bool = False) -> np.ndarray:
    """Median filter ``[k, j, i]`` HU with a ``size^3`` cube (or ``1 x size x size`` per slice)."""
    if size <= 1:
        return np.asarray(volume_hu, dtype=np.float32)
    footprint = (1, size, size) if two_d else (size, size, size)
    return ndimage.median_filter(np.asarray(volume_hu, dtype=np.float32), size=footprint, mode="nearest")


def classify_prm(
    insp_hu: np.ndarray,
    exp_hu: np.ndarray,
    lung_mask: np.ndarray,
    options: Optional[ClassificationOptions] = None,
) -> np.ndarray:
    """PRM label map of co-registered inspiratory and expiratory CT.

    Parameters
    ----------
    insp_hu, exp_hu
        ``[k, j, i]`` HU on the same grid (``exp_hu`` already warped onto the insp grid,
        or the other way round for the insp -> exp direction).
    lung_mask
        ``[k, j, i]`` boolean (or labels, nonzero = lung) on the same grid.
    options
        Thresholds, valid range and the median pre-filter.

    Returns
    -------
    numpy.ndarray
        ``[k, j, i]`` uint8 labels 0-4 (see module docstring).
    """
    opts = options or ClassificationOptions()
    opts.validate()
    insp = np.asarray(insp_hu)
    expi = np.asarray(exp_hu)
    if insp.shape != expi.shape or insp.shape != np.shape(lung_mask):
        raise ValueError(f"shapes differ: insp {insp.shape}, exp {expi.shape}, mask {np.shape(lung_mask)}")
    i_f = median_prefilter(insp, opts.median_size, opts.median_2d)
    e_f = median_prefilter(expi, opts.median_size, opts.median_2d)
    lung = np.asarray(lung_mask) != 0
    valid = (lung & (i_f >= opts.valid_min_hu) & (i_f <= opts.valid_max_hu)
             & (e_f >= opts.valid_min_hu) & (e_f <= opts.valid_max_hu))
    insp_low = i_f <= opts.threshold_insp_hu
    exp_low = e_f <= opts.threshold_exp_hu
    # Encode the four quadrants as 1 + 1*exp_low + 2*insp_low, then map to the label numbering.
    quadrant = exp_low.astype(np.uint8) + 2 * insp_low.astype(np.uint8)
    lut = np.array([NORMAL, FSAD, UNCATEGORIZED, EMPH], dtype=np.uint8)
    labels = lut[quadrant]
    labels[~valid] = OUTSIDE
    return labels
