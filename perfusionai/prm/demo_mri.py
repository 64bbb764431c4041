""""PRM from MRI" part of the PRM demo section: the multi-sequence network trained on phantoms during the demo.

A small MRI phantom cohort (:mod:`perfusionai.phantoms.prm_mri`) is split train/val/test, the
network is trained with :func:`perfusionai.prm.mri_training.train_prm_network` (the shared
``perfusionai.nn`` loop) on a small grid under a wall-clock cap, and the held-out phantoms are
predicted with :func:`perfusionai.prm.mri_predict.predict_prm_mri`. Written under
``out_dir/prm_mri``:

* ``<subject>/predicted_prm.nii.gz``, ``reference_prm.nii.gz``, ``lung_mask.nii.gz`` and the four inputs
  ``vibe``, ``post_vibe``, ``irmax``, ``pbf`` ``.nii.gz`` per held-out subject (``[k, j, i]`` on the
  phantom's MRI grid);
* ``mri_prm_table.csv``: whole-lung %PRM (normal, fSAD, emphysema; percent of the valid lung voxels,
  :func:`perfusionai.prm.stats.prm_statistics`) predicted and reference, Dice(abnormal) over the
  reference's valid lung voxels, per held-out subject; the HTML table shows the same numbers;
* ``mri_ablation.csv``: the same model with all four inputs and with VIBE + post-VIBE only;
* ``model/``: the trained model (safetensors + model.json, labelled trained on phantoms);
* ``mri_demo.json``: settings, timings, training history.

Figures (in ``out_dir``): ``prm_mri_overlay.png``, predicted vs reference PRM over the VIBE in the
standard PRM colours.
"""

from __future__ import annotations

import csv
import html
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..progress import ProgressCallback, as_progress
from ..report.html import fmt, paragraph, table_html

#: Network grid ``(k, j, i)`` of the demo (the phantom's MRI grid is 16x28x32; the lungs fit inside).
DEMO_MRI_SHAPE = (12, 20, 28)
DEMO_MRI_SUBJECTS = 16
#: The demo trains a fixed number of epochs without a wall-clock limit (None), so its numbers do not
#: depend on the machine's load; a limit (s) may be passed, and the report says when it was reached.
DEMO_MRI_TRAIN_SECONDS = None
DEMO_MRI_EPOCHS = 6
TRAINED_LABEL = "trained on phantoms during this demo"
TABLE_COLUMNS = ("subject", "pred_normal", "ref_normal", "pred_fsad", "ref_fsad", "pred_emph", "ref_emph",
                 "dice_abnormal")
ALL_FOUR = ("vibe", "post_vibe", "irmax", "pbf")
STRUCTURAL = ("vibe", "post_vibe")


def _epochs(n) -> str:
    n = int(n)
    return f"{n} epoch" + ("" if n == 1 else "s")


def _overlay_montage(subjects: list, out_path: Path, n_slices: int = 3) -> Path:
    """Rows: per subject the predicted then the reference PRM over the VIBE (axial slices, standard
    PRM colours of :data:`perfusionai.labels.PRM_LABELS`).

    ``subjects`` holds ``(name, vibe, predicted, reference, lung)`` with ``[k, j, i]`` arrays.
    """
    from matplotlib.colors import ListedColormap

    from ..labels import PRM_LABELS
    from ..report.figures import _plt, display_slice, pick_slices

    plt = _plt()
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*PRM_LABELS[v].rgb, 1.0) for v in (1, 2, 3, 4)])
    n_rows = 2 * len(subjects)
    fig, axes = plt.subplots(n_rows, n_slices, figsize=(2.4 * n_slices + 0.6, 2.0 * n_rows), squeeze=False)
    for s, (name, vibe, pred, ref, lung) in enumerate(subjects):
        slices = pick_slices(lung, n_slices, lung.shape[0])
        vmax = float(np.percentile(vibe, 99.5)) or 1.0
        for r, (label, prm) in enumerate((("predicted", pred), ("reference (CT)", ref))):
            row = 2 * s + r
            for col in range(n_slices):
                ax = axes[row, col]
                ax.set_xticks([])
                ax.set_yticks([])
                if col >= len(slices):
                    ax.axis("off")
                    continue
                k = slices[col]
                ax.imshow(display_slice(vibe, k), cmap="gray", vmin=0.0, vmax=vmax, interpolation="nearest")
                shown = np.where(display_slice(lung, k) != 0, display_slice(prm, k), 0)
                ax.imshow(np.ma.masked_equal(shown, 0), cmap=cmap, vmin=0, vmax=4, alpha=0.75,
                          interpolation="nearest")
                if row == 0:
                    ax.set_title(f"slice k={k}", fontsize=8)
                if col == 0:
                    ax.set_ylabel(f"{name}\n{label}", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=PRM_LABELS[v].rgb, ec="k") for v in (1, 2, 3, 4)]
    fig.legend(handles, [PRM_LABELS[v].name for v in (1, 2, 3, 4)], loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"PRM from MRI on held-out phantoms: predicted vs reference\n(network {TRAINED_LABEL})",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def run_mri_demo(out_dir: Path, progress: Optional[ProgressCallback] = None, n_subjects: int = DEMO_MRI_SUBJECTS,
                 train_seconds: Optional[float] = DEMO_MRI_TRAIN_SECONDS, epochs: int = DEMO_MRI_EPOCHS,
                 shape: tuple = DEMO_MRI_SHAPE, seed: int = 0, n_montage: int = 3) -> tuple[str, list[Path]]:
    """Train the multi-sequence MRI PRM network on phantoms and report it on held-out phantoms.

    Parameters
    ----------
    out_dir
        Folder for the figures; data files go to ``out_dir/prm_mri``.
    n_subjects
        Phantom cohort size (split 60/14/30 train/val/test, at least one of each).
    train_seconds
        Wall-clock cap of the training loop (s; None: none, the demo's default).
    epochs
        Maximum number of epochs.
    shape
        Network grid ``(k, j, i)``.

    Returns
    -------
    (html, images)
        HTML fragment for the PRM report section and the PNG paths.
    """
    from ..io import write_volume
    from ..phantoms.prm_mri import cohort_splits, make_prm_mri_cohort, write_cohort
    from .mri_evaluation import ablation, case_metrics, combination_name
    from .mri_network import SEQUENCE_NAMES
    from .mri_predict import predict_prm_mri
    from .mri_training import PRMTrainingConfig, case_from_phantom, save_prm_model, train_prm_network

    prog = as_progress(progress)
    out = Path(out_dir)
    data = out / "prm_mri"
    data.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    t0 = time.perf_counter()

    prog(0.0, "MRI phantom cohort")
    phantoms = make_prm_mri_cohort(n_subjects, seed=seed)
    splits = cohort_splits(len(phantoms), seed=seed)
    # kept with cohort.csv, so that 'prm train' / 'prm ablation' can be tried on the demo's own cohort
    cohort_csv = write_cohort(phantoms, data / "cohort", splits)
    cases = [case_from_phantom(p, s) for p, s in zip(phantoms, splits)]
    train = [c for c in cases if c.split == "train"]
    val = [c for c in cases if c.split == "val"]
    test = [c for c in cases if c.split == "test"]
    timings["phantoms"] = time.perf_counter() - t0

    t = time.perf_counter()
    # settings of the (slow) accuracy test (3x3x3 kernels, small grid, lr 3e-3) under a wall-clock cap
    cfg = PRMTrainingConfig(shape=tuple(shape), epochs=int(epochs), batch_size=2, learning_rate=3e-3, patience=None,
                            kernel_size=3, device="cpu",
                            max_seconds=None if train_seconds is None else float(train_seconds), seed=seed)
    model, card, history = train_prm_network(
        train, val, cfg, progress=prog.sub(0.15, 0.8), trained_on_phantoms=True,
        training_data=f"{len(train)} training and {len(val)} validation MRI phantoms, {TRAINED_LABEL}")
    save_prm_model(data / "model", model, card)
    timings["training"] = time.perf_counter() - t

    t = time.perf_counter()
    prog(0.8, "predicting held-out MRI phantoms")
    rows, montage = [], []
    for case in test:
        pred = predict_prm_mri({s: case.sequences[s] for s in ALL_FOUR}, case.lung_labels, model, card, device="cpu")
        m = case_metrics(pred.labels, case.prm, case.lung_labels, case.lobes)
        rows.append({"subject": case.subject, **{f"pred_{c}": m["pred"][c] for c in ("normal", "fsad", "emph")},
                     **{f"ref_{c}": m["ref"][c] for c in ("normal", "fsad", "emph")},
                     "dice_abnormal": m["dice_abnormal"]})
        lung = (np.asarray(case.lung_labels) != 0).astype(np.uint8)
        sub = data / case.subject
        write_volume(pred.labels, case.geometry, sub / "predicted_prm.nii.gz", np.uint8)
        write_volume(case.prm, case.geometry, sub / "reference_prm.nii.gz", np.uint8)
        write_volume(lung, case.geometry, sub / "lung_mask.nii.gz", np.uint8)
        for s in ALL_FOUR:
            write_volume(case.sequences[s], case.geometry, sub / f"{s}.nii.gz", np.float32)
        if len(montage) < n_montage:
            montage.append((case.subject, case.sequences["vibe"], pred.labels, case.prm, lung))
    with (data / "mri_prm_table.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(TABLE_COLUMNS))
        writer.writeheader()
        writer.writerows({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    timings["prediction"] = time.perf_counter() - t

    t = time.perf_counter()
    prog(0.88, "ablation: all four inputs vs VIBE + post-VIBE")
    # the paper's Table-1 protocol: one trained model, inputs withheld at inference
    abl = ablation(test, model, card, combinations=(ALL_FOUR, STRUCTURAL), device="cpu")
    with (data / "mri_ablation.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["inputs", "n", "dice_abnormal_mean", "dice_abnormal_sd",
                                                "r_emph", "r_fsad"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in abl)
    timings["ablation"] = time.perf_counter() - t

    prog(0.95, "PRM from MRI figures")
    t = time.perf_counter()
    images = [_overlay_montage(montage, out / "prm_mri_overlay.png")] if montage else []

    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    hist = card["history"]
    from ..io import write_json

    write_json({"label": TRAINED_LABEL, "subjects": {"train": [c.subject for c in train],
                                                     "val": [c.subject for c in val],
                                                     "test": [c.subject for c in test]},
                "training": card["training"], "history": hist, "table": rows, "ablation": abl,
                "timings_s": timings}, data / "mri_demo.json")

    stopped = (f" (stopped early by the time limit of {fmt(float(train_seconds or 0))} s)"
               if hist.get("stopped_by_time") else "")
    body = "<hr>" + f"<h3>PRM from MRI ({html.escape(TRAINED_LABEL)})</h3>"
    body += paragraph(
        f"Multi-sequence network (VIBE, post-contrast VIBE, IRmax, PBF -> PRM; Xu et al.), {TRAINED_LABEL}: "
        f"{len(phantoms)} MRI phantoms derived from the CT PRM phantom (reference PRM from the co-registered CT "
        f"pair), split {len(train)} train / {len(val)} validation / {len(test)} held out. Small CPU setting: "
        f"{shape[0]}x{shape[1]}x{shape[2]} grid, 3x3x3 kernels, batch 2, Adam 3e-3, "
        f"{_epochs(hist.get('epochs_run', 0))} in {fmt(float(card['training']['seconds']))} s"
        f"{stopped}; "
        f"best validation loss "
        f"{fmt(float(hist.get('best_loss', float('nan'))))} at epoch {int(hist.get('best_epoch', 0)) + 1}. "
        "The numbers below are for held-out phantoms only and say nothing about patients. The cohort is kept "
        "with its cohort.csv: "
        f"'perfusionai prm train --cohort {html.escape(cohort_csv.relative_to(out.parent).as_posix())} "
        "--out prm_model/' "
        "retrains on it (paths relative to this report's folder).")
    table_rows = [[r["subject"]] + [f"{r[f'pred_{c}']:.1f} / {r[f'ref_{c}']:.1f}" for c in ("normal", "fsad", "emph")]
                  + [f"{r['dice_abnormal']:.3f}"] for r in rows]
    body += table_html(["held-out subject", "% normal (predicted / reference)", "% fSAD", "% emphysema",
                        "Dice(abnormal)"], table_rows,
                       caption=f"PRM from MRI, {TRAINED_LABEL}: whole-lung %PRM and Dice(abnormal = fSAD or "
                               "emphysema) per held-out phantom")
    abl_rows = [[r["inputs"] if r["inputs"] != "All 4" else
                 "All 4 (" + ", ".join(SEQUENCE_NAMES[s] for s in ALL_FOUR) + ")", r["n"],
                 f"{r['dice_abnormal_mean']:.3f} ± {r['dice_abnormal_sd']:.3f}",
                 "n/a" if not np.isfinite(r["r_emph"]) else f"{r['r_emph']:.2f}",
                 "n/a" if not np.isfinite(r["r_fsad"]) else f"{r['r_fsad']:.2f}"] for r in abl]
    body += table_html(["inputs", "n", "Dice(abnormal) mean ± SD", "r %emph", "r %fSAD"], abl_rows,
                       caption=f"Ablation ({TRAINED_LABEL}): the same model with all four inputs and with "
                               f"{combination_name(STRUCTURAL)} only (IRmax and PBF withheld)")
    body += table_html(["MRI stage", "seconds"], [[k.replace("_", " "), float(v)] for k, v in timings.items()],
                       caption="PRM from MRI: time per stage")
    prog(1.0, "PRM from MRI done")
    return body, images
