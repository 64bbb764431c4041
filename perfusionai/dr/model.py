"""The diffusion-relaxation model in the DIPY manner: ``DRModel(protocol, model=...).fit(dwi) -> DRFit``.

A :class:`DRModel` holds the acquisition (:class:`~.models.Protocol`: b-values in s/mm^2, echo
times in ms) and the fit options; :meth:`DRModel.fit` fits a ``[k, j, i, n]`` series (volumes
last) voxel by voxel, vectorised, and returns a :class:`DRFit` whose maps are attributes
(``fit.adc``, ``fit.dt``, ...; names and units in :mod:`.models`). :meth:`DRFit.save` writes the
maps, ``status.nii.gz`` and ``summary.json`` into a folder atomically.

:class:`DRPrediction` is the result of a learned prediction of the advanced protocol
(:class:`perfusionai.dr.DRPredictJob`), with the same ``summary()``/``save()``.

Errors name parameters (``bvals``, ``tes``, ``model``, ``grid_points``) as
:class:`perfusionai.errors.ParameterError`; the command line shows them as flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .. import __version__
from ..errors import ParameterError
from ..io import Geometry, atomic_output_dir, write_json, write_series, write_volume
from . import models as M

NOISE_MODELS = ("rician", "offset")


@dataclass
class DRFit:
    """Maps of one fit, all ``[k, j, i]`` float32 on the series grid (0 where not fitted).

    Attributes
    ----------
    model
        ``clinical``, ``t2ivimkurtosis`` or ``ivim``.
    maps
        name -> map (names of :data:`perfusionai.dr.models.MODEL_MAPS`; units in ``MAP_UNITS``);
        each map is also an attribute (``fit.adc``).
    status
        ``[k, j, i]`` int8: 1 converged, -1 iteration limit, 0 not fitted.
    protocol
        The checked acquisition.
    info
        What was done (method, b-values used, voxel counts).
    options
        The fit options used.
    """

    model: str
    maps: dict
    status: np.ndarray
    protocol: M.Protocol
    info: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    seconds: Optional[float] = None

    def __getattr__(self, name: str):
        maps = self.__dict__.get("maps") or {}
        if name in maps:
            return maps[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or map {name!r}")

    @property
    def fitted(self) -> np.ndarray:
        """``[k, j, i]`` boolean: the voxels that were fitted."""
        return self.status != 0

    def median(self) -> dict:
        """Median of every map over the fitted voxels."""
        region = self.fitted
        return {name: float(np.median(m[region])) if region.any() else None for name, m in self.maps.items()}

    def summary(self) -> dict:
        """The JSON summary written as ``summary.json`` (inputs, protocol, units, options, medians)."""
        out = {
            "perfusionai": __version__,
            "command": "dr fit",
            "model": self.model,
            "inputs": dict(self.inputs),
            "protocol": self.protocol.to_dict(),
            "units": {name: M.MAP_UNITS[name] for name in self.maps} | {"bvals": "s/mm2", "tes": "ms"},
            "options": dict(self.options),
            "fit": dict(self.info),
            "median_in_fitted_voxels": self.median(),
        }
        if self.seconds is not None:
            out["seconds"] = round(float(self.seconds), 3)
        return out

    def save(self, folder: str | os.PathLike, geometry: Geometry, extra: Optional[dict] = None,
             inputs: Optional[list] = None) -> Path:
        """Write ``<map>.nii.gz``, ``status.nii.gz`` and ``summary.json`` into ``folder`` (atomically).

        ``geometry`` is the series' grid; ``extra`` entries are added to the summary (e.g. the job).
        """
        summary = self.summary() | {"geometry": geometry.to_dict()} | dict(extra or {})
        with _output_dir(folder, inputs) as stage:
            for name, values in self.maps.items():
                write_volume(values, geometry, stage / f"{name}.nii.gz")
            write_volume(self.status, geometry, stage / "status.nii.gz")
            write_json(summary, stage / "summary.json")
        return Path(folder)


def _output_dir(folder, inputs):
    """``atomic_output_dir`` refusing an output that would overwrite one of the run's ``inputs``."""
    return atomic_output_dir(folder, inputs=[p for p in (inputs or []) if p is not None])


class DRModel:
    """A diffusion-relaxation signal model for one acquisition (DIPY style).

    Parameters
    ----------
    protocol
        b-values (s/mm^2) and optional echo times (ms) of every volume; a
        :class:`~perfusionai.dr.models.Protocol` or ``(bvals, tes)``.
    model
        ``clinical`` (log-linear mono-exponential metrics s0, adc, adc_fast, adc_slow, f_proxy),
        ``t2ivimkurtosis`` (s0, f, dv, t2v, dt, k, t2t; needs >= 2 echo times) or ``ivim``
        (s0, f, dstar, d at one echo time).
    noise_sigma
        Noise SD of the magnitude images (signal units): enables the noise-floor correction of the
        non-linear fits.
    noise_model
        ``rician`` (exact Rician mean) or ``offset`` (sqrt(S^2 + pi/2 sigma^2)); with ``noise_sigma``.
    grid_points
        t2ivimkurtosis start grid: values per non-linear parameter (2-8; 4 gives 1024 candidates).
    options
        Further options of the fit functions of :mod:`.fitting` (bounds, clinical b subsets).

    Examples
    --------
    >>> fit = DRModel(Protocol(bvals, tes), model="t2ivimkurtosis").fit(dwi, mask=tumour)  # doctest: +SKIP
    >>> fit.dt.shape, fit.summary()["median_in_fitted_voxels"]["dt"]                      # doctest: +SKIP
    """

    def __init__(self, protocol, model: str = "clinical", *, noise_sigma: Optional[float] = None,
                 noise_model: str = "rician", grid_points: int = 4, **options) -> None:
        if not isinstance(protocol, M.Protocol):
            bvals, tes = protocol
            protocol = M.Protocol(bvals, tes)
        if model not in M.MODELS:
            raise ParameterError("model", f"unknown model {model!r}; choose from {', '.join(M.MODELS)}")
        if noise_model not in NOISE_MODELS:
            raise ParameterError("noise_model", f"must be one of {', '.join(NOISE_MODELS)}, got {noise_model!r}")
        if noise_sigma is not None and not (np.isfinite(noise_sigma) and noise_sigma > 0):
            raise ParameterError("noise_sigma", f"must be a positive number, got {noise_sigma}")
        if not 2 <= int(grid_points) <= 8:
            raise ParameterError("grid_points", f"must be between 2 and 8, got {grid_points}")
        self.protocol = protocol
        self.model = model
        self.noise_sigma = noise_sigma
        self.noise_model = noise_model
        self.grid_points = int(grid_points)
        self.options = dict(options)

    @property
    def map_names(self) -> tuple:
        return M.MODEL_MAPS[self.model]

    def fit_options(self) -> dict:
        """The options handed to the fit function (as recorded in ``summary.json``)."""
        options = dict(self.options)
        if self.model == "t2ivimkurtosis":
            options.setdefault("grid_points", self.grid_points)
        if self.noise_sigma is not None and self.model != "clinical":
            options.setdefault("noise_model", self.noise_model)
        return options

    def fit(self, dwi: np.ndarray, mask: Optional[np.ndarray] = None, progress=None,
            source: str = "diffusion series") -> DRFit:
        """Fit every voxel of ``dwi`` ``[k, j, i, n]`` (inside ``mask`` ``[k, j, i]`` when given).

        Voxels without signal are left unfitted (status 0, maps 0); NaN or infinite values inside
        the mask (the whole series without one) are refused, naming ``source``.
        """
        import time

        from .pipeline import fit_series

        started = time.perf_counter()
        options = self.fit_options()
        mask = None if mask is None else np.asarray(mask, bool)
        maps, status, info = fit_series(np.asarray(dwi), self.protocol, self.model, mask, self.noise_sigma,
                                        progress=progress, source=source, **options)
        checked = M.Protocol(self.protocol.bvals, None if self.protocol.tes is None else
                             np.broadcast_to(self.protocol.tes, self.protocol.bvals.shape))
        return DRFit(self.model, maps, status, checked, info, {"noise_sigma": self.noise_sigma, **options},
                     seconds=time.perf_counter() - started)


@dataclass
class DRPrediction:
    """Advanced T2-IVIM-Kurtosis maps predicted from a clinical series by a trained learner.

    ``maps`` name -> ``[k, j, i]`` float32 (0 outside the predicted region; also attributes);
    ``signals`` ``[k, j, i, 21]`` predicted advanced-protocol signals (signal-to-signal) or None;
    ``info`` algorithm, strategy, voxels, trained_on_phantoms, advanced_protocol.
    """

    maps: dict
    signals: Optional[np.ndarray]
    info: dict
    inputs: dict = field(default_factory=dict)
    model_path: Optional[str] = None
    seconds: Optional[float] = None

    def __getattr__(self, name: str):
        maps = self.__dict__.get("maps") or {}
        if name in maps:
            return maps[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or map {name!r}")

    @property
    def trained_on_phantoms(self) -> bool:
        return bool(self.info.get("trained_on_phantoms"))

    @property
    def region(self) -> np.ndarray:
        """``[k, j, i]`` boolean: every predicted voxel (a map may be 0 there, e.g. f clipped at 0)."""
        from .pipeline import fitted_region

        return fitted_region(self.maps)

    def summary(self) -> dict:
        region = self.region
        out = {"perfusionai": __version__, "command": "dr predict", "model": self.model_path, **self.info,
               "inputs": dict(self.inputs),
               "units": {k: M.MAP_UNITS[k] for k in self.maps},
               "median": {k: float(np.median(v[region])) for k, v in self.maps.items()}}
        if self.seconds is not None:
            out["seconds"] = round(float(self.seconds), 3)
        return out

    def save(self, folder: str | os.PathLike, geometry: Geometry, extra: Optional[dict] = None,
             inputs: Optional[list] = None) -> Path:
        """Write ``<map>.nii.gz`` (and ``predicted_signals.nii.gz``, ``predicted_bvals``,
        ``predicted_tes`` for signal-to-signal) and ``summary.json`` into ``folder`` atomically."""
        summary = self.summary() | dict(extra or {})
        with _output_dir(folder, inputs) as stage:
            for name, values in self.maps.items():
                write_volume(values, geometry, stage / f"{name}.nii.gz")
            if self.signals is not None:
                write_series(self.signals, geometry, stage / "predicted_signals.nii.gz")
                adv = self.info["advanced_protocol"]
                (stage / "predicted_bvals").write_text(" ".join(f"{b:g}" for b in adv["bvals"]) + "\n")
                (stage / "predicted_tes").write_text(" ".join(f"{t:g}" for t in adv["tes"]) + "\n")
            write_json(summary, stage / "summary.json")
        return Path(folder)
