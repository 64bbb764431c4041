"""MRI verbs of the ``prm`` domain: ``perfusionai prm train | predict | ablation``.

Registered by :func:`register_verbs` from ``perfusionai/prm/cli.py`` (the CT verbs' module).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli_common import add_common_options, make_progress, positive_float, positive_int


def register_verbs(verbs) -> None:
    """Add ``train``, ``predict`` and ``ablation`` to the ``prm`` domain's verb subparsers."""
    p = verbs.add_parser("train", help="train the multi-sequence MRI -> PRM network on a cohort CSV")
    p.add_argument("--cohort", required=True,
                   help="CSV: subject, split (train/val/test), vibe, post_vibe, irmax, pbf (any subset), lung_mask, "
                        "lobes, prm (reference CT PRM on the VIBE grid)")
    p.add_argument("--out", required=True, help="model folder (or .zip): weights.safetensors + model.json")
    p.add_argument("--epochs", type=positive_int, default=200, help="maximum epochs (paper 200)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="batch size (paper 8)")
    p.add_argument("--learning-rate", type=positive_float, default=1e-4, help="Adam learning rate (paper 1e-4)")
    p.add_argument("--patience", type=positive_int, default=20, help="early-stopping patience in epochs")
    p.add_argument("--shape", type=positive_int, nargs=3, metavar=("K", "J", "I"), default=[60, 256, 256],
                   help="network grid every case is cropped/padded to (paper 60 256 256)")
    p.add_argument("--kernel-size", type=positive_int, default=5, help="convolution kernel size (paper 5)")
    p.add_argument("--sequences", nargs="+", choices=("vibe", "post_vibe", "irmax", "pbf"), default=None,
                   help="train with these sequences only (default: all present)")
    p.add_argument("--input-dropout", type=float, default=0.3, help="random input dropout probability")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=positive_float, default=None, help="stop after this much training time")
    p.add_argument("--trained-on-phantoms", action="store_true",
                   help="label the model 'trained on phantoms' (automatic for phantom cohorts)")
    add_common_options(p)
    p.set_defaults(handler=run_train)

    p = verbs.add_parser("predict", help="predict PRM from inspiratory MRI (any subset of the four sequences)")
    p.add_argument("--vibe", help="VIBE volume")
    p.add_argument("--post-vibe", help="post-contrast VIBE")
    p.add_argument("--irmax", help="IRmax map")
    p.add_argument("--pbf", help="PBF map (mL/100 mL/min)")
    p.add_argument("--lung-mask", default=None,
                   help="lung mask or lobe map on the same grid (nonzero = lung); default: from --lobe-model")
    p.add_argument("--lobes", default=None, help="lobes 1-6 for per-lobe statistics (e.g. from 'lobes segment')")
    p.add_argument("--lobe-model", default=None,
                   help="nnU-Net lobe model (folder or zip): segment the lobes of --vibe first and use them as "
                        "lung mask and lobes (Xu et al. Fig. 1); writes lobes.nii.gz too")
    p.add_argument("--model", required=True, help="MRI -> PRM model folder or zip")
    p.add_argument("--reference", default=None, help="CT-derived PRM on the same grid, for Dice and %%PRM comparison")
    p.add_argument("--out", required=True, help="output folder: prm.nii.gz, prm_stats.json/.csv, summary.json")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_common_options(p)
    p.set_defaults(handler=run_predict)

    p = verbs.add_parser("ablation", help="paper evaluation and Table-1 ablation over input combinations")
    p.add_argument("--cohort", required=True, help="cohort CSV with reference PRM")
    p.add_argument("--model", required=True, help="MRI -> PRM model folder or zip")
    p.add_argument("--split", default="test", help="cohort split to evaluate (default test; 'all' for every row)")
    p.add_argument("--out", required=True,
                   help="output folder: ablation.csv, ablation.txt, evaluation.json, per_subject.csv, figures")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_common_options(p)
    p.set_defaults(handler=run_ablation)


def _load_split(cohort: str, split: str, need_prm: bool = True):
    from ..errors import input_error
    from .mri_training import load_case, read_cohort

    rows = read_cohort(cohort, need_prm=need_prm)
    chosen = [r for r in rows if split == "all" or r["split"] == split]
    if not chosen:
        raise input_error(cohort, f"no subject in split '{split}'")
    return [load_case(r) for r in chosen]


def run_train(args: argparse.Namespace) -> int:
    from .mri_training import PRMTrainingConfig, is_phantom_cohort, load_case, read_cohort, save_prm_model, train_prm_network

    progress = make_progress(args, "PRM network")
    rows = read_cohort(args.cohort)
    train = [load_case(r) for r in rows if r["split"] == "train"]
    val = [load_case(r) for r in rows if r["split"] == "val"]
    cfg = PRMTrainingConfig(shape=tuple(args.shape), epochs=args.epochs, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, patience=args.patience, kernel_size=args.kernel_size,
                            input_dropout=args.input_dropout,
                            sequences=tuple(args.sequences) if args.sequences else None, seed=args.seed,
                            device=args.device, max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    phantom = bool(args.trained_on_phantoms or is_phantom_cohort(args.cohort))
    model, card, history = train_prm_network(train, val, cfg, progress, trained_on_phantoms=phantom,
                                             training_data=f"cohort {Path(args.cohort).name}: {len(train)} train, "
                                                           f"{len(val)} validation subjects"
                                                           + (" (phantoms)" if phantom else ""))
    save_prm_model(args.out, model, card)
    print(f"model written to {args.out} (trained with {', '.join(card['inputs']['trained_with'])}; "
          f"best epoch {history['best_epoch'] + 1} of {history['epochs_run']}"
          + ("; trained on phantoms" if phantom else "") + ")")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import atomic_output_dir, read_labels, read_volume, write_json, write_volume
    from .mri_evaluation import case_metrics
    from .mri_predict import predict_prm_mri
    from .mri_training import load_prm_model
    from ..lung import lung_labels_of
    from .stats import prm_statistics, write_stats_csv

    from ..errors import input_error
    from ..progress import as_progress

    progress = as_progress(make_progress(args, "PRM from MRI"))
    segmented = None
    if args.lung_mask is None and args.lobe_model is None:
        raise input_error("--lung-mask", "give a lung mask (--lung-mask) or a lobe model (--lobe-model)")
    if args.lobe_model is not None:
        if not args.vibe:
            raise input_error("--lobe-model", "lobes are segmented on VIBE: give --vibe as well")
        from ..lobes.nnunet import segment_lobes

        segmented = segment_lobes(args.vibe, args.lobe_model, device=args.device, progress=progress.sub(0.0, 0.5))
        progress = progress.sub(0.5, 1.0)
    if args.lung_mask is not None:
        lung_vol = read_volume(args.lung_mask, "lung mask")
        geometry = lung_vol.geometry
        lung_map = read_labels(args.lung_mask, geometry, "lung mask")  # binary, right/left 1/2, or lobes
        lung = lung_map > 0
    else:
        geometry = segmented.geometry
        lung_map = segmented.lobes
        lung = segmented.lobes > 0
        if not lung.any():
            raise input_error(args.vibe, "the lobe model found no lung in this VIBE")
    volumes = {}
    for key, path in (("vibe", args.vibe), ("post_vibe", args.post_vibe), ("irmax", args.irmax), ("pbf", args.pbf)):
        if path:
            vol = read_volume(path, key)
            from ..io import check_same_grid

            check_same_grid(vol.geometry, geometry, path, key)
            volumes[key] = np.asarray(vol.array, dtype=np.float32)
    lobes = read_labels(args.lobes, geometry, "lobes") if args.lobes else None
    if lobes is None and segmented is not None:
        lobes = segmented.lobes
    reference = read_labels(args.reference, geometry, "reference PRM") if args.reference else None
    model, card = load_prm_model(args.model)
    result = predict_prm_mri(volumes, lung, model, card, device=args.device, progress=progress)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    # right (1) / left (2): from the lobes when there are any, else the mask's own labels or its two lungs
    sides = lung_labels_of(lung_map, geometry, lobes)
    stats = prm_statistics(result.labels, sides.astype(np.uint8), lobes, voxel_ml)
    summary = {"model": result.model, "sequences_used": result.sequences_used,
               "trained_with": card["inputs"].get("trained_with"), "voxels_outside_window": result.voxels_outside_window,
               "whole_lung": stats["whole_lung"]}
    if reference is not None:
        summary["comparison_with_reference"] = case_metrics(result.labels, reference, lung, lobes)
    with atomic_output_dir(args.out) as stage:
        write_volume(result.labels, geometry, stage / "prm.nii.gz", np.uint8)
        write_json(stats, stage / "prm_stats.json")
        write_stats_csv(stats, stage / "prm_stats.csv")
        if segmented is not None:
            write_volume(segmented.lobes, geometry, stage / "lobes.nii.gz", np.uint8)
            summary["lobe_model"] = segmented.model
        write_json(summary, stage / "summary.json")
    print(f"predicted PRM written to {Path(args.out) / 'prm.nii.gz'} ({result.model}; inputs "
          f"{', '.join(result.sequences_used)})")
    return 0


def run_ablation(args: argparse.Namespace) -> int:
    from ..io import atomic_output_dir, write_json
    from ..progress import as_progress
    from .mri_evaluation import (ablation, evaluate_cohort, evaluation_figures, format_ablation_table,
                                 write_ablation_csv)
    from .mri_training import load_prm_model

    progress = as_progress(make_progress(args, "ablation"))
    cases = _load_split(args.cohort, args.split)
    model, card = load_prm_model(args.model)
    evaluation = evaluate_cohort(cases, model, card, device=args.device, progress=progress.sub(0.0, 0.2))
    rows = ablation(cases, model, card, device=args.device, progress=progress.sub(0.2, 1.0))
    table = format_ablation_table(rows)
    with atomic_output_dir(args.out) as stage:
        write_ablation_csv(rows, stage / "ablation.csv")
        (stage / "ablation.txt").write_text(table)
        write_json({"model": card.get("architecture", {}).get("name"),
                    "trained_on_phantoms": bool(card.get("trained_on_phantoms")),
                    "subjects": evaluation.subjects, "summary": evaluation.summary}, stage / "evaluation.json")
        import csv

        rows_case = evaluation.rows()
        with (stage / "per_subject.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows_case[0]))
            writer.writeheader()
            writer.writerows(rows_case)
        evaluation_figures(evaluation, stage / "figures")
    print(table, end="")
    print(json.dumps({"dice_abnormal": evaluation.summary["dice_abnormal"],
                      "r_emph_patient": evaluation.summary["patient"]["emph"]["pearson_r"]}))
    return 0
