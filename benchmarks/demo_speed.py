"""The demo's run time and the nnU-Net lobe inference's CPU recipe against its old one, in one run (issue 17).

* **Demo**: ``perfusionai demo --out TMP`` as a user runs it (a separate process), its wall-clock
  and CPU time, and each section's time as the report's "Run time" table records it. Target:
  under 3 minutes on 2 cores.
* **Lobes**: :func:`benchmarks.lobes_speed.bench_speed`: the CPU recipe (``3d_cpu``) and the old
  recipe (``3d_fullres``) on the paper's 60 x 256 x 256 VIBE grid. Target: <= 60 s on 2 cores.
* **Baseline**: one float64 GEMM (148,920 x 120) @ (120 x 120), the reference of
  ``benchmarks/dsc_speed.py``, timed in the same run, so the ratios say how far a busy machine
  stretched every number.

Run: ``.venv/bin/python benchmarks/demo_speed.py [--threads 2] [--skip-lobes] [--skip-demo]``.
Nothing here is asserted; the table is for reading.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEMO_TARGET_S = 180.0
LOBES_TARGET_S = 60.0


def gemm_seconds(repeats: int = 5) -> float:
    """Best of ``repeats`` timings of the reference GEMM."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((148_920, 120)), rng.standard_normal((120, 120))
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def run_demo(threads: int) -> dict:
    """Run the demo in its own process; wall and CPU seconds and the per-section table of its report."""
    out = Path(tempfile.mkdtemp(prefix="perfusionai-bench-demo-")) / "demo"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "perfusionai", "demo", "--out", str(out), "--progress", "none"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        if proc.returncode != 0:
            raise SystemExit(f"the demo failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        sections = report_run_times((out / "report.html").read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "sections": sections}


def report_run_times(page: str) -> list[tuple[str, float, float]]:
    """The rows of the report's "Run time" table: (section, wall s, CPU s)."""
    start = page.rfind("Run time</h2>")
    table = page[start:page.find("</table>", start)] if start >= 0 else ""
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>",
                                                                                         row, flags=re.S)]
        if len(cells) == 3:
            try:
                rows.append((cells[0], float(cells[1]), float(cells[2])))
            except ValueError:
                continue  # the header row
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP/torch threads")
    parser.add_argument("--skip-demo", action="store_true", help="leave the demo out")
    parser.add_argument("--skip-lobes", action="store_true", help="leave the nnU-Net lobe inference out")
    args = parser.parse_args(argv)

    gemm = gemm_seconds()
    rows = [("GEMM (148920 x 120) @ (120 x 120) float64 (baseline)", gemm, None, "-")]
    if not args.skip_demo:
        demo = run_demo(args.threads)
        for name, wall, _cpu in demo["sections"]:
            if name != "whole demo":
                rows.append((f"demo section: {name}", wall, None, "-"))
        rows.append(("perfusionai demo, whole (own process)", demo["wall"], DEMO_TARGET_S,
                     "pass" if demo["wall"] <= DEMO_TARGET_S else "FAIL"))
        print(f"demo CPU time {demo['cpu']:.1f} s over {demo['wall']:.1f} s wall")
    if not args.skip_lobes:
        from lobes_speed import bench_speed  # benchmarks/lobes_speed.py, beside this file

        speed = bench_speed(args.threads)
        old = speed["old"].get("end_to_end", speed["old"]["steps_total"])[0]
        cpu = speed["cpu"]["end_to_end"][0]
        rows.append(("nnU-Net lobes 60x256x256, old recipe (3d_fullres)", old, None, "-"))
        rows.append(("nnU-Net lobes 60x256x256, CPU recipe (3d_cpu)", cpu, LOBES_TARGET_S,
                     "pass" if cpu <= LOBES_TARGET_S else "FAIL"))
        print(f"lobe inference: CPU recipe {cpu:.1f} s against the old recipe {old:.1f} s "
              f"({old / max(cpu, 1e-9):.1f}x faster; old recipe's network timed on 2 tiles and scaled)")

    print(f"\n| {'measurement':58s} | seconds | x baseline | target (s) | pass |")
    print(f"|{'-' * 60}|---------|------------|------------|------|")
    for name, seconds, target, ok in rows:
        print(f"| {name:58s} | {seconds:7.2f} | {seconds / gemm:10.1f} | "
              f"{'-' if target is None else f'{target:g}':>10s} | {ok:4s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
