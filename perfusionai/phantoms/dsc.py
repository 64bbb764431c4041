"""DSC-MRI digital phantoms with known CBF, CBV, MTT, Tmax, TTP and leakage.

Conventions (Ostergaard indicator dilution, the same as ``perfusionai.dsc``)
-----------------------------------------------------------------------------
* Arrays are ``[k, j, i]`` (slice, row, column); the 4D signal is ``[k, j, i, t]``
  (time last); times are seconds from the first frame (``times[n] = n * tr``).
* Concentration is delta-R2* in 1/s. The signal is ``S = S0 * exp(-TE * C)``
  (relaxivity kappa = 1: the phantom's "concentration" *is* delta-R2*), so
  ``-ln(S / S0) / TE`` returns it exactly on noise-free data.
* The arterial input function ``aif`` (1/s) is a gamma variate
  ``peak * x**alpha * exp(alpha * (1 - x))``, ``x = (t - arrival) / (alpha * beta)``,
  plus an optional recirculation gamma variate (``recirculation=True``).
* Tissue: ``C_t(t) = (rho / kh) * F * (C_a,tissue (*) R)(t)`` with
  ``F = CBF / 6000`` (1/s, CBF in mL/100 g/min), ``R(0) = 1``, ``integral R = MTT``,
  ``MTT = 60 * CBV / CBF`` (s, CBV in mL/100 g) and ``C_a,tissue`` the AIF
  delayed by ``delay_s`` and optionally dispersed by ``exp(-t / dispersion_s) / dispersion_s``.
* **kh / rho.** The phantom is simulated with ``kh = 0.73`` and ``rho = 1.04`` by
  default -- the defaults of ARCHITECTURE.md -- so maps computed with the default
  options (``CBV = 100 kh/rho * int C_t / int C_a``,
  ``CBF = 6000 kh/rho * max R``) reproduce the truth maps. A phantom made with
  ``kh=1, rho=1`` matches a solver run with ``kh=1, rho=1``. Either way, use the
  phantom's ``kh``/``rho`` in the solver.
* Residue shapes: ``"exponential"`` ``exp(-t/MTT)``; ``"gamma"`` the survival
  function of a gamma transit-time distribution of shape ``gamma_shape`` and mean
  MTT (Mouridsen 2006; Chakwizira's DRO, shape 1 = exponential);
  ``"lorentzian"`` ``1 / (1 + (pi t / (2 MTT))**2)`` (Fayolle 2025, eq. 4).

Discretisation
--------------
* ``"inverse-crime"``: the solver's own left-rectangle (Ostergaard Toeplitz)
  model on the frame grid, ``C_t[n] = (rho/kh) F dt sum_k C_a,tissue[k] R[n-k]``.
  Then the sum ratio ``sum C_t / sum C_a`` equals ``F dt sum_m R[m]`` =
  ``CBV + CBF*dt/120`` (mL/100 g, research/dsc.md "CBV + CBF*TR/2" in mL/g/s),
  given as truth ``cbv_discrete`` (``mtt_discrete`` = 60 cbv_discrete/CBF), and a
  delay that is a whole number of frames gives a residue maximum exactly at that
  delay (``tmax`` truth). For a Lorentzian residue ``cbv_discrete`` includes the
  1/t**2 tail to infinity, which a finite acquisition cannot see.
* ``"fine"``: the continuous model on a 0.01 s grid, sampled at the frame
  times (honest accuracy tests); ``cbv_discrete`` equals ``cbv`` there.

Truth maps (``DSCPhantom.truth``) are zero outside tissue; arteries and their
partial-volume ring carry no tissue truth (use ``tissue_mask``).
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import special

from ..dsc.acquisition import PHANTOM_MARK
from ..io import Geometry, atomic_output_dir, write_json, write_series, write_volume

#: Hematocrit factor and brain density the phantom is simulated with by default
#: (the defaults of ARCHITECTURE.md, so default maps match the truth).
DEFAULT_KH = 0.73
DEFAULT_RHO = 1.04

#: Region labels of ``DSCPhantom.rois``. Sweep phantoms use labels 10, 11, ...
LABELS = {
    "grey_matter": 1,
    "white_matter": 2,
    "lesion": 3,
    "artery": 4,
    "tumour": 5,
    "artery_partial_volume": 6,
}
SWEEP_LABEL_START = 10

RESIDUES = ("exponential", "gamma", "lorentzian")
DISCRETISATIONS = ("inverse-crime", "fine")
TRUTH_MAPS = ("cbf", "cbv", "cbv_discrete", "cbv_window", "mtt", "mtt_discrete", "tmax", "ttp", "delay", "k2")
FINE_STEP_S = 0.01


@dataclass
class Tissue:
    """Perfusion parameters of one phantom region.

    cbf mL/100 g/min, cbv mL/100 g, delay_s and dispersion_s in s (delay of the
    tissue's AIF after the measured AIF; mean time of an exponential dispersion
    kernel, 0 = none), k2 the BSW leakage rate in 1/s (positive = T1 leakage
    raising the signal, negative = T2* leakage), s0 the baseline signal.
    """

    name: str
    label: int
    cbf: float
    cbv: float
    delay_s: float = 0.0
    dispersion_s: float = 0.0
    k2: float = 0.0
    s0: Optional[float] = None

    @property
    def mtt(self) -> float:
        """Mean transit time in s (central volume theorem)."""
        return 60.0 * self.cbv / self.cbf


#: BSW leakage rate of the leaky tumour (1/s) when ``leakage=True``.
DEFAULT_LEAKAGE_K2 = 0.004


def default_tissues(lesion_delay_s: float = 3.0, tumour_k2: float = 0.0) -> list[Tissue]:
    """Grey matter, white matter, a stroke-like lesion and a high-CBV tumour.

    GM CBF 60 / CBV 4 (MTT 4 s), WM 22 / 2 (5.5 s), lesion 15 / 2.5 (10 s) with its
    AIF delayed by ``lesion_delay_s`` (Tmax truth = that delay), tumour 90 / 7.5
    (5 s) with BSW leakage ``tumour_k2`` 1/s.
    """
    return [
        Tissue("grey_matter", LABELS["grey_matter"], 60.0, 4.0),
        Tissue("white_matter", LABELS["white_matter"], 22.0, 2.0),
        Tissue("lesion", LABELS["lesion"], 15.0, 2.5, delay_s=lesion_delay_s),
        Tissue("tumour", LABELS["tumour"], 90.0, 7.5, k2=tumour_k2),
    ]


@dataclass
class DSCPhantom:
    """A simulated 4D DSC series with its truth.

    Attributes
    ----------
    signal
        ``[k, j, i, t]`` float32 MR signal (arbitrary units, baseline ``s0``).
    times
        ``(t,)`` frame times in s; ``tr`` s frame interval, ``te`` s echo time.
    geometry
        Voxel grid (spacing in mm along i, j, k).
    brain_mask, aif_mask, tissue_mask
        ``[k, j, i]`` bool: every brain voxel (tissue + arteries + ring); the
        partial-volume-free arterial voxels; voxels with tissue truth.
    rois
        ``[k, j, i]`` int16 labels (:data:`LABELS`, sweep blocks from 10).
    truth
        ``[k, j, i]`` float32 maps: ``cbf`` mL/100 g/min, ``cbv`` mL/100 g (nominal),
        ``cbv_discrete`` (what the sum ratio gives on noise-free data, see module
        doc), ``cbv_window`` (the noise-free, leakage-free sum ratio over the acquired
        frames, kh/rho applied: ``cbv_discrete`` minus the residue tail beyond the last
        frame), ``mtt`` and ``mtt_discrete`` s, ``tmax`` s (time of the residue
        maximum, = delay without dispersion), ``ttp`` s (time of the noise-free
        concentration peak on the frame grid), ``delay`` s, ``k2`` 1/s.
    aif
        ``(t,)`` noise-free arterial concentration (delta-R2*, 1/s).
    concentration
        ``(n_labels, t)`` noise-free delta-R2* curve of each label in ``labels``.
    tissue_kappa
        Tissue-to-blood ratio of delta-R2* per unit contrast agent (1 = the linear
        model; see :func:`make_dsc_phantom`); :attr:`analysis_kh` = ``kh / tissue_kappa``.
    leakage_reference
        ``(t,)`` mean noise-free curve of the non-enhancing tissue voxels, the
        reference of the leakage term ``-k2 * integral_0^t reference``.
    """

    signal: np.ndarray
    times: np.ndarray
    tr: float
    te: float
    geometry: Geometry
    brain_mask: np.ndarray
    aif_mask: np.ndarray
    tissue_mask: np.ndarray
    rois: np.ndarray
    truth: dict
    aif: np.ndarray
    labels: np.ndarray
    concentration: np.ndarray
    leakage_reference: np.ndarray
    tissues: list
    kh: float
    rho: float
    snr: float
    s0: float
    residue: str
    gamma_shape: float
    discretisation: str
    seed: Optional[int]
    parameters: dict = field(default_factory=dict)
    tissue_kappa: float = 1.0

    @property
    def analysis_kh(self) -> float:
        """The kH to give the map computations so that CBV and CBF come out in the truth's units:
        ``kh / tissue_kappa`` (the calibration a ``tissue_kappa`` other than 1 requires)."""
        return self.kh / self.tissue_kappa

    def curve(self, label: int) -> np.ndarray:
        """The noise-free delta-R2* curve (1/s) of region ``label``."""
        idx = np.flatnonzero(self.labels == label)
        if idx.size == 0:
            raise KeyError(f"no region with label {label}")
        return self.concentration[idx[0]]

    def describe(self) -> dict:
        """JSON-ready description: acquisition, conventions and the region table."""
        return {
            "acquisition": {"tr_s": self.tr, "te_s": self.te, "n_frames": int(self.times.size),
                            "snr": None if not np.isfinite(self.snr) else self.snr, "s0": self.s0},
            "conventions": {
                "signal": "S = S0 * exp(-TE * C), C = delta-R2* in 1/s",
                "tissue": "C_t = tissue_kappa * (rho/kh) * CBF/6000 * (C_a,tissue conv R)",
                "tissue_kappa": self.tissue_kappa, "analysis_kh": self.analysis_kh,
                "kh": self.kh, "rho": self.rho,
                "residue": self.residue, "gamma_shape": self.gamma_shape,
                "discretisation": self.discretisation,
                "cbv_discrete": "sum ratio on noise-free data: CBV + CBF*dt/120 (inverse-crime), CBV (fine)",
                "units": {"cbf": "mL/100g/min", "cbv": "mL/100g", "mtt": "s", "tmax": "s", "ttp": "s",
                          "k2": "1/s"},
            },
            "labels": {name: lab for name, lab in LABELS.items()},
            "regions": [
                {"name": t.name, "label": t.label, "cbf": t.cbf, "cbv": t.cbv, "mtt": t.mtt,
                 "delay_s": t.delay_s, "dispersion_s": t.dispersion_s, "k2": t.k2,
                 "voxels": int(np.count_nonzero(self.rois == t.label))}
                for t in self.tissues
            ],
            "aif_voxels": int(np.count_nonzero(self.aif_mask)),
            "brain_voxels": int(np.count_nonzero(self.brain_mask)),
            "seed": self.seed,
            "parameters": self.parameters,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``dsc.nii.gz`` (4D, TR in pixdim[4]) with its sidecar ``dsc.json`` marking it as a
        digital phantom (models trained on it are labelled "trained on phantoms"), masks,
        ``rois.nii.gz``, ``truth_<map>.nii.gz``, ``aif_truth.csv`` and ``truth.json`` into
        ``out_dir`` (atomically). Returns the folder."""
        out = Path(out_dir)
        with atomic_output_dir(out) as stage:
            write_series(self.signal, self.geometry, stage / "dsc.nii.gz", tr=self.tr)
            # BIDS-style sidecar: only the phantom mark (TE stays out, as a scanner export may omit it)
            write_json({PHANTOM_MARK: True, "GeneratedBy": [{"Name": "perfusionai.phantoms.dsc"}]},
                       stage / "dsc.json")
            write_volume(self.brain_mask.astype(np.uint8), self.geometry, stage / "brain_mask.nii.gz")
            write_volume(self.aif_mask.astype(np.uint8), self.geometry, stage / "aif_mask.nii.gz")
            write_volume(self.rois.astype(np.int16), self.geometry, stage / "rois.nii.gz")
            for name, arr in self.truth.items():
                write_volume(arr.astype(np.float32), self.geometry, stage / f"truth_{name}.nii.gz")
            rows = ["time_s,aif_per_s"] + [f"{t:.6g},{c:.9g}" for t, c in zip(self.times, self.aif)]
            (stage / "aif_truth.csv").write_text("\n".join(rows) + "\n")
            write_json(self.describe(), stage / "truth.json")
        return out


# --------------------------------------------------------------------------------------
# curves


def gamma_variate(t: np.ndarray, arrival_s: float, peak: float, alpha: float, beta: float) -> np.ndarray:
    """Gamma variate with its maximum ``peak`` at ``arrival_s + alpha * beta`` (0 before arrival)."""
    x = np.clip((np.asarray(t, dtype=float) - arrival_s) / (alpha * beta), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = peak * np.where(x > 0, np.exp(alpha * (np.log(np.where(x > 0, x, 1.0)) + 1.0 - x)), 0.0)
    return y


def arterial_input(t: np.ndarray, arrival_s: float = 10.0, peak: float = 60.0, alpha: float = 3.0,
                   beta: float = 1.5, recirculation: bool = True, recirculation_delay_s: float = 9.0,
                   recirculation_fraction: float = 0.12, recirculation_beta: float = 2.5) -> np.ndarray:
    """Noise-free AIF (delta-R2*, 1/s) at times ``t`` (s): first pass + optional recirculation.

    The recirculation is a second, broader gamma variate of ``recirculation_fraction``
    times the first-pass peak, ``recirculation_delay_s`` after the first arrival; it
    returns to baseline within the default 60 s window (no steady-state plateau).
    """
    a = gamma_variate(t, arrival_s, peak, alpha, beta)
    if recirculation:
        a = a + gamma_variate(t, arrival_s + recirculation_delay_s, recirculation_fraction * peak,
                              alpha, recirculation_beta)
    return a


def residue_function(t: np.ndarray, mtt: np.ndarray, shape: str = "exponential",
                     gamma_shape: float = 3.0) -> np.ndarray:
    """Residue R(t) with R(0) = 1 and integral MTT; ``t`` (..., n) s >= 0, ``mtt`` broadcastable."""
    t = np.asarray(t, dtype=float)
    mtt = np.asarray(mtt, dtype=float)
    if shape == "exponential":
        return np.exp(-t / mtt)
    if shape == "gamma":
        return special.gammaincc(gamma_shape, gamma_shape * t / mtt)
    if shape == "lorentzian":
        return 1.0 / (1.0 + (np.pi * t / (2.0 * mtt)) ** 2)
    raise ValueError(f"unknown residue shape {shape!r}; expected one of {RESIDUES}")


def _residue_sum(mtt: float, dt: float, shape: str, gamma_shape: float) -> float:
    """dt * sum_{m >= 0} R(m dt) in s, the discrete area of the residue (with tail)."""
    m_max = int(np.ceil(60.0 * mtt / dt)) + 200
    if shape == "lorentzian":
        m_max = max(m_max, 200_000)
    r = residue_function(np.arange(m_max) * dt, mtt, shape, gamma_shape)
    total = dt * r.sum()
    if shape == "lorentzian":
        # integral of the 1/t^2 tail beyond the summed range
        a = np.pi / (2.0 * mtt)
        t_end = (m_max - 0.5) * dt
        total += (np.pi / 2.0 - np.arctan(a * t_end)) / a
    return float(total)


def _causal_convolve(a: np.ndarray, r: np.ndarray, dt: float) -> np.ndarray:
    """dt * sum_{k<=n} a[..., k] r[..., n-k] for every row, truncated to a's length (FFT)."""
    n = a.shape[-1]
    size = 1 << int(np.ceil(np.log2(2 * n)))
    out = np.fft.irfft(np.fft.rfft(a, size) * np.fft.rfft(r, size), size)[..., :n]
    return out * dt


def _tissue_curves(tissues: Sequence[Tissue], times: np.ndarray, aif_fn, kh: float, rho: float,
                   residue: str, gamma_shape: float, discretisation: str) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free vascular curves (n_tissues, t) and effective-residue Tmax (n_tissues,) in s."""
    dt = float(times[1] - times[0])
    n = times.size
    if discretisation == "inverse-crime":
        step = dt
        sub = 1
    else:
        sub = max(1, int(round(dt / FINE_STEP_S)))
        step = dt / sub
    grid = np.arange(n * sub) * step
    curves = np.empty((len(tissues), n))
    tmax = np.empty(len(tissues))
    for row, tis in enumerate(tissues):
        a_t = aif_fn(grid - tis.delay_s)
        r = residue_function(grid, tis.mtt, residue, gamma_shape)
        if tis.dispersion_s > 0:
            kernel = np.exp(-grid / tis.dispersion_s)
            kernel /= kernel.sum()  # unit area on this grid: dispersion keeps the AIF's area
            a_t = _causal_convolve(a_t, kernel, 1.0)
        f = tis.cbf / 6000.0
        c = (rho / kh) * f * _causal_convolve(a_t, r, step)
        curves[row] = c[::sub]
        # Effective residue maximum (dispersion shifts it); the fine grid resolves it to 0.01 s.
        if tis.dispersion_s > 0:
            # midpoint-rule convolution on a 1 ms grid: the peak of (kernel * R) to ~1 ms
            step_t = 1e-3
            fine = np.arange(int(round(8 * tis.dispersion_s / step_t)) + 2) * step_t
            k_f = np.exp(-(fine + 0.5 * step_t) / tis.dispersion_s) / tis.dispersion_s
            r_f = residue_function(fine + 0.5 * step_t, tis.mtt, residue, gamma_shape)
            eff_f = _causal_convolve(k_f, r_f, step_t)
            tmax[row] = tis.delay_s + (int(np.argmax(eff_f)) + 1) * step_t
        else:
            tmax[row] = tis.delay_s
    return curves, tmax


# --------------------------------------------------------------------------------------
# layouts


def _ellipsoid_layout(shape: tuple[int, int, int], with_tumour: bool, with_lesion: bool,
                      artery_radius: float, partial_volume: bool, brain_extent: float = 1.0) -> np.ndarray:
    """Anatomical label map: GM shell, WM core, lesion, tumour, arteries (+ PV ring)."""
    nk, nj, ni = shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ck, cj, ci = (nk - 1) / 2, (nj - 1) / 2, (ni - 1) / 2
    rk, rj, ri = max(nk / 2 - 0.3, 0.9), (nj / 2 - 1.0) * brain_extent, (ni / 2 - 1.0) * brain_extent
    rr = ((k - ck) / rk) ** 2 + ((j - cj) / rj) ** 2 + ((i - ci) / ri) ** 2
    labels = np.zeros(shape, np.int16)
    labels[rr <= 1.0] = LABELS["grey_matter"]
    labels[rr <= 0.55] = LABELS["white_matter"]

    def ball(cj_f, ci_f, radius_f):
        rad = radius_f * min(nj, ni)
        kk = np.clip(((k - ck) / max(rk * 0.8, 1.0)) ** 2, 0, None)
        return (((j - cj_f * nj) ** 2 + (i - ci_f * ni) ** 2) / rad ** 2 + kk) <= 1.0

    if with_lesion:
        labels[ball(0.38, 0.30, 0.13) & (rr <= 0.9)] = LABELS["lesion"]
    if with_tumour:
        labels[ball(0.38, 0.70, 0.12) & (rr <= 0.9)] = LABELS["tumour"]
    # Arteries: vertical tubes (through all brain slices) at four in-plane positions
    # (left/right middle cerebral, anterior, posterior), inside tissue.
    dist = np.full(shape, np.inf)
    for fj, fi in ((0.5, 0.30), (0.5, 0.70), (0.28, 0.5), (0.72, 0.5)):
        d = np.hypot(j - fj * (nj - 1), i - fi * (ni - 1))
        dist = np.minimum(dist, d)
    brain = labels > 0
    labels[brain & (dist <= artery_radius)] = LABELS["artery"]
    if partial_volume:
        ring = brain & (dist > artery_radius) & (dist <= artery_radius + 1.0)
        labels[ring] = LABELS["artery_partial_volume"]
    return labels


def _sweep_layout(shape: tuple[int, int, int], n_blocks: int, artery_radius: float) -> np.ndarray:
    """Blocks of sweep labels (10, 11, ...) filling the volume in flat order, plus one artery tube."""
    nk, nj, ni = shape
    labels = np.zeros(shape, np.int16)
    j, i = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    tube = np.hypot(j - (nj - 1) / 2, i - 2.0 - artery_radius) <= artery_radius
    free = np.ones(shape, bool)
    free[:, tube] = False
    idx = np.flatnonzero(free.ravel())
    if idx.size < n_blocks:
        raise ValueError(f"shape {shape} is too small for {n_blocks} sweep blocks")
    block = (np.arange(idx.size) * n_blocks) // idx.size
    flat = labels.ravel()
    flat[idx] = SWEEP_LABEL_START + block
    labels[:, tube] = LABELS["artery"]
    return labels


# --------------------------------------------------------------------------------------
# main entry points


def make_dsc_phantom(
    shape: tuple[int, int, int] = (16, 32, 32),
    tr: float = 1.0,
    n_frames: int = 60,
    te: float = 0.03,
    cbf: Optional[float | Sequence[float]] = None,
    cbv: Optional[float | Sequence[float]] = None,
    delay_s: Optional[float | Sequence[float]] = None,
    residue: str = "exponential",
    gamma_shape: float = 3.0,
    dispersion_s: float = 0.0,
    recirculation: bool = True,
    leakage: bool = False,
    leakage_k2: float = DEFAULT_LEAKAGE_K2,
    tumour: bool = True,
    lesion: bool = True,
    lesion_delay_s: float = 3.0,
    tissues: Optional[Sequence[Tissue]] = None,
    arteries: bool = True,
    artery_radius: float = 1.0,
    partial_volume: bool = False,
    snr: float = np.inf,
    seed: Optional[int] = 0,
    discretisation: str = "inverse-crime",
    s0: float = 1000.0,
    baseline_frames: int = 10,
    aif_peak: float = 80.0,
    aif_alpha: float = 3.0,
    aif_beta: float = 1.5,
    kh: float = DEFAULT_KH,
    rho: float = DEFAULT_RHO,
    tissue_kappa: float = 1.0,
    spacing: tuple[float, float, float] = (1.8, 1.8, 5.0),
    brain_extent: float = 1.0,
) -> DSCPhantom:
    """Simulate a 4D DSC series with known perfusion (see the module doc for units).

    Layouts
    -------
    * Anatomical (default): an ellipsoidal brain with grey-matter shell, white-matter
      core, a stroke-like lesion (low flow, AIF delayed ``lesion_delay_s``), an
      optional high-CBV tumour (``tumour``; BSW leakage ``leakage_k2`` 1/s when
      ``leakage``) and four arterial tubes (``arteries``) whose voxels carry the
      AIF itself (``aif_mask``), optionally ringed by 50 % partial-volume voxels
      (``partial_volume``, label 6). ``tissues`` replaces the region table.
    * Sweep: when any of ``cbf``, ``cbv``, ``delay_s`` is given (scalar or sequence),
      the volume is split into one block per combination (Cartesian product; the
      defaults are GM 60 mL/100 g/min, 4 mL/100 g, 0 s), labels 10, 11, ... in
      product order, plus one arterial tube. ``dispersion_s`` applies to every block.

    Parameters
    ----------
    shape
        ``(k, j, i)`` voxels. ``tr`` frame interval s, ``n_frames`` frames, ``te`` s.
    residue, gamma_shape
        Residue shape (``"exponential"``, ``"gamma"``, ``"lorentzian"``).
    recirculation
        Add a recirculation pass to the AIF (and so to every tissue curve).
    snr
        ``S0 / sigma`` of the complex Gaussian noise (Rician magnitude); ``inf``
        gives noise-free data. Outside the brain the signal is pure noise.
    seed
        Seed of the noise generator.
    discretisation
        ``"inverse-crime"`` (the solver's rectangle model) or ``"fine"`` (0.01 s grid).
    baseline_frames
        Frames before the bolus arrives (AIF arrival = ``baseline_frames * tr``).
    aif_peak, aif_alpha, aif_beta
        Peak delta-R2* (1/s) and gamma-variate shape/scale (s) of the first pass.
    kh, rho
        Hematocrit factor and density the tissue curves are simulated with.
    tissue_kappa
        Tissue delta-R2* per unit contrast agent relative to blood (kappa_s / kappa_a).
        1 (default) is the linear model: tissue signal drops of 4-14 % against a 90 %
        arterial drop, well below clinical scans (30-40 % grey matter at standard dose). The
        OSIPI/Chakwizira DRO uses kappa_s / kappa_a = 130.8 / 7.03 = 18.6; with ``aif_peak``
        35 1/s, ``tissue_kappa`` 10 gives clinical drops (grey matter 31-35 %, white matter
        15-17 %, artery 64 %; the lower values with ``discretisation="fine"``). Maps
        computed with ``kh`` are then ``tissue_kappa`` times the truth; compute them with
        :attr:`DSCPhantom.analysis_kh`.
    spacing
        Voxel size in mm along ``(i, j, k)``.
    brain_extent
        In-plane semi-axes of the brain ellipsoid as a fraction of the half field of view.
    """
    started = _time.perf_counter()
    if residue not in RESIDUES:
        raise ValueError(f"residue must be one of {RESIDUES}, got {residue!r}")
    if discretisation not in DISCRETISATIONS:
        raise ValueError(f"discretisation must be one of {DISCRETISATIONS}, got {discretisation!r}")
    if n_frames < 2 or tr <= 0 or te <= 0:
        raise ValueError("need n_frames >= 2, tr > 0 and te > 0")
    shape = tuple(int(s) for s in shape)
    times = np.arange(n_frames, dtype=float) * tr
    arrival = baseline_frames * tr

    def aif_fn(t):
        return arterial_input(t, arrival, aif_peak, aif_alpha, aif_beta, recirculation)

    sweep = cbf is not None or cbv is not None or delay_s is not None
    if sweep:
        cbfs = np.atleast_1d(60.0 if cbf is None else cbf).astype(float)
        cbvs = np.atleast_1d(4.0 if cbv is None else cbv).astype(float)
        delays = np.atleast_1d(0.0 if delay_s is None else delay_s).astype(float)
        combos = [(f, v, d) for f in cbfs for v in cbvs for d in delays]
        tissue_list = [Tissue(f"cbf{f:g}_cbv{v:g}_delay{d:g}", SWEEP_LABEL_START + n, f, v, d, dispersion_s)
                       for n, (f, v, d) in enumerate(combos)]
        labels_map = _sweep_layout(shape, len(tissue_list), artery_radius)
    else:
        if tissues is not None:
            tissue_list = [Tissue(**vars(t)) for t in tissues]
        else:
            tissue_list = default_tissues(lesion_delay_s, leakage_k2 if leakage else 0.0)
            tissue_list = [t for t in tissue_list
                           if (t.name != "tumour" or tumour) and (t.name != "lesion" or lesion)]
        if dispersion_s > 0:
            for t in tissue_list:
                t.dispersion_s = dispersion_s
        labels_map = _ellipsoid_layout(shape, any(t.label == LABELS["tumour"] for t in tissue_list),
                                       any(t.label == LABELS["lesion"] for t in tissue_list),
                                       artery_radius, partial_volume, brain_extent)
        if not arteries:
            labels_map[np.isin(labels_map, (LABELS["artery"], LABELS["artery_partial_volume"]))] = \
                LABELS["grey_matter"]
    if leakage and not any(t.k2 != 0 for t in tissue_list):
        raise ValueError("leakage=True needs a region with k2 != 0 (the anatomical tumour)")

    # Per-label noise-free curves, then one gather builds the volume.
    vascular, tmax_eff = _tissue_curves(tissue_list, times, aif_fn, kh, rho, residue, gamma_shape,
                                        discretisation)
    aif = aif_fn(times)
    counts = np.array([np.count_nonzero(labels_map == t.label) for t in tissue_list], float)
    leaky = np.array([t.k2 != 0 for t in tissue_list])
    weights = counts * (~leaky)
    if weights.sum() > 0:
        reference = (weights[:, None] * vascular).sum(0) / weights.sum()
    else:
        reference = np.zeros(n_frames)
    # trapezoidal cumulative integral, the same discretisation bsw_correct uses
    ref_integral = np.concatenate([[0.0], np.cumsum(0.5 * (reference[1:] + reference[:-1]) * np.diff(times))])
    k2 = np.array([t.k2 for t in tissue_list])
    if not tissue_kappa > 0:
        raise ValueError("tissue_kappa must be > 0")
    tissue_conc = tissue_kappa * (vascular - k2[:, None] * ref_integral[None, :])
    reference = tissue_kappa * reference

    # Table rows: 0 background, then tissues, artery, PV ring.
    max_label = int(max(labels_map.max(), max(t.label for t in tissue_list), LABELS["artery_partial_volume"]))
    table = np.zeros((max_label + 1, n_frames))
    s0_table = np.zeros(max_label + 1)
    for row, t in enumerate(tissue_list):
        table[t.label] = tissue_conc[row]
        s0_table[t.label] = s0 if t.s0 is None else t.s0
    table[LABELS["artery"]] = aif
    s0_table[LABELS["artery"]] = s0
    signal_table = s0_table[:, None] * np.exp(-te * table)
    # Partial volume: half arterial, half grey-matter *signal* (the nonlinear mix real scans show).
    gm_row = LABELS["grey_matter"] if any(t.label == LABELS["grey_matter"] for t in tissue_list) else None
    if gm_row is not None:
        signal_table[LABELS["artery_partial_volume"]] = 0.5 * (signal_table[LABELS["artery"]]
                                                               + signal_table[gm_row])
    signal = signal_table.astype(np.float32)[labels_map]
    rng = np.random.default_rng(seed)
    if np.isfinite(snr):
        sigma = np.float32(s0 / snr)
        real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
        signal = np.sqrt(real * real + imag * imag, out=real)

    # Truth maps
    dt = tr
    truth_rows = {name: np.zeros(max_label + 1) for name in TRUTH_MAPS}
    for row, t in enumerate(tissue_list):
        lab = t.label
        truth_rows["cbf"][lab] = t.cbf
        truth_rows["cbv"][lab] = t.cbv
        truth_rows["mtt"][lab] = t.mtt
        if discretisation == "inverse-crime":
            cbv_d = 100.0 * t.cbf / 6000.0 * _residue_sum(t.mtt, dt, residue, gamma_shape)
        else:
            cbv_d = t.cbv
        truth_rows["cbv_discrete"][lab] = cbv_d
        # the sum ratio over the acquired frames (misses the residue tail beyond the window)
        truth_rows["cbv_window"][lab] = 100.0 * (kh / rho) * vascular[row].sum() / aif.sum()
        truth_rows["mtt_discrete"][lab] = 60.0 * cbv_d / t.cbf
        truth_rows["tmax"][lab] = tmax_eff[row]
        truth_rows["ttp"][lab] = times[int(np.argmax(vascular[row]))]
        truth_rows["delay"][lab] = t.delay_s
        truth_rows["k2"][lab] = t.k2
    truth = {name: rows.astype(np.float32)[labels_map] for name, rows in truth_rows.items()}

    tissue_labels = [t.label for t in tissue_list]
    geometry = Geometry(shape, tuple(float(s) for s in spacing),
                        tuple(-0.5 * (n - 1) * s for n, s in zip(shape[::-1], spacing)))
    parameters = {
        "shape_kji": list(shape), "layout": "sweep" if sweep else "anatomical",
        "aif": {"arrival_s": arrival, "peak_per_s": aif_peak, "alpha": aif_alpha, "beta_s": aif_beta,
                "recirculation": recirculation},
        "dispersion_s": dispersion_s, "partial_volume": partial_volume, "leakage": leakage,
        "tissue_kappa": float(tissue_kappa),
        "generation_s": round(_time.perf_counter() - started, 3),
    }
    return DSCPhantom(
        signal=signal, times=times, tr=float(tr), te=float(te), geometry=geometry,
        brain_mask=labels_map > 0, aif_mask=labels_map == LABELS["artery"],
        tissue_mask=np.isin(labels_map, tissue_labels), rois=labels_map, truth=truth, aif=aif,
        labels=np.array(tissue_labels), concentration=tissue_conc, leakage_reference=reference,
        tissues=tissue_list, kh=float(kh), rho=float(rho), snr=float(snr), s0=float(s0),
        residue=residue, gamma_shape=float(gamma_shape), discretisation=discretisation, seed=seed,
        parameters=parameters, tissue_kappa=float(tissue_kappa),
    )


def make_brain_phantom(shape: tuple[int, int, int] = (24, 128, 128), snr: float = 50.0,
                       **kwargs) -> DSCPhantom:
    """Whole-brain-sized anatomical phantom (about 150 k brain voxels at the default
    128 x 128 x 24 x 60) for the benchmark and the demo; keywords as :func:`make_dsc_phantom`."""
    kwargs.setdefault("artery_radius", 1.5)
    kwargs.setdefault("brain_extent", 0.875)
    return make_dsc_phantom(shape=shape, snr=snr, **kwargs)
