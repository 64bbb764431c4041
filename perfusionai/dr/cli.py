"""``perfusionai dr ...``: diffusion-relaxation fits and learned advanced-protocol prediction.

Verbs: ``fit`` (clinical, t2ivimkurtosis or ivim maps from a 4D series), ``train`` (cohort CSV ->
model folder), ``predict`` (clinical series + model folder -> advanced maps), ``evaluate``
(leave-one-patient-out BI/DI table and plots, training-set-size study) and ``phantom`` (write a
phantom cohort to try the other verbs on).

File conventions: ``--bvals`` is an FSL-style file of b-values in s/mm^2 (whitespace separated,
one row, one value per volume); ``--tes`` the same for echo times in MILLISECONDS.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_common import add_common_options, make_progress, positive_float, positive_int
from . import models as M
from .jobs import DRFitJob, DRPredictJob

MODEL_HELP = ("clinical (s0, adc, adc_fast, adc_slow, f_proxy; log-linear) | t2ivimkurtosis (s0, f, dv, t2v, dt, k, "
              "t2t; needs --tes with >= 2 echo times) | ivim (s0, f, dstar, d; single TE)")


def _csv_list(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(choices)}")
        return items
    return parse


def _grid_points(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"must be between 2 and 8, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("training sizes must be integers >= 1")
    return values


def register(subparsers) -> None:
    dr = subparsers.add_parser("dr", help="diffusion-relaxation MRI: clinical/IVIM/T2-IVIM-Kurtosis fits, learned "
                                          "prediction of the advanced protocol",
                               description="Diffusion-relaxation MRI (Macarro et al., JMRI 2025). Units: b s/mm2, "
                                           "TE and T2 ms, diffusivities um2/ms (= 1e-3 mm2/s).")
    verbs = dr.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True
    formatter = argparse.ArgumentDefaultsHelpFormatter

    fit = verbs.add_parser("fit", help="fit a signal model to a 4D diffusion series", formatter_class=formatter,
                           description="Fit a model voxel by voxel (vectorised) and write OUT/<map>.nii.gz on the "
                                       "input grid, OUT/status.nii.gz (1 converged, -1 iteration limit, 0 not fitted) "
                                       "and OUT/summary.json. NaN or infinite values inside the mask are refused. "
                                       "The clinical and ivim models assume one echo time: with --tes they use the "
                                       "volumes at the shortest TE; without it a series whose repeated b = 0 "
                                       "volumes differ like several echo times is refused.")
    fit.add_argument("--dwi", required=True, help="4D diffusion series (NIfTI/NRRD, volumes last)")
    fit.add_argument("--bvals", required=True, help="b-values in s/mm2, one per volume (FSL bvals style)")
    fit.add_argument("--tes", default=None, help="echo times in ms, one per volume (or one value for all); "
                                                  "required for t2ivimkurtosis")
    fit.add_argument("--mask", default=None, help="mask on the series grid (default: every voxel with signal)")
    fit.add_argument("--model", choices=M.MODELS, default="clinical", help=MODEL_HELP)
    fit.add_argument("--noise-sigma", type=positive_float, default=None,
                     help="noise SD of the magnitude images (signal units): enables the noise-floor correction "
                          "of the ivim/t2ivimkurtosis fits")
    fit.add_argument("--noise-model", choices=("rician", "offset"), default="rician",
                     help="noise-floor model with --noise-sigma: exact Rician mean or the offset-Gaussian "
                          "sqrt(S^2 + pi/2 sigma^2) of the authors' fitter")
    fit.add_argument("--grid-points", type=_grid_points, default=4,
                     help="t2ivimkurtosis start grid: values per non-linear parameter, 2-8 (4 -> 1024 candidates)")
    fit.add_argument("--out", required=True, help="output folder")
    add_common_options(fit)
    fit.set_defaults(handler=run_fit, job_class=DRFitJob)

    train = verbs.add_parser("train", help="train a learner on a cohort (advanced protocol) -> model folder",
                             formatter_class=formatter,
                             description="Train a learner predicting the advanced protocol from its clinical subset "
                                         "(5 lowest b at the minimum TE). Cohort CSV columns: patient, dwi, bvals, "
                                         "tes, mask (paths relative to the CSV); each dwi holds the full advanced "
                                         "protocol; mask = region used (e.g. tumour).")
    train.add_argument("--cohort", required=True, help="cohort CSV")
    train.add_argument("--algorithm", choices=_alg(), default="mlnn",
                       help="learner: lr linear regression, rf random forest, etr extra trees, gbr gradient "
                            "boosting, slnn/mlnn single/multi-layer network, patchnn 3x3 patch network "
                            "(networks need torch)")
    train.add_argument("--strategy", choices=_strat(), default="signal-to-signal",
                       help="signal-to-signal: predict the 21 advanced signals, then fit T2-IVIM-Kurtosis; "
                            "maps-to-maps: predict the maps from the clinical ADC maps")
    train.add_argument("--seed", type=int, default=0, help="random seed of the learner")
    train.add_argument("--trained-on-phantoms", action="store_true", dest="trained_on_phantoms",
                       help="label the model 'trained on phantoms' (automatic for a cohort written by 'dr phantom')")
    train.add_argument("--phantom-data", action="store_true", dest="trained_on_phantoms", help=argparse.SUPPRESS)
    train.add_argument("--out", required=True, help="model folder to write (model.json + weights.safetensors)")
    add_common_options(train)
    train.set_defaults(handler=run_train)

    pred = verbs.add_parser("predict", help="predict advanced T2-IVIM-Kurtosis maps from a clinical series",
                            formatter_class=formatter,
                            description="Apply a model folder to a clinical series (b 0, 50, 100, 400, 900 s/mm2 at "
                                        "one TE, or a series containing them). Writes OUT/<map>.nii.gz, for "
                                        "signal-to-signal also OUT/predicted_signals.nii.gz (21 volumes) with "
                                        "OUT/predicted_bvals and OUT/predicted_tes, and OUT/summary.json.")
    pred.add_argument("--dwi", required=True, help="4D clinical diffusion series")
    pred.add_argument("--bvals", required=True, help="b-values in s/mm2 (FSL style)")
    pred.add_argument("--tes", default=None, help="echo times in ms (optional; the minimum TE is used)")
    pred.add_argument("--mask", default=None, help="region to predict (default: every voxel with signal)")
    pred.add_argument("--model", required=True, help="model folder written by 'perfusionai dr train'")
    pred.add_argument("--out", required=True, help="output folder")
    add_common_options(pred)
    pred.set_defaults(handler=run_predict, job_class=DRPredictJob)

    ev = verbs.add_parser("evaluate", help="leave-one-patient-out BI/DI of learners on a cohort, plots",
                          formatter_class=formatter,
                          description="Leave-one-patient-out evaluation: per patient and metric BI = median and DI = "
                                      "IQR of the relative error against the T2-IVIM-Kurtosis fit of the advanced "
                                      "protocol; a population-median baseline (no learning) is listed beside the "
                                      "learners. Writes OUT/lopo.csv, OUT/summary.csv, OUT/summary.json, OUT/bi_di.png "
                                      "and, with --sizes, OUT/training_size.csv and OUT/training_size.png.")
    ev.add_argument("--cohort", required=True, help="cohort CSV (as for train)")
    ev.add_argument("--algorithms", type=_csv_list(_alg()), default=["lr", "etr", "mlnn"],
                    help=f"comma-separated subset of {','.join(_alg())}")
    ev.add_argument("--strategies", type=_csv_list(_strat()), default=list(_strat()),
                    help="comma-separated: signal-to-signal,maps-to-maps")
    ev.add_argument("--sizes", type=_int_list, default=None,
                    help="training-set-size study: comma-separated numbers of training patients (signal-to-signal)")
    ev.add_argument("--seed", type=int, default=0, help="random seed of the learners and of the size study")
    ev.add_argument("--out", required=True, help="output folder")
    add_common_options(ev)
    ev.set_defaults(handler=run_evaluate)

    ph = verbs.add_parser("phantom", help="write a diffusion-relaxation phantom cohort (advanced protocol, truths)",
                          formatter_class=formatter,
                          description="Write OUT/cohort.csv and one folder per patient: dwi.nii.gz (the advanced "
                                      "protocol, 21 volumes) with bvals and tes, tumour.nii.gz, truth_<map>.nii.gz, "
                                      "and the clinical-protocol series clinical.nii.gz (5 volumes) with "
                                      "clinical_bvals and clinical_tes (the input of 'dr predict').")
    ph.add_argument("--subjects", type=positive_int, default=6, dest="patients",
                    help="number of phantom subjects (patients) to write")
    ph.add_argument("--patients", type=positive_int, dest="patients", default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS)  # the old name, kept for one release
    ph.add_argument("--snr", type=positive_float, default=60.0, help="SNR at b=0, minimum TE, liver")
    ph.add_argument("--seed", type=int, default=0, help="random seed of the cohort")
    ph.add_argument("--out", required=True, help="output folder")
    add_common_options(ph)
    ph.set_defaults(handler=run_phantom)


def _alg():
    from .learners import ALGORITHMS
    return ALGORITHMS


def _strat():
    from .learners import STRATEGIES
    return STRATEGIES


# --------------------------------------------------------------------------------------
# thin handlers: parse -> job or library call -> one line


def run_fit(args: argparse.Namespace) -> int:
    job = DRFitJob.from_namespace(args)
    fit = job.run(make_progress(args, f"dr fit {job.model}"))
    print(f"{job.model} maps ({', '.join(fit.maps)}) written to {job.out} "
          f"in {fit.seconds:.1f} s ({fit.info['voxels_fitted']} voxels)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from .learners import train_from_cohort

    model = train_from_cohort(args.cohort, args.out, args.algorithm, args.strategy, seed=args.seed,
                              trained_on_phantoms=args.trained_on_phantoms or None,
                              progress=make_progress(args, "dr train"))
    label = " (trained on phantoms)" if model.description.get("trained_on_phantoms") else ""
    print(f"{args.algorithm} {args.strategy} model{label} written to {args.out} "
          f"({model.description['voxels']} voxels of {len(model.description['patients'])} patients)")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    job = DRPredictJob.from_namespace(args)
    result = job.run(make_progress(args, "dr predict"))
    label = " [model trained on phantoms]" if result.trained_on_phantoms else ""
    print(f"predicted {', '.join(result.maps)} written to {job.out}{label}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_cohort

    result = evaluate_cohort(args.cohort, args.out, args.algorithms, args.strategies, args.sizes, seed=args.seed,
                             progress=make_progress(args, "dr evaluate"))
    for s in result["summary"]:
        print(f"{s['strategy']:>17} {s['algorithm']:>17}  mean|BI| {s['mean_abs_bi']:.3f}  mean DI {s['mean_di']:.3f}")
    return 0


def run_phantom(args: argparse.Namespace) -> int:
    from ..io import atomic_output_dir
    from ..phantoms.dr import make_dr_cohort, write_dr_cohort

    cohort = make_dr_cohort(args.patients, snr=args.snr, seed=args.seed)
    with atomic_output_dir(args.out) as stage:
        csv_path = write_dr_cohort(cohort, stage, truth=True, clinical=True)
    print(f"phantom cohort of {args.patients} patients written to {args.out} ({Path(args.out) / csv_path.name})")
    return 0
