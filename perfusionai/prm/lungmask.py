"""Moved to :mod:`perfusionai.lung` (kept so old imports keep working; import from there)."""

from ..lung.mask import segment_lungs  # noqa: F401
from ..labels import LEFT_LUNG, RIGHT_LUNG  # noqa: F401
