"""The one registry of DSC methods: names, aliases, defaults, which options apply.

Every front end (the library's :class:`perfusionai.dsc.DSCModel`, ``perfusionai dsc maps
--method``, the Slicer module) resolves a method name here and nowhere else:

>>> resolve_method("osvd").name
'oSVD'
>>> resolve_method("Tikhonov").defaults["tikhonov_criterion"]
'gcv'

========== ============== ======================================================= =========
name       kind           defaults                                                needs
========== ============== ======================================================= =========
sSVD       deconvolution  threshold 0.2 (relative to the largest singular value)  core
cSVD       deconvolution  threshold 0.1 (block-circulant, delay-insensitive)      core
oSVD       deconvolution  oscillation-index limit 0.035 (per-voxel threshold)     core
Tikhonov   deconvolution  lambda chosen per voxel by GCV                          core
parametric parametric     delayed gamma residue, one shape per volume (fitted)    core
phae       learned        PHAE trained on the series itself without a model       torch
tmax-net   learned        a trained model is required                             torch
========== ============== ======================================================= =========

Adding a method is one :class:`DSCMethod` entry passed to :func:`register_method` (below, or
from the module that implements it) plus, for a new ``kind``, its runner in
:mod:`perfusionai.dsc.model` (``RUNNERS``).

Options that apply to every method (``COMMON_OPTIONS``): ``kh``, ``rho``, ``baseline_frames``,
``leakage_correction``, ``cbv_integration``, ``cbv_window``, ``refine_tmax``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import ParameterError

#: Options of :class:`perfusionai.dsc.DSCModel` that every method uses.
COMMON_OPTIONS = ("kh", "rho", "baseline_frames", "leakage_correction", "cbv_integration", "cbv_window",
                  "refine_tmax")

#: The method used when none is given.
DEFAULT_METHOD = "oSVD"


@dataclass(frozen=True)
class DSCMethod:
    """One DSC method.

    Attributes
    ----------
    name
        Canonical spelling (what ``summary.json`` records and ``--help`` lists).
    kind
        ``"deconvolution"`` (:func:`perfusionai.dsc.deconvolution.deconvolve`), ``"learned"``
        (:mod:`perfusionai.dsc.learned`, needs torch) or the kind of a method added later;
        :data:`perfusionai.dsc.model.RUNNERS` maps each kind to the code that runs it.
    description
        One line for ``--help``, the README and the Slicer tooltip.
    aliases
        Other accepted spellings (matching is case-insensitive; ``_`` reads as ``-``).
    defaults
        Default value of each method-specific option (``threshold``, ``oi_threshold``, ...).
    options
        The method-specific options that apply (besides :data:`COMMON_OPTIONS`).
    solver
        Key passed to the deconvolution solver (``"ssvd"``, ...), or None.
    extra
        The optional dependency extra it needs (``"learned"``), or None for the core install.
    label
        A display name for the GUI and figures.
    fallback
        For a method that computes only some maps: the method that gives the others
        (its options then apply too).
    """

    name: str
    kind: str
    description: str
    aliases: Tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: Tuple[str, ...] = ()
    solver: Optional[str] = None
    extra: Optional[str] = None
    label: str = ""
    fallback: Optional[str] = None

    @property
    def learned(self) -> bool:
        """True for the learned methods (they need torch, the ``learned`` extra)."""
        return self.kind == "learned"

    @property
    def display(self) -> str:
        return self.label or self.name

    def applies(self, option: str) -> bool:
        """True when ``option`` (a :class:`perfusionai.dsc.DSCModel` option name) affects this method."""
        if option in COMMON_OPTIONS or option in self.options:
            return True
        return self.fallback is not None and METHODS[self.fallback].applies(option)

    def default(self, option: str, value: Any = None) -> Any:
        """``value`` when given, else this method's (or its fallback's) default of ``option``."""
        if value is not None:
            return value
        if option in self.defaults:
            return self.defaults[option]
        return METHODS[self.fallback].default(option) if self.fallback is not None else None


#: Every method by canonical name, in the order ``--help`` lists them.
METHODS: Dict[str, DSCMethod] = {}
_LOOKUP: Dict[str, str] = {}


def _key(text: str) -> str:
    return str(text).strip().lower().replace("_", "-")


def register_method(method: DSCMethod) -> DSCMethod:
    """Add ``method`` to :data:`METHODS` (its name and aliases become resolvable)."""
    spellings = (method.name,) + tuple(method.aliases)
    for spelling in spellings:
        owner = _LOOKUP.get(_key(spelling))
        if owner is not None and owner != method.name:
            raise ValueError(f"DSC method spelling {spelling!r} is already used by {owner}")
    frozen = DSCMethod(method.name, method.kind, method.description, tuple(method.aliases),
                       MappingProxyType(dict(method.defaults)), tuple(method.options), method.solver,
                       method.extra, method.label, method.fallback)
    METHODS[method.name] = frozen
    for spelling in spellings:
        _LOOKUP[_key(spelling)] = method.name
    return frozen


def resolve_method(name) -> DSCMethod:
    """The :class:`DSCMethod` of ``name`` (case-insensitive, aliases accepted).

    Raises :class:`perfusionai.errors.ParameterError` (parameter ``method``) for an unknown name.
    A :class:`DSCMethod` is returned as it is.
    """
    if isinstance(name, DSCMethod):
        return name
    canonical = _LOOKUP.get(_key(name)) if name is not None else None
    if canonical is None:
        raise ParameterError("method", f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[canonical]


def method_names(kind: Optional[str] = None) -> Tuple[str, ...]:
    """Canonical names of every method (of one ``kind`` when given), in registry order."""
    return tuple(m.name for m in METHODS.values() if kind is None or m.kind == kind)


def is_learned(name) -> bool:
    """True when ``name`` is a learned method (needs torch)."""
    return resolve_method(name).learned


def help_text() -> str:
    """``sSVD | cSVD | oSVD | ...`` for ``--method`` help."""
    return " | ".join(METHODS)


_DISCRETISATION = ("discretisation",)

register_method(DSCMethod(
    "sSVD", "deconvolution", "truncated SVD, Toeplitz matrix (Ostergaard 1996); delay-sensitive",
    aliases=("svd", "standard-svd"), defaults={"threshold": 0.2}, options=("threshold",) + _DISCRETISATION,
    solver="ssvd"))
register_method(DSCMethod(
    "cSVD", "deconvolution", "truncated SVD, block-circulant matrix (Wu 2003); delay-insensitive",
    aliases=("circular-svd",), defaults={"threshold": 0.1}, options=("threshold",) + _DISCRETISATION,
    solver="csvd"))
register_method(DSCMethod(
    "oSVD", "deconvolution", "block-circulant SVD with a per-voxel threshold by the oscillation index (Wu 2003)",
    aliases=("oscillation-svd",), defaults={"oi_threshold": 0.035}, options=("oi_threshold",) + _DISCRETISATION,
    solver="osvd"))
register_method(DSCMethod(
    "Tikhonov", "deconvolution", "Tikhonov-regularised SVD, lambda per voxel by GCV (or fixed with tikhonov_lambda)",
    aliases=("tikh",), defaults={"tikhonov_criterion": "gcv", "tikhonov_lambda": None, "fixed_lambda": 0.1,
                                 "tikhonov_floor": 2.0},
    options=("tikhonov_lambda", "tikhonov_criterion", "tikhonov_floor") + _DISCRETISATION, solver="tikhonov"))
register_method(DSCMethod(
    "parametric", "parametric", "delay-aware model fit: delayed gamma-distributed transit times (Mouridsen 2006), "
    "Tmax = fitted delay, CBV by the integral ratio; adds fit_r2 and converged maps",
    aliases=("model-based",), options=("parametric_shape", "parametric_dispersion_s"), label="Parametric"))
register_method(DSCMethod(
    "phae", "learned", "physics-informed autoencoder (Fayolle 2025): MTT learned, CBV by the integral ratio, "
    "Tmax from oSVD; trains on the series itself without a model",
    options=("model_path", "device", "seed"), extra="learned", label="PHAE", fallback="oSVD"))
register_method(DSCMethod(
    "tmax-net", "learned", "learned Tmax network (Sossin); CBV, CBF, MTT, TTP from oSVD; needs a model",
    aliases=("tmaxnet",), options=("model_path", "device"), extra="learned", label="Tmax network",
    fallback="oSVD"))
