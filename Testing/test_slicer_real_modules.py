"""The four module files on Slicer's REAL Python layer of 5.10.0 and 5.12.3 (issue 12, item 4).

Each test loads Slicer's own ``util.py``, ``i18n.py``, ``ScriptedLoadableModule.py``,
``packaging.py`` (5.12), ``parameterNodeWrapper/`` and ``SampleData.py`` (unmodified copies in
``../shared/external/slicer/``) on top of ``slicer-core``'s real MRML classes, then imports our
module files by path as Slicer does (see ``Testing/slicer_api/real_layer.py``).

These tests check NO widget behaviour: the Qt/CTK widget classes that Slicer's Python names at
import time are empty placeholders (and ``test_only_slicer_names_widget_placeholders`` checks that
our modules add none); ``slicer.app`` is a headless stand-in for the few application calls that
non-GUI code makes. What they do check is Slicer's own code: the parameter-node wrapper writing
defaults and round-tripping every field (node references included) on a real
``vtkMRMLScriptedModuleNode``, every ``slicer.util`` / ``slicer.packaging`` call binding to that
version's real signature, and the sample data loading through SampleData's scripted path.
"""

from __future__ import annotations

import ast
import enum
import inspect
import pathlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "slicer_api"))
import real_layer  # noqa: E402

slicer = real_layer.require_or_skip()

REPO = real_layer.REPO
VERSIONS = real_layer.VERSIONS
MODULES = real_layer.MODULE_NAMES
#: Files that run inside Slicer and call slicer.util / slicer.packaging.
SLICER_SIDE_FILES = [REPO / m / f"{m}.py" for m in MODULES] + [REPO / "PerfusionAISlicerLib" / "__init__.py",
                                                                  REPO / "perfusionai" / "mrml.py"]


@pytest.fixture(params=VERSIONS)
def layer(request, scene):
    with real_layer.slicer_layer(request.param, scene) as loaded:
        yield loaded


# --------------------------------------------------------------------------------------
# parameter nodes


def _sample_values(layer, info, scene):
    """Values to write into one parameter (all differ from its default), from its real annotations."""
    pnw_util = sys.modules["slicer.parameterNodeWrapper.util"]
    validators = sys.modules["slicer.parameterNodeWrapper.validators"]
    datatype, annotations = pnw_util.splitAnnotations(info.unalteredType)
    default = info.default.value
    if pnw_util.isNodeOrUnionOfNodes(info.unalteredType):
        values = [scene.AddNewNodeByClass(name) for name in pnw_util.getNodeTypes(info.unalteredType)]
        return values + [values[0], None]
    choice = pnw_util.findFirstAnnotation(annotations, validators.Choice)
    if choice is not None:
        return [c for c in choice.choices if c != default]
    if datatype is bool:
        return [not default, default]
    if isinstance(datatype, type) and issubclass(datatype, enum.Enum):
        return [m for m in datatype if m != default]
    if datatype in (int, float):
        within = pnw_util.findFirstAnnotation(annotations, validators.WithinRange)
        lo, hi = (within.minimum, within.maximum) if within else (0, 100)
        values = [lo + 0.37 * (hi - lo), hi, lo]
        values = [datatype(round(v)) if datatype is int else datatype(v) for v in values]
        return [v for v in values if v != default]
    if datatype is str:
        return ["a value with spaces, commas; and ünïcode"]
    if isinstance(datatype, type) and issubclass(datatype, pathlib.PurePath):
        return [datatype("/data/models/phae model"), datatype("relative/model.zip")]
    raise AssertionError(f"{info.basename}: no sample values for type {info.unalteredType!r}")


def _same(a, b):
    if hasattr(a, "GetID") or hasattr(b, "GetID"):
        return (a is None and b is None) or (a is not None and b is not None and a.GetID() == b.GetID())
    return a == b


@pytest.mark.parametrize("module", MODULES)
def test_parameter_node_binds_and_round_trips_every_field(layer, scene, module):
    mod = layer.load_module(module)
    cls = getattr(mod, module + "ParameterNode")
    logic = getattr(mod, module + "Logic")()
    wrapped = logic.getParameterNode()  # the module's own path: singleton vtkMRMLScriptedModuleNode
    assert isinstance(wrapped, cls)
    node = wrapped.parameterNode
    assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetAttribute("ModuleName") == module
    assert cls.allParameters, module
    for name, info in cls.allParameters.items():
        assert _same(getattr(wrapped, name), info.default.value), f"{module}.{name}: default not written"
        if isinstance(info.default.value, pathlib.PurePath):
            assert str(info.default.value) not in (".",), f"{module}.{name}: an empty path reads '.'"
        for value in _sample_values(layer, info, scene):
            setattr(wrapped, name, value)
            fresh = cls(node)  # a new wrapper reads what the first one wrote into the MRML node
            assert _same(getattr(fresh, name), value), f"{module}.{name}: wrote {value!r}, read {getattr(fresh, name)!r}"


@pytest.mark.parametrize("module", MODULES)
def test_parameter_node_survives_a_scene_save_and_load(layer, scene, module):
    """Node references and values go through MRML's own XML serialisation (a scene saved and reopened)."""
    mod = layer.load_module(module)
    cls = getattr(mod, module + "ParameterNode")
    wrapped = getattr(mod, module + "Logic")().getParameterNode()
    written = {}
    for name, info in cls.allParameters.items():
        value = _sample_values(layer, info, scene)[0]
        setattr(wrapped, name, value)
        written[name] = value.GetID() if hasattr(value, "GetID") else value
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    reopened = slicer.vtkMRMLScene()
    reopened.SetLoadFromXMLString(1)
    reopened.SetSceneXMLString(xml)
    reopened.Import()
    try:
        node = reopened.GetSingletonNode(module, "vtkMRMLScriptedModuleNode")
        assert node is not None
        back = cls(node)
        for name, value in written.items():
            got = getattr(back, name)
            got = got.GetID() if hasattr(got, "GetID") else got
            assert got == value, f"{module}.{name}: {value!r} saved, {got!r} reopened"
    finally:
        reopened.Clear(1)


def test_only_slicer_names_widget_placeholders(scene):
    """The placeholders are only what Slicer's own Python names at import time; our modules add none."""
    for version in VERSIONS:
        with real_layer.slicer_layer(version, scene) as layer:
            before = layer.placeholders
            for module in MODULES:
                layer.load_module(module)
            assert layer.placeholders == before, (version, before, layer.placeholders)
            assert before["slicer"] <= {"qMRMLNodeComboBox"}, before


# --------------------------------------------------------------------------------------
# every call into slicer.util / slicer.packaging binds to the real signatures


class _Call:
    def __init__(self, path, node, namespace, name, guarded):
        self.path, self.node, self.namespace, self.name, self.guarded = path, node, namespace, name, guarded

    def where(self):
        return f"{self.path.relative_to(REPO)}:{self.node.lineno} {self.namespace}.{self.name}"


def _calls_into_slicer(path: Path) -> list[_Call]:
    """Calls of slicer.util.X / slicer.packaging.X (also through ``import slicer.packaging as p`` and
    ``from slicer.util import X``); ``guarded``: inside a try whose handlers catch ImportError."""
    tree = ast.parse(path.read_text())
    aliases = {}  # local name -> namespace ("slicer.util" / "slicer.packaging")
    direct = {}  # local function name -> (namespace, name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("slicer.util", "slicer.packaging") and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module in ("slicer.util", "slicer.packaging"):
            for a in node.names:
                direct[a.asname or a.name] = (node.module, a.name)
        elif isinstance(node, ast.ImportFrom) and node.module == "slicer":
            for a in node.names:
                if a.name in ("util", "packaging"):
                    aliases[a.asname or a.name] = f"slicer.{a.name}"

    guarded_ranges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
            if "ImportError" in caught or "ModuleNotFoundError" in caught:
                guarded_ranges.append((node.lineno, node.end_lineno))
    # a function that returns early when packaging is None after such a guard counts as guarded too
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]

    def guarded(lineno):
        if any(a <= lineno <= b for a, b in guarded_ranges):
            return True
        for f in functions:
            if f.lineno <= lineno <= f.end_lineno and any(f.lineno <= a <= f.end_lineno for a, _ in guarded_ranges):
                return True
        return False

    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = ast.unparse(func.value)
            namespace = owner if owner in ("slicer.util", "slicer.packaging") else aliases.get(owner)
            if namespace:
                calls.append(_Call(path, node, namespace, func.attr, guarded(node.lineno)))
        elif isinstance(func, ast.Name) and func.id in direct:
            namespace, name = direct[func.id]
            calls.append(_Call(path, node, namespace, name, guarded(node.lineno)))
    return calls


def test_call_finder_sees_the_calls():
    calls = {c.name for p in SLICER_SIDE_FILES for c in _calls_into_slicer(p)}
    assert {"loadUI", "childWidgetVariables", "launchConsoleProcess", "setSliceViewerLayers"} <= calls, calls


def _bind(function, call: ast.Call):
    signature = inspect.signature(function)
    args = [object() for a in call.args if not isinstance(a, ast.Starred)]
    kwargs = {k.arg: object() for k in call.keywords if k.arg is not None}
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        signature.bind_partial(*args, **kwargs)  # *args / **kwargs at the call: check what is named
    else:
        signature.bind(*args, **kwargs)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_slicer_util_and_packaging_call_binds(scene, version):
    with real_layer.slicer_layer(version, scene) as layer:
        problems = []
        for path in SLICER_SIDE_FILES:
            for call in _calls_into_slicer(path):
                namespace = layer.util if call.namespace == "slicer.util" else layer.packaging
                if namespace is None:
                    if not call.guarded:
                        problems.append(f"{call.where()}: slicer.packaging does not exist in {version} "
                                        "and the call is not behind an ImportError guard")
                    continue
                function = getattr(namespace, call.name, None)
                if function is None:
                    problems.append(f"{call.where()}: not in {version}")
                    continue
                try:
                    _bind(function, call.node)
                except TypeError as exc:
                    problems.append(f"{call.where()}{inspect.signature(function)}: {exc}")
        assert not problems, "\n".join(problems)


def test_binding_check_fails_on_a_keyword_that_5_10_lacks(scene, tmp_path):
    """The check itself: the 5.12-only keywords of launchConsoleProcess do not bind on 5.10."""
    bad = tmp_path / "bad.py"
    bad.write_text("import slicer\nslicer.util.launchConsoleProcess(['x'], blocking=False, logCallback=print)\n")
    call = _calls_into_slicer(bad)[0]
    with real_layer.slicer_layer("v5.10.0", scene) as layer:
        with pytest.raises(TypeError):
            _bind(layer.util.launchConsoleProcess, call.node)
    with real_layer.slicer_layer("v5.12.3", scene) as layer:
        _bind(layer.util.launchConsoleProcess, call.node)


# --------------------------------------------------------------------------------------
# sample data through SampleData's scripted path


def test_dsc_phantom_loads_through_sampledata_download_sample(layer, scene):
    """``SampleData.downloadSample("DSCPhantom")`` from a script: Slicer's own SampleData code of each
    version downloads the registered URIs (our rewrite rule turns them into generated files) and
    loads them with the real MRML storage nodes; the custom downloader of the button is not used."""
    sample_data = layer.sample_data()
    mod = layer.load_module("DSCDeconvolution")
    mod.registerSampleData()
    series = sample_data.downloadSample("DSCPhantom")
    assert series is not None and series.IsA("vtkMRMLSequenceNode"), series
    assert series.GetNumberOfDataNodes() == 50
    assert [t for t, _f in layer.app.loadedFiles] == ["SequenceFile", "SegmentationFile", "SegmentationFile"]
    brain = scene.GetFirstNodeByName("DSCPhantom brain")
    arteries = scene.GetFirstNodeByName("DSCPhantom arteries")
    assert brain.IsA("vtkMRMLSegmentationNode") and arteries.IsA("vtkMRMLSegmentationNode")
    # the loaded sample is a valid input of the module (the maps come out on the phantom's grid)
    nodes = mod.DSCDeconvolutionLogic().process(series, te=0.03, aifNode=arteries, maskNode=brain,
                                                method="oSVD", showResults=False)
    values = layer.util.arrayFromVolume(nodes["maps"]["cbf"])
    assert values.shape == (8, 32, 32) and float(values.max()) > 0
    # a second call reuses the generated files (no regeneration), as a cached download
    files = sorted(layer.app.loadedFiles)
    assert sample_data.downloadSample("DSCPhantom") is not None
    assert len(layer.app.loadedFiles) == 2 * len(files)


def _sampledata_calls(path: Path):
    """Calls ``SampleData.<f>(...)`` and ``SampleData.SampleDataLogic.<m>(...)`` in a file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            chain = ast.unparse(node.func).split(".")
            if chain[0] == "SampleData" and len(chain) in (2, 3):
                calls.append((chain, node))
    return calls


@pytest.mark.parametrize("version", VERSIONS)
def test_every_sampledata_call_binds(scene, version):
    with real_layer.slicer_layer(version, scene) as layer:
        sample_data = layer.sample_data()
        problems, seen = [], set()
        for path in SLICER_SIDE_FILES:
            for chain, node in _sampledata_calls(path):
                owner = sample_data if len(chain) == 2 else getattr(sample_data, chain[1], None)
                function = getattr(owner, chain[-1], None)
                where = f"{path.relative_to(REPO)}:{node.lineno} {'.'.join(chain)}"
                if function is None:
                    problems.append(f"{where}: not in SampleData.py of {version}")
                    continue
                seen.add(chain[-1])
                try:
                    _bind(function, node)
                except TypeError as exc:
                    problems.append(f"{where}{inspect.signature(function)}: {exc}")
        assert not problems, "\n".join(problems)
        assert {"registerCustomSampleDataSource", "registerUrlRewriteRule", "downloadSample"} <= seen, seen
