"""Cohort batch runs on Dask: ``perfusionai batch --cohort C.csv --out DIR -- <domain> <verb> [options]``.

One row of the cohort CSV is one case: a ``case`` column (the case's name, also
its output folder ``DIR/<case>/``) and one column per option of the verb, named
as the option without dashes with ``-`` written ``_`` (``dsc``, ``aif_mask``,
``insp``, ...). An empty cell leaves the option out; a flag option (one that
takes no value, like ``--aif-auto``) is set by ``true``/``yes``/``1``. Relative
paths in the CSV are read relative to the CSV's folder. Options after ``--``
apply to every case; a CSV column overrides them.

Each case runs the ordinary command line in its own process
(``python -m perfusionai <domain> <verb> ... --out DIR/<case>``) on a Dask
``distributed`` worker, so one case that fails, or even crashes its
interpreter, never stops the others. By default the cluster is a
``LocalCluster`` of ``--workers`` processes on this machine; ``--scheduler
tcp://host:port`` sends the cases to an existing cluster instead (a
dask-jobqueue SLURM/PBS cluster, Kubernetes, or ``dask scheduler`` + ``dask
worker`` started by hand), whose workers must see the same file paths.

``DIR/batch_status.csv`` (case, status, seconds, message, output, command,
input_hash) is rewritten as each case finishes. A re-run skips every case whose
status is ``done`` and whose content hash (the exact command without its
output folder, the perfusionai version, and the bytes of every input file it
names) is unchanged, so a crashed or cancelled batch resumes where it stopped.
``DIR/cohort_summary.csv`` and ``DIR/cohort_summary.html`` list every case's
headline numbers (medians per map, %PRM per region, ...) with links to its
outputs. The exit status is the number of failed cases (0: all done), at most 125.
The command line of the batch itself is in :mod:`perfusionai.cli_batch`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import __version__
from .deps import require
from .errors import ParameterError, PerfusionAIError, input_error

STATUS_FILE = "batch_status.csv"
SUMMARY_CSV = "cohort_summary.csv"
SUMMARY_HTML = "cohort_summary.html"
STATUS_COLUMNS = ("case", "status", "seconds", "message", "output", "command", "input_hash")
TRUE_WORDS = {"1", "true", "yes", "y", "on", "x"}
FALSE_WORDS = {"", "0", "false", "no", "n", "off"}
#: exit status of one case killed by the batch's per-case time limit
TIMEOUT_STATUS = 124
#: outputs whose numbers make the cohort summary, in the order they are read
HEADLINE_FILES = ("summary.json", "prm_stats.json", "metrics.json", "evaluation.json")
#: sections of an output file that describe the run rather than its result
NOT_HEADLINE = {"inputs", "options", "job", "perfusionai_version", "runtime_s", "aif", "model_card",
                "notes", "warnings", "details", "voxels_kji", "voxels_lps_mm", "command"}


@dataclass
class Case:
    """One row of the cohort: its name, the verb's options and the resulting command."""

    name: str
    options: List[str]
    output: Path
    command: List[str] = field(default_factory=list)
    input_hash: str = ""
    error: Optional[str] = None  # an option the verb refuses, found before anything runs


@dataclass
class CaseOutcome:
    """What one case did: ``status`` is ``done``, ``failed`` or ``skipped``."""

    case: str
    status: str
    seconds: float
    message: str
    output: str
    command: str
    input_hash: str

    def row(self) -> Dict[str, str]:
        return {"case": self.case, "status": self.status, "seconds": f"{self.seconds:.3g}",
                "message": self.message, "output": self.output, "command": self.command,
                "input_hash": self.input_hash}


# --------------------------------------------------------------------------- cohort -> commands
def _verb_parser(domain: str, verb: str) -> argparse.ArgumentParser:
    """The real parser of ``perfusionai <domain> <verb>`` (so the batch accepts exactly what the verb does)."""
    from .cli import build_parser  # the batch sits above the CLI it drives

    parser = build_parser()
    for action in parser._subparsers._group_actions:  # argparse keeps sub-parsers only here
        if domain in action.choices:
            domain_parser = action.choices[domain]
            break
    else:
        raise input_error(domain, "unknown domain; run 'perfusionai --help' for the list")
    if domain_parser._subparsers is None:
        raise input_error(f"{domain}", "this command has no verbs to run per case")
    for action in domain_parser._subparsers._group_actions:
        if verb in action.choices:
            return action.choices[verb]
    raise input_error(f"{domain} {verb}", "unknown verb; run 'perfusionai " + domain + " --help' for the list")


def _flag_actions(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """Long option string -> action, for every option of the verb."""
    flags = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--"):
                flags[flag] = action
    return flags


def _cell_to_options(column: str, value: str, flags: Mapping[str, argparse.Action], base: Path) -> List[str]:
    flag = "--" + column.strip().replace("_", "-")
    action = flags.get(flag)
    if action is None:
        raise PerfusionAIError(f"column {column!r} is not an option of this verb ({flag} does not exist)")
    value = value.strip()
    if action.nargs == 0:  # store_true / store_false / store_const
        word = value.lower()
        if word in TRUE_WORDS:
            return [flag]
        if word in FALSE_WORDS:
            return []
        raise PerfusionAIError(f"column {column!r}: {value!r} is not true/false")
    if value == "":
        return []
    values = value.split() if action.nargs not in (None, "?") else [value]
    return [flag] + [_resolve_path(v, base) for v in values]


def _resolve_path(value: str, base: Path) -> str:
    """A value naming an existing file or folder relative to the CSV becomes absolute; others stay as they are."""
    if os.path.isabs(value):
        return value
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def read_cohort(cohort_csv: str | os.PathLike, domain: str, verb: str, common: Sequence[str],
                out_dir: str | os.PathLike) -> List[Case]:
    """Read the cohort CSV and build every case's command (nothing runs).

    A row whose options the verb refuses becomes a case with ``error`` set, so it
    is reported as failed while the other cases run.
    """
    path = Path(cohort_csv)
    if not path.is_file():
        raise input_error(path, "cohort CSV not found")
    parser = _verb_parser(domain, verb)
    flags = _flag_actions(parser)
    if "--out" in common:
        raise ParameterError("command", "the batch sets each case's output folder itself (DIR/<case>/); "
                                        "leave the output option out of the verb's options")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise input_error(path, f"cannot read the cohort CSV ({exc})") from None
    if not rows or "case" not in (rows[0].keys() if rows else ()):
        raise input_error(path, "the cohort CSV needs a header with a 'case' column and at least one row")
    if "out" in rows[0]:
        raise input_error(path, "the cohort CSV has an 'out' column; the batch writes each case to DIR/<case>/")
    out = Path(out_dir).resolve()
    cases: List[Case] = []
    seen = set()
    for number, row in enumerate(rows, start=2):
        name = (row.get("case") or "").strip()
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise input_error(path, f"line {number}: the case name {name!r} is not a folder name")
        if name in seen:
            raise input_error(path, f"line {number}: case {name!r} appears twice")
        seen.add(name)
        case = Case(name=name, options=[], output=out / name)
        try:
            per_case: List[str] = []
            for column, value in row.items():
                if column is None:
                    raise PerfusionAIError(f"line {number} has more cells than the header")
                if column == "case":
                    continue
                per_case += _cell_to_options(column, value or "", flags, path.parent)
            case.options = _merge(list(common), per_case)
        except PerfusionAIError as exc:
            case.error = str(exc)
            case.options = list(common)
        case.command = [sys.executable, "-m", "perfusionai", domain, verb, *case.options,
                        "--out", str(case.output), "--progress", "none"]
        if case.error is None:
            case.error = _parse_error(parser, [*case.options, "--out", str(case.output)])
        case.input_hash = content_hash(case.command[3:-4], case.options)
        cases.append(case)
    return cases


def _merge(common: List[str], per_case: List[str]) -> List[str]:
    """Options after ``--`` with the CSV's per-case options; a flag given per case replaces the common one."""
    case_flags = {o for o in per_case if o.startswith("--")}
    merged: List[str] = []
    skipping = False
    for token in common:
        if token.startswith("--"):
            skipping = token in case_flags
        if not skipping:
            merged.append(token)
    return merged + per_case


def _parse_error(parser: argparse.ArgumentParser, argv: List[str]) -> Optional[str]:
    """argparse's own message for options the verb refuses, or None."""
    import contextlib
    import io

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            parser.parse_args(argv)
    except SystemExit:
        lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
        return lines[-1] if lines else "invalid options"
    return None


def content_hash(command: Sequence[str], options: Sequence[str]) -> str:
    """sha256 of the command, the perfusionai version and the bytes of every input file or folder it names."""
    digest = hashlib.sha256()
    digest.update(__version__.encode())
    digest.update("\0".join(command).encode())
    for value in options:
        if value.startswith("--") or not os.path.exists(value):
            continue
        digest.update(b"\0input\0" + value.encode())
        target = Path(value)
        files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        for file in files:
            digest.update(str(file.relative_to(target) if file != target else file.name).encode())
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- one case (runs on a worker)
def run_case(command: Sequence[str], threads: Optional[int], timeout_s: Optional[float]) -> Tuple[int, float, str]:
    """Run one case's command in its own process; returns (exit status, seconds, last message line).

    Runs on a Dask worker. ``threads`` caps the BLAS/OpenMP/torch threads of the
    case so that the cases running at once on one machine do not oversubscribe
    its cores (None: the worker's cores divided by its concurrent tasks).
    """
    if threads is None:
        threads = _worker_threads()
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                 "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[name] = str(threads)
    started = time.perf_counter()
    try:
        proc = subprocess.run(list(command), capture_output=True, text=True, env=env, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return TIMEOUT_STATUS, time.perf_counter() - started, f"stopped after the time limit of {timeout_s:g} s"
    seconds = time.perf_counter() - started
    text = proc.stderr if proc.returncode else proc.stdout
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if proc.returncode and not lines:
        lines = [line.strip() for line in (proc.stdout or "").splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    for prefix in ("perfusionai: error: ", "perfusionai: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
            break
    if proc.returncode < 0:
        message = f"the process was killed by signal {-proc.returncode}" + (f" ({message})" if message else "")
    return proc.returncode, seconds, message[:2000]


def _worker_threads() -> int:
    cores = os.cpu_count() or 1
    try:
        from distributed import get_worker

        concurrent = max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        concurrent = 1
    return max(1, cores // concurrent)


# --------------------------------------------------------------------------- status file
def read_status(out_dir: Path) -> Dict[str, Dict[str, str]]:
    """The previous run's rows of ``batch_status.csv`` by case (empty when there is none)."""
    path = out_dir / STATUS_FILE
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return {row["case"]: row for row in csv.DictReader(fh) if row.get("case")}
    except (OSError, csv.Error, KeyError):
        return {}


def write_status(out_dir: Path, outcomes: Mapping[str, CaseOutcome], order: Sequence[str]) -> None:
    """Rewrite ``batch_status.csv`` (temporary file + rename, so a reader never sees half a file)."""
    _write_csv(out_dir / STATUS_FILE, list(STATUS_COLUMNS),
               [outcomes[name].row() for name in order if name in outcomes])


def _write_csv(path: Path, columns: List[str], rows: Iterable[Mapping[str, object]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- cohort summary
def headline_numbers(case_dir: Path) -> Dict[str, float]:
    """The numbers that summarise one case's outputs, as ``section.key`` -> value.

    Reads the verb's JSON outputs (``summary.json``, ``prm_stats.json``, ...) and
    keeps their numeric results: for DSC the median of every map
    (``cbf.median``), for PRM the percentages of every region
    (``whole_lung.emph``, ``lobes.1.fsad``), for the other verbs the numbers of
    their summary. Descriptions of the run (inputs, options, timing) are left out.
    """
    numbers: Dict[str, float] = {}
    for name in HEADLINE_FILES:
        path = case_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("medians_in_mask"), dict):
            data = {k: {"median": (v.get("median") if isinstance(v, dict) else v)}
                    for k, v in data["medians_in_mask"].items()}
        _flatten(data, "", numbers, depth=0)
    return numbers


def _flatten(value, prefix: str, into: Dict[str, float], depth: int) -> None:
    if depth > 4:
        return
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(float(value)):
            into[prefix] = float(value)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if str(key) in NOT_HEADLINE:
                continue
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), into, depth + 1)


def write_cohort_summary(out_dir: Path, outcomes: Mapping[str, CaseOutcome], order: Sequence[str]) -> Tuple[Path, Path]:
    """``cohort_summary.csv`` (one row per case, one column per headline number) and its HTML page."""
    numbers = {name: headline_numbers(Path(outcomes[name].output)) for name in order
               if name in outcomes and outcomes[name].status in ("done", "skipped")}
    keys: List[str] = []
    for values in numbers.values():
        keys += [k for k in values if k not in keys]
    rows = []
    for name in order:
        if name not in outcomes:
            continue
        outcome = outcomes[name]
        row: Dict[str, object] = {"case": name, "status": outcome.status, "seconds": f"{outcome.seconds:.3g}"}
        for key in keys:
            value = numbers.get(name, {}).get(key)
            row[key] = "" if value is None else f"{value:.4g}"
        rows.append(row)
    csv_path = out_dir / SUMMARY_CSV
    _write_csv(csv_path, ["case", "status", "seconds"] + keys, rows)
    html_path = out_dir / SUMMARY_HTML
    html_path.write_text(_summary_html(out_dir, outcomes, order, keys, rows), encoding="utf-8")
    return csv_path, html_path


def _summary_html(out_dir: Path, outcomes, order, keys, rows) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["case", "status", "seconds", "outputs"] + keys)
    body = []
    for row in rows:
        outcome = outcomes[row["case"]]
        folder = Path(outcome.output)
        links = []
        if folder.is_dir():
            rel = os.path.relpath(folder, out_dir)
            links.append(f'<a href="{html.escape(rel)}/">folder</a>')
            for item in sorted(folder.iterdir()):
                if item.suffix in (".html", ".json", ".csv", ".png") and not item.name.startswith("."):
                    links.append(f'<a href="{html.escape(os.path.relpath(item, out_dir))}">{html.escape(item.name)}</a>')
        status = html.escape(str(row["status"]))
        if outcome.status == "failed":
            status += f'<br><small>{html.escape(outcome.message)}</small>'
        cells = [html.escape(str(row["case"])), status, html.escape(str(row["seconds"])), " ".join(links)]
        cells += [html.escape(str(row.get(k, ""))) for k in keys]
        css = ' class="failed"' if outcome.status == "failed" else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    done = sum(o.status in ("done", "skipped") for o in outcomes.values())
    failed = sum(o.status == "failed" for o in outcomes.values())
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>PerfusionAI cohort summary</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:left}"
        "tr.failed{background:#fde8e8}th{background:#f2f2f2}</style></head><body>"
        f"<h1>Cohort summary</h1><p>{len(outcomes)} cases: {done} done, {failed} failed "
        f"(perfusionai {html.escape(__version__)}). Numbers are each case's headline results "
        "(median of every map inside the mask, %PRM per region, ...); the status of every case, with its exact "
        f"command, is in <a href='{STATUS_FILE}'>{STATUS_FILE}</a>.</p>"
        f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>"
    )


# --------------------------------------------------------------------------- the run
def default_threads_per_case(workers: int) -> int:
    """Threads for each case so that ``workers`` cases at once use the machine's cores, no more."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_batch(cohort_csv: str | os.PathLike, out_dir: str | os.PathLike, command: Sequence[str], *,
              workers: int = 2, scheduler: Optional[str] = None, threads_per_case: Optional[int] = None,
              timeout_s: Optional[float] = None, show_progress: bool = True,
              echo=print) -> Dict[str, CaseOutcome]:
    """Run ``perfusionai <domain> <verb>`` for every case of the cohort on Dask; returns the outcomes by case.

    Parameters
    ----------
    cohort_csv
        The cohort table (``case`` column + one column per option).
    out_dir
        The batch folder: ``<case>/`` per case, ``batch_status.csv``, ``cohort_summary.{csv,html}``.
    command
        ``[domain, verb, options for every case...]``.
    workers
        Worker processes of the local cluster (ignored with ``scheduler``).
    scheduler
        Address of an existing Dask scheduler (``tcp://host:port``); None starts a ``LocalCluster``.
    threads_per_case
        BLAS/OpenMP threads per case; default cores // workers on a local cluster, and on an existing
        cluster each worker's cores // its concurrent tasks.
    timeout_s
        Per-case time limit in seconds (None: none).
    """
    if len(command) < 2:
        raise ParameterError("command", "give the domain and the verb to run for every case (e.g. dsc maps)")
    domain, verb, common = command[0], command[1], list(command[2:])
    if domain in ("batch", "demo"):
        raise PerfusionAIError(f"'{domain}' cannot run per case; give a domain verb such as 'dsc maps'")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise input_error(out, "the batch output path exists and is not a folder")
    cases = read_cohort(cohort_csv, domain, verb, common, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise input_error(out, f"cannot create the batch folder ({exc.strerror})") from None
    previous = read_status(out)
    order = [c.name for c in cases]
    outcomes: Dict[str, CaseOutcome] = {}
    to_run: List[Case] = []
    for case in cases:
        shown = " ".join(_quote(a) for a in ["perfusionai", *case.command[3:-2]])
        old = previous.get(case.name)
        if case.error is not None:
            outcomes[case.name] = CaseOutcome(case.name, "failed", 0.0, case.error, str(case.output), shown,
                                              case.input_hash)
        elif (old is not None and old.get("status") in ("done", "skipped") and old.get("input_hash") == case.input_hash
              and case.output.is_dir()):
            outcomes[case.name] = CaseOutcome(case.name, "skipped", float(old.get("seconds") or 0.0),
                                              "done in an earlier run with identical inputs and options",
                                              str(case.output), shown, case.input_hash)
        else:
            to_run.append(case)
    for case in cases:
        if case.name in outcomes and outcomes[case.name].status == "failed":
            echo(f"case {case.name}: failed: {outcomes[case.name].message}")
    # cases still to run keep their previous row until they finish, so an interrupted batch loses nothing
    for name, row in previous.items():
        if name in order and name not in outcomes:
            outcomes[name] = CaseOutcome(name, row.get("status") or "pending", float(row.get("seconds") or 0.0),
                                         row.get("message") or "", row.get("output") or "", row.get("command") or "",
                                         row.get("input_hash") or "")
    write_status(out, outcomes, order)
    if to_run:
        _run_on_dask(to_run, outcomes, order, out, workers=workers, scheduler=scheduler,
                     threads_per_case=threads_per_case, timeout_s=timeout_s, show_progress=show_progress,
                     echo=echo)
    write_status(out, outcomes, order)
    write_cohort_summary(out, outcomes, order)
    return outcomes


def _run_on_dask(cases: List[Case], outcomes: Dict[str, CaseOutcome], order, out: Path, *, workers, scheduler,
                 threads_per_case, timeout_s, show_progress, echo) -> None:
    distributed = require("distributed", "perfusionai batch")

    cluster = None
    if scheduler is None:
        import logging

        # worker processes log heartbeat tracebacks while the cluster shuts down: noise, not failures
        cluster = distributed.LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.CRITICAL)
        if threads_per_case is None:
            threads_per_case = default_threads_per_case(workers)
    try:
        client = distributed.Client(scheduler if scheduler is not None else cluster, timeout="30s")
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise PerfusionAIError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
    by_future = {}
    try:
        for case in cases:
            future = client.submit(run_case, case.command, threads_per_case, timeout_s, key=f"case-{case.name}-"
                                   f"{case.input_hash[:12]}", pure=False, retries=0)
            by_future[future] = case
        bar = _CaseBar(len(cases), enabled=show_progress, echo=echo)
        failed = 0
        try:
            for future in distributed.as_completed(list(by_future)):
                case = by_future[future]
                shown = " ".join(_quote(a) for a in ["perfusionai", *case.command[3:-2]])
                try:
                    status, seconds, message = future.result()
                except Exception as exc:  # a worker lost with the case on it: the case failed, the batch goes on
                    status, seconds, message = -1, 0.0, f"the worker running it failed ({type(exc).__name__}: {exc})"
                ok = status == 0
                outcomes[case.name] = CaseOutcome(case.name, "done" if ok else "failed", seconds,
                                                  "" if ok else (message or f"exit status {status}"),
                                                  str(case.output), shown, case.input_hash)
                if not ok:
                    failed += 1
                    bar.write(f"case {case.name}: failed: {outcomes[case.name].message}")
                bar.update(1, failed)
                write_status(out, outcomes, order)
        finally:
            bar.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class _CaseBar:
    """A progress bar over cases: tqdm on a terminal, a timestamped line per case otherwise."""

    def __init__(self, total: int, enabled: bool, echo) -> None:
        self.total, self.done, self.echo = total, 0, echo
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", desc="batch", file=sys.stderr)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            self.echo(text)

    def update(self, n: int, failed: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(failed=failed)
        elif self.enabled:
            print(f"{time.strftime('%H:%M:%S')} {self.done}/{self.total} cases finished ({failed} failed)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
