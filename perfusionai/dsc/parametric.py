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
``MTT_r`` (s) and ``alpha`` (within ``shape_bounds``, 1 .. 45).

Assumptions, stated where the maps are used:

* the measured AIF, interpolated between its samples (cubic spline), is the true input up to a pure
  delay -- or, with ``dispersion_s`` > 0 (``--parametric-dispersion``), up to a delay and an
  exponential dispersion kernel ``exp(-t/beta)/beta`` of that known mean ``beta``; an unmodelled
  dispersion reads as a lower CBF (30 % at beta = 2 s on the DRO), as for every deconvolution;
* the tissue curve is purely intravascular (no leakage: apply the BSW correction first), with
  Gaussian noise of equal variance on every frame (unweighted least squares);
* the residue is monotonic with its maximum at ``t = 0``, so **Tmax = delay** (the residue's own
  peak time is 0); with dispersion Tmax = delay + the peak time of ``kernel (*) R``
  (:func:`dispersed_residue_peak`);
* the AIF is zero before its first sample and holds its last value after the series (needed only
  for negative delays);
* the data are samples of a continuous process: on "inverse-crime" phantoms simulated with the
  left-rectangle sum (``make_dsc_phantom(discretisation="inverse-crime")``) the fit reads CBF high
  by about ``TR / (2 MTT)`` (GM of the brain phantom, TR 1 s: 69 against 60).

Computation on a continuous time axis (so TR does not bias it)
----------------------------------------------------------------
The AIF samples are interpolated by a natural cubic spline to steps ``h = TR / AIF_UPSAMPLE`` and
taken piecewise linear between those (hat functions of width ``2 h``); the convolution with the
residue is then exact in continuous time (written below for ``h = TR``):

    C_t(t_n) = F * sum_k a_k K((n - k) TR - delay),
    K(s) = [R2(s + TR) - 2 R2(s) + R2(s - TR)] / TR,

``R2`` the second antiderivative of ``R`` (``R2(s) = 0`` for ``s <= 0``). For the gamma residue,
with ``x = alpha s / MTT_r``, ``R1(s) = s Q(alpha, x) + MTT_r P(alpha + 1, x)`` and
``R2(s) = s^2/2 Q(alpha, x) + MTT_r s P(alpha + 1, x) - MTT_r^2 (alpha + 1)/(2 alpha) P(alpha + 2, x)``.
So a model curve is one ``(M,) @ (M, t)`` product of the voxel's kernel samples ``K_m`` with the
AIF's Toeplitz matrix, the delay is continuous (no frame grid), and the Jacobian is analytic:
``dR2/d delay = -R1``, ``MTT_r dR2/dMTT_r = 2 R2 - s R1``. The unit-MTT functions ``R1``, ``R2``
are tabulated once at each shape node (log-spaced, 4 per octave) on a 2e-3 grid of ``s / MTT_r``
(linear interpolation; exact asymptotes beyond the table).

Fit
---
**One residue shape per volume (default).** Per-voxel shapes are poorly identified at clinical
SNR (at short MTT an exponential and a gamma-3 residue fit a noisy curve equally well but differ
by 30 % in CBF), so by default the volume shares one shape, estimated from the data:

1. a sample of ``SHAPE_SAMPLE_VOXELS`` strong curves (50th-99th percentile of curve energy) is fitted
   with a free per-voxel shape -- grid start (every ``(alpha, MTT_r, delay)`` of a coarse grid gives
   a unit model curve ``g``; ``F`` enters linearly, so the best candidate maximises
   ``(y . g)_+^2 / |g|^2``: variable projection, one GEMM) and the project's batched
   Levenberg-Marquardt (:func:`perfusionai.dr.fitting.levenberg_marquardt`) on
   ``(F, delay, log MTT_r, log alpha)``, with ``alpha`` interpolated between tabulated nodes;
   the volume's shape is the median of the converged ``alpha``;
2. with that shape, the unit-F model curves ``G(t - delay; MTT_r)`` of the AIF are tabulated
   (``s`` step TR/10, MTT step 1 %, with ``dG/ds`` and ``dG/dlog MTT_r``; exact kernels and an
   FFT convolution), and every voxel is fitted from a grid start by a **variable-projection LM** on
   ``(delay, log MTT_r)`` with ``F = max(0, <y, G> / <G, G>)`` projected out (:func:`_varpro`: 2 x 2
   closed-form steps, Kaufman's Jacobian), on as many threads as the BLAS pool -- the whole brain
   (150 k voxels, 60 frames) in 4.8-6.2 x the oSVD time measured in the same run
   (``benchmarks/dsc_speed.py``, 2 shared cores).

Other modes: ``shape=alpha`` fixes the shape (e.g. 1 = exponential); ``shape_prior_sd=None`` fits a
free shape per voxel, ``shape_prior_sd > 0`` puts a Gaussian prior of that SD on ``log alpha``
around the volume's shape (one extra residual per voxel weighted by its noise): both on the exact
4-parameter model (slower: about 20-30 x the default path per voxel). Bounds: ``F >= 0``, ``delay`` in
``delay_bounds`` (default -3 .. 15 s), ``MTT_r`` in ``mtt_bounds`` (0.3 .. 60 s), ``alpha`` in
``shape_bounds`` (1 .. 45).

Measured (Testing/test_dsc_parametric.py; DRO of :mod:`perfusionai.phantoms.dsc_dro`, SNR 50,
TR 1.5 s, delays 0-4 s, CBF 30-220, MTT 2.5-13 s): CBF median error 3 % (exponential), 4 %
(gamma 2.5 and 4.5), 18-20 % (linear residue: not in the gamma family, CBF reads low),
Spearman >= 0.98, Tmax MAE 0.13-0.3 s (oSVD on the same data: 2.6-2.9 s).

Maps: CBF = 6000 kH/rho F (mL/100 g/min); **CBV by the integral ratio** of the measured curves
(:func:`perfusionai.dsc.maps.cbv_map`, as every method); MTT = CBV/CBF (central volume theorem);
Tmax = delay (s, AIF time origin). Per-voxel fit quality: ``r2`` = 1 - SSR/SST of the fitted
curve and ``nrmse`` = RMS residual / peak of the measured curve. ``converged``: the LM stopped on
its tolerance (not on the iteration limit) with finite parameters; voxels that did not converge
keep their last iterate, are flagged False and counted in the result's ``info`` (and in the DSC
summary), never dropped. ``at_bound`` flags parameters that ended on a bound. ``dsc maps --method
parametric`` writes ``fit_r2.nii.gz`` and ``converged.nii.gz`` (1/0) beside the five maps.

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
DEFAULT_MAX_ITERATIONS = 40
#: LM stopping tolerances: relative cost decrease and relative step (dr.fitting.levenberg_marquardt).
LM_FTOL = 1e-4
LM_XTOL = 1e-4
#: SD of the Gaussian prior on log(alpha) around the population's shape (None: every voxel free).
DEFAULT_SHAPE_PRIOR_SD = 0.0
#: voxels (the strongest curves) whose free fits give the population's shape.
SHAPE_SAMPLE_VOXELS = 1024
DEFAULT_CHUNK_VOXELS = 4096
#: AIF upsampling of the fast path's curve table (its time step is TR / TABLE_UPSAMPLE).
TABLE_UPSAMPLE = 10
#: log-MTT step of the fast path's curve table (1 %).
MTT_TABLE_STEP = 0.01
#: the AIF is interpolated by a natural cubic spline to steps of TR / AIF_UPSAMPLE, linear in between.
AIF_UPSAMPLE = 3
_TABLE_STEP = 2e-3
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
    residue_peak: Optional[np.ndarray] = None

    @property
    def tmax(self) -> np.ndarray:
        """Tmax in s: the fitted delay plus the effective residue's own peak time (0 without dispersion:
        the gamma-family residue peaks at t = 0)."""
        return self.delay if self.residue_peak is None else self.delay + self.residue_peak


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
                 interpolation: str = "linear", dispersion_s: float = 0.0):
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
        if dispersion_s > 0:  # the tissue's input: the AIF convolved with exp(-t/beta)/beta (unit area)
            from scipy import signal

            q = np.exp(-self.h / dispersion_s)
            fine = signal.lfilter([1.0 - q], [1.0, -q], fine)
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


class _CurveTable:
    """Unit-F model curves ``G(s; MTT_r) = (C_a (*) R)(s)`` of one AIF and one shape on a grid of
    ``s`` (step ``h``) x ``log MTT_r`` (step ``MTT_TABLE_STEP``), with ``dG/ds`` and ``dG/dlog MTT_r``.

    A voxel's model is then ``F * G(t_n - delay; MTT_r)``, evaluated by bilinear interpolation --
    the fast path used when every voxel shares one shape (the default). ``G`` is built with the exact
    kernels of :class:`_Model` (closed-form gamma functions at the grid's MTT values) and one FFT
    convolution per table.
    """

    def __init__(self, model: _Model, alpha: float, delay_bounds, mtt_bounds):
        h = model.h
        self.h = h
        self.times = np.arange(model.n) * model.dt
        s_lo = -delay_bounds[1] - 2 * h
        s_hi = self.times[-1] - delay_bounds[0] + 2 * h
        self.i_lo = int(np.floor(s_lo / h))
        i_hi = int(np.ceil(s_hi / h))
        step = MTT_TABLE_STEP
        self.log_mtt0 = np.log(mtt_bounds[0]) - step
        self.log_step = step
        log_mtt = self.log_mtt0 + step * np.arange(int(np.ceil((np.log(mtt_bounds[1]) - self.log_mtt0) / step)) + 2)
        self.n_mtt = log_mtt.size
        mtt = np.exp(log_mtt)[:, None]
        lags = np.arange(-2, i_hi + 2) * h                       # R2 points for K at lags -1 .. i_hi
        sp = np.maximum(lags[None, :], 0.0)
        u = sp / mtt
        x = alpha * u
        q = special.gammaincc(alpha, x)
        p1 = special.gammainc(alpha + 1.0, x)
        p2 = special.gammainc(alpha + 2.0, x)
        r1 = mtt * (u * q + p1)
        r2 = mtt * mtt * (0.5 * u * u * q + u * p1 - (alpha + 1.0) / (2.0 * alpha) * p2)

        def dd(v):
            return (v[:, 2:] - 2.0 * v[:, 1:-1] + v[:, :-2]) / h

        kernels = np.stack([dd(r2), dd(r1), dd(2.0 * r2 - sp * r1)])  # (3, n_mtt, i_hi + 2): lags -1 .. i_hi
        aif = model.fine_aif
        length = i_hi + 2
        extended = np.full(length, aif[-1])
        extended[:min(length, aif.size)] = aif[:length]
        size = 1 << int(np.ceil(np.log2(2 * length)))
        conv = np.fft.irfft(np.fft.rfft(kernels, size) * np.fft.rfft(extended, size), size)[..., :length]
        # conv[..., p] is G at s = (p - 1) h; the table starts at i_lo (G = 0 below s = -h)
        self.n_s = i_hi - self.i_lo + 1
        table = np.zeros((3, self.n_mtt, self.n_s))
        first = -1 - self.i_lo
        table[:, :, first:] = conv[:, :, :self.n_s - first]
        # Every frame of a voxel shares the delay's fractional position w (frames are k = TR / h table
        # steps apart), so the table is stored by residue class r = i mod k: row (j, r) holds
        # G(s_(r + q k)) for q = 0, 1, ...; a voxel's N frames are then N consecutive entries of one row.
        k = int(round(model.dt / h))
        self.k = k
        self.n_frames = model.n
        per_class = -(-self.n_s // k) + 1
        padded = np.zeros((3, self.n_mtt, per_class * k), np.float32)
        padded[:, :, :self.n_s] = table
        padded[:, :, self.n_s:] = table[:, :, -1:]
        by_class = np.ascontiguousarray(padded.reshape(3, self.n_mtt, per_class, k).transpose(0, 1, 3, 2))
        self.windows = np.lib.stride_tricks.sliding_window_view(by_class, model.n, axis=-1)  # (3, m, k, Q, N)
        self.max_start = (per_class - model.n) * k - 1

    def _corners(self, delay, log_mtt):
        x = np.clip((self.times[0] - delay) * (1.0 / self.h) - self.i_lo, 0.0, self.max_start - 1e-6)
        i = x.astype(np.int64)
        w = (x - i).astype(np.float32)[:, None]
        y = np.clip((log_mtt - self.log_mtt0) * (1.0 / self.log_step), 0.0, self.n_mtt - 1.000001)
        j = y.astype(np.int64)
        v = (y - j).astype(np.float32)[:, None]
        return (i % self.k, i // self.k), ((i + 1) % self.k, (i + 1) // self.k), j, w, v

    def _interpolate(self, which, corners):
        (r0, q0), (r1, q1), j, w, v = corners
        table = self.windows[which]
        a = table[j, r0, q0]
        low = a + w * (table[j, r1, q1] - a)
        b = table[j + 1, r0, q0]
        high = b + w * (table[j + 1, r1, q1] - b)
        high -= low
        high *= v
        high += low
        return high

    def curves_and_derivatives(self, delay, log_mtt):
        """Unit-F curves ``G`` and ``dG/d delay``, ``dG/d log MTT_r``, each ``(n, t)`` float32."""
        corners = self._corners(delay, log_mtt)
        return (self._interpolate(0, corners), -self._interpolate(1, corners), self._interpolate(2, corners))

    def evaluate(self, p, with_jacobian):
        """Model ``(n, t)`` and Jacobian ``(n, 3, t)`` for parameters ``(F, delay, log MTT_r)`` ``(n, 3)``."""
        corners = self._corners(p[:, 1], p[:, 2])
        f = p[:, 0:1]
        g = self._interpolate(0, corners)
        if not with_jacobian:
            return f * g, None
        jac = np.empty((p.shape[0], 3, g.shape[1]))
        jac[:, 0] = g
        jac[:, 1] = -f * self._interpolate(1, corners)
        jac[:, 2] = f * self._interpolate(2, corners)
        return f * g, jac

    def atoms(self, delays, mtt_values):
        """Unit-F model curves ``(K, t)`` of every ``(mtt, delay)`` pair of the two grids."""
        log_mtt, delay = (g.ravel() for g in np.meshgrid(np.log(mtt_values), delays, indexing="ij"))
        p = np.stack([np.ones_like(delay), delay, log_mtt], axis=1)
        return self.evaluate(p, False)[0], delay, log_mtt


def dispersed_residue_peak(alpha: float, mtt: np.ndarray, dispersion_s: float) -> np.ndarray:
    """Time (s) of the maximum of ``(exp(-t/beta)/beta) (*) R(t)`` -- the effective residue of a
    dispersed bolus -- for the gamma residue of shape ``alpha`` and mean ``mtt`` (array, s).

    Tabulated on 200 log-spaced MTT values (FFT convolution on a beta/200 grid), interpolated in
    log MTT; 0 without dispersion."""
    mtt = np.asarray(mtt, dtype=np.float64)
    if not dispersion_s > 0:
        return np.zeros_like(mtt)
    grid = np.geomspace(max(float(np.min(mtt)), 1e-3), max(float(np.max(mtt)), 1e-3) * 1.0001 + 1e-9, 200)
    step = dispersion_s / 200.0
    tau = (np.arange(4096) + 0.5) * step
    kernel = np.exp(-tau / dispersion_s) / dispersion_s
    residue = special.gammaincc(alpha, alpha * tau[None, :] / grid[:, None])
    size = 8192
    eff = np.fft.irfft(np.fft.rfft(kernel, size) * np.fft.rfft(residue, size), size)[:, :tau.size]
    i = np.clip(np.argmax(eff, axis=1), 1, tau.size - 2)
    rows = np.arange(grid.size)
    left, centre, right = eff[rows, i - 1], eff[rows, i], eff[rows, i + 1]
    curvature = left - 2 * centre + right
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.clip(np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0), -0.5, 0.5)
    peak = (i + 1 + shift) * step            # index i of the convolution sum is the time (i + 1) step
    return np.interp(np.log(mtt), np.log(grid), peak)


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


def _varpro(table: "_CurveTable", y: np.ndarray, theta: np.ndarray, lower: np.ndarray, upper: np.ndarray,
            max_iterations: int):
    """Variable-projection Levenberg-Marquardt on ``theta = (delay, log MTT_r)`` ``(n, 2)`` for curves
    ``y`` ``(n, t)``, F projected out (``F = max(0, <y, G> / <G, G>)``), all voxels together.

    Kaufman's Jacobian of the projected residual ``r = y - F G``: ``J_k = -F (D_k - G <G, D_k> / <G, G>)``
    with ``D_k = dG/d theta_k``; since ``r`` is orthogonal to ``G``, ``J^T r = -F <D_k, r>``. The 2 x 2
    damped normal equations are solved in closed form; Marquardt damping, box bounds by projection and
    the stopping rules of :func:`perfusionai.dr.fitting.levenberg_marquardt` (relative cost decrease
    ``LM_FTOL``, relative step ``LM_XTOL``). One evaluation (curves and derivatives) per iteration.
    Returns ``(F, theta, cost, status)``; status 1 converged, -1 iteration limit.
    """
    n = y.shape[0]
    y32 = y.astype(np.float32, copy=False)
    yy = np.einsum("ij,ij->i", y, y, dtype=np.float64)

    def state(th, rows):
        g, d1, d2 = table.curves_and_derivatives(th[:, 0], th[:, 1])
        yr = y32[rows]
        gg = np.einsum("ij,ij->i", g, g, dtype=np.float64)
        yg = np.einsum("ij,ij->i", yr, g, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(gg > 0, np.maximum(yg, 0.0) / gg, 0.0)
        cost = np.maximum(yy[rows] - f * yg, 0.0)
        return f, cost, (g, d1, d2, gg, yg)

    def step(f, parts, rows, lam):
        g, d1, d2, gg, yg = parts
        r = y32[rows] - f.astype(np.float32)[:, None] * g
        gd1 = np.einsum("ij,ij->i", g, d1, dtype=np.float64)
        gd2 = np.einsum("ij,ij->i", g, d2, dtype=np.float64)
        safe = np.where(gg > 0, gg, 1.0)
        f2 = f * f
        a11 = f2 * (np.einsum("ij,ij->i", d1, d1, dtype=np.float64) - gd1 * gd1 / safe)
        a22 = f2 * (np.einsum("ij,ij->i", d2, d2, dtype=np.float64) - gd2 * gd2 / safe)
        a12 = f2 * (np.einsum("ij,ij->i", d1, d2, dtype=np.float64) - gd1 * gd2 / safe)
        b1 = f * np.einsum("ij,ij->i", d1, r, dtype=np.float64)     # = -J^T r
        b2 = f * np.einsum("ij,ij->i", d2, r, dtype=np.float64)
        floor = 1e-12 * (a11 + a22) + 1e-300
        m11 = a11 + lam * np.maximum(a11, floor)
        m22 = a22 + lam * np.maximum(a22, floor)
        det = m11 * m22 - a12 * a12
        with np.errstate(divide="ignore", invalid="ignore"):
            s1 = np.where(det > 0, (m22 * b1 - a12 * b2) / det, 0.0)
            s2 = np.where(det > 0, (m11 * b2 - a12 * b1) / det, 0.0)
        return np.stack([s1, s2], axis=1)

    theta = np.clip(theta, lower, upper)
    rows_all = np.arange(n)
    f, cost, parts = state(theta, rows_all)
    lam = np.full(n, 1e-3)
    status = np.full(n, -1, np.int8)
    active = np.flatnonzero(f > 0)
    status[f <= 0] = 1                       # no positive projection: F = 0, nothing to fit
    span = upper - lower
    for _ in range(int(max_iterations)):
        if active.size == 0:
            break
        sub = tuple(x[active] for x in parts[:3]) + (parts[3][active], parts[4][active])
        delta = step(f[active], sub, active, lam[active])
        trial = np.clip(theta[active] + delta, lower, upper)
        f_try, cost_try, parts_try = state(trial, active)
        better = np.isfinite(cost_try) & (cost_try < cost[active])
        decrease = (cost[active] - cost_try) / np.maximum(cost[active], 1e-300)
        moved = np.max(np.abs(trial - theta[active]) / (np.abs(theta[active]) + 1e-6 * span + 1e-300), axis=1)
        accepted = active[better]
        theta[accepted] = trial[better]
        f[accepted] = f_try[better]
        cost[accepted] = cost_try[better]
        for whole, new in zip(parts, parts_try):
            whole[accepted] = new[better]
        lam[active] = np.where(better, np.maximum(lam[active] * 0.2, 1e-12), np.minimum(lam[active] * 5.0, 1e16))
        done = (better & ((decrease < LM_FTOL) | (moved < LM_XTOL))) | (~better & (moved < LM_XTOL))
        done |= lam[active] >= 1e16
        done |= f[active] <= 0
        status[active[done]] = 1
        active = active[~done]
    return f, theta, cost, status


def _solve_fixed_shape(table: _CurveTable, work, lower, upper, max_iterations, chunk_voxels, delay_bounds,
                       report):
    """Grid start (CBF projected out) + batched LM on ``(F, delay, log MTT_r)`` with one shared shape."""
    n_vox = work.shape[0]
    delays = np.arange(max(delay_bounds[0], -3.0), min(delay_bounds[1], 12.0) + 1e-9, GRID_DELAY_STEP_S)
    atoms, delay_vals, log_mtt = table.atoms(delays, np.asarray(GRID_MTT))
    norms = np.linalg.norm(atoms, axis=1)
    usable = norms > 0
    unit = (atoms[usable] / norms[usable, None]).T.astype(np.float32)
    delay_vals, log_mtt, norms = delay_vals[usable], log_mtt[usable], norms[usable]
    params = np.empty((n_vox, 3))
    cost = np.zeros(n_vox)
    status = np.zeros(n_vox, np.int8)

    def solve(bounds):
        start, stop = bounds
        y = work[start:stop]
        scores = y.astype(np.float32) @ unit
        best = np.argmax(scores, axis=1)
        projection = np.maximum(scores[np.arange(stop - start), best], 0.0)
        p0 = np.stack([projection / norms[best], delay_vals[best], log_mtt[best]], axis=1)
        f, theta, c, st = _varpro(table, y, p0[:, 1:], lower[1:], upper[1:], max_iterations)
        return np.concatenate([f[:, None], theta], axis=1), c, st

    # Chunks run on as many threads as the BLAS pool has (numpy releases the GIL in the array work),
    # each with single-threaded BLAS -- the scheme of the oSVD scan (deconvolution._osvd).
    from . import deconvolution as dec

    blocks = [(start, min(n_vox, start + chunk_voxels)) for start in range(0, n_vox, chunk_voxels)]
    workers = min(dec._blas_threads(), len(blocks))
    with dec._single_threaded_blas():
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            executor = ThreadPoolExecutor(max_workers=workers)
            results = executor.map(solve, blocks)
        else:
            executor = None
            results = map(solve, blocks)
        try:
            for (start, stop), (p, c, st) in zip(blocks, results):
                params[start:stop], cost[start:stop], status[start:stop] = p, c, st
                report(0.3 + 0.7 * stop / n_vox, "parametric fit: Levenberg-Marquardt")
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
    return params, cost, status


def fit_parametric(
    concentration: np.ndarray,
    aif: np.ndarray,
    dt: float,
    delay_bounds: Tuple[float, float] = DEFAULT_DELAY_BOUNDS,
    mtt_bounds: Tuple[float, float] = DEFAULT_MTT_BOUNDS,
    shape_bounds: Tuple[float, float] = DEFAULT_SHAPE_BOUNDS,
    shape: Optional[float] = None,
    shape_prior_sd: Optional[float] = DEFAULT_SHAPE_PRIOR_SD,
    dispersion_s: float = 0.0,
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
    curves = c.reshape(-1, c.shape[-1])
    if curves.dtype not in (np.float32, np.float64):
        curves = curves.astype(np.float64)
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
    if shape is not None and not (np.isfinite(shape) and shape > 0):
        raise ParameterError("parametric_shape", f"the gamma shape must be positive, got {shape}")
    report = as_progress(progress)
    if not (np.isfinite(dispersion_s) and dispersion_s >= 0):
        raise ParameterError("parametric_dispersion_s", f"must be >= 0 seconds, got {dispersion_s}")
    model = _Model(a, dt, (lo_d, hi_d), AIF_UPSAMPLE, "cubic", dispersion_s)
    finite = np.isfinite(curves.sum(axis=1))
    work = curves if finite.all() else np.where(finite[:, None], curves, 0)  # the input is never modified

    # F's upper bound: 100 x the largest flow any unit curve of the model could need for any voxel
    peak_unit = float(np.max(model.fine_aif)) * model.dt
    f_upper = 100.0 * max(float(np.max(np.abs(work), initial=0.0)) / max(peak_unit, 1e-12), 1e-3)
    lower = np.array([0.0, lo_d, np.log(lo_m), np.log(lo_a)])
    upper = np.array([f_upper, hi_d, np.log(hi_m), np.log(hi_a)])
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
            y = work[part].astype(np.float64)
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
                np.broadcast_to(upper, (count, 4)), max_iter=int(max_iterations), ftol=LM_FTOL, xtol=LM_XTOL)
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
    mode = "fixed" if shape is not None else (
        "free" if shape_prior_sd is None or not np.isfinite(shape_prior_sd) else
        "population" if shape_prior_sd == 0 else "prior")
    if mode == "prior" and not shape_prior_sd > 0:
        raise ParameterError("parametric_shape_prior_sd", f"must be >= 0, got {shape_prior_sd}")
    if mode in ("population", "prior") and lo_a < hi_a:
        # the population's shape: free fits of a sample of strong curves (50th-99th energy percentile)
        energy = np.einsum("ij,ij->i", work, work, dtype=np.float64)
        low, high = np.percentile(energy, [50, 99]) if n_vox > 1 else (-np.inf, np.inf)
        pool = np.flatnonzero((energy >= low) & (energy <= high))
        pool = pool if pool.size else every
        sample = np.sort(np.random.default_rng(0).permutation(pool)[:SHAPE_SAMPLE_VOXELS])
        start, _, _, _ = _grid_start(model, work[sample].astype(np.float64), (lo_d, hi_d), (lo_a, hi_a), chunk_voxels, report)
        p_sample, _, s_sample = solve(sample, np.clip(start, lower, upper), fraction=(0.1, 0.3))
        good = (s_sample == 1) & (p_sample[:, 0] > 0)
        shape_centre = float(np.median(p_sample[good, 3] if good.any() else p_sample[:, 3]))
    elif mode == "fixed":
        shape_centre = float(np.log(shape))
    elif mode == "population":
        shape_centre = float(np.log(lo_a))
    if mode in ("fixed", "population"):
        alpha = float(np.exp(shape_centre))
        table = _CurveTable(_Model(a, dt, (lo_d, hi_d), TABLE_UPSAMPLE, "cubic", dispersion_s), alpha,
                            (lo_d, hi_d), (lo_m, hi_m))
        params, cost, status = _solve_fixed_shape(table, work, lower[:3], upper[:3], max_iterations,
                                                   chunk_voxels, (lo_d, hi_d), report)
        params = np.concatenate([params, np.full((n_vox, 1), shape_centre)], axis=1)
        n_candidates = None
    else:
        if dispersion_s > 0:
            raise ParameterError("parametric_dispersion_s", "dispersion needs one residue shape per volume "
                                                            "(shape_prior_sd 0 or a fixed shape)")
        params, projection, grid_residual, n_candidates = _grid_start(
            model, work, (lo_d, hi_d), (lo_a, hi_a), chunk_voxels, report)
        params = np.clip(params, lower, upper)
        if mode == "prior":
            # every voxel with a Gaussian prior on log alpha around the population's, weighted by its noise
            sigma = np.sqrt(grid_residual / max(n_t - 4, 1))
            weight = np.maximum(sigma, 1e-12) / float(shape_prior_sd)
            params[:, 3] = np.clip(shape_centre, lower[3], upper[3])
            params, cost, status = solve(every, params, shape_centre, weight, fraction=(0.3, 1.0))
        else:
            params, cost, status = solve(every, params)

    f, delay, mtt_r, shape = params[:, 0], params[:, 1], np.exp(params[:, 2]), np.exp(params[:, 3])
    residue_peak = dispersed_residue_peak(float(np.exp(shape_centre)), mtt_r, dispersion_s) \
        if dispersion_s > 0 else np.zeros(n_vox)
    total = (np.einsum("ij,ij->i", work, work, dtype=np.float64)
             - work.sum(axis=1, dtype=np.float64) ** 2 / n_t)          # sum of squares about the mean
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1.0 - cost / total, np.nan)
        peak = np.maximum(work.max(axis=1), -work.min(axis=1)).astype(np.float64)
        nrmse = np.where(peak > 0, np.sqrt(cost / n_t) / peak, np.nan)
    converged = (status == 1) & finite & np.all(np.isfinite(params), axis=1)
    span = upper - lower
    at_bound = np.any((params[:, 1:3] <= lower[1:3] + 1e-6 * span[1:3]) |
                      (params[:, 1:3] >= upper[1:3] - 1e-6 * span[1:3]), axis=1)
    info = {
        "method": "parametric", "model": "delayed gamma-distributed transit times (Mouridsen 2006)",
        "delay_bounds_s": [lo_d, hi_d], "mtt_bounds_s": [lo_m, hi_m], "shape_bounds": [lo_a, hi_a],
        "shape_mode": mode, "max_iterations": int(max_iterations),
        "n_voxels": int(n_vox), "n_converged": int(converged.sum()),
        "n_not_converged": int(n_vox - converged.sum()), "n_at_bound": int(at_bound.sum()),
        "n_non_finite_curves": int(n_vox - finite.sum()),
        "r2_median": float(np.nanmedian(r2)) if np.any(np.isfinite(r2)) else None,
        "shape": None if shape_centre is None else float(np.exp(shape_centre)),
        "shape_prior_sd_log": float(shape_prior_sd) if mode == "prior" else None,
        "dispersion_s": float(dispersion_s),
    }
    return ParametricResult(cbf=f, delay=delay, mtt_residue=mtt_r, shape=shape, cbv_model=f * mtt_r, r2=r2,
                            nrmse=nrmse, converged=converged, at_bound=at_bound, dt=float(dt), info=info,
                            residue_peak=residue_peak)


# --------------------------------------------------------------------------------------
# the runner of the method registry (perfusionai.dsc.methods, kind "parametric")


def run_parametric(problem, progress):
    """Runner of kind ``"parametric"`` (:data:`perfusionai.dsc.model.RUNNERS`): the five maps of
    ``problem`` (a :class:`perfusionai.dsc.model.FitProblem`) plus ``fit_r2`` (1 - SSR/SST of each
    voxel's fitted curve) and ``converged`` (1 where the fit converged, 0 where not; the count is in
    the summary's ``regularisation.n_not_converged``); with ``save_residue`` the series ``residue``
    (the fitted ``F R(t)`` at lags ``0, dt, ...``, 1/s; without the dispersion kernel)."""
    from . import maps as maps_mod
    from .model import MethodOutput

    o = problem.options
    result = fit_parametric(problem.curves, problem.aif, problem.dt, shape=o.parametric_shape,
                            dispersion_s=o.parametric_dispersion_s, progress=progress)
    window = maps_mod.cbv_window_frames(problem.aif, o.cbv_window)
    cbv = maps_mod.cbv_map(problem.curves, problem.aif, problem.dt, o.kh, o.rho, o.cbv_integration, window)
    cbf = maps_mod.cbf_map(result.cbf, o.kh, o.rho)
    maps = {"cbv": cbv, "cbf": cbf, "mtt": maps_mod.mtt_map(cbv, cbf), "tmax": result.tmax,
            "ttp": maps_mod.ttp_map(problem.curves, problem.times)}
    extra = {"fit_r2": result.r2, "converged": result.converged.astype(np.float32)}
    series = {}
    if getattr(o, "save_residue", False):   # the fitted flow-scaled residue F R(t) at the frame lags (1/s)
        lags = np.arange(problem.curves.shape[-1]) * problem.dt
        shape = result.shape[:, None]
        series["residue"] = (result.cbf[:, None] * special.gammaincc(
            shape, shape * lags[None, :] / result.mtt_residue[:, None])).astype(np.float32)
    return MethodOutput(maps=maps, regularisation=dict(result.info), extra_maps=extra, series=series)
