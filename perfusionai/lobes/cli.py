"""``perfusionai lobes export-nnunet | train | segment | evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_common import add_common_options, make_progress



def _fold(text: str) -> str:
    """argparse type of an nnU-Net fold: 0-4 or 'all'."""
    if text == "all" or text in ("0", "1", "2", "3", "4"):
        return text
    raise argparse.ArgumentTypeError(f"a fold is 0-4 or 'all', got {text!r}")

def register(subparsers) -> None:
    lobes = subparsers.add_parser("lobes", help="lung-lobe segmentation of VIBE MRI with nnU-Net v2")
    verbs = lobes.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True

    p = verbs.add_parser("export-nnunet", help="cohort CSV (image + 6-lobe labels) -> nnU-Net raw dataset")
    p.add_argument("--cohort", required=True, help="cohort CSV (columns subject, split, vibe, lobes, ...)")
    p.add_argument("--out", required=True, help="folder that receives DatasetXXX_Name/")
    p.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id 1-999 (default 501)")
    p.add_argument("--name", default="Lobes", help="dataset name (default Lobes)")
    p.add_argument("--image-column", default="vibe", help="CSV column of the image (default vibe)")
    p.add_argument("--label-column", default="lobes", help="CSV column of the lobe labels (default lobes)")
    p.add_argument("--lobe-convention", default="project",
                   help="label convention of the lobe files (project, yacta, cip, lungmask, totalsegmentator, "
                        "imbio, tustison; default project)")
    add_common_options(p)
    p.set_defaults(handler=run_export)

    p = verbs.add_parser("train", help="nnU-Net planning, preprocessing and training; writes a model folder or zip")
    p.add_argument("--dataset", required=True, help="nnU-Net raw dataset folder DatasetXXX_Name")
    p.add_argument("--out", required=True, help="model folder, or a path ending in .zip")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--fold", default="0", type=_fold,
                   help="fold 0-4 or 'all' (fold 0 = the cohort's train/val split; 1-4 = nnU-Net's own 5-fold split)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs (nnU-Net default 1000)")
    p.add_argument("--iterations-per-epoch", type=int, default=250, help="iterations per epoch (default 250)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("K", "J", "I"), default=None,
                   help="override nnU-Net's planned patch size")
    p.add_argument("--batch-size", type=int, default=None, help="override nnU-Net's planned batch size")
    p.add_argument("--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("--trained-on-phantoms", action="store_true",
                   help="label the model 'trained on phantoms' (automatic for phantom cohorts)")
    add_common_options(p)
    p.set_defaults(handler=run_train)

    p = verbs.add_parser("segment", help="segment the lobes of a VIBE volume with an nnU-Net lobe model")
    p.add_argument("--image", required=True, help="VIBE volume (NIfTI/NRRD/DICOM folder)")
    p.add_argument("--model", required=True, help="nnU-Net lobe model folder or zip")
    p.add_argument("--out", required=True, help="output folder: lobes.nii.gz, lung_mask.nii.gz, summary.json")
    p.add_argument("--folds", nargs="+", default=["0"], type=_fold, help="folds to ensemble: 0-4 or 'all' (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--mirroring", action="store_true", help="nnU-Net mirroring test-time augmentation (slower)")
    add_common_options(p)
    p.set_defaults(handler=run_segment)

    p = verbs.add_parser("evaluate", help="Dice of predicted lobes against a reference (whole lung and each lobe)")
    p.add_argument("--pred", required=True, help="predicted lobes (project labels 1-6)")
    p.add_argument("--ref", required=True, help="reference lobes")
    p.add_argument("--ref-convention", default="project", help="label convention of the reference (default project)")
    merge = p.add_mutually_exclusive_group()
    merge.add_argument("--merge-lingula", dest="merge", action="store_true", default=None,
                       help="merge the lingula into the left upper lobe (default: when the reference has none)")
    merge.add_argument("--no-merge-lingula", dest="merge", action="store_false")
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


def run_export(args: argparse.Namespace) -> int:
    from .nnunet import export_nnunet_dataset

    cases = _cohort_cases(args.cohort, args.image_column, args.label_column)
    from ..phantoms import is_phantom_cohort

    phantom = is_phantom_cohort(args.cohort)
    folder = export_nnunet_dataset(cases, args.out, args.dataset_id, args.name, args.lobe_convention,
                                   phantom=phantom, progress=make_progress(args, "export"))
    print(folder)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from .nnunet import NNUNetTrainingConfig, train_nnunet

    fold = args.fold if args.fold == "all" else int(args.fold)
    from ..phantoms import is_phantom_cohort

    phantom = args.trained_on_phantoms or is_phantom_cohort(args.dataset)
    cfg = NNUNetTrainingConfig(configuration=args.configuration, fold=fold, epochs=args.epochs,
                               iterations_per_epoch=args.iterations_per_epoch,
                               val_iterations_per_epoch=max(1, min(50, args.iterations_per_epoch // 5)),
                               patch_size=tuple(args.patch_size) if args.patch_size else None,
                               batch_size=args.batch_size, device=args.device, trained_on_phantoms=phantom)
    out = train_nnunet(args.dataset, args.out, cfg, progress=make_progress(args, "nnU-Net"))
    print(out)
    return 0


def run_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import atomic_output_dir, write_json, write_volume
    from .nnunet import segment_lobes

    folds = [f if f == "all" else int(f) for f in args.folds]
    seg = segment_lobes(args.image, args.model, folds, args.device, use_mirroring=args.mirroring,
                        progress=make_progress(args, "lobes"))
    with atomic_output_dir(args.out) as stage:
        write_volume(seg.lobes, seg.geometry, stage / "lobes.nii.gz", np.uint8)
        write_volume(seg.lung_labels, seg.geometry, stage / "lung_mask.nii.gz", np.uint8)
        counts = {str(k): int((seg.lobes == k).sum()) for k in range(1, 7)}
        write_json({"image": str(args.image), "model": seg.model, "folds": [str(f) for f in folds],
                    "voxels_per_lobe": counts, "seconds": round(seg.seconds, 2)}, stage / "summary.json")
    print(f"lobes written to {Path(args.out) / 'lobes.nii.gz'} ({seg.model})")
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
