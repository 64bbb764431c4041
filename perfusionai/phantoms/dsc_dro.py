"""A voxel-wise DSC digital reference object (DRO): random CBF, MTT and delay per voxel.

Where :func:`perfusionai.phantoms.dsc.make_dsc_phantom` builds an anatomy (regions with one
parameter set each), this DRO draws the perfusion parameters of every voxel independently, the
design of the held-out comparison in issue 15 and of Wu 2003 / Mouridsen 2006 simulations:

* CBF uniform in ``cbf_range`` (mL/100 g/min), MTT uniform in ``mtt_range`` (s), CBV =
  CBF * MTT / 60 (mL/100 g, central volume theorem), bolus delay uniform in ``delay_range`` (s,
  continuous: not a whole number of frames);
* residue ``"exponential"`` ``exp(-t/MTT)``, ``"gamma"`` the survival function of a gamma
  transit-time distribution of shape ``gamma_shape`` and mean MTT (Mouridsen 2006; shape 1 =
  exponential), or ``"linear"`` ``max(0, 1 - t / (2 MTT))`` (uniform transit times on
  [0, 2 MTT], the "box-like" case);
* the AIF is the gamma variate (+ recirculation) of :func:`perfusionai.phantoms.dsc.arterial_input`;
* tissue ``C_t(t) = tissue_kappa * (rho/kh) * CBF/6000 * (C_a(. - delay) (*) R)(t)``, computed on a
  fine grid (``fine_step_s``, default 0.01 s, trapezoidal convolution of the *continuous* AIF) and
  sampled at the frame times ``n * tr`` -- so no solver that works on the frame grid inverts it
  exactly (no "inverse crime");
* signal ``S = s0 * exp(-TE * C)`` with complex Gaussian noise of SD ``s0 / snr`` (Rician
  magnitude); ``n_aif_voxels`` arterial voxels carry the AIF itself with their own noise.

Truth: ``cbf`` mL/100 g/min, ``cbv`` mL/100 g, ``mtt`` s, ``tmax`` s (= delay: every residue here
peaks at t = 0; with ``dispersion_s`` the delay plus the dispersed residue's peak time), ``delay`` s. ``tissue_kappa`` as in :func:`make_dsc_phantom`: compute maps with
``kh = analysis_kh`` (= kh / tissue_kappa) to read the truth's units.

Arrays: curves are ``(n_voxels, t)`` (time last); :meth:`DSCDRO.as_series` lays them out as a 4D
``[k, j, i, t]`` series (one slice) with a tissue mask and an arterial mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
from scipy import special

from .dsc import DEFAULT_KH, DEFAULT_RHO, arterial_input

DRO_RESIDUES = ("exponential", "gamma", "linear")


def dro_residue(t: np.ndarray, mtt: np.ndarray, shape: str, gamma_shape: float = 3.0) -> np.ndarray:
    """Residue ``R(t)`` (R(0) = 1, integral MTT) for ``t >= 0`` (s), ``mtt`` broadcastable (s)."""
    t = np.asarray(t, dtype=float)
    mtt = np.asarray(mtt, dtype=float)
    if shape == "exponential":
        return np.exp(-t / mtt)
    if shape == "gamma":
        return special.gammaincc(gamma_shape, gamma_shape * t / mtt)
    if shape == "linear":
        return np.clip(1.0 - t / (2.0 * mtt), 0.0, None)
    raise ValueError(f"unknown residue shape {shape!r}; expected one of {DRO_RESIDUES}")


@dataclass
class DSCDRO:
    """A voxel-wise DSC reference object (see the module docstring).

    signal ``(n_voxels, t)`` float32 tissue signal; aif_signal ``(n_aif_voxels, t)`` float32 arterial
    signal; times ``(t,)`` s; aif ``(t,)`` noise-free arterial delta-R2* (1/s); concentration
    ``(n_voxels, t)`` noise-free tissue delta-R2* (1/s); truth: ``{name: (n_voxels,)}``.
    """

    signal: np.ndarray
    aif_signal: np.ndarray
    times: np.ndarray
    tr: float
    te: float
    s0: float
    snr: float
    aif: np.ndarray
    concentration: np.ndarray
    truth: dict
    residue: str
    gamma_shape: float
    kh: float
    rho: float
    tissue_kappa: float
    baseline_frames: int
    seed: Optional[int]
    parameters: dict = field(default_factory=dict)

    @property
    def analysis_kh(self) -> float:
        """kH to give the map computations so that CBV/CBF read the truth's units."""
        return self.kh / self.tissue_kappa

    def as_series(self, width: int = 64) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(signal [1, j, i, t], tissue_mask [1, j, i], aif_mask [1, j, i])``: tissue voxels in flat
        order, then the arterial voxels; unused voxels carry the baseline signal with noise-free
        value ``s0`` and are outside both masks."""
        n_tissue, n_t = self.signal.shape
        total = n_tissue + self.aif_signal.shape[0]
        rows = -(-total // width)
        flat = np.full((rows * width, n_t), self.s0, dtype=np.float32)
        flat[:n_tissue] = self.signal
        flat[n_tissue:total] = self.aif_signal
        tissue = np.zeros(rows * width, bool)
        tissue[:n_tissue] = True
        arterial = np.zeros(rows * width, bool)
        arterial[n_tissue:total] = True
        shape = (1, rows, width)
        return flat.reshape(shape + (n_t,)), tissue.reshape(shape), arterial.reshape(shape)


def _convolve_fine(a: np.ndarray, r: np.ndarray, step: float) -> np.ndarray:
    """Trapezoidal causal convolution ``int_0^t a(tau) r(t - tau) dtau`` of rows ``(V, n)`` (FFT)."""
    n = a.shape[-1]
    size = 1 << int(np.ceil(np.log2(2 * n)))
    full = np.fft.irfft(np.fft.rfft(a, size) * np.fft.rfft(r, size), size)[..., :n]
    # trapezoid = rectangle sum minus half the two end terms (a[..., 0] r[n] + a[n] r[0])
    return step * (full - 0.5 * (a[..., :1] * r[..., :n] + a * r[..., :1]))


def make_dsc_dro(
    n_voxels: int = 2000,
    residue: str = "exponential",
    gamma_shape: float = 3.0,
    cbf_range: Tuple[float, float] = (30.0, 220.0),
    mtt_range: Tuple[float, float] = (2.5, 13.0),
    delay_range: Tuple[float, float] = (0.0, 4.0),
    tr: float = 1.5,
    n_frames: int = 60,
    te: float = 0.03,
    snr: float = 50.0,
    s0: float = 1000.0,
    baseline_frames: int = 10,
    aif_peak: float = 35.0,
    aif_alpha: float = 3.0,
    aif_beta: float = 1.5,
    recirculation: bool = True,
    tissue_kappa: float = 10.0,
    kh: float = DEFAULT_KH,
    rho: float = DEFAULT_RHO,
    n_aif_voxels: int = 16,
    fine_step_s: float = 0.01,
    seed: Optional[int] = 0,
    chunk_voxels: int = 256,
    dispersion_s: float = 0.0,
) -> DSCDRO:
    """Simulate a voxel-wise DSC DRO (module docstring for the model and units).

    Defaults: SNR 50, TR 1.5 s, 60 frames, TE 30 ms, AIF peak 35 1/s arriving after
    ``baseline_frames`` frames, clinical tissue contrast (``tissue_kappa`` 10: grey matter drops
    about 30 %, as :func:`make_dsc_phantom` with ``tissue_kappa=10, aif_peak=35``).
    ``dispersion_s`` > 0 disperses each tissue's input by ``exp(-t / dispersion_s) / dispersion_s``
    (after the delay); the truth ``tmax`` is then the delay plus the peak time of the effective
    residue ``kernel (*) R`` (found on the fine grid).
    """
    if residue not in DRO_RESIDUES:
        raise ValueError(f"residue must be one of {DRO_RESIDUES}, got {residue!r}")
    if n_voxels < 1 or n_frames < 2 or not (tr > 0 and te > 0 and fine_step_s > 0):
        raise ValueError("need n_voxels >= 1, n_frames >= 2 and positive tr, te, fine_step_s")
    rng = np.random.default_rng(seed)
    cbf = rng.uniform(*cbf_range, n_voxels)
    mtt = rng.uniform(*mtt_range, n_voxels)
    delay = rng.uniform(*delay_range, n_voxels)
    cbv = cbf * mtt / 60.0
    times = np.arange(n_frames, dtype=float) * tr
    arrival = baseline_frames * tr
    sub = max(1, int(round(tr / fine_step_s)))
    step = tr / sub
    grid = np.arange(n_frames * sub) * step

    def aif_fn(t):
        return arterial_input(t, arrival, aif_peak, aif_alpha, aif_beta, recirculation)

    conc = np.empty((n_voxels, n_frames))
    residue_peak = np.zeros(n_voxels)
    kernel = np.exp(-grid / dispersion_s) / dispersion_s if dispersion_s > 0 else None
    for start in range(0, n_voxels, chunk_voxels):
        stop = min(n_voxels, start + chunk_voxels)
        a = aif_fn(grid[None, :] - delay[start:stop, None])
        r = dro_residue(grid[None, :], mtt[start:stop, None], residue, gamma_shape)
        if kernel is not None:
            a = _convolve_fine(a, np.broadcast_to(kernel, a.shape), step)
            effective = _convolve_fine(np.broadcast_to(kernel, r.shape), r, step)
            residue_peak[start:stop] = grid[np.argmax(effective, axis=1)]
        c = _convolve_fine(a, r, step)
        conc[start:stop] = (tissue_kappa * rho / kh) * (cbf[start:stop, None] / 6000.0) * c[:, ::sub]
    aif = aif_fn(times)

    def noisy(clean: np.ndarray) -> np.ndarray:
        signal = s0 * np.exp(-te * clean)
        if np.isfinite(snr):
            sigma = s0 / snr
            real = signal + sigma * rng.standard_normal(signal.shape)
            imag = sigma * rng.standard_normal(signal.shape)
            signal = np.hypot(real, imag)
        return signal.astype(np.float32)

    tissue_signal = noisy(conc)
    aif_signal = noisy(np.broadcast_to(aif, (int(n_aif_voxels), n_frames)))
    truth = {"cbf": cbf, "cbv": cbv, "mtt": mtt, "tmax": delay + residue_peak, "delay": delay}
    parameters = {"cbf_range": list(cbf_range), "mtt_range": list(mtt_range), "delay_range": list(delay_range),
                  "aif": {"arrival_s": arrival, "peak_per_s": aif_peak, "alpha": aif_alpha, "beta_s": aif_beta,
                          "recirculation": recirculation},
                  "fine_step_s": step, "n_aif_voxels": int(n_aif_voxels), "dispersion_s": float(dispersion_s)}
    return DSCDRO(signal=tissue_signal, aif_signal=aif_signal, times=times, tr=float(tr), te=float(te),
                  s0=float(s0), snr=float(snr), aif=aif, concentration=conc, truth=truth, residue=residue,
                  gamma_shape=float(gamma_shape), kh=float(kh), rho=float(rho),
                  tissue_kappa=float(tissue_kappa), baseline_frames=int(baseline_frames), seed=seed,
                  parameters=parameters)
