"""Vectorised fits of the diffusion-relaxation models over many voxels at once.

Every function takes signals of shape ``(N, n)`` (voxels x measurements, measurement axis
last) and returns one array of shape ``(N,)`` per map. No function loops over voxels: the
log-linear fits are closed-form array expressions; the non-linear fits start from a grid search
evaluated as one matrix product per chunk of voxels and continue with a batched, box-constrained
Levenberg-Marquardt (damped Gauss-Newton) iteration in which all voxels of a chunk iterate
together (a voxel leaves the iteration once it has converged).

Units: b in s/mm^2, echo times and T2 in ms, diffusivities in um^2/ms (see :mod:`.models`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..progress import as_progress
from . import models as M

#: voxels per chunk: bounds the memory of the Jacobians (chunk x n x P float64) and grids.
CHUNK_VOXELS = 20000


@dataclass
class FitResult:
    """Maps of one fit.

    Attributes
    ----------
    maps
        name -> ``(N,)`` float64 array (units in :data:`models.MAP_UNITS`).
    status
        ``(N,)`` int8: 1 converged, -1 stopped at the iteration limit, 0 not fitted (no signal).
    cost
        ``(N,)`` residual sum of squares of the signals normalised by each voxel's maximum.
    """

    maps: dict
    status: np.ndarray
    cost: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# clinical (log-linear mono-exponential) fits


def loglinear_monoexponential(signals: np.ndarray, bvals: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Ordinary least squares of ``log S = log S0 - b ADC`` for every voxel.

    Parameters
    ----------
    signals
        ``(N, n)`` positive signals.
    bvals
        ``(n,)`` b-values in s/mm^2 (at least two distinct values).

    Returns
    -------
    s0, adc
        ``(N,)`` each; ADC in um^2/ms. Identical (to rounding) to ``numpy.polyfit(b, log S, 1)``.
    """
    b = np.asarray(bvals, float) / 1000.0
    y = np.log(signals)
    b_centred = b - b.mean()
    slope = (y - y.mean(axis=-1, keepdims=True)) @ b_centred / np.sum(b_centred ** 2)
    intercept = y.mean(axis=-1) - slope * b.mean()
    return np.exp(intercept), -slope


def _select_b(bvals: np.ndarray, wanted: Sequence[float], usable: np.ndarray, what: str) -> np.ndarray:
    idx = np.flatnonzero(usable & np.isin(np.round(bvals), np.round(np.asarray(wanted, float))))
    present = np.unique(np.round(bvals[idx]))
    if present.size < len(set(np.round(wanted))):
        raise ValueError(f"{what} needs b = {', '.join(f'{b:g}' for b in wanted)} s/mm^2 at the minimum "
                         f"echo time; the series has b = {', '.join(f'{b:g}' for b in np.unique(bvals[usable]))}")
    return idx


def fit_clinical(
    signals: np.ndarray,
    bvals: Sequence[float],
    tes: Optional[Sequence[float]] = None,
    clinical_b: Sequence[float] = M.CLINICAL_B,
    fast_b: Sequence[float] = M.CLINICAL_FAST_B,
    slow_b: Sequence[float] = M.CLINICAL_SLOW_B,
) -> FitResult:
    """The clinical mono-exponential metrics of Macarro et al. (2025), log-linear least squares.

    ``s0, adc`` from ``clinical_b``; ``adc_fast`` from ``fast_b``; ``adc_slow`` (and S0_slow) from
    ``slow_b``; ``f_proxy = 1 - S0_slow / s0``. Only volumes at the minimum echo time are used
    (all volumes when ``tes`` is None); repeated b-values (several directions) all enter the fit.
    ``f_proxy`` is a biased proxy of the perfusion fraction, not an estimate of IVIM f.

    Parameters
    ----------
    signals
        ``(N, n)``; non-positive values are raised to 1e-6 x the voxel's maximum before the log.
    bvals, tes
        ``(n,)`` in s/mm^2 and ms.
    """
    bvals = np.asarray(bvals, float)
    signals = np.asarray(signals, float)
    usable = np.ones(bvals.size, bool) if tes is None else np.isclose(np.asarray(tes, float), np.min(tes))
    i_all = _select_b(bvals, clinical_b, usable, "ADC")
    i_fast = _select_b(bvals, fast_b, usable, "ADC_fast")
    i_slow = _select_b(bvals, slow_b, usable, "ADC_slow")
    peak = signals.max(axis=-1, keepdims=True)
    fitted = (peak[:, 0] > 0) & np.all(np.isfinite(signals), axis=-1)
    floor = np.where(peak > 0, peak, 1.0) * 1e-6
    safe = np.where(np.isfinite(signals), np.maximum(signals, floor), 1.0)
    s0, adc = loglinear_monoexponential(safe[:, i_all], bvals[i_all])
    _, adc_fast = loglinear_monoexponential(safe[:, i_fast], bvals[i_fast])
    s0_slow, adc_slow = loglinear_monoexponential(safe[:, i_slow], bvals[i_slow])
    maps = {"s0": s0, "adc": adc, "adc_fast": adc_fast, "adc_slow": adc_slow, "f_proxy": 1.0 - s0_slow / s0}
    for k in maps:
        maps[k] = np.where(fitted, maps[k], 0.0)
    return FitResult(maps, fitted.astype(np.int8),
                     info={"method": "log-linear least squares",
                           "b_all": sorted(set(bvals[i_all].tolist())),
                           "b_fast": sorted(set(bvals[i_fast].tolist())),
                           "b_slow": sorted(set(bvals[i_slow].tolist()))})


# --------------------------------------------------------------------------------------
# grid search with the two pool amplitudes solved exactly


def _two_pool_grid(y: np.ndarray, g1: np.ndarray, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best candidate of ``y ~ a g1[k] + c g2[k]``, amplitudes solved exactly per candidate.

    y ``(N, n)``; g1, g2 ``(K, n)``. Returns the best candidate index, ``a`` and ``c`` (each ``(N,)``).
    The candidates are ranked by the squared norm of the projection of ``y`` onto their two-column
    span (one matrix product with an orthonormalised basis, float32: this is only the start value);
    the amplitudes of the chosen candidate are then the exact non-negative least-squares solution
    (both columns when both amplitudes come out non-negative, else the better single column).
    """
    n1 = np.linalg.norm(g1, axis=1, keepdims=True)
    q1 = g1 / n1
    g2_perp = g2 - np.sum(g2 * q1, axis=1, keepdims=True) * q1
    n2 = np.linalg.norm(g2_perp, axis=1, keepdims=True)
    q2 = np.where(n2 > 1e-9 * np.linalg.norm(g2, axis=1, keepdims=True), g2_perp / np.maximum(n2, 1e-300), 0.0)
    y32 = y.astype(np.float32)
    p1 = y32 @ q1.T.astype(np.float32)
    gain = p1 * p1
    p2 = y32 @ q2.T.astype(np.float32)
    p2 *= p2
    gain += p2
    best = np.argmax(gain, axis=1)
    b1 = g1[best]
    b2 = g2[best]
    a11 = np.sum(b1 * b1, axis=1)
    a22 = np.sum(b2 * b2, axis=1)
    a12 = np.sum(b1 * b2, axis=1)
    y1 = np.sum(y * b1, axis=1)
    y2 = np.sum(y * b2, axis=1)
    det = a11 * a22 - a12 * a12
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (a22 * y1 - a12 * y2) / det
        c = (a11 * y2 - a12 * y1) / det
    both = (a >= 0) & (c >= 0) & (det > 1e-12 * a11 * a22)
    only_1 = ~both & (np.maximum(y1, 0) ** 2 / a11 >= np.maximum(y2, 0) ** 2 / a22)
    a_best = np.where(both, a, np.where(only_1, np.maximum(y1, 0) / a11, 0.0))
    c_best = np.where(both, c, np.where(only_1, 0.0, np.maximum(y2, 0) / a22))
    return best, a_best, c_best


def _grid_values(lo: float, hi: float, n: int, log: bool = False) -> np.ndarray:
    """``n`` points strictly inside [lo, hi] at the centres of n equal sub-intervals."""
    pos = (np.arange(n) + 0.5) / n
    if log and lo > 0:
        return np.exp(np.log(lo) + pos * (np.log(hi) - np.log(lo)))
    return lo + pos * (hi - lo)


# --------------------------------------------------------------------------------------
# batched, box-constrained Levenberg-Marquardt


ModelFn = Callable[[np.ndarray, np.ndarray, bool], tuple]


def _noise_floor(pred: np.ndarray, jac: Optional[np.ndarray], floor: Optional[np.ndarray], mode: str = "rician"):
    """Expected magnitude of a noisy signal (and its Jacobian) given the noise-free prediction.

    ``floor`` is the noise SD sigma per voxel (normalised units). ``mode``:

    * ``"rician"``: the exact Rician mean sigma sqrt(pi/2) L_1/2(-S^2 / 2 sigma^2), written with
      exponentially scaled Bessel functions, d/dS = sqrt(pi/2) S/(2 sigma) [I0e(x/2) + I1e(x/2)],
      x = S^2 / (2 sigma^2);
    * ``"offset"``: the offset-Gaussian sqrt(S^2 + nf^2) with nf = sqrt(pi/2) sigma (the authors' fitter).
    """
    if floor is None:
        return pred, jac
    sigma = floor[:, None]
    if mode == "offset":
        nf = np.sqrt(np.pi / 2) * sigma
        out = np.sqrt(pred * pred + nf * nf)
        slope = pred / np.maximum(out, 1e-300)
    else:
        from scipy.special import ive

        half_x = pred * pred / (4.0 * sigma * sigma)
        i0 = ive(0, half_x)
        i1 = ive(1, half_x)
        out = sigma * np.sqrt(np.pi / 2) * ((1 + 2 * half_x) * i0 + 2 * half_x * i1)
        slope = np.sqrt(np.pi / 2) * pred / (2 * sigma) * (i0 + i1)
    if jac is None:
        return out, None
    return out, jac * slope[:, None, :]


def levenberg_marquardt(
    model: ModelFn,
    p0: np.ndarray,
    y: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    noise_floor: Optional[np.ndarray] = None,
    max_iter: int = 200,
    ftol: float = 1e-9,
    xtol: float = 1e-10,
    noise_model: str = "rician",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise ``sum_m (model(p)_m - y_m)^2`` for all voxels together, with box bounds.

    ``model(p, rows, with_jacobian)`` returns the prediction ``(N', n)`` and, when asked, the
    Jacobian ``(N', P, n)`` (parameter axis before the measurement axis, for contiguous rows) for the parameter rows ``p`` ``(N', P)`` of voxels ``rows``.
    Bounds are handled by projection with an active set: a parameter sitting on a bound whose
    gradient points outwards is frozen for that step. Damping follows Marquardt (the diagonal of
    J^T J scaled by lambda; lambda x 0.2 after a successful step, x 5 after a failed one).

    Returns the parameters ``(N, P)``, the final cost ``(N,)`` and a status ``(N,)`` (1 converged,
    -1 iteration limit).
    """
    n_vox, n_par = p0.shape
    p = np.clip(p0, lower, upper)
    rows_all = np.arange(n_vox)
    pred, jac = model(p, rows_all, True)
    pred, jac = _noise_floor(pred, jac, noise_floor, noise_model)
    resid = pred - y
    cost = np.sum(resid * resid, axis=1)
    lam = np.full(n_vox, 1e-3)
    active = np.ones(n_vox, bool)
    status = np.full(n_vox, -1, np.int8)
    tiny_cost = 1e-28 * y.shape[1]
    eye = np.eye(n_par, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        j_a = jac[idx]
        r_a = resid[idx]
        p_a = p[idx]
        grad = np.matmul(j_a, r_a[..., None])[..., 0]
        hess = np.matmul(j_a, j_a.transpose(0, 2, 1))
        frozen = ((p_a <= lower[idx]) & (grad > 0)) | ((p_a >= upper[idx]) & (grad < 0))
        free = ~frozen
        diag = np.diagonal(hess, axis1=1, axis2=2)
        diag = np.maximum(diag, 1e-10 * diag.max(axis=1, keepdims=True) + 1e-300)
        system = hess + (lam[idx, None] * diag)[:, :, None] * eye
        system = system * (free[:, :, None] & free[:, None, :]) + (frozen[:, :, None] & eye)
        rhs = -grad * free
        try:
            step = np.linalg.solve(system, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.matmul(np.linalg.pinv(system), rhs[..., None])[..., 0]
        p_try = np.clip(p_a + step, lower[idx], upper[idx])
        pred_try, _ = model(p_try, idx, False)
        pred_try, _ = _noise_floor(pred_try, None, None if noise_floor is None else noise_floor[idx], noise_model)
        r_try = pred_try - y[idx]
        cost_try = np.sum(r_try * r_try, axis=1)
        better = np.isfinite(cost_try) & (cost_try < cost[idx])
        decrease = (cost[idx] - cost_try) / np.maximum(cost[idx], 1e-300)
        moved = np.max(np.abs(p_try - p_a) / (np.abs(p_a) + 1e-6 * (upper[idx] - lower[idx]) + 1e-300), axis=1)
        accepted = idx[better]
        if accepted.size:
            p[accepted] = p_try[better]
            cost[accepted] = cost_try[better]
            pr, jc = model(p[accepted], accepted, True)
            pr, jc = _noise_floor(pr, jc, None if noise_floor is None else noise_floor[accepted], noise_model)
            resid[accepted] = pr - y[accepted]
            jac[accepted] = jc
        lam[idx] = np.where(better, np.maximum(lam[idx] * 0.2, 1e-12), np.minimum(lam[idx] * 5.0, 1e16))
        done = (better & ((decrease < ftol) | (moved < xtol))) | (cost[idx] <= tiny_cost) | (lam[idx] >= 1e16)
        done |= ~better & (moved < xtol)
        status[idx[done]] = 1
        active[idx[done]] = False
    return p, cost, status


# --------------------------------------------------------------------------------------
# T2-IVIM-Kurtosis


def _advanced_model(b: np.ndarray, te: np.ndarray):
    """Closure computing the T2-IVIM-Kurtosis signal and Jacobian; b in ms/um^2, te in ms."""

    def model(p: np.ndarray, rows: np.ndarray, with_jacobian: bool):
        s0, f, dv, t2v, dt, k, t2t = (p[:, i:i + 1] for i in range(7))
        vascular = np.exp(-b * dv - te / t2v)
        bd = b * dt
        tissue = np.exp(-bd + k * bd * bd / 6.0 - te / t2t)
        mix = f * vascular + (1 - f) * tissue
        pred = s0 * mix
        if not with_jacobian:
            return pred, None
        sv = s0 * f * vascular
        st = s0 * (1 - f) * tissue
        jac = np.empty((p.shape[0], 7, pred.shape[1]))
        jac[:, 0] = mix
        jac[:, 1] = s0 * (vascular - tissue)
        jac[:, 2] = -b * sv
        jac[:, 3] = sv * te / (t2v * t2v)
        jac[:, 4] = st * (-b + k * b * bd / 3.0)
        jac[:, 5] = st * bd * bd / 6.0
        jac[:, 6] = st * te / (t2t * t2t)
        return pred, jac

    return model


def fit_t2ivimkurtosis(
    signals: np.ndarray,
    bvals: Sequence[float],
    tes: Sequence[float],
    lower: Sequence[float] = M.ADVANCED_LOWER,
    upper: Sequence[float] = M.ADVANCED_UPPER,
    grid_points: int = 4,
    noise_sigma: Optional[np.ndarray | float] = None,
    max_iter: int = 200,
    progress=None,
    noise_model: str = "rician",
) -> FitResult:
    """Fit S = S0 [f exp(-b Dv - TE/T2v) + (1-f) exp(-b Dt + K (b Dt)^2/6 - TE/T2t)] to every voxel.

    Parameters
    ----------
    signals
        ``(N, n)`` magnitude signals.
    bvals, tes
        ``(n,)`` b-values (s/mm^2) and echo times (ms); at least two distinct echo times.
    lower, upper
        Bounds in the order ``s0, f, dv, t2v, dt, k, t2t`` (S0 as multiples of the voxel's maximum
        signal; diffusivities um^2/ms; T2 ms). Defaults: the authors' fitter.
    grid_points
        Start values per non-linear parameter (Dv, T2v, Dt, K, T2t): ``grid_points**5`` candidates
        placed inside the bounds; for each candidate S0 and f are solved exactly (two-pool
        non-negative least squares), so the grid is over 5 parameters, not 7.
    noise_sigma
        Noise standard deviation of the magnitude images (scalar or ``(N,)``), in signal units.
        When given, the data are compared with the expected magnitude of the noisy signal
        (noise-floor correction, see ``noise_model``) instead of the noise-free model.
    noise_model
        ``"rician"`` (default): the exact Rician mean; ``"offset"``: the offset-Gaussian
        sqrt(S^2 + nf^2), nf = sqrt(pi/2) sigma, of the authors' fitter.
    max_iter
        Levenberg-Marquardt iteration limit.

    Returns
    -------
    FitResult with maps ``s0, f, dv, t2v, dt, k, t2t`` (each ``(N,)``).
    """
    signals = np.asarray(signals, float)
    b = np.asarray(bvals, float)[None, :] / 1000.0
    te = np.asarray(tes, float)[None, :]
    lo = np.asarray(lower, float)
    hi = np.asarray(upper, float)
    progress = as_progress(progress)
    n_vox = signals.shape[0]
    peak = signals.max(axis=1) if n_vox else np.zeros(0)
    fitted = (peak > 0) & np.all(np.isfinite(signals), axis=1)
    sigma = None
    if noise_sigma is not None:
        sigma = np.broadcast_to(np.asarray(noise_sigma, float), (n_vox,))

    # candidate grid over the non-linear parameters (Dv, T2v, Dt, K, T2t)
    axes = [_grid_values(lo[2], hi[2], grid_points, log=True), _grid_values(lo[3], hi[3], grid_points),
            _grid_values(lo[4], hi[4], grid_points), _grid_values(lo[5], hi[5], grid_points),
            _grid_values(lo[6], hi[6], grid_points)]
    cand = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)  # (K, 5)
    dv, t2v, dt, kk, t2t = (cand[:, i:i + 1] for i in range(5))
    g_vasc = np.exp(-b * dv - te / t2v)
    bd = b * dt
    g_tiss = np.exp(-bd + kk * bd * bd / 6.0 - te / t2t)

    params = np.zeros((n_vox, 7))
    cost = np.full(n_vox, np.nan)
    status = np.zeros(n_vox, np.int8)
    rows = np.flatnonzero(fitted)
    grid_chunk = max(1, min(CHUNK_VOXELS, 4_000_000 // max(len(cand), 1)))
    n_chunks = max(1, -(-rows.size // CHUNK_VOXELS))
    for ci in range(n_chunks):
        part = rows[ci * CHUNK_VOXELS:(ci + 1) * CHUNK_VOXELS]
        if part.size == 0:
            continue
        progress(ci / n_chunks, f"T2-IVIM-Kurtosis fit, voxels {part[0]}-{part[-1]}")
        scale = peak[part]
        y = signals[part] / scale[:, None]
        p0 = np.empty((part.size, 7))
        for gs in range(0, part.size, grid_chunk):
            sl = slice(gs, gs + grid_chunk)
            best, a, c = _two_pool_grid(y[sl], g_vasc, g_tiss)
            total = a + c
            p0[sl, 0] = total
            p0[sl, 1] = np.where(total > 0, a / np.where(total > 0, total, 1), 0.5)
            p0[sl, 2:] = cand[best]
        lo_rows = np.broadcast_to(lo, (part.size, 7))
        hi_rows = np.broadcast_to(hi, (part.size, 7))
        floor = None if sigma is None else sigma[part] / scale
        p, c_fit, st = levenberg_marquardt(_advanced_model(b, te), p0, y, lo_rows, hi_rows,
                                           noise_floor=floor, max_iter=max_iter,
                                           noise_model=noise_model)
        p[:, 0] *= scale
        params[part] = p
        cost[part] = c_fit
        status[part] = st
    progress(1.0, "T2-IVIM-Kurtosis fit done")
    maps = {name: params[:, i] for i, name in enumerate(M.ADVANCED_MAPS)}
    # The kurtosis term makes the tissue signal rise again beyond b = 3 / (K Dt); flag such voxels.
    with np.errstate(divide="ignore"):
        b_turn = 3.0 / (maps["k"] * maps["dt"])
    nonmonotonic = fitted & (b_turn < float(np.max(b)))
    return FitResult(maps, status, cost, info={
        "method": "grid search (S0, f exact) + batched Levenberg-Marquardt",
        "grid_candidates": int(len(cand)), "lower": lo.tolist(), "upper": hi.tolist(),
        "noise_floor": None if sigma is None else noise_model,
        "kurtosis_nonmonotonic_voxels": int(nonmonotonic.sum()),
    })


# --------------------------------------------------------------------------------------
# classic IVIM


def _ivim_model(b: np.ndarray):
    def model(p: np.ndarray, rows: np.ndarray, with_jacobian: bool):
        s0, f, dstar, d = (p[:, i:i + 1] for i in range(4))
        fast = np.exp(-b * dstar)
        slow = np.exp(-b * d)
        mix = f * fast + (1 - f) * slow
        pred = s0 * mix
        if not with_jacobian:
            return pred, None
        jac = np.stack([mix, s0 * (fast - slow), -b * s0 * f * fast, -b * s0 * (1 - f) * slow], axis=1)
        return pred, jac

    return model


def fit_ivim(
    signals: np.ndarray,
    bvals: Sequence[float],
    lower: Sequence[float] = M.IVIM_LOWER,
    upper: Sequence[float] = M.IVIM_UPPER,
    noise_sigma: Optional[np.ndarray | float] = None,
    max_iter: int = 200,
    progress=None,
    noise_model: str = "rician",
) -> FitResult:
    """Classic bi-exponential IVIM S = S0 [f exp(-b D*) + (1-f) exp(-b D)] for single-TE data.

    Parameters
    ----------
    signals
        ``(N, n)`` magnitude signals at one echo time.
    bvals
        ``(n,)`` b-values in s/mm^2.
    lower, upper
        Bounds in the order ``s0, f, dstar, d`` (S0 as multiples of the voxel's maximum signal,
        D* and D in um^2/ms).

    Start values come from a 32 x 24 grid over (D*, D) with S0 and f solved exactly for each
    candidate; all voxels are then refined together by :func:`levenberg_marquardt`.
    Returns maps ``s0, f, dstar, d`` (each ``(N,)``).
    """
    signals = np.asarray(signals, float)
    b = np.asarray(bvals, float)[None, :] / 1000.0
    lo = np.asarray(lower, float)
    hi = np.asarray(upper, float)
    progress = as_progress(progress)
    n_vox = signals.shape[0]
    peak = signals.max(axis=1) if n_vox else np.zeros(0)
    fitted = (peak > 0) & np.all(np.isfinite(signals), axis=1)
    sigma = None if noise_sigma is None else np.broadcast_to(np.asarray(noise_sigma, float), (n_vox,))
    dstar_axis = _grid_values(max(lo[2], 1e-3), hi[2], 32, log=True)
    d_axis = _grid_values(max(lo[3], 1e-3), hi[3], 24, log=True)
    dstar_c, d_c = (g.ravel()[:, None] for g in np.meshgrid(dstar_axis, d_axis, indexing="ij"))
    g_fast = np.exp(-b * dstar_c)
    g_slow = np.exp(-b * d_c)
    params = np.zeros((n_vox, 4))
    cost = np.full(n_vox, np.nan)
    status = np.zeros(n_vox, np.int8)
    rows = np.flatnonzero(fitted)
    n_chunks = max(1, -(-rows.size // CHUNK_VOXELS))
    for ci in range(n_chunks):
        part = rows[ci * CHUNK_VOXELS:(ci + 1) * CHUNK_VOXELS]
        if part.size == 0:
            continue
        progress(ci / n_chunks, "IVIM fit")
        scale = peak[part]
        y = signals[part] / scale[:, None]
        best, a, c = _two_pool_grid(y, g_fast, g_slow)
        total = a + c
        p0 = np.stack([total, np.where(total > 0, a / np.where(total > 0, total, 1), 0.1),
                       dstar_c[best, 0], d_c[best, 0]], axis=1)
        floor = None if sigma is None else sigma[part] / scale
        p, c_fit, st = levenberg_marquardt(_ivim_model(b), p0, y, np.broadcast_to(lo, (part.size, 4)),
                                           np.broadcast_to(hi, (part.size, 4)), noise_floor=floor,
                                           max_iter=max_iter, noise_model=noise_model)
        p[:, 0] *= scale
        params[part] = p
        cost[part] = c_fit
        status[part] = st
    progress(1.0, "IVIM fit done")
    maps = {name: params[:, i] for i, name in enumerate(M.IVIM_MAPS)}
    return FitResult(maps, status, cost, info={"method": "grid search (S0, f exact) + batched Levenberg-Marquardt",
                                               "lower": lo.tolist(), "upper": hi.tolist(),
                                               "noise_floor": None if sigma is None else noise_model})
