"""The bad-input matrix (issue 13): inputs as users produce them, each with the outcome the README promises.

Every case is built here from a small DSC phantom or from files written by other software
(pydicom's bundled test files, nibabel's bundled test data, NRRD written the way pynrrd and
teem write it) and run through ``perfusionai dsc maps`` or the reader. A case *behaves* when:

* ``ok``: the run exits 0 and the result is checked against what is known (the maps of the
  clean phantom, the geometry the other software states);
* ``refused``: exit status 2 (or :class:`PerfusionAIError` for a reader case) with exactly one
  ``perfusionai: error:`` line naming the file and the problem, no traceback, no output folder
  or stage left behind, and the inputs byte-for-byte unchanged.

The test prints ``bad-input matrix: N cases, N behave`` and fails listing every case that does not.
Cases of other domains' rules (plausibility guards, model files) live in those domains' tests.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from perfusionai import io
from perfusionai.cli import main
from perfusionai.errors import PerfusionAIError

MAPS = ("cbv", "cbf", "mtt", "tmax", "ttp")


@dataclass
class Case:
    name: str
    expect: str                                  # "ok" or "refused"
    build: Callable                              # build(ctx) -> argv (CLI) or a callable (reader)
    pattern: str = ""                            # refused: text the one line must contain
    names_file: Optional[Callable] = None        # refused: the path the line must name (default: none checked)
    check: Optional[Callable] = None             # ok: check(ctx, result) raises AssertionError when wrong
    setup: Optional[Callable] = None             # e.g. monkeypatching for the case


@dataclass
class Context:
    root: Path
    ph: Path
    case_dir: Path = None
    out: Path = None
    baseline: dict = field(default_factory=dict)
    monkeypatch: object = None


CASES: list[Case] = []


def case(name, expect, pattern="", names_file=None, check=None, setup=None):
    def register(build):
        CASES.append(Case(name, expect, build, pattern, names_file, check, setup))
        return build

    return register


# ------------------------------------------------------------------ helpers building inputs


def dsc_argv(ctx, dsc=None, mask=None, aif=None, out=None, extra=()):
    return ["dsc", "maps", "--dsc", str(dsc or ctx.ph / "dsc.nii.gz"), "--te", "0.03",
            "--aif-mask", str(aif or ctx.ph / "aif_mask.nii.gz"), "--mask", str(mask or ctx.ph / "brain_mask.nii.gz"),
            "--method", "sSVD", "--out", str(out or ctx.out), *extra]


def series_copy(ctx, name, mutate=None, dtype=None):
    s = io.read_series(ctx.ph / "dsc.nii.gz")
    arr = s.array.astype(dtype or np.float32)
    if mutate is not None:
        mutate(arr)
    return io.write_series(arr, s.geometry, ctx.case_dir / name, tr=s.tr)


def truncated(ctx, src: Path, name: str, fraction=0.6) -> Path:
    blob = src.read_bytes()
    target = ctx.case_dir / name
    target.write_bytes(blob[: int(len(blob) * fraction)])
    return target


def plain_nifti(ctx, array_kji_t, name, dtype):
    import nibabel

    ref = nibabel.load(str(ctx.ph / "dsc.nii.gz"))
    img = nibabel.Nifti1Image(np.asarray(array_kji_t, dtype=dtype).transpose(2, 1, 0, 3), ref.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 1.5
    path = ctx.case_dir / name
    nibabel.save(img, str(path))
    return path


def write_nrrd_time_last(path: Path, array_kjit, geometry: io.Geometry, encoding="raw", kind="time"):
    """A 4D NRRD as pynrrd and teem write it: four domain axes, the time axis with direction ``none``."""
    data = np.ascontiguousarray(np.moveaxis(array_kjit, -1, 0).astype(np.float32))  # (t, k, j, i)
    nk, nj, ni, nt = array_kjit.shape
    cols = geometry.direction_matrix * np.asarray(geometry.spacing)[None, :]
    dirs = " ".join("(" + ",".join(repr(float(v)) for v in cols[:, c]) + ")" for c in range(3)) + " none"
    header = ("NRRD0005\n# Complete NRRD file format specification at:\n"
              "# http://teem.sourceforge.net/nrrd/format.html\ntype: float\ndimension: 4\n"
              "space: left-posterior-superior\n"
              f"sizes: {ni} {nj} {nk} {nt}\nspace directions: {dirs}\nkinds: domain domain domain {kind}\n"
              f"endian: little\nencoding: {encoding}\n"
              "space origin: (" + ",".join(repr(float(v)) for v in geometry.origin) + ")\n\n")
    blob = data.tobytes() if encoding == "raw" else gzip.compress(data.tobytes())
    path.write_bytes(header.encode() + blob)
    return path


def with_sform_shift(src: Path, target: Path, shift=(7.0, -3.0, 11.0)) -> np.ndarray:
    """Copy ``src`` with its sform moved by ``shift`` mm (code 2) and its qform kept (code 1)."""
    import nibabel

    img = nibabel.load(str(src))
    out = nibabel.Nifti1Image(np.asanyarray(img.dataobj), None, header=img.header.copy())
    qform = img.header.get_qform()
    sform = qform.copy()
    sform[:3, 3] += shift
    out.set_qform(qform, code=1)
    out.set_sform(sform, code=2)
    nibabel.save(out, str(target))
    return sform


def png(ctx, name="frame.png"):
    import SimpleITK as sitk

    path = ctx.case_dir / name
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 12, 4), np.uint8), isVector=True), str(path))
    return path


def maps_equal_baseline(ctx, result, rtol=1e-4):
    for name in MAPS:
        got = io.read_volume(ctx.out / f"{name}.nii.gz").array
        np.testing.assert_allclose(got, ctx.baseline[name], rtol=rtol, atol=1e-4, err_msg=name)


# ------------------------------------------------------------------ DSC series through `dsc maps`


@case("clean phantom (baseline)", "ok", check=lambda ctx, r: _baseline_sane(ctx))
def _(ctx):
    return dsc_argv(ctx)


def _baseline_sane(ctx):
    cbf = io.read_volume(ctx.out / "cbf.nii.gz").array
    assert np.nanmedian(cbf[cbf > 0]) > 1


@case("NaN frame in the series", "refused", "NaN or infinite", names_file=lambda ctx: ctx.case_dir / "nan.nii.gz")
def _(ctx):
    return dsc_argv(ctx, dsc=series_copy(ctx, "nan.nii.gz", lambda a: a.__setitem__((1, 6, 6, 5), np.nan)))


@case("+Inf voxel (ITK reads it as 0)", "refused", "NaN or infinite", names_file=lambda ctx: ctx.case_dir / "inf.nii.gz")
def _(ctx):
    return dsc_argv(ctx, dsc=series_copy(ctx, "inf.nii.gz", lambda a: a.__setitem__((1, 6, 6, 12), np.inf)))


@case("-Inf voxel", "refused", "NaN or infinite", names_file=lambda ctx: ctx.case_dir / "minf.nii.gz")
def _(ctx):
    return dsc_argv(ctx, dsc=series_copy(ctx, "minf.nii.gz", lambda a: a.__setitem__((1, 5, 6, 3), -np.inf)))


@case("truncated integer .nii (SimpleITK zero-fills)", "refused", "truncated",
      names_file=lambda ctx: ctx.case_dir / "cut.nii")
def _(ctx):
    full = plain_nifti(ctx, io.read_series(ctx.ph / "dsc.nii.gz").array, "full.nii", np.int16)
    return dsc_argv(ctx, dsc=truncated(ctx, full, "cut.nii"))


@case("truncated integer .nii.gz", "refused", "truncated", names_file=lambda ctx: ctx.case_dir / "cut.nii.gz")
def _(ctx):
    full = series_copy(ctx, "full.nii.gz", dtype=np.int16)
    return dsc_argv(ctx, dsc=truncated(ctx, full, "cut.nii.gz"))


@case("truncated float .nii.gz (was an EOFError traceback)", "refused", "truncated",
      names_file=lambda ctx: ctx.case_dir / "cutf.nii.gz")
def _(ctx):
    return dsc_argv(ctx, dsc=truncated(ctx, ctx.ph / "dsc.nii.gz", "cutf.nii.gz", 0.5))


@case("truncated mask", "refused", "truncated", names_file=lambda ctx: ctx.case_dir / "mask.nii")
def _(ctx):
    import nibabel

    mask = nibabel.load(str(ctx.ph / "brain_mask.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(np.asanyarray(mask.dataobj).astype(np.int16), mask.affine),
                 str(ctx.case_dir / "full_mask.nii"))
    return dsc_argv(ctx, mask=truncated(ctx, ctx.case_dir / "full_mask.nii", "mask.nii", 0.7))


@case("NIfTI-2 series", "ok", check=maps_equal_baseline)
def _(ctx):
    import nibabel

    n1 = nibabel.load(str(ctx.ph / "dsc.nii.gz"))
    path = ctx.case_dir / "dsc2.nii.gz"
    nibabel.save(nibabel.Nifti2Image.from_image(n1), str(path))
    assert isinstance(nibabel.load(str(path)), nibabel.Nifti2Image)
    return dsc_argv(ctx, dsc=path)


@case("qform and sform disagree: the sform wins, maps carry it", "ok", check=lambda ctx, r: _sform_used(ctx, r))
def _(ctx):
    ctx.sform = with_sform_shift(ctx.ph / "dsc.nii.gz", ctx.case_dir / "dsc.nii.gz")
    with_sform_shift(ctx.ph / "brain_mask.nii.gz", ctx.case_dir / "brain.nii.gz")
    with_sform_shift(ctx.ph / "aif_mask.nii.gz", ctx.case_dir / "aif.nii.gz")
    return dsc_argv(ctx, dsc=ctx.case_dir / "dsc.nii.gz", mask=ctx.case_dir / "brain.nii.gz",
                    aif=ctx.case_dir / "aif.nii.gz")


def _sform_used(ctx, result):
    import nibabel

    assert "perfusionai: warning:" in result["err"] and "sform" in result["err"], result["err"]
    written = nibabel.load(str(ctx.out / "cbf.nii.gz"))
    np.testing.assert_allclose(written.affine, ctx.sform, atol=1e-3)
    maps_equal_baseline(ctx, result)


@case("time-last 4D NRRD in a 3D space (pynrrd/teem, raw)", "ok", check=maps_equal_baseline)
def _(ctx):
    s = io.read_series(ctx.ph / "dsc.nii.gz")
    path = write_nrrd_time_last(ctx.case_dir / "dsc.nrrd", s.array, s.geometry)
    return dsc_argv(ctx, dsc=path, extra=["--tr", "1.5"])


@case("time-last 4D NRRD in a 3D space (gzip)", "ok", check=maps_equal_baseline)
def _(ctx):
    s = io.read_series(ctx.ph / "dsc.nii.gz")
    path = write_nrrd_time_last(ctx.case_dir / "dsc.nrrd", s.array, s.geometry, encoding="gzip")
    return dsc_argv(ctx, dsc=path, extra=["--tr", "1.5"])


@case("PNG given as the series (was '4 frames')", "refused", "PNG picture",
      names_file=lambda ctx: ctx.case_dir / "frame.png")
def _(ctx):
    return dsc_argv(ctx, dsc=png(ctx))


@case("PNG given as the mask", "refused", "PNG picture", names_file=lambda ctx: ctx.case_dir / "frame.png")
def _(ctx):
    return dsc_argv(ctx, mask=png(ctx))


@case("garbage bytes named .nii.gz", "refused", "cannot be read", names_file=lambda ctx: ctx.case_dir / "junk.nii.gz")
def _(ctx):
    (ctx.case_dir / "junk.nii.gz").write_bytes(os.urandom(2000))
    return dsc_argv(ctx, dsc=ctx.case_dir / "junk.nii.gz")


@case("empty file", "refused", "", names_file=lambda ctx: ctx.case_dir / "empty.nii.gz")
def _(ctx):
    (ctx.case_dir / "empty.nii.gz").write_bytes(b"")
    return dsc_argv(ctx, dsc=ctx.case_dir / "empty.nii.gz")


@case("missing file", "refused", "does not exist", names_file=lambda ctx: ctx.case_dir / "nope.nii.gz")
def _(ctx):
    return dsc_argv(ctx, dsc=ctx.case_dir / "nope.nii.gz")


@case("mask differing only in direction (printed two identical grids)", "refused", "direction (",
      names_file=lambda ctx: ctx.case_dir / "flipped.nii.gz")
def _(ctx):
    ref = io.read_volume(ctx.ph / "brain_mask.nii.gz")
    g = ref.geometry
    flipped = io.Geometry(g.shape, g.spacing, g.origin, (1, 0, 0, 0, -1, 0, 0, 0, 1))
    return dsc_argv(ctx, mask=io.write_volume(ref.array, flipped, ctx.case_dir / "flipped.nii.gz"))


@case("3D file given as the series ('a 4D 4D series')", "refused", "a 4D ",
      names_file=lambda ctx: ctx.ph / "brain_mask.nii.gz")
def _(ctx):
    return dsc_argv(ctx, dsc=ctx.ph / "brain_mask.nii.gz")


# ------------------------------------------------------------------ output folders


@case("--out is the inputs' folder and an input is named like an output", "refused",
      "would overwrite the input", names_file=lambda ctx: ctx.case_dir / "S")
def _(ctx):
    folder = ctx.case_dir / "S"
    folder.mkdir()
    shutil.copy(ctx.ph / "dsc.nii.gz", folder / "dsc.nii.gz")
    shutil.copy(ctx.ph / "aif_mask.nii.gz", folder / "aif_mask.nii.gz")
    shutil.copy(ctx.ph / "brain_mask.nii.gz", folder / "cbf.nii.gz")  # the user's mask, named like a map
    ctx.out = folder
    return dsc_argv(ctx, dsc=folder / "dsc.nii.gz", aif=folder / "aif_mask.nii.gz", mask=folder / "cbf.nii.gz")


@case("re-run without leakage correction leaves no stale k1/k2", "ok", check=lambda ctx, r: _no_stale(ctx))
def _(ctx):
    assert main(dsc_argv(ctx, extra=["--leakage-correction", "--progress", "none"])) == 0
    assert (ctx.out / "k2.nii.gz").exists()
    return dsc_argv(ctx)


def _no_stale(ctx):
    names = {p.name for p in ctx.out.iterdir()}
    assert "k1.nii.gz" not in names and "k2.nii.gz" not in names, names
    maps_equal_baseline(ctx, None)


@case("a folder inside --out named like an output is not deleted", "refused", "was not written by perfusionai",
      names_file=lambda ctx: ctx.out / "cbf.nii.gz")
def _(ctx):
    (ctx.out / "cbf.nii.gz").mkdir(parents=True)
    (ctx.out / "cbf.nii.gz" / "thesis.docx").write_text("years of work")
    return dsc_argv(ctx)


@case("a user's own file in --out survives the run", "ok",
      check=lambda ctx, r: _assert((ctx.out / "notes.txt").read_text() == "mine"))
def _(ctx):
    ctx.out.mkdir()
    (ctx.out / "notes.txt").write_text("mine")
    return dsc_argv(ctx)


@case("the stage of a SIGKILLed run is removed by the next run", "ok",
      check=lambda ctx, r: _assert(not any(p.name.startswith(".out.partial-") for p in ctx.out.parent.iterdir())))
def _(ctx):
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)
    leftover = ctx.out.parent / f".out.partial-{pid}-killed"
    leftover.mkdir()
    (leftover / "cbf.nii.gz").write_text("half a map")
    return dsc_argv(ctx)


def _disk_full(ctx):
    import SimpleITK as sitk

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx.monkeypatch.setattr(sitk, "WriteImage", full)


@case("disk full while writing the maps", "refused", "No space left on device",
      names_file=lambda ctx: ctx.out, setup=_disk_full)
def _(ctx):
    return dsc_argv(ctx)


def _assert(condition):
    assert condition


# ------------------------------------------------------------------ files written by other software (reader)


def _pydicom_folder(ctx, name):
    from pydicom.data import get_testdata_file

    src = get_testdata_file(name)
    if src is None:
        pytest.skip(f"pydicom test file {name} is not available")
    folder = ctx.case_dir / Path(name).stem
    folder.mkdir()
    shutil.copy(src, folder / name)
    return folder, src


def _check_pydicom_volume(folder, src):
    import pydicom

    ds = pydicom.dcmread(src)
    vol = io.read_volume(folder)
    expected = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + \
        float(getattr(ds, "RescaleIntercept", 0) or 0)
    np.testing.assert_allclose(vol.array[0], expected)
    np.testing.assert_allclose(vol.geometry.origin, [float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(vol.geometry.spacing[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    np.testing.assert_allclose(vol.geometry.direction_matrix[:, 0], [float(v) for v in ds.ImageOrientationPatient[:3]])
    return vol


@case("pydicom MR_small.dcm", "ok")
def _(ctx):
    folder, src = _pydicom_folder(ctx, "MR_small.dcm")
    return lambda: _check_pydicom_volume(folder, src)


@case("pydicom CT_small.dcm (HU rescale)", "ok")
def _(ctx):
    folder, src = _pydicom_folder(ctx, "CT_small.dcm")

    def run():
        vol = _check_pydicom_volume(folder, src)
        assert vol.array.min() < -500  # air in HU: the intercept was applied

    return run


@case("pydicom MR_small_bigendian.dcm equals MR_small", "ok")
def _(ctx):
    folder, src = _pydicom_folder(ctx, "MR_small_bigendian.dcm")
    little, _ = _pydicom_folder(ctx, "MR_small.dcm")
    return lambda: np.testing.assert_array_equal(io.read_volume(folder).array, io.read_volume(little).array)


@case("pydicom JPEG2000.dcm (no orientation; compressed): read, or refused by name", "ok")
def _(ctx):
    folder, src = _pydicom_folder(ctx, "JPEG2000.dcm")

    def run():
        try:
            vol = io.read_volume(folder)
        except PerfusionAIError as exc:  # a one-line refusal naming the file or its folder
            assert str(folder) in str(exc) and "\n" not in str(exc), str(exc)
            return
        assert vol.array.ndim == 3 and np.isfinite(vol.array).all()

    return run


@case("pydicom rtplan.dcm (no image)", "refused", "no readable DICOM image", names_file=lambda ctx: ctx.case_dir / "rtplan")
def _(ctx):
    folder, _src = _pydicom_folder(ctx, "rtplan.dcm")
    return lambda: io.read_volume(folder)


@case("Siemens MOSAIC (nibabel's siemens_dwi_1000): 128x128x48 at dcm2niix's origin", "ok")
def _(ctx):
    import nibabel

    data_dir = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
    folder = ctx.case_dir / "mosaic"
    folder.mkdir()
    (folder / "dwi.dcm").write_bytes(gzip.open(data_dir / "siemens_dwi_1000.dcm.gz").read())

    def run():
        vol = io.read_volume(folder)
        assert vol.array.shape == (48, 128, 128)
        np.testing.assert_allclose(vol.geometry.ijk_to_ras()[:3, 3], [115.0, 135.028779, -78.710481], atol=1e-3)

    return run


@case("Siemens MOSAIC given as one file, not a folder (was one 896x896 slice)", "ok")
def _(ctx):
    import nibabel

    data_dir = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
    path = ctx.case_dir / "dwi.dcm"
    path.write_bytes(gzip.open(data_dir / "siemens_dwi_1000.dcm.gz").read())

    def run():
        vol = io.read_volume(path)
        assert vol.array.shape == (48, 128, 128)
        np.testing.assert_allclose(vol.geometry.ijk_to_ras()[:3, 3], [115.0, 135.028779, -78.710481], atol=1e-3)

    return run


@case("pydicom CT_small.dcm given as a file equals the folder reading", "ok")
def _(ctx):
    folder, src = _pydicom_folder(ctx, "CT_small.dcm")

    def run():
        one, whole = io.read_volume(folder / "CT_small.dcm"), io.read_volume(folder)
        np.testing.assert_array_equal(one.array, whole.array)
        assert one.geometry.same_grid(whole.geometry)

    return run


@case("Siemens MOSAIC time series (one file per frame, shuffled names): frames in acquisition order", "ok")
def _(ctx):
    folder = ctx.case_dir / "mosaic4d"
    write_mosaic_series(folder, n_frames=3, tr_s=1.5)

    def run():
        s = io.read_series(folder)
        assert s.array.shape == (48, 128, 128, 3)
        np.testing.assert_allclose(s.frame_times(), [0.0, 1.5, 3.0], atol=1e-3)
        inside = s.array[..., 0] > 0
        np.testing.assert_allclose(s.array[..., 1][inside] - s.array[..., 0][inside], 10.0)
        np.testing.assert_allclose(s.array[..., 2][inside] - s.array[..., 0][inside], 20.0)

    return run


def write_mosaic_series(folder: Path, n_frames: int, tr_s: float) -> None:
    """Frames of a Siemens MOSAIC series from nibabel's siemens_dwi_1000 file: frame t has its pixels
    raised by 10 t and its acquisition time moved by t * tr_s; file names do not follow time."""
    import nibabel
    import pydicom
    from pydicom.uid import generate_uid

    data_dir = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
    folder.mkdir(parents=True)
    for t in range(n_frames):
        ds = pydicom.dcmread(gzip.open(data_dir / "siemens_dwi_1000.dcm.gz"))
        pixels = ds.pixel_array.astype(np.uint16)
        pixels[pixels > 0] += 10 * t
        ds.PixelData = pixels.tobytes()
        hh, mm, ss = 10, 0, 5.0 + t * tr_s
        ds.AcquisitionTime = f"{hh:02d}{mm:02d}{ss:09.6f}"
        ds.InstanceNumber = t + 1
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / f"IM{(n_frames - t) * 7:04d}.dcm")


@case("pynrrd-style 4D NRRD with a 'list' time axis last", "ok", check=maps_equal_baseline)
def _(ctx):
    s = io.read_series(ctx.ph / "dsc.nii.gz")
    path = write_nrrd_time_last(ctx.case_dir / "dsc.nrrd", s.array, s.geometry, kind="list")
    return dsc_argv(ctx, dsc=path, extra=["--tr", "1.5"])


@case("time-last 4D NRRD with a detached header (.nhdr + raw)", "ok", check=maps_equal_baseline)
def _(ctx):
    s = io.read_series(ctx.ph / "dsc.nii.gz")
    attached = write_nrrd_time_last(ctx.case_dir / "whole.nrrd", s.array, s.geometry)
    header, _sep, data = attached.read_bytes().partition(b"\n\n")
    (ctx.case_dir / "dsc.raw").write_bytes(data)
    (ctx.case_dir / "dsc.nhdr").write_bytes(header + b"\ndata file: dsc.raw\n\n")
    return dsc_argv(ctx, dsc=ctx.case_dir / "dsc.nhdr", extra=["--tr", "1.5"])


@case("Siemens MOSAIC whose CSA header does not fit (nibabel's 0.dcm)", "refused", "MOSAIC",
      names_file=lambda ctx: ctx.case_dir / "m" / "0.dcm")
def _(ctx):
    from nibabel.testing import data_path

    (ctx.case_dir / "m").mkdir()
    shutil.copy(Path(data_path) / "0.dcm", ctx.case_dir / "m" / "0.dcm")
    return lambda: io.read_volume(ctx.case_dir / "m")


def _nibabel_file(name):
    from nibabel.testing import data_path

    return Path(data_path) / name


@case("nibabel example4d.nii.gz (4D, written by other software)", "ok")
def _(ctx):
    import nibabel

    path = _nibabel_file("example4d.nii.gz")

    def run():
        ref = nibabel.load(str(path))
        s = io.read_series(path, tr=2.0)
        np.testing.assert_allclose(s.array, np.asanyarray(ref.dataobj).transpose(2, 1, 0, 3), rtol=1e-6)
        np.testing.assert_allclose(s.geometry.ijk_to_ras(), ref.affine, atol=1e-3)

    return run


@case("nibabel anatomical.nii (3D)", "ok")
def _(ctx):
    import nibabel

    path = _nibabel_file("anatomical.nii")

    def run():
        ref = nibabel.load(str(path))
        v = io.read_volume(path)
        np.testing.assert_allclose(v.array, np.asanyarray(ref.dataobj).T, rtol=1e-6)
        np.testing.assert_allclose(v.geometry.ijk_to_ras(), ref.affine, atol=1e-3)

    return run


@case("nibabel example_nifti2.nii.gz (NIfTI-2)", "ok")
def _(ctx):
    import nibabel

    path = _nibabel_file("example_nifti2.nii.gz")

    def run():
        ref = nibabel.load(str(path))
        s = io.read_series(path)
        np.testing.assert_array_equal(s.array, np.asanyarray(ref.dataobj).transpose(2, 1, 0, 3))
        np.testing.assert_allclose(s.geometry.ijk_to_ras(), ref.affine, atol=1e-3)

    return run


# ------------------------------------------------------------------ the runner


def _digest(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run_case(c: Case, ctx: Context, capsys) -> Optional[str]:
    """None when the case behaves, else why not."""
    capsys.readouterr()
    built = c.build(ctx)
    protected = {**_digest(ctx.ph), **_digest(ctx.case_dir)}
    out_existed = ctx.out.exists()
    out_before = _digest(ctx.out) if out_existed else {}
    if c.setup:
        c.setup(ctx)
    if callable(built):
        try:
            result = built()
            code, err = 0, ""
        except PerfusionAIError as exc:
            code, err = 2, f"perfusionai: error: {exc}"
        result = {"err": err}
    else:
        code = main(list(built) + ["--progress", "none"])
        err = capsys.readouterr().err
        result = {"err": err}
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if c.expect == "ok":
        if code != 0:
            return f"exit {code}: {err.strip()[-300:]}"
        if c.check:
            c.check(ctx, result)
        return None
    errors = [ln for ln in lines if ln.startswith("perfusionai: error:")]
    others = [ln for ln in lines if not ln.startswith(("perfusionai: error:", "perfusionai: warning:"))]
    if code != 2:
        return f"exit {code} instead of 2: {err.strip()[-300:]}"
    if len(errors) != 1 or others or "Traceback" in err:
        return f"not one line: {err.strip()[-400:]}"
    if "4D 4D" in errors[0]:
        return f"doubled words: {errors[0]}"
    if c.pattern and c.pattern not in errors[0]:
        return f"message lacks {c.pattern!r}: {errors[0]}"
    if c.names_file is not None and str(c.names_file(ctx)) not in errors[0]:
        return f"message does not name {c.names_file(ctx)}: {errors[0]}"
    if {**_digest(ctx.ph), **_digest(ctx.case_dir)} != protected:
        return "an input was modified"
    if out_existed and _digest(ctx.out) != out_before:
        return "the existing output folder was changed"
    if not out_existed and ctx.out.exists():
        return "an output folder was left behind"
    stages = [p.name for p in ctx.out.parent.iterdir() if ".partial-" in p.name]
    if stages:
        return f"stage left behind: {stages}"
    return None


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from perfusionai.phantoms.dsc import make_dsc_phantom

    root = tmp_path_factory.mktemp("matrix")
    make_dsc_phantom(shape=(3, 12, 12), n_frames=30, tr=1.5, te=0.03, seed=0).save(root / "ph")
    baseline = root / "baseline"
    ctx = Context(root, root / "ph", root, baseline)
    assert main(dsc_argv(ctx, extra=["--progress", "none"])) == 0
    maps = {name: io.read_volume(baseline / f"{name}.nii.gz").array for name in MAPS}
    return root, maps


def test_bad_input_matrix(phantom, tmp_path, capsys, monkeypatch):
    root, baseline = phantom
    failures = []
    for n, c in enumerate(CASES):
        case_dir = tmp_path / f"case{n:02d}"
        (case_dir / "run").mkdir(parents=True)
        ctx = Context(root, root / "ph", case_dir, case_dir / "run" / "out", baseline)
        with monkeypatch.context() as mp:
            ctx.monkeypatch = mp
            try:
                why = _run_case(c, ctx, capsys)
            except pytest.skip.Exception as exc:
                why = f"skipped: {exc}"
            except Exception:  # noqa: BLE001 - a case that crashes does not behave; report it with the rest
                why = "raised " + traceback.format_exc().strip().splitlines()[-1]
        if why:
            failures.append(f"{c.name}: {why}")
    behave = len(CASES) - len(failures)
    with capsys.disabled():
        print(f"\nbad-input matrix: {len(CASES)} cases, {behave} behave")
    assert not failures, "\n".join(failures)
    assert len(CASES) >= 30
    # the README's reliability section reports this count
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"bad-input matrix: {len(CASES)} cases, {behave} behave" in readme
