"""``perfusionai ctpm ...``: CT-to-perfusion translation (DL-CTPM) from the command line.

Verbs: ``train`` (cohort CSV -> model folder), ``predict`` (CT -> perfusion map
and high/low functional lung on the CT grid), ``evaluate`` (prediction vs
SPECT -> JSON with the pinned Spearman R, SSIM, Dice high/low), ``phantom``
(write a synthetic cohort to try the tool on; ``phantoms`` is a hidden alias).
Handlers are thin: ``predict`` is :class:`perfusionai.ctpm.CTPMPredictJob`, the others call
one library function each.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..cli_common import add_common_options, make_progress, positive_float, positive_int
from .jobs import CTPMPredictJob


def _shape(text: str) -> tuple[int, int, int]:
    """The hidden ``--input-shape K,J,I`` form."""
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K,J,I (e.g. 128,64,64), got {text!r}") from None
    if len(values) != 3 or any(v <= 0 or v % 8 for v in values):
        raise argparse.ArgumentTypeError(f"expected three sizes divisible by 8 (e.g. 128,64,64), got {text!r}")
    return values


def _size8(text: str) -> int:
    """One size of ``--shape K J I``: a positive whole number divisible by 8."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0 or value % 8:
        raise argparse.ArgumentTypeError(f"sizes must be positive and divisible by 8 (e.g. 128 64 64), got {value}")
    return value


class _ShapeAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(values))


def _channels(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected four channel counts (e.g. 16,32,64,128), got {text!r}") from None
    if len(values) != 4 or any(v <= 0 or v > 128 for v in values):
        raise argparse.ArgumentTypeError(f"expected four channel counts between 1 and 128, got {text!r}")
    return values


def register(subparsers) -> None:
    ctpm = subparsers.add_parser(
        "ctpm", help="CT-to-perfusion translation (DL-CTPM): predict SPECT-like lung perfusion from CT",
        description="DL-CTPM (Ren et al. 2021): a 3D attention residual network maps each lung's enhanced CT "
                    "to SPECT-like perfusion (SPECT / 75th percentile in the lung, in [0, 1]).")
    verbs = ctpm.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True

    train = verbs.add_parser(
        "train", help="train an ARNN on a cohort CSV (columns ct, spect, optional lung_mask)",
        description="Train the ARNN. Each patient's lungs are separated, cropped and resampled to the input "
                    "size, the CT enhanced (Eq. 1) and the SPECT normalised by its 75th percentile in the lung "
                    "and discretised into 11 levels (Eq. 2). Writes a model folder (weights.safetensors + "
                    "model.json) or a .zip. The paper's defaults (500 epochs, 128x64x64, 16-128 channels) take "
                    "hours on a CPU; the run prints its time estimate first. Quick CPU recipe (about a minute "
                    "for 6 phantoms): --shape 32 16 16 --channels 8,16,32,64 --median-size 3 --uniform-size 1 "
                    "--epochs 20 --learning-rate 3e-3.")
    train.add_argument("--cohort", required=True, help="CSV with columns ct, spect[, lung_mask] (paths relative "
                                                        "to the CSV's folder); SPECTs registered to their CTs")
    train.add_argument("--out", required=True, help="model folder or .zip to write")
    train.add_argument("--shape", nargs=3, type=_size8, action=_ShapeAction, dest="input_shape",
                       default=(128, 64, 64), metavar=("K", "J", "I"),
                       help="lung crop size K J I (head-feet, back-front, left-right), each divisible by 8; "
                            "paper 128 64 64")
    train.add_argument("--input-shape", type=_shape, dest="input_shape", help=argparse.SUPPRESS)
    train.add_argument("--median-size", type=positive_int, default=10, help="median filter window (voxels; 10)")
    train.add_argument("--uniform-size", type=positive_int, default=5, help="uniform filter window (voxels; 5)")
    train.add_argument("--channels", type=_channels, default=(16, 32, 64, 128),
                       help="channels at the four scales (16,32,64,128)")
    train.add_argument("--kernel-size", type=positive_int, default=5, help="convolution kernel (5)")
    train.add_argument("--architecture", choices=("arnn", "attention-unet"), default="arnn",
                       help="arnn: the paper's attention residual network (default); attention-unet: MONAI's "
                            "attention U-Net as a baseline (needs the monai package)")
    train.add_argument("--epochs", type=positive_int, default=500, help="maximum epochs (500, as the paper)")
    train.add_argument("--learning-rate", type=positive_float, default=1e-3, dest="learning_rate",
                       help="Adam learning rate (1e-3)")
    train.add_argument("--lr", type=positive_float, dest="learning_rate", help=argparse.SUPPRESS)
    train.add_argument("--batch-size", type=positive_int, default=2, help="lungs per batch (2)")
    split = train.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.25,
                       help="fraction of patients held out for validation and early stopping (0.25)")
    split.add_argument("--folds", type=positive_int, default=1,
                       help="k-fold cross-validation by patient (the paper: 4), then a final fit on all")
    train.add_argument("--patience", type=positive_int, default=30, help="early-stopping patience in epochs (30)")
    train.add_argument("--max-minutes", type=positive_float, default=None, help="stop each fit after this many minutes (with --folds k: each of the k + 1 fits)")
    train.add_argument("--seed", type=int, default=0, help="random seed (0)")
    train.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    train.add_argument("--trained-on-phantoms", action="store_true",
                       help="label the model 'trained on phantoms' (automatic for cohorts written by "
                            "'perfusionai ctpm phantom')")
    train.add_argument("--phantom-data", action="store_true", dest="trained_on_phantoms", help=argparse.SUPPRESS)
    add_common_options(train)
    train.set_defaults(handler=run_train)

    predict = verbs.add_parser(
        "predict", help="predict the perfusion map of a CT",
        description="Predict SPECT-like perfusion for both lungs and put it back on the CT's exact grid. "
                    "Writes OUT/perfusion.nii.gz ([0, 1]), OUT/function_high_low.nii.gz (1 low, 2 high "
                    "function at 0.66), OUT/lungs.nii.gz (1 right, 2 left) and OUT/summary.json (volumes).")
    predict.add_argument("--ct", required=True, help="CT in HU: NIfTI/NRRD file or DICOM folder")
    predict.add_argument("--lung-mask", default=None,
                         help="lung mask on the CT grid (1 right / 2 left, lobes 1-6, or binary); "
                              "default: automatic CT lung mask")
    predict.add_argument("--model", required=True, help="model folder or .zip from 'perfusionai ctpm train'")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    add_common_options(predict)
    predict.set_defaults(handler=run_predict, job_class=CTPMPredictJob)

    evaluate = verbs.add_parser(
        "evaluate", help="compare a predicted map with a SPECT: JSON with spearman, ssim, dice_high, dice_low",
        description="Pinned definitions: SPECT / P75 in the lung; Spearman R over lung voxels; 3D SSIM "
                    "(Gaussian sigma 1.5 voxels, K1 0.01, K2 0.03, population covariance, data range 1, both "
                    "maps clipped to [0, 1], 0 outside the lung, on the lung's bounding box); Dice of high "
                    "(>= 0.66) and low (< 0.66) function inside the lung. Compared on the SPECT's grid.")
    evaluate.add_argument("--pred", help="predicted perfusion (perfusion.nii.gz)")
    evaluate.add_argument("--spect", help="SPECT registered to the CT (any grid)")
    evaluate.add_argument("--lung-mask", help="lung mask on the prediction's grid")
    evaluate.add_argument("--cohort", default=None,
                          help="instead of one case: CSV with columns pred, spect, lung_mask[, group]; writes "
                               "cases.csv, summary.json and boxplots.png (as the paper's Fig. 4 and 6) to --out")
    evaluate.add_argument("--grid", choices=("spect", "prediction"), default="spect",
                          help="grid to compare on: the SPECT's (default, as the paper) or the prediction's")
    evaluate.add_argument("--out", default=None,
                          help="also write the JSON to this file (into FOLDER/evaluation.json when it is an "
                               "existing folder; the output folder with --cohort). Metrics that are undefined for "
                               "the inputs (e.g. Spearman R of a constant map) are written as null, with the reason "
                               "under 'undefined'")
    add_common_options(evaluate)
    evaluate.set_defaults(handler=run_evaluate)

    description = ("Chest CT phantoms with paired SPECT-like perfusion (gravity gradient, emphysema, dense "
                   "lung, vascular defects, 4.42 mm SPECT voxels, blur and Poisson noise), with cohort.csv.")
    phantom = verbs.add_parser("phantom", help="write a synthetic CT/SPECT cohort with cohort.csv",
                               description=description)
    hidden = verbs.add_parser("phantoms", description=description)  # old name, not listed (no help entry)
    for parser in (phantom, hidden):
        parser.add_argument("--out", required=True, help="output folder")
        parser.add_argument("--subjects", type=positive_int, default=8, dest="n",
                            help="number of phantom subjects (patients)")
        parser.add_argument("--n", type=positive_int, dest="n", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)  # the old name, kept for one release
        parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
        parser.add_argument("--spacing", type=positive_float, default=3.0, help="CT voxel size in mm (3)")
        add_common_options(parser)
        parser.set_defaults(handler=run_phantoms)


def run_train(args: argparse.Namespace) -> int:
    from ..deps import require

    require("torch", "ctpm train")
    from .arnn import ARCHITECTURES
    from .preprocessing import PreprocessConfig
    from .training import train_from_cohort

    config = PreprocessConfig(input_shape=tuple(args.input_shape), median_size=args.median_size,
                              uniform_size=args.uniform_size)
    result = train_from_cohort(
        args.cohort, args.out, config=config, trained_on_phantoms=True if args.trained_on_phantoms else None,
        channels=args.channels, kernel_size=args.kernel_size, epochs=args.epochs, lr=args.learning_rate,
        batch_size=args.batch_size, val_fraction=args.val_fraction, folds=args.folds, patience=args.patience,
        seed=args.seed, device=args.device, architecture=ARCHITECTURES[args.architecture],
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        progress=make_progress(args, "ctpm train"),
        announce=lambda message: print(f"perfusionai: {message}", file=sys.stderr, flush=True))
    training = result.card["training"]
    print(json.dumps({"model": str(args.out), "parameters": training["parameters"],
                      "epochs_run": training["epochs_run"], "best_epoch": training["best_epoch"],
                      "trained_on_phantoms": result.card["trained_on_phantoms"],
                      "validation": result.validation_metrics.get("summary", {})}, indent=2))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    job = CTPMPredictJob.from_namespace(args)
    result = job.run(make_progress(args, "ctpm predict"))
    both = result.volumes["both"]
    print(f"model: {result.model_label}")
    print(f"lung {both['lung_ml']:.0f} mL: high function {both['high_function_ml']:.0f} mL, "
          f"low function {both['low_function_ml']:.0f} mL; written to {job.out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..errors import input_error
    from .evaluation import evaluate_command

    if args.cohort and not args.out:
        raise input_error("--out", "--cohort needs an output folder (--out DIR)")
    missing = [name for name, value in (("--pred", args.pred), ("--spect", args.spect),
                                        ("--lung-mask", args.lung_mask)) if not value]
    if not args.cohort and missing:
        raise input_error(missing[0], f"{', '.join(missing)} required (or --cohort CSV --out DIR)")
    result = evaluate_command(args.pred, args.spect, args.lung_mask, cohort=args.cohort, out=args.out, grid=args.grid)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def run_phantoms(args: argparse.Namespace) -> int:
    from ..phantoms.ctpm import phantom_geometry, write_ctpm_cohort

    geometry = phantom_geometry(spacing_mm=(args.spacing,) * 3)
    path = write_ctpm_cohort(args.out, args.n, seed=args.seed, geometry=geometry)
    print(f"cohort written: {path}")
    return 0
