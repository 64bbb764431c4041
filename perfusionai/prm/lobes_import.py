"""Moved to :mod:`perfusionai.lung.lobes` (kept so old imports keep working; import from there)."""

from ..lung.lobes import CIP_AIRWAY_TYPE, CONVENTIONS, import_lobes  # noqa: F401
