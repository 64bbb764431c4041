"""Image input/output: NIfTI, NRRD, MetaImage and DICOM series, 3D and 4D.

Conventions used across the core
--------------------------------
* A 3D array is indexed ``[k, j, i]`` (slice, row, column), the order SimpleITK
  and Slicer's ``arrayFromVolume`` use; a 4D series is ``[k, j, i, t]`` (time last).
* :class:`Geometry` holds the ITK/DICOM (LPS) description of the voxel grid:
  ``spacing`` and ``origin`` in mm in ``(i, j, k)``/``(x, y, z)`` order and the
  3x3 ``direction`` cosine matrix whose columns are the i, j, k axes.
  :meth:`Geometry.ijk_to_ras` gives the 4x4 matrix Slicer uses.
* :class:`Geometry`, :class:`Volume` and :class:`Series` live in
  :mod:`perfusionai.geometry` (below this module and :mod:`perfusionai.dicom`)
  and are re-exported here.
* Every map is written on the input's exact grid (:func:`write_volume`), and
  output folders are written atomically (:func:`atomic_output_dir`: manifest,
  inputs guard, stages of killed runs removed).

What the reader fixes or refuses beyond ITK: NaN and +-Inf voxels of NIfTI files
are kept (ITK reads them as 0); truncated NIfTI files are refused; qform/sform
conflicts are resolved as nibabel and FSL do (sform wins, with a warning);
NIfTI-2 is read through nibabel; a time-last 4D NRRD in a 3D space (pynrrd/teem)
is read by :func:`_read_nrrd_fallback`; pictures (PNG, JPEG, ...) are refused;
Siemens MOSAIC DICOM is unpacked (:mod:`perfusionai.dicom`).

All user-caused problems raise :class:`perfusionai.errors.PerfusionAIError`
with a message naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from . import dicom
from .errors import ParameterError, PerfusionAIError, input_error, warn
from .geometry import Geometry, Series, Volume

__all__ = ["Geometry", "Volume", "Series", "IMAGE_SUFFIXES", "read_volume", "read_series", "read_mask",
           "read_labels", "check_same_grid", "to_sitk", "from_sitk", "write_volume", "write_series",
           "atomic_output_dir", "run_label", "run_inputs", "MANIFEST_NAME", "write_json", "check_finite_series", "check_finite_values"]

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


#: ITK image IOs for pictures, not medical images: refused by name (a PNG is not "4 frames").
_PICTURE_IOS = {"PNGImageIO": "PNG", "JPEGImageIO": "JPEG", "BMPImageIO": "BMP", "TIFFImageIO": "TIFF",
                "JPEG2000ImageIO": "JPEG 2000", "GIFImageIO": "GIF"}

# Largest disagreement between qform and sform still taken as "the same" (mm, direction cosines).
_FORM_ATOL = 1e-3


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith((".nii", ".nii.gz"))


def _is_nrrd(p: Path) -> bool:
    return p.name.lower().endswith((".nrrd", ".nhdr"))


@dataclass
class _NiftiInfo:
    """What nibabel knows about a NIfTI file that ITK's reader loses or gets wrong."""

    version: int
    raw: Optional[np.ndarray]          # unscaled float data in file order (None for integer files)
    scale: tuple[float, float]         # scl_slope, scl_inter (1, 0 when unset)
    sform_lps: Optional[np.ndarray]    # 4x4 voxel->LPS of the sform when it must replace ITK's choice
    image: object = None               # the nibabel image (NIfTI-2 only)


def _lps_of_ras(affine: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=float)


def _spacing_direction(p: Path, lps: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Spacing (i, j, k) and orthonormal direction columns of a 4x4 voxel->LPS matrix."""
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(columns)):
        raise input_error(p, f"the {what} has a zero-length or non-finite axis; the file's geometry is broken")
    direction = columns / spacing[None, :]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise input_error(p, f"the {what} has shear (its axes are not perpendicular), which an image grid "
                             f"cannot represent; resample the image onto a regular grid first")
    return spacing, direction


def _nifti_info(p: Path) -> _NiftiInfo:
    """Check a NIfTI file with nibabel before ITK reads it.

    * a file holding fewer bytes than its header declares is refused (ITK zero-fills
      the missing part of an integer file silently);
    * NaN and +-Inf of a float file are kept (ITK reads them as 0) for :func:`_restore_nonfinite`;
    * when qform and sform disagree, the sform wins (sform_code > 0), as nibabel and FSL
      decide, with a warning;
    * NIfTI-2, which ITK cannot read, is handed over whole.
    """
    import nibabel

    try:
        img = nibabel.load(str(p))
    except Exception as exc:  # nibabel's errors for a broken header vary by version
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise input_error(p, f"cannot be read as a NIfTI image ({first[:200]})") from None
    if not isinstance(img, (nibabel.Nifti1Image, nibabel.Nifti2Image)):
        raise input_error(p, f"is a {type(img).__name__}, not a NIfTI image; convert it to NIfTI or NRRD")
    header = img.header
    version = 2 if isinstance(img, nibabel.Nifti2Image) else 1
    dtype = header.get_data_dtype()
    n_bytes = int(np.prod(header.get_data_shape(), dtype=np.int64)) * dtype.itemsize
    if not p.name.lower().endswith(".gz") and n_bytes:
        available = p.stat().st_size - int(header["vox_offset"])
        if available < n_bytes:
            raise input_error(p, f"is truncated: its header declares {n_bytes} bytes of voxel data but the file "
                                 f"holds {max(available, 0)}; the file was cut short (an interrupted copy "
                                 f"or download)")
    raw = None
    try:
        if version == 2 or np.issubdtype(dtype, np.floating) or p.name.lower().endswith(".gz"):
            data = np.asanyarray(img.dataobj.get_unscaled())
            raw = data if np.issubdtype(data.dtype, np.floating) else None
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise input_error(p, f"is truncated or corrupt: its voxel data end before the size its header "
                             f"declares ({type(exc).__name__}); the file was cut short") from None
    slope, inter = header.get_slope_inter()
    scale = (1.0 if slope is None else float(slope), 0.0 if inter is None else float(inter))
    sform, s_code = header.get_sform(coded=True)
    qform, q_code = header.get_qform(coded=True)
    sform_lps = None
    if s_code and s_code > 0 and q_code and q_code > 0 and not np.allclose(sform, qform, atol=_FORM_ATOL):
        sform_lps = _lps_of_ras(sform)
        _spacing_direction(p, sform_lps, "sform")
        warn(f"{p}: the qform and the sform of the header disagree; using the sform (sform_code {int(s_code)}), "
             f"as nibabel and FSL do; the maps are written on that geometry")
    return _NiftiInfo(version, raw, scale, sform_lps, img if version == 2 else None)


def _place(img, lps: np.ndarray, p: Path, what: str) -> None:
    """Set the origin, spacing and direction of a 3D or 4D ITK image from a 4x4 voxel->LPS matrix."""
    spacing, direction = _spacing_direction(p, lps, what)
    dim = img.GetDimension()
    if dim == 4:
        d4 = np.eye(4)
        d4[:3, :3] = direction
        img.SetDirection(tuple(d4.ravel()))
        img.SetSpacing(tuple(float(s) for s in spacing) + (img.GetSpacing()[3],))
        img.SetOrigin(tuple(float(o) for o in lps[:3, 3]) + (img.GetOrigin()[3],))
    else:
        img.SetDirection(tuple(direction[:dim, :dim].ravel()))
        img.SetSpacing(tuple(float(s) for s in spacing[:dim]))
        img.SetOrigin(tuple(float(o) for o in lps[:dim, 3]))


def _nifti2_to_sitk(p: Path, info: _NiftiInfo):
    """A NIfTI-2 file (which ITK cannot read) as an ITK image with ITK-style metadata."""
    sitk = _sitk()
    img = info.image
    header = img.header
    data = np.asanyarray(img.dataobj)
    if data.ndim > 4:
        raise input_error(p, f"has {data.ndim} dimensions; a 3D image or a 4D series was expected")
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.T), isVector=False)
    lps = _lps_of_ras(img.affine)
    if data.ndim == 4:
        zooms = header.get_zooms()
        out.SetSpacing((1.0, 1.0, 1.0, float(zooms[3]) if len(zooms) > 3 and zooms[3] > 0 else 1.0))
    _place(out, lps, p, "NIfTI-2 affine")
    pixdim = header["pixdim"]
    meta = {f"pixdim[{n}]": str(float(pixdim[n])) for n in range(8)}
    meta["xyzt_units"] = str(int(header["xyzt_units"]))
    meta["nifti_version"] = "2"
    return out, meta


def _read_sitk_file(p: Path):
    """An ITK image and its metadata, with what the file format needs fixed (see :func:`_nifti_info`).

    Returns ``(img, meta, nifti_info)``; ``nifti_info`` is None for files other than NIfTI.
    """
    sitk = _sitk()
    info = _nifti_info(p) if _is_nifti(p) else None
    if info is not None and info.version == 2:
        img, meta = _nifti2_to_sitk(p, info)
        return img, meta, info
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        picture = _PICTURE_IOS.get(sitk.ImageFileReader.GetImageIOFromFileName(str(p)))
    except RuntimeError:
        picture = None
    if picture is None:
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            if _is_nrrd(p):
                return (*_read_nrrd_fallback(p, exc), None)
            raise input_error(p, f"cannot be read as an image ({_itk_message(exc)})") from None
    if picture is not None:
        raise input_error(p, f"is a {picture} picture, not a medical image; give a NIfTI, NRRD or MetaImage "
                             f"file or a DICOM folder")
    try:
        meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
        img = reader.Execute()
    except RuntimeError as exc:
        raise input_error(p, f"cannot be read as an image ({_itk_message(exc)})") from None
    if info is not None and info.sform_lps is not None:
        _place(img, info.sform_lps, p, "sform")
    return img, meta, info


def _itk_message(exc: Exception) -> str:
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else "unknown reader error"
    return last.replace("ITK ERROR: ", "")[:200]


def _restore_nonfinite(info: Optional[_NiftiInfo], arr: np.ndarray) -> np.ndarray:
    """Put back the NaN and +-Inf voxels that ITK's NIfTI reader turns into zeros.

    ITK reads NaN and infinite voxels of a float NIfTI file as 0, which would silently
    hide broken frames (and turn them into plausible-looking tissue); nibabel reads the raw
    values. ``arr`` is in SimpleITK order (the reverse of the file's axis order).
    """
    if info is None or info.raw is None or not np.issubdtype(arr.dtype, np.floating):
        return arr
    bad = ~np.isfinite(info.raw)
    if not bad.any():
        return arr
    values = info.raw[bad] * info.scale[0] + info.scale[1]
    bad = bad.T
    if bad.shape != arr.shape:  # vector layouts: compare element counts in file order
        if bad.size != arr.size:
            return arr
        bad = bad.reshape(arr.shape)
        values = info.raw.T.reshape(arr.shape)[bad] * info.scale[0] + info.scale[1]
    else:
        values = info.raw.T[bad] * info.scale[0] + info.scale[1]
    arr = np.array(arr, copy=True)
    arr[bad] = values
    return arr


# --------------------------------------------------------------------------------------
# NRRD that ITK refuses: a 4D file whose time axis is a domain axis beside a 3D space

_NRRD_TYPES = {
    "signed char": "i1", "int8": "i1", "int8_t": "i1", "uchar": "u1", "unsigned char": "u1", "uint8": "u1",
    "uint8_t": "u1", "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2",
    "int16": "i2", "int16_t": "i2", "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2",
    "uint16": "u2", "uint16_t": "u2", "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
    "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4", "longlong": "i8",
    "long long": "i8", "int64": "i8", "int64_t": "i8", "ulonglong": "u8", "unsigned long long": "u8",
    "uint64": "u8", "uint64_t": "u8", "float": "f4", "double": "f8",
}


def _nrrd_header(p: Path) -> tuple[dict, int]:
    """The fields of a NRRD header (lower-case keys) and the byte offset of the data."""
    with open(p, "rb") as f:
        magic = f.readline()
        if not magic.startswith(b"NRRD"):
            raise input_error(p, "is not a NRRD file (no NRRD magic line)")
        fields: dict = {}
        while True:
            line = f.readline()
            if not line or line in (b"\n", b"\r\n"):
                break
            text = line.decode("latin-1").rstrip("\r\n")
            if text.startswith("#") or ":=" in text:
                continue
            key, sep, value = text.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        return fields, f.tell()


def _read_nrrd_fallback(p: Path, itk_error: Exception):
    """Read a 4D NRRD whose non-space axis is time (what pynrrd and teem write) as a 4D ITK image.

    ITK's NRRD reader refuses four domain axes in a 3D space; this reads the header and the
    raw or gzip data itself. Any other layout gets ITK's refusal, in one line.
    """
    import gzip

    sitk = _sitk()
    fields, offset = _nrrd_header(p)
    refuse = input_error(p, f"cannot be read as an image ({_itk_message(itk_error)})")
    try:
        dim = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
        dirs_text = fields.get("space directions", "")
    except (KeyError, ValueError):
        raise refuse from None
    vectors = []
    try:
        for token in re.findall(r"\([^)]*\)|none", dirs_text):
            vectors.append(None if token == "none" else [float(v) for v in token.strip("()").split(",")])
    except ValueError:
        raise refuse from None
    if any(fields.get(k, "0").strip() not in ("0", "") for k in ("byte skip", "line skip")):
        raise input_error(p, "NRRD 'byte skip'/'line skip' is not supported for a 4D time-last file; "
                             "write it without a skip")
    if dim != 4 or len(sizes) != 4 or len(vectors) != 4 or sum(v is None for v in vectors) != 1:
        raise refuse
    t_axis = next(n for n, v in enumerate(vectors) if v is None)
    space_vectors = [np.asarray(v, float) for v in vectors if v is not None]
    if any(v.size != 3 for v in space_vectors):
        raise refuse
    dtype_code = _NRRD_TYPES.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "raw").lower()
    if dtype_code is None or encoding not in ("raw", "gzip", "gz"):
        raise input_error(p, f"NRRD type '{fields.get('type')}' or encoding '{encoding}' is not supported "
                             f"for a 4D time-last file; write it raw or gzip-compressed")
    endian = "<" if fields.get("endian", "little").lower() == "little" else ">"
    dtype = np.dtype(endian + dtype_code)
    if "data file" in fields or "datafile" in fields:
        data_path = p.parent / (fields.get("data file") or fields.get("datafile"))
        start = 0
    else:
        data_path, start = p, offset
    try:
        with open(data_path, "rb") as f:
            f.seek(start)
            blob = f.read()
        if encoding in ("gzip", "gz"):
            blob = gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as exc:
        raise input_error(p, f"NRRD data cannot be read ({exc}); the file is truncated or corrupt") from None
    count = int(np.prod(sizes))
    if len(blob) < count * dtype.itemsize:
        raise input_error(p, f"is truncated: its header declares {count * dtype.itemsize} bytes of voxel data "
                             f"but the file holds {len(blob)}")
    data = np.frombuffer(blob[:count * dtype.itemsize], dtype=dtype)
    data = data.reshape(sizes[::-1])              # numpy order: slowest axis first
    file_axes = [3 - n for n in range(4)]          # numpy axis of file axis n is 3 - n
    space_axes = [n for n in range(4) if n != t_axis]
    # ITK order wanted: (t, k, j, i) in numpy terms = file axes (t, s2, s1, s0)
    data = np.transpose(data, [file_axes[t_axis]] + [file_axes[n] for n in space_axes[::-1]])
    data = np.ascontiguousarray(data.astype(dtype.newbyteorder("=")))
    img = sitk.GetImageFromArray(data, isVector=False)
    space = fields.get("space", "left-posterior-superior").lower()
    flip = {"left-posterior-superior": (1, 1, 1), "lps": (1, 1, 1), "right-anterior-superior": (-1, -1, 1),
            "ras": (-1, -1, 1), "left-anterior-superior": (1, -1, 1), "las": (1, -1, 1)}.get(space)
    if flip is None:
        raise input_error(p, f"NRRD space '{space}' is not supported; use left-posterior-superior or "
                             f"right-anterior-superior")
    lps = np.eye(4)
    lps[:3, :3] = np.stack(space_vectors, axis=1) * np.asarray(flip, float)[:, None]
    origin_text = fields.get("space origin", "(0,0,0)")
    try:
        lps[:3, 3] = np.asarray([float(v) for v in origin_text.strip("()").split(",")]) * np.asarray(flip, float)
    except ValueError:
        raise refuse from None
    spacings = fields.get("spacings", "").split()
    step = float(spacings[t_axis]) if len(spacings) == 4 and spacings[t_axis].lower() != "nan" else 1.0
    img.SetSpacing((1.0, 1.0, 1.0, step if np.isfinite(step) and step > 0 else 1.0))
    _place(img, lps, p, "NRRD space directions")
    meta = {k: v for k, v in fields.items()}
    meta["nrrd_time_axis"] = str(t_axis)
    return img, meta


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
    if _is_dicom_dir(p) or dicom.is_dicom_file(p):
        series = dicom.read_dicom_folder(p) if p.is_dir() else dicom.read_dicom_file(p)
        if series.array.ndim == 4 and series.array.shape[-1] > 1:
            raise input_error(p, f"is a 4D DICOM series with {series.array.shape[-1]} frames; "
                                 f"{_with_dims(name, '3D')} was expected")
        arr = series.array[..., 0] if series.array.ndim == 4 else series.array
        return Volume(arr, series.geometry, str(p), series.metadata)
    sitk = _sitk()
    img, meta, info = _read_sitk_file(p)
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
    arr = _restore_nonfinite(info, sitk.GetArrayFromImage(img))
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
    elif dicom.is_dicom_file(p):
        series = dicom.read_dicom_file(p)
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
    img, meta, info = _read_sitk_file(p)
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
        arr4 = _restore_nonfinite(info, sitk.GetArrayFromImage(img))  # (t, k, j, i)
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


#: The file in an output folder listing what earlier perfusionai runs wrote there (see atomic_output_dir).
MANIFEST_NAME = ".perfusionai-outputs.json"

#: errno values that mean "the disk cannot take the outputs": reported in one line, never a traceback.
_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG, errno.EROFS}

_RUN_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("perfusionai_run_label", default="python")
_RUN_INPUTS: contextvars.ContextVar[tuple] = contextvars.ContextVar("perfusionai_run_inputs", default=())


@contextlib.contextmanager
def run_inputs(paths: Sequence[str | os.PathLike]) -> Iterator[None]:
    """Declare the input files of the run inside this block (the command line: every existing
    path among the verb's options). :func:`atomic_output_dir` refuses to overwrite or delete any
    of them, on top of the ``inputs`` its caller passes."""
    token = _RUN_INPUTS.set(tuple(str(p) for p in paths))
    try:
        yield
    finally:
        _RUN_INPUTS.reset(token)


@contextlib.contextmanager
def run_label(label: str) -> Iterator[None]:
    """Name the outputs written inside this block as those of one verb (``"dsc maps"``).

    The command line and :meth:`perfusionai.jobs.Job.run` set it; :func:`atomic_output_dir`
    records outputs per label, so a re-run of ``dsc maps`` removes the stale outputs of the
    previous ``dsc maps`` run in that folder without touching what ``prm ct`` wrote beside them.
    """
    token = _RUN_LABEL.set(label)
    try:
        yield
    finally:
        _RUN_LABEL.reset(token)


def _read_manifest(out: Path) -> dict:
    try:
        data = json.loads((out / MANIFEST_NAME).read_text())
        runs = {str(k): [str(n) for n in v] for k, v in dict(data.get("runs", {})).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        runs = {}
    return {"format": 1, "runs": runs}


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _remove_dead_stages(parent: Path, name: str) -> None:
    """Remove ``.NAME.partial-*`` folders left by runs that were killed (SIGKILL, power loss).

    A stage is named ``.NAME.partial-<pid>-<random>``; one whose process still runs is kept
    (two runs may write into the same folder at once).
    """
    prefix = f".{name}.partial-"
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
            continue
        match = re.match(r"(\d+)-", entry.name[len(prefix):])
        if match and _pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def no_space_reason(exc: BaseException) -> Optional[str]:
    """The reason when ``exc`` means the disk is full or read-only, else None."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
        return exc.strerror or os.strerror(exc.errno)
    if isinstance(exc, RuntimeError) and "No space left on device" in str(exc):  # ITK's writers
        return "No space left on device"
    return None


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (),
                      owner: Optional[str] = None) -> Iterator[Path]:
    """Stage outputs in a hidden temporary folder; move them into ``out_dir`` on success.

    The rules (the promise of the README's reliability section):

    * On any exception (SIGINT and, through the command line's handler, SIGTERM included)
      the stage is removed and ``out_dir`` is left as it was: a failed run leaves no
      half-written output. A stage left by a killed run (SIGKILL) is removed by the next run
      into the same folder. A full disk ends in one line naming the folder.
    * ``out_dir`` keeps a manifest (:data:`MANIFEST_NAME`) of the outputs each verb
      (``owner``; default the running verb, see :func:`run_label`) wrote there. A re-run
      replaces that verb's outputs as a whole: files the previous run wrote and this one
      does not (``k1.nii.gz`` of an earlier leakage run) are removed, so no stale file sits
      beside a summary that contradicts it. Nothing else is ever deleted: an existing
      *folder* named like an output that no perfusionai run wrote is refused (one line), and
      files of other names are never touched. An existing file of an output's name is replaced.
    * ``inputs``: the run's input files (the command line adds every existing path among the
      verb's options, :func:`run_inputs`). A run whose outputs would overwrite or delete one of
      them is refused before anything in ``out_dir`` changes (``--out`` set to the inputs'
      folder with an input named like an output).

    Yields the stage folder (write the outputs there).
    """
    out = Path(os.path.abspath(os.fspath(out_dir)))
    if out.exists() and not out.is_dir():
        raise input_error(out, "output path exists and is not a folder")
    label = owner or _RUN_LABEL.get()
    protected = [Path(os.path.realpath(os.fspath(p))) for p in (*inputs, *_RUN_INPUTS.get())
                 if p is not None and str(p) != ""]
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_stages(parent, out.name)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise input_error(out, f"cannot create the output folder ({exc.strerror})") from None
    try:
        yield stage
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        reason = no_space_reason(exc)
        if reason is not None:
            raise input_error(out, f"cannot write the outputs ({reason}); nothing was written") from None
        raise
    try:
        with _signals_deferred():  # Ctrl-C or SIGTERM while moving: after the move, never halfway
            _commit(stage, out, protected, label)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration of the block (POSIX, main thread only)."""
    import signal
    import threading

    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, previous)


def _commit(stage: Path, out: Path, protected: list, label: str) -> None:
    """Move the staged outputs into ``out`` under the rules of :func:`atomic_output_dir`."""
    staged_manifest = stage / MANIFEST_NAME
    if staged_manifest.exists():  # a copied output folder brought its own manifest along
        staged_manifest.unlink()
    names = sorted(item.name for item in stage.iterdir())
    manifest = _read_manifest(out)
    known = {n for listed in manifest["runs"].values() for n in listed}
    real_out = Path(os.path.realpath(out))
    for name in names:
        target = real_out / name
        for p in protected:
            if _is_within(p, target):
                raise input_error(out, f"writing the output '{name}' here would overwrite the input {p}; "
                                       f"choose another output folder")
        if target.is_dir() and not target.is_symlink() and name not in known:
            raise input_error(target, "a folder of this name exists and was not written by perfusionai; "
                                      "move it away or choose another output folder")
    stale = [n for n in manifest["runs"].get(label, []) if n not in names and n != MANIFEST_NAME]
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in stale:
            target = out / name
            if any(_is_within(p, Path(os.path.realpath(target))) for p in protected):
                continue  # an input of this run: never deleted
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        for name in names:
            item, target = stage / name, out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        runs = {k: [n for n in v if n not in names] for k, v in manifest["runs"].items() if k != label}
        runs[label] = names
        runs = {k: v for k, v in runs.items() if v}
        tmp = out / (MANIFEST_NAME + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": 1, "written_by": "perfusionai", "runs": runs}, indent=1) + "\n")
        os.replace(tmp, out / MANIFEST_NAME)
    except OSError as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise input_error(out, f"cannot write the outputs ({exc.strerror})") from None


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented, strict JSON (numpy scalars and arrays converted; NaN and Inf as null)."""

    def convert(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o)}")

    def strict(o):
        # NaN and Inf are not JSON (strict parsers refuse them): written as null
        if isinstance(o, float) and not np.isfinite(o):
            return None
        if isinstance(o, np.generic):
            return strict(o.item())
        if isinstance(o, np.ndarray):
            return strict(o.tolist())
        if isinstance(o, dict):
            return {k: strict(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [strict(v) for v in o]
        return o

    p = Path(path)
    p.write_text(json.dumps(strict(data), indent=2, default=convert, allow_nan=False) + "\n")
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
