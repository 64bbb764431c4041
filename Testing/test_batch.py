"""``perfusionai batch``: cohorts on Dask (a LocalCluster, and a separately started scheduler + worker).

Each case is a real ``perfusionai dsc maps`` run on a small DSC phantom; a broken
case (a 3D file where a 4D series is expected) must fail alone, the status file
must say so, and a re-run must skip what is done with identical inputs.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed", reason="perfusionai batch needs dask[distributed] (the 'batch' extra)")

from perfusionai import batch
from perfusionai.errors import PerfusionAIError
from perfusionai.io import read_volume, write_volume
from perfusionai.phantoms import make_dsc_phantom


def _status(out: Path) -> dict:
    with open(out / batch.STATUS_FILE, newline="") as fh:
        return {row["case"]: row for row in csv.DictReader(fh)}


def _perfusionai(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "perfusionai", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two small DSC phantoms (different noise seeds) and a 3D file posing as a DSC series."""
    root = tmp_path_factory.mktemp("cohort")
    for seed in (1, 2):
        make_dsc_phantom(shape=(6, 16, 16), snr=80, seed=seed, lesion=False, tumour=False).save(root / f"ph{seed}")
    mask = read_volume(root / "ph1" / "brain_mask.nii.gz")
    write_volume(mask.array.astype(np.float32), mask.geometry, root / "not_4d.nii.gz")
    with open(root / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "dsc", "mask", "aif_mask"])
        w.writerow(["p1", "ph1/dsc.nii.gz", "ph1/brain_mask.nii.gz", "ph1/aif_mask.nii.gz"])
        w.writerow(["p2", "ph2/dsc.nii.gz", "ph2/brain_mask.nii.gz", "ph2/aif_mask.nii.gz"])
        w.writerow(["broken", "not_4d.nii.gz", "ph1/brain_mask.nii.gz", "ph1/aif_mask.nii.gz"])
    return root


def test_local_cluster_broken_case_resume_and_changed_options(cohort, tmp_path):
    out = tmp_path / "runs"
    run = _perfusionai("batch", "--cohort", str(cohort / "cohort.csv"), "--out", str(out), "--workers", "2",
                       "--", "dsc", "maps", "--te", "0.03", "--method", "sSVD", cwd=tmp_path)
    # the exit status counts the failed cases; the failure is printed as it happens, without a traceback
    assert run.returncode == 1, run.stderr + run.stdout
    assert "Traceback" not in run.stderr + run.stdout
    assert "case broken: failed:" in run.stdout + run.stderr
    status = _status(out)
    assert [status[c]["status"] for c in ("p1", "p2", "broken")] == ["done", "done", "failed"]
    assert "not_4d.nii.gz" in status["broken"]["message"] and "4D" in status["broken"]["message"]
    assert "--method sSVD" in status["p1"]["command"] and "--aif-mask" in status["p1"]["command"]
    assert not (out / "broken").exists(), "a failed case leaves no output folder"
    # each case ran for real: its maps exist, and the cohort summary repeats its own medians
    for case in ("p1", "p2"):
        summary = json.loads((out / case / "summary.json").read_text())
        assert summary["options"]["method"] == "sSVD"
        assert (out / case / "cbf.nii.gz").is_file()
    with open(out / batch.SUMMARY_CSV, newline="") as fh:
        rows = {row["case"]: row for row in csv.DictReader(fh)}
    for case in ("p1", "p2"):
        expected = json.loads((out / case / "summary.json").read_text())["medians_in_mask"]["cbf"]
        expected = expected["median"] if isinstance(expected, dict) else expected
        assert float(rows[case]["cbf.median"]) == pytest.approx(expected, rel=1e-3)
    assert rows["broken"]["cbf.median"] == ""
    page = (out / batch.SUMMARY_HTML).read_text()
    assert 'href="p1/"' in page and 'href="p1/summary.json"' in page and "failed" in page
    assert ".perfusionai-outputs" not in page  # the hidden output manifest is no report link

    # resume: identical inputs and options are skipped (outputs untouched); the failed case is tried again
    stamp = (out / "p1" / "cbf.nii.gz").stat().st_mtime_ns
    again = _perfusionai("batch", "--cohort", str(cohort / "cohort.csv"), "--out", str(out), "--workers", "1",
                         "--progress", "none", "--", "dsc", "maps", "--te", "0.03", "--method", "sSVD", cwd=tmp_path)
    assert again.returncode == 1
    status = _status(out)
    assert status["p1"]["status"] == status["p2"]["status"] == "skipped"
    assert status["broken"]["status"] == "failed"
    assert (out / "p1" / "cbf.nii.gz").stat().st_mtime_ns == stamp

    # other options for every case change the content hash: the cases run again
    third = _perfusionai("batch", "--cohort", str(cohort / "cohort.csv"), "--out", str(out), "--workers", "1",
                         "--progress", "none", "--", "dsc", "maps", "--te", "0.03", "--method", "cSVD", cwd=tmp_path)
    assert third.returncode == 1
    assert _status(out)["p1"]["status"] == "done"
    assert json.loads((out / "p1" / "summary.json").read_text())["options"]["method"] == "cSVD"


def test_separately_started_scheduler_and_worker(cohort, tmp_path):
    dask = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    if dask is None:
        pytest.skip("the 'dask' command (dask[distributed]) is not on PATH")
    scheduler_file = tmp_path / "scheduler.json"
    env = dict(os.environ, DASK_DISTRIBUTED__WORKER__DAEMON="False")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scheduler_file.is_file(), "the dask scheduler did not start"
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--no-dashboard"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        table = tmp_path / "two.csv"
        table.write_text(f"case,dsc,aif_mask\np1,{cohort / 'ph1' / 'dsc.nii.gz'},{cohort / 'ph1' / 'aif_mask.nii.gz'}\n"
                         f"broken,{cohort / 'not_4d.nii.gz'},\n")
        out = tmp_path / "remote"
        run = _perfusionai("batch", "--cohort", str(table), "--out", str(out), "--scheduler", address,
                           "--progress", "none", "--", "dsc", "maps", "--te", "0.03", "--mask",
                           str(cohort / "ph1" / "brain_mask.nii.gz"), cwd=tmp_path)
        assert run.returncode == 1, run.stderr + run.stdout
        status = _status(out)
        assert status["p1"]["status"] == "done" and status["broken"]["status"] == "failed"
        assert (out / "p1" / "cbf.nii.gz").is_file()
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_cohort_columns_become_the_verbs_own_options(cohort, tmp_path):
    table = tmp_path / "c.csv"
    table.write_text("case,dsc,aif_auto,kh,threshold\n"
                     "a,ph1/dsc.nii.gz,yes,0.5,\n"
                     "b,ph2/dsc.nii.gz,no,,0.15\n")
    shutil.copytree(cohort / "ph1", tmp_path / "ph1")
    shutil.copytree(cohort / "ph2", tmp_path / "ph2")
    cases = {c.name: c for c in batch.read_cohort(table, "dsc", "maps", ["--te", "0.03", "--kh", "0.73"],
                                                  tmp_path / "out")}
    a, b = cases["a"], cases["b"]
    assert a.error is None and b.error is None
    # a flag column sets the bare flag; a per-case value replaces the common one; an empty cell leaves it out
    assert a.options == ["--te", "0.03", "--dsc", str((tmp_path / "ph1" / "dsc.nii.gz").resolve()),
                         "--aif-auto", "--kh", "0.5"]
    assert b.options == ["--te", "0.03", "--kh", "0.73", "--dsc", str((tmp_path / "ph2" / "dsc.nii.gz").resolve()),
                         "--threshold", "0.15"]
    assert a.command[-4:] == ["--out", str((tmp_path / "out" / "a").resolve()), "--progress", "none"]
    # the hash follows the bytes of the inputs
    before = a.input_hash
    (tmp_path / "ph1" / "dsc.nii.gz").write_bytes((tmp_path / "ph1" / "dsc.nii.gz").read_bytes() + b"\0")
    again = {c.name: c for c in batch.read_cohort(table, "dsc", "maps", ["--te", "0.03", "--kh", "0.73"],
                                                  tmp_path / "out")}
    assert again["a"].input_hash != before and again["b"].input_hash == b.input_hash


def test_bad_cohort_rows_fail_alone_and_bad_tables_are_refused(tmp_path):
    table = tmp_path / "c.csv"
    table.write_text("case,dsc,no_such_option\na,x.nii.gz,1\n")
    (case,) = batch.read_cohort(table, "dsc", "maps", ["--te", "0.03"], tmp_path / "out")
    assert "no_such_option" in case.error and "--no-such-option" in case.error
    table.write_text("case,dsc\na,x.nii.gz\n")
    (case,) = batch.read_cohort(table, "dsc", "maps", ["--te", "abc"], tmp_path / "out")
    assert "--te" in case.error  # argparse's own message, before anything runs
    table.write_text("case,dsc\na,x\na,y\n")
    with pytest.raises(PerfusionAIError, match="twice"):
        batch.read_cohort(table, "dsc", "maps", [], tmp_path / "out")
    table.write_text("dsc\nx\n")
    with pytest.raises(PerfusionAIError, match="'case' column"):
        batch.read_cohort(table, "dsc", "maps", [], tmp_path / "out")
    with pytest.raises(PerfusionAIError, match="output folder"):
        batch.read_cohort(tmp_path / "c.csv", "dsc", "maps", ["--out", "x"], tmp_path / "out")
    with pytest.raises(PerfusionAIError, match="unknown verb"):
        batch.read_cohort(tmp_path / "c.csv", "dsc", "nope", [], tmp_path / "out")


def test_cases_get_their_share_of_the_cores(tmp_path):
    code = "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['OPENBLAS_NUM_THREADS'])"
    status, seconds, message = batch.run_case([sys.executable, "-c", code], 3, None)
    assert (status, message) == (0, "3 3")
    assert batch.default_threads_per_case(os.cpu_count() or 1) == 1
    assert batch.default_threads_per_case(1) == (os.cpu_count() or 1)
    status, _, message = batch.run_case([sys.executable, "-c", "import time; time.sleep(5)"], 1, 0.5)
    assert status == batch.TIMEOUT_STATUS and "time limit" in message


def test_headline_numbers_of_prm_and_dsc_outputs(tmp_path):
    (tmp_path / "prm_stats.json").write_text(json.dumps({
        "whole_lung": {"normal": 60.5, "fsad": 30.0, "emph": 9.5, "voxels": 1000},
        "lobes": {"1": {"normal": 50.0, "fsad": 40.0, "emph": 10.0}}, "options": {"threshold": -950}}))
    numbers = batch.headline_numbers(tmp_path)
    assert numbers["whole_lung.fsad"] == 30.0 and numbers["lobes.1.emph"] == 10.0
    assert not any(k.startswith("options") for k in numbers)
