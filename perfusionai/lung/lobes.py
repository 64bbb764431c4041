"""Import third-party lobe label maps into the project's 6-lobe convention.

Project convention (ARCHITECTURE.md): 1 right upper, 2 right middle, 3 right lower,
4 left upper, 5 lingula, 6 left lower. Conventions without a lingula put it into
the left upper lobe (lobe 5 is then absent). Sources (research/prm.md 1.3, 2.1, 2.2;
``hoffba/cmi_R2015a:scripts/LungCT/getLobeTags.m``; CIP ``ChestConventions.xml``):

=====================  ==================================================================
 convention             labels
=====================  ==================================================================
 ``project``            1 RUL, 2 RML, 3 RLL, 4 LUL, 5 lingula, 6 LLL (identity)
 ``totalsegmentator``   v2 task ``total``: 10 LUL, 11 LLL, 12 RUL, 13 RML, 14 RLL
 ``totalsegmentator1``  v1: 13 LUL, 14 LLL, 15 RUL, 16 RML, 17 RLL
 ``lungmask``           lungmask ``LTRCLobes``: 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL
 ``cip``                Chest Imaging Platform: value = region + 256 * type; regions
                        4 RUL, 5 RML, 6 RLL, 7 LUL, 8 LLL; type 2 (airway) is dropped
 ``yacta``              YACTA: 10 RUL, 20 RML, 30 RLL, 40 LUL, 50 lingula, 60 LLL
 ``imbio``              Imbio: 11 RUL, 12 RLL, 13 RML, 21 LUL, 22 LLL
 ``tustison``           ntustison proton-MRI atlas: 1 LLL, 2 LUL, 3 RLL, 4 RML, 5 RUL
=====================  ==================================================================

Labels not listed (other organs of TotalSegmentator, airways) become 0.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import ParameterError, input_error

CONVENTIONS: dict[str, dict[int, int]] = {
    "project": {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6},
    "totalsegmentator": {10: 4, 11: 6, 12: 1, 13: 2, 14: 3},
    "totalsegmentator1": {13: 4, 14: 6, 15: 1, 16: 2, 17: 3},
    "lungmask": {1: 4, 2: 6, 3: 1, 4: 2, 5: 3},
    "cip": {4: 1, 5: 2, 6: 3, 7: 4, 8: 6},
    "yacta": {10: 1, 20: 2, 30: 3, 40: 4, 50: 5, 60: 6},
    "imbio": {11: 1, 12: 3, 13: 2, 21: 4, 22: 6},
    "tustison": {1: 6, 2: 4, 3: 3, 4: 2, 5: 1},
}
CIP_AIRWAY_TYPE = 2
_ALIASES = {"total": "totalsegmentator", "totalseg": "totalsegmentator", "ts": "totalsegmentator",
            "totalsegmentatorv2": "totalsegmentator", "totalsegmentatorv1": "totalsegmentator1",
            "ltrc": "lungmask", "lungmaskltrc": "lungmask", "ltrclobes": "lungmask", "native": "project"}


def normalise_convention(convention: str) -> str:
    """The canonical name of a lobe convention (case-insensitive; ``-``/``_`` ignored; aliases such as
    ``total``, ``ltrc``); raises :class:`ParameterError` (``lobe_convention``) for an unknown one."""
    key = str(convention).lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in CONVENTIONS:
        raise ParameterError("lobe_convention", f"unknown lobe convention {convention!r}; "
                                                f"choose one of {', '.join(sorted(CONVENTIONS))}")
    return key


def import_lobes(labels: np.ndarray, convention: str = "project", source: Optional[str] = None) -> np.ndarray:
    """Map a lobe label map ``[k, j, i]`` of ``convention`` onto the project's lobes 1-6.

    Parameters
    ----------
    labels
        Integer label map ``[k, j, i]``.
    convention
        One of :data:`CONVENTIONS` (case-insensitive; ``-``/``_`` ignored).
    source
        File name used in error messages.

    Returns
    -------
    numpy.ndarray
        ``[k, j, i]`` uint8 with values 0-6.
    """
    key = normalise_convention(convention)
    values = np.asarray(labels).astype(np.int64)
    if key == "cip":
        region = values & 255
        value_type = values >> 8
        values = np.where(value_type == CIP_AIRWAY_TYPE, 0, region)
    lut_size = max(int(values.max(initial=0)), max(CONVENTIONS[key])) + 1
    if values.min(initial=0) < 0:
        raise input_error(source, "lobe map has negative labels")
    lut = np.zeros(lut_size, dtype=np.uint8)
    for src, dst in CONVENTIONS[key].items():
        lut[src] = dst
    out = lut[values]
    if not out.any():
        present = np.unique(values)[:12]
        raise input_error(source, f"no lobe of the {key!r} convention found (labels present: "
                                  f"{', '.join(str(int(v)) for v in present)}); check the lobe convention")
    return out
