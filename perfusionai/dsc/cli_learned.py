"""Learned-DSC verbs of ``perfusionai dsc``: ``train-phae``, ``train-tmax``, ``grade``, ``noise-study``.

:func:`register_verbs` is called by :func:`perfusionai.dsc.cli.register` with the ``dsc`` verb
sub-parsers. Applying a trained model is ``perfusionai dsc maps --method phae|tmax-net --model M``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Optional

import numpy as np

from ..cli_common import add_common_options, make_progress, positive_float, positive_int
from ..deps import require
from ..errors import ParameterError, input_error
from ..io import (atomic_output_dir, check_finite_values, read_labels, read_mask, read_series, read_volume,
                  write_json)
from . import acquisition
from .evaluation import grade, roc_png, roi_ratio
from .maps import DEFAULT_KH, DEFAULT_RHO
from .methods import method_names, resolve_method
from .model import prepare_concentration_and_aif
from .noise_study import DEFAULT_METHODS, DEFAULT_SNR_LEVELS, noise_study, write_noise_study


# ------------------------------------------------------------------------------ shared input handling


def _add_series_options(parser: argparse.ArgumentParser, mask_required: bool = True, multiple: bool = False) -> None:
    nargs = "+" if multiple else None
    parser.add_argument("--dsc", required=True, nargs=nargs,
                        help="4D DSC series (NIfTI/NRRD file or DICOM folder, time last)"
                             + ("; several allowed" if multiple else ""))
    parser.add_argument("--te", type=positive_float, default=None,
                        help="echo time in SECONDS (default: from the header or BIDS sidecar)")
    parser.add_argument("--tr", type=positive_float, default=None, help="frame interval in s (default: header)")
    aif = parser.add_mutually_exclusive_group()
    aif.add_argument("--aif-mask", default=None, nargs=nargs, help="mask of arterial voxels (AIF = their mean)")
    aif.add_argument("--aif-auto", action="store_true", help="automatic AIF selection (default without --aif-mask)")
    parser.add_argument("--mask", required=mask_required, nargs=nargs, default=None,
                        help="brain mask (the voxels to train on / map)")
    parser.add_argument("--baseline-frames", type=int, default=None,
                        help="pre-bolus frames for S0 (default: detected)")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """The options every training verb shares: seed, device, phantom label, description."""
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, validation split and shuffling")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="training device (auto: CUDA when present)")
    parser.add_argument("--trained-on-phantoms", action="store_true",
                        help="mark the model as trained on phantoms (shown wherever it is used; set automatically "
                             "when every series was written by 'perfusionai dsc phantom')")
    parser.add_argument("--description", default=None,
                        help="training-data description stored in model.json (default: the series names)")


def _nth(values, index: int, count: int, option: str):
    if values is None:
        return None
    if isinstance(values, str):
        return values
    if len(values) == 1:
        return values[0]
    if len(values) != count:
        raise input_error(option, f"give one value or one per --dsc series ({count}), got {len(values)}")
    return values[index]


def load_concentration(dsc_path, te_option, tr_option, mask_path, aif_mask_path, aif_auto: bool,
                       baseline_frames: Optional[int] = None, signal: Optional[np.ndarray] = None):
    """Read a series and return ``(series, te, times, mask, concentration [k,j,i,t], aif (t,))``.

    The same steps as :meth:`perfusionai.dsc.DSCModel.fit`, through the same function
    (:func:`perfusionai.dsc.model.prepare_concentration_and_aif`). ``signal`` replaces the
    series' array.
    """
    series = read_series(dsc_path, tr=tr_option, name="DSC series", min_frames=acquisition.MIN_FRAMES)
    times = series.frame_times()
    acquisition.validate_tr(acquisition.frame_interval(times, source=str(dsc_path)), source=str(dsc_path))
    te = acquisition.series_te(te_option, series)
    mask = read_mask(mask_path, series.geometry, "brain mask") if mask_path else np.ones(series.geometry.shape, bool)
    arterial = read_mask(aif_mask_path, series.geometry, "AIF mask") if aif_mask_path else None
    array = series.array if signal is None else signal
    check_finite_values(array, mask if arterial is None else mask | arterial, str(dsc_path), "the DSC series")
    prepared = prepare_concentration_and_aif(array, times, te, mask, arterial, baseline_frames, source=str(dsc_path),
                                             aif_source=str(aif_mask_path or "AIF mask"))
    return (series, te, times, mask, prepared.concentration, np.asarray(prepared.aif, dtype=np.float64),
            prepared.baseline_frames)


# ------------------------------------------------------------------------------ train-phae


def run_train_phae(args: argparse.Namespace) -> int:
    require("torch", "dsc train-phae")
    # torch is there: the modules built on it are imported on this verb's path only (extra 'learned')
    from ..nn import save_model
    from .phae import prepare_subject, train_phae

    progress = make_progress(args, "train PHAE")
    subjects = []
    paths = args.dsc
    for n, path in enumerate(paths):
        _, _, times, mask, conc, aif, _ = load_concentration(
            path, args.te, args.tr, _nth(args.mask, n, len(paths), "--mask"),
            _nth(args.aif_mask, n, len(paths), "--aif-mask"), args.aif_auto, args.baseline_frames)
        subjects.append(prepare_subject(conc, aif, times, mask, name=str(path)))
    description = args.description or (f"{len(paths)} series: " + ", ".join(Path(p).name for p in paths)
                                       + " (self-supervised, all masked voxels)")
    training = train_phae(subjects, residue=args.residue, estimate_delay=args.estimate_delay,
                          base_features=args.width, epochs=args.epochs, learning_rate=args.lr,
                          batch_size=args.batch_size, max_seconds=args.max_seconds if args.max_seconds > 0 else -1.0,
                          seed=args.seed,
                          device=args.device, progress=progress,
                          trained_on_phantoms=args.trained_on_phantoms or all(map(acquisition.is_marked_phantom, paths)),
                          training_description=description)
    save_model(args.out, training.model, training.card)
    h = training.history
    print(f"PHAE written to {args.out}: {h.epochs_run} epochs in {training.seconds:.0f} s, best validation L1 "
          f"{h.best_loss:.4g} (epoch {h.best_epoch + 1}), {training.card['architecture']['hyperparameters']}")
    return 0


# ------------------------------------------------------------------------------ train-tmax


def _read_cohort(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise input_error(p, "cohort CSV not found")
    with open(p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "dsc" not in rows[0]:
        raise input_error(p, "the cohort CSV needs a header with at least the column 'dsc' "
                             "(optional: mask, aif_mask, reference_tmax, te)")
    base = p.parent
    out = []
    for row in rows:
        entry = {}
        for key in ("dsc", "mask", "aif_mask", "reference_tmax"):
            value = (row.get(key) or "").strip()
            entry[key] = str((base / value) if value and not Path(value).is_absolute() else value) if value else None
        te = (row.get("te") or "").strip()
        entry["te"] = float(te) if te else None
        out.append(entry)
    return out


def run_train_tmax(args: argparse.Namespace) -> int:
    require("torch", "dsc train-tmax")
    # torch is there: the modules built on it are imported on this verb's path only (extra 'learned')
    from ..nn import save_model
    from .tmaxnet import osvd_teacher_tmax, prepare_tmax_subject, train_tmax

    progress = make_progress(args, "train Tmax network")
    if args.cohort:
        entries = _read_cohort(args.cohort)
    else:
        if not args.dsc:
            raise input_error("--dsc", "give the training series with --dsc (or a --cohort CSV)")
        n = len(args.dsc)
        refs = args.reference_tmax
        if refs is not None and len(refs) != n:
            raise input_error("--reference-tmax", f"give one reference Tmax map per --dsc series ({n}), got {len(refs)}")
        entries = [{"dsc": d, "mask": _nth(args.mask, i, n, "--mask"), "aif_mask": _nth(args.aif_mask, i, n, "--aif-mask"),
                    "reference_tmax": refs[i] if refs else None, "te": None} for i, d in enumerate(args.dsc)]
    if args.teacher is None and any(e["reference_tmax"] is None for e in entries):
        raise input_error("--reference-tmax", "every series needs a reference Tmax map, or use --teacher osvd")
    subjects, peak = [], None
    report = progress or (lambda f, m: None)
    for i, e in enumerate(entries):
        report(0.3 * i / len(entries), f"preparing {Path(e['dsc']).name}")
        series, _, times, mask, conc, aif, _ = load_concentration(
            e["dsc"], e["te"] if e["te"] is not None else args.te, args.tr, e["mask"], e["aif_mask"],
            e["aif_mask"] is None, args.baseline_frames)
        if e["reference_tmax"] is not None and args.teacher is None:
            ref_vol = read_volume(e["reference_tmax"], "reference Tmax map")
            if not ref_vol.geometry.same_grid(series.geometry):
                raise input_error(e["reference_tmax"], "the reference Tmax map is not on the grid of " + str(e["dsc"]))
            reference, source = ref_vol.array, "user"
        else:
            reference, source = osvd_teacher_tmax(conc, aif, times, mask), "osvd"
        s = prepare_tmax_subject(conc, aif, times, mask, reference, peak, name=str(e["dsc"]))
        peak = s.aif_peak_frame
        subjects.append(s)
    description = args.description or f"{len(subjects)} series ({', '.join(Path(e['dsc']).name for e in entries)})"
    phantoms = args.trained_on_phantoms or all(acquisition.is_marked_phantom(e["dsc"]) for e in entries)
    training = train_tmax(subjects, args.arch, epochs=args.epochs, learning_rate=args.lr, seed=args.seed,
                          device=args.device, progress=(lambda f, m: report(0.3 + 0.7 * f, m)),
                          trained_on_phantoms=phantoms, training_description=description,
                          reference_source=source)
    save_model(args.out, training.model, training.card)
    print(f"Tmax network ({args.arch}) written to {args.out}: {training.history.epochs_run} epochs, validation RMSE "
          f"{training.card['metrics']['validation_rmse_s']} s")
    return 0


# ------------------------------------------------------------------------------ grade


POSITIVE_WORDS = {"1", "hgg", "high", "high-grade", "high_grade", "positive", "true", "yes"}
NEGATIVE_WORDS = {"0", "lgg", "low", "low-grade", "low_grade", "negative", "false", "no"}


def _label(value: str, positive: Optional[str], path: Path, row: int) -> int:
    v = value.strip().lower()
    if positive is not None:
        return int(v == positive.strip().lower())
    if v in POSITIVE_WORDS:
        return 1
    if v in NEGATIVE_WORDS:
        return 0
    raise input_error(path, f"row {row}: label {value!r} is not 0/1, LGG/HGG or low/high; use --positive LABEL")


def run_grade(args: argparse.Namespace) -> int:
    table = Path(args.table)
    if not table.is_file():
        raise input_error(table, "grading table not found")
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = {"subject", "map", "roi_lesion", "roi_reference", "label"}
    if not rows or not needed <= set(rows[0]):
        raise input_error(table, f"the CSV needs the columns {', '.join(sorted(needed))} "
                                 "(optional: method, to compare several maps per subject; roi_lesion_label and "
                                 "roi_reference_label, to take one label of a label map as the ROI)")
    base = table.parent
    progress = make_progress(args, "grade")

    def resolve(value: str) -> Path:
        p = Path(value.strip())
        return p if p.is_absolute() else base / p

    def roi(row: dict, n: int, column: str, geometry, name: str) -> np.ndarray:
        """A mask file (nonzero = inside), or with ``<column>_label`` the voxels of that label in a label map."""
        path = resolve(row[column])
        label = (row.get(f"{column}_label") or "").strip()
        if not label:
            return read_mask(path, geometry, name)
        try:
            value = int(label)
        except ValueError:
            raise input_error(table, f"row {n}: {column}_label {label!r} is not a whole number") from None
        inside = read_labels(path, geometry, name) == value
        if not inside.any():
            raise input_error(path, f"{name} of row {n}: label {value} is not in this label map")
        return inside

    per_method: dict[str, list[tuple[str, float, int]]] = {}
    for n, row in enumerate(rows, start=2):
        method = (row.get("method") or "").strip() or "map"
        volume = read_volume(resolve(row["map"]), f"map of {row['subject']}")
        lesion = roi(row, n, "roi_lesion", volume.geometry, "lesion ROI")
        reference = roi(row, n, "roi_reference", volume.geometry, "reference ROI")
        ratio = roi_ratio(volume.array, lesion, reference, args.statistic, name=str(resolve(row["map"])))
        per_method.setdefault(method, []).append((row["subject"], ratio, _label(row["label"], args.positive, table, n)))
        if progress:
            progress(n / (len(rows) + 1), f"ratio of {row['subject']}")
    results = {m: grade([r for _, r, _ in v], [lab for _, _, lab in v], n_bootstrap=args.bootstrap, seed=args.seed)
               for m, v in per_method.items()}
    with atomic_output_dir(args.out) as stage:
        with open(stage / "ratios.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["method", "subject", "roi_ratio", "label", "called_positive"])
            for m, v in per_method.items():
                for subject, ratio, lab in v:
                    w.writerow([m, subject, f"{ratio:.6g}", lab, int(ratio >= results[m].cutoff)])
        write_json({"statistic": f"{args.statistic} lesion / {args.statistic} reference",
                    "methods": {m: r.to_dict() for m, r in results.items()}}, stage / "grading.json")
        roc_png(results, stage / "roc.png", title="ROI ratio: ROC")
    for m, r in results.items():
        print(f"{m}: AUC {r.auc:.3f} (95 % CI {r.auc_ci[0]:.3f}-{r.auc_ci[1]:.3f}), cut-off {r.cutoff:.4g}, "
              f"sensitivity {100 * r.sensitivity:.1f} %, specificity {100 * r.specificity:.1f} %, "
              f"Mann-Whitney U {r.mann_whitney_u:.1f} (p = {r.mann_whitney_p:.3g})")
    print(f"grading written to {args.out}")
    return 0


# ------------------------------------------------------------------------------ noise-study


def run_noise_study(args: argparse.Namespace) -> int:
    series = read_series(args.dsc, tr=args.tr, name="DSC series", min_frames=acquisition.MIN_FRAMES)
    te = acquisition.series_te(args.te, series)
    times = series.frame_times()
    mask = read_mask(args.mask, series.geometry, "brain mask") if args.mask else None
    aif_mask = read_mask(args.aif_mask, series.geometry, "AIF mask") if args.aif_mask else None
    rois = None
    if args.rois:
        volume = read_volume(args.rois, "ROI labels")
        if not volume.geometry.same_grid(series.geometry):
            raise input_error(args.rois, "the ROI label map is not on the grid of the DSC series")
        rois = np.rint(volume.array).astype(int)
    truth = {}
    if args.truth_dir:
        for name in ("cbf", "mtt", "tmax"):
            p = Path(args.truth_dir) / f"truth_{name}.nii.gz"
            if p.is_file():
                truth[name] = read_volume(p, f"truth {name}").array
    result = noise_study(series.array, times, te, mask, aif_mask, snr_levels=args.snr, methods=args.methods,
                         baseline_frames=args.baseline_frames, rois=rois, truth=truth, kh=args.kh, rho=args.rho,
                         seed=args.seed, phae_model=args.phae_model, tmax_model=args.tmax_model,
                         series_is_phantom=acquisition.is_marked_phantom(args.dsc), source=series.path or args.dsc,
                         progress=make_progress(args, "noise study"))
    write_noise_study(result, args.out, inputs=[args.dsc, args.mask, args.aif_mask, args.rois])
    print(f"noise study written to {args.out} ({len(result.snr_levels)} SNR levels x {len(result.methods)} methods)")
    return 0


# ------------------------------------------------------------------------------ registration


def register_verbs(verbs) -> None:
    """Add ``train-phae``, ``train-tmax``, ``grade`` and ``noise-study`` to the ``dsc`` verbs."""
    p = verbs.add_parser(
        "train-phae", help="train the physics-informed autoencoder on your own series (self-supervised)",
        description="Train the PHAE of Fayolle et al. (ISBI 2025) on the masked voxels of one or more DSC series, "
                    "without reference maps. Writes a model folder (or .zip): weights.safetensors + model.json. "
                    "Apply it with 'perfusionai dsc maps --method phae --model MODEL'.")
    _add_series_options(p, mask_required=True, multiple=True)
    p.add_argument("--out", required=True, help="model folder or .zip to write")
    p.add_argument("--epochs", type=positive_int, default=65, help="maximum epochs (paper: 65)")
    p.add_argument("--learning-rate", type=positive_float, default=1e-3, dest="lr",
                   help="Adam learning rate (paper: 1e-4)")
    p.add_argument("--lr", type=positive_float, dest="lr", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None,
                   help="voxel curves per batch (paper: 1536; default 1536, or n/40 for series under 61k voxels)")
    p.add_argument("--residue", choices=("lorentzian", "exponential", "gamma"), default="lorentzian",
                   help="decoder residue shape (paper: lorentzian)")
    p.add_argument("--estimate-delay", action="store_true",
                   help="also learn the bolus delay and output Tmax (extension; not in the paper)")
    p.add_argument("--width", type=int, default=None,
                   help="first-block features (paper: 32; default 32 on CUDA, 8 on CPU for speed)")
    p.add_argument("--max-seconds", type=float, default=-1.0,
                   help="training time budget in s (default: 240 on CPU, none on CUDA; 0 or less = default)")
    _add_training_options(p)
    add_common_options(p)
    p.set_defaults(handler=run_train_phae)

    p = verbs.add_parser(
        "train-tmax", help="train a learned Tmax network against reference Tmax maps (or oSVD as teacher)",
        description="Train the learned Tmax network of Sossin et al. (1x1x1 Conv3D over time-as-channels: conv1, "
                    "conv2 (1033 parameters at 60 frames) or a small 3D U-Net) with MSE against reference Tmax maps "
                    "(--reference-tmax, e.g. from commercial software) or this project's oSVD (--teacher osvd).")
    p.add_argument("--dsc", nargs="+", default=None, help="training series")
    p.add_argument("--cohort", default=None,
                   help="CSV with columns dsc, mask, aif_mask, reference_tmax, te (paths relative to the CSV)")
    p.add_argument("--te", type=positive_float, default=None, help="echo time in s (default: header)")
    p.add_argument("--tr", type=positive_float, default=None, help="frame interval in s (default: header)")
    p.add_argument("--aif-mask", nargs="+", default=None, help="AIF mask(s) (default: automatic AIF)")
    p.add_argument("--mask", nargs="+", default=None, help="brain mask(s)")
    p.add_argument("--baseline-frames", type=positive_int, default=None,
                   help="pre-bolus frames for S0 (default: detected per series)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference-tmax", nargs="+", default=None, help="reference Tmax map per series (s)")
    ref.add_argument("--teacher", choices=("osvd",), default=None, help="use oSVD Tmax as the reference")
    p.add_argument("--architecture", choices=("conv1", "conv2", "unet"), default="conv2", dest="arch",
                   help="network: conv1 (one 1x1x1 convolution), conv2 (two, the paper's best) or a small 3D U-Net")
    p.add_argument("--arch", choices=("conv1", "conv2", "unet"), dest="arch", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=positive_int, default=200, help="maximum training epochs (early stopping)")
    p.add_argument("--learning-rate", type=positive_float, default=1e-3, dest="lr",
                   help="Adam learning rate (paper's best: 1e-3)")
    p.add_argument("--lr", type=positive_float, dest="lr", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_training_options(p)
    p.add_argument("--out", required=True, help="model folder or .zip to write")
    add_common_options(p)
    p.set_defaults(handler=run_train_tmax)

    p = verbs.add_parser(
        "grade", help="ROI ratios, ROC/AUC with bootstrap CI, Youden cut-off, Mann-Whitney U for a cohort",
        description="Glioma grading as in Fayolle et al.: for each row of TABLE (columns subject, map, roi_lesion, "
                    "roi_reference, label; optional method, and roi_lesion_label / roi_reference_label when the "
                    "ROI files are label maps) the ratio of the mean map value in the lesion ROI to "
                    "the reference ROI (contralateral normal-appearing white matter); then per method the ROC AUC "
                    "with a percentile-bootstrap 95 %% CI, the Youden cut-off with sensitivity/specificity and the "
                    "Mann-Whitney U test. Writes OUT/grading.json, OUT/ratios.csv, OUT/roc.png.")
    p.add_argument("--table", required=True, help="CSV table (paths relative to it)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--statistic", choices=("mean", "median"), default="mean", help="ROI statistic (paper: mean)")
    p.add_argument("--positive", default=None, help="label value that counts as positive (default: 1/HGG/high)")
    p.add_argument("--bootstrap", type=positive_int, default=2000, help="bootstrap resamples for the AUC CI")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    add_common_options(p)
    p.set_defaults(handler=run_grade)

    p = verbs.add_parser(
        "noise-study", help="degrade a series from SNR 50 to 10 and re-run every method",
        description="Add Gaussian noise so that the baseline SNR (mean/SD of pre-bolus frames) is each of --snr, "
                    "recompute the AIF and every method's maps, and write OUT/noise_study.csv/.json/.png (median "
                    "in the mask and per ROI label; with --truth-dir the median absolute relative error of CBF and "
                    "MTT and the median absolute error of Tmax in s). Time: PHAE without --phae-model retrains at "
                    "every level (about 4 min each on 2 CPU cores: about 20 min for the 5 default levels); the "
                    "classical methods take seconds. Quick run: --snr 50 10 --methods oSVD sSVD.")
    p.add_argument("--dsc", required=True, help="4D DSC series (NIfTI/NRRD file or DICOM folder, time last), "
                                                "ideally of high SNR (e.g. a noise-free 'dsc phantom')")
    p.add_argument("--te", type=positive_float, default=None,
                   help="echo time in SECONDS (default: from the header or BIDS sidecar)")
    p.add_argument("--tr", type=positive_float, default=None, help="frame interval in s (default: from the header)")
    p.add_argument("--aif-mask", default=None, help="AIF mask (default: automatic, recomputed at every SNR)")
    p.add_argument("--mask", default=None, help="brain mask: the statistics are taken inside it (default: whole image)")
    p.add_argument("--baseline-frames", type=positive_int, default=None,
                   help="pre-bolus frames for S0 and the SNR (default: detected once, shared by every level)")
    p.add_argument("--snr", type=positive_float, nargs="+", default=list(DEFAULT_SNR_LEVELS),
                   help="target baseline SNR levels (series already noisier are left as they are)")
    p.add_argument("--methods", nargs="+", type=_method, default=list(DEFAULT_METHODS),
                   help="methods to compare: " + ", ".join(method_names()))
    p.add_argument("--phae-model", default=None, help="PHAE model (default: trained on each degraded series)")
    p.add_argument("--tmax-model", default=None, help="Tmax network (needed when tmax-net is among --methods)")
    p.add_argument("--rois", default=None, help="label map on the series grid: statistics per label too")
    p.add_argument("--truth-dir", default=None,
                   help="folder with truth_cbf/mtt/tmax.nii.gz (a 'dsc phantom' folder): adds the errors")
    p.add_argument("--kh", type=positive_float, default=DEFAULT_KH, help="haematocrit factor kH")
    p.add_argument("--rho", type=positive_float, default=DEFAULT_RHO, help="brain density in g/mL")
    p.add_argument("--seed", type=int, default=0, help="seed of the added noise")
    p.add_argument("--out", required=True, help="output folder")
    add_common_options(p)
    p.set_defaults(handler=run_noise_study)


def _method(text: str) -> str:
    try:
        return resolve_method(text).name
    except ParameterError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None
