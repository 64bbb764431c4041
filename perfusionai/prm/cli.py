"""``perfusionai prm <verb>``: CT parametric response mapping and its evaluation.

Verbs: ``ct`` (insp/exp CT -> PRM map, stats, figures), ``evaluate`` (one case or a
cohort CSV) and ``phantom`` (a CT pair with known PRM to try them on); the MRI verbs
(``train``, ``predict``, ``ablation``) live in :mod:`perfusionai.prm.cli_mri`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli_common import add_common_options, make_progress
from ..errors import input_error



def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(",", "x").split("x") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected iterations like 40x20x10, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one level")
    return values


def _add_ct(verbs) -> None:
    p = verbs.add_parser("ct", help="PRM from inspiratory and expiratory CT (HU)",
                         description="Register the expiratory CT to the inspiratory CT (ANTs SyN, lungs masked), "
                                     "classify every lung voxel (normal, fSAD, emphysema, uncategorized; Galban 2012) "
                                     "and report %PRM per lung and lobe. Outputs: prm.nii.gz (inspiratory grid), "
                                     "exp_registered.nii.gz (insp_registered.nii.gz with --direction insp_to_exp), "
                                     "transforms, prm_stats.json, prm_stats.csv, "
                                     "prm_scatter.png, prm_overlay.png.")
    p.add_argument("--insp", required=True, help="inspiratory CT in HU (NIfTI, NRRD or a DICOM folder)")
    p.add_argument("--exp", required=True, help="expiratory CT in HU")
    p.add_argument("--lung-mask", help="lung mask (or labels 1 right, 2 left) on the reference grid; "
                                       "replaces the automatic lung mask")
    p.add_argument("--lobes", help="lobe label map on the reference grid")
    p.add_argument("--lobe-convention", default="project",
                   help="labels of --lobes: project (1 RUL..6 LLL), totalsegmentator, totalsegmentator1, lungmask, "
                        "cip, yacta, imbio, tustison (default project)")
    p.add_argument("--no-registration", action="store_true", help="the scans are already aligned on one grid")
    p.add_argument("--direction", choices=("exp_to_insp", "insp_to_exp"), default="exp_to_insp",
                   help="exp_to_insp (default; PRM on the inspiratory grid) or insp_to_exp (Galban style, "
                        "PRM on the expiratory grid; masks then belong to the expiratory CT)")
    p.add_argument("--threads", type=int, default=2, help="registration threads (default 2)")
    p.add_argument("--registration-quality", choices=("fast", "accurate"), default="fast",
                   help="registration recipe: fast (default; SyN on a 3 mm grid, 40x20x0: iterations at 12 and 6 mm) "
                        "or accurate (SyN on a 2 mm grid, 40x20x10 at 8, 4 and 2 mm; several times slower)")
    p.add_argument("--registration-spacing", type=float, default=None,
                   help="registration grid spacing in mm (default from --registration-quality: fast 3, "
                        "accurate 2; finer scans are downsampled)")
    p.add_argument("--syn-iterations", type=_int_tuple, default=None,
                   help="SyN iterations per level, coarse to fine (default from --registration-quality: "
                        "fast 40x20x0, accurate 40x20x10)")
    p.add_argument("--threshold-insp", type=float, default=-950.0, help="inspiratory threshold HU (default -950)")
    p.add_argument("--threshold-exp", type=float, default=-856.0, help="expiratory threshold HU (default -856)")
    p.add_argument("--valid-range", type=float, nargs=2, default=(-1000.0, -500.0), metavar=("LOW", "HIGH"),
                   help="valid HU range on both scans (default -1000 -500)")
    p.add_argument("--median", type=int, default=3, choices=(0, 3, 5),
                   help="median pre-filter size, 0 = off (default 3: 3x3x3)")
    p.add_argument("--median-2d", action="store_true", help="median filter per slice (3x3) instead of 3D")
    p.add_argument("--no-figures", action="store_true", help="skip prm_scatter.png and prm_overlay.png")
    p.add_argument("--out", required=True, help="output folder")
    add_common_options(p)
    p.set_defaults(handler=run_ct)


def _add_evaluate(verbs) -> None:
    p = verbs.add_parser("evaluate", help="agreement of a PRM map with a reference (one case or a cohort)",
                         description="One case: --pred P --ref R [--lobes L]: Dice per class and %PRM differences. "
                                     "Cohort: --cohort CSV (columns patient, pred, ref[, lobes]; PRM maps or "
                                     "prm_stats.json files): Pearson r per class at patient and lobe level, "
                                     "Bland-Altman, figure (Xu et al. Fig. 3).")
    p.add_argument("--pred", help="predicted PRM label map")
    p.add_argument("--ref", help="reference PRM label map (same grid)")
    p.add_argument("--lobes", help="lobe label map on the same grid")
    p.add_argument("--lobe-convention", default="project", help="labels of --lobes (see 'prm ct --help')")
    p.add_argument("--cohort", help="cohort CSV (columns patient, pred, ref[, lobes])")
    p.add_argument("--out", help="output folder for evaluation.json (+ prm_agreement.png for a cohort); "
                                 "without it the JSON is printed")
    add_common_options(p)
    p.set_defaults(handler=run_evaluate)


def _add_phantom(verbs) -> None:
    from ..cli_common import positive_float

    p = verbs.add_parser(
        "phantom", help="write an inspiratory/expiratory CT phantom pair with known PRM and lobes",
        description="Write a paired chest CT phantom (HU) with known truth: OUT/insp.nii.gz, OUT/exp.nii.gz "
                    "(deformed by breathing), OUT/lung_mask.nii.gz (1 right, 2 left), OUT/lobes.nii.gz (1-6), "
                    "OUT/truth_prm.nii.gz (0-4) on the inspiratory grid and OUT/truth.json (%PRM per lung and "
                    "lobe). Then: perfusionai prm ct --insp OUT/insp.nii.gz --exp OUT/exp.nii.gz "
                    "--lobes OUT/lobes.nii.gz --out prm/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--spacing", type=positive_float, default=3.5, help="voxel size in mm (3.5; the anatomy "
                   "scales with the field of view, so the grid is resized to keep it)")
    p.add_argument("--noise-hu", type=float, default=15.0, help="Gaussian noise sigma in HU (15; low dose 40-80)")
    p.add_argument("--emphysema-scale", type=positive_float, default=1.0,
                   help="radius multiplier of the emphysema regions (1; 2 = severe)")
    p.add_argument("--seed", type=int, default=0)
    add_common_options(p)
    p.set_defaults(handler=run_phantom)


def run_phantom(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import atomic_output_dir, write_json, write_volume
    from ..phantoms.prm import make_prm_phantom, truth_statistics

    if args.noise_hu < 0:
        raise input_error("--noise-hu", f"must be >= 0, got {args.noise_hu}")
    # the default grid (56, 80, 96) at 3.5 mm; other spacings keep the same field of view
    shape = tuple(max(8, int(round(n * 3.5 / args.spacing))) for n in (56, 80, 96))
    phantom = make_prm_phantom(shape=shape, spacing_mm=args.spacing, noise_hu=args.noise_hu,
                               emphysema_scale=args.emphysema_scale, seed=args.seed)
    g = phantom.geometry
    with atomic_output_dir(args.out) as stage:
        write_volume(phantom.insp.array, g, stage / "insp.nii.gz")
        write_volume(phantom.exp.array, phantom.exp.geometry, stage / "exp.nii.gz")
        write_volume(phantom.lung_labels.astype(np.uint8), g, stage / "lung_mask.nii.gz")
        write_volume(phantom.lobes.astype(np.uint8), g, stage / "lobes.nii.gz")
        write_volume(phantom.truth_prm.astype(np.uint8), g, stage / "truth_prm.nii.gz")
        write_json({"truth": truth_statistics(phantom), "parameters": phantom.parameters,
                    "labels": {"prm": "0 outside/vessels, 1 normal, 2 fSAD, 3 emphysema, 4 uncategorized",
                               "lungs": "1 right, 2 left", "lobes": "ARCHITECTURE.md numbering 1-6"}},
                   stage / "truth.json")
    print(f"PRM phantom written to {args.out} ({shape[2]}x{shape[1]}x{shape[0]} voxels of {args.spacing:g} mm)")
    return 0


def register(subparsers) -> None:
    """Add the ``prm`` domain and its verbs to the top-level parser."""
    domain = subparsers.add_parser("prm", help="parametric response mapping of the lungs (CT; MRI prediction)")
    verbs = domain.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True
    _add_ct(verbs)
    _add_evaluate(verbs)
    _add_phantom(verbs)
    from .cli_mri import register_verbs as register_mri_verbs  # train, predict, ablation (PRM from MRI)

    register_mri_verbs(verbs)


def run_ct(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import atomic_output_dir, read_labels, read_volume
    from .classification import ClassificationOptions
    from ..lung import import_lobes
    from .pipeline import PRMOptions, compute_prm, write_prm_outputs
    from .registration import registration_recipe

    if args.threads < 1:
        raise input_error("--threads", f"must be at least 1, got {args.threads}")
    insp = read_volume(args.insp, "inspiratory CT")
    exp = read_volume(args.exp, "expiratory CT")
    reference = insp if args.direction == "exp_to_insp" or args.no_registration else exp
    lung = None
    if args.lung_mask:
        # binary masks and right/left labels (1/2) are both accepted
        lung = read_labels(args.lung_mask, reference.geometry, "lung mask")
        if not np.any(lung):
            raise input_error(args.lung_mask, "lung mask is empty (no nonzero voxel)")
    lobes = None
    if args.lobes:
        lobes = import_lobes(read_labels(args.lobes, reference.geometry, "lobe map"), args.lobe_convention,
                             args.lobes)
    options = PRMOptions(
        classification=ClassificationOptions(args.threshold_insp, args.threshold_exp, args.valid_range[0],
                                             args.valid_range[1], args.median, args.median_2d),
        registration=registration_recipe(args.registration_quality, direction=args.direction, threads=args.threads,
                                         **({} if args.registration_spacing is None
                                            else {"registration_spacing_mm": args.registration_spacing}),
                                         **({} if args.syn_iterations is None
                                            else {"syn_iterations": tuple(args.syn_iterations)})),
        register=not args.no_registration,
    )
    progress = make_progress(args, "prm ct")
    result = compute_prm(insp, exp, lung, lobes, options, progress)
    try:
        with atomic_output_dir(args.out) as stage:
            write_prm_outputs(result, stage, figures=not args.no_figures)
    finally:
        result.cleanup()
    whole = result.stats["whole_lung"]
    dice_after = result.info.get("lung_dice_after_registration")
    print(f"whole lung: normal {whole['normal']:.1f} %, fSAD {whole['fsad']:.1f} %, emphysema {whole['emph']:.1f} %, "
          f"uncategorized {whole['uncategorized']:.1f} %, excluded {whole['excluded']:.1f} % "
          f"({whole['voxels']} voxels)" + (f"; lung Dice after registration {dice_after:.3f}" if dice_after else ""))
    print(f"outputs written to {args.out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..io import atomic_output_dir, read_labels, read_volume, write_json
    from .evaluation import evaluate_case, evaluate_cohort, read_cohort_csv
    from ..lung import import_lobes

    if args.cohort:
        if args.pred or args.ref:
            raise input_error("--cohort", "give either --cohort or --pred/--ref, not both")
        rows = read_cohort_csv(args.cohort)
        if args.out:
            with atomic_output_dir(args.out) as stage:
                result = evaluate_cohort(rows, args.lobe_convention, figure=stage / "prm_agreement.png")
                write_json(result, stage / "evaluation.json")
        else:
            result = evaluate_cohort(rows, args.lobe_convention)
    else:
        if not (args.pred and args.ref):
            raise input_error("--pred", "give --pred and --ref (or --cohort CSV)")
        pred = read_volume(args.pred, "predicted PRM map")
        ref_labels = read_labels(args.ref, pred.geometry, "reference PRM map")
        lobes = None
        if args.lobes:
            lobes = import_lobes(read_labels(args.lobes, pred.geometry, "lobe map"), args.lobe_convention, args.lobes)
        result = evaluate_case(pred.array, ref_labels, lobes)
        if args.out:
            with atomic_output_dir(args.out) as stage:
                write_json(result, stage / "evaluation.json")
    if args.out:
        print(f"evaluation written to {Path(args.out) / 'evaluation.json'}")
    else:
        print(json.dumps(result, indent=2, default=float))
    return 0
