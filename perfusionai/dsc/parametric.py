"""Delay-aware parametric deconvolution of DSC curves (``--method parametric``).

Model (Mouridsen et al., MRM 2006, gamma-distributed transit times; Ostergaard indicator dilution)
---------------------------------------------------------------------------------------------
Per voxel,

    C_t(t) = F * int C_a(tau - delay) R(t - tau) dtau,      F = CBF (1/s), R(0) = 1,

with the residue ``R(t) = Q(alpha, alpha t / MTT_r)`` -- the survival function of a gamma
distribution of transit times with shape ``alpha`` and mean ``MTT_r`` (``Q`` the regularised upper
incomplete gamma function). ``alpha = 1`` is the exponential residue (one well-mixed compartment),
large ``alpha`` approaches the box (plug flow), ``alpha`` 2-4 the "linear"/gamma shapes in between.
Four parameters per voxel: ``F``, ``delay`` (s; negative when the tissue leads the AIF),
``MTT_r`` (s) and ``alpha`` (from the set :data:`DEFAULT_SHAPES`).

Assumptions, stated where the maps are used:

* the measured AIF, linearly interpolated between its samples, is the true input up to a pure
  delay (no dispersion between the AIF site and the tissue; a dispersed bolus reads as a longer
  MTT and a lower CBF, as for every deconvolution);
* the tissue curve is purely intravascular (no leakage: apply the BSW correction first), with
  Gaussian noise of equal variance on every frame (unweighted least squares);
* the residue is monotonic with its maximum at ``t = 0``, so **Tmax = delay** (the residue's own
  peak time is 0);
* the AIF is zero before its first sample and holds its last value after the series (needed only
  for negative delays).

Computation on a continuous time axis (so TR does not bias it)
----------------------------------------------------------------
With the AIF piecewise linear between its samples ``a_k`` (hat functions of width ``2 TR``), the
convolution is exact on a continuous grid:

    C_t(t_n) = F * sum_k a_k K((n - k) TR - delay),
    K(s) = [R2(s + TR) - 2 R2(s) + R2(s - TR)] / TR,

``R2`` the second antiderivative of ``R`` (``R2(s) = 0`` for ``s <= 0``). For the gamma residue,
with ``x = alpha s / MTT_r``, ``R1(s) = s Q(alpha, x) + MTT_r P(alpha + 1, x)`` and
``R2(s) = s^2/2 Q(alpha, x) + MTT_r s P(alpha + 1, x) - MTT_r^2 (alpha + 1)/(2 alpha) P(alpha + 2, x)``.
So a model curve is one ``(M,) @ (M, t)`` product of the voxel's kernel samples ``K_m`` with the
AIF's Toeplitz matrix, the delay is continuous (no frame grid), and the Jacobian is analytic:
``dR2/d delay = -R1``, ``MTT_r dR2/dMTT_r = 2 R2 - s R1``. The unit-MTT functions ``R1``, ``R2``
are tabulated once per shape on a 1e-3 grid (linear interpolation, relative error < 1e-6; exact
asymptotes beyond the table).

Fit
---
1. **Grid start with CBF projected out** (variable projection): every candidate
   ``(alpha, MTT_r, delay)`` of a coarse grid gives a unit model curve ``g``; ``F`` enters linearly,
   so the best candidate of a voxel maximises ``(y . g)_+^2 / |g|^2`` -- one float32 GEMM
   ``(voxels x t) @ (t x candidates)`` per chunk.
2. **Batched Levenberg-Marquardt** (the project's solver,
   :func:`perfusionai.dr.fitting.levenberg_marquardt`) on ``(F, delay, log MTT_r)`` from that start,
   all voxels of a chunk together, ``alpha`` fixed at the grid's choice; box bounds
   ``F >= 0``, ``delay`` in ``delay_bounds``, ``MTT_r`` in ``mtt_bounds``.

Maps: CBF = 6000 kH/rho F (mL/100 g/min); **CBV by the integral ratio** of the measured curves
(:func:`perfusionai.dsc.maps.cbv_map`, as every method); MTT = CBV/CBF (central volume theorem);
Tmax = delay (s, AIF time origin). Per-voxel fit quality: ``r2`` = 1 - SSR/SST of the fitted
curve and ``nrmse`` = RMS residual / peak of the measured curve. ``converged``: the LM stopped on
its tolerance (not on the iteration limit) with finite parameters; voxels that did not converge
keep their last iterate, are flagged False and counted in the result's ``info`` (and in the DSC
summary), never dropped. ``at_bound`` flags parameters that ended on a bound.

Arrays: curves ``(n_voxels, t)`` (time last, any leading shape flattened); maps ``(n_voxels,)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import special

from ..errors import ParameterError, input_error
from ..progress import ProgressCallback, as_progress

#: nodes of the gamma shape alpha (log-spaced, 4 per octave, 1 = exponential .. 45 ~ box): the
#: residue tables are built on them and alpha is interpolated linearly in log(alpha) between nodes.
SHAPE_NODES = tuple(float(2.0 ** (k / 4.0)) for k in range(23))
SHAPES_PER_OCTAVE = 4
#: shapes of the start grid (a subset of the nodes).
GRID_SHAPES = (1.0, 2.0, 4.0, 8.0, 32.0)
DEFAULT_SHAPE_BOUNDS = (1.0, SHAPE_NODES[-1])
#: bounds of the fitted delay (s) and of the residue MTT (s).
DEFAULT_DELAY_BOUNDS = (-3.0, 15.0)
DEFAULT_MTT_BOUNDS = (0.3, 60.0)
#: coarse start grid: delay step (s) and log-spaced MTT_r values (s).
GRID_DELAY_STEP_S = 0.5
GRID_MTT = tuple(np.geomspace(1.0, 24.0, 12))
DEFAULT_MAX_ITERATIONS = 60
#: SD of the Gaussian prior on log(alpha) around the population's shape (None: every voxel free).
DEFAULT_SHAPE_PRIOR_SD = 0.3
#: voxels (the strongest curves) whose free fits give the population's shape.
SHAPE_SAMPLE_VOXELS = 2048
DEFAULT_CHUNK_VOXELS = 8192
#: the AIF is interpolated by a natural cubic spline to steps of TR / AIF_UPSAMPLE, linear in between.
AIF_UPSAMPLE = 3
_TABLE_STEP = 1e-3
_TABLE_END = 40.0


@dataclass
class ParametricResult:
    """Output of :func:`fit_parametric` (every array ``(n_voxels,)``).

    cbf: F in 1/s (multiply by 6000 kH/rho for mL/100 g/min). delay: s (= Tmax). mtt_residue: the
    residue's mean transit time ``MTT_r`` (s). shape: gamma shape alpha. cbv_model: ``F * MTT_r``
    (the model's blood volume, in the unit of the curves' integral ratio). r2, nrmse: fit quality.
    converged, at_bound: bool flags. ``info`` holds the counts (``n_voxels``, ``n_converged``,
    ``n_not_converged``, ``n_at_bound``) and the settings.
    """

    cbf: np.ndarray
    delay: np.ndarray
    mtt_residue: np.ndarray
    shape: np.ndarray
    cbv_model: np.ndarray
    r2: np.ndarray
    nrmse: np.ndarray
    converged: np.ndarray
    at_bound: np.ndarray
    dt: float
    info: dict = field(default_factory=dict)

    @property
    def tmax(self) -> np.ndarray:
        """Tmax in s: the fitted delay (the gamma-family residue peaks at t = 0)."""
        return self.delay


# --------------------------------------------------------------------------------------
# residue tables


class _Tables:
    """Unit-MTT ``R1``, ``R2`` of the gamma residue at every shape node, on a uniform grid of
    ``u = s / MTT_r``; shapes between nodes are interpolated linearly in ``log alpha``."""

    def __init__(self):
        nodes = np.asarray(SHAPE_NODES)
        u = np.arange(0.0, _TABLE_END + 2 * _TABLE_STEP, _TABLE_STEP)
        self.length = u.size
        r1 = np.empty((nodes.size, u.size))
        r2 = np.empty_like(r1)
        for row, alpha in enumerate(nodes):
            x = alpha * u
            q = special.gammaincc(alpha, x)
            p1 = special.gammainc(alpha + 1.0, x)
            p2 = special.gammainc(alpha + 2.0, x)
            r1[row] = u * q + p1
            r2[row] = 0.5 * u * u * q + u * p1 - (alpha + 1.0) / (2.0 * alpha) * p2
        self.nodes = nodes
        self.offset = (nodes + 1.0) / (2.0 * nodes)     # R2(u) -> u - offset beyond the table
        self.r1 = r1.ravel()
        self.r2 = r2.ravel()
        self.d1 = np.diff(r1, axis=1, append=r1[:, -1:]).ravel()
        self.d2 = np.diff(r2, axis=1, append=r2[:, -1:]).ravel()

    def _one(self, index, weight, row):
        at = index + (row * self.length)[:, None]
        return self.r1[at] + weight * self.d1[at], self.r2[at] + weight * self.d2[at]

    def lookup(self, u: np.ndarray, log_shape: np.ndarray, derivative: bool):
        """Unit-MTT ``R1(u)``, ``R2(u)`` for ``u`` ``(n, m)`` (clipped at 0) and ``log alpha`` ``(n,)``;
        with ``derivative`` also ``dR1/dlog alpha``, ``dR2/dlog alpha``."""
        x = np.clip(u, 0.0, _TABLE_END) * (1.0 / _TABLE_STEP)
        index = x.astype(np.int64)
        weight = x - index
        position = np.clip(log_shape / np.log(2.0) * SHAPES_PER_OCTAVE, 0.0, self.nodes.size - 1.0)
        row = np.minimum(position.astype(np.int64), self.nodes.size - 2)
        w_shape = (position - row)[:, None]
        r1_a, r2_a = self._one(index, weight, row)
        r1_b, r2_b = self._one(index, weight, row + 1)
        r1 = r1_a + w_shape * (r1_b - r1_a)
        r2 = r2_a + w_shape * (r2_b - r2_a)
        beyond = u > _TABLE_END
        if beyond.any():
            offset = self.offset[row] + w_shape[:, 0] * (self.offset[row + 1] - self.offset[row])
            r1 = np.where(beyond, 1.0, r1)
            r2 = np.where(beyond, u - offset[:, None], r2)
        if not derivative:
            return r1, r2, None, None
        scale = SHAPES_PER_OCTAVE / np.log(2.0)
        dr1 = (r1_b - r1_a) * scale
        dr2 = (r2_b - r2_a) * scale
        if beyond.any():
            dr1 = np.where(beyond, 0.0, dr1)
            d_off = (self.offset[row + 1] - self.offset[row]) * scale
            dr2 = np.where(beyond, -d_off[:, None], dr2)
        return r1, r2, dr1, dr2


_TABLE_CACHE: list = []


def _tables() -> _Tables:
    if not _TABLE_CACHE:
        _TABLE_CACHE.append(_Tables())
    return _TABLE_CACHE[0]


# --------------------------------------------------------------------------------------
# the model


class _Model:
    """Model curves and Jacobians of one AIF: ``C = F * K(delay, MTT_r, alpha) @ B``."""

    def __init__(self, aif: np.ndarray, dt: float, delay_bounds: Tuple[float, float], upsample: int = 1,
                 interpolation: str = "linear"):
        a = np.asarray(aif, dtype=np.float64).ravel()
        n = a.size
        self.n = n
        self.dt = float(dt)
        k = max(1, int(upsample))
        self.h = self.dt / k
        if k > 1 and interpolation != "linear":
            from scipy import interpolate

            t = np.arange(n) * self.dt
            fine_t = np.arange((n - 1) * k + 1) * self.h
            if interpolation == "pchip":
                fine = interpolate.PchipInterpolator(t, a)(fine_t)
            else:
                fine = interpolate.CubicSpline(t, a, bc_type="natural")(fine_t)
        else:
            fine = np.interp(np.arange((n - 1) * k + 1) * self.h, np.arange(n) * self.dt, a)
        self.fine_aif = fine
        self.tables = _tables()
        count = fine.size
        # kernel lags m = m_lo .. count-1 in units of h (K(m h - delay) vanishes for m h - delay <= -h)
        self.m_lo = int(np.floor(delay_bounds[0] / self.h)) - 1
        lags = np.arange(self.m_lo, count)
        # R2 is needed at the lags m_lo - 1 .. count (second differences)
        self.points = np.arange(self.m_lo - 1, count + 1) * self.h
        column = (np.arange(n) * k)[None, :] - lags[:, None]      # index of the AIF sample
        hold = np.concatenate([fine, [fine[-1]]])
        self.matrix = np.where(column >= 0, hold[np.clip(column, 0, count)], 0.0)   # (M, t)

    def _second_difference(self, x):
        return (x[:, 2:] - 2.0 * x[:, 1:-1] + x[:, :-2]) * (1.0 / self.h)

    def kernels(self, delay, log_mtt, log_shape, derivatives: bool):
        """``K`` ``(V, M)`` and, when asked, ``dK/d(delay, log MTT_r, log alpha)`` stacked ``(V, 3, M)``."""
        mtt = np.exp(log_mtt)
        s = self.points[None, :] - delay[:, None]                 # (V, M + 2)
        r1u, r2u, dr1u, dr2u = self.tables.lookup(s * (1.0 / mtt)[:, None], log_shape, derivatives)
        mtt2 = (mtt * mtt)[:, None]
        r2 = r2u * mtt2
        kernel = self._second_difference(r2)
        if not derivatives:
            return kernel, None
        r1 = r1u * mtt[:, None]
        jac = np.empty((kernel.shape[0], 3, kernel.shape[1]))
        jac[:, 0] = -self._second_difference(r1)
        jac[:, 1] = self._second_difference(2.0 * r2 - np.maximum(s, 0.0) * r1)
        jac[:, 2] = self._second_difference(dr2u * mtt2)
        return kernel, jac

    def curves(self, kernel):
        return kernel @ self.matrix


def _lm():
    from ..dr.fitting import levenberg_marquardt

    return levenberg_marquardt


# --------------------------------------------------------------------------------------
# the fit


def _grid_start(model: _Model, curves: np.ndarray, delay_bounds, shape_bounds, chunk_voxels, report):
    """Best grid candidate per voxel: (F, delay, log MTT_r, log alpha), F >= 0 projected out."""
    delays = np.arange(max(delay_bounds[0], -3.0), min(delay_bounds[1], 12.0) + 1e-9, GRID_DELAY_STEP_S)
    shapes = [a for a in GRID_SHAPES if shape_bounds[0] <= a <= shape_bounds[1]] or [shape_bounds[0]]
    log_shape, log_mtt, delay_vals = (g.ravel() for g in np.meshgrid(
        np.log(shapes), np.log(GRID_MTT), delays, indexing="ij"))
    kernel, _ = model.kernels(delay_vals, log_mtt, log_shape, False)
    atoms = model.curves(kernel)                                  # (K, t)
    norms = np.linalg.norm(atoms, axis=1)
    usable = norms > 0
    atoms, norms = atoms[usable], norms[usable]
    log_shape, log_mtt, delay_vals = log_shape[usable], log_mtt[usable], delay_vals[usable]
    unit = (atoms / norms[:, None]).T.astype(np.float32)         # (t, K)
    n_vox = curves.shape[0]
    best = np.empty(n_vox, np.int64)
    projection = np.empty(n_vox)
    step = max(1, min(chunk_voxels, 4_000_000 // max(unit.shape[1], 1)))
    for start in range(0, n_vox, step):
        stop = min(n_vox, start + step)
        scores = curves[start:stop].astype(np.float32) @ unit    # (c, K)
        choice = np.argmax(scores, axis=1)
        best[start:stop] = choice
        projection[start:stop] = scores[np.arange(stop - start), choice]
        report(0.3 * stop / n_vox, "parametric fit: grid start")
    f0 = np.maximum(projection, 0.0) / norms[best]
    start_values = np.stack([f0, delay_vals[best], log_mtt[best], log_shape[best]], axis=1)
    residual = np.maximum(np.einsum("ij,ij->i", curves, curves) - np.maximum(projection, 0.0) ** 2, 0.0)
    return start_values, projection, residual, int(usable.sum())


def fit_parametric(
    concentration: np.ndarray,
    aif: np.ndarray,
    dt: float,
    delay_bounds: Tuple[float, float] = DEFAULT_DELAY_BOUNDS,
    mtt_bounds: Tuple[float, float] = DEFAULT_MTT_BOUNDS,
    shape_bounds: Tuple[float, float] = DEFAULT_SHAPE_BOUNDS,
    shape_prior_sd: Optional[float] = DEFAULT_SHAPE_PRIOR_SD,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    progress: Optional[ProgressCallback] = None,
) -> ParametricResult:
    """Fit the delayed gamma-residue model (module docstring) to every curve, vectorised.

    Parameters
    ----------
    concentration
        Tissue delta R2* (1/s), ``(n_voxels, t)`` or ``[..., t]`` (time last).
    aif
        Arterial delta R2* ``(t,)`` in the same unit, sampled on the same uniform grid.
    dt
        Frame interval in s.
    delay_bounds, mtt_bounds, shape_bounds
        Box bounds of the delay (s, relative to the AIF), of the residue MTT (s) and of the gamma
        shape alpha (within 1 .. 45, the tabulated nodes; 1 = exponential).
    max_iterations
        Levenberg-Marquardt iteration limit (voxels that reach it are flagged not converged).
    chunk_voxels
        Voxels per block (memory bound: about ``chunk_voxels * t * 100`` bytes).
    progress
        ``progress(fraction, message)`` between chunks (may raise Cancelled).
    """
    c = np.asarray(concentration)
    if c.ndim < 1:
        raise input_error("concentration", "expected curves with time on the last axis")
    curves = c.reshape(-1, c.shape[-1]).astype(np.float64, copy=False)
    a = np.asarray(aif, dtype=np.float64).ravel()
    n_vox, n_t = curves.shape
    if a.size != n_t:
        raise input_error("AIF", f"the AIF has {a.size} samples but the tissue curves have {n_t}")
    if not np.all(np.isfinite(a)) or not np.any(a > 0):
        raise input_error("AIF", "the AIF must be finite with a positive bolus")
    if not (dt > 0 and np.isfinite(dt)):
        raise ParameterError("dt", f"the frame interval must be positive, got {dt}")
    lo_d, hi_d = (float(x) for x in delay_bounds)
    lo_m, hi_m = (float(x) for x in mtt_bounds)
    lo_a, hi_a = (float(x) for x in shape_bounds)
    if not (lo_d < hi_d):
        raise ParameterError("parametric_delay_bounds", f"need lower < upper, got {tuple(delay_bounds)}")
    if not (0 < lo_m < hi_m):
        raise ParameterError("parametric_mtt_bounds", f"need 0 < lower < upper, got {tuple(mtt_bounds)}")
    if not (SHAPE_NODES[0] <= lo_a <= hi_a <= SHAPE_NODES[-1]):
        raise ParameterError("parametric_shape_bounds",
                             f"need {SHAPE_NODES[0]:g} <= lower <= upper <= {SHAPE_NODES[-1]:.3g}, "
                             f"got {tuple(shape_bounds)}")
    report = as_progress(progress)
    model = _Model(a, dt, (lo_d, hi_d), AIF_UPSAMPLE, "cubic")
    finite = np.all(np.isfinite(curves), axis=1)
    work = np.where(finite[:, None], curves, 0.0)

    params, projection, grid_residual, n_candidates = _grid_start(
        model, work, (lo_d, hi_d), (lo_a, hi_a), chunk_voxels, report)
    f_upper = 100.0 * max(float(np.max(params[:, 0], initial=0.0)), 1e-3)
    lower = np.array([0.0, lo_d, np.log(lo_m), np.log(lo_a)])
    upper = np.array([f_upper, hi_d, np.log(hi_m), np.log(hi_a)])
    params = np.clip(params, lower, upper)
    levenberg_marquardt = _lm()

    def solve(rows, start_values, prior_centre=None, prior_weight=None, fraction=(0.3, 1.0)):
        """LM over voxels ``rows`` in chunks; an optional Gaussian prior on log alpha enters as one
        extra residual ``w (log alpha - centre)`` per voxel."""
        out = start_values.copy()
        cost_out = np.zeros(rows.size)
        status_out = np.zeros(rows.size, np.int8)
        for first in range(0, rows.size, chunk_voxels):
            last = min(rows.size, first + chunk_voxels)
            part = rows[first:last]
            y = work[part]
            weight = None
            if prior_weight is not None:
                weight = prior_weight[part]
                y = np.concatenate([y, (weight * prior_centre)[:, None]], axis=1)

            def evaluate(p, sub, with_jacobian, weight=weight):
                f = p[:, 0]
                kernel, d_kernel = model.kernels(p[:, 1], p[:, 2], p[:, 3], with_jacobian)
                width = model.n + (weight is not None)
                pred = np.empty((p.shape[0], width))
                if weight is not None:
                    pred[:, -1] = weight[sub] * p[:, 3]
                if not with_jacobian:
                    pred[:, :model.n] = f[:, None] * model.curves(kernel)
                    return pred, None
                jac = np.zeros((p.shape[0], 4, width))
                jac[:, 0, :model.n] = model.curves(kernel)
                jac[:, 1:, :model.n] = (d_kernel @ model.matrix) * f[:, None, None]
                pred[:, :model.n] = f[:, None] * jac[:, 0, :model.n]
                if weight is not None:
                    jac[:, 3, -1] = weight[sub]
                return pred, jac

            count = last - first
            p_chunk, cost_chunk, status_chunk = levenberg_marquardt(
                evaluate, out[first:last], y, np.broadcast_to(lower, (count, 4)),
                np.broadcast_to(upper, (count, 4)), max_iter=int(max_iterations), ftol=1e-8, xtol=1e-7)
            if weight is not None:
                cost_chunk = np.maximum(cost_chunk - (weight * (p_chunk[:, 3] - prior_centre)) ** 2, 0.0)
            out[first:last] = p_chunk
            cost_out[first:last] = cost_chunk
            status_out[first:last] = status_chunk
            report(fraction[0] + (fraction[1] - fraction[0]) * last / rows.size,
                   "parametric fit: Levenberg-Marquardt")
        return out, cost_out, status_out

    every = np.arange(n_vox)
    shape_centre = None
    if shape_prior_sd is not None and np.isfinite(shape_prior_sd) and lo_a < hi_a:
        if not shape_prior_sd > 0:
            raise ParameterError("parametric_shape_prior_sd", f"must be positive, got {shape_prior_sd}")
        # 1. the population's shape: free fits of the strongest curves (highest projection)
        sample = np.argsort(-projection)[:min(n_vox, SHAPE_SAMPLE_VOXELS)]
        p_sample, _, s_sample = solve(sample, params[sample], fraction=(0.3, 0.45))
        good = (s_sample == 1) & (p_sample[:, 0] > 0)
        log_shapes = p_sample[good, 3] if good.any() else p_sample[:, 3]
        shape_centre = float(np.median(log_shapes))
        # 2. every voxel with a Gaussian prior on log alpha around it, weighted by the voxel's noise
        sigma = np.sqrt(grid_residual / max(n_t - 4, 1))
        weight = np.maximum(sigma, 1e-12) / float(shape_prior_sd)
        start_values = params.copy()
        start_values[:, 3] = np.clip(shape_centre, lower[3], upper[3])
        params, cost, status = solve(every, start_values, np.full(n_vox, shape_centre), weight,
                                     fraction=(0.45, 1.0))
    else:
        params, cost, status = solve(every, params)

    f, delay, mtt_r, shape = params[:, 0], params[:, 1], np.exp(params[:, 2]), np.exp(params[:, 3])
    mean = work.mean(axis=1, keepdims=True)
    total = np.sum((work - mean) ** 2, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1.0 - cost / total, np.nan)
        peak = np.max(np.abs(work), axis=1)
        nrmse = np.where(peak > 0, np.sqrt(cost / n_t) / peak, np.nan)
    converged = (status == 1) & finite & np.all(np.isfinite(params), axis=1)
    span = upper - lower
    at_bound = np.any((params[:, 1:3] <= lower[1:3] + 1e-6 * span[1:3]) |
                      (params[:, 1:3] >= upper[1:3] - 1e-6 * span[1:3]), axis=1)
    info = {
        "method": "parametric", "model": "delayed gamma-distributed transit times (Mouridsen 2006)",
        "delay_bounds_s": [lo_d, hi_d], "mtt_bounds_s": [lo_m, hi_m], "shape_bounds": [lo_a, hi_a],
        "grid_candidates": n_candidates, "max_iterations": int(max_iterations),
        "n_voxels": int(n_vox), "n_converged": int(converged.sum()),
        "n_not_converged": int(n_vox - converged.sum()), "n_at_bound": int(at_bound.sum()),
        "n_non_finite_curves": int(n_vox - finite.sum()),
        "r2_median": float(np.nanmedian(r2)) if np.any(np.isfinite(r2)) else None,
        "shape_prior": None if shape_centre is None else {"centre": float(np.exp(shape_centre)),
                                                           "sd_log": float(shape_prior_sd)},
    }
    return ParametricResult(cbf=f, delay=delay, mtt_residue=mtt_r, shape=shape, cbv_model=f * mtt_r, r2=r2,
                            nrmse=nrmse, converged=converged, at_bound=at_bound, dt=float(dt), info=info)
