"""Demo section for DiffusionRelaxation: fits on a phantom with known truth and the learners on a phantom cohort.

1. One diffusion-relaxation phantom (advanced protocol, Rician noise SNR 60): T2-IVIM-Kurtosis fit of
   all 21 volumes and the clinical fit of the 5 clinical volumes; maps shown beside the truth, with
   median relative errors in the tumour.
2. A cohort of 6 phantom patients: leave-one-patient-out BI/DI of signal-to-signal and maps-to-maps
   (linear regression, extra trees, multi-layer network), and BI/DI against the number of training
   patients. Every learned model here is trained on phantoms during the run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..metrics import bias_dispersion_index
from ..progress import as_progress
from ..report.figures import grouped_bars_png, montage_png, panels_png
from ..report.html import Figure, ReportSection, fmt, paragraph, table_html
from . import evaluation as E
from . import learners as L
from . import models as M
from .pipeline import fit_series

#: Map keys in words, for figure rows and tables.
MAP_NAMES = {"s0": "S0", "f": "perfusion fraction f", "dv": "vascular diffusivity Dv", "t2v": "vascular T2",
             "dt": "tissue diffusivity Dt", "k": "kurtosis K", "t2t": "tissue T2", "adc": "ADC",
             "adc_fast": "ADC fast (b 0-100)", "adc_slow": "ADC slow (b 100-900)", "f_proxy": "F (perfusion proxy)"}
STRATEGY_NAMES = {"signal-to-signal": "signal-to-signal", "maps-to-maps": "maps-to-maps",
                  "baseline": "population baseline"}


def run_demo(out_dir: Path, progress=None) -> ReportSection:
    """Write the DiffusionRelaxation figures under ``out_dir`` and return the report section."""
    from ..phantoms.dr import make_dr_cohort, make_dr_phantom, write_dr_cohort

    progress = as_progress(progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    body = []

    progress(0.0, "diffusion-relaxation phantom")
    ph = make_dr_phantom(shape=(4, 48, 48), snr=60.0, seed=2)
    started = time.perf_counter()
    advanced, status, info = fit_series(ph.dwi, ph.protocol, "t2ivimkurtosis", mask=ph.body,
                                        progress=progress.sub(0.0, 0.25))
    seconds_adv = time.perf_counter() - started
    clinical_dwi, clinical_protocol = ph.clinical()
    clinical, _, _ = fit_series(clinical_dwi, clinical_protocol, "clinical", mask=ph.body)
    background = ph.dwi[..., 0]
    shown = ("f", "dv", "dt", "k", "t2t")
    slices = [int(k) for k in np.linspace(0, ph.body.shape[0] - 1, 4)[1:3].round()]
    maps, labels, scales, diffs, units = {}, {}, {}, [], {}
    for name in shown:
        quantity = MAP_NAMES[name]
        maps[f"{name} truth"], labels[f"{name} truth"] = ph.truth[name], f"{quantity}: truth"
        maps[f"{name} fit"], labels[f"{name} fit"] = advanced[name], f"{quantity}: fit"
        maps[f"{name} diff"] = advanced[name] - ph.truth[name]
        labels[f"{name} diff"] = f"{quantity}: fit minus truth"
        scales.update({f"{name} truth": quantity, f"{name} fit": quantity, f"{name} diff": f"{quantity} error"})
        diffs.append(f"{name} diff")
        units[quantity] = units[f"{quantity} error"] = M.MAP_UNITS[name]
    ranges = {MAP_NAMES[name]: (float(np.percentile(ph.truth[name][ph.body], 1)),
                                float(np.percentile(ph.truth[name][ph.body], 99))) for name in shown}
    images.append(Figure(
        montage_png(maps, out / "dr_advanced_maps.png", background=background, mask=ph.body, slices=slices,
                    labels=labels, scales=scales, differences=diffs, ranges=ranges, units=units,
                    title="T2-IVIM-Kurtosis fit of the 21-volume protocol against the truth (SNR 60)"),
        "Each map's truth and fit share one colour bar, so the round regions of the truth should appear in the "
        "fit with the same colours; each difference row shows the fit's noise and bias for that map."))
    clinical_keys = ("adc", "adc_fast", "adc_slow", "f_proxy")
    images.append(Figure(
        montage_png({k: clinical[k] for k in clinical_keys}, out / "dr_clinical_maps.png", background=background,
                    mask=ph.body, slices=slices, labels={k: MAP_NAMES[k] for k in clinical_keys},
                    scales={k: MAP_NAMES[k] if k == "f_proxy" else "ADC" for k in clinical_keys},
                    units={"ADC": "um2/ms", MAP_NAMES["f_proxy"]: "1"},
                    title="Clinical protocol (5 volumes): ADC maps and the perfusion proxy F"),
        "The three ADCs share one colour bar: ADC fast (b 0-100) is highest because it holds the vascular "
        "signal, which ADC slow (b 100-900) leaves out; F is a biased proxy of f, not f."))
    tumour = ph.tumour
    rows = []
    for name in M.ADVANCED_MAPS:
        bi, di = bias_dispersion_index(advanced[name][tumour], ph.truth[name][tumour])
        rows.append([MAP_NAMES[name], M.MAP_UNITS[name], float(np.median(ph.truth[name][tumour])),
                     float(np.median(advanced[name][tumour])), bi, di])
    body.append(paragraph(
        f"Phantom: {ph.dwi.shape[2]}x{ph.dwi.shape[1]}x{ph.dwi.shape[0]} voxels, 21 volumes (b 0-1600 s/mm2 at "
        "TE 80/105/120 ms), Rician noise "
        f"SNR 60. The T2-IVIM-Kurtosis fit of {info['voxels_fitted']} voxels took {fmt(seconds_adv)} s "
        f"(grid start + batched Levenberg-Marquardt); F (f_proxy) is a biased proxy of the perfusion fraction, "
        f"not f (tumour median F {fmt(float(np.median(clinical['f_proxy'][tumour])))} vs true f "
        f"{fmt(float(np.median(ph.truth['f'][tumour])))}). BI (bias index) is the median relative error against "
        "the truth, DI (dispersion index) its interquartile range."))
    body.append(table_html(["map", "units", "true median", "fitted median", "BI vs truth", "DI vs truth"], rows,
                           caption="Tumour: fit of the noisy advanced protocol against the phantom truth"))

    progress(0.3, "phantom cohort")
    cohort = make_dr_cohort(6, shape=(3, 32, 32), snr=60.0, seed=4)
    patients = [L.patient_features(p.dwi, p.protocol, p.tumour, p.name) for p in cohort]
    # kept, so that every 'dr' verb can be tried on it (cohort.csv is the input of dr train / evaluate)
    cohort_csv = write_dr_cohort(cohort, out / "dr_cohort", truth=True, clinical=True)
    kept = cohort_csv.relative_to(out.parent).as_posix()  # the report lies in out's parent folder
    body.append(paragraph(
        f"The 6-patient phantom cohort is kept with its cohort.csv: for example 'perfusionai dr train --cohort "
        f"{kept} --algorithm etr --out dr_model/' (paths relative to this report's folder)."))
    algorithms = ("lr", "etr", "mlnn")
    lopo = E.leave_one_patient_out(patients, algorithms, progress=progress.sub(0.35, 0.8))
    summary = E.summarise(lopo + E.population_baseline(patients))
    E.write_rows_csv(lopo, out / "dr_lopo.csv")
    bars = {}
    for srow in summary:
        if srow["strategy"] == "baseline":
            continue
        algo = L.ALGORITHM_NAMES.get(srow["algorithm"], srow["algorithm"])
        bars.setdefault(f"{srow['strategy']}: mean |BI|", {})[algo] = srow["mean_abs_bi"]
        bars.setdefault(f"{srow['strategy']}: mean DI", {})[algo] = srow["mean_di"]
    images.append(Figure(
        grouped_bars_png(bars, out / "dr_bi_di.png", ylabel="index (lower is better)",
                         title="Leave-one-patient-out over 6 phantom patients (learners trained on phantoms)"),
        "Bias (|BI|) and dispersion (DI) of the advanced maps predicted from the clinical protocol, per learner "
        "and strategy: lower bars are better; compare the two strategies within each learner."))
    body.append(table_html(["strategy", "learner", "mean |BI|", "mean DI"],
                           [[STRATEGY_NAMES.get(s["strategy"], s["strategy"]),
                             L.ALGORITHM_NAMES.get(s["algorithm"], s["algorithm"]) if s["strategy"] != "baseline"
                             else "population median", s["mean_abs_bi"], s["mean_di"]] for s in summary],
                           caption="Learners (trained on phantoms): mean over patients and the maps "
                                   "f, Dv, T2v, Dt, K, T2t of |BI| and DI (lower is better)"))
    sizes = (1, 2, 3, 5)
    size_rows = E.training_size_study(patients, sizes, ("lr",), progress=progress.sub(0.8, 0.98))
    by_size = sorted(E.summarise(size_rows, by=("n_train",)), key=lambda s: s["n_train"])
    learner = L.ALGORITHM_NAMES["lr"]
    images.append(Figure(
        panels_png([s["n_train"] for s in by_size],
                   {"mean |BI|": {learner: [s["mean_abs_bi"] for s in by_size]},
                    "mean DI": {learner: [s["mean_di"] for s in by_size]}},
                   out / "dr_training_size.png", xlabel="training patients",
                   title="Signal-to-signal learner against the number of training patients (trained on phantoms)"),
        "Mean |BI| and DI of the predicted maps against the number of training patients: both should fall as "
        "patients are added."))
    body.append(table_html(["training patients", "mean |BI|", "mean DI"],
                           [[s["n_train"], s["mean_abs_bi"], s["mean_di"]] for s in by_size],
                           caption="Training-set size (signal-to-signal, linear regression)"))
    summary = [s for s in summary if s["strategy"] != "baseline"]
    s2s = np.mean([s["mean_di"] for s in summary if s["strategy"] == "signal-to-signal"])
    m2m = np.mean([s["mean_di"] for s in summary if s["strategy"] == "maps-to-maps"])
    body.append(paragraph(f"Mean DI over learners: signal-to-signal {fmt(float(s2s))}, maps-to-maps {fmt(float(m2m))}. "
                          "References are the T2-IVIM-Kurtosis fits of each patient's advanced protocol, "
                          "as in Macarro et al. (2025)."))
    progress(1.0, "diffusion-relaxation done")
    return ReportSection("Diffusion-relaxation (DiffusionRelaxation)", "".join(body), images)
