"""Diffusion-relaxation signal models, protocols and parameter names.

Units used everywhere in :mod:`perfusionai.dr`:

* b-values in s/mm^2 (what scanners and FSL ``bvals`` files store);
* diffusion coefficients (ADC, D, D*, Dv, Dt) in um^2/ms (= 1e-3 mm^2/s);
  internally the models use b in ms/um^2 (``b / 1000``) so that ``b * D`` is dimensionless;
* echo times and T2 in ms;
* signal fractions (f, F) and kurtosis K dimensionless;
* S0 in the signal's own arbitrary units.

Array axis order: signals are ``(..., n_measurements)`` (measurement last, matching the
4D series convention ``[k, j, i, t]``); ``bvals`` and ``tes`` are ``(n_measurements,)``.

Map names by model:

* ``clinical``: ``s0, adc, adc_fast, adc_slow, f_proxy``;
* ``t2ivimkurtosis`` (the advanced model): ``s0, f, dv, t2v, dt, k, t2t``;
* ``ivim`` (classic bi-exponential, single TE): ``s0, f, dstar, d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

#: Map names produced by each model, in parameter order.
CLINICAL_MAPS = ("s0", "adc", "adc_fast", "adc_slow", "f_proxy")
ADVANCED_MAPS = ("s0", "f", "dv", "t2v", "dt", "k", "t2t")
IVIM_MAPS = ("s0", "f", "dstar", "d")
MODEL_MAPS = {"clinical": CLINICAL_MAPS, "t2ivimkurtosis": ADVANCED_MAPS, "ivim": IVIM_MAPS}
MODELS = tuple(MODEL_MAPS)

#: Units of every map (for summaries, reports and Slicer tables).
MAP_UNITS = {
    "s0": "a.u.", "adc": "um2/ms", "adc_fast": "um2/ms", "adc_slow": "um2/ms", "f_proxy": "1",
    "f": "1", "dv": "um2/ms", "t2v": "ms", "dt": "um2/ms", "k": "1", "t2t": "ms",
    "dstar": "um2/ms", "d": "um2/ms",
}

#: b-value subsets of the clinical fits (s/mm^2), Macarro et al. 2025.
CLINICAL_FAST_B = (0.0, 50.0, 100.0)
CLINICAL_SLOW_B = (100.0, 400.0, 900.0)

#: The advanced diffusion-relaxation protocol: 7 b-values at each of 3 echo times (21 images).
#: The b-values are those of the VHIO TRSE protocol (radiomicsgroup/dMRIMC); the echo times are not
#: published: 105 and 120 ms appear in the paper's Fig. 1, the minimum echo time (80 ms) is our choice.
ADVANCED_B = (0.0, 50.0, 100.0, 400.0, 900.0, 1200.0, 1600.0)
ADVANCED_TE = (80.0, 105.0, 120.0)
#: The clinical protocol: the 5 lowest b-values at the minimum echo time.
CLINICAL_B = (0.0, 50.0, 100.0, 400.0, 900.0)

#: Default bounds of the T2-IVIM-Kurtosis fit, in the order of ADVANCED_MAPS; S0 bounds are
#: multiples of the voxel's maximum signal (the defaults of the authors' fitter, bodymritools
#: getT2ivimkurtReg: S0 [0.8, 12] x max, f [0, 1], Dv [4, 100], T2v [150, 250], Dt [0.2, 3], K [0, 5],
#: T2t [20, 140]).
ADVANCED_LOWER = (0.8, 0.0, 4.0, 150.0, 0.2, 0.0, 20.0)
ADVANCED_UPPER = (12.0, 1.0, 100.0, 250.0, 3.0, 5.0, 140.0)

#: Default bounds of the classic IVIM fit (order of IVIM_MAPS); S0 as multiples of the voxel's
#: maximum signal. f is not capped below 1 (tumours and liver have large f); D* and D follow the
#: bounds OSIPI hands to fitters (0.005-0.2 and 0-0.005 mm^2/s).
IVIM_LOWER = (0.5, 0.0, 5.0, 0.0)
IVIM_UPPER = (2.0, 1.0, 200.0, 5.0)


@dataclass(frozen=True)
class Protocol:
    """The acquisition scheme of a diffusion series.

    Attributes
    ----------
    bvals
        b-values in s/mm^2, shape ``(n,)``, one per volume of the 4D series.
    tes
        Echo times in ms, shape ``(n,)``, or None when unknown (allowed for the clinical and
        IVIM models, which assume one echo time).
    """

    bvals: np.ndarray
    tes: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bvals", np.asarray(self.bvals, dtype=float).reshape(-1))
        if self.tes is not None:
            object.__setattr__(self, "tes", np.asarray(self.tes, dtype=float).reshape(-1))

    @property
    def n(self) -> int:
        return int(self.bvals.size)

    def to_dict(self) -> dict:
        return {"bvals": self.bvals.tolist(), "tes": None if self.tes is None else self.tes.tolist()}

    @staticmethod
    def advanced() -> "Protocol":
        """The 21-image advanced protocol (TE-major order: all b at TE 80, then 105, then 120 ms)."""
        b = np.tile(ADVANCED_B, len(ADVANCED_TE))
        te = np.repeat(ADVANCED_TE, len(ADVANCED_B))
        return Protocol(b, te)

    @staticmethod
    def clinical() -> "Protocol":
        """The 5-image clinical protocol (b 0, 50, 100, 400, 900 at the minimum TE)."""
        return Protocol(np.asarray(CLINICAL_B), np.full(len(CLINICAL_B), min(ADVANCED_TE)))

    def clinical_indices(self, clinical_b=CLINICAL_B) -> np.ndarray:
        """Indices of the clinical subset: the given b-values at this protocol's minimum TE."""
        te_min = None if self.tes is None else float(np.min(self.tes))
        idx = []
        for b in clinical_b:
            hit = np.isclose(self.bvals, b, atol=0.5)
            if te_min is not None:
                hit &= np.isclose(self.tes, te_min, atol=1e-6)
            found = np.flatnonzero(hit)
            if found.size == 0:
                raise ValueError(f"b = {b:g} s/mm^2 at the minimum TE is not in the protocol")
            idx.append(int(found[0]))
        return np.asarray(idx)


def monoexponential(bvals, s0, adc):
    """S = S0 exp(-b ADC); bvals s/mm^2 ``(n,)``, s0 and adc (um^2/ms) ``(...)`` -> ``(..., n)``."""
    b = np.asarray(bvals, float) / 1000.0
    return np.asarray(s0)[..., None] * np.exp(-b * np.asarray(adc)[..., None])


def ivim(bvals, s0, f, dstar, d):
    """Classic bi-exponential IVIM: S = S0 (f exp(-b D*) + (1 - f) exp(-b D)).

    bvals s/mm^2 ``(n,)``; parameters ``(...)`` with D*, D in um^2/ms; returns ``(..., n)``.
    """
    b = np.asarray(bvals, float) / 1000.0
    f = np.asarray(f)[..., None]
    return np.asarray(s0)[..., None] * (f * np.exp(-b * np.asarray(dstar)[..., None])
                                        + (1 - f) * np.exp(-b * np.asarray(d)[..., None]))


def t2ivimkurtosis(bvals, tes, s0, f, dv, t2v, dt, k, t2t):
    """T2-IVIM-Kurtosis signal (Macarro et al. 2025):

    S = S0 [ f exp(-b Dv - TE/T2v) + (1 - f) exp(-b Dt + K (b Dt)^2 / 6 - TE/T2t) ]

    bvals s/mm^2 and tes ms, both ``(n,)``; parameters ``(...)`` (Dv, Dt in um^2/ms, T2 in ms);
    returns ``(..., n)``.
    """
    b = np.asarray(bvals, float) / 1000.0
    te = np.asarray(tes, float)
    p = [np.asarray(x, float)[..., None] for x in (s0, f, dv, t2v, dt, k, t2t)]
    s0_, f_, dv_, t2v_, dt_, k_, t2t_ = p
    vascular = np.exp(-b * dv_ - te / t2v_)
    bd = b * dt_
    tissue = np.exp(-bd + k_ * bd * bd / 6.0 - te / t2t_)
    return s0_ * (f_ * vascular + (1 - f_) * tissue)


def signal(model: str, protocol: Protocol, maps: dict) -> np.ndarray:
    """Forward model by name: ``maps`` name -> array ``(...)``; returns ``(..., n)``."""
    if model == "t2ivimkurtosis":
        if protocol.tes is None:
            raise ValueError("the T2-IVIM-Kurtosis model needs echo times")
        return t2ivimkurtosis(protocol.bvals, protocol.tes, *(maps[k] for k in ADVANCED_MAPS))
    if model == "ivim":
        return ivim(protocol.bvals, *(maps[k] for k in IVIM_MAPS))
    if model == "monoexponential":
        return monoexponential(protocol.bvals, maps["s0"], maps["adc"])
    raise ValueError(f"no forward model for {model!r}")
