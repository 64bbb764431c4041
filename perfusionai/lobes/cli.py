"""``perfusionai lobes phantom | export-nnunet | train | import-model | segment | evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_common import add_common_options, make_progress, positive_int

DESCRIPTION = """Lung-lobe segmentation of inspiratory VIBE MRI with nnU-Net v2 (lobes 1 RUL, 2 RML, 3 RLL,
4 LUL, 5 lingula, 6 LLL). A cohort (phantom or your own) is exported as an nnU-Net raw dataset,
trained into a lobe model file (safetensors weights + model.json; never a pickle), and applied to
VIBE volumes. An nnU-Net model trained elsewhere is converted once with 'import-model'."""


def _fold(text: str) -> str:
    """argparse type of an nnU-Net fold: 0-4 or 'all'."""
    if text == "all" or text in ("0", "1", "2", "3", "4"):
        return text
    raise argparse.ArgumentTypeError(f"a fold is 0-4 or 'all', got {text!r}")


def _step(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def register(subparsers) -> None:
    from .job import LobeSegmentJob

    lobes = subparsers.add_parser("lobes", help="lung-lobe segmentation of VIBE MRI with nnU-Net v2",
                                  description=DESCRIPTION)
    verbs = lobes.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True

    p = verbs.add_parser("phantom", help="write a phantom lobe cohort (VIBE + lobes, cohort.csv) to try every verb")
    p.add_argument("--out", required=True, help="cohort folder: cohort.csv and one folder per subject")
    p.add_argument("--subjects", type=positive_int, default=6, help="number of phantom subjects (at least 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the phantoms")
    add_common_options(p)
    p.set_defaults(handler=run_phantom)

    p = verbs.add_parser("export-nnunet", help="cohort CSV (image + 6-lobe labels) -> nnU-Net raw dataset")
    p.add_argument("--cohort", required=True, help="cohort CSV (columns subject, split, vibe, lobes, ...)")
    p.add_argument("--out", required=True, help="folder that receives DatasetXXX_Name/")
    p.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id 1-999")
    p.add_argument("--name", default="Lobes", help="dataset name (letters, digits, '-', '_')")
    p.add_argument("--image-column", default="vibe", help="CSV column of the image")
    p.add_argument("--label-column", default="lobes", help="CSV column of the lobe labels")
    p.add_argument("--lobe-convention", default="project",
                   help="label convention of the lobe files (project, yacta, cip, lungmask, totalsegmentator, "
                        "imbio, tustison)")
    add_common_options(p)
    p.set_defaults(handler=run_export)

    p = verbs.add_parser("train", help="nnU-Net planning, preprocessing and training; writes a lobe model file")
    p.add_argument("--dataset", required=True, help="nnU-Net raw dataset folder DatasetXXX_Name")
    p.add_argument("--out", required=True, help="lobe model folder, or a path ending in .zip")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--fold", default="0", type=_fold,
                   help="fold 0-4 or 'all' (fold 0 = the cohort's train/val split; 1-4 = nnU-Net's own 5-fold split)")
    p.add_argument("--configuration", dest="configurations", nargs="+", default=["3d_fullres", "3d_cpu"],
                   help="nnU-Net configurations to train into the model (3d_cpu: 3d_fullres at twice the in-plane "
                        "spacing, the fast CPU recipe; 2d and others as nnU-Net plans them)")
    p.add_argument("--epochs", type=positive_int, default=1000, help="epochs per configuration (nnU-Net: 1000)")
    p.add_argument("--iterations-per-epoch", type=positive_int, default=250, help="training iterations per epoch")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("K", "J", "I"), default=None,
                   help="override nnU-Net's planned 3d_fullres patch size")
    p.add_argument("--batch-size", type=positive_int, default=None, help="override nnU-Net's planned batch size")
    p.add_argument("--trained-on-phantoms", action="store_true",
                   help="label the model 'trained on phantoms' (automatic for phantom cohorts)")
    add_common_options(p)
    p.set_defaults(handler=run_train)

    p = verbs.add_parser(
        "import-model", help="convert an nnU-Net trained model folder/zip (pickled .pth) once into a lobe model file",
        description="Convert an nnU-Net v2 trained model (fold_X/checkpoint_final.pth, plans.json, dataset.json; "
                    "a folder or nnU-Net's export zip) into a PerfusionAI lobe model file. RISK: .pth checkpoints "
                    "are Python pickles, which can run code when loaded by nnU-Net itself. This verb reads them "
                    "only with PyTorch's restricted unpickler (torch.load weights_only=True: tensors, containers, "
                    "numbers, strings) and refuses any checkpoint that asks for anything else, before any of it "
                    "runs. Only import models from sources you trust; afterwards use the converted model.")
    p.add_argument("--nnunet-folder", required=True,
                   help="nnU-Net trained model folder (Trainer__Plans__configuration), a results folder holding one "
                        "per configuration, or an nnU-Net export .zip")
    p.add_argument("--out", required=True, help="lobe model folder, or a path ending in .zip")
    p.add_argument("--folds", nargs="+", type=_fold, default=None, help="folds to import (default: every fold found)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("--orientation", default=None,
                   help="orientation code the training images had (default LPS, nnU-Net's SimpleITK reading)")
    p.add_argument("--trained-on-phantoms", action="store_true", help="label the model 'trained on phantoms'")
    add_common_options(p)
    p.set_defaults(handler=run_import)

    p = verbs.add_parser("segment", help="segment the lobes of a VIBE volume with a lobe model")
    p.add_argument("--image", required=True, help="VIBE volume (NIfTI/NRRD file or DICOM folder)")
    p.add_argument("--model", required=True, help="lobe model folder or .zip (from 'lobes train' or 'import-model')")
    p.add_argument("--out", required=True, help="output folder: lobes.nii.gz, lung_mask.nii.gz, summary.json")
    p.add_argument("--configuration", default="auto",
                   help="auto = 3d_cpu on CPU when the model has it (fast recipe), else 3d_fullres; give 3d_fullres "
                        "for the full-resolution recipe")
    p.add_argument("--folds", nargs="+", default=["0"], type=_fold, help="folds to ensemble: 0-4 or 'all'")
    p.add_argument("--tile-step-size", type=_step, default=0.5,
                   help="sliding-window step as a fraction of the patch, (0, 1]; larger = fewer tiles")
    p.add_argument("--mirroring", action="store_true", help="nnU-Net mirroring test-time augmentation (slower)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: every core)")
    add_common_options(p)
    p.set_defaults(handler=run_segment, job_class=LobeSegmentJob)

    p = verbs.add_parser("evaluate", help="Dice of predicted lobes against a reference (whole lung and each lobe)")
    p.add_argument("--pred", required=True, help="predicted lobes (project labels 1-6)")
    p.add_argument("--ref", required=True, help="reference lobes")
    p.add_argument("--ref-convention", default="project", help="label convention of the reference")
    merge = p.add_mutually_exclusive_group()
    merge.add_argument("--merge-lingula", dest="merge", action="store_true", default=None,
                       help="merge the lingula into the left upper lobe (default: when the reference has none)")
    merge.add_argument("--no-merge-lingula", dest="merge", action="store_false",
                       help="keep the lingula separate even when the reference has none")
    p.add_argument("--out", default=None, help="write the Dice JSON here as well")
    add_common_options(p)
    p.set_defaults(handler=run_evaluate)


def _cohort_cases(csv_path: str, image_column: str, label_column: str) -> list[dict]:
    import csv

    from ..errors import input_error

    path = Path(csv_path)
    if not path.is_file():
        raise input_error(path, "cohort CSV not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        rows = list(reader)
    for col in ("subject", image_column):
        if col not in header:
            raise input_error(path, f"missing column {col!r}")
    cases = []
    for n, r in enumerate(rows, start=2):
        image = (r.get(image_column) or "").strip()
        if not image:
            raise input_error(path, f"row {n}: empty {image_column}")
        lab = (r.get(label_column) or "").strip()
        resolve = lambda s: (Path(s) if Path(s).is_absolute() else path.parent / s)  # noqa: E731
        split = (r.get("split") or "train").strip().lower()
        if split not in ("train", "val", "test"):
            raise input_error(path, f"row {n}: split {split!r} is not train, val or test")
        cases.append({"subject": r["subject"].strip(), "split": split,
                      "image": resolve(image), "lobes": resolve(lab) if lab else None})
        for key in ("image", "lobes"):
            if cases[-1][key] is not None and not cases[-1][key].exists():
                raise input_error(path, f"row {n}: file {cases[-1][key]} does not exist")
    return cases


def run_phantom(args: argparse.Namespace) -> int:
    from ..errors import ParameterError
    from ..io import atomic_output_dir
    from ..phantoms.prm_mri import cohort_splits, make_prm_mri_cohort, write_cohort

    if args.subjects < 3:
        raise ParameterError("subjects", f"a lobe cohort needs at least 3 subjects (train, val, test), got "
                                         f"{args.subjects}")
    progress = make_progress(args, "phantom")
    phantoms = make_prm_mri_cohort(args.subjects, seed=args.seed)
    with atomic_output_dir(args.out) as stage:
        write_cohort(phantoms, stage, cohort_splits(args.subjects, seed=args.seed))
    if progress:
        progress(1.0, "written")
    print(f"phantom lobe cohort ({args.subjects} subjects, trained-on-phantoms marker) written to "
          f"{Path(args.out) / 'cohort.csv'}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .nnunet import export_nnunet_dataset

    cases = _cohort_cases(args.cohort, args.image_column, args.label_column)
    from ..cohorts import is_phantom_cohort

    phantom = is_phantom_cohort(args.cohort)
    folder = export_nnunet_dataset(cases, args.out, args.dataset_id, args.name, args.lobe_convention,
                                   phantom=phantom, progress=make_progress(args, "export"))
    print(folder)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from .nnunet import NNUNetTrainingConfig, train_nnunet

    fold = args.fold if args.fold == "all" else int(args.fold)
    from ..cohorts import is_phantom_cohort

    phantom = args.trained_on_phantoms or is_phantom_cohort(args.dataset)
    cfg = NNUNetTrainingConfig(configurations=tuple(args.configurations), fold=fold, epochs=args.epochs,
                               iterations_per_epoch=args.iterations_per_epoch,
                               val_iterations_per_epoch=max(1, min(50, args.iterations_per_epoch // 5)),
                               patch_size=tuple(args.patch_size) if args.patch_size else None,
                               batch_size=args.batch_size, device=args.device, trained_on_phantoms=phantom)
    out = train_nnunet(args.dataset, args.out, cfg, progress=make_progress(args, "nnU-Net"))
    print(out)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from .model import import_nnunet_folder

    out = import_nnunet_folder(args.nnunet_folder, args.out, folds=args.folds, checkpoint=args.checkpoint,
                               trained_on_phantoms=args.trained_on_phantoms, orientation=args.orientation)
    print(f"lobe model written to {out}")
    return 0


def run_segment(args: argparse.Namespace) -> int:
    job = args.job_class.from_namespace(args)
    seg = job.run(make_progress(args, "lobes"))
    print(f"lobes written to {Path(job.out) / 'lobes.nii.gz'} ({seg.model}, {seg.configuration}, "
          f"{seg.seconds:.1f} s)")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_lobe_files

    result = evaluate_lobe_files(args.pred, args.ref, args.ref_convention, merge_lingula=args.merge)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0
