"""Leave-one-patient-out evaluation of the learners and the training-set-size study.

Per held-out patient and T2-IVIM-Kurtosis metric (``f, dv, t2v, dt, k, t2t`` over the ROI voxels),
the relative error E = (prediction - reference) / reference is summarised as BI = median(E) and
DI = IQR(E) (:func:`perfusionai.metrics.bias_dispersion_index`, Macarro et al. 2025). The
reference is the T2-IVIM-Kurtosis fit of the measured advanced protocol, as in the paper.
Aggregates are means over patients and metrics of |BI| and DI (lower is better).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..metrics import bias_dispersion_index
from ..progress import as_progress
from . import learners as L

EVAL_METRICS = L.M2M_OUTPUTS


def score_patient(predicted: dict, features: L.PatientFeatures, metrics: Sequence[str] = EVAL_METRICS) -> dict:
    """metric -> (BI, DI) of one patient's predicted maps against its reference maps."""
    return {m: bias_dispersion_index(predicted[m], features.y_maps[m]) for m in metrics}


def leave_one_patient_out(
    patients: Sequence[L.PatientFeatures],
    algorithms: Sequence[str] = L.ALGORITHMS,
    strategies: Sequence[str] = L.STRATEGIES,
    n_train: Optional[int] = None,
    seed: int = 0,
    progress=None,
) -> list[dict]:
    """Train on all patients but one, predict the one left out, for every patient.

    ``n_train`` (training-set-size study) keeps only that many training patients, drawn at random
    (seeded) from the others for each held-out patient. Returns rows
    ``{patient, strategy, algorithm, n_train, metric, bi, di}``.
    """
    progress = as_progress(progress)
    rng = np.random.default_rng(seed)
    rows = []
    n = len(patients)
    total = n * len(algorithms) * len(strategies)
    step = 0
    for held in range(n):
        others = [p for i, p in enumerate(patients) if i != held]
        if n_train is not None and n_train < len(others):
            pick = np.sort(rng.choice(len(others), size=n_train, replace=False))
            others = [others[i] for i in pick]
        for strategy in strategies:
            for algorithm in algorithms:
                progress(step / total, f"{patients[held].name}: {strategy} {algorithm}")
                model = L.train(others, algorithm, strategy, seed=seed)
                predicted = L.predict(model, patients[held])
                for metric, (bi, di) in score_patient(predicted, patients[held]).items():
                    rows.append({"patient": patients[held].name, "strategy": strategy, "algorithm": algorithm,
                                 "n_train": len(others), "metric": metric, "bi": bi, "di": di})
                step += 1
    progress(1.0, "evaluation done")
    return rows


def population_baseline(patients: Sequence[L.PatientFeatures]) -> list[dict]:
    """The no-learning reference: each held-out patient's maps predicted as the median reference value
    of the other patients (one constant per metric). Rows as :func:`leave_one_patient_out`, with
    ``strategy`` "baseline" and ``algorithm`` "population median"."""
    rows = []
    for held, patient in enumerate(patients):
        others = [p for i, p in enumerate(patients) if i != held]
        for metric in EVAL_METRICS:
            constant = float(np.median(np.concatenate([p.y_maps[metric] for p in others])))
            bi, di = bias_dispersion_index(np.full_like(patient.y_maps[metric], constant), patient.y_maps[metric])
            rows.append({"patient": patient.name, "strategy": "baseline", "algorithm": "population median",
                         "n_train": len(others), "metric": metric, "bi": bi, "di": di})
    return rows


def summarise(rows: Sequence[dict], by: Sequence[str] = ("strategy", "algorithm")) -> list[dict]:
    """Mean |BI| and mean DI over the rows grouped by ``by`` (each group also gets ``n_rows``)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, rs in groups.items():
        out.append(dict(zip(by, key)) | {"mean_abs_bi": float(np.mean([abs(r["bi"]) for r in rs])),
                                         "mean_di": float(np.mean([r["di"] for r in rs])), "n_rows": len(rs)})
    return out


def training_size_study(
    patients: Sequence[L.PatientFeatures],
    sizes: Sequence[int],
    algorithms: Sequence[str] = ("lr",),
    strategy: str = "signal-to-signal",
    seed: int = 0,
    progress=None,
) -> list[dict]:
    """BI/DI against the number of training patients (leave-one-out, random subsets per size).

    Returns the rows of :func:`leave_one_patient_out` for every size in ``sizes``.
    """
    progress = as_progress(progress)
    rows = []
    for i, size in enumerate(sizes):
        rows += leave_one_patient_out(patients, algorithms, (strategy,), n_train=size, seed=seed + i,
                                      progress=progress.sub(i / len(sizes), (i + 1) / len(sizes)))
    return rows


def write_rows_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Rows of dictionaries as CSV (columns from the first row)."""
    path = Path(path)
    with open(path, "w", newline="") as fh:
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


def plot_bi_di(summary: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Scatter of mean |BI| against mean DI per strategy/algorithm (the paper's Fig. 2a)."""
    from ..report.figures import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    markers = {"signal-to-signal": "o", "maps-to-maps": "s"}
    for s in summary:
        ax.scatter(s["mean_abs_bi"], s["mean_di"], marker=markers.get(s.get("strategy"), "o"), s=40)
        short = {"signal-to-signal": "s2s", "maps-to-maps": "m2m"}.get(s.get("strategy"), s.get("strategy", ""))
        ax.annotate(f"{s.get('algorithm', '')} ({short})",
                    (s["mean_abs_bi"], s["mean_di"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean |BI| (median relative error)")
    ax.set_ylabel("mean DI (IQR of relative error)")
    ax.set_title(title or "leave-one-patient-out BI/DI (o signal-to-signal, s maps-to-maps)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training_size(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Mean |BI| and DI against the number of training patients, one line per algorithm."""
    from ..report.figures import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.4))
    for algorithm in sorted({r["algorithm"] for r in rows}):
        summary = sorted(summarise([r for r in rows if r["algorithm"] == algorithm], by=("n_train",)),
                         key=lambda s: s["n_train"])
        sizes = [s["n_train"] for s in summary]
        name = L.ALGORITHM_NAMES.get(algorithm, algorithm)  # "linear regression", not the key "lr"
        axes[0].plot(sizes, [s["mean_abs_bi"] for s in summary], "o-", label=name)
        axes[1].plot(sizes, [s["mean_di"] for s in summary], "o-", label=name)
    axes[0].set_ylabel("mean |BI|")
    axes[1].set_ylabel("mean DI")
    for ax in axes:
        ax.set_xlabel("training patients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "training-set size (signal-to-signal)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate_cohort(cohort_csv: str | Path, out_dir: str | Path, algorithms: Sequence[str] = ("lr", "etr", "mlnn"),
                    strategies: Sequence[str] = L.STRATEGIES, sizes: Optional[Sequence[int]] = None, seed: int = 0,
                    progress=None) -> dict:
    """``perfusionai dr evaluate``: leave-one-patient-out BI/DI of learners on a cohort CSV.

    Writes ``lopo.csv``, ``summary.csv``, ``summary.json``, ``bi_di.png`` and, with ``sizes``
    (numbers of training patients, signal-to-signal), ``training_size.csv`` and
    ``training_size.png`` into ``out_dir`` atomically; returns the summary.json content.
    """
    from .. import __version__
    from ..errors import ParameterError, input_error
    from ..io import atomic_output_dir, write_json
    from .pipeline import read_cohort

    progress = as_progress(progress)
    patients = read_cohort(cohort_csv, progress.sub(0.0, 0.3))
    if len(patients) < 2:
        raise input_error(cohort_csv, "leave-one-patient-out needs at least 2 patients")
    if sizes and max(sizes) > len(patients) - 1:
        raise ParameterError("sizes", f"at most {len(patients) - 1} training patients exist in a leave-one-out split")
    stop = 0.75 if sizes else 1.0
    rows = leave_one_patient_out(patients, algorithms, strategies, seed=seed, progress=progress.sub(0.3, stop))
    summary = summarise(rows + population_baseline(patients))
    size_rows = None
    if sizes:
        size_rows = training_size_study(patients, sizes, algorithms, seed=seed, progress=progress.sub(stop, 1.0))
    result = {"perfusionai": __version__, "command": "dr evaluate", "cohort": str(cohort_csv),
              "patients": [p.name for p in patients], "metrics": list(EVAL_METRICS),
              "definition": "BI = median, DI = IQR of (prediction - reference)/reference over ROI voxels; "
                            "reference = T2-IVIM-Kurtosis fit of the advanced protocol",
              "summary": summary}
    with atomic_output_dir(out_dir) as stage:
        write_rows_csv(rows, stage / "lopo.csv")
        write_rows_csv(summary, stage / "summary.csv")
        plot_bi_di(summary, stage / "bi_di.png")
        if size_rows:
            write_rows_csv(size_rows, stage / "training_size.csv")
            plot_training_size(size_rows, stage / "training_size.png")
            result["training_size"] = summarise(size_rows, by=("algorithm", "n_train"))
        write_json(result, stage / "summary.json")
    return result
