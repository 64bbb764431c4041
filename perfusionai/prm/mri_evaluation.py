"""Evaluation of MRI-predicted PRM against the CT reference, as in Xu et al.

* Dice of emphysema (label 3) and of *abnormal* (emphysema or fSAD, labels 2-3), over the reference's
  valid lung voxels (labels 1-3; uncategorized and excluded voxels are left out, as in training).
* %PRM (normal, fSAD, emphysema) per patient and per lobe for prediction and reference with
  :func:`perfusionai.prm.stats.prm_statistics` (percent of the valid voxels of each region; the
  reference's uncategorized voxels stay in its denominator as in the CT statistics).
* Pearson r with p-value at patient and at lobe level, Bland-Altman mean difference and 95 % limits
  (:mod:`perfusionai.metrics`), scatter and Bland-Altman figures (:mod:`perfusionai.report.figures`).
* The Table-1 ablation: the same trained model run with each input combination.

Volumes are ``[k, j, i]`` label maps on one grid.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import input_error
from ..metrics import agreement, dice
from .mri_network import SEQUENCE_NAMES, SEQUENCES
from .stats import prm_statistics

CLASSES = ("emph", "fsad", "normal")
#: Input combinations of the paper's Table 1 (plus the two structural-only ones).
TABLE1_COMBINATIONS: tuple[tuple[str, ...], ...] = (
    ("vibe", "post_vibe", "irmax", "pbf"),
    ("vibe", "irmax", "pbf"),
    ("post_vibe", "irmax", "pbf"),
    ("vibe", "post_vibe", "irmax"),
    ("vibe", "post_vibe", "pbf"),
    ("vibe", "irmax"),
    ("irmax", "pbf"),
    ("vibe", "post_vibe"),
)


def combination_name(combo: Sequence[str]) -> str:
    return "All 4" if tuple(combo) == SEQUENCES else ", ".join(SEQUENCE_NAMES[s] for s in combo)


def case_metrics(pred: np.ndarray, reference: np.ndarray, lung: np.ndarray,
                 lobes: Optional[np.ndarray] = None) -> dict:
    """Per-subject Dice and %PRM.

    Parameters
    ----------
    pred
        Predicted PRM labels (1 normal, 2 fSAD, 3 emphysema, 0 outside).
    reference
        Reference CT PRM labels 0-4.
    lung
        Lung mask (nonzero = lung) used for the predicted statistics.
    lobes
        Optional lobes 1-6 (for the per-lobe statistics of both maps).
    """
    pred = np.asarray(pred)
    ref = np.asarray(reference)
    lung = np.asarray(lung) != 0
    valid = lung & (ref >= 1) & (ref <= 3)
    out = {
        "dice_emph": dice((pred == 3) & valid, (ref == 3) & valid),
        "dice_abnormal": dice(((pred == 2) | (pred == 3)) & valid, ((ref == 2) | (ref == 3)) & valid),
    }
    lung_labels = lung.astype(np.uint8)
    lobe_map = None if lobes is None else np.where(lung, lobes, 0)
    pred_stats = prm_statistics(np.where(lung, pred, 0), lung_labels, lobe_map)
    ref_stats = prm_statistics(np.where(lung, ref, 0), lung_labels, lobe_map)
    out["pred"] = {c: pred_stats["whole_lung"][c] for c in CLASSES}
    out["ref"] = {c: ref_stats["whole_lung"][c] for c in CLASSES}
    out["lobes"] = {}
    for lobe, values in pred_stats.get("lobes", {}).items():
        if lobe in ref_stats.get("lobes", {}) and ref_stats["lobes"][lobe]["voxels"] > 0 and values["voxels"] > 0:
            out["lobes"][lobe] = {"pred": {c: values[c] for c in CLASSES},
                                  "ref": {c: ref_stats["lobes"][lobe][c] for c in CLASSES}}
    return out


@dataclass
class CohortEvaluation:
    """Cohort summary: mean +- SD Dice, Pearson r/p and Bland-Altman per class and level."""

    subjects: list
    per_case: list
    summary: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One row per subject (for CSV)."""
        rows = []
        for sub, m in zip(self.subjects, self.per_case):
            row = {"subject": sub, "dice_emph": m["dice_emph"], "dice_abnormal": m["dice_abnormal"]}
            for c in CLASSES:
                row[f"pred_{c}"] = m["pred"][c]
                row[f"ref_{c}"] = m["ref"][c]
            rows.append(row)
        return rows


def summarise(subjects: Sequence[str], per_case: Sequence[dict]) -> CohortEvaluation:
    """Mean/SD Dice; per class: Pearson r, p and Bland-Altman (pred - ref) at patient and lobe level."""
    summary: dict = {}
    for key in ("dice_emph", "dice_abnormal"):
        values = np.array([m[key] for m in per_case], float)
        summary[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0}
    for level in ("patient", "lobe"):
        summary[level] = {}
        for c in CLASSES:
            if level == "patient":
                pred = [m["pred"][c] for m in per_case]
                ref = [m["ref"][c] for m in per_case]
            else:
                pred = [v["pred"][c] for m in per_case for v in m["lobes"].values()]
                ref = [v["ref"][c] for m in per_case for v in m["lobes"].values()]
            summary[level][c] = agreement(pred, ref)
    return CohortEvaluation(list(subjects), list(per_case), summary)


def evaluation_figures(evaluation: CohortEvaluation, out_dir: str | Path) -> list[Path]:
    """Scatter (patient and lobe level) and Bland-Altman (patient level) PNGs per class."""
    from ..report.figures import bland_altman_png, scatter_identity_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    names = {"emph": "%PRM emphysema", "fsad": "%PRM fSAD", "normal": "%PRM normal"}
    for c in CLASSES:
        pred = [m["pred"][c] for m in evaluation.per_case]
        ref = [m["ref"][c] for m in evaluation.per_case]
        s = evaluation.summary["patient"][c]
        paths.append(scatter_identity_png(ref, pred, out / f"scatter_patient_{c}.png", f"CT {names[c]}",
                                          f"MRI-predicted {names[c]}", title=f"patients r={s['pearson_r']:.2f}"))
        lp = [v["pred"][c] for m in evaluation.per_case for v in m["lobes"].values()]
        lr = [v["ref"][c] for m in evaluation.per_case for v in m["lobes"].values()]
        if len(lp) >= 2:
            sl = evaluation.summary["lobe"][c]
            paths.append(scatter_identity_png(lr, lp, out / f"scatter_lobe_{c}.png", f"CT {names[c]}",
                                              f"MRI-predicted {names[c]}", title=f"lobes r={sl['pearson_r']:.2f}"))
        if len(pred) >= 2:
            paths.append(bland_altman_png(pred, ref, out / f"bland_altman_{c}.png", label=names[c],
                                          title="predicted - CT"))
    return paths


def evaluate_cohort(cases, model, card, sequences: Optional[Sequence[str]] = None,
                    device: str = "auto", progress=None) -> CohortEvaluation:
    """Predict every case (:class:`perfusionai.prm.mri_training.MRICase` with a reference PRM) with the
    given inputs (default: every available one) and summarise."""
    from ..progress import as_progress
    from .mri_predict import predict_prm_mri

    report = as_progress(progress)
    subjects, per_case = [], []
    for n, case in enumerate(cases):
        use = [s for s in SEQUENCES if case.sequences.get(s) is not None and (sequences is None or s in sequences)]
        if not use:
            continue
        vols = {s: case.sequences[s] for s in use}
        pred = predict_prm_mri(vols, case.lung_labels, model, card, device=device)
        per_case.append(case_metrics(pred.labels, case.prm, case.lung_labels, case.lobes))
        subjects.append(case.subject)
        report((n + 1) / len(cases), f"evaluated {case.subject}")
    return summarise(subjects, per_case)


def ablation(cases, model, card, combinations: Sequence[Sequence[str]] = TABLE1_COMBINATIONS,
             device: str = "auto", progress=None) -> list[dict]:
    """Table 1: for each input combination the mean +- SD Dice (emphysema, abnormal) and the
    patient-level Pearson r (p) of %emphysema, %fSAD and %normal. Combinations using a sequence the
    model was not trained with are skipped."""
    from ..progress import as_progress

    report = as_progress(progress)
    trained = card.get("inputs", {}).get("trained_with", list(SEQUENCES))
    rows = []
    combos = [tuple(c) for c in combinations if all(s in trained for s in c)]
    for n, combo in enumerate(combos):
        ev = evaluate_cohort(cases, model, card, combo, device=device,
                             progress=report.sub(n / len(combos), (n + 1) / len(combos)))
        s = ev.summary
        row = {"inputs": combination_name(combo), "sequences": "+".join(combo), "n": len(ev.subjects),
               "dice_emph_mean": s["dice_emph"]["mean"], "dice_emph_sd": s["dice_emph"]["sd"],
               "dice_abnormal_mean": s["dice_abnormal"]["mean"], "dice_abnormal_sd": s["dice_abnormal"]["sd"]}
        for c in CLASSES:
            row[f"r_{c}"] = s["patient"][c]["pearson_r"]
            row[f"p_{c}"] = s["patient"][c]["p"]
        rows.append(row)
    return rows


ABLATION_COLUMNS = ("inputs", "sequences", "n", "dice_emph_mean", "dice_emph_sd", "dice_abnormal_mean",
                    "dice_abnormal_sd", "r_emph", "p_emph", "r_fsad", "p_fsad", "r_normal", "p_normal")


def write_ablation_csv(rows: Sequence[dict], path: str | Path) -> Path:
    p = Path(path)
    with p.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ABLATION_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return p


def format_ablation_table(rows: Sequence[dict]) -> str:
    """Plain-text Table 1 (``*`` marks p < 0.05), for the terminal and the report."""
    def r_cell(r, p):
        if not np.isfinite(r):
            return "n/a"
        return f"{r:.2f}{'*' if np.isfinite(p) and p < 0.05 else ''}"

    header = ["Model with input images", "DICE emph", "DICE abnormal", "r %emph", "r %fSAD", "r %normal"]
    body = [[row["inputs"], f"{row['dice_emph_mean']:.2f} ± {row['dice_emph_sd']:.2f}",
             f"{row['dice_abnormal_mean']:.2f} ± {row['dice_abnormal_sd']:.2f}",
             r_cell(row["r_emph"], row["p_emph"]), r_cell(row["r_fsad"], row["p_fsad"]),
             r_cell(row["r_normal"], row["p_normal"])] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in body]
    return "\n".join(lines) + "\n* p < 0.05\n"


@dataclass
class AblationResult:
    """``prm ablation``: the cohort evaluation with every input and the Table-1 rows.

    ``table`` is the plain-text Table 1; ``model`` the model label; ``trained_on_phantoms`` from its card.
    """

    rows: list
    evaluation: CohortEvaluation
    model: str
    trained_on_phantoms: bool
    table: str

    def save(self, folder: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
        """Write ``ablation.csv``, ``ablation.txt``, ``evaluation.json``, ``per_subject.csv`` and ``figures/``
        into ``folder`` atomically."""
        from ..io import write_json
        from .pipeline import _output_dir

        with _output_dir(folder, inputs) as stage:
            write_ablation_csv(self.rows, stage / "ablation.csv")
            (stage / "ablation.txt").write_text(self.table)
            write_json({"model": self.model, "trained_on_phantoms": self.trained_on_phantoms,
                        "subjects": self.evaluation.subjects, "summary": self.evaluation.summary},
                       stage / "evaluation.json")
            rows_case = self.evaluation.rows()
            with (stage / "per_subject.csv").open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows_case[0]))
                writer.writeheader()
                writer.writerows(rows_case)
            evaluation_figures(self.evaluation, stage / "figures")
        return Path(folder)


def run_ablation(cohort: str | Path, model: str | Path, split: str = "test", device: str = "auto",
                 progress=None) -> AblationResult:
    """The paper's evaluation (every input) and Table-1 ablation of a trained model on one cohort split."""
    from ..progress import as_progress
    from .mri_training import load_prm_model, load_split

    report = as_progress(progress)
    cases = load_split(cohort, split)
    net, card = load_prm_model(model)
    evaluation = evaluate_cohort(cases, net, card, device=device, progress=report.sub(0.0, 0.2))
    if not evaluation.subjects:
        raise input_error(cohort, f"no subject of split '{split}' has a sequence the model can use")
    rows = ablation(cases, net, card, device=device, progress=report.sub(0.2, 1.0))
    return AblationResult(rows, evaluation, str(card.get("architecture", {}).get("name")),
                          bool(card.get("trained_on_phantoms")), format_ablation_table(rows))
