"""The package's shape, checked from its source (issue 14).

(a) no import cycle among perfusionai's modules, nor among its subpackages, at module level
    (imports parsed with ``ast``; imports inside functions are the lazy ones and do not count);
    phantoms import domains, never the reverse;
(b) no ``importlib.import_module``/``__import__`` of the project's own modules: the only dynamic
    import is :func:`perfusionai.deps.require`, for optional third-party packages;
(c) no error or warning message outside the command-line files names a flag (``--lambda``):
    the core names parameters (:class:`perfusionai.errors.ParameterError`); a suggested command
    line (``run 'perfusionai lobes import-model --nnunet-folder X'``) may show its own flags;
(d) ``perfusionai dsc maps`` with a classical method runs, in a fresh interpreter, with every
    optional package (torch, antspyx, scikit-learn, scikit-image, matplotlib, nnunetv2, dask)
    made unimportable, as on ``pip install perfusionai`` without extras; a learned method there
    ends in one line naming the extra to install;
(e) the core dependencies in ``pyproject.toml`` hold no optional package, and every extra named
    by :data:`perfusionai.deps.PACKAGES` exists there with that package.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "perfusionai"

#: import names of the optional packages, blocked in (d)
OPTIONAL = ("torch", "torchvision", "safetensors", "ants", "sklearn", "skimage", "matplotlib", "nnunetv2",
            "dask", "distributed", "monai", "dipy")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _module_level_nodes(tree: ast.Module):
    """Statements run at import time: the module body and class bodies, not function bodies."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt) or isinstance(child, (ast.ExceptHandler, ast.match_case)):
                stack.append(child)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in _module_level_nodes(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # "import perfusionai.dsc.maps" runs perfusionai.dsc.maps; a name inside a module is that module
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    graph[name].add(target)
                    # importing a.b.c runs a.b's __init__ first, unless a.b is already being imported
                    # (an ancestor of this module)
                    parts = target.split(".")
                    for n in range(2, len(parts)):
                        parent = ".".join(parts[:n])
                        if parent in modules and not (name + ".").startswith(parent + "."):
                            graph[name].add(parent)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_module_level_import_cycle():
    cycles = _cycles(_import_graph())
    assert not cycles, "module-level import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycle_between_subpackages():
    # the domains, phantoms, nn, report, ... as wholes: phantoms import domains, never the reverse
    packages = {f"perfusionai.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    graph: dict[str, set[str]] = {p: set() for p in packages}
    for module, targets in _import_graph().items():
        src = _package_of(module)
        if src not in packages:
            continue
        for t in targets:
            if _package_of(t) in packages and _package_of(t) != src:
                graph[src].add(_package_of(t))
    cycles = _cycles(graph)
    assert not cycles, "subpackages importing each other at module level:\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_phantoms_import_domains_never_the_reverse():
    # a domain's core never depends on the phantoms; its demo and command-line verbs sit above both
    def above_both(module: str) -> bool:
        last = module.rsplit(".", 1)[-1]
        return last.startswith("cli") or last.endswith("demo") or module in ("perfusionai.demo", "perfusionai.batch")

    offenders = [f"{m} imports {sorted(t for t in ts if t.startswith('perfusionai.phantoms'))}"
                 for m, ts in sorted(_import_graph().items())
                 if not m.startswith("perfusionai.phantoms") and not above_both(m)
                 and any(t.startswith("perfusionai.phantoms") for t in ts)]
    assert not offenders, "domain modules importing the phantoms at module level:\n" + "\n".join(offenders)


def test_graph_sees_known_edges():
    # the parser must see what is there, or the two tests above prove nothing
    graph = _import_graph()
    assert "perfusionai.errors" in graph["perfusionai.io"]
    assert "perfusionai.geometry" in graph["perfusionai.dicom"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _dynamic_imports(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__"):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_no_importlib_for_the_projects_own_modules():
    # deps.require is the one dynamic import: optional third-party packages by name
    offenders = [hit for p in _modules().values() if p.name != "deps.py" for hit in _dynamic_imports(p)]
    assert not offenders, "dynamic imports (import the module statically, or lazily in a function):\n" + \
        "\n".join(offenders)


_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_MESSAGE_CALLS = {"input_error", "PerfusionAIError", "ParameterError", "MissingDependency", "warn", "Cancelled"}


def _is_cli_file(path: Path) -> bool:
    return path.name in ("cli.py", "cli_common.py") or path.name.startswith("cli")


def _joined(node: ast.AST, members: set):
    """``node`` as one text when it is a string, an f-string or a ``+`` of strings, else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        members.add(id(node))
        return node.value
    if isinstance(node, ast.JoinedStr):
        members.add(id(node))
        return "".join(_joined(v, members) or "{}" for v in node.values)
    if isinstance(node, ast.FormattedValue):
        members.add(id(node))
        return "{}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _joined(node.left, set()), _joined(node.right, set())
        if left is not None or right is not None:
            members.add(id(node))
            return (_joined(node.left, members) or "{}") + (_joined(node.right, members) or "{}")
    return None


def _strings(node: ast.AST):
    """The message texts in ``node``: each string, f-string or ``+`` of strings as one text."""
    members: set = set()
    for sub in ast.walk(node):
        if id(sub) in members:
            continue
        text = _joined(sub, members)
        if text is not None:
            yield text


#: a suggested command line ("run 'perfusionai lobes import-model --nnunet-folder X'") may show its flags
_COMMAND = re.compile(r"perfusionai(?: [a-z][a-z-]*)*")


def _flag_messages(path: Path, root: Path = REPO) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        candidates = []
        if isinstance(node, ast.Raise) and node.exc is not None:
            candidates.append(node.exc)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in _MESSAGE_CALLS:
                candidates.append(node)
        for c in candidates:
            for text in _strings(c):
                commands = [m.end() for m in _COMMAND.finditer(text)]
                flag = next((f for f in _FLAG.finditer(text)
                             if not any(end <= f.start() for end in commands)), None)
                if flag:
                    found.append(f"{path.relative_to(root)}:{c.lineno}: {flag.group(0)} in {text[:80]!r}")
    return sorted(set(found))


def test_no_flag_names_in_core_messages():
    offenders = [hit for p in _modules().values() if not _is_cli_file(p) for hit in _flag_messages(p)]
    assert not offenders, "messages outside the CLI files that name a flag (raise ParameterError(field, ...)):\n" + \
        "\n".join(offenders)


def test_flag_scanner_finds_a_flag(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text('def f(p):\n    raise input_error("--tikhonov-lambda", "unknown criterion")\n'
                   'def g():\n    raise ValueError(f"use --aif-auto or {1}")\n'
                   'def h():\n    raise input_error(p, "a 1-- b, x--y and -1 are fine")\n'
                   'def k(x):\n    raise input_error(x, f"convert it: perfusionai lobes import-model --nnunet-folder {x}")\n')
    hits = _flag_messages(bad, tmp_path)
    assert [h.split(": ", 1)[1].split(" in ")[0] for h in hits] == ["--tikhonov-lambda", "--aif-auto"]


_BLOCKER = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
ATTEMPTS = []
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            ATTEMPTS.append(fullname)
            raise ModuleNotFoundError(f"No module named {{fullname!r}} (blocked by the test)", name=fullname)
        return None
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
sys.meta_path.insert(0, _Block())
"""


def test_classical_dsc_maps_without_optional_packages(tmp_path):
    from perfusionai.phantoms.dsc import make_dsc_phantom

    make_dsc_phantom(shape=(3, 12, 12), n_frames=30, tr=1.5, te=0.03, snr=np.inf, seed=0).save(tmp_path / "ph")
    out = tmp_path / "out"
    script = _BLOCKER.format(blocked=OPTIONAL) + textwrap.dedent(f"""
        from perfusionai.cli import main
        code = main(["dsc", "maps", "--dsc", {str(tmp_path / 'ph' / 'dsc.nii.gz')!r}, "--te", "0.03",
                     "--aif-mask", {str(tmp_path / 'ph' / 'aif_mask.nii.gz')!r},
                     "--mask", {str(tmp_path / 'ph' / 'brain_mask.nii.gz')!r}, "--method", "oSVD",
                     "--out", {str(out)!r}, "--progress", "none"])
        print("attempted optional imports:", sorted(set(a.split(".")[0] for a in ATTEMPTS)))
        print("CLASSICAL", code, flush=True)
        print("----", file=sys.stderr, flush=True)
        # a learned method without torch: one line naming the extra to install
        code = main(["dsc", "maps", "--dsc", {str(tmp_path / 'ph' / 'dsc.nii.gz')!r}, "--te", "0.03",
                     "--aif-mask", {str(tmp_path / 'ph' / 'aif_mask.nii.gz')!r},
                     "--mask", {str(tmp_path / 'ph' / 'brain_mask.nii.gz')!r}, "--method", "phae",
                     "--out", {str(tmp_path / 'out_phae')!r}, "--progress", "none"])
        print("LEARNED", code, flush=True)
        sys.exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    print(proc.stdout, proc.stderr[-3000:])
    assert proc.returncode == 0 and "CLASSICAL 0" in proc.stdout, proc.stderr[-3000:]
    for name in ("cbv", "cbf", "mtt", "tmax", "ttp"):
        assert (out / f"{name}.nii.gz").is_file()
    learned_err = proc.stderr.split("----\n", 1)[1]
    lines = [ln for ln in learned_err.splitlines() if ln.strip()]
    assert "LEARNED 2" in proc.stdout, learned_err[-3000:]
    assert len(lines) == 1 and "perfusionai[learned]" in lines[0] and "torch" in lines[0], learned_err[-3000:]
    assert not (tmp_path / "out_phae").exists()


def test_blocker_blocks(tmp_path):
    script = _BLOCKER.format(blocked=("json",)) + "import json\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "blocked by the test" in proc.stderr


def _requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~\[;]", req.strip(), maxsplit=1)[0].lower()


def test_core_dependencies_hold_no_optional_package():
    from perfusionai import deps

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    assert not core & {"torch", "antspyx", "scikit-learn", "scikit-image", "matplotlib", "nnunetv2",
                       "safetensors", "dask", "monai"}, core
    assert {"numpy", "scipy", "simpleitk", "pydicom", "nibabel", "tqdm"} <= core
    extras = project["optional-dependencies"]

    def expand(extra, seen=()):
        names = set()
        for req in extras[extra]:
            match = re.match(r"perfusionai\[([^\]]+)\]", req.strip())
            if match:
                for sub in match.group(1).split(","):
                    if sub.strip() not in seen:
                        names |= expand(sub.strip(), seen + (extra,))
            else:
                names.add(_requirement_name(req))
        return names

    for module, (dist, extra) in deps.PACKAGES.items():
        wanted = _requirement_name(dist)
        if extra == "core":
            assert wanted in core, f"{module}: deps says core, pyproject's dependencies lack {dist}"
        else:
            assert wanted in expand(extra), f"{module}: deps says extra [{extra}], pyproject's [{extra}] lacks {dist}"
            assert wanted in expand("all") and wanted in expand("dev"), f"{dist} missing from [all] or [dev]"
