"""Speed of the CT PRM pipeline per stage on phantom pairs (2 mm 128x128x80 and 1 mm 256x256x200).

Usage::

    .venv/bin/python benchmarks/prm_speed.py [--threads 2] [--sizes 2mm 1mm] [--out table.json]

Prints one row per stage and pair: seconds, and the ratio to the target (60 s for the 2 mm
pair, 300 s for the 1 mm pair, whole pipeline) and the CPU seconds of the process (ANTs runs
in-process, so its threads count; CPU seconds are steadier than wall time on a shared machine).
Registration runs with the ``--registration-quality`` recipe (default ``fast``: rigid + affine +
SyN CC on a 3 mm grid, lungs masked; ``accurate``: SyN down to a 2 mm grid) and ``--threads`` ITK
threads (the pipeline sets ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` before ANTs is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAIRS = {
    "2mm": dict(shape=(80, 128, 128), spacing_mm=2.0, target_s=60.0),
    "1mm": dict(shape=(200, 256, 256), spacing_mm=1.0, target_s=300.0),
}


def run_pair(name: str, threads: int, syn_metric: str = "CC", quality: str = "fast") -> dict:
    import numpy as np

    from perfusionai.phantoms.prm import make_prm_phantom
    from perfusionai.metrics import dice
    from perfusionai.prm import PRMModel, PRMOptions, registration_recipe

    spec = PAIRS[name]
    t0 = time.perf_counter()
    phantom = make_prm_phantom(shape=spec["shape"], spacing_mm=spec["spacing_mm"])
    t_phantom = time.perf_counter() - t0
    options = PRMOptions(registration=registration_recipe(quality, threads=threads, syn_metric=syn_metric))
    t0 = time.perf_counter()
    c0 = time.process_time()
    result = PRMModel(options).fit(phantom.insp, phantom.exp)
    cpu = time.process_time() - c0
    total = time.perf_counter() - t0
    timings = dict(result.info["timings_s"])
    timings["total_pipeline"] = total
    dice_classes = {c: dice(result.prm == v, phantom.truth_prm == v) for c, v in (("normal", 1), ("fsad", 2), ("emph", 3))}
    return {"pair": name, "shape_kji": spec["shape"], "spacing_mm": spec["spacing_mm"], "threads": threads, "registration_quality": quality,
            "phantom_build_s": t_phantom, "timings_s": timings, "target_s": spec["target_s"],
            "ratio_to_target": total / spec["target_s"], "cpu_s": cpu,
            "lung_dice_after_registration": result.info.get("lung_dice_after_registration"),
            "class_dice_vs_truth": dice_classes, "load_average_1min": os.getloadavg()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--syn-metric", default="CC", choices=("CC", "meansquares", "mattes"))
    parser.add_argument("--registration-quality", default="fast", choices=("fast", "accurate"))
    parser.add_argument("--out", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    stages = ("lung_mask", "moving_lung_mask", "registration", "classification", "statistics", "total_pipeline")
    print(f"{'pair':6s} " + " ".join(f"{s:>16s}" for s in stages) + f" {'target':>8s} {'ratio':>6s} {'cpu_s':>7s} {'load':>5s}",
          flush=True)
    rows = []
    for name in args.sizes:  # one row as soon as each pair is done
        row = run_pair(name, args.threads, args.syn_metric, args.registration_quality)
        rows.append(row)
        t = row["timings_s"]
        print(f"{row['pair']:6s} " + " ".join(f"{t.get(s, float('nan')):16.2f}" for s in stages)
              + f" {row['target_s']:8.0f} {row['ratio_to_target']:6.2f} {row['cpu_s']:7.1f} {row['load_average_1min']:5.1f}")
        print(f"       lung Dice after registration {row['lung_dice_after_registration']:.4f}; class Dice vs truth "
              + ", ".join(f"{k} {v:.3f}" for k, v in row["class_dice_vs_truth"].items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
