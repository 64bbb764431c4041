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
import csv
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..cli_common import add_common_options, make_progress, positive_float
from ..errors import input_error
from ..io import atomic_output_dir, read_mask, write_json, write_series, write_volume
from . import models as M

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

    fit = verbs.add_parser("fit", help="fit a signal model to a 4D diffusion series",
                           description="Fit a model voxel by voxel (vectorised) and write OUT/<map>.nii.gz on the "
                                       "input grid, OUT/status.nii.gz (1 converged, -1 iteration limit, 0 not fitted) "
                                       "and OUT/summary.json.")
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
                     help="noise-floor model with --noise-sigma: exact Rician mean (default) or the offset-Gaussian "
                          "sqrt(S^2 + pi/2 sigma^2) of the authors' fitter")
    fit.add_argument("--grid-points", type=int, default=4,
                     help="t2ivimkurtosis start grid: values per non-linear parameter (default 4 -> 1024 candidates)")
    fit.add_argument("--out", required=True, help="output folder")
    add_common_options(fit)
    fit.set_defaults(handler=run_fit)

    train = verbs.add_parser("train", help="train a learner on a cohort (advanced protocol) -> model folder",
                             description="Train a learner predicting the advanced protocol from its clinical subset "
                                         "(5 lowest b at the minimum TE). Cohort CSV columns: patient, dwi, bvals, "
                                         "tes, mask (paths relative to the CSV); each dwi holds the full advanced "
                                         "protocol; mask = region used (e.g. tumour).")
    train.add_argument("--cohort", required=True, help="cohort CSV")
    train.add_argument("--algorithm", choices=_alg(), default="mlnn", help="learner (default mlnn)")
    train.add_argument("--strategy", choices=_strat(), default="signal-to-signal")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--phantom-data", action="store_true",
                       help="label the model 'trained on phantoms' (automatic for a cohort written by 'dr phantom')")
    train.add_argument("--out", required=True, help="model folder to write (model.json + weights.safetensors)")
    add_common_options(train)
    train.set_defaults(handler=run_train)

    pred = verbs.add_parser("predict", help="predict advanced T2-IVIM-Kurtosis maps from a clinical series",
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
    pred.set_defaults(handler=run_predict)

    ev = verbs.add_parser("evaluate", help="leave-one-patient-out BI/DI of learners on a cohort, plots",
                          description="Leave-one-patient-out evaluation: per patient and metric BI = median and DI = "
                                      "IQR of the relative error against the T2-IVIM-Kurtosis fit of the advanced "
                                      "protocol; a population-median baseline (no learning) is listed beside the "
                                      "learners. Writes OUT/lopo.csv, OUT/summary.csv, OUT/summary.json, OUT/bi_di.png "
                                      "and, with --sizes, OUT/training_size.csv and OUT/training_size.png.")
    ev.add_argument("--cohort", required=True, help="cohort CSV (as for train)")
    ev.add_argument("--algorithms", type=_csv_list(_alg()), default=["lr", "etr", "mlnn"],
                    help=f"comma-separated subset of {','.join(_alg())} (default lr,etr,mlnn)")
    ev.add_argument("--strategies", type=_csv_list(_strat()), default=list(_strat()),
                    help="comma-separated: signal-to-signal,maps-to-maps (default both)")
    ev.add_argument("--sizes", type=_int_list, default=None,
                    help="training-set-size study: comma-separated numbers of training patients (signal-to-signal)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", required=True, help="output folder")
    add_common_options(ev)
    ev.set_defaults(handler=run_evaluate)

    ph = verbs.add_parser("phantom", help="write a diffusion-relaxation phantom cohort (advanced protocol, truths)",
                          description="Write OUT/cohort.csv and one folder per patient (dwi.nii.gz with 21 volumes, "
                                      "bvals, tes, tumour.nii.gz, truth_<map>.nii.gz).")
    ph.add_argument("--patients", type=int, default=6)
    ph.add_argument("--snr", type=positive_float, default=60.0, help="SNR at b=0, minimum TE, liver (default 60)")
    ph.add_argument("--seed", type=int, default=0)
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


def run_fit(args: argparse.Namespace) -> int:
    from .pipeline import run_fit as fit

    if args.grid_points < 2 or args.grid_points > 8:
        raise input_error("--grid-points", f"must be between 2 and 8, got {args.grid_points}")
    options = {"grid_points": args.grid_points} if args.model == "t2ivimkurtosis" else {}
    if args.noise_sigma is not None and args.model != "clinical":
        options["noise_model"] = args.noise_model
    summary = fit(args.dwi, args.bvals, args.tes, args.model, args.out, mask_path=args.mask,
                  noise_sigma=args.noise_sigma, progress=make_progress(args, f"dr fit {args.model}"), **options)
    print(f"{args.model} maps ({', '.join(M.MODEL_MAPS[args.model])}) written to {args.out} "
          f"in {summary['seconds']:.1f} s ({summary['fit']['voxels_fitted']} voxels)")
    return 0


def read_cohort(path: str | Path, progress=None):
    """Read a cohort CSV and build every patient's learning data (clinical inputs, advanced references)."""
    from ..progress import as_progress
    from .learners import patient_features
    from .pipeline import read_dwi_and_protocol

    progress = as_progress(progress)
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "cohort CSV not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = {"patient", "dwi", "bvals", "tes", "mask"}
    if not rows:
        raise input_error(path, "the cohort CSV lists no patient")
    if not needed <= set(rows[0]):
        raise input_error(path, f"the cohort CSV lacks the columns {', '.join(sorted(needed - set(rows[0])))} "
                                f"(expected: patient, dwi, bvals, tes, mask)")
    base = path.parent
    patients = []
    for i, row in enumerate(rows):
        progress(i / len(rows), f"reading {row['patient']}")
        series, protocol = read_dwi_and_protocol(base / row["dwi"], base / row["bvals"], base / row["tes"],
                                                 "t2ivimkurtosis")
        mask = read_mask(base / row["mask"], series.geometry)
        try:
            protocol.clinical_indices()
        except ValueError as exc:
            raise input_error(base / row["bvals"], f"{exc}; the cohort must hold the advanced protocol") from None
        patients.append(patient_features(series.array, protocol, mask, row["patient"]))
    progress(1.0, "cohort read")
    return patients


def run_train(args: argparse.Namespace) -> int:
    from ..progress import as_progress
    from .learners import save_model, train

    progress = as_progress(make_progress(args, "dr train"))
    patients = read_cohort(args.cohort, progress.sub(0.0, 0.6))
    progress(0.6, f"training {args.algorithm} ({args.strategy})")
    from ..phantoms import is_phantom_cohort

    on_phantoms = bool(args.phantom_data) or is_phantom_cohort(args.cohort)  # the phantom writer marks its cohort
    model = train(patients, args.algorithm, args.strategy, seed=args.seed, trained_on_phantoms=on_phantoms)
    model.description["cohort"] = str(args.cohort)
    with atomic_output_dir(args.out) as stage:
        save_model(model, stage)
    progress(1.0, "model written")
    label = " (trained on phantoms)" if on_phantoms else ""
    print(f"{args.algorithm} {args.strategy} model{label} written to {args.out} "
          f"({model.description['voxels']} voxels of {len(patients)} patients)")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..progress import as_progress
    from .learners import load_model
    from .pipeline import predict_series, read_dwi_and_protocol

    progress = as_progress(make_progress(args, "dr predict"))
    started = time.perf_counter()
    model = load_model(args.model)
    series, protocol = read_dwi_and_protocol(args.dwi, args.bvals, args.tes, "clinical")
    mask = read_mask(args.mask, series.geometry) if args.mask else None
    progress(0.1, "predicting")
    maps, signals, info = predict_series(series.array, protocol, model, mask, progress=progress.sub(0.1, 0.9),
                                         source=args.dwi)
    from .pipeline import fitted_region

    region = fitted_region(maps)  # every predicted voxel (a map may be 0 there, e.g. f clipped at 0)
    summary = {"perfusionai": __version__, "command": "dr predict", "model": str(args.model), **info,
               "inputs": {"dwi": str(args.dwi), "bvals": str(args.bvals), "tes": args.tes, "mask": args.mask},
               "units": {k: M.MAP_UNITS[k] for k in maps},
               "median": {k: float(np.median(v[region])) for k, v in maps.items()}}
    with atomic_output_dir(args.out) as stage:
        for name, values in maps.items():
            write_volume(values, series.geometry, stage / f"{name}.nii.gz")
        if signals is not None:
            write_series(signals, series.geometry, stage / "predicted_signals.nii.gz")
            adv = model.advanced_protocol
            (stage / "predicted_bvals").write_text(" ".join(f"{b:g}" for b in adv["bvals"]) + "\n")
            (stage / "predicted_tes").write_text(" ".join(f"{t:g}" for t in adv["tes"]) + "\n")
        summary["seconds"] = round(time.perf_counter() - started, 3)
        write_json(summary, stage / "summary.json")
    progress(1.0, "done")
    label = " [model trained on phantoms]" if summary["trained_on_phantoms"] else ""
    print(f"predicted {', '.join(maps)} written to {args.out}{label}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..progress import as_progress
    from . import evaluation as E

    progress = as_progress(make_progress(args, "dr evaluate"))
    patients = read_cohort(args.cohort, progress.sub(0.0, 0.3))
    if len(patients) < 2:
        raise input_error(args.cohort, "leave-one-patient-out needs at least 2 patients")
    if args.sizes and max(args.sizes) > len(patients) - 1:
        raise input_error("--sizes", f"at most {len(patients) - 1} training patients exist in a leave-one-out split")
    stop = 0.75 if args.sizes else 1.0
    rows = E.leave_one_patient_out(patients, args.algorithms, args.strategies, seed=args.seed,
                                   progress=progress.sub(0.3, stop))
    summary = E.summarise(rows + E.population_baseline(patients))
    size_rows = None
    if args.sizes:
        size_rows = E.training_size_study(patients, args.sizes, args.algorithms, seed=args.seed,
                                          progress=progress.sub(stop, 1.0))
    with atomic_output_dir(args.out) as stage:
        E.write_rows_csv(rows, stage / "lopo.csv")
        E.write_rows_csv(summary, stage / "summary.csv")
        E.plot_bi_di(summary, stage / "bi_di.png")
        result = {"perfusionai": __version__, "command": "dr evaluate", "cohort": str(args.cohort),
                  "patients": [p.name for p in patients], "metrics": list(E.EVAL_METRICS),
                  "definition": "BI = median, DI = IQR of (prediction - reference)/reference over ROI voxels; "
                                "reference = T2-IVIM-Kurtosis fit of the advanced protocol",
                  "summary": summary}
        if size_rows:
            E.write_rows_csv(size_rows, stage / "training_size.csv")
            E.plot_training_size(size_rows, stage / "training_size.png")
            result["training_size"] = E.summarise(size_rows, by=("algorithm", "n_train"))
        write_json(result, stage / "summary.json")
    for s in summary:
        print(f"{s['strategy']:>17} {s['algorithm']:>17}  mean|BI| {s['mean_abs_bi']:.3f}  mean DI {s['mean_di']:.3f}")
    return 0


def run_phantom(args: argparse.Namespace) -> int:
    from ..phantoms.dr import make_dr_cohort, write_dr_cohort

    if args.patients < 1:
        raise input_error("--patients", "must be at least 1")
    cohort = make_dr_cohort(args.patients, snr=args.snr, seed=args.seed)
    with atomic_output_dir(args.out) as stage:
        csv_path = write_dr_cohort(cohort, stage)
        for ph in cohort:
            for name, values in ph.truth.items():
                write_volume(values.astype(np.float32), ph.geometry, stage / ph.name / f"truth_{name}.nii.gz")
    print(f"phantom cohort of {args.patients} patients written to {args.out} ({Path(args.out) / csv_path.name})")
    return 0
