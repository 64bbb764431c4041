"""Qt-free helpers behind the Slicer modules (no ``slicer``, ``qt`` or ``vtk`` imports).

The module files only bind widgets and call these; keeping the logic here makes
it testable with plain pytest:

* the background-process pattern: parsing of ``PROGRESS <fraction> <message>`` lines,
  killing a process tree, the environment of ``python -m perfusionai`` (the command line itself
  is the domain job's ``to_argv()``; method names come from ``perfusionai.dsc.methods``);
* the file exchange with that process (inputs written, outputs read back);
* the DSC result in one shape, whether it came from the in-process core or the CLI;
* checks of which Python requirements are missing.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from .errors import PerfusionAIError, input_error
from .io import Geometry, read_series, read_volume, write_series, write_volume

MAP_NAMES = ("cbv", "cbf", "mtt", "tmax", "ttp")

_PROGRESS_LINE = re.compile(r"^\s*PROGRESS\s+([-+0-9.eE]+)\s*(.*?)\s*$")


def parse_progress_line(line: str) -> Optional[tuple[float, str]]:
    """``(fraction, message)`` of a ``PROGRESS <fraction> <message>`` line, else None.

    The fraction is clamped to [0, 1]; other output lines (logs, warnings) give None.
    """
    match = _PROGRESS_LINE.match(line or "")
    if not match:
        return None
    try:
        fraction = float(match.group(1))
    except ValueError:
        return None
    if fraction != fraction:  # NaN
        return None
    return min(max(fraction, 0.0), 1.0), match.group(2)


def error_message_from_output(lines: Sequence[str]) -> str:
    """The user-facing error of a failed CLI run: its ``perfusionai: error:`` line, else the last lines."""
    for line in reversed(list(lines)):
        if "perfusionai: error:" in line:
            return line.split("perfusionai: error:", 1)[1].strip()
    tail = [ln for ln in lines if ln.strip() and parse_progress_line(ln) is None][-5:]
    return "\n".join(tail) if tail else "the background process failed without a message"


# --------------------------------------------------------------------------------------
# file exchange with the background process


@dataclass
class DSCInputFiles:
    """Paths written by :func:`write_dsc_inputs` (None where not given)."""

    series: Path
    tr: float
    mask: Optional[Path] = None
    aif_mask: Optional[Path] = None


def write_dsc_inputs(work_dir: str | os.PathLike, signal_kjit: np.ndarray, geometry: Geometry,
                     times: np.ndarray, mask: Optional[np.ndarray] = None,
                     aif_mask: Optional[np.ndarray] = None) -> DSCInputFiles:
    """Write the series ``[k, j, i, t]`` and optional masks ``[k, j, i]`` as NIfTI for the CLI."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    from .dsc.deconvolution import frame_interval  # refuses irregular timing, as the in-process route does

    tr = frame_interval(times)
    files = DSCInputFiles(series=write_series(signal_kjit, geometry, work / "dsc.nii.gz", tr=tr), tr=tr)
    if mask is not None:
        files.mask = write_volume(np.asarray(mask).astype(np.uint8), geometry, work / "mask.nii.gz")
    if aif_mask is not None:
        files.aif_mask = write_volume(np.asarray(aif_mask).astype(np.uint8), geometry, work / "aif_mask.nii.gz")
    return files


@dataclass
class DSCOutput:
    """A DSC run's results in one shape for the Slicer side.

    maps: ``{name: float32 [k, j, i]}``; times, aif, tissue_curve: ``(t,)`` (s, 1/s, 1/s);
    medians: ``{map name: median inside the mask}`` (None when undefined); units per map.
    """

    maps: dict
    geometry: Geometry
    times: np.ndarray
    aif: np.ndarray
    tissue_curve: np.ndarray
    medians: dict
    units: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    #: ``{name: (float32 [k, j, i, L], lags (L,) in s)}``: per-voxel curves (``residue`` with save_residue).
    series: dict = field(default_factory=dict)
    #: bool ``[k, j, i]``: the automatic mask the run made (``auto_mask``), else None.
    auto_mask: Optional[np.ndarray] = None

    def median_rows(self) -> list[dict]:
        """Rows ``{"map", "median", "unit"}`` for a table, in the standard map order."""
        order = [m for m in MAP_NAMES if m in self.maps] + [m for m in self.maps if m not in MAP_NAMES]
        return [{"map": name, "median": self.medians.get(name), "unit": self.units.get(name, "")}
                for name in order]

    def mid_bolus_frame(self) -> int:
        """Index of the frame where the AIF peaks (the frame to show under the overlays)."""
        return int(np.nanargmax(np.asarray(self.aif, dtype=float)))


def median_inside(array: np.ndarray, mask: np.ndarray) -> float:
    """Median of the finite values of ``array`` inside the boolean ``mask`` (NaN when none)."""
    values = np.asarray(array, dtype=float)[np.asarray(mask, dtype=bool)]
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")


from .dsc.maps import MAP_UNITS as _UNITS  # noqa: E402  (the package's one table)


def output_from_result(result, geometry: Geometry) -> DSCOutput:
    """Wrap a :class:`perfusionai.dsc.pipeline.DSCResult` (in-process run)."""
    medians = dict((result.summary or {}).get("medians_in_mask", {}))
    return DSCOutput(maps={k: np.asarray(v, dtype=np.float32) for k, v in result.maps.items()},
                     geometry=geometry, times=np.asarray(result.times, dtype=float),
                     aif=np.asarray(result.aif, dtype=float),
                     tissue_curve=np.asarray(result.tissue_curve, dtype=float),
                     medians=medians, units={k: _UNITS.get(k, "") for k in result.maps},
                     summary=dict(result.summary or {}))


def read_dsc_outputs(out_dir: str | os.PathLike) -> DSCOutput:
    """Read what ``perfusionai dsc maps`` wrote: ``<map>.nii.gz``, ``aif.csv``, ``summary.json``."""
    out = Path(out_dir)
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise input_error(out, "has no summary.json; the DSC run did not finish")
    summary = json.loads(summary_path.read_text())
    from .dsc.brain_mask import AUTO_MASK_FILE

    maps: dict = {}
    series: dict = {}
    geometry = None
    auto_mask = None
    for path in sorted(out.glob("*.nii.gz")):
        name = path.name[: -len(".nii.gz")]
        if path.name == AUTO_MASK_FILE:  # the mask the run made, not a map
            auto_mask = read_volume(path, "automatic brain mask").array != 0
            continue
        if _is_4d(path):  # per-voxel curves (residue): a series, lags from its frame interval
            curves = read_series(path, name=name, min_frames=1)
            series[name] = (np.asarray(curves.array, dtype=np.float32), np.asarray(curves.frame_times()))
            continue
        volume = read_volume(path, name)
        maps[name] = np.asarray(volume.array, dtype=np.float32)
        geometry = geometry or volume.geometry
    if geometry is None:
        raise input_error(out, "contains no maps")
    times, aif, tissue = [], [], []
    with open(out / "aif.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            times.append(float(row["time_s"]))
            aif.append(float(row["aif_delta_r2star_per_s"]))
            text = row.get("tissue_mean_delta_r2star_per_s") or "nan"
            tissue.append(float(text))
    medians, units = {}, {}
    for name, entry in summary.get("medians_in_mask", {}).items():
        if isinstance(entry, Mapping):
            medians[name] = entry.get("median")
            units[name] = entry.get("unit", _UNITS.get(name, ""))
        else:
            medians[name] = entry
            units[name] = _UNITS.get(name, "")
    return DSCOutput(maps=maps, geometry=geometry, times=np.asarray(times), aif=np.asarray(aif),
                     tissue_curve=np.asarray(tissue), medians=medians,
                     units={**{k: _UNITS.get(k, "") for k in list(maps) + list(series)}, **units},
                     summary=summary, series=series, auto_mask=auto_mask)


def _is_4d(path: Path) -> bool:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetDimension() == 4 and reader.GetSize()[3] > 1


def read_dr_outputs(out_dir: str | os.PathLike) -> tuple[dict, Optional[np.ndarray], dict]:
    """Read what ``perfusionai dr fit|predict`` wrote: ``(maps, signals, summary)``.

    maps: ``{name: float32 [k, j, i]}`` (``status`` left out); signals: the predicted advanced
    series ``[k, j, i, volume]`` or None; summary: ``summary.json`` (for ``dr predict`` it holds the
    model's ``algorithm``, ``strategy``, ``trained_on_phantoms`` and ``advanced_protocol``).
    """
    out = Path(out_dir)
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise input_error(out, "has no summary.json; the diffusion-relaxation run did not finish")
    summary = json.loads(summary_path.read_text())
    maps = {}
    for path in sorted(out.glob("*.nii.gz")):
        name = path.name[: -len(".nii.gz")]
        if name in ("status", "predicted_signals"):
            continue
        maps[name] = np.asarray(read_volume(path, name).array, dtype=np.float32)
    if not maps:
        raise input_error(out, "contains no maps")
    signals = None
    if (out / "predicted_signals.nii.gz").exists():
        from .io import read_series

        signals = np.asarray(read_series(out / "predicted_signals.nii.gz", tr=1.0, name="predicted signals").array,
                             dtype=np.float32)
    return maps, signals, summary


# --------------------------------------------------------------------------------------
# processes


def _children_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` via ``pgrep -P`` (Linux and macOS); [] when unavailable."""
    try:
        done = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(tok) for tok in done.stdout.split() if tok.isdigit()]


def kill_process_tree(pid: int) -> list[int]:
    """Kill a process and all its descendants; returns the pids signalled.

    ``PythonSlicer`` is a launcher that starts the real interpreter as a child, so
    killing only the launcher would leave the computation running. Uses psutil
    when installed, ``taskkill /T`` on Windows, else walks ``pgrep -P``.
    """
    try:
        import psutil  # type: ignore
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return []
        procs = parent.children(recursive=True) + [parent]
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        return [p.pid for p in procs]
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True)
        return [pid]
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        frontier.extend(_children_pids(current))
    # Children first, so none is re-parented and missed while its parent dies.
    for target in reversed(tree):
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            raise PerfusionAIError(f"cannot stop process {target}: {exc}") from None
    return tree


# --------------------------------------------------------------------------------------
# requirements


def read_requirements(path: str | os.PathLike) -> list[str]:
    """Requirement lines of a requirements file (comments and blanks dropped)."""
    lines = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]


def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements whose distribution is not installed (names only; versions are not compared)."""
    from importlib import metadata

    missing = []
    for requirement in requirements:
        try:
            metadata.version(_requirement_name(requirement))
        except metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


def module_requirements(module_file: str | os.PathLike, extras: Sequence[str] = ()) -> list[str]:
    """The pip requirements of a Slicer module, from its own files.

    Reads ``Resources/Requirements/<Module>.txt`` next to ``module_file`` (the module's
    ``__file__``; ``<Module>`` is its stem) and ``Resources/Requirements/<Module>-<extra>.txt``
    for each of ``extras`` (e.g. ``"learned"``), in that order. Each module names its files
    after itself because all modules of an extension install into one ``Resources`` folder.
    """
    module = Path(module_file).resolve()
    folder = module.parent / "Resources" / "Requirements"
    requirements = read_requirements(folder / f"{module.stem}.txt")
    for extra in extras:
        requirements += read_requirements(folder / f"{module.stem}-{extra}.txt")
    return requirements


def missing_module_requirements(module_file: str | os.PathLike, extras: Sequence[str] = ()) -> list[str]:
    """The lines of :func:`module_requirements` whose package is not installed."""
    return missing_requirements(module_requirements(module_file, extras))


#: What the modules ask the PyTorch extension to install when torch is missing.
TORCH_VERSION_REQUIREMENT = ">=2.1"


def pytorch_extension_missing_message(needed_by: str) -> str:
    """The message shown when ``needed_by`` (e.g. "Network models") needs torch but the PyTorch extension is absent."""
    return (f"{needed_by} need the PyTorch extension. Install 'PyTorch' from the Extensions Manager "
            f"and restart Slicer.")


def path_or_none(path) -> Optional[str]:
    """A parameter-node path as text, or None when the field is empty (an empty ``pathlib.Path`` reads ".")."""
    return str(path) if path and str(path) not in ("", ".") else None


def package_root() -> str:
    """The folder that contains the ``perfusionai`` package (what a subprocess needs on PYTHONPATH)."""
    return str(Path(__file__).resolve().parent.parent)


def background_environment(existing_pythonpath: Optional[str] = None, cpu_only: bool = True) -> dict:
    """Environment additions for ``PythonSlicer -m perfusionai``.

    PythonSlicer does not see the extension's module folders (the application adds them to
    ``sys.path`` only inside Slicer), so the folder holding ``perfusionai/`` goes first on
    PYTHONPATH. ``cpu_only`` hides GPUs from the classical methods, which do not use them.
    """
    paths = [package_root()] + [p for p in (existing_pythonpath or "").split(os.pathsep) if p]
    environment = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    if cpu_only:
        environment["CUDA_VISIBLE_DEVICES"] = "-1"
    return environment


def python_launcher(which=None) -> str:
    """The interpreter for background runs: Slicer's ``PythonSlicer`` when on PATH, else this Python."""
    import shutil

    found = (which or shutil.which)("PythonSlicer")
    return found or sys.executable


def model_note(model_path: Optional[str]) -> str:
    """What the maps of a learned method rest on, for the result nodes' attributes.

    A model file's card says whether it was trained on phantoms; without a model the
    PHAE is trained on the user's own series (self-supervised, no reference maps).
    """
    if not model_path:
        return "PHAE trained on this series (self-supervised)"
    from .nn.modelfile import model_label, read_card

    return model_label(read_card(model_path))
