"""The extension configured and built with Slicer's REAL scripted-module macro (issue 12, item 4).

``SlicerMacroBuildScriptedModule.cmake`` of Slicer 5.10.0 and 5.12.3 and CTK's
``ctkMacroCompilePythonScript.cmake`` (unmodified copies in ``../shared/external/slicer/``) run
behind a minimal ``SlicerConfig.cmake`` written here (it sets only what a real Slicer build tree
provides to an extension: ``Slicer_USE_FILE``, the qt-scripted-modules folders, ``CTK_CMAKE_DIR``,
the Python interpreter). The top-level CMakeLists.txt is built with Ninja and with Make, and the
build tree is checked as Slicer loads it: every module file and resource present, no file written
by two modules, each module's own requirements file, ``perfusionai`` importable from that tree and
its CLI running from it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "slicer_api"))
import real_layer  # noqa: E402

if not real_layer.available():
    pytest.skip(real_layer.SKIP_REASON, allow_module_level=True)

REPO = real_layer.REPO
EXTERNAL = real_layer.EXTERNAL
MODULES = real_layer.MODULE_NAMES
SCRIPTED_DIR = "lib/Slicer-5.12/qt-scripted-modules"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.skip(f"'{name}' is not installed (pip install {name}, or the dev extra)")
    return found


def _write_slicer_config(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Empty.cmake").write_text("# Slicer_EXTENSION_GENERATE_CONFIG / Slicer_EXTENSION_CPACK: not tested here\n")
    (folder / "UseSlicer.cmake").write_text(
        f'include("{EXTERNAL / "ctk" / "CMake" / "ctkFunctionExtractOptimizedLibrary.cmake"}")\n'
        f'include("{EXTERNAL / "ctk" / "CMake" / "ctkMacroCompilePythonScript.cmake"}")\n'
        f'include("{EXTERNAL / version / "CMake" / "SlicerMacroBuildScriptedModule.cmake"}")\n')
    library = Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib") / (sysconfig.get_config_var("LDLIBRARY") or "")
    (folder / "SlicerConfig.cmake").write_text(f"""
set(Slicer_FOUND TRUE)
set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "{SCRIPTED_DIR}")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "{SCRIPTED_DIR}")
set(CTK_CMAKE_DIR "{EXTERNAL / "ctk" / "CMake"}")
set(Slicer_USE_FILE "{folder / "UseSlicer.cmake"}")
set(Slicer_EXTENSION_GENERATE_CONFIG "{folder / "Empty.cmake"}")
set(Slicer_EXTENSION_CPACK "{folder / "Empty.cmake"}")
set(PYTHONINTERP_FOUND TRUE)
set(PYTHON_EXECUTABLE "{sys.executable}")
set(PYTHONLIBS_FOUND TRUE)
set(PYTHON_LIBRARIES "{library}")
""")
    return folder


def _build(tmp: Path, version: str, generator: str) -> Path:
    cmake = _tool("cmake")
    if generator == "Ninja":
        _tool("ninja")
    else:
        _tool("make")
    config = _write_slicer_config(tmp / "slicer", version)
    build = tmp / "build"
    env = dict(os.environ, CMAKE_MAKE_PROGRAM="")
    configure = subprocess.run([cmake, "-S", str(REPO), "-B", str(build), "-G", generator,
                                f"-DSlicer_DIR={config}", "-DBUILD_TESTING=OFF"],
                               capture_output=True, text=True, env=env, timeout=300)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    done = subprocess.run([cmake, "--build", str(build), "--", "-j2"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return build


def _copy_rules(build: Path) -> dict[str, list[str]]:
    """Every file the build copies into the tree, and the targets (modules) that write it."""
    writers: dict[str, list[str]] = {}
    for makefile in build.rglob("build.make"):
        target = re.match(r"Copy(\w+)Python(?:Script|Resource)Files\.dir", makefile.parent.name)
        if not target:
            continue
        for out in re.findall(r"^(\S*" + re.escape(SCRIPTED_DIR) + r"\S*): ", makefile.read_text(), re.M):
            writers.setdefault(out, []).append(target.group(1))
    return writers


def _tree_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _source_package_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files", "perfusionai", "PerfusionAISlicerLib"], cwd=REPO,
                            capture_output=True, text=True).stdout.split()
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "perfusionai",
                                "PerfusionAISlicerLib"], cwd=REPO, capture_output=True, text=True).stdout.split()
    return {f for f in listed + untracked if (REPO / f).is_file()}


@pytest.mark.parametrize("version,generator", [("v5.12.3", "Ninja"), ("v5.10.0", "Unix Makefiles")])
def test_extension_builds_with_the_real_macros(tmp_path, version, generator):
    build = _build(tmp_path, version, generator)
    tree = build / SCRIPTED_DIR
    files = _tree_files(tree)

    # every module as Slicer loads it: the module file (compiled too), its UI, icon and requirements
    for module in MODULES:
        assert f"{module}.py" in files and f"{module}.pyc" in files, module
        assert f"Resources/UI/{module}.ui" in files and f"Resources/Icons/{module}.png" in files, module
        own = tree / "Resources" / "Requirements" / f"{module}.txt"
        assert own.is_file(), f"{module}: its requirements file is not in the build tree"
        assert own.read_text() == (REPO / module / "Resources" / "Requirements" / f"{module}.txt").read_text()
    # no shared requirements file that one module would overwrite for the others
    assert "Resources/requirements.txt" not in files
    # every resource listed in a module's CMakeLists reaches the tree
    for module in MODULES:
        cmake = (REPO / module / "CMakeLists.txt").read_text()
        for resource in re.findall(r"^\s*(Resources/\S+)", cmake, re.M):
            resource = resource.replace("${MODULE_NAME}", module)
            assert resource in files, f"{module}: {resource} missing from the build tree"
    # the core package and the shared Slicer-side helpers: every source file is in the tree
    missing = sorted(f for f in _source_package_files() if f not in files and not f.endswith(".pyc"))
    assert not missing, missing

    # no file written by two modules (Make would silently keep the last one)
    if generator != "Ninja":
        writers = _copy_rules(build)
        assert writers, "no copy rules found in the Makefiles"
        shared = {out: targets for out, targets in writers.items() if len(targets) > 1}
        assert not shared, shared

    # PerfusionAISlicerLib (imports qt/slicer, so only inside Slicer) lies where the modules import it from
    assert "PerfusionAISlicerLib/__init__.py" in files
    # perfusionai imports and its CLI runs from the tree, not from the checkout or site-packages
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree)
    probe = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "import perfusionai; print(perfusionai.__file__)", str(tree)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).resolve().is_relative_to(tree.resolve()), probe.stdout
    def perfusionai(*args):
        done = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.path.insert(0, sys.argv[1]); "
                               "sys.argv = ['perfusionai'] + sys.argv[2:]; "
                               "runpy.run_module('perfusionai', run_name='__main__')", str(tree), *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    phantom, maps = tmp_path / "phantom", tmp_path / "maps"
    perfusionai("dsc", "phantom", "--out", str(phantom), "--progress", "none")
    perfusionai("dsc", "maps", "--dsc", str(phantom / "dsc.nii.gz"), "--te", "0.03",
                "--aif-mask", str(phantom / "aif_mask.nii.gz"), "--mask", str(phantom / "brain_mask.nii.gz"),
                "--out", str(maps), "--progress", "none")
    assert (maps / "cbf.nii.gz").is_file() and (maps / "summary.json").is_file()


def test_screenshot_url_names_a_file_of_the_repository():
    cmake = (REPO / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_SCREENSHOTURLS", "EXTENSION_ICONURL"):
        urls = re.search(rf'set\({variable} "([^"]+)"\)', cmake).group(1).split()
        for url in urls:
            path = url.split("/main/", 1)[1]
            assert (REPO / path).is_file(), f"{variable}: {path} is not in the repository"
