"""Writes small synthetic DICOM series for the I/O tests (pydicom; no pixel compression)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _base(rows, cols, te_ms, tr_ms, series_uid, study_uid, frame_uid):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.EchoTime = te_ms
    ds.RepetitionTime = tr_ms
    return ds


def write_dsc_dicom(folder: Path, data: np.ndarray, spacing=(0.9, 1.1, 4.0), origin=(-50.0, -60.0, 10.0),
                    orientation=(1, 0, 0, 0, 1, 0), tr_s=1.5, te_ms=30.0, layout="single-series",
                    shuffle_seed=0) -> None:
    """Write ``data[k, j, i, t]`` (uint16 values) as DICOM files in ``folder``.

    ``layout`` "single-series": one series, each slice position repeated per time point;
    "multi-series": one series per time point. Files are written in shuffled order.
    """
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    nk, nj, ni, nt = data.shape
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    study, frame = generate_uid(), generate_uid()
    series_uids = [generate_uid()] * nt if layout == "single-series" else [generate_uid() for _ in range(nt)]
    rng = np.random.default_rng(shuffle_seed)
    order = rng.permutation(nk * nt)
    for n in order:
        k, t = divmod(int(n), nt)
        ds = _base(nj, ni, te_ms, tr_s * 1000, series_uids[t], study, frame)
        pos = np.asarray(origin) + k * spacing[2] * normal
        ds.ImagePositionPatient = [float(x) for x in pos]
        ds.ImageOrientationPatient = [float(x) for x in orientation]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (j), column spacing (i)
        ds.SliceThickness = spacing[2]
        seconds = 36000 + t * tr_s + k * 0.01  # slices of one frame acquired within the TR
        hh, rem = divmod(seconds, 3600)
        mm, ss = divmod(rem, 60)
        ds.AcquisitionTime = f"{int(hh):02d}{int(mm):02d}{ss:09.6f}"
        ds.TemporalPositionIdentifier = t + 1
        ds.InstanceNumber = t * nk + k + 1
        ds.SeriesNumber = 100 + (t if layout == "multi-series" else 0)
        ds.PixelData = np.ascontiguousarray(data[k, :, :, t].astype(np.uint16)).tobytes()
        ds.save_as(folder / f"img{int(n):05d}.dcm", enforce_file_format=True)


def write_enhanced_dicom(path: Path, data: np.ndarray, spacing=(0.9, 1.1, 4.0), origin=(-50.0, -60.0, 10.0),
                         orientation=(1, 0, 0, 0, 1, 0), tr_s=1.5, te_ms=30.0, shuffle_seed=0,
                         rescale=None) -> None:
    """Write ``data[k, j, i, t]`` as one enhanced multi-frame MR object (frames in shuffled order).

    ``rescale(t) -> (slope, intercept)``: stored pixels are ``(data - intercept) / slope`` and each
    frame carries its own Pixel Value Transformation functional group (as enhanced objects do).
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    nk, nj, ni, nt = data.shape
    ds = _base(nj, ni, te_ms, tr_s * 1000, generate_uid(), generate_uid(), generate_uid())
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    shared = Dataset()
    po = Dataset()
    po.ImageOrientationPatient = [float(x) for x in orientation]
    pm = Dataset()
    pm.PixelSpacing = [spacing[1], spacing[0]]
    pm.SliceThickness = spacing[2]
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelMeasuresSequence = Sequence([pm])
    echo = Dataset()
    echo.EffectiveEchoTime = te_ms
    shared.MREchoSequence = Sequence([echo])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    order = np.random.default_rng(shuffle_seed).permutation(nk * nt)
    frames, pixels = [], []
    for n in order:
        k, t = divmod(int(n), nt)
        group = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [float(x) for x in np.asarray(origin) + k * spacing[2] * normal]
        fc = Dataset()
        fc.TemporalPositionIndex = t + 1
        seconds = 36000 + t * tr_s + 0.01 * k
        hh, rem = divmod(seconds, 3600)
        mm, ss = divmod(rem, 60)
        fc.FrameAcquisitionDateTime = f"20260101{int(hh):02d}{int(mm):02d}{ss:09.6f}"
        group.PlanePositionSequence = Sequence([pp])
        group.FrameContentSequence = Sequence([fc])
        frame = data[k, :, :, t].astype(np.float64)
        if rescale is not None:
            slope, intercept = rescale(t)
            pv = Dataset()
            pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = slope, intercept, "US"
            group.PixelValueTransformationSequence = Sequence([pv])
            frame = (frame - intercept) / slope
        frames.append(group)
        pixels.append(np.round(frame).astype(np.uint16))
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.ascontiguousarray(np.stack(pixels)).tobytes()
    ds.save_as(path, enforce_file_format=True)
