"""``perfusionai dsc ...``: DSC-MRI perfusion maps from the command line.

Verbs: ``maps`` (:class:`perfusionai.dsc.DSCMapsJob`), ``phantom`` (write a digital phantom
to try the tool on), and the learned-method verbs of :mod:`perfusionai.dsc.cli_learned`
(``train-phae``, ``train-tmax``, ``grade``, ``noise-study``). Handlers are thin: build the job
from the arguments, run it, print.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

import numpy as np

from ..cli_common import add_common_options, make_progress, positive_float, positive_int
from ..errors import ParameterError
from . import cli_learned
from .acquisition import TR_RANGE_S
from .deconvolution import DISCRETISATIONS, TIKHONOV_CRITERIA
from .job import DSCMapsJob
from .maps import CBV_WINDOWS, DEFAULT_KH, DEFAULT_RHO, INTEGRATIONS
from .methods import DEFAULT_METHOD, METHODS, resolve_method
from .model import DSCOptions


def _method(text: str) -> str:
    try:
        return resolve_method(text).name
    except ParameterError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def register(subparsers) -> None:
    dsc = subparsers.add_parser("dsc", help="DSC-MRI perfusion: CBV, CBF, MTT, Tmax, TTP maps",
                                description="DSC-MRI perfusion maps (Ostergaard deconvolution and learned methods).")
    verbs = dsc.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True

    methods = "; ".join(f"{m.name}: {m.description}" for m in METHODS.values())
    maps = verbs.add_parser(
        "maps", help="compute CBV, CBF, MTT, Tmax and TTP maps from a 4D DSC series",
        description="Compute CBV [mL/100 g], CBF [mL/100 g/min], MTT [s], Tmax [s] and TTP [s] maps from a 4D "
                    "DSC-MRI series. Writes OUT/{cbv,cbf,mtt,tmax,ttp}.nii.gz on the input grid, OUT/aif.csv "
                    "and OUT/summary.json (inputs, options, the AIF, medians inside the mask, warnings, and the "
                    "job that reproduces the run). Methods: " + methods + ".")
    maps.add_argument("--dsc", required=True, help="4D DSC series: NIfTI/NRRD file or DICOM folder (time last)")
    maps.add_argument("--te", type=float, default=None,
                      help="echo time in SECONDS (e.g. 0.03); default: from the DICOM header or BIDS sidecar")
    maps.add_argument("--tr", type=positive_float, default=None,
                      help="frame interval in seconds; default: from the header")
    maps.add_argument("--allow-unusual-tr", action="store_true",
                      help=f"accept a frame interval outside {TR_RANGE_S[0]:g}-{TR_RANGE_S[1]:g} s (refused "
                           "otherwise: a header in milliseconds read as seconds is the usual cause)")
    aif = maps.add_mutually_exclusive_group()
    aif.add_argument("--aif-mask", default=None, help="mask of arterial voxels; the AIF is their mean curve")
    aif.add_argument("--aif-auto", action="store_true",
                     help="select arterial voxels automatically inside --mask (the whole image without one); "
                          "the search region must contain arteries: a brain mask that excludes the vessels gives "
                          "a tissue 'AIF', which is reported as a warning (default when no --aif-mask is given)")
    maps.add_argument("--mask", default=None, help="brain mask (maps are computed inside it; default: whole image)")
    maps.add_argument("--auto-mask", action="store_true",
                      help="without --mask: compute the maps inside an automatic head mask (Otsu threshold of the "
                           "pre-bolus image, largest connected region, holes filled, one voxel eroded) instead of "
                           "the whole image; it keeps the bright vessels, and the automatic AIF searches inside it "
                           "(the AIF search region must contain arteries); the mask is written as auto_mask.nii.gz")
    maps.add_argument("--motion-correction", action="store_true",
                      help="register every frame rigidly (ANTsPy, mutual information) to the median pre-bolus image "
                           "before the analysis; the per-frame translation (mm) and rotation (degrees) go to "
                           "summary.json (needs the [prm] extra: antspyx; about 0.6 s per frame on 2 CPU cores for a "
                           "small series)")
    maps.add_argument("--aif-quadratic", nargs=2, type=float, default=None, metavar=("A", "B"),
                      help="the arterial (whole-blood) delta R2* is quadratic in the concentration C: A*C + B*C^2 "
                           "(A in 1/(s mM), B in 1/(s mM^2); van Osch 2003, Kjolby 2006; no default, take them from "
                           "the literature for your field strength). The AIF is converted per voxel to A*C; tissue "
                           "stays linear. Default: linear")
    maps.add_argument("--method", type=_method, default=DEFAULT_METHOD,
                      help=" | ".join(METHODS) + " (case-insensitive; see the description)")
    maps.add_argument("--threshold", type=float, default=None,
                      help="SVD truncation threshold relative to the largest singular value, in (0, 1) "
                           "(default: sSVD 0.2, cSVD 0.1)")
    maps.add_argument("--oi", dest="oi_threshold", type=positive_float,
                      default=METHODS["oSVD"].defaults["oi_threshold"], help="oSVD oscillation-index threshold")
    maps.add_argument("--lambda", dest="tikhonov_lambda", type=positive_float, default=None,
                      help="fixed Tikhonov regularisation relative to the largest singular value "
                           "(default: chosen per voxel by --lambda-criterion)")
    maps.add_argument("--lambda-criterion", dest="tikhonov_criterion",
                      choices=tuple(c for c in TIKHONOV_CRITERIA if c != "fixed"),
                      default=METHODS["Tikhonov"].defaults["tikhonov_criterion"],
                      help="automatic Tikhonov lambda per voxel: generalised cross-validation or the L-curve "
                           "corner")
    maps.add_argument("--lambda-floor", dest="tikhonov_floor", type=float,
                      default=METHODS["Tikhonov"].defaults["tikhonov_floor"],
                      help="automatic Tikhonov: each voxel's lambda is at least the lambda GCV picks for the whole "
                           "volume divided by this factor, which keeps the per-voxel GCV and L-curve choices from the "
                           "false corners noise makes at tiny lambda (0: no floor, the plain per-voxel criterion)")
    maps.add_argument("--discretisation", choices=DISCRETISATIONS, default="rectangle",
                      help="AIF convolution matrix: plain Ostergaard rectangle rule or dsc-mri-toolbox's "
                           "Simpson-smoothed AIF")
    maps.add_argument("--kh", type=positive_float, default=DEFAULT_KH, help="haematocrit factor kH (1 = plain ratio)")
    maps.add_argument("--rho", type=positive_float, default=DEFAULT_RHO,
                      help="brain density in g/mL (1 = plain ratio)")
    maps.add_argument("--baseline-frames", type=positive_int, default=None,
                      help="number of pre-bolus frames for S0 (default: detected automatically)")
    maps.add_argument("--leakage-correction", action="store_true",
                      help="Boxerman-Schmainda-Weisskoff leakage correction (contrast-enhancing tumours); "
                           "adds k2.nii.gz (leakage, 1/s), k1.nii.gz (scaling of the reference curve) and "
                           "k2_cv.nii.gz (coefficient of variation of K2)")
    maps.add_argument("--cbv-integration", choices=INTEGRATIONS, default="trapezoid",
                      help="rule for the CBV integrals of tissue and AIF")
    maps.add_argument("--cbv-window", choices=CBV_WINDOWS, default="full",
                      help="frames of the CBV integrals: the whole series, or the AIF's first pass")
    maps.add_argument("--refine-tmax", action="store_true",
                      help="parabolic sub-sample Tmax (default: the residue maximum on the frame grid)")
    maps.add_argument("--model", dest="model_path", default=None,
                      help="model folder or zip for --method phae / tmax-net (phae without --model trains on "
                           "this series first, about 4 min on 2 CPU cores)")
    maps.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                      help="device of the learned methods (auto: CUDA when present)")
    maps.add_argument("--aif-gamma-fit", action="store_true",
                      help="replace the AIF by a gamma-variate fit of its first pass (recirculation removed; "
                           "use with --cbv-window first_pass, as the tissue curves keep theirs)")
    maps.add_argument("--fwhm-map", action="store_true",
                      help="also write fwhm.nii.gz: full width at half maximum of each concentration curve (s)")
    maps.add_argument("--leakage-max-k2-cv", type=positive_float, default=None,
                      help="with --leakage-correction: correct only voxels whose K2 is reliable (coefficient of "
                           "variation = standard error / |K2| at most this, e.g. 0.5); k2_cv.nii.gz is written "
                           "either way (default: correct every voxel)")
    maps.add_argument("--parametric-shape", type=positive_float, default=None,
                      help="--method parametric: fix the residue's gamma shape (1 = exponential; default: one shape "
                           "fitted to the volume)")
    maps.add_argument("--parametric-dispersion", dest="parametric_dispersion_s", type=float, default=0.0,
                      help="--method parametric: mean time (s) of an exponential dispersion of the bolus between "
                           "the AIF and the tissue; Tmax then adds the dispersed residue's peak time (0: none)")
    maps.add_argument("--save-residue", action="store_true",
                      help="also write residue.nii.gz (4D: the flow-scaled residue CBF*R(t) in 1/s per lag; cSVD/oSVD: "
                           "2N lags, the second half negative), and for SVD/Tikhonov regularisation.nii.gz (threshold "
                           "or lambda relative to s_max) and, for oSVD, oscillation_index.nii.gz")
    maps.add_argument("--dsc-echo2", default=None,
                      help="second echo of a dual-echo series (same grid and frames as --dsc): delta R2* = "
                           "ln((S1/S1,0)/(S2/S2,0))/(TE2-TE1), free of T1 leakage effects")
    maps.add_argument("--te2", type=positive_float, default=None,
                      help="echo time of the second echo in SECONDS (default: from its header)")
    maps.add_argument("--phae-epochs", type=positive_int, default=DSCOptions.phae_epochs,
                      help="--method phae without --model: maximum training epochs on this series")
    maps.add_argument("--phae-max-seconds", type=float, default=DSCOptions.phae_max_seconds,
                      help="--method phae without --model: training time budget in s (0 or less: 240 s on CPU, "
                           "none on CUDA)")
    maps.add_argument("--out", required=True, help="output folder")
    add_common_options(maps)
    maps.set_defaults(handler=run_maps, job_class=DSCMapsJob)

    phantom = verbs.add_parser(
        "phantom", help="write a DSC digital phantom with known truth (4D series, masks, truth maps)",
        description="Write a DSC-MRI digital phantom: OUT/dsc.nii.gz (4D, TR in the header) with OUT/dsc.json "
                    "marking it as a phantom (models trained on it say 'trained on phantoms'), "
                    "OUT/brain_mask.nii.gz, OUT/aif_mask.nii.gz (arterial voxels), OUT/rois.nii.gz, "
                    "OUT/truth_<map>.nii.gz and OUT/truth.json (TE, TR and the region table).")
    phantom.add_argument("--out", required=True, help="output folder")
    phantom.add_argument("--snr", type=positive_float, default=None,
                         help="baseline signal-to-noise ratio (Rician noise); default: no noise")
    phantom.add_argument("--residue", choices=("exponential", "gamma", "lorentzian"), default="exponential",
                         help="shape of the tissue residue function R(t) the curves are simulated with")
    phantom.add_argument("--leakage", action="store_true", help="add an enhancing tumour with contrast leakage")
    phantom.add_argument("--discretisation", choices=("fine", "inverse-crime"), default="fine",
                         help="fine: tissue curves simulated on a 0.01 s grid, as a scanner samples a continuous "
                              "bolus; inverse-crime: the solvers' own rectangle model, which SVD methods invert "
                              "exactly (CBV then reads CBV + CBF*TR/120)")
    phantom.add_argument("--tissue-kappa", type=positive_float, default=1.0,
                         help="tissue-to-blood delta-R2* relaxivity ratio (1: tissue signal drops 4-14 %%; "
                              "10 with --aif-peak 35 gives clinical drops, grey matter ~30 %%). Maps recover the "
                              "truth with --kh = 0.73 / tissue-kappa (written to truth.json as analysis_kh)")
    phantom.add_argument("--aif-peak", type=positive_float, default=80.0,
                         help="peak arterial delta-R2* in 1/s (80: 91 %% arterial signal drop at TE 30 ms)")
    phantom.add_argument("--seed", type=int, default=0, help="seed of the noise (the same seed gives the same series)")
    phantom.add_argument("--tumour-cbv", type=positive_float, default=7.5,
                         help="CBV of the tumour (label 5) in mL/100 g; its CBF follows at the tumour's MTT of 5 s "
                              "(lower it for a low-grade-like tumour, e.g. to try 'dsc grade')")
    add_common_options(phantom)
    phantom.set_defaults(handler=run_phantom)

    cli_learned.register_verbs(verbs)


def flags_in_message(exc: ParameterError, job_class) -> ParameterError:
    """``exc`` with the other parameters its message names (``allow_unusual_tr``) written as flags."""
    names = {f.name for f in dataclasses.fields(job_class) if "_" in f.name}
    problem = re.sub(r"\b[a-z]+(?:_[a-z0-9]+)+\b",
                     lambda m: job_class.flag_of(m.group(0)) if m.group(0) in names else m.group(0), exc.problem)
    return ParameterError(exc.parameter, problem)


def run_maps(args: argparse.Namespace) -> int:
    job = DSCMapsJob.from_namespace(args)
    try:
        result = job.run(make_progress(args, f"dsc maps ({job.method})"))
    except ParameterError as exc:
        raise flags_in_message(exc, DSCMapsJob) from None
    for warning in result.fit.warnings:
        print(f"perfusionai: warning: {warning}", file=sys.stderr)
    print(f"maps written to {job.out}: " + ", ".join(f"{n}.nii.gz" for n in result.maps))
    return 0


def run_phantom(args: argparse.Namespace) -> int:
    # phantoms import the domains, never the reverse at module level
    from ..phantoms.dsc import DEFAULT_LEAKAGE_K2, default_tissues, make_dsc_phantom

    tissues = default_tissues(tumour_k2=DEFAULT_LEAKAGE_K2 if args.leakage else 0.0)
    for tissue in tissues:
        if tissue.name == "tumour":
            tissue.cbf, tissue.cbv = tissue.cbf * args.tumour_cbv / tissue.cbv, args.tumour_cbv
    phantom = make_dsc_phantom(snr=np.inf if args.snr is None else args.snr, residue=args.residue,
                               leakage=args.leakage, seed=args.seed, tissue_kappa=args.tissue_kappa,
                               aif_peak=args.aif_peak, discretisation=args.discretisation, tissues=tissues)
    phantom.save(args.out)
    kh_note = "" if args.tissue_kappa == 1.0 else f"; compute maps with --kh {phantom.analysis_kh:.6g}"
    print(f"phantom written to {args.out} (TR {phantom.tr} s, TE {phantom.te} s{kh_note})")
    return 0
