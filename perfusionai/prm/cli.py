"""``perfusionai prm <verb>``: CT parametric response mapping, its evaluation, and PRM from MRI.

Verbs: ``ct`` (insp/exp CT -> PRM map, stats, figures; :class:`perfusionai.prm.PRMCTJob`),
``evaluate`` (one case or a cohort CSV), ``phantom`` (a CT pair with known PRM, or with
``--mri-cohort`` an MRI-PRM cohort with ``cohort.csv``); the MRI verbs (``train``, ``predict``,
``ablation``) live in :mod:`perfusionai.prm.cli_mri`. Handlers are thin: they build the job or call
one library function, print one line, and map the core's override names to flags.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

from ..cli_common import add_common_options, make_progress, positive_float, positive_int
from ..errors import PerfusionAIError, input_error
from ..lung import LOBE_CONVENTIONS
from .jobs import PRMCTJob

DESCRIPTION = ("Parametric response mapping of the lungs: classify every lung voxel of a co-registered "
               "inspiratory/expiratory CT pair as normal, functional small-airways disease (fSAD), emphysema "
               "or uncategorized (Galban 2012) and report %PRM per lung and lobe (ct, evaluate, phantom); "
               "predict PRM from inspiratory MRI with a trained multi-sequence network (train, predict, "
               "ablation; Xu et al.).")


@contextmanager
def overrides_as_flags(job_class):
    """Rewrite a guard's override (a field name such as ``allow_swapped``) as the verb's flag."""
    from .pipeline import GuardError

    try:
        yield
    except GuardError as exc:
        raise PerfusionAIError(f"{exc.problem}; if this is right, pass {job_class.flag_of(exc.override)}") from None


def _add_ct(verbs) -> None:
    d = PRMCTJob()
    p = verbs.add_parser("ct", help="PRM from inspiratory and expiratory CT (HU)",
                         description="Register the expiratory CT to the inspiratory CT (ANTs SyN, lungs masked), "
                                     "classify every lung voxel (normal, fSAD, emphysema, uncategorized; Galban 2012) "
                                     "and report %PRM per lung and lobe. Outputs: prm.nii.gz (inspiratory grid), "
                                     "exp_registered.nii.gz (insp_registered.nii.gz with --direction insp_to_exp), "
                                     "lungs.nii.gz, transforms, prm_stats.json, prm_stats.csv, "
                                     "prm_scatter.png, prm_overlay.png. Refused: scans not in HU (--allow-non-hu), "
                                     "scans given the wrong way round (--allow-swapped).")
    p.add_argument("--insp", required=True, help="inspiratory CT in HU (NIfTI, NRRD or a DICOM folder)")
    p.add_argument("--exp", required=True, help="expiratory CT in HU")
    p.add_argument("--lung-mask", help="lung mask (or labels 1 right, 2 left) on the reference grid; "
                                       "replaces the automatic lung mask")
    p.add_argument("--lobes", help="lobe label map on the reference grid")
    p.add_argument("--lobe-convention", default=d.lobe_convention,
                   help="labels of --lobes: " + ", ".join(LOBE_CONVENTIONS) + " (project: 1 RUL .. 6 LLL)")
    p.add_argument("--no-registration", action="store_true", help="the scans are already aligned on one grid")
    p.add_argument("--direction", choices=("exp_to_insp", "insp_to_exp"), default=d.direction,
                   help="exp_to_insp (PRM on the inspiratory grid) or insp_to_exp (Galban style, "
                        "PRM on the expiratory grid; masks then belong to the expiratory CT)")
    p.add_argument("--threads", type=positive_int, default=d.threads, help="registration threads")
    p.add_argument("--registration-quality", choices=("fast", "accurate"), default=d.registration_quality,
                   help="registration recipe: fast (SyN on a 3 mm grid, 40x20x0: iterations at 12 and 6 mm) "
                        "or accurate (SyN on a 2 mm grid, 40x20x10 at 8, 4 and 2 mm; several times slower)")
    p.add_argument("--registration-spacing", type=positive_float, default=None, metavar="MM",
                   help="registration grid spacing in mm (default from --registration-quality: fast 3, "
                        "accurate 2; finer scans are downsampled)")
    p.add_argument("--syn-iterations", default=None, metavar="NxNxN",
                   help="SyN iterations per level, coarse to fine, e.g. 40x20x10 (default from "
                        "--registration-quality: fast 40x20x0, accurate 40x20x10)")
    p.add_argument("--threshold-insp", type=float, default=d.threshold_insp, metavar="HU",
                   help="inspiratory threshold: at or below it a voxel is emphysema-like")
    p.add_argument("--threshold-exp", type=float, default=d.threshold_exp, metavar="HU",
                   help="expiratory threshold: at or below it a voxel is air-trapped")
    p.add_argument("--valid-range", type=float, nargs=2, default=d.valid_range, metavar=("LOW", "HIGH"),
                   help="valid HU range on both scans (voxels outside are excluded)")
    p.add_argument("--median-size", type=int, default=d.median, choices=(0, 3, 5), dest="median",
                   help="median pre-filter size, 0 = off (3: 3x3x3)")
    p.add_argument("--median", type=int, choices=(0, 3, 5), dest="median", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old name, kept for one release
    p.add_argument("--median-2d", action="store_true", help="median filter per slice (3x3) instead of 3D")
    p.add_argument("--no-figures", action="store_true", help="skip prm_scatter.png and prm_overlay.png")
    p.add_argument("--allow-swapped", action="store_true",
                   help="run even when the inspiratory lungs are smaller and denser than the expiratory ones "
                        "(refused by default: the scans look swapped)")
    p.add_argument("--allow-non-hu", action="store_true",
                   help="run even when a scan does not look like a CT in Hounsfield units (refused by default)")
    p.add_argument("--out", required=True, help="output folder (must not hold the inputs under output names)")
    add_common_options(p)
    p.set_defaults(handler=run_ct, job_class=PRMCTJob)


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
    p = verbs.add_parser(
        "phantom", help="write a CT phantom pair with known PRM and lobes (or an MRI-PRM cohort)",
        description="Write a paired chest CT phantom (HU) with known truth: OUT/insp.nii.gz, OUT/exp.nii.gz "
                    "(deformed by breathing), OUT/lung_mask.nii.gz (1 right, 2 left), OUT/lobes.nii.gz (1-6), "
                    "OUT/truth_prm.nii.gz (0-4) on the inspiratory grid and OUT/truth.json (%PRM per lung and "
                    "lobe). Then: perfusionai prm ct --insp OUT/insp.nii.gz --exp OUT/exp.nii.gz "
                    "--lobes OUT/lobes.nii.gz --out prm/. With --mri-cohort: an MRI-PRM phantom cohort "
                    "(VIBE, post-contrast VIBE, IRmax, PBF, lung mask, lobes and reference CT PRM per subject) "
                    "with OUT/cohort.csv, which prm train, prm predict and prm ablation accept as written.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mri-cohort", action="store_true",
                   help="write an MRI-PRM cohort (subject folders and cohort.csv) instead of a CT pair")
    p.add_argument("--subjects", type=positive_int, default=12,
                   help="--mri-cohort: number of subjects (split 60/14/30 into train/val/test)")
    p.add_argument("--spacing", type=positive_float, default=3.5, metavar="MM",
                   help="CT pair: voxel size in mm (the anatomy scales with the field of view, so the grid "
                        "is resized to keep it)")
    p.add_argument("--noise-hu", type=float, default=15.0, help="CT pair: Gaussian noise sigma in HU (low dose 40-80)")
    p.add_argument("--emphysema-scale", type=positive_float, default=1.0,
                   help="CT pair: radius multiplier of the emphysema regions (2 = severe)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same phantom)")
    add_common_options(p)
    p.set_defaults(handler=run_phantom)


def register(subparsers) -> None:
    """Add the ``prm`` domain and its verbs to the top-level parser."""
    domain = subparsers.add_parser("prm", help="parametric response mapping of the lungs (CT; MRI prediction)",
                                   description=DESCRIPTION)
    verbs = domain.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True
    _add_ct(verbs)
    _add_evaluate(verbs)
    _add_phantom(verbs)
    from .cli_mri import register_verbs as register_mri_verbs  # train, predict, ablation (PRM from MRI)

    register_mri_verbs(verbs)


def run_ct(args: argparse.Namespace) -> int:
    job = PRMCTJob.from_namespace(args)
    with overrides_as_flags(PRMCTJob):
        fit = job.run(make_progress(args, "prm ct"))
    whole = fit.stats["whole_lung"]
    dice_after = fit.info.get("lung_dice_after_registration")
    print(f"whole lung: normal {whole['normal']:.1f} %, fSAD {whole['fsad']:.1f} %, emphysema {whole['emph']:.1f} %, "
          f"uncategorized {whole['uncategorized']:.1f} %, excluded {whole['excluded']:.1f} % "
          f"({whole['voxels']} voxels, {whole['volume_ml']:.0f} mL)"
          + (f"; lung Dice after registration {dice_after:.3f}" if dice_after else ""))
    print(f"outputs written to {job.out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_files

    if args.cohort and (args.pred or args.ref):
        raise input_error("--cohort", "give either --cohort or --pred/--ref, not both")
    if not args.cohort and not (args.pred and args.ref):
        raise input_error("--pred", "give --pred and --ref (or --cohort CSV)")
    result = evaluate_files(pred=args.pred, ref=args.ref, lobes=args.lobes, cohort=args.cohort,
                            lobe_convention=args.lobe_convention, out=args.out)
    if args.out:
        print(f"evaluation written to {Path(args.out) / 'evaluation.json'}")
    else:
        print(json.dumps(result, indent=2, default=float))
    return 0


def run_phantom(args: argparse.Namespace) -> int:
    from ..phantoms.prm import write_prm_phantom

    if args.noise_hu < 0:
        raise input_error("--noise-hu", f"must be >= 0, got {args.noise_hu}")
    if args.mri_cohort:
        from ..phantoms.prm_mri import write_mri_cohort

        csv_path = write_mri_cohort(args.out, n_subjects=args.subjects, seed=args.seed)
        print(f"MRI-PRM phantom cohort ({args.subjects} subjects, trained-on-phantoms marker) written to {csv_path}")
        return 0
    shape = write_prm_phantom(args.out, spacing_mm=args.spacing, noise_hu=args.noise_hu,
                              emphysema_scale=args.emphysema_scale, seed=args.seed)
    print(f"PRM phantom written to {args.out} ({shape[2]}x{shape[1]}x{shape[0]} voxels of {args.spacing:g} mm)")
    return 0
