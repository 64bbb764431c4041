"""Model-free deconvolution of DSC concentration curves: sSVD, cSVD, oSVD, Tikhonov.

The indicator-dilution model (Ostergaard 1996) is

    C_t(t) = CBF * (C_a * R)(t),

discretised on a uniform grid of step ``dt`` as ``C_t = A @ (CBF * R)`` with ``A`` the
AIF convolution matrix scaled by ``dt``. Every solver here returns the *flow-scaled*
residue ``k = CBF * R`` in 1/s; CBF is its maximum (1/s; multiply by 6000 kH/rho for
mL/100 g/min, see :mod:`perfusionai.dsc.maps`).

Array layout: concentration curves are ``(n_voxels, t)`` (time last); any leading
shape ``[..., t]`` is accepted and flattened. Residues are ``(n_voxels, L)`` with
``L = t`` for the Toeplitz (non-circulant) matrix and ``L = 2 t`` for the block-circulant
matrix; in the circulant case samples ``L - m`` hold the residue at time ``-m*dt``
(the tissue curve arriving *before* the AIF), which is why :func:`tmax_seconds` maps
indices ``>= t`` to negative times.

Discretisation (pin it in tests, research/dsc.md section 0):

* ``"rectangle"`` (default): plain Ostergaard left-rectangle matrix
  ``A[i, j] = dt * C_a[i - j]`` -- exact on "inverse-crime" simulators such as the
  Chakwizira/OSIPI DRO and :mod:`perfusionai.phantoms`.
* ``"simpson"``: the dsc-mri-toolbox convention (Peruzzo/Castellaro, FAIR-Unipd): interior
  AIF samples smoothed as ``(a[k-1] + 4 a[k] + a[k+1]) / 6``; for the circulant matrix the
  last sample becomes ``(a[N-2] + 4 a[N-1]) / 6`` and the first padded sample ``a[N-1] / 6``.
  With it, :func:`deconvolve` reproduces that toolbox's SVD/cSVD/oSVD CBF.

Regularisation (all relative to the largest singular value ``s_max`` of ``A``):

* sSVD / cSVD: truncated SVD keeping singular values ``s >= threshold * s_max``
  (defaults 0.2 and 0.1, Ostergaard 1996 / Wu 2003 / dsc-mri-toolbox).
* oSVD (Wu 2003, dsc-mri-toolbox variant): circulant matrix; for each voxel the truncation
  threshold is the first of ``0.05, 0.10, ..., 0.95`` whose residue has an oscillation
  index ``OI = (1/L) (1/max k) sum_{m>=2} |k_m - 2 k_{m-1} + k_{m-2}|`` below
  ``oi_threshold`` (default 0.035); when none does, the last threshold is used.
* Tikhonov: filter factors ``s^2 / (s^2 + lambda^2)`` with ``lambda = rel * s_max``; either a
  fixed ``rel`` or chosen **per voxel** over a log-spaced grid (1e-3 .. 1 x s_max, 49 values)
  by generalised cross-validation (GCV, the default: minimises
  ``||A x - c||^2 / (L - sum f)^2``) or by the L-curve corner (maximum curvature of
  (log residual norm, log solution norm)). On OSIPI (SNR 200) both are accurate (CBF mean
  error 8 % GCV, 6 % L-curve). On noisy delay/flow phantoms (SNR 50, issue 15) the per-voxel
  choices break down: noise makes false L-curve corners (and GCV minima) at tiny lambda, the
  residues oscillate and their maxima lose the ranking of CBF (L-curve CBF Spearman -0.01,
  GCV 0.82 on a low-contrast DRO). ``tikhonov_floor=f`` fixes it: the criterion is first
  evaluated on the whole volume (GCV of the summed residuals, one lambda), and each voxel may
  then choose only lambdas at least that value / ``f`` (Spearman 0.93-0.94 for both criteria on
  the DROs of Testing/test_dsc_accuracy.py; OSIPI unchanged). :class:`perfusionai.dsc.DSCModel`
  uses ``f = 2``; this function defaults to None (the plain per-voxel criterion).

Speed: the filtered pseudo-inverse is computed once per AIF, so sSVD, cSVD and fixed
Tikhonov cost one GEMM per chunk of voxels; oSVD computes the residue and its second
differences of the first candidate in one GEMM, then, for the voxels that failed the OI
test only, subtracts the few singular components the next threshold drops (two thin GEMMs)
-- candidates that keep the same singular values are evaluated once. The scan runs on
blocks of 1024 voxels (cache-sized) spread over as many threads as the BLAS pool has
(OMP_NUM_THREADS), each with single-threaded BLAS. Pseudo-inverses are always computed in float64; the
per-voxel products run in the precision of the input curves: float32 input (what
:func:`perfusionai.dsc.pipeline.compute_dsc_maps` passes) halves memory traffic and keeps
about 1e-6 relative accuracy at the default thresholds; float64 input (or any other dtype)
runs in float64, which vanishing-regularisation solves need because the AIF matrix is
ill-conditioned. Chunks bound memory to about ``chunk_voxels * 2L * itemsize`` per temporary.

Uniform sampling: the Toeplitz/circulant model needs a constant frame interval;
:func:`frame_interval` refuses frame times that deviate by more than 1 % from the median
interval.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import ParameterError, input_error
from ..progress import ProgressCallback, as_progress
from .acquisition import frame_interval
from .methods import METHODS as REGISTRY
from .methods import resolve_method

#: solver keys of the deconvolution methods in the registry (:mod:`perfusionai.dsc.methods`)
METHODS = tuple(m.solver for m in REGISTRY.values() if m.kind == "deconvolution")
DISPLAY_NAMES = {m.solver: m.name for m in REGISTRY.values() if m.kind == "deconvolution"}
DEFAULT_THRESHOLDS = {m.solver: m.defaults["threshold"] for m in REGISTRY.values()
                      if m.kind == "deconvolution" and "threshold" in m.defaults}
DEFAULT_OI_THRESHOLD = REGISTRY["oSVD"].defaults["oi_threshold"]
#: oSVD candidate truncation thresholds (relative to s_max), scanned in this order.
OSVD_CANDIDATE_THRESHOLDS = tuple(round(0.05 * m, 2) for m in range(1, 20))
#: fixed Tikhonov default: lambda = 0.1 * s_max (research/dsc.md section 3).
DEFAULT_TIKHONOV_LAMBDA = REGISTRY["Tikhonov"].defaults["fixed_lambda"]
#: lambda grid of the automatic Tikhonov criteria, relative to s_max.
TIKHONOV_LAMBDA_GRID = tuple(np.logspace(-3, 0, 49))
TIKHONOV_CRITERIA = ("lcurve", "gcv", "fixed")
FLOOR_CRITERION = "gcv"
DISCRETISATIONS = ("rectangle", "simpson")
DEFAULT_CHUNK_VOXELS = 16384
OSVD_BLOCK_VOXELS = 1024


@dataclass
class DeconvolutionResult:
    """Output of :func:`deconvolve`.

    Attributes
    ----------
    residue
        Flow-scaled residue ``k(t) = CBF * R(t)`` in 1/s, shape ``(n_voxels, L)``
        (``L = t``, or ``2 t`` for circulant methods; see the module docstring).
    cbf
        ``max_t k(t)`` per voxel in 1/s, shape ``(n_voxels,)`` (multiply by 6000 kH/rho for
        mL/100 g/min).
    tmax_index
        Index of the residue maximum, shape ``(n_voxels,)``, int.
    regularisation
        Per-voxel relative regularisation actually used, shape ``(n_voxels,)``: the
        truncation threshold (fraction of ``s_max``) for SVD methods, ``lambda / s_max``
        for Tikhonov.
    oscillation_index
        oSVD only: the OI of the accepted residue, shape ``(n_voxels,)``; else None.
    """

    residue: np.ndarray
    cbf: np.ndarray
    tmax_index: np.ndarray
    regularisation: np.ndarray
    method: str
    discretisation: str
    circulant: bool
    dt: float
    n_frames: int
    oscillation_index: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)

    def tmax_seconds(self, refine: bool = False) -> np.ndarray:
        """Time of the residue maximum in seconds, shape ``(n_voxels,)`` (see :func:`tmax_seconds`)."""
        return tmax_seconds(self.residue, self.dt, self.n_frames, refine=refine)


# --------------------------------------------------------------------------------------
# helpers


def solver_key(method) -> str:
    """The solver key (``"ssvd"``, ``"csvd"``, ``"osvd"``, ``"tikhonov"``) of a deconvolution method
    name resolved by the registry; other methods are refused (parameter ``method``)."""
    entry = resolve_method(method)
    if entry.kind != "deconvolution":
        raise ParameterError("method", f"{entry.name} is not a deconvolution method; choose one of "
                                       f"{', '.join(DISPLAY_NAMES.values())}")
    return entry.solver


def convolution_matrix(aif: np.ndarray, dt: float, discretisation: str = "rectangle",
                       circulant: bool = False) -> np.ndarray:
    """The AIF convolution matrix scaled by ``dt``.

    Parameters
    ----------
    aif
        Arterial concentration, shape ``(t,)``, in 1/s (delta R2*) or any unit shared with
        the tissue curves.
    dt
        Frame interval in seconds.
    discretisation
        ``"rectangle"`` or ``"simpson"`` (see the module docstring).
    circulant
        False: lower-triangular Toeplitz ``(t, t)``; True: block-circulant ``(2t, 2t)`` of the
        zero-padded AIF (Wu 2003).
    """
    a = np.asarray(aif, dtype=np.float64).ravel()
    n = a.size
    if discretisation not in DISCRETISATIONS:
        raise ParameterError("discretisation", f"unknown discretisation {discretisation!r}; "
                          f"choose one of {', '.join(DISCRETISATIONS)}")
    length = 2 * n if circulant else n
    column = np.zeros(length)
    if discretisation == "rectangle":
        column[:n] = a
    else:
        column[0] = a[0]
        column[1:n - 1] = (a[:-2] + 4.0 * a[1:-1] + a[2:]) / 6.0
        if circulant:
            # dsc-mri-toolbox closes the Simpson rule into the padding.
            column[n - 1] = (a[n - 2] + 4.0 * a[n - 1]) / 6.0
            column[n] = a[n - 1] / 6.0
        else:
            column[n - 1] = a[n - 1]
    index = np.arange(length)
    lag = index[:, None] - index[None, :]
    if circulant:
        matrix = column[lag % length]
    else:
        matrix = np.where(lag >= 0, column[np.clip(lag, 0, None)], 0.0)
    return dt * matrix


def oscillation_index(residue: np.ndarray) -> np.ndarray:
    """Oscillation index of residues ``(n, L)``: ``(1/L)(1/max k) sum |k_m - 2k_{m-1} + k_{m-2}|``.

    Dimensionless, shape ``(n,)``. As in dsc-mri-toolbox, ``max k`` is signed, so a residue
    whose maximum is negative gets a negative OI (and passes any positive limit); an
    all-zero residue gives NaN (never passes).
    """
    k = np.asarray(residue, dtype=np.float64)
    length = k.shape[-1]
    second_difference = np.abs(k[:, 2:] - 2.0 * k[:, 1:-1] + k[:, :-2]).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return second_difference / (length * k.max(axis=1))


def tmax_seconds(residue: np.ndarray, dt: float, n_frames: int, refine: bool = False) -> np.ndarray:
    """Time of the residue maximum in seconds, shape ``(n,)``, from residues ``(n, L)``.

    Sample grid by default (integer-sample delays come out exact). Circulant residues
    (``L = 2 n_frames``) map indices ``>= n_frames`` to negative times ``(index - L) dt``.
    ``refine=True`` adds a parabolic sub-sample correction through the maximum and its two
    neighbours (clipped to +-0.5 sample).
    """
    k = np.asarray(residue)
    length = k.shape[-1]
    index = np.argmax(k, axis=1)
    shift = np.zeros(index.shape, dtype=np.float64)
    if refine and length >= 3:
        rows = np.arange(k.shape[0])
        left = k[rows, (index - 1) % length]
        centre = k[rows, index]
        right = k[rows, (index + 1) % length]
        curvature = left - 2.0 * centre + right
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
        if length == n_frames:  # no wrap-around for the Toeplitz residue
            shift = np.where((index == 0) | (index == length - 1), 0.0, shift)
        shift = np.clip(np.nan_to_num(shift), -0.5, 0.5)
    position = index.astype(np.float64)
    if length > n_frames:
        position = np.where(index >= n_frames, position - length, position)
    return (position + shift) * dt


def _as_curves(concentration: np.ndarray) -> np.ndarray:
    c = np.asarray(concentration)
    if c.ndim < 1:
        raise input_error("concentration", "expected curves with time on the last axis")
    return c.reshape(-1, c.shape[-1])


def _filtered_pinv(u: np.ndarray, s: np.ndarray, vt: np.ndarray, factors: np.ndarray,
                   n_in: int) -> np.ndarray:
    """``V diag(f / s) U^T`` restricted to the first ``n_in`` input samples: ``(L, n_in)``."""
    keep = factors > 0  # truncated SVD: only the kept rank contributes
    gain = factors[keep] / s[keep]
    return (vt[keep].T * gain) @ u[:n_in, keep].T


def _truncation_factors(s: np.ndarray, threshold: float) -> np.ndarray:
    # ">=" as in dsc-mri-toolbox; s > 0 keeps threshold 0 (no regularisation) finite.
    return ((s >= threshold * s[0]) & (s > 0)).astype(np.float64)


_THREADPOOL_CONTROLLER = []


def _single_threaded_blas():
    """Context limiting BLAS to one thread for the small (L x L) factorisations.

    A 322 x 322 SVD gains nothing from threads, and a multi-threaded OpenBLAS on a busy
    machine can take seconds for it; the big per-voxel GEMMs run outside this context.
    """
    if not _THREADPOOL_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
            _THREADPOOL_CONTROLLER.append(ThreadpoolController())
        except ImportError:  # optional: without it the factorisation uses the default pool
            _THREADPOOL_CONTROLLER.append(None)
    controller = _THREADPOOL_CONTROLLER[0]
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


_SVD_CACHE: dict = {}


def _matrix_svd(aif: np.ndarray, dt: float, discretisation: str, circulant: bool):
    """SVD of the convolution matrix, cached for the last few AIFs (tests and batch runs
    deconvolve many volumes with one AIF)."""
    key = (aif.tobytes(), float(dt), discretisation, bool(circulant))
    if key not in _SVD_CACHE:
        matrix = convolution_matrix(aif, dt, discretisation, circulant)
        with _single_threaded_blas():
            decomposition = np.linalg.svd(matrix)
        if len(_SVD_CACHE) >= 8:
            _SVD_CACHE.pop(next(iter(_SVD_CACHE)))
        _SVD_CACHE[key] = decomposition
    return _SVD_CACHE[key]


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


# --------------------------------------------------------------------------------------
# the solver


def deconvolve(
    concentration: np.ndarray,
    aif: np.ndarray,
    dt: float,
    method: str = "oSVD",
    threshold: Optional[float] = None,
    oi_threshold: float = DEFAULT_OI_THRESHOLD,
    osvd_thresholds: Sequence[float] = OSVD_CANDIDATE_THRESHOLDS,
    tikhonov_lambda: Optional[float] = None,
    tikhonov_criterion: str = "gcv",
    tikhonov_lambda_grid: Sequence[float] = TIKHONOV_LAMBDA_GRID,
    tikhonov_floor: Optional[float] = None,
    discretisation: str = "rectangle",
    circulant: Optional[bool] = None,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    progress: Optional[ProgressCallback] = None,
) -> DeconvolutionResult:
    """Deconvolve tissue concentration curves by the AIF, vectorised over voxels.

    Parameters
    ----------
    concentration
        Tissue concentration, shape ``(n_voxels, t)`` or ``[..., t]`` (time last), in the
        same unit as ``aif`` (delta R2* in 1/s from :mod:`perfusionai.dsc.concentration`, or
        concentration directly, e.g. the OSIPI curves).
    aif
        Arterial concentration, shape ``(t,)``.
    dt
        Uniform frame interval in seconds (:func:`frame_interval` checks frame times).
    method
        ``"sSVD"``, ``"cSVD"``, ``"oSVD"`` or ``"Tikhonov"`` (case-insensitive).
    threshold
        Truncation threshold relative to ``s_max`` for sSVD/cSVD (defaults 0.2 / 0.1).
    oi_threshold, osvd_thresholds
        oSVD oscillation-index limit and the candidate truncation thresholds, scanned in order.
    tikhonov_lambda, tikhonov_criterion, tikhonov_lambda_grid
        Tikhonov: ``criterion="fixed"`` uses ``lambda = tikhonov_lambda * s_max`` (default
        0.1); ``"gcv"`` (default) / ``"lcurve"`` choose ``lambda`` per voxel from the grid
        (relative to ``s_max``); a given ``tikhonov_lambda`` means "fixed".
    tikhonov_floor
        Automatic criteria only: each voxel's lambda is at least the volume's GCV lambda divided
        by this factor (module docstring); None: unconstrained per-voxel choice.
    discretisation
        ``"rectangle"`` (default) or ``"simpson"`` (dsc-mri-toolbox).
    circulant
        Matrix type; default True for cSVD/oSVD, False for sSVD/Tikhonov. sSVD is always
        Toeplitz; cSVD/oSVD always circulant.
    chunk_voxels
        Voxels per block (memory bound).
    progress
        ``progress(fraction, message)`` called between chunks (may raise Cancelled).

    Returns
    -------
    DeconvolutionResult
    """
    key = solver_key(method)
    curves = _as_curves(concentration)
    a = np.asarray(aif, dtype=np.float64).ravel()
    n_frames = curves.shape[1]
    if a.size != n_frames:
        raise input_error("AIF", f"the AIF has {a.size} samples but the tissue curves have {n_frames}")
    if not np.all(np.isfinite(a)):
        raise input_error("AIF", "the AIF curve contains NaN or infinite values")
    if not np.any(a != 0):
        raise input_error("AIF", "the AIF curve is zero everywhere; check the AIF mask")
    if not (dt > 0 and np.isfinite(dt)):
        raise input_error("frame times", f"the frame interval must be positive, got {dt}")
    if key == "ssvd":
        circulant = False
    elif key in ("csvd", "osvd"):
        circulant = True
    elif circulant is None:
        circulant = False
    criterion = str(tikhonov_criterion).lower()
    if key == "tikhonov":
        if criterion not in TIKHONOV_CRITERIA:
            raise ParameterError("tikhonov_criterion", f"unknown criterion {tikhonov_criterion!r}; "
                              f"choose one of {', '.join(TIKHONOV_CRITERIA)}")
        if tikhonov_lambda is not None:
            criterion = "fixed"
        elif criterion == "fixed":
            tikhonov_lambda = DEFAULT_TIKHONOV_LAMBDA
    if threshold is not None and not (threshold >= 0):
        raise ParameterError("threshold", f"the truncation threshold must be >= 0, got {threshold}")
    if tikhonov_lambda is not None and not (tikhonov_lambda >= 0):
        raise ParameterError("tikhonov_lambda", f"lambda must be >= 0, got {tikhonov_lambda}")

    u, s, vt = _matrix_svd(a, dt, discretisation, circulant)
    length = u.shape[0]
    n_voxels = curves.shape[0]
    report = as_progress(progress)
    work = np.float32 if curves.dtype == np.float32 else np.float64
    residue = np.empty((n_voxels, length), dtype=work)
    regularisation = np.empty(n_voxels, dtype=np.float64)
    oi_out = np.empty(n_voxels, dtype=np.float64) if key == "osvd" else None
    chunk_voxels = max(1, int(chunk_voxels))
    info: dict = {"method": DISPLAY_NAMES[key], "discretisation": discretisation,
                  "circulant": bool(circulant), "s_max": float(s[0]),
                  "condition_number": float(s[0] / s[-1]) if s[-1] > 0 else float("inf")}

    if key in ("ssvd", "csvd") or (key == "tikhonov" and criterion == "fixed"):
        if key == "tikhonov":
            lam = float(tikhonov_lambda) * s[0]
            factors = s ** 2 / (s ** 2 + lam ** 2) if lam > 0 else (s > 0).astype(np.float64)
            relative = float(tikhonov_lambda)
            info.update(criterion="fixed", relative_lambda=relative)
        else:
            relative = DEFAULT_THRESHOLDS[key] if threshold is None else float(threshold)
            factors = _truncation_factors(s, relative)
            info.update(threshold=relative, kept_singular_values=int(factors.sum()))
        with _single_threaded_blas():
            pinv_t = _filtered_pinv(u, s, vt, factors, n_frames).T.astype(work)  # (t, L)
        regularisation[:] = relative
        for start, stop in _chunks(n_voxels, chunk_voxels):
            np.matmul(curves[start:stop].astype(work, copy=False), pinv_t, out=residue[start:stop])
            report(stop / n_voxels, f"{DISPLAY_NAMES[key]} deconvolution")
    elif key == "osvd":
        _osvd(curves, u, s, vt, n_frames, float(oi_threshold), osvd_thresholds, chunk_voxels,
              residue, regularisation, oi_out, report)
        info.update(oi_threshold=float(oi_threshold), candidate_thresholds=[float(x) for x in osvd_thresholds])
    else:
        info.update(_tikhonov_auto(curves, u, s, vt, n_frames, criterion, tikhonov_lambda_grid, chunk_voxels,
                                   residue, regularisation, report, tikhonov_floor))
        info.update(criterion=criterion, lambda_grid=[float(np.min(tikhonov_lambda_grid)),
                                                      float(np.max(tikhonov_lambda_grid)),
                                                      len(tikhonov_lambda_grid)])
    cbf = residue.max(axis=1)
    tmax_index = residue.argmax(axis=1)
    return DeconvolutionResult(residue=residue, cbf=cbf, tmax_index=tmax_index,
                               regularisation=regularisation, method=DISPLAY_NAMES[key],
                               discretisation=discretisation, circulant=bool(circulant),
                               dt=float(dt), n_frames=n_frames, oscillation_index=oi_out, info=info)


_OSVD_CACHE: dict = {}


def _osvd_operators(u, s, vt, n_frames, candidates, work):
    """Operators of the oSVD scan, cached per SVD.

    Returns ``levels``: one entry per distinct truncation (thresholds that keep the same
    singular values give the same residue; the first such threshold is kept), each a dict
    with ``threshold``, ``full`` = the ``(t, 2L - 2)`` pseudo-inverse with its second-difference
    rows appended (one GEMM gives the residue and the OI numerator), and, from the second level
    on, the low-rank ``(t, k)`` / ``(k, 2L - 2)`` factors of the ``k`` singular components the
    level drops, so a voxel's trial residue can be updated instead of recomputed.
    """
    key = (id(u), u.shape, tuple(candidates), np.dtype(work).str)
    cached = _OSVD_CACHE.get(key)
    if cached is not None and cached[0] is u:
        return cached[1]
    levels = []
    previous_kept = None
    with _single_threaded_blas():
        extended = np.concatenate([vt, vt[:, 2:] - 2.0 * vt[:, 1:-1] + vt[:, :-2]], axis=1)  # (L, 2L-2)
        for value in candidates:
            kept = int(_truncation_factors(s, value).sum())
            if kept == previous_kept:
                continue
            full = (u[:n_frames, :kept] / s[:kept]) @ extended[:kept]          # (t, 2L-2)
            level = {"threshold": value, "full": full.astype(work)}
            if previous_kept is not None:
                dropped = slice(kept, previous_kept)
                level["project"] = np.ascontiguousarray(u[:n_frames, dropped]).astype(work)   # (t, k)
                level["expand"] = (extended[dropped] / s[dropped, None]).astype(work)          # (k, 2L-2)
            levels.append(level)
            previous_kept = kept
    if len(_OSVD_CACHE) >= 8:
        _OSVD_CACHE.pop(next(iter(_OSVD_CACHE)))
    _OSVD_CACHE[key] = (u, levels)
    return levels


def _blas_threads() -> int:
    """Threads the BLAS pool would use (OMP_NUM_THREADS etc.); 1 when unknown."""
    _single_threaded_blas()  # makes sure the controller exists
    controller = _THREADPOOL_CONTROLLER[0]
    if controller is None:
        return 1
    counts = [lib.num_threads for lib in controller.lib_controllers if lib.user_api == "blas"]
    return max(1, min(counts)) if counts else 1


def _osvd_block(block, levels, n_frames, length, width, oi_threshold):
    """oSVD threshold scan of one block ``(b, t)``: residues ``(b, L)``, level index, OI."""
    count = block.shape[0]
    out = np.empty((count, length), dtype=block.dtype)
    chosen = np.empty(count, dtype=np.intp)
    oi_out = np.empty(count, dtype=np.float64)
    pending = np.arange(count)
    last = len(levels) - 1
    trial = None
    for index, level in enumerate(levels):
        rows = block if index == 0 else block[pending]
        dropped = level.get("project")
        # Few dropped components: update the previous trial (two thin GEMMs) instead of a
        # full (t x 2L-2) product; otherwise recompute, which also resets rounding drift.
        if trial is not None and dropped is not None and dropped.shape[1] * (n_frames + width) < n_frames * width:
            trial -= (rows @ dropped) @ level["expand"]
        else:
            trial = rows @ level["full"]
        with np.errstate(divide="ignore", invalid="ignore"):
            oi = np.abs(trial[:, length:]).sum(axis=1) / (length * trial[:, :length].max(axis=1))
        accept = np.ones(pending.size, bool) if index == last else (oi < oi_threshold)
        if accept.any():
            target = pending[accept]
            out[target] = trial[accept, :length]
            chosen[target] = index
            oi_out[target] = oi[accept]
            keep = ~accept
            pending = pending[keep]
            if pending.size == 0:
                break
            trial = trial[keep]
    return out, chosen, oi_out


def _osvd(curves, u, s, vt, n_frames, oi_threshold, candidates, chunk_voxels,
          residue, regularisation, oi_out, report) -> None:
    candidates = [float(c) for c in candidates]
    if not candidates:
        raise ParameterError("osvd_thresholds", "need at least one candidate threshold")
    length = u.shape[0]
    work = residue.dtype
    levels = _osvd_operators(u, s, vt, n_frames, candidates, work)
    thresholds = np.array([level["threshold"] for level in levels])
    width = 2 * length - 2
    n_voxels = curves.shape[0]
    # Small blocks keep the trial residues (block x 2L x itemsize, ~1 MB) in cache across the
    # threshold scan, which is memory-bound element-wise work; numpy releases the GIL there,
    # so blocks run on as many threads as BLAS would use, each with single-threaded BLAS.
    block_size = max(1, min(int(chunk_voxels), OSVD_BLOCK_VOXELS))
    blocks = list(_chunks(n_voxels, block_size))

    def solve(bounds):
        first, stop = bounds
        return _osvd_block(curves[first:stop].astype(work, copy=False), levels, n_frames, length, width,
                           oi_threshold)

    next_report = chunk_voxels
    with threaded_blocks(solve, blocks) as results:
        for (first, stop), (block_residue, chosen, block_oi) in zip(blocks, results):
            residue[first:stop] = block_residue
            regularisation[first:stop] = thresholds[chosen]
            oi_out[first:stop] = block_oi
            if stop >= next_report or stop == n_voxels:
                report(stop / n_voxels, "oSVD deconvolution")
                next_report += chunk_voxels


@contextlib.contextmanager
def threaded_blocks(solve, blocks):
    """``solve(block)`` for every block, in order, on as many threads as the BLAS pool has, each with
    single-threaded BLAS (numpy releases the GIL in the element-wise work): yields the iterator of
    results. Pending blocks are cancelled when the caller stops early (an error, cancellation)."""
    blocks = list(blocks)
    workers = min(_blas_threads(), len(blocks))
    with _single_threaded_blas():
        executor = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        try:
            yield executor.map(solve, blocks) if executor is not None else map(solve, blocks)
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)


def _volume_choice(curves, u_in, residual_weight, solution_weight, dof, log_rel, criterion, chunk_voxels, tiny):
    """Grid index the criterion picks for the whole volume: GCV of the summed residuals, or the
    corner of the L-curve of the summed squared residual and solution norms."""
    residual_total = np.zeros(residual_weight.shape[1])
    solution_total = np.zeros(residual_weight.shape[1])
    for start, stop in _chunks(curves.shape[0], chunk_voxels):
        power = (curves[start:stop].astype(u_in.dtype, copy=False) @ u_in) ** 2
        residual_total += (power @ residual_weight).sum(axis=0)
        solution_total += (power @ solution_weight).sum(axis=0)
    if criterion == "gcv":
        return int(np.argmin(residual_total / dof ** 2))
    return int(np.argmax(_lcurve_curvature(residual_total[None, :], solution_total[None, :], log_rel, tiny)[0]))


def _lcurve_curvature(residual_sq, solution_sq, log_rel, tiny):
    """Curvature of the L-curve (log residual norm, log solution norm) over the grid, per row;
    -inf at the end points (one-sided derivatives) and where undefined."""
    rho = 0.5 * np.log(np.maximum(residual_sq, tiny))
    eta = 0.5 * np.log(np.maximum(solution_sq, tiny))
    d_rho = np.gradient(rho, log_rel, axis=1)
    d_eta = np.gradient(eta, log_rel, axis=1)
    dd_rho = np.gradient(d_rho, log_rel, axis=1)
    dd_eta = np.gradient(d_eta, log_rel, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        curvature = (d_rho * dd_eta - dd_rho * d_eta) / (d_rho ** 2 + d_eta ** 2) ** 1.5
    curvature = np.nan_to_num(curvature, nan=-np.inf)
    curvature[:, 0] = curvature[:, -1] = -np.inf
    return curvature


def _tikhonov_auto(curves, u, s, vt, n_frames, criterion, grid, chunk_voxels,
                   residue, regularisation, report, floor=None) -> dict:
    rel = np.sort(np.asarray(grid, dtype=np.float64).ravel())
    if rel.size < 3 or np.any(rel <= 0):
        raise ParameterError("tikhonov_lambda_grid", "need at least three positive lambda values")
    lam = rel * s[0]
    s2 = s ** 2
    factors = s2[:, None] / (s2[:, None] + lam[None, :] ** 2)          # (L, M)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(s[:, None] > 0, factors / s[:, None], 0.0)      # (L, M)
    residual_weight = (1.0 - factors) ** 2
    solution_weight = gain ** 2
    dof = u.shape[0] - factors.sum(axis=0)                             # (M,)
    u_in = u[:n_frames, :]
    log_rel = np.log(rel)
    n_voxels = curves.shape[0]
    work = residue.dtype
    tiny = np.finfo(work).tiny
    u_in, residual_weight, solution_weight = (x.astype(work) for x in (u_in, residual_weight, solution_weight))
    gain_rows, vt_work = gain.T.astype(work), vt.astype(work)
    allowed = np.ones(rel.size, bool)
    info: dict = {}
    if floor is not None:
        volume = _volume_choice(curves, u_in, residual_weight, solution_weight, dof, log_rel, FLOOR_CRITERION,
                                chunk_voxels, tiny)
        allowed = rel >= rel[volume] / float(floor)
        info = {"volume_lambda": float(rel[volume]), "lambda_floor": float(rel[allowed][0]),
                "floor_factor": float(floor)}
    for start, stop in _chunks(n_voxels, chunk_voxels):
        block = curves[start:stop].astype(work, copy=False)
        projection = block @ u_in                                       # (n, L) = (U^T c)^T
        power = projection ** 2
        residual_sq = power @ residual_weight                           # (n, M)
        if criterion == "gcv":
            score = np.where(allowed[None, :], residual_sq / dof[None, :] ** 2, np.inf)
            choice = np.argmin(score, axis=1)
        else:
            curvature = _lcurve_curvature(residual_sq, power @ solution_weight, log_rel, tiny)
            choice = np.argmax(np.where(allowed[None, :], curvature, -np.inf), axis=1)
        residue[start:stop] = (projection * gain_rows[choice]) @ vt_work
        regularisation[start:stop] = rel[choice]
        report(stop / n_voxels, f"Tikhonov ({criterion}) deconvolution")
    return info
