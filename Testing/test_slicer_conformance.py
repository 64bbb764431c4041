"""Static Slicer-API conformance of the extension's modules (no Slicer needed).

Every top-level folder whose CMakeLists.txt calls slicerMacroBuildScriptedModule is a
module and is checked automatically:

* Python (ast): every ``slicer.util`` function exists in the target Slicer (5.12) and its
  keyword arguments are in that version's signature; ``slicer.<X>``, ``slicer.app.<x>``,
  ``slicer.mrmlScene.<X>``, ``slicer.modules.<m>.logic().<X>``, ``slicer.packaging``,
  ``qt.<X>``, ``ctk.<X>`` and ``vtk.<X>`` names exist; every UpperCamelCase attribute
  (VTK/MRML methods, events, enums) is a known name; every ``self.ui.<widget>.<attr>``
  names a widget of the .ui and a property/signal/slot/method of its class; imports from
  ``slicer.*`` exist; the four module classes exist; no numerics in the module file.
* .ui (xml): every widget/layout class exists, every property is a property of that
  class, every connection's signal and slot exist, every SlicerParameterName is a field
  of the ``@parameterNodeWrapper`` class whose type that widget can represent.
* CMake: the module CMakeLists lists every .py and resource file of the module folder
  (and only existing files), registers the self-test; the top level adds every module.

Names come from Testing/slicer_api/slicer_api_subset.json (see PROVENANCE.md). The only
allow-list is the set of classes defined in the checked file itself.
"""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_PATH = Path(__file__).resolve().parent / "slicer_api" / "slicer_api_subset.json"
TARGET = "v5.12.3"

#: Attributes PythonQt adds to every QObject (not Qt API, so not in any Qt class listing).
PYTHONQT_QOBJECT_EXTRAS = {"connect", "disconnect", "className", "delete", "findChild", "findChildren", "name"}
#: Extension APIs checked by running their real code (Testing/test_slicer_real_modules.py), not by the index.
REAL_CODE_CHECKED = {"SampleData"}
#: Names of the application-only ``slicer`` namespace (slicer_namespace_runtime_attributes) and its submodules.
SLICER_NAMESPACE = {"app", "mrmlScene", "modules", "moduleNames", "selfTests", "util", "packaging", "i18n",
                    "testing", "cli", "parameterNodeWrapper", "ScriptedLoadableModule"}
SLICER_SUBMODULES = {"util": "slicer.util", "packaging": "slicer.packaging", "i18n": "slicer.i18n",
                     "testing": "slicer.testing", "cli": "slicer.cli",
                     "ScriptedLoadableModule": "slicer.ScriptedLoadableModule",
                     "parameterNodeWrapper": "slicer.parameterNodeWrapper"}
NUMERICS = re.compile(r"np\.linalg|np\.fft|numpy\.linalg|numpy\.fft|convolve|einsum|\bscipy\b|torch\.nn|"
                      r"^\s*import numpy|^\s*from numpy", re.M)


# --------------------------------------------------------------------------------------
# the API index


class Api:
    """Name lookups over the vendored index."""

    def __init__(self, data: dict, target: str = TARGET):
        self.data = data
        self.target = target
        self.vtk = data["vtk_wrapped_classes"]
        self.vtk_base = data["vtk_base_classes"]["classes"]
        self.qt = {**data["qt_base_classes"]["classes"], **data["qt_classes_ctk"], **data["qt_classes_slicer"]}
        self.modules = data["python_modules"]
        names = set()
        for c in self.vtk.values():
            names.update(c["methods"], c["enums"])
        for c in self.vtk_base.values():
            names.update(c["methods"])
        self.all_vtk_names = names
        self.known_classes = set(self.vtk) | set(self.vtk_base) | set(self.qt)

    def vtk_members(self, cls: str) -> set:
        out, seen = set(), set()
        while cls and cls not in seen:
            seen.add(cls)
            entry = self.vtk.get(cls) or self.vtk_base.get(cls)
            if entry is None:
                break
            out.update(entry["methods"], entry.get("enums", []))
            cls = entry.get("superclass")
        return out

    def qt_members(self, cls: str) -> set:
        out, seen = set(PYTHONQT_QOBJECT_EXTRAS), set()
        while cls and cls not in seen:
            seen.add(cls)
            entry = self.qt.get(cls)
            if entry is None:
                break
            for key in ("properties", "slots", "invokables", "methods", "pythonqt_decorator_methods",
                        "pythonqt_decorator_static_methods"):
                out.update(entry.get(key) or [])
            out.update(s.split("(")[0] for s in entry.get("signals") or [])
            cls = entry.get("superclass")
        return out

    def qt_properties(self, cls: str) -> set:
        out, seen = set(), set()
        while cls and cls not in seen:
            seen.add(cls)
            entry = self.qt.get(cls)
            if entry is None:
                break
            out.update(entry.get("properties") or [])
            cls = entry.get("superclass")
        return out

    def python_symbol(self, module: str, name: str) -> Optional[dict]:
        """The index entry of ``module.name`` (function, class or export), or None."""
        mod = self.modules.get(module)
        if mod is None:
            return None
        for kind in ("functions", "classes"):
            if name in mod.get(kind, {}):
                return mod[kind][name]
        if name in (mod.get("exports") or []) or name in (mod.get("constants") or []):
            return {"in": mod["present_in"]}
        return None

    def signature_params(self, module: str, name: str) -> Optional[tuple[set, bool]]:
        """Parameter names of ``module.name`` in the target version, and whether it takes **kwargs."""
        entry = self.python_symbol(module, name)
        if not entry or "signature" not in entry:
            return None
        signature = entry["signature"]
        for sig, versions in (entry.get("signature_by_version") or {}).items():
            if self.target in versions:
                signature = sig
        args = ast.parse(f"def f{signature}: pass").body[0].args
        names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
        return names, args.kwarg is not None


@lru_cache(maxsize=1)
def load_api_data() -> dict:
    return json.loads(API_PATH.read_text())


def api(target: str = TARGET) -> Api:
    return Api(load_api_data(), target)


# --------------------------------------------------------------------------------------
# module discovery


def module_dirs() -> list[Path]:
    found = []
    for cmake in sorted(ROOT.glob("*/CMakeLists.txt")):
        if "slicerMacroBuildScriptedModule" in cmake.read_text():
            found.append(cmake.parent)
    return found


# --------------------------------------------------------------------------------------
# Python checks


def _dotted(node) -> Optional[list[str]]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


@dataclass
class PythonFacts:
    own_classes: set = field(default_factory=set)
    aliases: dict = field(default_factory=dict)  # local name -> dotted module/object
    parameter_fields: dict = field(default_factory=dict)  # wrapper class -> {field: annotation source}


def _collect_facts(tree: ast.Module) -> PythonFacts:
    facts = PythonFacts()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            facts.own_classes.add(node.name)
            decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", None) for d in node.decorator_list}
            if "parameterNodeWrapper" in decorators:
                fields = {}
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        fields[stmt.target.id] = ast.unparse(stmt.annotation)
                facts.parameter_fields[node.name] = fields
        elif isinstance(node, ast.Import):
            for alias in node.names:
                facts.aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                    alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                facts.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return facts


def check_python_source(source: str, filename: str, a: Api, ui_widgets: Optional[dict] = None,
                        module_file: bool = True) -> list[str]:
    """Problems with the Slicer API use of one Python file (empty list: conforming).

    ``ui_widgets`` maps widget names of the module's .ui to their classes (for ``self.ui.X.y``).
    """
    problems: list[str] = []
    tree = ast.parse(source, filename)
    facts = _collect_facts(tree)

    def report(node, text):
        problems.append(f"{filename}:{getattr(node, 'lineno', 0)}: {text}")

    own_modules = {name for name, target in facts.aliases.items() if target.startswith("perfusionai")}
    # SampleData is checked against Slicer's real SampleData.py of 5.10.0 and 5.12.3 (calls bound to the
    # real signatures, downloadSample run) in test_slicer_real_modules.py; the index keeps PyTorchUtils.
    extension_apis = {k: v for k, v in a.data.get("extension_apis", {}).items() if k not in REAL_CODE_CHECKED}

    # imports from slicer.*
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "slicer"
                                                                 or node.module.startswith("slicer.")):
            for alias in node.names:
                name = alias.name
                if name == "*":
                    continue
                if node.module == "slicer":
                    if name not in a.known_classes and name not in SLICER_NAMESPACE:
                        report(node, f"'from slicer import {name}': no such class or submodule in Slicer")
                elif a.python_symbol(node.module, name) is None:
                    report(node, f"'from {node.module} import {name}': not in {node.module}")
                elif a.target not in a.python_symbol(node.module, name)["in"]:
                    report(node, f"{node.module}.{name} is not in Slicer {a.target}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("slicer.") and alias.name not in a.modules:
                    report(node, f"'import {alias.name}': no such Slicer module")
                elif alias.name in a.modules and a.target not in a.modules[alias.name]["present_in"]:
                    report(node, f"'import {alias.name}': not in Slicer {a.target}")

    checked_attr_nodes = set()

    def check_symbol(node, module: str, name: str) -> None:
        entry = a.python_symbol(module, name)
        if entry is None:
            report(node, f"{module}.{name} does not exist in Slicer")
        elif a.target not in entry["in"]:
            report(node, f"{module}.{name} is not available in Slicer {a.target}")

    def check_chain(node, chain: list[str]) -> None:
        head = facts.aliases.get(chain[0], chain[0])
        if head in ("slicer",) and len(chain) >= 2:
            second = chain[1]
            if second in SLICER_SUBMODULES and len(chain) >= 3:
                check_symbol(node, SLICER_SUBMODULES[second], chain[2])
            elif second == "app" and len(chain) >= 3:
                if chain[2] not in a.qt_members("qSlicerApplication"):
                    report(node, f"slicer.app.{chain[2]} is not a qSlicerApplication member")
            elif second == "mrmlScene" and len(chain) >= 3:
                if chain[2] not in a.vtk_members("vtkMRMLScene"):
                    report(node, f"slicer.mrmlScene.{chain[2]} is not a vtkMRMLScene member")
            elif second == "modules" and len(chain) >= 4:
                if chain[3] != "logic":
                    report(node, f"slicer.modules.{chain[2]}.{chain[3]} cannot be checked against the index; "
                                 f"use the module logic")
            elif second not in SLICER_NAMESPACE and second not in a.known_classes:
                report(node, f"slicer.{second} does not exist in Slicer")
        elif head.startswith("slicer.") and head in a.modules and len(chain) >= 2:
            check_symbol(node, head, chain[1])
        elif head == "qt" and len(chain) >= 2:
            if chain[1] != "Qt" and chain[1] not in a.qt:
                report(node, f"qt.{chain[1]} is not a known Qt class")
            elif chain[1] in a.qt and len(chain) >= 3 and chain[2] not in a.qt_members(chain[1]):
                report(node, f"qt.{chain[1]}.{chain[2]} is not a member of {chain[1]}")
        elif head == "ctk" and len(chain) >= 2:
            if chain[1] not in a.qt:
                report(node, f"ctk.{chain[1]} is not a known CTK class")
        elif head == "vtk" and len(chain) >= 2:
            import vtk  # the VTK Python package Slicer bundles (9.x)

            obj = vtk
            for part in chain[1:]:
                if not hasattr(obj, part):
                    report(node, f"{'.'.join(chain)} does not exist in VTK")
                    break
                obj = getattr(obj, part)
        elif head in extension_apis and len(chain) >= 2:
            classes = extension_apis[head]["classes"]
            if chain[1] not in classes:
                report(node, f"{head}.{chain[1]} is not a known class of {head}")
            elif len(chain) >= 3 and chain[2] not in classes[chain[1]]:
                report(node, f"{head}.{chain[1]}.{chain[2]} is not a known method")

    for node in ast.walk(tree):
        # slicer.modules.<m>.logic().<X>
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call):
            inner = _dotted(node.value.func)
            if inner and len(inner) == 4 and inner[:2] == ["slicer", "modules"] and inner[3] == "logic":
                accessor = a.data["module_logic_accessors"].get(inner[2])
                checked_attr_nodes.add(id(node))
                if accessor is None:
                    report(node, f"slicer.modules.{inner[2]}.logic(): unknown module logic")
                elif node.attr not in a.vtk_members(accessor["logic_class"]):
                    report(node, f"slicer.modules.{inner[2]}.logic().{node.attr}: not a member of "
                                 f"{accessor['logic_class']}")
            elif inner and len(inner) == 2 and inner[0] in extension_apis:
                classes = extension_apis[inner[0]]["classes"]
                checked_attr_nodes.add(id(node))
                if inner[1] in classes and node.attr not in classes[inner[1]]:
                    report(node, f"{inner[0]}.{inner[1]}().{node.attr} is not a known method")
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Store):
            chain = _dotted(node)
            if chain is None:
                continue
            # Prefix chains (a.b of a.b.c) are visited too; duplicate reports are dropped below.
            check_chain(node, chain)

    # de-duplicate chain reports: a chain a.b.c also visits a.b
    problems[:] = list(dict.fromkeys(problems))

    # keyword arguments of slicer.util / slicer.packaging functions and extension APIs
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        chain = _dotted(node.func)
        if not chain:
            continue
        head = facts.aliases.get(chain[0], chain[0])
        module = None
        if head == "slicer" and len(chain) == 3 and chain[1] in SLICER_SUBMODULES:
            module, name = SLICER_SUBMODULES[chain[1]], chain[2]
        elif head in a.modules and len(chain) == 2:
            module, name = head, chain[1]
        elif head.startswith("slicer.util.") and len(chain) == 1:
            module, name = "slicer.util", head.split(".")[-1]
        if module:
            params = a.signature_params(module, name)
            if params:
                names, has_kwargs = params
                for kw in node.keywords:
                    if kw.arg is not None and kw.arg not in names and not has_kwargs:
                        report(node, f"{module}.{name}() has no keyword '{kw.arg}' in Slicer {a.target}")
                if len(node.args) > len(names) and not any(isinstance(x, ast.Starred) for x in node.args):
                    report(node, f"{module}.{name}() takes at most {len(names)} positional arguments")
        if head in extension_apis and len(chain) == 3:
            methods = extension_apis[head]["classes"].get(chain[1], {})
            allowed = methods.get(chain[2])
            if allowed is not None:
                for kw in node.keywords:
                    if kw.arg is not None and kw.arg not in allowed:
                        report(node, f"{'.'.join(chain)}() has no keyword '{kw.arg}'")
        if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Call):
            inner = _dotted(node.func.value.func)
            if inner and len(inner) == 2 and inner[0] in extension_apis:
                allowed = extension_apis[inner[0]]["classes"].get(inner[1], {}).get(node.func.attr)
                for kw in node.keywords:
                    if allowed is not None and kw.arg is not None and kw.arg not in allowed:
                        report(node, f"{inner[0]}.{inner[1]}().{node.func.attr}() has no keyword '{kw.arg}'")

    # UpperCamelCase attributes: VTK/MRML methods, events and enums, or known classes.
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr[:1].isupper():
            continue
        if id(node) in checked_attr_nodes:
            continue
        chain = _dotted(node)
        if chain:
            head = facts.aliases.get(chain[0], chain[0])
            if chain[0] in own_modules or head in ("qt", "ctk", "vtk") or head in extension_apis:
                continue  # checked above / our own package
            if chain[0] in facts.aliases and head.split(".")[0] not in ("slicer", "qt", "ctk", "vtk"):
                continue  # standard library or other non-Slicer module (e.g. pathlib.Path)
            if head == "slicer" or head.startswith("slicer."):
                continue  # checked above
        name = node.attr
        if name in facts.own_classes or name in a.all_vtk_names or name in a.known_classes:
            continue
        report(node, f"'{name}' is not a known VTK/MRML method, event or class (typo or invented API?)")

    # self.ui.<widget>.<attr>
    if ui_widgets is not None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain = _dotted(node)
                if chain and len(chain) >= 3 and chain[:2] == ["self", "ui"]:
                    widget = chain[2]
                    if widget not in ui_widgets:
                        report(node, f"self.ui.{widget}: no widget of that name in the .ui file")
                    elif len(chain) >= 4 and chain[3] not in a.qt_members(ui_widgets[widget]):
                        report(node, f"self.ui.{widget}.{chain[3]}: not a property, signal, slot or method "
                                     f"of {ui_widgets[widget]}")
    problems[:] = list(dict.fromkeys(problems))

    if module_file:
        for match in NUMERICS.finditer(source):
            line = source.count("\n", 0, match.start()) + 1
            problems.append(f"{filename}:{line}: numerics in a module file ('{match.group(0).strip()}'); "
                            f"move them to perfusionai/")
    return problems


# --------------------------------------------------------------------------------------
# .ui checks

#: Which widget class the parameterNodeWrapper binds to which field type (guiConnectors.py: exact types).
def _widget_accepts(widget_class: str, annotation: str) -> bool:
    base = annotation
    if base.startswith("Annotated["):
        base = base[len("Annotated["):].split(",", 1)[0]
    base = base.strip()
    is_node = "vtkMRML" in base and not base.startswith(("str", "int", "float", "bool"))
    rules = {
        "QCheckBox": base == "bool",
        "QPushButton": base == "bool",
        "QSpinBox": base == "int",
        "QSlider": base == "int",
        "QDoubleSpinBox": base == "float",
        "ctkSliderWidget": base == "float",
        "QComboBox": ("Choice(" in annotation and base in ("str", "int", "float", "bool")) or
                     (base not in ("str", "int", "float", "bool") and not is_node),
        "QLineEdit": base == "str",
        "QTextEdit": base == "str",
        "QLabel": base == "str",
        "ctkPathLineEdit": base.startswith("pathlib.") or base.endswith("Path"),
        "ctkDirectoryButton": base.startswith("pathlib.") or base.endswith("Path"),
        "ctkRangeWidget": "FloatRange" in base,
        "qMRMLNodeComboBox": is_node,
    }
    return rules.get(widget_class, False)


def check_ui_source(text: str, filename: str, a: Api, parameter_fields: dict) -> tuple[list[str], dict]:
    """Problems of a .ui file, and ``{widget name: class}``."""
    problems: list[str] = []
    root = ET.fromstring(text)
    widgets: dict[str, str] = {}
    for element in root.iter("widget"):
        cls, name = element.get("class"), element.get("name")
        widgets[name] = cls
        if cls not in a.qt:
            problems.append(f"{filename}: widget '{name}' has unknown class {cls}")
            continue
        known = a.qt_properties(cls)
        for prop in element.findall("property"):
            pname = prop.get("name")
            if prop.get("stdset") == "0":
                if pname == "SlicerParameterName":
                    value = prop.findtext("string")
                    all_fields = {f: ann for fields in parameter_fields.values() for f, ann in fields.items()}
                    if value not in all_fields:
                        problems.append(f"{filename}: widget '{name}' SlicerParameterName '{value}' is not a "
                                        f"field of the parameter node ({', '.join(sorted(all_fields))})")
                    elif not _widget_accepts(cls, all_fields[value]):
                        problems.append(f"{filename}: widget '{name}' ({cls}) cannot represent parameter "
                                        f"'{value}: {all_fields[value]}' (parameterNodeWrapper connectors)")
                continue
            if pname not in known:
                problems.append(f"{filename}: '{pname}' is not a property of {cls} (widget '{name}')")
    for layout in root.iter("layout"):
        cls = layout.get("class")
        if cls not in a.qt:
            problems.append(f"{filename}: layout '{layout.get('name')}' has unknown class {cls}")
    for custom in root.iter("customwidget"):
        cls = custom.findtext("class")
        if cls not in a.qt:
            problems.append(f"{filename}: custom widget class {cls} is unknown")
    for connection in root.iter("connection"):
        sender, receiver = connection.findtext("sender"), connection.findtext("receiver")
        signal, slot = connection.findtext("signal"), connection.findtext("slot")
        for role, wname, member in (("sender", sender, signal), ("receiver", receiver, slot)):
            if wname not in widgets:
                problems.append(f"{filename}: connection {role} '{wname}' is not a widget")
            elif member.split("(")[0] not in a.qt_members(widgets[wname]):
                problems.append(f"{filename}: {widgets[wname]} '{wname}' has no {'signal' if role == 'sender' else 'slot'} "
                                f"{member}")
    return problems, widgets


# --------------------------------------------------------------------------------------
# CMake checks

_SET = re.compile(r"set\(\s*(\w+)\s+(.*?)\)", re.S)
_CALL = re.compile(r"(\w+)\(\s*(.*?)\)", re.S)


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _expand(tokens: list[str], variables: dict) -> list[str]:
    out = []
    for token in tokens:
        whole = re.fullmatch(r"\$\{(\w+)\}", token)
        if whole and whole.group(1) in variables and isinstance(variables[whole.group(1)], list):
            out.extend(variables[whole.group(1)])
            continue
        out.append(re.sub(r"\$\{(\w+)\}", lambda m: str(variables.get(m.group(1), m.group(0))), token))
    return out


def check_module_cmake(module_dir: Path, a: Api, cmake_text: Optional[str] = None) -> list[str]:
    """The module CMakeLists lists every .py and resource of the folder, only existing files, and the test."""
    name = module_dir.name
    text = _strip_comments(cmake_text if cmake_text is not None else (module_dir / "CMakeLists.txt").read_text())
    problems = []
    variables: dict = {}
    for var, body in _SET.findall(text):
        tokens = body.split()
        variables[var] = tokens[0] if var == "MODULE_NAME" and len(tokens) == 1 else _expand(tokens, variables)
    if variables.get("MODULE_NAME") != name:
        problems.append(f"{name}/CMakeLists.txt: MODULE_NAME is {variables.get('MODULE_NAME')!r}, expected the "
                        f"folder name {name!r}")
    macro = a.data["cmake"]["slicerMacroBuildScriptedModule"]
    keywords = set(macro["options"]) | set(macro["one_value_args"]) | set(macro["multi_value_args"])
    scripts, resources = [], []
    calls = dict((fn, body) for fn, body in _CALL.findall(text))
    body = calls.get("slicerMacroBuildScriptedModule")
    if body is None:
        return [f"{name}/CMakeLists.txt: no slicerMacroBuildScriptedModule call"]
    current = None
    for token in _expand(body.split(), variables):
        if token.isupper() and token.replace("_", "").isalpha():
            if token not in keywords:
                problems.append(f"{name}/CMakeLists.txt: unknown slicerMacroBuildScriptedModule argument {token}")
            current = token
        elif current == "SCRIPTS":
            scripts.append(token if token.endswith(".py") else token + ".py")
        elif current == "RESOURCES":
            resources.append(token)
        elif current == "NAME" and token != name:
            problems.append(f"{name}/CMakeLists.txt: NAME {token} differs from the folder name")
    if "WITH_GENERIC_TESTS" not in body:
        problems.append(f"{name}/CMakeLists.txt: WITH_GENERIC_TESTS is missing")
    test_body = calls.get("slicer_add_python_unittest")
    if test_body is None or f"{name}.py" not in " ".join(_expand(test_body.split(), variables)):
        problems.append(f"{name}/CMakeLists.txt: the self-test is not registered "
                        f"(slicer_add_python_unittest(SCRIPT {name}.py))")
    for listed in scripts + resources:
        if not (module_dir / listed).is_file():
            problems.append(f"{name}/CMakeLists.txt lists {listed}, which does not exist")
    present_py = {p.relative_to(module_dir).as_posix() for p in module_dir.rglob("*.py")
                  if "Testing" not in p.relative_to(module_dir).parts and "__pycache__" not in p.parts}
    present_resources = {p.relative_to(module_dir).as_posix() for p in (module_dir / "Resources").rglob("*")
                         if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")} \
        if (module_dir / "Resources").is_dir() else set()
    for missing in sorted(present_py - set(scripts)):
        problems.append(f"{name}/CMakeLists.txt does not list the script {missing} (it would be missing from "
                        f"the packaged extension)")
    for missing in sorted(present_resources - set(resources) - set(scripts)):
        problems.append(f"{name}/CMakeLists.txt does not list the resource {missing}")
    return problems


def check_top_level_cmake(text: str, modules: Iterable[str], a: Api) -> list[str]:
    problems = []
    clean = _strip_comments(text)
    for module in modules:
        if not re.search(rf"add_subdirectory\(\s*{re.escape(module)}\s*\)", clean):
            problems.append(f"CMakeLists.txt: add_subdirectory({module}) is missing")
    for var in re.findall(r"set\(\s*(EXTENSION_\w+)", clean):
        if var not in a.data["extension_cmake_variables"]:
            problems.append(f"CMakeLists.txt: {var} is not an extension variable Slicer knows")
    depends = re.search(r'set\(\s*EXTENSION_DEPENDS\s+"([^"]*)"', clean)
    if not depends or "PyTorch" not in depends.group(1).split():
        problems.append("CMakeLists.txt: EXTENSION_DEPENDS must name PyTorch")
    if "## NEXT_MODULE" not in text:
        problems.append("CMakeLists.txt: the '## NEXT_MODULE' marker is missing")
    if not re.search(r"GLOB_RECURSE\s+\w+\s+RELATIVE\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}\s+"
                     r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/perfusionai/\*\.py", clean):
        problems.append("CMakeLists.txt: perfusionai/*.py is not packaged next to the modules")
    for required in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        if required not in clean:
            problems.append(f"CMakeLists.txt: '{required}' is missing")
    return problems


# --------------------------------------------------------------------------------------
# whole-module check


def check_module(module_dir: Path, a: Api) -> list[str]:
    name = module_dir.name
    script = module_dir / f"{name}.py"
    ui = module_dir / "Resources" / "UI" / f"{name}.ui"
    if not script.is_file():
        return [f"{name}: {name}.py is missing"]
    source = script.read_text()
    tree = ast.parse(source)
    facts = _collect_facts(tree)
    problems = []
    for suffix, base in (("", "ScriptedLoadableModule"), ("Widget", "ScriptedLoadableModuleWidget"),
                         ("Logic", "ScriptedLoadableModuleLogic"), ("Test", "ScriptedLoadableModuleTest")):
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name + suffix]
        if not classes:
            problems.append(f"{name}.py: class {name}{suffix} is missing")
        elif base not in {ast.unparse(b) for b in classes[0].bases}:
            problems.append(f"{name}.py: {name}{suffix} does not derive from {base}")
    widgets = None
    if ui.is_file():
        ui_problems, widgets = check_ui_source(ui.read_text(), ui.name, a, facts.parameter_fields)
        problems += ui_problems
        if widgets.get(name) != "qMRMLWidget":
            problems.append(f"{ui.name}: the top widget must be a qMRMLWidget named {name}")
    problems += check_python_source(source, script.name, a, ui_widgets=widgets)
    problems += check_module_cmake(module_dir, a)
    return problems


# --------------------------------------------------------------------------------------
# tests on the real extension

MODULES = module_dirs()


def test_modules_are_discovered():
    assert "DSCDeconvolution" in [m.name for m in MODULES]


@pytest.mark.parametrize("module_dir", MODULES, ids=[m.name for m in MODULES])
def test_module_conforms_to_slicer_api(module_dir):
    problems = check_module(module_dir, api())
    assert problems == [], "\n".join(problems)


def test_top_level_cmake_adds_every_module():
    problems = check_top_level_cmake((ROOT / "CMakeLists.txt").read_text(), [m.name for m in MODULES], api())
    assert problems == [], "\n".join(problems)


def test_mrml_bridge_uses_only_existing_mrml_methods():
    """perfusionai/mrml.py runs on slicer-core, a fork; check its names against upstream Slicer too."""
    source = (ROOT / "perfusionai" / "mrml.py").read_text()
    problems = check_python_source(source, "mrml.py", api(), module_file=False)
    assert problems == [], "\n".join(problems)


def test_shared_slicer_library_uses_only_existing_slicer_api():
    """PerfusionAISlicerLib (background runs and dependency installation for all four modules)."""
    path = ROOT / "PerfusionAISlicerLib" / "__init__.py"
    problems = check_python_source(path.read_text(), "PerfusionAISlicerLib/__init__.py", api(), module_file=False)
    assert problems == [], "\n".join(problems)
    # every module that runs in the background uses it, none re-implements the process handling
    for module_dir in MODULES:
        source = (module_dir / f"{module_dir.name}.py").read_text()
        assert "from PerfusionAISlicerLib import" in source, module_dir.name
        assert "launchConsoleProcess" not in source and "kill_process_tree" not in source, module_dir.name


def test_index_provenance_is_recorded():
    data = load_api_data()
    assert data["target_version"] == TARGET
    assert "583e9b37d50ead7daf7b783dce465ccaecec8809" in json.dumps(data["derived_from"])
    provenance = (API_PATH.parent / "PROVENANCE.md").read_text()
    assert "slicer_api.json" in provenance and "PyQt5" in provenance and "SlicerPyTorch" in provenance


# --------------------------------------------------------------------------------------
# the checker catches invented names (proof that the tests above can fail)

GOOD_MODULE_SNIPPET = '''
import slicer, vtk
class Mine:
    pass
def f(node, m):
    a = slicer.util.arrayFromVolume(node)
    node.GetIJKToRASMatrix(m)
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    slicer.modules.sequences.logic().UpdateProxyNodesFromSequences(node)
    slicer.util.setSliceViewerLayers(background=node, foregroundOpacity=0.5)
    vtk.vtkCommand.ModifiedEvent
    Mine()
'''


def test_checker_accepts_real_names():
    assert check_python_source(GOOD_MODULE_SNIPPET, "good.py", api()) == []


@pytest.mark.parametrize("bad_line, expected", [
    ("slicer.util.arrayFromVolumez(node)", "slicer.util.arrayFromVolumez does not exist"),
    ("node.GetIJKtoRASMatrixx(m)", "'GetIJKtoRASMatrixx' is not a known"),
    ("slicer.modules.sequences.logic().UpdateProxyNodesFromSequencez(node)", "not a member of vtkSlicerSequencesLogic"),
    ("slicer.util.setSliceViewerLayers(background=node, foregroundOpacityy=0.5)", "no keyword 'foregroundOpacityy'"),
    ("slicer.mrmlScene.AddNewNodeByClassName('x')", "slicer.mrmlScene.AddNewNodeByClassName is not a vtkMRMLScene"),
    ("slicer.app.layoutManagerr()", "slicer.app.layoutManagerr is not a qSlicerApplication member"),
    ("slicer.vtkMRMLScalarVolumeNodez()", "slicer.vtkMRMLScalarVolumeNodez does not exist"),
    ("vtk.vtkCommand.ModifiedEventz", "vtk.vtkCommand.ModifiedEventz does not exist in VTK"),
    ("slicer.modules.sequences.toolBarz()", "cannot be checked against the index"),
    ("import numpy as np", "numerics in a module file"),
    ("x = np.linalg.svd(node)", "numerics in a module file"),
])
def test_checker_reports_invented_python_api(bad_line, expected):
    source = GOOD_MODULE_SNIPPET + "    " + bad_line + "\n"
    problems = check_python_source(source, "bad.py", api())
    assert any(expected in p for p in problems), problems


def test_checker_reports_apis_missing_from_an_older_target():
    source = "import slicer\nslicer.util.launchConsoleProcess(['x'], blocking=False)\nimport slicer.packaging\n"
    assert check_python_source(source, "m.py", api("v5.12.3")) == []
    problems = check_python_source(source, "m.py", api("v5.10.0"))
    assert any("no keyword 'blocking'" in p for p in problems), problems
    assert any("'import slicer.packaging': not in Slicer v5.10.0" in p for p in problems), problems


def test_checker_reports_unknown_extension_api():
    source = ("import PyTorchUtils\n"
              "PyTorchUtils.PyTorchUtilsLogic().installTorchh()\n"
              "PyTorchUtils.PyTorchUtilsLogic.installTorch(askConfirmationn=True)\n")
    problems = check_python_source(source, "m.py", api())
    assert any("installTorchh is not a known method" in p for p in problems), problems
    assert any("no keyword 'askConfirmationn'" in p for p in problems), problems


GOOD_UI = """<ui version="4.0"><widget class="qMRMLWidget" name="M"><layout class="QFormLayout" name="l">
<item row="0" column="1"><widget class="qMRMLNodeComboBox" name="inputSelector">
 <property name="noneEnabled"><bool>true</bool></property>
 <property name="SlicerParameterName" stdset="0"><string>inputVolume</string></property></widget></item>
<item row="1" column="1"><widget class="QCheckBox" name="invertCheckBox">
 <property name="text"><string>Invert</string></property>
 <property name="SlicerParameterName" stdset="0"><string>invert</string></property></widget></item>
</layout></widget>
<connections><connection><sender>M</sender><signal>mrmlSceneChanged(vtkMRMLScene*)</signal>
<receiver>inputSelector</receiver><slot>setMRMLScene(vtkMRMLScene*)</slot></connection></connections></ui>"""
FIELDS = {"MParameterNode": {"inputVolume": "vtkMRMLScalarVolumeNode", "invert": "bool"}}


def test_ui_checker_accepts_real_names():
    problems, widgets = check_ui_source(GOOD_UI, "good.ui", api(), FIELDS)
    assert problems == [] and widgets["inputSelector"] == "qMRMLNodeComboBox"


@pytest.mark.parametrize("old, new, expected", [
    ('class="qMRMLNodeComboBox"', 'class="qMRMLFancyVolumeSelector"', "unknown class qMRMLFancyVolumeSelector"),
    ('name="noneEnabled"', 'name="noneEnabledd"', "'noneEnabledd' is not a property of qMRMLNodeComboBox"),
    ("<string>inputVolume</string>", "<string>inputVolumez</string>", "'inputVolumez' is not a field"),
    ('class="QCheckBox"', 'class="ctkCheckBox"', "cannot represent parameter 'invert: bool'"),
    ("<slot>setMRMLScene(vtkMRMLScene*)</slot>", "<slot>setMRMLScenez(vtkMRMLScene*)</slot>", "has no slot"),
])
def test_ui_checker_reports_invented_names(old, new, expected):
    problems, _ = check_ui_source(GOOD_UI.replace(old, new, 1), "bad.ui", api(), FIELDS)
    assert any(expected in p for p in problems), problems


def test_ui_attribute_check_in_python():
    widgets = {"applyButton": "QPushButton", "inputSelector": "qMRMLNodeComboBox"}
    good = "def f(self):\n    self.ui.applyButton.enabled = True\n    self.ui.inputSelector.setMRMLScene(None)\n"
    assert check_python_source(good, "m.py", api(), ui_widgets=widgets) == []
    bad = good + "    self.ui.applyButton.enabledd = False\n    self.ui.outputSelector.currentNode()\n"
    problems = check_python_source(bad, "m.py", api(), ui_widgets=widgets)
    assert any("applyButton.enabledd" in p for p in problems), problems
    assert any("self.ui.outputSelector: no widget" in p for p in problems), problems


def test_cmake_checker_reports_unlisted_and_missing_files():
    module = ROOT / "DSCDeconvolution"
    text = (module / "CMakeLists.txt").read_text()
    assert check_module_cmake(module, api(), text) == []
    unlisted = text.replace("  Resources/UI/${MODULE_NAME}.ui\n", "")
    assert any("does not list the resource Resources/UI/DSCDeconvolution.ui" in p
               for p in check_module_cmake(module, api(), unlisted))
    ghost = text.replace("${MODULE_NAME}.py\n  )", "${MODULE_NAME}.py\n  Ghost.py\n  )", 1)
    assert any("lists Ghost.py, which does not exist" in p for p in check_module_cmake(module, api(), ghost))
    no_test = text.replace("slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)", "")
    assert any("self-test is not registered" in p for p in check_module_cmake(module, api(), no_test))
    bad_kw = text.replace("WITH_GENERIC_TESTS", "WITH_GENERIC_TESTZ")
    assert any("unknown slicerMacroBuildScriptedModule argument WITH_GENERIC_TESTZ" in p
               for p in check_module_cmake(module, api(), bad_kw))


def test_top_level_checker_reports_missing_module():
    text = (ROOT / "CMakeLists.txt").read_text()
    problems = check_top_level_cmake(text, ["DSCDeconvolution", "NoSuchModule"], api())
    assert problems == ["CMakeLists.txt: add_subdirectory(NoSuchModule) is missing"]
    no_torch = text.replace('set(EXTENSION_DEPENDS "PyTorch")', 'set(EXTENSION_DEPENDS "NA")')
    assert any("EXTENSION_DEPENDS must name PyTorch" in p
               for p in check_top_level_cmake(no_torch, ["DSCDeconvolution"], api()))
