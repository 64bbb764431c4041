"""Image input/output: NIfTI, NRRD, MetaImage and DICOM series, 3D and 4D.

Conventions used across the core
--------------------------------
* A 3D array is indexed ``[k, j, i]`` (slice, row, column), the order SimpleITK
  and Slicer's ``arrayFromVolume`` use; a 4D series is ``[k, j, i, t]`` (time last).
* :class:`Geometry` holds the ITK/DICOM (LPS) description of the voxel grid:
  ``spacing`` and ``origin`` in mm in ``(i, j, k)``/``(x, y, z)`` order and the
  3x3 ``direction`` cosine matrix whose columns are the i, j, k axes.
  :meth:`Geometry.ijk_to_ras` gives the 4x4 matrix Slicer uses.
* Every map is written on the input's exact grid (:func:`write_volume`), and
  output folders are written atomically (:func:`atomic_output_dir`).

All user-caused problems raise :class:`perfusionai.errors.PerfusionAIError`
with a message naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from . import dicom
from .errors import ParameterError, PerfusionAIError, input_error
from .geometry import Geometry, Series, Volume

__all__ = ["Geometry", "Volume", "Series", "IMAGE_SUFFIXES", "read_volume", "read_series", "read_mask",
           "read_labels", "check_same_grid", "to_sitk", "from_sitk", "write_volume", "write_series",
           "atomic_output_dir", "write_json", "check_finite_series", "check_finite_values"]

#: File endings read as single image files.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".seq.nrrd")

# --------------------------------------------------------------------------------------
# low level: SimpleITK


def _sitk():
    import SimpleITK as sitk

    return sitk


def _check_exists(path: str | os.PathLike, name: Optional[str] = None) -> Path:
    p = Path(path)
    if not p.exists():
        raise input_error(path, f"{name + ' ' if name else ''}file or folder does not exist")
    return p


def _is_dicom_dir(p: Path) -> bool:
    return p.is_dir()


def _geometry_from_sitk(img, shape_kji) -> Geometry:
    dim = img.GetDimension()
    spacing = tuple(float(s) for s in img.GetSpacing()[:3])
    origin = tuple(float(o) for o in img.GetOrigin()[:3])
    d = np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    return Geometry(tuple(int(s) for s in shape_kji), spacing, origin, tuple(float(x) for x in d.ravel()))


def _read_sitk_file(p: Path):
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
        meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
        img = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise input_error(p, f"cannot be read as an image ({first[:200]})") from None
    return img, meta


def _restore_nifti_nans(p: Path, arr: np.ndarray) -> np.ndarray:
    """Put back the NaNs that ITK's NIfTI reader turns into zeros.

    ITK reads NaN voxels of a float NIfTI file as 0, which would silently hide
    broken frames; nibabel reads the raw values. ``arr`` is in SimpleITK order
    (the reverse of the file's axis order).
    """
    if not (p.name.endswith(".nii") or p.name.endswith(".nii.gz")) or not np.issubdtype(arr.dtype, np.floating):
        return arr
    import nibabel

    raw = np.asanyarray(nibabel.load(str(p)).dataobj)
    nan = np.isnan(raw)
    if not nan.any():
        return arr
    nan = nan.T
    if nan.shape != arr.shape:  # vector/4D layouts: compare element counts in file order
        nan = nan.reshape(arr.shape) if nan.size == arr.size else None
    if nan is None:
        return arr
    arr = np.array(arr, copy=True)
    arr[nan] = np.nan
    return arr


def _bids_sidecar(p: Path) -> dict:
    name = p.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):  # ".nii.gz" before ".nii"
        if name.endswith(suffix):
            side = p.with_name(name[: -len(suffix)] + ".json")
            if side.exists():
                try:
                    return json.loads(side.read_text())
                except (OSError, ValueError) as exc:
                    raise input_error(side, f"BIDS sidecar is not valid JSON ({exc})") from None
    return {}


def _nifti_time_step_seconds(meta: dict) -> Optional[float]:
    """Frame interval from NIfTI ``pixdim[4]`` and the time unit bits of ``xyzt_units``."""
    raw = meta.get("pixdim[4]")
    if raw is None:
        return None
    try:
        step = float(raw)
    except ValueError:
        return None
    if not np.isfinite(step) or step <= 0:
        return None
    units = int(float(meta.get("xyzt_units", "0") or 0)) & 0x38
    scale = {0x08: 1.0, 0x10: 1e-3, 0x18: 1e-6}.get(units)
    if scale is None:
        # Unknown unit: most scanners' converters write seconds; values > 100 are ms.
        scale = 1e-3 if step > 100 else 1.0
    return step * scale


def _nrrd_frame_times(meta: dict, n_frames: int) -> Optional[np.ndarray]:
    """Frame times (s) from Slicer's MultiVolume or Sequence NRRD keys, when present."""
    labels = meta.get("MultiVolume.FrameLabels")
    if labels:
        try:
            values = np.array([float(v) for v in labels.split(",")])
        except ValueError:
            values = None
        if values is not None and values.size == n_frames:
            unit = meta.get("MultiVolume.FrameIdentifyingDICOMTagUnits", "ms").strip().lower()
            scale = 1e-3 if unit in ("ms", "msec", "milliseconds") else 1.0
            return (values - values[0]) * scale
    for key, value in meta.items():
        if key.endswith("index values") and value:
            try:
                values = np.array([float(v) for v in value.replace(",", " ").split()])
            except ValueError:
                continue
            if values.size == n_frames:
                unit = meta.get(key.replace("index values", "index unit"), "s").strip().lower()
                scale = 1e-3 if unit in ("ms", "msec") else 1.0
                return (values - values[0]) * scale
    return None


# --------------------------------------------------------------------------------------
# public readers


def read_volume(path: str | os.PathLike, name: str = "image") -> Volume:
    """Read a 3D image (NIfTI, NRRD, MetaImage or a DICOM series folder).

    Returns a :class:`Volume` whose ``array`` is ``[k, j, i]`` float32 or the
    file's integer type. Raises :class:`PerfusionAIError` for a missing file,
    an unreadable file, a 4D or vector image, or an empty image.
    """
    p = _check_exists(path, name)
    if _is_dicom_dir(p):
        series = dicom.read_dicom_folder(p)
        if series.array.ndim == 4 and series.array.shape[-1] > 1:
            raise input_error(p, f"is a 4D DICOM series with {series.array.shape[-1]} frames; "
                                 f"{_with_dims(name, '3D')} was expected")
        arr = series.array[..., 0] if series.array.ndim == 4 else series.array
        return Volume(arr, series.geometry, str(p), series.metadata)
    sitk = _sitk()
    img, meta = _read_sitk_file(p)
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise input_error(p, f"has {img.GetNumberOfComponentsPerPixel()} values per voxel "
                             f"(a 4D or vector image); a 3D {name} was expected")
    if img.GetDimension() == 4:
        n = img.GetSize()[3]
        if n != 1:
            raise input_error(p, f"is a 4D image with {n} frames; a 3D {name} was expected")
        img = img[:, :, :, 0]
    if img.GetDimension() == 2:
        img = sitk.JoinSeries(img)
    if img.GetDimension() != 3:
        raise input_error(p, f"has {img.GetDimension()} dimensions; a 3D {name} was expected")
    arr = _restore_nifti_nans(p, sitk.GetArrayFromImage(img))
    if arr.size == 0:
        raise input_error(p, "contains no voxels")
    return Volume(arr, _geometry_from_sitk(img, arr.shape), str(p), meta)


def read_series(
    path: str | os.PathLike,
    tr: Optional[float] = None,
    name: str = "series",
    min_frames: int = 2,
) -> Series:
    """Read a 4D series (time last) from a 4D NIfTI/NRRD/MetaImage file or a DICOM folder.

    Parameters
    ----------
    path
        A 4D file, or a folder of DICOM files (one series with repeated slice
        positions, several single-time-point series, or an enhanced multi-frame file).
    tr
        Frame interval in seconds; overrides the header's timing when given.
    min_frames
        Fewer frames than this is refused.

    Returns
    -------
    Series
        ``array`` ``[k, j, i, t]`` in the file's own type (float32 after rescaling for DICOM);
        ``times`` in seconds when known.
    """
    p = _check_exists(path, name)
    if tr is not None and (not np.isfinite(tr) or tr <= 0):
        raise ParameterError("tr", f"must be a positive number of seconds, got {tr}")
    if _is_dicom_dir(p):
        series = dicom.read_dicom_folder(p)
    else:
        series = _read_series_file(p)
    if series.array.ndim != 4 or series.array.shape[-1] < 2:
        raise input_error(p, f"is a 3D image (shape {tuple(series.array.shape[:3])}); "
                             f"{_with_dims(name, '4D')} with time as the 4th dimension was expected")
    if series.n_frames < min_frames:
        raise input_error(p, f"has only {series.n_frames} frames; at least {min_frames} are needed")
    if tr is not None:
        series.tr = float(tr)
        series.times = np.arange(series.n_frames, dtype=float) * float(tr)
    elif series.times is None and series.tr is not None:
        series.times = np.arange(series.n_frames, dtype=float) * series.tr
    if series.times is not None:
        dt = np.diff(series.times)
        if np.any(dt <= 0):
            raise ParameterError("tr", f"{p}: frame times are not strictly increasing; give the frame interval "
                                       "in seconds")
    return series


def _with_dims(name: str, dims: str) -> str:
    """``"a 4D series"`` from ``"series"`` or ``"4D series"`` (never "a 4D 4D series")."""
    return f"a {name}" if name.lower().startswith(dims.lower()) else f"a {dims} {name}"


def _read_series_file(p: Path) -> Series:
    sitk = _sitk()
    img, meta = _read_sitk_file(p)
    side = _bids_sidecar(p)
    times = None
    step = None
    if img.GetNumberOfComponentsPerPixel() > 1:
        # NRRD written by Slicer's Sequences / MultiVolume modules: frames as components.
        arr = sitk.GetArrayFromImage(img)  # (k, j, i, t)
        if arr.ndim == 3:  # 2D vector image
            arr = arr[None]
        geometry = _geometry_from_sitk(img, arr.shape[:3])
        times = _nrrd_frame_times(meta, arr.shape[-1])
    elif img.GetDimension() == 4:
        arr4 = _restore_nifti_nans(p, sitk.GetArrayFromImage(img))  # (t, k, j, i)
        arr = np.moveaxis(arr4, 0, -1)
        geometry = _geometry_from_sitk(img, arr.shape[:3])
        step = _nifti_time_step_seconds(meta)
        if step is None and not any(k.startswith("pixdim") for k in meta):
            s = float(img.GetSpacing()[3])
            step = s if s > 0 and s != 1.0 else None
        times = _nrrd_frame_times(meta, arr.shape[-1]) if p.name.endswith((".nrrd", ".nhdr")) else None
    else:
        arr = sitk.GetArrayFromImage(img)
        geometry = _geometry_from_sitk(img, arr.shape[:3] if arr.ndim >= 3 else (1,) + arr.shape)
        return Series(arr, geometry, path=str(p), metadata=meta)
    te = None
    if "EchoTime" in side:
        te = float(side["EchoTime"])
    if "RepetitionTime" in side and times is None:
        # the BIDS sidecar wins over pixdim[4], which many writers leave at a placeholder 1.0
        step = float(side["RepetitionTime"])
    if times is None and step is not None:
        times = np.arange(arr.shape[-1], dtype=float) * step
    tr_value = step
    if tr_value is None and times is not None and times.size > 1:
        tr_value = float(np.median(np.diff(times)))
    return Series(np.ascontiguousarray(arr), geometry, times, tr_value, te, str(p), meta)


def read_mask(
    path: str | os.PathLike,
    reference: Geometry,
    name: str = "mask",
    allow_empty: bool = False,
) -> np.ndarray:
    """Read a binary mask that must lie on ``reference``'s grid.

    Returns a boolean ``[k, j, i]`` array (nonzero voxels are inside). Raises a
    clear error when the mask is on another grid, contains NaN, or is empty.
    """
    vol = read_volume(path, name)
    check_same_grid(vol.geometry, reference, path, name)
    arr = np.asarray(vol.array)
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise input_error(path, f"{name} contains NaN values")
    mask = arr != 0
    if not allow_empty and not mask.any():
        raise input_error(path, f"{name} is empty (no nonzero voxel)")
    return mask


def read_labels(path: str | os.PathLike, reference: Geometry, name: str = "label map") -> np.ndarray:
    """Read an integer label map on ``reference``'s grid; returns int16 ``[k, j, i]``."""
    vol = read_volume(path, name)
    check_same_grid(vol.geometry, reference, path, name)
    arr = np.asarray(vol.array)
    if np.issubdtype(arr.dtype, np.floating):
        if np.isnan(arr).any():
            raise input_error(path, f"{name} contains NaN values")
        if not np.allclose(arr, np.round(arr)):
            raise input_error(path, f"{name} has non-integer values; a label map was expected")
    return np.round(arr).astype(np.int16)


def check_same_grid(geometry: Geometry, reference: Geometry, path, name: str = "image") -> None:
    """Raise a clear error when ``geometry`` is not the voxel grid of ``reference``."""
    if not geometry.same_grid(reference):
        raise input_error(path, f"{name} is not on the grid of the reference image "
                                f"({geometry.differences(reference)}); resample it onto the reference first")


# --------------------------------------------------------------------------------------
# writers


def to_sitk(array: np.ndarray, geometry: Geometry):
    """A SimpleITK image of a ``[k, j, i]`` array placed on ``geometry``."""
    sitk = _sitk()
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if tuple(arr.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {arr.shape} does not match geometry shape {geometry.shape}")
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def from_sitk(img) -> Volume:
    """A :class:`Volume` from a 3D SimpleITK image."""
    sitk = _sitk()
    arr = sitk.GetArrayFromImage(img)
    return Volume(arr, _geometry_from_sitk(img, arr.shape))


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike,
                 dtype: Optional[np.dtype] = None) -> Path:
    """Write a ``[k, j, i]`` array on ``geometry`` (format from the file ending; compressed)."""
    sitk = _sitk()
    arr = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    img = to_sitk(arr, geometry)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(p), useCompression=True)
    return p


def write_series(array: np.ndarray, geometry: Geometry, path: str | os.PathLike,
                 tr: Optional[float] = None) -> Path:
    """Write a ``[k, j, i, t]`` series as a 4D NIfTI (time step ``tr`` s in pixdim[4])."""
    sitk = _sitk()
    arr = np.asarray(array)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(arr, -1, 0)), isVector=False)
    step = float(tr) if tr else 1.0
    img.SetSpacing(tuple(geometry.spacing) + (step,))
    img.SetOrigin(tuple(geometry.origin) + (0.0,))
    d4 = np.eye(4)
    d4[:3, :3] = geometry.direction_matrix
    img.SetDirection(tuple(d4.ravel()))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(p), useCompression=True)
    return p


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Stage outputs in a hidden temporary folder; move them into ``out_dir`` on success.

    On any exception the staging folder is removed and ``out_dir`` is left as it
    was (a folder created for this run is removed again), so a failed run leaves
    no half-written output. Existing files of the same name are replaced only
    when the run succeeds.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise input_error(out, "output path exists and is not a folder")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name or 'out'}.partial-", dir=parent))
    except OSError as exc:
        raise input_error(out, f"cannot create the output folder ({exc.strerror})") from None
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        for item in sorted(stage.iterdir()):
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise input_error(out, f"cannot write the outputs ({exc.strerror})") from None
    shutil.rmtree(stage, ignore_errors=True)


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON (numpy scalars and arrays converted)."""

    def convert(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o)}")

    p = Path(path)
    p.write_text(json.dumps(data, indent=2, default=convert, allow_nan=True) + "\n")
    return p


def check_finite_series(series: Series, mask: Optional[np.ndarray] = None, name: str = "series") -> None:
    """Refuse a series with NaN or infinite values inside ``mask`` (whole image when None).

    The message names the file and the first affected frames (1-based), since a
    broken frame is the usual cause (an interrupted acquisition or conversion).
    """
    check_finite_values(series.array, mask, series.path or name, name)


def check_finite_values(data: np.ndarray, mask: Optional[np.ndarray] = None, source: str = "series",
                        name: str = "series") -> None:
    """:func:`check_finite_series` for an array ``[k, j, i, t]``; ``source`` names it in the message.

    The one NaN policy of the package: any NaN or infinite value inside ``mask`` is refused
    (outside it the values are never used), by the command line and the library alike.
    """
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.floating):
        return
    inside = data[mask] if mask is not None else data.reshape(-1, data.shape[-1])
    bad = ~np.isfinite(inside).all(axis=0)
    if bad.any():
        frames = np.flatnonzero(bad) + 1
        listed = ", ".join(str(f) for f in frames[:8]) + (" ..." if frames.size > 8 else "")
        where = "inside the mask" if mask is not None else ""
        raise input_error(source, f"{name} has NaN or infinite values {where} in frame(s) {listed} "
                                  f"of {data.shape[-1]}; remove or repair those frames".replace("  ", " "))
