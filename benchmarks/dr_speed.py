"""Diffusion-relaxation fit speed: vectorised fits on 100k voxels against a per-voxel scipy loop.

Data: tumour/liver/muscle/kidney voxels of perfusionai.phantoms.dr phantoms (advanced protocol,
21 volumes = 7 b x 3 TE, Rician noise at SNR 60), tiled to ``--voxels`` (default 100 000).
Timed in one run:

* clinical log-linear fits (ADC, ADC_fast, ADC_slow, F) on the 5 clinical volumes;
* T2-IVIM-Kurtosis: grid start + batched Levenberg-Marquardt (perfusionai.dr.fitting);
* the reference: ``scipy.optimize.least_squares`` (trust-region reflective, bounded, started from the
  same grid point each voxel would get) called voxel by voxel on a ``--loop-voxels`` subset
  (default 1 000); its per-voxel time is extrapolated to the full volume for the speed-up.

Target (issue 8, 2 cores): T2-IVIM-Kurtosis on 100k voxels <= 60 s. Wall and CPU seconds are both
reported (CPU time is the fairer figure on a shared machine).

Usage::

    python benchmarks/dr_speed.py [--threads 2] [--voxels 100000] [--loop-voxels 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import os


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    parser.add_argument("--voxels", type=int, default=100_000)
    parser.add_argument("--loop-voxels", type=int, default=1000)
    parser.add_argument("--snr", type=float, default=60.0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' = stdout)")
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from perfusionai.dr import fitting, models  # noqa: E402
from perfusionai.phantoms.dr import make_dr_phantom  # noqa: E402


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def voxel_signals(n_voxels: int, snr: float) -> tuple[np.ndarray, models.Protocol]:
    """``(n_voxels, 21)`` body voxels of phantoms with different seeds, tiled to ``n_voxels``."""
    parts = []
    seed = 0
    while sum(len(p) for p in parts) < n_voxels:
        ph = make_dr_phantom(shape=(8, 64, 64), snr=snr, seed=seed)
        parts.append(ph.dwi[ph.body].astype(np.float64))
        seed += 1
    return np.concatenate(parts)[:n_voxels], ph.protocol


def scipy_loop(signals: np.ndarray, protocol: models.Protocol) -> np.ndarray:
    """The per-voxel reference: bounded trust-region least squares, one scipy call per voxel."""
    from scipy.optimize import least_squares

    b = protocol.bvals / 1000.0
    te = protocol.tes
    lo = np.asarray(models.ADVANCED_LOWER, float)
    hi = np.asarray(models.ADVANCED_UPPER, float)
    start = fitting.fit_t2ivimkurtosis(signals, protocol.bvals, protocol.tes, max_iter=0)  # grid start only
    out = np.zeros((len(signals), 7))
    for v in range(len(signals)):
        peak = signals[v].max()
        y = signals[v] / peak
        p0 = np.array([start.maps[n][v] for n in models.ADVANCED_MAPS])
        p0[0] /= peak
        p0 = np.clip(p0, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))

        def residual(p):
            s0, f, dv, t2v, dt, k, t2t = p
            bd = b * dt
            return s0 * (f * np.exp(-b * dv - te / t2v) + (1 - f) * np.exp(-bd + k * bd * bd / 6 - te / t2t)) - y

        res = least_squares(residual, p0, bounds=(lo, hi), method="trf")
        out[v] = res.x
        out[v, 0] *= peak
    return out


def main() -> int:
    args = ARGS
    signals, protocol = voxel_signals(args.voxels, args.snr)
    idx = protocol.clinical_indices()
    rows = []
    clin, w, c = _timed(lambda: fitting.fit_clinical(signals[:, idx], protocol.bvals[idx]))
    rows.append(("clinical log-linear (3 fits)", len(signals), w, c))
    adv, w_adv, c_adv = _timed(lambda: fitting.fit_t2ivimkurtosis(signals, protocol.bvals, protocol.tes))
    rows.append(("T2-IVIM-Kurtosis grid + batched LM", len(signals), w_adv, c_adv))
    subset = signals[: args.loop_voxels]
    loop, w_loop, c_loop = _timed(lambda: scipy_loop(subset, protocol))
    rows.append(("T2-IVIM-Kurtosis scipy least_squares loop", len(subset), w_loop, c_loop))
    # agreement of the two T2-IVIM-Kurtosis fitters on the subset (median relative difference)
    agreement = {name: float(np.median(np.abs(adv.maps[name][: len(subset)] / np.where(loop[:, i] != 0, loop[:, i], np.nan) - 1)))
                 for i, name in enumerate(models.ADVANCED_MAPS)}
    per_voxel_loop = w_loop / len(subset)
    speedup = per_voxel_loop * len(signals) / w_adv
    print(f"{'fit':<45}{'voxels':>9}{'wall s':>9}{'CPU s':>9}{'voxels/s':>12}")
    for name, n, w, c in rows:
        print(f"{name:<45}{n:>9}{w:>9.2f}{c:>9.2f}{n / w:>12.0f}")
    print(f"\nscipy loop extrapolated to {len(signals)} voxels: {per_voxel_loop * len(signals):.0f} s; "
          f"speed-up of the vectorised fit: {speedup:.0f}x (wall), "
          f"{(c_loop / len(subset)) * len(signals) / c_adv:.0f}x (CPU)")
    print(f"target: T2-IVIM-Kurtosis on {len(signals)} voxels <= 60 s wall: "
          f"{'met' if w_adv <= 60 else 'MISSED'} ({w_adv:.1f} s)")
    print("median |relative difference| vectorised vs scipy loop: "
          + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items()))
    print(f"status of the vectorised fit: {int((adv.status == 1).sum())} converged, "
          f"{int((adv.status == -1).sum())} at the iteration limit")
    if args.json:
        result = {"threads": args.threads, "rows": [dict(zip(("fit", "voxels", "wall_s", "cpu_s"), r)) for r in rows],
                  "speedup_wall": speedup, "agreement_median_rel_diff": agreement, "target_met": w_adv <= 60}
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
