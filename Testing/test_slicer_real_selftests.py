"""The modules' own in-Slicer self-tests (``<Module>Test.runTest``) on Slicer's REAL Python layer.

Issue 12, item 5: each self-test first installs what it needs through the module's own install
path (here everything is installed, so nothing is asked) and then runs its cases, the background
runs included, on Slicer 5.10.0's and 5.12.3's own ``util.py`` / ``ScriptedLoadableModule.py`` /
``SampleData.py`` over ``slicer-core``'s MRML. No widget behaviour is checked: ``delayDisplay``
(a Qt message box) only prints here, and the ``qt.QTimer`` that polls a background run is
emulated by ``slicer.app.processEvents()`` of the headless stand-in, which calls the run's
``poll()`` as the timer would (see ``Testing/slicer_api/real_layer.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "slicer_api"))
import real_layer  # noqa: E402

slicer = real_layer.require_or_skip()

CASES = [("DSCDeconvolution", "v5.10.0"), ("DSCDeconvolution", "v5.12.3"),
         ("DiffusionRelaxation", "v5.10.0"), ("DiffusionRelaxation", "v5.12.3"),
         ("PRMPredictor", "v5.10.0"),
         pytest.param("PRMPredictor", "v5.12.3", marks=pytest.mark.slow),
         pytest.param("PerfusionTranslation", "v5.10.0", marks=pytest.mark.slow),  # trains a small model
         pytest.param("PerfusionTranslation", "v5.12.3", marks=pytest.mark.slow)]


class _TorchInstalled:
    """Stand-in for the PyTorch extension's PyTorchUtilsLogic when torch is already installed."""

    @staticmethod
    def torchInstalled():
        return True


@pytest.mark.parametrize("module,version", CASES)
def test_module_self_test_passes(scene, monkeypatch, module, version):
    with real_layer.slicer_layer(version, scene) as layer:
        layer.sample_data()  # "import SampleData" inside the self-tests finds Slicer's real module
        lib = __import__("PerfusionAISlicerLib")
        monkeypatch.setattr(lib.BackgroundRun, "_startPolling", lambda self: layer.app.timers.append(self.poll))
        if module == "PerfusionTranslation":
            # torch is installed here; the PyTorch extension that would install it in Slicer is not,
            # so its logic is stood in for by one that finds torch installed
            import types

            monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=_TorchInstalled))
        mod = layer.load_module(module)
        test_class = getattr(mod, module + "Test")
        shown = []
        monkeypatch.setattr(test_class, "delayDisplay", lambda self, message, *a, **k: shown.append(message))
        test_class().runTest()
        assert not any("SKIPPED" in message for message in shown), shown
        assert shown, "the self-test ran no case"
        assert not layer.app.timers, "a background run was left polling"
