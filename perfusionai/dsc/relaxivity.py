"""Quadratic delta R2* of whole blood for the AIF (``--aif-quadratic A B``); tissue stays linear.

Gradient-echo delta R2* is linear in the contrast-agent concentration ``C`` in tissue but quadratic
in large vessels filled with whole blood (van Osch et al., MRM 2003;49:1067-1076; Kjolby et al.,
MRM 2006;56:187-197):

    delta R2*_blood(C) = A C + B C^2          (1/s; C in mM, A in 1/(s mM), B in 1/(s mM^2))

Treating the arterial delta R2* as linear overstates the AIF at its peak, so CBV and CBF read low.
The conversion inverts the quadratic per arterial voxel and expresses the AIF as ``A C``, the
delta R2* a linear blood relaxivity ``A`` would give:

    A C = (sqrt(1 + 4 beta dR) - 1) / (2 beta),   beta = B / A^2  (s)

so the tissue curves (linear) and the factor ``kH`` keep their meaning; only the shape ``beta``
matters for the AIF. The coefficients themselves could not be found in a source this project could
check (the searches of peer toolboxes, the OSIPI code and the web pages at hand gave none), so
``A`` and ``B`` are options with no default: take them from the papers above for the field strength,
sequence and haematocrit at hand.

Arrays are time-last (``(t,)``, ``(n, t)`` or ``[k, j, i, t]``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ParameterError


def validate_quadratic(coefficients: Sequence[float]) -> tuple:
    """``(A, B)`` as floats, A > 0 and B >= 0, else :class:`ParameterError` (``aif_quadratic``)."""
    try:
        a, b = (float(v) for v in coefficients)
    except (TypeError, ValueError):
        raise ParameterError("aif_quadratic", f"give two numbers A B (delta R2* = A C + B C^2), got "
                                              f"{coefficients!r}") from None
    if not (np.isfinite(a) and np.isfinite(b) and a > 0 and b >= 0):
        raise ParameterError("aif_quadratic", f"need A > 0 (1/(s mM)) and B >= 0 (1/(s mM^2)), got A={a}, B={b}")
    return a, b


def quadratic_to_linear(delta_r2star: np.ndarray, a: float, b: float) -> np.ndarray:
    """Arterial delta R2* (1/s, any shape) under ``A C + B C^2`` -> ``A C`` (1/s, float64).

    Negative samples (baseline noise) follow the same continuous inverse; below ``-1/(4 beta)``,
    where the quadratic has no real root, the value is held at ``-1/(2 beta)``.
    """
    a, b = validate_quadratic((a, b))
    d = np.asarray(delta_r2star, dtype=np.float64)
    if b == 0:
        return d.copy()
    beta = b / (a * a)
    return (np.sqrt(np.maximum(1.0 + 4.0 * beta * d, 0.0)) - 1.0) / (2.0 * beta)


def linear_to_quadratic(linear: np.ndarray, a: float, b: float) -> np.ndarray:
    """``A C`` (1/s) -> the whole-blood delta R2* ``A C + B C^2`` (1/s); the forward model."""
    a, b = validate_quadratic((a, b))
    x = np.asarray(linear, dtype=np.float64)
    return x + (b / (a * a)) * x * x
