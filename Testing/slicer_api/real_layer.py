"""Slicer's own pure-Python layer (5.10.0 and 5.12.3) on top of slicer-core's real MRML, for tests.

``../shared/external/slicer/`` (beside the repository; see its README) holds unmodified copies of
Slicer's ``util.py``, ``i18n.py``, ``ScriptedLoadableModule.py``, ``packaging.py`` (5.12 only),
``parameterNodeWrapper/`` and ``SampleData.py``. :func:`slicer_layer` loads one version of them as
``slicer.util``, ``slicer.parameterNodeWrapper``, ... into the ``slicer`` package of the
``slicer-core`` wheel (the real MRML classes) and undoes everything when the block ends.

What is *not* Slicer's code here, and why:

* ``qt`` and ``ctk`` are empty placeholder modules. Slicer's Python names some Qt/CTK widget
  classes at import time (base classes, annotations); each name it asks for while Slicer's own
  files are imported becomes an empty class, recorded in :attr:`Layer.placeholders`. After that
  the modules are frozen: any other name raises AttributeError, so our modules get no
  placeholder at all. No widget behaviour is emulated or tested: a placeholder has no methods,
  so any code that really uses a widget fails loudly.
* ``slicer.qMRML*`` / ``slicer.qSlicer*`` widget classes named at import time are placeholders
  the same way.
* ``slicer.modules.sequences.logic()`` and ``slicer.modules.plots.logic()`` are slicer-core's real
  ``vtkSlicerSequencesLogic`` (the ``scene`` fixture's) and ``vtkSlicerPlotsLogic``, as the
  application's Sequences and Plots modules provide them.
* ``slicer.app`` is :class:`HeadlessApplication`: the few application calls the non-GUI code
  makes (``translate``, ``testingEnabled``, ``layoutManager() -> None`` as with
  ``--no-main-window``, ``temporaryPath``, ``startupEnvironment``, ``connect`` of application
  signals, recorded so a test can emit ``startupCompleted()``), and ``coreIOManager()`` whose
  ``loadNodes`` reads files with slicer-core's real MRML storage nodes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXTERNAL = REPO.parent / "shared" / "external" / "slicer"
VERSIONS = ("v5.10.0", "v5.12.3")
MODULE_NAMES = ("DSCDeconvolution", "PRMPredictor", "PerfusionTranslation", "DiffusionRelaxation")

SKIP_REASON = (f"{EXTERNAL} (Slicer's own Python and CMake code, see shared/external/slicer/README.md) is absent; "
               "these tests run Slicer's real code and need it")


def available() -> bool:
    return all((EXTERNAL / v / "Base" / "Python" / "slicer" / "util.py").is_file() for v in VERSIONS)


def polled_layer(version: str, scene, monkeypatch):
    """:func:`slicer_layer` for tests that drive background runs themselves: inside Slicer a qt.QTimer
    calls ``BackgroundRun.poll()``; here the test calls it (:func:`follow`). A context manager."""
    @contextlib.contextmanager
    def _layer():
        with slicer_layer(version, scene) as loaded:
            lib = sys.modules.get("PerfusionAISlicerLib") or __import__("PerfusionAISlicerLib")
            monkeypatch.setattr(lib.BackgroundRun, "_startPolling", lambda self: None)
            yield loaded

    return _layer()


def follow(run, timeout: float = 120.0) -> None:
    """Poll a background run until it has finished (fails the test after ``timeout`` s)."""
    import time

    deadline = time.time() + timeout
    while not run.poll():
        assert time.time() < deadline, "the background run did not finish"
        time.sleep(0.05)


def require_or_skip():
    """The ``slicer`` package of slicer-core, or skip the calling test module (at import) with the reason:
    slicer-core is not installed, the installed ``slicer`` is another package, or Slicer's own code is
    absent (:data:`SKIP_REASON`)."""
    import pytest

    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML classes for Python) is not installed")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
    if not available():
        pytest.skip(SKIP_REASON, allow_module_level=True)
    return slicer


def python_dir(version: str) -> Path:
    return EXTERNAL / version / "Base" / "Python" / "slicer"


class _Placeholders(types.ModuleType):
    """A module whose every public attribute is an empty class, created (and recorded) on first use."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["named"] = set()
        self.__dict__["frozen"] = False

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        if self.__dict__["frozen"]:
            raise AttributeError(f"{self.__name__}.{attr}: no placeholder (only the classes Slicer's own Python "
                                 "names at import time have one; this test checks no widget behaviour)")
        cls = type(attr, (), {"__doc__": "empty placeholder (no widget behaviour)", "__module__": self.__name__})
        self.__dict__[attr] = cls
        self.__dict__["named"].add(attr)
        return cls


class _IOManager:
    """``slicer.app.coreIOManager()`` for the file types the sample-data path loads, via real MRML storage nodes."""

    def __init__(self, app):
        self.app = app

    def fileType(self, fileName):  # noqa: N802 (Slicer's name)
        name = str(fileName).lower()
        if name.endswith(".seq.nrrd"):
            return "SequenceFile"
        if name.endswith(".seg.nrrd"):
            return "SegmentationFile"
        return "VolumeFile"

    def loadNodes(self, fileType, properties, loadedNodes):  # noqa: N802
        import slicer

        scene = slicer.mrmlScene
        fileName = properties["fileName"]
        name = properties.get("name") or Path(fileName).name.split(".")[0]
        if fileType == "SequenceFile":
            node, storage = slicer.vtkMRMLSequenceNode(), slicer.vtkMRMLVolumeSequenceStorageNode()
        elif fileType == "SegmentationFile":
            node, storage = slicer.vtkMRMLSegmentationNode(), slicer.vtkMRMLSegmentationStorageNode()
        else:
            node = slicer.vtkMRMLLabelMapVolumeNode() if properties.get("labelmap") else slicer.vtkMRMLScalarVolumeNode()
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        node.SetName(name)
        scene.AddNode(node)
        scene.AddNode(storage)
        storage.SetFileName(fileName)
        node.SetAndObserveStorageNodeID(storage.GetID())
        if not storage.ReadData(node):
            scene.RemoveNode(node)
            return False
        if fileType == "SequenceFile":
            browser = slicer.vtkMRMLSequenceBrowserNode()
            browser.SetName(name + " browser")
            scene.AddNode(browser)
            browser.SetAndObserveMasterSequenceNodeID(node.GetID())
            logic = getattr(scene, "sequences_logic", None)
            if logic is not None:
                logic.UpdateProxyNodesFromSequences(browser)
        self.app.loadedFiles.append((fileType, fileName))
        loadedNodes.AddItem(node)
        return True


class HeadlessApplication:
    """The application object of a ``--no-main-window`` run, reduced to what non-GUI code calls."""

    def __init__(self, temporary_path: str, testing: bool = True):
        self.temporaryPath = temporary_path
        self.cachePath = os.path.join(temporary_path, "cache")
        self._testing = testing
        self.connections: list[tuple[str, object]] = []
        #: callables a QTimer would call from the event loop; processEvents() calls each once
        self.timers: list = []
        self.loadedFiles: list[tuple[str, str]] = []
        self._io = _IOManager(self)

    def translate(self, context, text):
        return text

    def testingEnabled(self):  # noqa: N802
        return self._testing

    def layoutManager(self):  # noqa: N802
        return None

    def processEvents(self, *args):  # noqa: N802
        """One turn of the event loop: call each registered timer callback (dropped once it returns True)."""
        self.timers = [timer for timer in list(self.timers) if not timer()]

    def startupEnvironment(self):  # noqa: N802
        return _ProcessEnvironment(dict(os.environ))

    def coreIOManager(self):  # noqa: N802
        return self._io

    def connect(self, signal, slot):
        self.connections.append((signal, slot))
        return True

    def emit(self, signal):
        """Call every slot connected to the application ``signal`` (e.g. "startupCompleted()")."""
        for connected, slot in list(self.connections):
            if connected == signal:
                slot()


class _ProcessEnvironment:
    """What ``slicer.app.startupEnvironment()`` returns (a QProcessEnvironment), for util.startupEnvironment."""

    def __init__(self, env):
        self._env = env

    def keys(self):
        return list(self._env)

    def value(self, key, default=""):
        return self._env.get(key, default)

    def toStringList(self):  # noqa: N802
        return [f"{k}={v}" for k, v in self._env.items()]


class Layer:
    """One loaded Slicer Python layer: ``slicer`` (the package), ``util``, ``packaging`` (None on 5.10), ..."""

    def __init__(self, version, slicer, qt, ctk, app, scene):
        self.version = version
        self.slicer = slicer
        self.qt = qt
        self.ctk = ctk
        self.app = app
        self.scene = scene
        self.util = slicer.util
        self.packaging = getattr(slicer, "packaging", None)
        self.slicer_placeholders: set[str] = set()
        self.slicer_frozen = [False]
        self.modules: dict[str, types.ModuleType] = {}

    @property
    def placeholders(self) -> dict[str, set[str]]:
        return {"qt": set(self.qt.named), "ctk": set(self.ctk.named), "slicer": set(self.slicer_placeholders)}

    def load_module(self, name: str) -> types.ModuleType:
        """Import one of our module files (``<name>/<name>.py``) the way Slicer does (by path)."""
        if name not in self.modules:
            self.modules[name] = _load(name, REPO / name / f"{name}.py")
        return self.modules[name]

    def sample_data(self) -> types.ModuleType:
        """Slicer's real SampleData module of this version (the classes it names at import get placeholders)."""
        if "SampleData" not in self.modules:
            self._freeze(False)
            try:
                self.modules["SampleData"] = _load("SampleData", EXTERNAL / self.version / "Modules" / "Scripted" /
                                                   "SampleData" / "SampleData.py")
            finally:
                self._freeze(True)
        return self.modules["SampleData"]

    def _freeze(self, frozen: bool) -> None:
        self.qt.__dict__["frozen"] = self.ctk.__dict__["frozen"] = frozen
        self.slicer_frozen[0] = frozen


def _load(fullname: str, path: Path, package: bool = False) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        fullname, path, submodule_search_locations=[str(path.parent)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[fullname] = module
    spec.loader.exec_module(module)
    return module


_OWNED_PREFIXES = ("slicer.util", "slicer.i18n", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule",
                   "slicer.packaging", "qt", "ctk", "SampleData", "PerfusionAISlicerLib") + MODULE_NAMES


def _owned(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _OWNED_PREFIXES)


@contextlib.contextmanager
def slicer_layer(version: str, scene, testing: bool = True):
    """Load Slicer ``version``'s Python layer onto slicer-core for the duration of the block.

    ``scene`` is a real ``vtkMRMLScene`` (the ``scene`` fixture), set as ``slicer.mrmlScene``.
    Yields a :class:`Layer`; ``sys.modules``, ``sys.path`` and the ``slicer`` package are
    restored afterwards, so other tests see slicer-core unchanged.
    """
    import slicer

    saved_attrs = dict(slicer.__dict__)
    saved_modules = {k: v for k, v in sys.modules.items() if _owned(k)}
    saved_path = list(sys.path)
    for k in list(saved_modules):
        del sys.modules[k]
    tmp = tempfile.TemporaryDirectory(prefix=f"slicer-{version}-")
    try:
        qt, ctk = _Placeholders("qt"), _Placeholders("ctk")
        sys.modules["qt"], sys.modules["ctk"] = qt, ctk
        app = HeadlessApplication(tmp.name, testing=testing)
        slicer.app = app
        slicer.mrmlScene = scene
        saved_cache_manager = scene.GetCacheManager()
        if saved_cache_manager is None:  # the application gives its scene one (SampleData's download cache)
            cache_manager = slicer.vtkCacheManager()
            cache_manager.SetRemoteCacheDirectory(os.path.join(tmp.name, "RemoteIO"))
            os.makedirs(os.path.join(tmp.name, "RemoteIO"), exist_ok=True)
            scene.SetCacheManager(cache_manager)
        slicer.modules = types.SimpleNamespace()
        if getattr(scene, "sequences_logic", None) is not None:
            # the Sequences module's logic, as slicer.modules.sequences.logic() gives it in the application
            slicer.modules.sequences = types.SimpleNamespace(logic=lambda: scene.sequences_logic)
        plots = slicer.vtkSlicerPlotsLogic()
        plots.SetMRMLScene(scene)
        slicer.modules.plots = types.SimpleNamespace(logic=lambda: plots)
        slicer.selfTests = {}
        layer_names: set[str] = set()
        frozen = [False]

        def widget_placeholder(attr):
            if attr.startswith(("qMRML", "qSlicer")) and not frozen[0]:
                cls = type(attr, (), {"__doc__": "empty placeholder (no widget behaviour)"})
                setattr(slicer, attr, cls)
                layer_names.add(attr)
                return cls
            raise AttributeError(f"module 'slicer' has no attribute {attr!r}")

        slicer.__getattr__ = widget_placeholder
        base = python_dir(version)
        for short in ("i18n", "util"):
            setattr(slicer, short, _load(f"slicer.{short}", base / f"{short}.py"))
        slicer.parameterNodeWrapper = _load("slicer.parameterNodeWrapper", base / "parameterNodeWrapper" /
                                            "__init__.py", package=True)
        if (base / "packaging.py").is_file():
            slicer.packaging = _load("slicer.packaging", base / "packaging.py")
        else:
            slicer.__dict__.pop("packaging", None)
        slicer.ScriptedLoadableModule = _load("slicer.ScriptedLoadableModule", base / "ScriptedLoadableModule.py")
        # A source checkout as Slicer sees it: the module folders and the checkout root (PerfusionAISlicerLib).
        sys.path[:0] = [str(REPO)] + [str(REPO / m) for m in MODULE_NAMES]
        layer = Layer(version, slicer, qt, ctk, app, scene)
        layer.slicer_placeholders = layer_names
        layer.slicer_frozen = frozen
        # Slicer's own layer is imported: from here on no new placeholder is made (our modules get none)
        layer._freeze(True)
        yield layer
    finally:
        for k in [k for k in sys.modules if _owned(k)]:
            del sys.modules[k]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        for k in [k for k in slicer.__dict__ if k not in saved_attrs]:
            del slicer.__dict__[k]
        slicer.__dict__.update(saved_attrs)
        if "saved_cache_manager" in locals():
            scene.SetCacheManager(saved_cache_manager)
        if "plots" in locals():
            plots.SetMRMLScene(None)
        tmp.cleanup()
