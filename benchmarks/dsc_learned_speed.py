"""Speed of the learned DSC methods on one whole-brain-sized series, beside oSVD in the same run.

Targets (issue 4): PHAE self-supervised training on one 150k-voxel brain <= 5 min on 2 CPU cores,
PHAE inference <= 5 s. Prints a table with times and ratios to oSVD. Run:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dsc_learned_speed.py [--threads 2] [--max-seconds 240]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=240.0, help="PHAE training budget")
    parser.add_argument("--shape", type=int, nargs=3, default=(24, 128, 128))
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from perfusionai.dsc.concentration import signal_to_concentration
    from perfusionai.dsc.deconvolution import deconvolve, frame_interval
    from perfusionai.dsc.phae import phae_maps, prepare_subject, train_phae
    from perfusionai.nn import set_threads
    from perfusionai.phantoms.dsc import LABELS, make_brain_phantom

    set_threads(args.threads)
    ph = make_brain_phantom(shape=tuple(args.shape), snr=50.0, residue="lorentzian", discretisation="fine", seed=3)
    mask = ph.brain_mask
    n_vox = int(mask.sum())
    baseline = int(round(ph.parameters["aif"]["arrival_s"] / ph.tr))
    conc = signal_to_concentration(ph.signal, ph.te, baseline, mask).concentration
    aif = conc[ph.aif_mask].mean(0).astype(np.float64)
    dt = frame_interval(ph.times)
    curves = conc[mask]

    # wall-clock seconds, and CPU seconds of this process (on a shared, oversubscribed machine the
    # wall clock measures the other tenants; CPU seconds / threads bounds the idle wall time)
    t0, c0 = time.perf_counter(), time.process_time()
    osvd = deconvolve(curves, aif, dt, "oSVD")
    t_osvd, c_osvd = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    subject = prepare_subject(conc, aif, ph.times, mask)
    training = train_phae(subject, max_seconds=args.max_seconds, seed=0, device="cpu")
    t_train, c_train = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    maps = phae_maps(training.model, conc, aif, ph.times, mask, kh=ph.kh, rho=ph.rho, device="cpu")
    t_infer, c_infer = time.perf_counter() - t0, time.process_time() - c0

    osvd_cbf = np.zeros(mask.shape, np.float32)
    osvd_cbf[mask] = 6000 * ph.kh / ph.rho * osvd.cbf
    rows = [("oSVD maps", t_osvd, c_osvd, None), ("PHAE training", t_train, c_train, 300.0),
            ("PHAE inference", t_infer, c_infer, 5.0)]
    h = training.history
    print(f"volume {tuple(args.shape)} x {ph.times.size} frames, {n_vox} brain voxels, {args.threads} threads, "
          f"PHAE width {training.model.architecture['hyperparameters']['base_features']}, "
          f"{h.epochs_run} epochs ({'time budget' if h.stopped_by_time else 'early stop' if h.stopped_early else 'all'})")
    print(f"{'step':<16}{'wall s':>9}{'x oSVD':>8}{'CPU s':>9}{'x oSVD':>8}{'target s':>10}{'met (wall)':>11}")
    for name, sec, cpu, target in rows:
        met = "" if target is None else ("yes" if sec <= target else "NO")
        print(f"{name:<16}{sec:>9.2f}{sec / t_osvd:>8.2f}{cpu:>9.2f}{cpu / max(c_osvd, 1e-9):>8.2f}"
              f"{'' if target is None else f'{target:.0f}':>10}{met:>11}")
    import os
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("ROI median CBF (mL/100 g/min) truth / PHAE / oSVD:")
    for region in ("grey_matter", "white_matter", "tumour"):
        roi = ph.rois == LABELS[region]
        print(f"  {region:<14}{np.median(ph.truth['cbf'][roi]):8.1f}{np.median(maps['cbf'][roi]):8.1f}"
              f"{np.median(osvd_cbf[roi]):8.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"voxels": n_vox, "threads": args.threads, "osvd_s": t_osvd, "phae_train_s": t_train,
                       "phae_infer_s": t_infer, "osvd_cpu_s": c_osvd, "phae_train_cpu_s": c_train,
                       "phae_infer_cpu_s": c_infer, "epochs": h.epochs_run}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
