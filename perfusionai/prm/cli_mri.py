"""MRI verbs of the ``prm`` domain: ``perfusionai prm train | predict | ablation``.

Registered by :func:`register_verbs` from ``perfusionai/prm/cli.py`` (the CT verbs' module).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli_common import add_common_options, make_progress, positive_float, positive_int
from .jobs import PRMPredictJob


def _shape_text(text: str) -> list[int]:
    """The old ``--input-shape K,J,I`` spelling (hidden alias of ``--shape K J I``)."""
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K,J,I, got {text!r}") from None
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected three positive integers K,J,I, got {text!r}")
    return values


def register_verbs(verbs) -> None:
    """Add ``train``, ``predict`` and ``ablation`` to the ``prm`` domain's verb subparsers."""
    p = verbs.add_parser("train", help="train the multi-sequence MRI -> PRM network on a cohort CSV",
                         description="Train the multi-sequence network (Xu et al.) on the train rows of a cohort "
                                     "CSV, validating on the val rows (early stopping). A cohort from "
                                     "'prm phantom --mri-cohort' is labelled 'trained on phantoms' in the model "
                                     "card. Quick try on that cohort: --shape 16 28 32 --kernel-size 3 --epochs 2.")
    p.add_argument("--cohort", required=True,
                   help="CSV: subject, split (train/val/test), vibe, post_vibe, irmax, pbf (any subset), lung_mask, "
                        "lobes, prm (reference CT PRM on the VIBE grid)")
    p.add_argument("--out", required=True, help="model folder (or .zip): weights.safetensors + model.json")
    p.add_argument("--epochs", type=positive_int, default=200, help="maximum epochs (the paper's 200)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="batch size (the paper's 8)")
    p.add_argument("--learning-rate", type=positive_float, default=1e-4, help="Adam learning rate (the paper's 1e-4)")
    p.add_argument("--lr", type=positive_float, dest="learning_rate", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the CTPM verbs' old spelling
    p.add_argument("--patience", type=positive_int, default=20, help="early-stopping patience in epochs")
    p.add_argument("--shape", type=positive_int, nargs=3, metavar=("K", "J", "I"), default=[60, 256, 256],
                   help="network grid every case is cropped/padded to (the paper's 60 256 256; a cohort from "
                        "'prm phantom --mri-cohort' is 16 28 32)")
    p.add_argument("--input-shape", type=_shape_text, dest="shape", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # old spelling K,J,I
    p.add_argument("--kernel-size", type=positive_int, default=5, help="convolution kernel size (the paper's 5)")
    p.add_argument("--sequences", nargs="+", choices=("vibe", "post_vibe", "irmax", "pbf"), default=None,
                   help="train with these sequences only (none given: every sequence present)")
    p.add_argument("--input-dropout", type=float, default=0.3, help="probability of dropping each input of a training sample (never all), so every subset is learned")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, batches, dropout)")
    p.add_argument("--max-minutes", type=positive_float, default=None, help="stop training after this many minutes (none: no time limit)")
    p.add_argument("--trained-on-phantoms", action="store_true",
                   help="label the model 'trained on phantoms' (automatic for phantom cohorts)")
    p.add_argument("--phantom-data", action="store_true", dest="trained_on_phantoms", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    add_common_options(p)
    p.set_defaults(handler=run_train)

    p = verbs.add_parser("predict", help="predict PRM from inspiratory MRI (any subset of the four sequences)",
                         description="Predict the PRM map (1 normal, 2 fSAD, 3 emphysema) of one subject from any "
                                     "subset of VIBE, post-contrast VIBE, IRmax and PBF with a model from "
                                     "'prm train'. The first sequence given is the reference grid: every other "
                                     "file must lie on it. NaN inside the lung mask is refused. Outputs: "
                                     "prm.nii.gz, prm_stats.json, prm_stats.csv, summary.json (+ lobes.nii.gz "
                                     "with --lobe-model).")
    p.add_argument("--vibe", help="inspiratory VIBE volume")
    p.add_argument("--post-vibe", help="post-contrast VIBE volume")
    p.add_argument("--irmax", help="IRmax map (maximum relative enhancement, %%)")
    p.add_argument("--pbf", help="PBF map (mL/100 mL/min)")
    p.add_argument("--lung-mask", default=None,
                   help="lung mask or lobe map on the same grid (nonzero = lung); default: from --lobe-model")
    p.add_argument("--lobes", default=None, help="lobes 1-6 for per-lobe statistics (e.g. from 'lobes segment')")
    p.add_argument("--lobe-model", default=None,
                   help="nnU-Net lobe model (folder or zip): segment the lobes of --vibe first and use them as "
                        "lung mask and lobes (Xu et al. Fig. 1); writes lobes.nii.gz too")
    p.add_argument("--model", required=True, help="MRI -> PRM model folder or zip")
    p.add_argument("--ref", default=None, dest="reference",
                   help="reference PRM (e.g. CT-derived) on the same grid, for Dice and %%PRM comparison")
    p.add_argument("--reference", dest="reference", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old name, kept for one release
    p.add_argument("--out", required=True, help="output folder: prm.nii.gz, prm_stats.json/.csv, summary.json")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    add_common_options(p)
    p.set_defaults(handler=run_predict, job_class=PRMPredictJob)

    p = verbs.add_parser("ablation", help="paper evaluation and Table-1 ablation over input combinations",
                         description="Evaluate a trained model on one split of a cohort CSV (Dice of emphysema "
                                     "and abnormal, Pearson r of %PRM at patient and lobe level, Bland-Altman) "
                                     "and rerun it with each input combination of the paper's Table 1.")
    p.add_argument("--cohort", required=True, help="cohort CSV with reference PRM")
    p.add_argument("--model", required=True, help="MRI -> PRM model folder or zip")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="cohort split to evaluate ('all' for every row)")
    p.add_argument("--out", required=True,
                   help="output folder: ablation.csv, ablation.txt, evaluation.json, per_subject.csv, figures")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    add_common_options(p)
    p.set_defaults(handler=run_ablation)


def run_train(args: argparse.Namespace) -> int:
    from .mri_training import PRMTrainingConfig, train_from_cohort

    cfg = PRMTrainingConfig(shape=tuple(args.shape), epochs=args.epochs, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, patience=args.patience, kernel_size=args.kernel_size,
                            input_dropout=args.input_dropout,
                            sequences=tuple(args.sequences) if args.sequences else None, seed=args.seed,
                            device=args.device, max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    path, card, history = train_from_cohort(args.cohort, args.out, cfg, args.trained_on_phantoms,
                                            make_progress(args, "PRM network"))
    phantom = bool(card.get("trained_on_phantoms"))
    print(f"model written to {path} (trained with {', '.join(card['inputs']['trained_with'])}; "
          f"best epoch {history['best_epoch'] + 1} of {history['epochs_run']}"
          + ("; trained on phantoms" if phantom else "") + ")")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    job = PRMPredictJob.from_namespace(args)
    result = job.run(make_progress(args, "PRM from MRI"))
    print(f"predicted PRM written to {Path(job.out) / 'prm.nii.gz'} ({result.summary['model']}; inputs "
          f"{', '.join(result.summary['sequences_used'])})")
    return 0


def run_ablation(args: argparse.Namespace) -> int:
    from .mri_evaluation import run_ablation as ablation

    result = ablation(args.cohort, args.model, split=args.split, device=args.device,
                      progress=make_progress(args, "ablation"))
    result.save(args.out, inputs=[args.cohort, args.model])
    print(result.table, end="")
    print(json.dumps({"dice_abnormal": result.evaluation.summary["dice_abnormal"],
                      "r_emph_patient": result.evaluation.summary["patient"]["emph"]["pearson_r"]}))
    return 0
