"""CT-to-perfusion section of ``perfusionai demo``: DL-CTPM trained and tested on phantoms.

Writes a small CT/SPECT phantom cohort, trains a reduced-size ARNN on it through
``perfusionai ctpm train`` (32x16x16 lung crops, channels 8-64, 3x3x3 kernels, 5 epochs: the
paper's architecture, small enough for about half a CPU minute; labelled "trained on phantoms"),
predicts unseen phantoms with ``perfusionai ctpm predict`` and scores them with
``perfusionai ctpm evaluate`` (pinned Spearman R, SSIM, Dice), next to the
paper's test-set numbers. Figures: the predicted map, the SPECT and the truth over the CT on one
colour scale with a prediction-minus-SPECT row, and every case's metrics beside the paper's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..cli import main as cli_main
from ..errors import PerfusionAIError
from ..io import read_volume, write_volume
from ..report import figures
from ..report.html import Figure, ReportSection, fmt, paragraph, table_html

PAPER_TEST = {"spearman": (0.6733, 0.1728), "ssim": (0.7635, 0.0697), "dice_high": (0.8183, 0.0752),
              "dice_low": (0.6501, 0.1061)}
TRAIN_PATIENTS = 8
TEST_SEEDS = (900, 901, 902)
#: Reduced training recipe of the demo (the paper: 128x64x64 crops, channels 16-128, 5^3 kernels, 500 epochs).
DEMO_EPOCHS = 5
DEMO_KERNEL = 3
DEMO_CROP = "32,16,16"
DEMO_CHANNELS = "8,16,32,64"


def _cli(argv: list[str]) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli_main(argv + ["--progress", "none"])
    if code != 0:
        raise PerfusionAIError(f"perfusionai {' '.join(argv[:2])} failed with exit code {code}")
    return buffer.getvalue()


def run_demo(out_dir: Path, progress=None) -> ReportSection:
    from ..phantoms.ctpm import make_ctpm_phantom, phantom_geometry, write_ctpm_cohort
    from .evaluation import summarise_cohort
    from .preprocessing import normalise_spect, resample_onto

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = (lambda f, m: progress(f, m)) if progress else (lambda f, m: None)
    geometry = phantom_geometry(spacing_mm=(4.0, 4.0, 4.0))

    report(0.0, "ctpm: phantom cohort")
    cohort = write_ctpm_cohort(out_dir / "cohort", TRAIN_PATIENTS, seed=0, geometry=geometry)
    report(0.1, "ctpm: training the ARNN on phantoms")
    model = out_dir / "model"
    trained = json.loads(_cli(["ctpm", "train", "--cohort", str(cohort), "--out", str(model),
                               "--shape", *DEMO_CROP.split(","), "--median-size", "3", "--uniform-size", "1",
                               "--channels", DEMO_CHANNELS, "--kernel-size", str(DEMO_KERNEL),
                               "--learning-rate", "3e-3",
                               "--epochs", str(DEMO_EPOCHS), "--val-fraction", "0", "--device", "cpu"]))
    card = json.loads((model / "model.json").read_text())

    rows_scores, example = [], None
    for n, seed in enumerate(TEST_SEEDS):
        report(0.7 + 0.25 * n / len(TEST_SEEDS), f"ctpm: unseen phantom {n + 1}")
        ph = make_ctpm_phantom(seed, geometry)
        case = out_dir / f"test_{seed}"
        case.mkdir(exist_ok=True)
        write_volume(ph.ct_hu, ph.geometry, case / "ct.nii.gz")
        write_volume(ph.lung_labels, ph.geometry, case / "lungs.nii.gz")
        write_volume(ph.spect, ph.spect_geometry, case / "spect.nii.gz")
        _cli(["ctpm", "predict", "--ct", str(case / "ct.nii.gz"), "--lung-mask", str(case / "lungs.nii.gz"),
              "--model", str(model), "--out", str(case / "prediction"), "--device", "cpu"])
        scores = json.loads(_cli(["ctpm", "evaluate", "--pred", str(case / "prediction" / "perfusion.nii.gz"),
                                  "--spect", str(case / "spect.nii.gz"), "--lung-mask", str(case / "lungs.nii.gz"),
                                  "--out", str(case / "evaluation.json")]))
        rows_scores.append(scores)
        if example is None:
            example = (ph, read_volume(case / "prediction" / "perfusion.nii.gz").array)

    report(0.95, "ctpm: figures")
    ph, predicted = example
    lung = ph.lung_labels > 0
    spect_on_ct = normalise_spect(resample_onto(ph.spect, ph.spect_geometry, ph.geometry), lung)
    truth = ph.perfusion / np.percentile(ph.perfusion[lung], 75)
    rows = {"pred": predicted, "spect": spect_on_ct, "truth": truth, "diff": predicted - spect_on_ct}
    labels = {"pred": "DL-CTPM prediction", "spect": "SPECT (scaled: 1 = its 75th percentile in the lung)",
              "truth": "phantom truth (same scaling)", "diff": "prediction minus SPECT"}
    montage = figures.montage_png(
        rows, out_dir / "ctpm_maps.png", background=ph.ct_hu, background_window=(-1000.0, 400.0), mask=lung,
        n_slices=4, labels=labels, scales={"pred": "perfusion", "spect": "perfusion", "truth": "perfusion",
                                           "diff": "difference"},
        ranges={"perfusion": (0.0, 1.2)}, differences=("diff",), cmaps={"perfusion": "hot"},
        units={"perfusion": "relative, 1 = lung P75", "difference": "relative"},
        title=f"Unseen phantom {TEST_SEEDS[0]}: perfusion from CT against SPECT and truth (CT underlay)")
    points = figures.metric_points_png(
        {name: [r[key] for r in rows_scores] for key, name in METRIC_NAMES.items()},
        out_dir / "ctpm_metrics.png", reference={name: PAPER_TEST[key] for key, name in METRIC_NAMES.items()},
        reference_label="paper test set (mean ± SD)", points_label=f"unseen phantoms (n = {len(rows_scores)})",
        title="DL-CTPM trained on phantoms: every unseen case against the paper's test set")

    summary = summarise_cohort(rows_scores)
    table_rows = [(name, summary[key]["mean"], summary[key]["sd"], PAPER_TEST[key][0], PAPER_TEST[key][1])
                  for key, name in METRIC_NAMES.items()]
    per_case = [(f"phantom {seed}", r["spearman"], r["ssim"], r["dice_high"], r["dice_low"])
                for seed, r in zip(TEST_SEEDS, rows_scores)]
    epochs = int(trained["epochs_run"])
    body = (paragraph(f"DL-CTPM (Ren et al. 2021), the paper's attention residual network at a reduced size, "
                      f"{trained['parameters']:,} parameters, trained on phantoms: {TRAIN_PATIENTS} phantom "
                      f"patients ({2 * TRAIN_PATIENTS} lungs) for {epochs} epoch{'s' if epochs != 1 else ''} "
                      f"(32x16x16 lung crops, channels {DEMO_CHANNELS.replace(',', '-')}, "
                      f"{DEMO_KERNEL}x{DEMO_KERNEL}x{DEMO_KERNEL} kernels; the paper: 128x64x64 crops, channels "
                      "16-128, 5x5x5 kernels, up to 500 epochs), then tested on 3 unseen phantoms. Perfusion is "
                      "relative: each map is divided by its 75th percentile in the lung, as in the paper. The "
                      "phantoms are far more regular than patients, so these numbers say nothing about "
                      "clinical accuracy. Not for clinical use.")
            + table_html(["metric", "phantom test mean", "SD", "paper test mean", "paper SD"], table_rows,
                         caption=f"Unseen phantoms (n = {len(rows_scores)}), compared on the SPECT grid")
            + table_html(["case", "Spearman R", "SSIM", "Dice high function", "Dice low function"], per_case,
                         caption="Per case"))
    images = [Figure(montage, "Prediction, SPECT and truth of one unseen phantom on one colour scale over its CT: "
                              "the predicted high- and low-perfusion regions should sit where the SPECT's are; "
                              "the difference row shows where the prediction is too high (red) or too low (blue)."),
              Figure(points, "Each dot is one unseen phantom; the bar is the paper's test-set mean ± SD: dots "
                             "at or above the bar mean the reduced model reaches the paper's numbers on phantoms.")]
    return ReportSection("CT-to-perfusion translation (DL-CTPM, trained on phantoms)", body, images)


METRIC_NAMES = {"spearman": "Spearman R", "ssim": "SSIM", "dice_high": "Dice high function",
                "dice_low": "Dice low function"}
