"""The phantom-cohort marker: how a model learns that it was trained on phantoms.

Every phantom-cohort writer (:mod:`perfusionai.phantoms`) puts :data:`PHANTOM_COHORT_MARKER`
beside its cohort CSV (or in its dataset folder); every training verb checks it with
:func:`is_phantom_cohort` and labels its model "trained on phantoms" without the user saying so.
It lives below the domains and the phantoms so that both can use it (phantoms import the domains,
never the reverse).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The file every phantom-cohort writer puts beside its cohort CSV (or in its dataset folder).
PHANTOM_COHORT_MARKER = "phantom_cohort.json"


def is_phantom_cohort(path: str | os.PathLike) -> bool:
    """True when ``path`` (a cohort CSV, or a folder) lies beside / contains the phantom marker."""
    p = Path(path)
    return ((p if p.is_dir() else p.parent) / PHANTOM_COHORT_MARKER).is_file()
