"""CT-to-perfusion section of ``perfusionai demo``: DL-CTPM trained and tested on phantoms.

Writes a small CT/SPECT phantom cohort, trains a reduced-size ARNN on it through
``perfusionai ctpm train`` (32x16x16 lung crops, channels 8-64: the paper's
architecture, small enough for a CPU minute; labelled "trained on phantoms"),
predicts unseen phantoms with ``perfusionai ctpm predict`` and scores them with
``perfusionai ctpm evaluate`` (pinned Spearman R, SSIM, Dice), next to the
paper's test-set numbers. Figures: the predicted map and the SPECT over the CT,
and box plots of the metrics (as the paper's Fig. 4 and 6).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..cli import main as cli_main
from ..errors import PerfusionAIError
from ..io import read_volume, write_volume
from ..report import figures
from ..report.html import ReportSection, paragraph, table_html

PAPER_TEST = {"spearman": (0.6733, 0.1728), "ssim": (0.7635, 0.0697), "dice_high": (0.8183, 0.0752),
              "dice_low": (0.6501, 0.1061)}
TRAIN_PATIENTS = 8
TEST_SEEDS = (900, 901, 902)


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
    from .evaluation import cohort_box_plots, summarise_cohort
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
                               "--input-shape", "32,16,16", "--median-size", "3", "--uniform-size", "1",
                               "--channels", "8,16,32,64", "--lr", "3e-3", "--epochs", "8", "--val-fraction", "0",
                               "--device", "cpu"]))
    card = json.loads((model / "model.json").read_text())

    rows, example = [], None
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
        rows.append(scores)
        if example is None:
            example = (ph, read_volume(case / "prediction" / "perfusion.nii.gz").array)

    report(0.95, "ctpm: figures")
    ph, predicted = example
    lung = ph.lung_labels > 0
    spect_on_ct = normalise_spect(resample_onto(ph.spect, ph.spect_geometry, ph.geometry), lung)
    truth = ph.perfusion / np.percentile(ph.perfusion[lung], 75)
    window = np.clip((ph.ct_hu.astype(np.float32) + 1000) / 1000, 0, 1)
    montage = figures.montage_png({"DL-CTPM": predicted, "SPECT/P75": np.clip(spect_on_ct, 0, 1.2),
                                   "truth/P75": np.clip(truth, 0, 1.2)},
                                  out_dir / "ctpm_maps.png", background=window, mask=lung, n_slices=4,
                                  ranges={"DL-CTPM": (0, 1.2), "SPECT/P75": (0, 1.2), "truth/P75": (0, 1.2)},
                                  title="Unseen phantom: predicted perfusion, SPECT and truth over the CT")
    boxes = cohort_box_plots({"phantom test": rows}, out_dir / "ctpm_boxplots.png")

    summary = summarise_cohort(rows)
    table_rows = [(name, summary[key]["mean"], summary[key]["sd"], PAPER_TEST[key][0], PAPER_TEST[key][1])
                  for key, name in (("spearman", "Spearman R"), ("ssim", "SSIM"), ("dice_high", "Dice high function"),
                                    ("dice_low", "Dice low function"))]
    per_case = [(f"phantom {seed}", r["spearman"], r["ssim"], r["dice_high"], r["dice_low"])
                for seed, r in zip(TEST_SEEDS, rows)]
    body = (paragraph(f"DL-CTPM (Ren et al. 2021) {card['architecture']['name']}, "
                      f"{trained['parameters']:,} parameters, trained on phantoms ({TRAIN_PATIENTS} patients, "
                      f"{2 * TRAIN_PATIENTS} lungs, {trained['epochs_run']} epochs, reduced 32x16x16 crops for a CPU "
                      f"demo). Not for clinical use.")
            + table_html(["metric", "phantom test mean", "SD", "paper test mean", "paper SD"], table_rows,
                         caption=f"Unseen phantoms (n = {len(rows)}), compared on the SPECT grid")
            + table_html(["case", "Spearman R", "SSIM", "Dice high", "Dice low"], per_case, caption="Per case"))
    return ReportSection("CT-to-perfusion translation (DL-CTPM, trained on phantoms)", body, [montage, boxes])
