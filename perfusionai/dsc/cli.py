"""``perfusionai dsc ...``: DSC-MRI perfusion maps from the command line.

Verbs: ``maps`` (classical and learned deconvolution), ``phantom`` (write a
digital phantom to try the tool on), and the learned-method verbs registered by
:mod:`perfusionai.dsc.cli_learned` when present (``train-phae``, ``train-tmax``,
``grade``, ``noise-study``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..cli_common import add_common_options, make_progress, positive_float
from ..errors import input_error
from ..io import atomic_output_dir, check_finite_series, read_mask, read_series, write_json, write_volume
from .deconvolution import DEFAULT_OI_THRESHOLD
from .maps import DEFAULT_KH, DEFAULT_RHO, MAP_UNITS

METHODS = ("sSVD", "cSVD", "oSVD", "Tikhonov", "phae", "tmax-net")
MAP_NAMES = ("cbv", "cbf", "mtt", "tmax", "ttp")
MIN_FRAMES = 10


def _method(text: str) -> str:
    for m in METHODS:
        if text.lower() == m.lower():
            return m
    raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {', '.join(METHODS)}")


def register(subparsers) -> None:
    dsc = subparsers.add_parser("dsc", help="DSC-MRI perfusion: CBV, CBF, MTT, Tmax, TTP maps",
                                description="DSC-MRI perfusion maps (Ostergaard deconvolution and learned methods).")
    verbs = dsc.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True

    maps = verbs.add_parser(
        "maps", help="compute CBV, CBF, MTT, Tmax and TTP maps from a 4D DSC series",
        description="Compute CBV [mL/100 g], CBF [mL/100 g/min], MTT [s], Tmax [s] and TTP [s] maps from a 4D "
                    "DSC-MRI series. Writes OUT/{cbv,cbf,mtt,tmax,ttp}.nii.gz on the input grid, OUT/aif.csv "
                    "and OUT/summary.json.")
    maps.add_argument("--dsc", required=True, help="4D DSC series: NIfTI/NRRD file or DICOM folder (time last)")
    maps.add_argument("--te", type=float, default=None,
                      help="echo time in SECONDS (e.g. 0.03); default: from the DICOM header or BIDS sidecar")
    maps.add_argument("--tr", type=positive_float, default=None,
                      help="frame interval in seconds; default: from the header")
    aif = maps.add_mutually_exclusive_group()
    aif.add_argument("--aif-mask", default=None, help="mask of arterial voxels; the AIF is their mean curve")
    aif.add_argument("--aif-auto", action="store_true",
                     help="select arterial voxels automatically (default when no --aif-mask is given)")
    maps.add_argument("--mask", default=None, help="brain mask (maps are computed inside it; default: whole image)")
    maps.add_argument("--method", type=_method, default="oSVD",
                      help="sSVD | cSVD | oSVD (default) | Tikhonov | phae | tmax-net (case-insensitive)")
    maps.add_argument("--threshold", type=positive_float, default=None,
                      help="SVD truncation threshold relative to the largest singular value "
                           "(default: sSVD 0.2, cSVD 0.1)")
    maps.add_argument("--oi", type=positive_float, default=DEFAULT_OI_THRESHOLD,
                      help=f"oSVD oscillation-index threshold ({DEFAULT_OI_THRESHOLD})")
    maps.add_argument("--lambda", dest="tikhonov_lambda", type=positive_float, default=None,
                      help="Tikhonov regularisation relative to the largest singular value "
                           "(default: chosen per voxel by --lambda-criterion)")
    maps.add_argument("--lambda-criterion", choices=("gcv", "lcurve"), default="gcv",
                      help="automatic Tikhonov lambda per voxel: generalised cross-validation (default) or the "
                           "L-curve corner (can pick a false corner on noisy low-flow voxels)")
    maps.add_argument("--discretisation", choices=("rectangle", "simpson"), default="rectangle",
                      help="AIF convolution matrix: plain Ostergaard rectangle rule (default) or "
                           "dsc-mri-toolbox's Simpson-smoothed AIF")
    maps.add_argument("--kh", type=positive_float, default=DEFAULT_KH,
                      help=f"haematocrit factor kH ({DEFAULT_KH}; 1 = plain ratio)")
    maps.add_argument("--rho", type=positive_float, default=DEFAULT_RHO,
                      help=f"brain density in g/mL ({DEFAULT_RHO}; 1 = plain ratio)")
    maps.add_argument("--baseline-frames", type=int, default=None,
                      help="number of pre-bolus frames for S0 (default: detected automatically)")
    maps.add_argument("--leakage-correction", action="store_true",
                      help="Boxerman-Schmainda-Weisskoff leakage correction (contrast-enhancing tumours); "
                           "adds k2.nii.gz (leakage, 1/s) and k1.nii.gz (scaling of the reference curve)")
    maps.add_argument("--model", default=None,
                      help="model folder or zip for --method phae / tmax-net (phae without --model trains on "
                           "this series first)")
    maps.add_argument("--out", required=True, help="output folder")
    add_common_options(maps)
    maps.set_defaults(handler=run_maps)

    phantom = verbs.add_parser(
        "phantom", help="write a DSC digital phantom with known truth (4D series, masks, truth maps)",
        description="Write a DSC-MRI digital phantom: OUT/dsc.nii.gz (4D, TR in the header), OUT/brain_mask.nii.gz, "
                    "OUT/aif_mask.nii.gz (arterial voxels), OUT/rois.nii.gz, OUT/truth_<map>.nii.gz and "
                    "OUT/truth.json (TE, TR and the region table).")
    phantom.add_argument("--out", required=True, help="output folder")
    phantom.add_argument("--snr", type=positive_float, default=None, help="signal-to-noise ratio (default: no noise)")
    phantom.add_argument("--residue", choices=("exponential", "gamma", "lorentzian"), default="exponential")
    phantom.add_argument("--leakage", action="store_true", help="add an enhancing tumour with contrast leakage")
    phantom.add_argument("--discretisation", choices=("fine", "inverse-crime"), default="fine",
                         help="fine (default): tissue curves simulated on a 0.01 s grid, as a scanner samples a "
                              "continuous bolus; inverse-crime: the solvers' own rectangle model, which SVD methods "
                              "invert exactly (CBV then reads CBV + CBF*TR/120)")
    phantom.add_argument("--tissue-kappa", type=positive_float, default=1.0,
                         help="tissue-to-blood delta-R2* relaxivity ratio (default 1: tissue signal drops 4-14 %%; "
                              "10 with --aif-peak 35 gives clinical drops, grey matter ~30 %%). Maps recover the "
                              "truth with --kh = 0.73 / tissue-kappa (written to truth.json as analysis_kh)")
    phantom.add_argument("--aif-peak", type=positive_float, default=80.0,
                         help="peak arterial delta-R2* in 1/s (default 80: 91 %% arterial signal drop at TE 30 ms)")
    phantom.add_argument("--seed", type=int, default=0)
    add_common_options(phantom)
    phantom.set_defaults(handler=run_phantom)

    try:
        learned = importlib.import_module("perfusionai.dsc.cli_learned")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("perfusionai.dsc.cli_learned"):
            raise
    else:
        learned.register_verbs(verbs)


def resolve_te(te_option, series) -> float:
    """Echo time in seconds from ``--te`` or the series header; refuses missing, zero or ms-looking values."""
    from .concentration import validate_te

    if te_option is None and series.te is None:
        raise input_error(series.path, "the echo time (TE) is not in the header; give it with --te SECONDS")
    return validate_te(te_option if te_option is not None else series.te, "--te")


def run_maps(args: argparse.Namespace) -> int:
    from .pipeline import DSCOptions, compute_dsc_maps

    started = time.perf_counter()
    series = read_series(args.dsc, tr=args.tr, name="DSC series", min_frames=MIN_FRAMES)
    times = series.frame_times()
    te = resolve_te(args.te, series)
    mask = read_mask(args.mask, series.geometry, "brain mask") if args.mask else None
    aif_mask = read_mask(args.aif_mask, series.geometry, "AIF mask") if args.aif_mask else None
    # values outside the brain (and AIF) mask are never used, so NaN there is harmless
    used = None if mask is None else (mask | aif_mask if aif_mask is not None else mask)
    check_finite_series(series, used, "the DSC series")
    options = DSCOptions(
        te=te, method=args.method, threshold=args.threshold, oi_threshold=args.oi,
        tikhonov_lambda=args.tikhonov_lambda,
        tikhonov_criterion="fixed" if args.tikhonov_lambda is not None else args.lambda_criterion,
        discretisation=args.discretisation, kh=args.kh, rho=args.rho, baseline_frames=args.baseline_frames,
        leakage_correction=args.leakage_correction, model_path=args.model,
    )
    progress = make_progress(args, f"dsc maps ({args.method})")
    result = compute_dsc_maps(series.array, times, options, mask=mask, aif_mask=aif_mask,
                              aif_auto=aif_mask is None, progress=progress)
    with atomic_output_dir(args.out) as stage:
        for name, arr in result.maps.items():
            write_volume(np.asarray(arr, dtype=np.float32), series.geometry, stage / f"{name}.nii.gz")
        write_aif_csv(stage / "aif.csv", result)
        summary = build_summary(args, series, te, times, mask, result, time.perf_counter() - started)
        write_json(summary, stage / "summary.json")
    print(f"maps written to {args.out}: " + ", ".join(f"{n}.nii.gz" for n in result.maps))
    return 0


def write_aif_csv(path: Path, result) -> None:
    """``time_s, aif_per_s, tissue_mean_per_s``: the AIF and mean tissue delta-R2* curves."""
    tissue = getattr(result, "tissue_curve", None)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["time_s", "aif_delta_r2star_per_s", "tissue_mean_delta_r2star_per_s"])
        for i, t in enumerate(result.times):
            w.writerow([f"{t:.6g}", f"{result.aif[i]:.8g}",
                        f"{tissue[i]:.8g}" if tissue is not None else ""])


def build_summary(args, series, te, times, mask, result, seconds) -> dict:
    """summary.json: inputs, options, the AIF used and the median of every map inside the mask."""
    inside = mask if mask is not None else np.ones(series.geometry.shape, bool)
    medians = {}
    for name, arr in result.maps.items():
        vals = np.asarray(arr)[inside]
        vals = vals[np.isfinite(vals)]
        medians[name] = {"median": float(np.median(vals)) if vals.size else None,
                         "unit": MAP_UNITS.get(name, "")}
    aif_info = {"mode": "mask" if args.aif_mask else "automatic", "mask": args.aif_mask}
    voxels = getattr(result, "aif_voxels", None)
    if voxels is not None:
        kji = np.asarray(voxels, dtype=int).reshape(-1, 3)
        lps = (series.geometry.ijk_to_lps() @ np.c_[kji[:, ::-1], np.ones(len(kji))].T).T[:, :3]
        aif_info["voxels_kji"] = kji.tolist()
        aif_info["voxels_lps_mm"] = np.round(lps, 3).tolist()
    aif_info["peak_per_s"] = float(np.max(result.aif))
    aif_info["time_to_peak_s"] = float(times[int(np.argmax(result.aif))])
    summary = {
        "perfusionai_version": __version__,
        "inputs": {"dsc": str(args.dsc), "mask": args.mask, "aif_mask": args.aif_mask,
                   "frames": int(series.n_frames), "shape_kji": list(series.geometry.shape),
                   "spacing_mm": list(series.geometry.spacing), "te_s": te,
                   "tr_s": float(np.median(np.diff(times))), "voxels_in_mask": int(inside.sum())},
        "options": {"method": args.method, "threshold": args.threshold, "oi_threshold": args.oi,
                    "tikhonov_lambda": args.tikhonov_lambda, "lambda_criterion": args.lambda_criterion,
                    "discretisation": args.discretisation, "kh": args.kh, "rho": args.rho,
                    "baseline_frames": args.baseline_frames, "leakage_correction": args.leakage_correction,
                    "model": args.model},
        "aif": aif_info,
        "medians_in_mask": medians,
        "runtime_s": round(seconds, 3),
    }
    extra = getattr(result, "summary", None)
    if isinstance(extra, dict):
        summary["details"] = extra
    return summary


def run_phantom(args: argparse.Namespace) -> int:
    from ..phantoms.dsc import make_dsc_phantom

    phantom = make_dsc_phantom(snr=np.inf if args.snr is None else args.snr, residue=args.residue, leakage=args.leakage, seed=args.seed,
                               tissue_kappa=args.tissue_kappa, aif_peak=args.aif_peak,
                               discretisation=args.discretisation)
    phantom.save(args.out)
    kh_note = "" if args.tissue_kappa == 1.0 else f"; compute maps with --kh {phantom.analysis_kh:.6g}"
    print(f"phantom written to {args.out} (TR {phantom.tr} s, TE {phantom.te} s{kh_note})")
    return 0
