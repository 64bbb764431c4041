"""DICOM folders as 3D volumes or 4D series (time last), with timing and echo time.

Handles the layouts DSC and other dynamic series arrive in:

* one classic series whose slices repeat their position once per time point
  (ordered by TemporalPositionIdentifier, then AcquisitionTime, then InstanceNumber);
* several single-time-point series of the same geometry (one series per frame,
  ordered by acquisition time, then series number);
* one enhanced multi-frame object (per-frame plane positions and temporal indices);
* Siemens MOSAIC files (the usual Siemens DSC/DWI export: the slices of one volume tiled
  into one image), one file per time point, unpacked with nibabel's Siemens CSA-header
  reader (:mod:`nibabel.nicom`); the geometry is the dcm2niix/SPM convention (the origin
  is the centre of the first slice's first voxel, not the mosaic's corner).

Geometry follows DICOM (LPS): column ``i`` runs along ImageOrientationPatient's
row direction, ``j`` along its column direction, ``k`` along the slice normal in
the order of increasing position. Pixel values are rescaled with
RescaleSlope/RescaleIntercept. Frame times come from AcquisitionTime (or
FrameAcquisitionDateTime / TriggerTime) relative to the first frame, in seconds.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import input_error
from .geometry import Geometry, Series


def _pydicom():
    import pydicom

    return pydicom


def _seconds_of_day(value) -> Optional[float]:
    """DICOM TM ``HHMMSS.ffffff`` (or a DT's time part) as seconds since midnight."""
    if value is None:
        return None
    text = str(value).strip()
    if len(text) >= 14 and text[:8].isdigit():  # DT: YYYYMMDDHHMMSS.ffffff
        text = text[8:]
    text = text.replace(":", "")
    if not text:
        return None
    try:
        hh = int(text[0:2])
        mm = int(text[2:4]) if len(text) >= 4 else 0
        ss = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return hh * 3600 + mm * 60 + ss


def _list_files(folder: Path) -> list[Path]:
    files = []
    for root, _dirs, names in os.walk(folder):
        for name in names:
            if name.upper() == "DICOMDIR" or name.startswith("."):
                continue
            files.append(Path(root) / name)
    return sorted(files)


def _read_headers(folder: Path):
    return _read_header_list(_list_files(folder))


def _read_header_list(files):
    pydicom = _pydicom()
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # not a DICOM file: ignored, like every viewer does
            continue
        if "PixelData" not in ds and not hasattr(ds, "Rows"):
            continue
        headers.append((f, ds))
    return headers


def _orientation(ds, folder) -> np.ndarray:
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        raise input_error(folder, "DICOM slices have no ImageOrientationPatient; cannot place them in space")
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    return np.stack([row, col, np.cross(row, col)], axis=1)  # columns i, j, normal


def _pixels(path: Path, folder: Path) -> np.ndarray:
    pydicom = _pydicom()
    ds = pydicom.dcmread(str(path))
    try:
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise input_error(path, f"cannot decode the DICOM pixel data ({exc}); "
                                f"install a decoder (pylibjpeg) or convert the series to NIfTI") from None
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return arr * slope + intercept


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom_file(path: str | os.PathLike) -> Series:
    """Read one DICOM file (a slice, an enhanced multi-frame object or a Siemens MOSAIC) like a folder
    holding only it, so a MOSAIC file given directly is unpacked too."""
    path = Path(path)
    headers = _read_header_list([path])
    if not headers:
        raise input_error(path, "is not a readable DICOM image file")
    return _read_from_headers(headers, path)


def read_dicom_folder(folder: str | os.PathLike) -> Series:
    """Read a DICOM folder as a :class:`~perfusionai.io.Series` ``[k, j, i, t]`` (t = 1 for a 3D volume)."""
    folder = Path(folder)
    headers = _read_headers(folder)
    if not headers:
        raise input_error(folder, "contains no readable DICOM image files")
    return _read_from_headers(headers, folder)


def _read_from_headers(headers, folder: Path) -> Series:
    multi = [(f, ds) for f, ds in headers if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1]
    if multi:
        if len(headers) != 1:
            raise input_error(folder, "mixes an enhanced multi-frame DICOM file with other files; "
                                      "put one series per folder")
        return _read_enhanced(*multi[0], folder)
    mosaic = [(f, ds) for f, ds in headers if _is_mosaic(ds)]
    if mosaic:
        if len(mosaic) != len(headers):
            raise input_error(folder, "mixes Siemens MOSAIC files with other DICOM images; "
                                      "put one series per folder")
        return _read_mosaic(mosaic, folder)
    return _read_classic(headers, folder)


def _is_mosaic(ds) -> bool:
    """True for a Siemens MOSAIC image (ImageType holds MOSAIC)."""
    image_type = getattr(ds, "ImageType", None) or []
    return any(str(v).upper() == "MOSAIC" for v in image_type)


def _read_mosaic(headers, folder: Path) -> Series:
    """Siemens MOSAIC files (one volume each) as a series ``[k, j, i, t]``, time by acquisition order."""
    import warnings

    pydicom = _pydicom()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom says "highly experimental" on import
        from nibabel.nicom import dicomwrappers

    def acq(ds) -> tuple:
        t = _seconds_of_day(getattr(ds, "AcquisitionTime", None))
        return (t if t is not None else 0.0, int(getattr(ds, "AcquisitionNumber", 0) or 0),
                int(getattr(ds, "InstanceNumber", 0) or 0))

    ordered = sorted(headers, key=lambda item: acq(item[1]))
    volumes, times, geometry = [], [], None
    for f, _ds in ordered:
        ds = pydicom.dcmread(str(f))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrapper = dicomwrappers.wrapper_from_data(ds)
                if not isinstance(wrapper, dicomwrappers.MosaicWrapper):
                    raise ValueError("no Siemens CSA header with the number of images in the mosaic")
                data = np.asarray(wrapper.get_data(), dtype=np.float32)  # (rows, columns, slices), rescaled
                affine = np.asarray(wrapper.affine, dtype=float)        # (row, column, slice) -> LPS mm
        except Exception as exc:  # a MOSAIC without the CSA fields nibabel needs
            raise input_error(f, f"is a Siemens MOSAIC image that cannot be unpacked ({exc}); convert the series "
                                 f"with dcm2niix and give the NIfTI file instead") from None
        columns = affine[:3, [1, 0, 2]]                                # our i (column), j (row), k (slice)
        spacing = np.linalg.norm(columns, axis=0)
        geom = Geometry((data.shape[2], data.shape[0], data.shape[1]), tuple(float(x) for x in spacing),
                        tuple(float(o) for o in affine[:3, 3]),
                        tuple(float(x) for x in (columns / spacing[None, :]).ravel()))
        if geometry is None:
            geometry = geom
        elif not geom.same_grid(geometry):
            raise input_error(f, f"MOSAIC volume is not on the grid of the first one ({geom.differences(geometry)})")
        volumes.append(np.transpose(data, (2, 0, 1)))
        times.append(acq(ds)[0])
    array = np.stack(volumes, axis=-1)
    first = ordered[0][1]
    t = np.asarray(times, dtype=float) - times[0]
    frame_times = t if len(t) > 1 and np.all(np.diff(t) > 0) else None
    rep = getattr(first, "RepetitionTime", None)
    tr = (float(np.median(np.diff(frame_times))) if frame_times is not None else
          (float(rep) / 1000.0 if rep not in (None, "") and float(rep) > 0 and len(t) > 1 else None))
    if frame_times is None and tr is not None:
        frame_times = np.arange(len(t)) * tr
    te = getattr(first, "EchoTime", None)
    te_s = float(te) / 1000.0 if te not in (None, "") and float(te) > 0 else None
    meta = {"Modality": str(getattr(first, "Modality", "")), "SeriesDescription":
            str(getattr(first, "SeriesDescription", "")), "Mosaic": "yes"}
    return Series(array, geometry, frame_times, tr, te_s, str(folder), meta)


def _read_classic(headers, folder: Path) -> Series:
    first = headers[0][1]
    rotation = _orientation(first, folder)
    normal = rotation[:, 2]
    by_series: dict[str, list] = defaultdict(list)
    for f, ds in headers:
        by_series[str(getattr(ds, "SeriesInstanceUID", "?"))].append((f, ds))

    def position(ds) -> np.ndarray:
        ipp = getattr(ds, "ImagePositionPatient", None)
        if ipp is None:
            raise input_error(folder, "a DICOM slice has no ImagePositionPatient")
        return np.asarray(ipp, dtype=float)

    def acq_time(ds) -> Optional[float]:
        for tag in ("AcquisitionTime", "ContentTime"):
            t = _seconds_of_day(getattr(ds, tag, None))
            if t is not None:
                return t
        trig = getattr(ds, "TriggerTime", None)
        return float(trig) / 1000.0 if trig not in (None, "") else None

    # frames: list of lists of (distance along normal, file, header)
    frames: list[list] = []
    if len(by_series) > 1:
        ordered = sorted(by_series.values(), key=lambda items: (
            min((acq_time(ds) or 0.0) for _, ds in items),
            int(getattr(items[0][1], "SeriesNumber", 0) or 0)))
        for items in ordered:
            frames.append([(float(position(ds) @ normal), f, ds) for f, ds in items])
    else:
        items = next(iter(by_series.values()))
        groups: dict[float, list] = defaultdict(list)
        for f, ds in items:
            groups[round(float(position(ds) @ normal), 3)].append((f, ds))
        counts = {len(v) for v in groups.values()}
        if len(counts) != 1:
            raise input_error(folder, f"slice positions repeat unevenly ({sorted(counts)} images per position); "
                                      "the series is incomplete")
        n_t = counts.pop()

        def order(item):
            ds = item[1]
            return (int(getattr(ds, "TemporalPositionIdentifier", 0) or 0), acq_time(ds) or 0.0,
                    int(getattr(ds, "InstanceNumber", 0) or 0))

        sorted_groups = {d: sorted(v, key=order) for d, v in groups.items()}
        for t in range(n_t):
            frames.append([(d, v[t][0], v[t][1]) for d, v in sorted_groups.items()])

    n_slices = {len(fr) for fr in frames}
    if len(n_slices) != 1:
        raise input_error(folder, f"time points have different numbers of slices ({sorted(n_slices)})")
    for fr in frames:
        fr.sort(key=lambda x: x[0])
    distances = np.array([x[0] for x in frames[0]])
    if len(distances) > 1:
        gaps = np.diff(distances)
        if np.any(gaps <= 1e-6):
            raise input_error(folder, "two slices share one position within a time point")
        if np.max(gaps) - np.min(gaps) > 1e-2 * max(np.mean(gaps), 1e-6):
            raise input_error(folder, "slice spacing is not uniform; cannot build a regular 3D grid")
        dz = float(np.mean(gaps))
    else:
        dz = float(getattr(first, "SliceThickness", 1.0) or 1.0)
    rows, cols = int(first.Rows), int(first.Columns)
    ps = getattr(first, "PixelSpacing", [1.0, 1.0])
    data = np.empty((len(distances), rows, cols, len(frames)), dtype=np.float32)
    for t, fr in enumerate(frames):
        for k, (_d, f, ds) in enumerate(fr):
            if int(ds.Rows) != rows or int(ds.Columns) != cols:
                raise input_error(f, f"image size {ds.Rows}x{ds.Columns} differs from {rows}x{cols}")
            data[k, :, :, t] = _pixels(f, folder)
    origin = position(frames[0][0][2])
    geometry = Geometry((len(distances), rows, cols), (float(ps[1]), float(ps[0]), dz),
                        tuple(float(o) for o in origin), tuple(float(x) for x in rotation.ravel()))
    times = None
    frame_times = [[acq_time(ds) for _d, _f, ds in fr] for fr in frames]
    if len(frames) > 1 and all(t is not None for fr in frame_times for t in fr):
        starts = np.array([min(fr) for fr in frame_times])
        times = starts - starts[0]
        if np.any(np.diff(times) <= 0):
            times = None  # acquisition times not usable (e.g. all equal); TR must come from elsewhere
    te = getattr(first, "EchoTime", None)
    te_s = float(te) / 1000.0 if te not in (None, "") and float(te) > 0 else None
    rep = getattr(first, "RepetitionTime", None)
    tr = float(np.median(np.diff(times))) if times is not None else (
        float(rep) / 1000.0 if rep not in (None, "") and float(rep) > 0 and len(frames) > 1 else None)
    if times is None and tr is not None:
        times = np.arange(len(frames)) * tr
    meta = {"Modality": str(getattr(first, "Modality", "")), "SeriesDescription":
            str(getattr(first, "SeriesDescription", ""))}
    return Series(data, geometry, times, tr, te_s, str(folder), meta)


def _read_enhanced(path: Path, ds, folder: Path) -> Series:
    pydicom = _pydicom()
    full = pydicom.dcmread(str(path))
    try:
        pixels = full.pixel_array.astype(np.float32)
    except Exception as exc:
        raise input_error(path, f"cannot decode the multi-frame pixel data ({exc})") from None
    shared = full.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = full.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != pixels.shape[0]:
        raise input_error(path, "multi-frame DICOM without per-frame functional groups")

    def item(group, name):
        for g in (group, shared):
            if g is not None and name in g:
                return g[name][0]
        return None

    orient = item(per_frame[0], "PlaneOrientationSequence")
    measures = item(per_frame[0], "PixelMeasuresSequence")
    if orient is None or measures is None:
        raise input_error(path, "multi-frame DICOM lacks plane orientation or pixel spacing")
    iop = np.asarray(orient.ImageOrientationPatient, dtype=float)
    rotation = np.stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])], axis=1)
    normal = rotation[:, 2]
    # enhanced objects keep the rescale in the (shared or per-frame) Pixel Value Transformation
    # functional group, possibly per frame; classic attributes at the top level are the fallback
    top_slope = float(getattr(full, "RescaleSlope", 1) or 1)
    top_intercept = float(getattr(full, "RescaleIntercept", 0) or 0)
    slopes = np.empty(len(per_frame), np.float32)
    intercepts = np.empty(len(per_frame), np.float32)
    for idx, group in enumerate(per_frame):
        transform = item(group, "PixelValueTransformationSequence")
        slopes[idx] = float(getattr(transform, "RescaleSlope", top_slope) or top_slope) if transform else top_slope
        intercepts[idx] = (float(getattr(transform, "RescaleIntercept", top_intercept) or 0.0)
                           if transform else top_intercept)
    pixels = pixels * slopes[:, None, None] + intercepts[:, None, None]
    entries = []
    for idx, group in enumerate(per_frame):
        pos = np.asarray(item(group, "PlanePositionSequence").ImagePositionPatient, dtype=float)
        content = item(group, "FrameContentSequence")
        temporal = int(getattr(content, "TemporalPositionIndex", 0) or 0) if content is not None else 0
        t = _seconds_of_day(getattr(content, "FrameAcquisitionDateTime", None)) if content is not None else None
        entries.append((round(float(pos @ normal), 3), temporal, t if t is not None else 0.0, idx, pos))
    distances = sorted({e[0] for e in entries})
    n_t = len(entries) // len(distances)
    if n_t * len(distances) != len(entries):
        raise input_error(path, "frames do not form complete time points")
    data = np.empty((len(distances), pixels.shape[1], pixels.shape[2], n_t), dtype=np.float32)
    times_by_t = np.zeros(n_t)
    for k, d in enumerate(distances):
        frames = sorted((e for e in entries if e[0] == d), key=lambda e: (e[1], e[2], e[3]))
        for t, e in enumerate(frames):
            data[k, :, :, t] = pixels[e[3]]
            if k == 0:
                times_by_t[t] = e[2]
    ps = measures.PixelSpacing
    dz = (distances[1] - distances[0]) if len(distances) > 1 else float(getattr(measures, "SliceThickness", 1) or 1)
    first_pos = min(entries, key=lambda e: e[0])[4]
    geometry = Geometry(data.shape[:3], (float(ps[1]), float(ps[0]), float(dz)),
                        tuple(float(o) for o in first_pos), tuple(float(x) for x in rotation.ravel()))
    times = times_by_t - times_by_t[0] if n_t > 1 and np.all(np.diff(times_by_t) > 0) else None
    tr = float(np.median(np.diff(times))) if times is not None else None
    te = None
    echo = item(per_frame[0], "MREchoSequence")
    if echo is not None and getattr(echo, "EffectiveEchoTime", None):
        te = float(echo.EffectiveEchoTime) / 1000.0
    return Series(data, geometry, times, tr, te, str(folder), {"Modality": str(getattr(full, "Modality", ""))})
