"""Regenerate slicer_api_subset.json (run by hand; not a test).

Inputs: ../shared/slicer-api/slicer_api.json (names read from Slicer and CTK source; see
PROVENANCE.md), the ``vtk`` package of the venv (VTK base classes) and, when importable,
PyQt5 5.15 (Qt base widget classes' properties, signals and methods). Usage::

    python Testing/slicer_api/make_subset.py [path/to/slicer_api.json] [--qt-python /path/to/python-with-PyQt5]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[1].parent / "shared" / "slicer-api" / "slicer_api.json"
OUT = HERE / "slicer_api_subset.json"

PYTHON_MODULES = ("slicer.util", "slicer.ScriptedLoadableModule", "slicer.cli", "slicer.testing", "slicer.i18n",
                  "sitkUtils", "slicer.parameterNodeWrapper", "slicer.packaging")
VTK_BASE_CLASSES = ("vtkObjectBase", "vtkObject", "vtkCommand", "vtkCallbackCommand", "vtkCollection",
                    "vtkMatrix4x4", "vtkMatrix3x3", "vtkTransform", "vtkImageData", "vtkDataObject",
                    "vtkDataSet", "vtkPolyData", "vtkPoints", "vtkTable", "vtkAbstractArray", "vtkDataArray",
                    "vtkStringArray", "vtkDoubleArray", "vtkFloatArray", "vtkIntArray", "vtkIdList",
                    "vtkImageAlgorithm", "vtkPolyDataAlgorithm", "vtkAlgorithm", "vtkXMLParser",
                    "vtkImageMathematics", "vtkImageSpatialAlgorithm", "vtkImplicitBoolean",
                    "vtkImageMapToWindowLevelColors", "vtkGlyph3D", "vtkPolyDataToImageStencil",
                    "vtkEventDataDevice3D")
QT_CLASSES = ("QObject", "QWidget", "QAbstractButton", "QPushButton", "QCheckBox", "QRadioButton", "QToolButton",
              "QComboBox", "QLabel", "QFrame", "QLineEdit", "QTextEdit", "QPlainTextEdit", "QTextBrowser",
              "QProgressBar", "QAbstractSpinBox", "QSpinBox", "QDoubleSpinBox", "QAbstractSlider", "QSlider",
              "QGroupBox", "QTabWidget", "QStackedWidget", "QAbstractScrollArea", "QScrollArea", "QSplitter",
              "QSplitterHandle", "QAbstractItemView", "QTableView", "QTreeView", "QListView", "QHeaderView",
              "QDialog", "QMessageBox", "QFileDialog", "QColorDialog", "QProgressDialog", "QApplication",
              "QGuiApplication", "QCoreApplication", "QLayout", "QBoxLayout", "QVBoxLayout", "QHBoxLayout",
              "QFormLayout", "QGridLayout", "QTimer", "QButtonGroup", "QSortFilterProxyModel",
              "QAbstractProxyModel", "QStandardItemModel", "QCompleter", "QToolBar", "QGraphicsView",
              "QGraphicsScene", "QGraphicsObject", "QStyledItemDelegate", "QItemDelegate",
              "QAbstractItemDelegate", "QSignalMapper", "QProxyStyle", "QIconEngine", "QIconEnginePlugin",
              "QWebEngineView", "QSettings", "QSize", "QColor", "QIcon", "QPixmap")

#: Python APIs of Slicer scripted modules and extensions that our modules call but that are not in
#: slicer_api.json, read by hand from their source (repository, commit, file) -- see PROVENANCE.md.
EXTENSION_APIS = {
    "SampleData": {
        "source": "Slicer/Slicer Modules/Scripted/SampleData/SampleData.py (main, read 2026-11 via the code index)",
        "classes": {"SampleDataLogic": {
            "registerCustomSampleDataSource": [
                "category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                "thumbnailFileName", "loadFileTypes", "loadFiles", "loadFileProperties", "checksums",
                "loadFileType"],
            "downloadSample": ["sampleName"],
            "downloadSamples": ["sampleName"],
        }},
    },
    "PyTorchUtils": {
        "source": "fepegar/SlicerPyTorch PyTorchUtils/PyTorchUtils.py (commit 067a0e9d728770ecb941356814a6fc0e9fb93921)",
        "classes": {"PyTorchUtilsLogic": {
            "torchInstalled": [],
            "installTorch": ["askConfirmation", "forceComputationBackend", "torchVersionRequirement"],
            "importTorch": [],
            "getDevice": [],
        }},
    },
}

QT_DUMP = r'''
import json, sys
from PyQt5 import QtCore, QtGui, QtWidgets
names = json.loads(sys.argv[1])
out = {}
for name in names:
    cls = None
    for mod in (QtWidgets, QtCore, QtGui):
        cls = getattr(mod, name, None)
        if cls is not None:
            break
    if cls is None:
        continue
    entry = {"superclass": cls.__mro__[1].__name__ if len(cls.__mro__) > 1 else None,
             "methods": sorted(n for n in vars(cls) if not n.startswith("_"))}
    mo = getattr(cls, "staticMetaObject", None)
    if mo is not None:
        entry["properties"] = sorted({mo.property(i).name() for i in range(mo.propertyOffset(), mo.propertyCount())})
        entry["signals"] = sorted({bytes(mo.method(i).name()).decode() for i in range(mo.methodOffset(), mo.methodCount())
                                  if mo.method(i).methodType() == QtCore.QMetaMethod.Signal})
    out[name] = entry
print(json.dumps({"qt_version": QtCore.QT_VERSION_STR, "classes": out}))
'''


def vtk_base_names() -> dict:
    import vtk

    out = {}
    for name in VTK_BASE_CLASSES:
        cls = getattr(vtk, name, None)
        if cls is None:
            continue
        base = cls.__mro__[1].__name__ if len(cls.__mro__) > 1 else None
        out[name] = {"superclass": base if base and base.startswith("vtk") else None,
                     "methods": sorted(n for n in dir(cls) if n[:1].isupper())}
    return out, vtk.vtkVersion.GetVTKVersion()


def main(argv: list[str]) -> None:
    source = Path(argv[1]) if len(argv) > 1 and not argv[1].startswith("--") else DEFAULT_SOURCE
    qt_python = argv[argv.index("--qt-python") + 1] if "--qt-python" in argv else sys.executable
    full = json.loads(source.read_text())
    subset = {
        "schema": "perfusionai-slicer-api-subset/1",
        "derived_from": {"file": "shared/slicer-api/slicer_api.json", "schema": full["schema"],
                         "generated": full["generated"], "source": full["source"]},
        "target_version": "v5.12.3",
        "python_modules": {},
        "module_logic_accessors": full["module_logic_accessors"],
        "vtk_wrapped_classes": {},
        "qt_classes_slicer": {},
        "qt_classes_ctk": {},
        "color_node_ids": full["color_node_ids"],
        "cmake": full["cmake"],
        "extension_cmake_variables": full["extension_cmake_variables"],
        "slicer_namespace_runtime_attributes": full["slicer_namespace_runtime_attributes"],
        "extension_apis": EXTENSION_APIS,
    }
    for name in PYTHON_MODULES:
        module = full["python_modules"][name]
        entry = {"present_in": module["present_in"], "functions": {}, "classes": {},
                 "constants": module.get("constants") or []}
        for fname, f in module.get("functions", {}).items():
            entry["functions"][fname] = {"in": f["in"], "signature": f["signature"],
                                         **({"signature_by_version": f["signature_by_version"]}
                                            if "signature_by_version" in f else {})}
        for cname, c in module.get("classes", {}).items():
            entry["classes"][cname] = {"in": c["in"], "methods": {m: {"in": v["in"]} for m, v in
                                                                  c.get("methods", {}).items()}}
        if "exports" in module:
            entry["exports"] = module["exports"]
        subset["python_modules"][name] = entry
    for cname, c in full["vtk_wrapped_classes"].items():
        enums = sorted({e for values in (c.get("enums") or {}).values() for e in values})
        subset["vtk_wrapped_classes"][cname] = {"superclass": c["superclass"], "methods": sorted(c["methods"]),
                                                "static": sorted(c.get("static") or []), "enums": enums}
    for key in ("qt_classes_slicer", "qt_classes_ctk"):
        for cname, c in full[key].items():
            subset[key][cname] = {k: c[k] for k in ("superclass", "properties", "signals", "slots", "invokables",
                                                     "pythonqt_decorator_methods",
                                                     "pythonqt_decorator_static_methods", "enums") if k in c}
    base, vtk_version = vtk_base_names()
    subset["vtk_base_classes"] = {"source": f"dir() of the vtk {vtk_version} Python package", "classes": base}
    done = subprocess.run([qt_python, "-c", QT_DUMP, json.dumps(QT_CLASSES)], capture_output=True, text=True,
                          env={"QT_QPA_PLATFORM": "offscreen"})
    if done.returncode != 0:
        raise SystemExit("PyQt5 is needed for the Qt base classes (--qt-python PYTHON): " + done.stderr[-500:])
    qt = json.loads(done.stdout)
    subset["qt_base_classes"] = {"source": f"PyQt5 introspection of Qt {qt['qt_version']} (metaObject properties "
                                           f"and signals declared by each class; Python-visible methods)",
                                 "classes": qt["classes"]}
    OUT.write_text(json.dumps(subset, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv)
