"""DSC section of ``perfusionai demo``: a brain phantom through the command-line path.

Writes the phantom (``phantom/``), runs ``perfusionai dsc maps`` on it with a
drawn AIF (the phantom's arterial mask) and with the automatic AIF, and reports
the AIF and tissue curves, map montages as colour overlays on a mid-bolus frame,
and a table of ROI medians against the phantom's truth. When the learned-DSC
module is present its section (PHAE trained on this phantom) is appended.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import time
from pathlib import Path

import numpy as np

from ..cli import main as cli_main
from ..errors import PerfusionAIError
from ..io import read_volume
from ..report import figures
from ..report.html import ReportSection, paragraph, table_html
from .maps import MAP_UNITS

MAPS = ("cbv", "cbf", "mtt", "tmax", "ttp")
UNITS = {name: MAP_UNITS[name] for name in MAPS}
REGIONS = {"grey matter": 1, "white matter": 2, "lesion (delayed, low flow)": 3, "tumour": 5}


def _run_cli(argv: list[str]) -> None:
    # the verb's "maps written to <staging folder>" line means nothing to a demo user
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(argv + ["--progress", "none"])
    if code != 0:
        raise PerfusionAIError(f"perfusionai {' '.join(argv[:2])} failed with exit code {code}")


def run_demo(out_dir: Path, progress=None) -> ReportSection:
    from ..phantoms.dsc import make_dsc_phantom

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = lambda f, m: progress(f, m) if progress else None  # noqa: E731
    report(0.0, "DSC phantom")
    # clinical tissue contrast (grey-matter signal drop ~30 %, artery ~65 %): tissue_kappa 10 with
    # kH / kappa in the analysis recovers the truth's units
    phantom = make_dsc_phantom(shape=(12, 96, 96), n_frames=60, tr=1.0, te=0.03, snr=60.0, seed=1,
                               tumour=True, lesion=True, lesion_delay_s=3.0, artery_radius=1.5,
                               discretisation="fine", tissue_kappa=10.0, aif_peak=35.0)
    phantom_dir = phantom.save(out_dir / "phantom")
    dsc = phantom_dir / "dsc.nii.gz"
    common = ["--dsc", str(dsc), "--te", str(phantom.te), "--tr", str(phantom.tr),
              "--mask", str(phantom_dir / "brain_mask.nii.gz"), "--kh", f"{phantom.analysis_kh:.9g}"]
    timings = {}
    runs = {"oSVD, drawn AIF": ["--method", "oSVD", "--aif-mask", str(phantom_dir / "aif_mask.nii.gz")],
            "oSVD, automatic AIF": ["--method", "oSVD", "--aif-auto"],
            "Tikhonov (GCV), drawn AIF": ["--method", "Tikhonov",
                                              "--aif-mask", str(phantom_dir / "aif_mask.nii.gz")]}
    folders = {}
    for n, (label, extra) in enumerate(runs.items()):
        report(0.1 + 0.5 * n / len(runs), label)
        folder = out_dir / ("maps_" + label.split(",")[0].split(" ")[0].lower() + ("_auto" if "auto" in label else ""))
        start = time.perf_counter()
        _run_cli(["dsc", "maps", *common, *extra, "--out", str(folder)])
        timings[label] = time.perf_counter() - start
        folders[label] = folder

    report(0.65, "figures")
    main = folders["oSVD, drawn AIF"]
    maps = {m: read_volume(main / f"{m}.nii.gz").array for m in MAPS}
    brain = phantom.brain_mask & phantom.tissue_mask
    bolus_frame = int(np.argmax(phantom.aif))
    background = phantom.signal[..., bolus_frame]
    images = [figures.montage_png(maps, out_dir / "dsc_maps_osvd.png", background=background, mask=brain,
                                  units=UNITS, title="oSVD maps over the mid-bolus frame (drawn AIF)")]
    truth_maps = {m: phantom.truth[m] for m in ("cbv", "cbf", "mtt", "tmax")}
    images.append(figures.montage_png(truth_maps, out_dir / "dsc_truth.png", background=background, mask=brain,
                                      units=UNITS, title="phantom truth"))
    aif_csv = np.genfromtxt(main / "aif.csv", delimiter=",", names=True)
    auto_csv = np.genfromtxt(folders["oSVD, automatic AIF"] / "aif.csv", delimiter=",", names=True)
    curves = {"AIF, drawn mask": aif_csv["aif_delta_r2star_per_s"],
              "AIF, automatic": auto_csv["aif_delta_r2star_per_s"],
              "AIF, truth": phantom.aif}
    images.append(figures.curves_png(phantom.times, curves, out_dir / "dsc_aif.png", ylabel="delta R2* [1/s]",
                                     title="Arterial input function",
                                     styles={"AIF, truth": "k--", "AIF, automatic": ":"}))
    tissue = {name: phantom.curve(lab) for name, lab in REGIONS.items() if (phantom.labels == lab).any()}
    tissue["mean in brain mask (measured)"] = aif_csv["tissue_mean_delta_r2star_per_s"]
    images.append(figures.curves_png(phantom.times, tissue, out_dir / "dsc_tissue.png", ylabel="delta R2* [1/s]",
                                     title="Tissue curves (noise-free truth per region, measured brain mean)"))

    rows = []
    for label, folder in folders.items():
        run_maps = maps if folder == main else {m: read_volume(folder / f"{m}.nii.gz").array for m in MAPS}
        for region, lab in REGIONS.items():
            roi = phantom.rois == lab
            if not roi.any():
                continue
            row = [label, region]
            for m in ("cbf", "cbv", "mtt", "tmax"):
                truth_key = {"cbv": "cbv_discrete", "mtt": "mtt_discrete"}.get(m, m) \
                    if phantom.discretisation == "inverse-crime" else m
                row += [float(np.median(phantom.truth[truth_key][roi])), float(np.nanmedian(run_maps[m][roi]))]
            rows.append(row)
    header = ["run", "region", "CBF truth", "CBF", "CBV truth", "CBV", "MTT truth", "MTT", "Tmax truth", "Tmax"]
    body = paragraph(
        f"Phantom: {phantom.signal.shape[:3]} voxels x {phantom.times.size} frames, TR {phantom.tr} s, "
        f"TE {phantom.te} s, SNR {phantom.snr:g}, {phantom.residue} residue simulated on a fine time grid, "
        f"clinical tissue contrast (tissue/blood relaxivity ratio {phantom.tissue_kappa:g}, so maps use "
        f"kH {phantom.analysis_kh:.4g} = {phantom.kh} / {phantom.tissue_kappa:g}), rho {phantom.rho}. Units: CBF mL/100 g/min, CBV mL/100 g, MTT and Tmax s. "
        "Commands run: perfusionai dsc maps with the options named in each row.")
    body += table_html(header, rows, caption="ROI medians against the phantom truth")
    body += table_html(["run", "time [s]"], [[k, v] for k, v in timings.items()], caption="Run time (2 CPU cores)")
    section = ReportSection("DSC perfusion (DSCDeconvolution)", body, images)

    try:
        learned_demo = importlib.import_module("perfusionai.dsc.learned_demo")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").endswith("learned_demo"):
            raise
    else:
        report(0.7, "learned methods")
        html, more_images, _timings = learned_demo.run_learned_demo(out_dir / "learned", phantom, progress)
        section.html_body += html
        section.images.extend(more_images)
    report(1.0, "DSC done")
    return section
