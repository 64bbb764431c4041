"""``perfusionai batch``: the command line of :mod:`perfusionai.batch` (cohorts on Dask)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .batch import STATUS_FILE, SUMMARY_HTML, run_batch
from .errors import PerfusionAIError


def register(subparsers) -> None:
    """Add ``perfusionai batch`` to the top-level parser."""
    batch = subparsers.add_parser(
        "batch", help="run one verb for every case of a cohort CSV, in parallel on Dask (resumable)",
        description="Run 'perfusionai <domain> <verb>' for every row of a cohort CSV on Dask distributed: "
                    "a LocalCluster on this machine by default, or an existing cluster with --scheduler. Each "
                    "case writes to OUT/<case>/; OUT/batch_status.csv is updated as cases finish, and a re-run "
                    "skips cases already done with identical inputs and options. Exit status: the number of "
                    "failed cases.",
        epilog="example: perfusionai batch --cohort cohort.csv --out runs/ --workers 2 -- dsc maps --te 0.03 "
               "--aif-auto   (cohort.csv: case,dsc,mask)")
    batch.add_argument("--cohort", required=True,
                       help="CSV with a 'case' column and one column per option of the verb (option name without "
                            "dashes, '-' as '_'); relative paths are read relative to the CSV")
    batch.add_argument("--out", required=True, help="batch folder: OUT/<case>/ per case, batch_status.csv, "
                                                     "cohort_summary.csv and cohort_summary.html")
    batch.add_argument("--workers", type=int, default=2,
                       help="worker processes of the local Dask cluster (ignored with --scheduler)")
    batch.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (a dask-jobqueue "
                            "SLURM/PBS cluster, Kubernetes, or 'dask scheduler' + 'dask worker'); its workers must "
                            "see the same paths")
    batch.add_argument("--threads-per-case", type=int, default=None,
                       help="BLAS/OpenMP/torch threads of each case (default: cores / workers on the local "
                            "cluster; on an existing cluster, each worker's cores / its concurrent tasks)")
    batch.add_argument("--case-timeout", type=float, default=None, metavar="SECONDS",
                       help="stop a case that runs longer than this and mark it failed (default: no limit)")
    batch.add_argument("--progress", choices=("bar", "none"), default="bar",
                       help="progress over cases: 'bar' draws a bar on stderr when it is a terminal and prints a "
                            "timestamped line per finished case when it is not; 'none' is silent")
    batch.add_argument("--no-progress", action="store_const", const="none", dest="progress",
                       help=argparse.SUPPRESS)  # the old name, kept for one release
    batch.add_argument("command", nargs=argparse.REMAINDER,
                       help="after '--': the domain, the verb and the options every case gets")
    batch.set_defaults(handler=_run_batch_cli)


def _run_batch_cli(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.workers < 1:
        raise PerfusionAIError("--workers: must be at least 1")
    if args.threads_per_case is not None and args.threads_per_case < 1:
        raise PerfusionAIError("--threads-per-case: must be at least 1")
    outcomes = run_batch(args.cohort, args.out, command, workers=args.workers, scheduler=args.scheduler,
                         threads_per_case=args.threads_per_case, timeout_s=args.case_timeout,
                         show_progress=args.progress != "none")
    done = sum(o.status == "done" for o in outcomes.values())
    skipped = sum(o.status == "skipped" for o in outcomes.values())
    failed = sum(o.status == "failed" for o in outcomes.values())
    print(f"{len(outcomes)} cases: {done} done, {skipped} skipped (done before), {failed} failed; "
          f"status in {Path(args.out) / STATUS_FILE}, summary in {Path(args.out) / SUMMARY_HTML}")
    return min(failed, 125)
