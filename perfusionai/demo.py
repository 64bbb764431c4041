"""``perfusionai demo``: every module on digital phantoms, one HTML report.

Each domain package may provide ``perfusionai.<domain>.demo.run_demo(out_dir, progress)``
returning a :class:`perfusionai.report.ReportSection` (or a list of them); it writes its files under
``out_dir`` (a subfolder per domain). Sections are run in :data:`DEMO_ORDER`;
a domain without a demo module is skipped. Everything shown is computed from
phantoms with known truth, and learned models in the demo are trained on
phantoms during the run (labelled as such).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from .cli_common import make_progress
from .errors import ParameterError, PerfusionAIError
from .io import atomic_output_dir
from .progress import Progress
from .report.html import ReportSection, fmt, paragraph, table_html, write_report

DEMO_ORDER = ("dsc", "prm", "ctpm", "dr")


def available_demos() -> list[str]:
    """The domains with a demo section, in report order (every domain ships one)."""
    return list(DEMO_ORDER)


def _demo_runner(domain: str):
    """``run_demo(out_dir, progress)`` of one domain, imported when its section runs."""
    if domain == "dsc":
        from .dsc.demo import run_demo as runner
    elif domain == "prm":
        from .prm.demo import run_demo as runner
    elif domain == "ctpm":
        from .ctpm.demo import run_demo as runner
    else:
        from .dr.demo import run_demo as runner
    return runner


def run_demo(out_dir: str | Path, only: Optional[Sequence[str]] = None, progress_mode: str = "bar") -> Path:
    """Run the demos and write ``out_dir/report.html``; returns the report path.

    A domain whose demo raises an unexpected error gets a section showing the
    error, and the run then fails with :class:`PerfusionAIError` after the
    report is written, so a broken module is never silently hidden.
    """
    domains = available_demos()
    if only:
        unknown = sorted(set(only) - set(domains))
        if unknown:
            raise ParameterError("only", f"no demo for {', '.join(unknown)} (available: {', '.join(domains)})")
        domains = [d for d in domains if d in only]

    class _Args:
        progress = progress_mode

    callback = make_progress(_Args(), "demo")
    progress = Progress(callback)
    sections: list[ReportSection] = []
    failures: list[str] = []
    out = Path(out_dir)
    times: list[tuple[str, float, float]] = []
    started_all, cpu_all = time.perf_counter(), time.process_time()
    with atomic_output_dir(out) as stage:
        for index, domain in enumerate(domains):
            sub = progress.sub(index / len(domains), (index + 1) / len(domains))
            start, cpu = time.perf_counter(), time.process_time()
            try:
                section = _demo_runner(domain)(stage / domain, sub)
            except PerfusionAIError:
                raise
            except Exception as exc:  # a bug in a module: show it, then fail loudly
                failures.append(domain)
                section = ReportSection(f"{domain}: FAILED",
                                        paragraph(f"{type(exc).__name__}: {exc}")
                                        + f"<pre>{traceback.format_exc()[-3000:]}</pre>")
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            parts = list(section) if isinstance(section, (list, tuple)) else [section]
            times.append((" + ".join(p.title for p in parts), wall, cpu))
            parts[-1].html_body += paragraph(f"Computed in {fmt(wall)} s ({fmt(cpu)} s of CPU time).")
            sections.extend(parts)
        progress(1.0, "report")
        total = (time.perf_counter() - started_all, time.process_time() - cpu_all)
        overview = ReportSection("Run time", paragraph(
            "Wall-clock time of each section on this machine and the CPU time of its process (every thread, so "
            "it can exceed the wall-clock time; on a machine busy with other jobs the wall-clock time grows "
            "several-fold). Every learned model in this report was trained during this run, on phantoms.")
            + table_html(["section", "wall clock [s]", "CPU [s]"],
                         [[t, w, c] for t, w, c in times] + [["whole demo", total[0], total[1]]]))
        sections.append(overview)
        # image paths point into the staging folder: make them relative before moving
        write_report(sections, stage, title="PerfusionAI demo on digital phantoms",
                     meta={"data": "digital phantoms with known truth (no patient data)"})
    if failures:
        raise PerfusionAIError(f"demo sections failed: {', '.join(failures)} (see {out / 'report.html'})")
    return out / "report.html"
