"""The modules' bridges on Slicer's REAL Python layer (5.10.0 and 5.12.3) with real files and processes.

Logic classes of our module files run on ``slicer-core``'s MRML with Slicer's own ``util.py`` of
each version (``launchConsoleProcess``, ``startupEnvironment``, ``tempDirectory``...): the inputs
are written from scene nodes, ``perfusionai <job argv> --progress lines`` runs in a real
subprocess, and the outputs are read back into nodes. No widget behaviour is checked: the
``qt.QTimer`` that polls a run inside Slicer is replaced by calling ``BackgroundRun.poll()`` here
(see ``Testing/slicer_api/real_layer.py`` for the placeholders), and ``slicer.app`` is the
headless stand-in (``aboutToQuit()`` is emitted by the test as the application would).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "slicer_api"))
import real_layer  # noqa: E402

slicer = real_layer.require_or_skip()


@pytest.fixture(params=real_layer.VERSIONS)
def layer(request, scene, monkeypatch):
    with real_layer.polled_layer(request.param, scene, monkeypatch) as loaded:
        yield loaded


_follow = real_layer.follow


def test_diffusion_relaxation_background_run_matches_in_process(layer):
    mod = layer.load_module("DiffusionRelaxation")
    scene = mod.loadDRPhantom(shape=(2, 6, 6), snr=None)
    logic = mod.DiffusionRelaxationLogic()
    outcomes, progress, log = [], [], []
    assert logic.process(scene["series"], mode="Fit", model="clinical", maskNode=scene["body"],
                         waitForCompletion=False, progressCallback=lambda f, m: progress.append(f),
                         completedCallback=outcomes.append, logCallback=log.append) is None
    assert logic.isRunning
    _follow(logic._run)
    assert len(outcomes) == 1 and "nodes" in outcomes[0], outcomes
    assert progress and progress[-1] == 1.0
    here = logic.process(scene["series"], mode="Fit", model="clinical", maskNode=scene["body"])
    body = scene["phantom"].body
    assert sorted(outcomes[0]["nodes"]["maps"]) == sorted(here["maps"])
    for name, node in here["maps"].items():
        a = layer.slicer.util.arrayFromVolume(node)
        b = layer.slicer.util.arrayFromVolume(outcomes[0]["nodes"]["maps"][name])
        np.testing.assert_allclose(b[body], a[body], rtol=1e-5, atol=1e-6, err_msg=name)
    assert outcomes[0]["nodes"]["table"].GetNumberOfRows() == here["table"].GetNumberOfRows()
    assert logic._run.workDir is None  # the run's temporary folder is gone
    # every result node records the perfusionai version and all options (the job, for the background run)
    import json

    import perfusionai

    adc = outcomes[0]["nodes"]["maps"]["adc"]
    assert adc.GetAttribute("PerfusionAI.Version") == perfusionai.__version__
    options = json.loads(adc.GetAttribute("PerfusionAI.Options"))
    assert options["job"]["verb"] == "fit" and options["job"]["options"]["model"] == "clinical"
    assert json.loads(here["maps"]["adc"].GetAttribute("PerfusionAI.Options"))["model"] == "clinical"
    # the results sit in a subject-hierarchy folder beside the input
    sh = layer.slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(layer.scene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(adc))
    assert sh.GetItemName(folder) == "DR clinical results"
    inputItem = sh.GetItemByDataNode(scene["series"])
    assert sh.GetItemParent(folder) == (sh.GetItemParent(inputItem) if inputItem else sh.GetSceneItemID())


def test_dsc_background_run_matches_in_process(layer):
    mod = layer.load_module("DSCDeconvolution")
    built = mod.loadDSCPhantom(shape=(2, 8, 8), n_frames=40, snr=float("inf"), tumour=False, lesion=False)
    logic = mod.DSCDeconvolutionLogic()
    outcomes = []
    kwargs = dict(te=built["phantom"].te, aifNode=built["aifMask"], maskNode=built["brainMask"], method="Tikhonov")
    logic.process(built["series"], waitForCompletion=False, completedCallback=outcomes.append, **kwargs)
    _follow(logic._run)
    assert len(outcomes) == 1 and "nodes" in outcomes[0], outcomes
    here = logic.process(built["series"], waitForCompletion=True, **kwargs)
    mask = built["phantom"].brain_mask.astype(bool)
    for name in ("cbf", "cbv", "mtt"):
        a = layer.slicer.util.arrayFromVolume(here["maps"][name])
        b = layer.slicer.util.arrayFromVolume(outcomes[0]["nodes"]["maps"][name])
        np.testing.assert_allclose(b[mask], a[mask], rtol=1e-4, atol=1e-4, err_msg=name)
    cbf = outcomes[0]["nodes"]["maps"]["cbf"]
    assert '"method": "Tikhonov"' in cbf.GetAttribute("PerfusionAI.Options")
    # the overlaid map has a colour legend titled with its units
    legend = layer.slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(cbf)
    assert legend is not None and legend.GetTitleText() == "CBF [mL/100 g/min]"


def test_prm_background_run_matches_in_process(layer):
    """PRMCTJob (``prm ct --no-registration``) on an aligned phantom, in a subprocess and in-process."""
    if layer.version != real_layer.VERSIONS[-1]:
        pytest.skip("one version is enough: the run path on 5.10 is covered by the DR and DSC runs")
    from perfusionai.phantoms.prm import make_prm_phantom

    mod = layer.load_module("PRMPredictor")
    phantom = make_prm_phantom(shape=(16, 24, 28), spacing_mm=6.0, noise_hu=0.0, deform=False)
    from perfusionai import mrml

    insp = mrml.volume_node_from_array(phantom.insp.array, phantom.geometry, "insp")
    exp = mrml.volume_node_from_array(phantom.exp.array, phantom.geometry, "exp")
    logic = mod.PRMPredictorLogic()
    outcomes = []
    logic.process(insp, exp, register=False, waitForCompletion=False, completedCallback=outcomes.append)
    _follow(logic._run)
    assert len(outcomes) == 1 and "nodes" in outcomes[0], outcomes
    here = logic.process(insp, exp, register=False)
    assert outcomes[0]["nodes"]["stats"]["whole_lung"] == here["stats"]["whole_lung"]
    names = [s[1] for s in mrml.segments_of(here["segmentation"])]
    assert "Emphysema" in names
    assert '"no_registration": true' in here["segmentation"].GetAttribute("PerfusionAI.Options")
    # an output node chosen in the panel is reused: the next run writes into it, no new segmentation
    chosen = here["segmentation"]
    before = layer.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    again = logic.process(insp, exp, register=False, segmentationNode=chosen)
    assert again["segmentation"] is chosen
    assert layer.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    assert sorted(s[1] for s in mrml.segments_of(chosen)) == sorted(names)


def test_prm_from_mri_runs_its_job_and_reports_the_cli_error(layer, tmp_path):
    """PRM from MRI builds PRMPredictJob from the nodes; a folder that is not a model is refused by the
    real ``prm predict`` in the subprocess, and that message reaches the outcome."""
    if layer.version != real_layer.VERSIONS[-1]:
        pytest.skip("one version is enough: the run path on 5.10 is covered by the DR, DSC and PRM CT runs "
                    "(this subprocess imports torch, which is slow)")
    mod = layer.load_module("PRMPredictor")
    from perfusionai import mrml
    from perfusionai.io import Geometry

    geometry = Geometry((4, 8, 8), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    vibe = mrml.volume_node_from_array(np.ones((4, 8, 8), dtype=np.float32), geometry, "VIBE")
    lungs = mrml.volume_node_from_array(np.ones((4, 8, 8), dtype=np.uint8), geometry, "lungs", label=True)
    notAModel = tmp_path / "not-a-model"
    notAModel.mkdir()
    logic = mod.PRMPredictorMRILogic()
    outcomes, log = [], []
    logic.process(vibe, lungMaskNode=lungs, prmModelPath=str(notAModel), device="cpu", waitForCompletion=False,
                  completedCallback=outcomes.append, logCallback=log.append)
    _follow(logic._run)
    assert len(outcomes) == 1 and "not-a-model" in outcomes[0].get("error", ""), outcomes
    assert any("CPU" in line for line in log), log


def _slow_run(layer, name="Slow"):
    lib = sys.modules["PerfusionAISlicerLib"]
    run = lib.BackgroundRun(name)
    outcomes = []
    command = [sys.executable, "-c", "import time\nprint('PROGRESS 0.1 started', flush=True)\ntime.sleep(60)"]
    run.start(command, lambda: pytest.fail("outputs read after a kill"), completedCallback=outcomes.append)
    deadline = time.time() + 30
    while not run._output and time.time() < deadline:
        run.poll()
        time.sleep(0.02)
    return run, outcomes


def test_scene_close_kills_the_background_run(layer, scene):
    run, outcomes = _slow_run(layer)
    process = run.process
    scene.Clear(0)  # what File > Close Scene does: StartCloseEvent first
    _follow(run, timeout=20)
    assert outcomes == [{"cancelled": True}]
    assert process.poll() is not None


def test_application_exit_kills_the_background_run(layer):
    run, outcomes = _slow_run(layer)
    process = run.process
    layer.app.emit("aboutToQuit()")
    _follow(run, timeout=20)
    assert outcomes == [{"cancelled": True}] and process.poll() is not None


def test_an_exception_reading_outputs_becomes_an_error_outcome(layer):
    lib = sys.modules["PerfusionAISlicerLib"]
    run = lib.BackgroundRun("Broken")
    outcomes, progress = [], []

    def readOutputs():
        raise KeyError("maps")  # not a PerfusionAIError: must not escape the timer callback

    run.start([sys.executable, "-c", "print('PROGRESS 0.5 half', flush=True)"], readOutputs,
              progressCallback=lambda f, m: progress.append((f, m)), completedCallback=outcomes.append)
    _follow(run)
    assert progress == [(0.5, "half")]
    assert len(outcomes) == 1 and "KeyError" in outcomes[0]["error"], outcomes
    assert not run.isRunning


def test_a_failing_command_reports_its_error_line(layer):
    lib = sys.modules["PerfusionAISlicerLib"]
    run = lib.BackgroundRun("Failing")
    outcomes = []
    run.start([sys.executable, "-m", "perfusionai", "dr", "fit", "--dwi", "/nonexistent.nii.gz", "--bvals",
               "/nonexistent", "--out", "/tmp/never-written-by-this-test"], lambda: None,
              completedCallback=outcomes.append)
    _follow(run)
    assert len(outcomes) == 1 and "nonexistent" in outcomes[0]["error"], outcomes


def test_declining_the_install_is_not_an_error(layer, monkeypatch):
    lib = sys.modules["PerfusionAISlicerLib"]
    asked = []
    monkeypatch.setattr(layer.util, "confirmOkCancelDisplay", lambda text, *a, **k: asked.append(text) or False)
    monkeypatch.setattr(layer.util, "pip_install", lambda *a, **k: pytest.fail("installed after a decline"))
    assert lib.ensureDependencies("Test", ["surely-not-installed-pkg-3141>=1"]) is False
    assert len(asked) == 1 and "surely-not-installed-pkg-3141" in asked[0]
    assert lib.ensureDependencies("Test", ["numpy"]) is True  # nothing missing: no question
    assert len(asked) == 1


def test_one_confirmation_lists_torch_and_the_pip_packages(layer, monkeypatch):
    """torch comes through the PyTorch extension, in the same single confirmation, without its own prompt."""
    import types

    lib = sys.modules["PerfusionAISlicerLib"]
    calls = []

    class FakeTorchLogic:  # the PyTorch extension's PyTorchUtilsLogic (not shipped here)
        @staticmethod
        def torchInstalled():
            return False

        def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
            calls.append(("torch", askConfirmation, torchVersionRequirement))
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakeTorchLogic))
    asked = []
    monkeypatch.setattr(layer.util, "confirmOkCancelDisplay", lambda text, *a, **k: asked.append(text) or True)
    installed = []
    if layer.packaging is not None:
        monkeypatch.setattr(layer.packaging, "pip_ensure", lambda reqs, **k: installed.append((reqs, k)))
    else:
        monkeypatch.setattr(layer.util, "pip_install", lambda reqs: installed.append((reqs, {})))
    monkeypatch.setattr(lib.slicer_support, "missing_requirements",
                        lambda reqs, _calls=[]: (_calls.append(1), list(reqs) if len(_calls) == 1 else [])[1])
    assert lib.ensureDependencies("Test", ["some-package>=1"], torchNeededBy="Test models") is True
    assert len(asked) == 1 and "some-package>=1" in asked[0] and lib.TORCH_LISTING in asked[0]
    assert calls == [("torch", False, lib.slicer_support.TORCH_VERSION_REQUIREMENT)]
    assert installed and installed[0][0] == ["some-package>=1"]
    if layer.packaging is not None:
        assert installed[0][1]["prompt_install"] is False and installed[0][1]["skip_in_testing"] is False
