"""perfusionai.slicer_support: the Qt-free half of the Slicer modules (plain pytest).

The background-process test runs the real ``python -m perfusionai dsc maps`` on a
phantom through the same file exchange and command line the DSCDeconvolution
module uses, and checks the maps against the phantom's truth.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from perfusionai.errors import PerfusionAIError
from perfusionai import slicer_support as support


@pytest.mark.parametrize("line, expected", [
    ("PROGRESS 0.2500 AIF", (0.25, "AIF")),
    ("PROGRESS 1 done", (1.0, "done")),
    ("  PROGRESS 0.5   deconvolution chunk 3/8  ", (0.5, "deconvolution chunk 3/8")),
    ("PROGRESS 1.7 overshoot", (1.0, "overshoot")),
    ("PROGRESS -0.1 negative", (0.0, "negative")),
    ("PROGRESS 0.3", (0.3, "")),
    ("maps written to /tmp/x", None),
    ("PROGRESS nan message", None),
    ("WARNING PROGRESS 0.5 not at line start", None),
    ("", None),
])
def test_parse_progress_line(line, expected):
    assert support.parse_progress_line(line) == expected


def test_error_message_prefers_the_cli_error_line():
    lines = ["PROGRESS 0.1 concentration", "perfusionai: error: /x/aif.nii.gz: AIF mask is empty"]
    assert support.error_message_from_output(lines) == "/x/aif.nii.gz: AIF mask is empty"
    assert support.error_message_from_output(["PROGRESS 0.1 a", "Traceback", "ValueError: boom"]) == \
        "Traceback\nValueError: boom"


def test_background_run_through_files_matches_truth(tmp_path):
    """Inputs written as the module writes them, the CLI run as a subprocess, outputs read back."""
    from perfusionai.phantoms.dsc import make_dsc_phantom

    phantom = make_dsc_phantom(shape=(4, 16, 16), n_frames=50, tumour=False, lesion=False)
    inputs = support.write_dsc_inputs(tmp_path / "in", phantom.signal, phantom.geometry, phantom.times,
                                      mask=phantom.brain_mask, aif_mask=phantom.aif_mask)
    assert inputs.tr == pytest.approx(phantom.tr)
    out = tmp_path / "out"
    from perfusionai.dsc.job import DSCMapsJob

    job = DSCMapsJob(dsc=str(inputs.series), out=str(out), te=phantom.te, tr=inputs.tr, aif_mask=str(inputs.aif_mask),
                     mask=str(inputs.mask), method="Tikhonov")
    cmd = [sys.executable, "-m", "perfusionai", *job.to_argv(), "--progress", "lines"]  # as BackgroundRun.runJob
    # Only what the module passes (plus this interpreter's own environment), run from another folder,
    # so the package is found through background_environment's PYTHONPATH.
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(support.background_environment(None, cpu_only=True))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    progress = [p for p in map(support.parse_progress_line, done.stdout.splitlines()) if p is not None]
    fractions = [f for f, _ in progress]
    assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] == 1.0

    output = support.read_dsc_outputs(out)
    assert set(support.MAP_NAMES) <= set(output.maps)
    assert output.geometry.same_grid(phantom.geometry)
    tissue = phantom.tissue_mask
    truth = float(np.median(phantom.truth["cbf"][tissue]))
    assert abs(float(np.median(output.maps["cbf"][tissue])) - truth) <= 0.10 * truth
    np.testing.assert_allclose(output.times, phantom.times, atol=1e-6)
    assert output.mid_bolus_frame() == int(np.argmax(output.aif))
    rows = output.median_rows()
    assert [r["map"] for r in rows][:5] == list(support.MAP_NAMES)
    assert rows[1]["unit"] == "mL/100 g/min"
    brain = phantom.brain_mask
    assert rows[1]["median"] == pytest.approx(float(np.median(output.maps["cbf"][brain])), rel=1e-5)


def test_read_outputs_of_an_unfinished_run_is_refused(tmp_path):
    with pytest.raises(PerfusionAIError, match="did not finish"):
        support.read_dsc_outputs(tmp_path)


@pytest.mark.skipif(os.name == "nt", reason="the child-process script below uses POSIX sleep semantics")
def test_kill_process_tree_stops_launcher_and_child(tmp_path):
    pid_file = tmp_path / "child.pid"
    # A "launcher" that starts a long-running child, like PythonSlicer starting python-real.
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    launcher = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 20
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    killed = support.kill_process_tree(launcher.pid)
    assert launcher.pid in killed and child in killed
    assert launcher.wait(timeout=10) != 0
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # A killed child of a dead parent may linger as a zombie until reaped by init.
        status = Path(f"/proc/{child}/status")
        if status.exists() and "State:\tZ" in status.read_text():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the child process survived kill_process_tree")


def test_requirements_file_and_missing_check(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nnumpy>=1.20  # bundled with Slicer\n\nsurely-not-installed-pkg-3141>=1\n")
    assert support.read_requirements(req) == ["numpy>=1.20", "surely-not-installed-pkg-3141>=1"]
    assert support.missing_requirements(support.read_requirements(req)) == ["surely-not-installed-pkg-3141>=1"]


@pytest.mark.parametrize("module", ["DSCDeconvolution", "PRMPredictor", "PerfusionTranslation", "DiffusionRelaxation"])
def test_module_requirement_files_parse(module):
    module_file = Path(__file__).resolve().parents[1] / module / f"{module}.py"
    extras = ["learned"] if module == "DSCDeconvolution" else []
    lines = support.module_requirements(module_file, extras)
    assert lines and all(not ln.lower().startswith(("torch", "numpy", "simpleitk", "vtk")) for ln in lines)


def test_background_environment_puts_the_package_first(tmp_path):
    env = support.background_environment(os.pathsep.join(["/opt/x", "", "/opt/y"]), cpu_only=False)
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths == [str(Path(support.__file__).resolve().parents[1]), "/opt/x", "/opt/y"]
    assert (Path(paths[0]) / "perfusionai" / "__init__.py").is_file()
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert support.background_environment(None)["CUDA_VISIBLE_DEVICES"] == "-1"


def test_python_launcher_prefers_pythonslicer():
    assert support.python_launcher(lambda name: "/opt/Slicer/bin/PythonSlicer") == "/opt/Slicer/bin/PythonSlicer"
    assert support.python_launcher(lambda name: None) == sys.executable


def test_missing_module_requirements_reads_the_module_resources_and_extras(tmp_path):
    module_file = tmp_path / "SomeModule" / "SomeModule.py"
    resources = module_file.parent / "Resources" / "Requirements"
    resources.mkdir(parents=True)
    module_file.write_text("")
    (resources / "SomeModule.txt").write_text("numpy\nsurely-not-installed-base-2718\n")
    (resources / "SomeModule-learned.txt").write_text("scipy>=1.0\nsurely-not-installed-learned-2718>=2\n")
    assert support.missing_module_requirements(module_file) == ["surely-not-installed-base-2718"]
    assert support.missing_module_requirements(str(module_file), ["learned"]) == [
        "surely-not-installed-base-2718", "surely-not-installed-learned-2718>=2"]
    with pytest.raises(FileNotFoundError):
        support.missing_module_requirements(module_file, ["absent"])


def test_pytorch_message_and_requirement():
    message = support.pytorch_extension_missing_message("The learned methods (PHAE, tmax-net)")
    assert message == ("The learned methods (PHAE, tmax-net) need the PyTorch extension. Install 'PyTorch' from "
                       "the Extensions Manager and restart Slicer.")
    # The contract pins torch 2.13; the modules must not ask for a version that excludes it.
    from packaging.specifiers import SpecifierSet

    assert "2.13.0" in SpecifierSet(support.TORCH_VERSION_REQUIREMENT)


@pytest.mark.parametrize("value, expected", [
    (None, None), ("", None), (Path(""), None), (Path("."), None),
    (Path("/data/model"), "/data/model"), ("relative/bvals", "relative/bvals"),
])
def test_path_or_none_treats_an_empty_path_field_as_none(value, expected):
    assert support.path_or_none(value) == expected


def test_model_note_reads_the_model_card(tmp_path):
    import perfusionai.dsc.tmaxnet  # noqa: F401  (registers the architectures)
    from perfusionai.nn.modelfile import build_model, save_model
    from perfusionai.slicer_support import model_note

    assert "this series" in model_note(None)
    model = build_model("dsc.tmaxnet.conv1", n_frames=20)
    for flag in (True, False):
        path = tmp_path / f"m{flag}"
        save_model(path, model, {"inputs": {"n_frames": 20}, "training_data": "test",
                                 "trained_on_phantoms": flag})
        assert ("trained on phantoms" in model_note(str(path))) is flag
