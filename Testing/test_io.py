"""Image I/O: exact round trips of values and geometry, 4D timing, DICOM layouts, clear errors."""

import numpy as np
import pytest

from perfusionai import io
from perfusionai.errors import PerfusionAIError

from dicom_writer import write_dsc_dicom


def oblique_geometry(shape=(5, 6, 7)):
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return io.Geometry(shape, (0.8, 1.2, 3.0), (-12.5, 30.25, 7.0), tuple(rot.ravel()))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_volume_round_trip_oblique(tmp_path, suffix):
    geom = oblique_geometry()
    arr = np.random.default_rng(0).random(geom.shape).astype(np.float32)
    path = io.write_volume(arr, geom, tmp_path / f"v{suffix}")
    back = io.read_volume(path)
    np.testing.assert_array_equal(back.array, arr)
    assert back.geometry.same_grid(geom)
    np.testing.assert_allclose(back.geometry.ijk_to_ras(), geom.ijk_to_ras(), atol=1e-5)


def test_left_handed_las_grid_round_trip(tmp_path):
    # LAS: i runs to the left (LPS +x), j anterior (LPS -y), k superior: a left-handed index frame
    geom = io.Geometry((4, 5, 6), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert np.linalg.det(geom.direction_matrix) < 0
    arr = np.arange(np.prod(geom.shape), dtype=np.int16).reshape(geom.shape)
    back = io.read_volume(io.write_volume(arr, geom, tmp_path / "las.nrrd"))
    np.testing.assert_array_equal(back.array, arr)
    assert back.geometry.same_grid(geom)
    # voxel (i=1, j=0, k=0) lies 1 mm to the patient's left of the origin (LPS +x, RAS -x)
    ras = geom.ijk_to_ras() @ np.array([1, 0, 0, 1.0])
    assert ras[0] == pytest.approx(-10.0 - 1.0)


def test_ijk_to_ras_inverse():
    geom = oblique_geometry()
    back = io.Geometry.from_ijk_to_ras(geom.ijk_to_ras(), geom.shape)
    assert back.same_grid(geom)


def test_series_round_trip_keeps_tr(tmp_path):
    geom = oblique_geometry((3, 4, 5))
    arr = np.random.default_rng(1).random(geom.shape + (12,)).astype(np.float32)
    path = io.write_series(arr, geom, tmp_path / "s.nii.gz", tr=1.5)
    s = io.read_series(path)
    np.testing.assert_array_equal(s.array, arr)
    assert s.geometry.same_grid(geom)
    assert s.tr == pytest.approx(1.5)
    np.testing.assert_allclose(s.frame_times(), np.arange(12) * 1.5)
    s2 = io.read_series(path, tr=2.0)  # --tr overrides the header
    np.testing.assert_allclose(s2.frame_times(), np.arange(12) * 2.0)


def test_bids_sidecar_gives_te_and_tr(tmp_path):
    import json

    geom = io.Geometry((2, 3, 4))
    arr = np.ones(geom.shape + (10,), np.float32)
    path = io.write_series(arr, geom, tmp_path / "dsc.nii.gz", tr=None)
    (tmp_path / "dsc.json").write_text(json.dumps({"EchoTime": 0.025, "RepetitionTime": 1.2}))
    s = io.read_series(path)
    assert s.te == pytest.approx(0.025)
    assert s.tr == pytest.approx(1.2)  # pixdim[4] holds the writer's placeholder 1.0
    np.testing.assert_allclose(s.frame_times(), np.arange(10) * 1.2)


def test_3d_file_where_4d_expected_names_file(tmp_path):
    path = io.write_volume(np.ones((3, 4, 5), np.float32), io.Geometry((3, 4, 5)), tmp_path / "t1.nii.gz")
    with pytest.raises(PerfusionAIError, match=r"t1\.nii\.gz.*3D image.*4D"):
        io.read_series(path, name="DSC series")


def test_4d_file_where_3d_expected(tmp_path):
    path = io.write_series(np.ones((3, 4, 5, 6), np.float32), io.Geometry((3, 4, 5)), tmp_path / "s.nii.gz", tr=1)
    with pytest.raises(PerfusionAIError, match=r"s\.nii\.gz.*4D image with 6 frames"):
        io.read_volume(path, "mask")


def test_mask_on_other_grid_and_empty_mask(tmp_path):
    ref = io.Geometry((3, 4, 5), (1, 1, 1))
    other = io.write_volume(np.ones((3, 4, 5), np.uint8), io.Geometry((3, 4, 5), (2, 1, 1)), tmp_path / "m.nii.gz")
    with pytest.raises(PerfusionAIError, match=r"m\.nii\.gz.*not on the grid"):
        io.read_mask(other, ref)
    empty = io.write_volume(np.zeros((3, 4, 5), np.uint8), ref, tmp_path / "e.nii.gz")
    with pytest.raises(PerfusionAIError, match=r"e\.nii\.gz.*empty"):
        io.read_mask(empty, ref)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(PerfusionAIError, match="does not exist"):
        io.read_volume(tmp_path / "nope.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(PerfusionAIError, match=r"junk\.nii\.gz: cannot be read"):
        io.read_volume(junk)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with io.atomic_output_dir(out) as stage:
            (stage / "half.nii.gz").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with io.atomic_output_dir(out) as stage:
        (stage / "a.txt").write_text("ok")
    assert (out / "a.txt").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("layout", ["single-series", "multi-series"])
def test_dicom_4d_series(tmp_path, layout):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 1000, size=(4, 6, 5, 11)).astype(np.uint16)
    row = (np.cos(0.3), np.sin(0.3), 0.0)
    col = (0.0, 0.0, -1.0)  # coronal-oblique slices
    write_dsc_dicom(tmp_path / "dcm", data, orientation=row + col, tr_s=1.4, te_ms=32.0, layout=layout)
    s = io.read_series(tmp_path / "dcm")
    np.testing.assert_array_equal(s.array, data.astype(np.float32))
    np.testing.assert_allclose(s.frame_times(), np.arange(11) * 1.4, atol=1e-4)
    assert s.te == pytest.approx(0.032)
    np.testing.assert_allclose(s.geometry.spacing, (0.9, 1.1, 4.0))
    np.testing.assert_allclose(s.geometry.origin, (-50.0, -60.0, 10.0))
    normal = np.cross(row, col)
    np.testing.assert_allclose(s.geometry.direction_matrix[:, 2], normal, atol=1e-6)


def test_dicom_3d_volume_and_empty_folder(tmp_path):
    data = np.arange(3 * 4 * 5).reshape(3, 4, 5, 1).astype(np.uint16)
    write_dsc_dicom(tmp_path / "one", data)
    v = io.read_volume(tmp_path / "one")
    np.testing.assert_array_equal(v.array, data[..., 0])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hello")
    with pytest.raises(PerfusionAIError, match="no readable DICOM"):
        io.read_series(tmp_path / "empty")


def test_nan_voxels_survive_nifti_reading(tmp_path):
    # ITK's NIfTI reader turns NaN into 0; broken frames must stay visible
    arr = np.ones((3, 4, 5, 6), np.float32)
    arr[..., 2] = np.nan
    s = io.read_series(io.write_series(arr, io.Geometry((3, 4, 5)), tmp_path / "n.nii.gz", tr=1.0))
    assert np.isnan(s.array[..., 2]).all() and np.isfinite(np.delete(s.array, 2, axis=-1)).all()
    vol = np.ones((3, 4, 5), np.float32)
    vol[1, 2, 3] = np.nan
    back = io.read_volume(io.write_volume(vol, io.Geometry((3, 4, 5)), tmp_path / "v.nii"))
    assert np.isnan(back.array[1, 2, 3]) and np.isnan(back.array).sum() == 1
    with pytest.raises(PerfusionAIError, match=r"n\.nii\.gz.*NaN.*frame\(s\) 3 of 6"):
        io.check_finite_series(s, None, "the series")


def test_dicom_enhanced_multiframe_4d(tmp_path):
    from dicom_writer import write_enhanced_dicom

    data = np.random.default_rng(5).integers(0, 2000, size=(3, 5, 4, 12)).astype(np.uint16)
    write_enhanced_dicom(tmp_path / "mf" / "series.dcm", data, tr_s=1.25, te_ms=28.0)
    s = io.read_series(tmp_path / "mf")
    np.testing.assert_array_equal(s.array, data.astype(np.float32))
    np.testing.assert_allclose(s.frame_times(), np.arange(12) * 1.25, atol=1e-4)
    assert s.te == pytest.approx(0.028)
    np.testing.assert_allclose(s.geometry.spacing, (0.9, 1.1, 4.0))
    np.testing.assert_allclose(s.geometry.origin, (-50.0, -60.0, 10.0))


def test_dicom_enhanced_multiframe_applies_per_frame_rescale(tmp_path):
    # enhanced objects keep slope/intercept in the Pixel Value Transformation functional group,
    # here a different slope per time point
    from dicom_writer import write_enhanced_dicom

    data = np.random.default_rng(6).integers(0, 2000, size=(2, 4, 3, 6)).astype(np.float32)
    values = data * np.arange(1, 7, dtype=np.float32) + 10.0
    write_enhanced_dicom(tmp_path / "mf" / "series.dcm", values, rescale=lambda t: (float(t + 1), 10.0))
    np.testing.assert_allclose(io.read_series(tmp_path / "mf").array, values, rtol=1e-6)


# --------------------------------------------------------------------------------------
# issue 13: formats and files written by other software, output folders


def _nrrd_time_last(path, array_kjit, spacing=(1.5, 2.0, 3.0), origin=(10.0, 20.0, 30.0), encoding="raw",
                    kind="time", space="left-posterior-superior"):
    """Write ``array[k, j, i, t]`` as pynrrd and teem (``unu``) write a 4D series: four domain axes,
    the fourth (time) with the space direction ``none``."""
    import gzip

    data = np.ascontiguousarray(np.moveaxis(array_kjit, -1, 0).astype(np.float32))  # (t, k, j, i): i fastest
    nk, nj, ni, nt = array_kjit.shape
    sx, sy, sz = spacing
    header = (f"NRRD0005\n# Complete NRRD file format specification at:\n"
              f"# http://teem.sourceforge.net/nrrd/format.html\ntype: float\ndimension: 4\nspace: {space}\n"
              f"sizes: {ni} {nj} {nk} {nt}\nspace directions: ({sx},0,0) (0,{sy},0) (0,0,{sz}) none\n"
              f"kinds: domain domain domain {kind}\nendian: little\nencoding: {encoding}\n"
              f"space origin: ({origin[0]},{origin[1]},{origin[2]})\n\n")
    blob = data.tobytes() if encoding == "raw" else gzip.compress(data.tobytes())
    path.write_bytes(header.encode() + blob)
    return path


def test_inf_and_minus_inf_survive_nifti_reading(tmp_path):
    # ITK reads +-Inf as 0 (CBF 487 instead of 13 in those voxels); they must reach the NaN rule
    arr = np.ones((3, 4, 5, 6), np.float32)
    arr[1, 1, 1, 2] = np.inf
    arr[2, 3, 4, 4] = -np.inf
    s = io.read_series(io.write_series(arr, io.Geometry((3, 4, 5)), tmp_path / "inf.nii.gz", tr=1.0))
    assert s.array[1, 1, 1, 2] == np.inf and s.array[2, 3, 4, 4] == -np.inf
    assert np.isfinite(s.array).sum() == arr.size - 2
    with pytest.raises(PerfusionAIError, match=r"inf\.nii\.gz.*infinite.*frame\(s\) 3, 5 of 6"):
        io.check_finite_series(s)


@pytest.mark.parametrize("name,dtype", [("int.nii", np.int16), ("int.nii.gz", np.int16),
                                        ("float.nii.gz", np.float32), ("float.nii", np.float32)])
def test_truncated_nifti_refused_in_one_line(tmp_path, name, dtype):
    arr = (np.arange(20 * 30 * 40) % 1000).astype(dtype).reshape(20, 30, 40)
    full = io.write_volume(arr, io.Geometry(arr.shape), tmp_path / ("full_" + name))
    if not name.endswith(".gz"):  # SimpleITK compresses only .gz; write the plain file plainly
        full.unlink()
        import nibabel

        nibabel.save(nibabel.Nifti1Image(arr.T, np.eye(4)), str(full))
    blob = full.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(blob[: int(len(blob) * 0.6)])
    with pytest.raises(PerfusionAIError, match=rf"{name.replace('.', '[.]')}: .*truncated") as err:
        io.read_volume(cut)
    assert "\n" not in str(err.value)


def test_qform_sform_conflict_uses_sform_and_maps_carry_it(tmp_path):
    import warnings

    import nibabel

    qform = np.diag([2.0, 2.0, 3.0, 1.0])
    sform = np.array([[0, -2.0, 0, 40], [2.0, 0, 0, -20], [0, 0, 3.0, 7], [0, 0, 0, 1]])  # rotated, moved
    img = nibabel.Nifti1Image(np.ones((5, 4, 3), np.float32), None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    nibabel.save(img, str(tmp_path / "qs.nii.gz"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = io.read_volume(tmp_path / "qs.nii.gz")
    assert any("qform and the sform" in str(w.message) and "qs.nii.gz" in str(w.message) for w in caught)
    np.testing.assert_allclose(vol.geometry.ijk_to_ras(), sform, atol=1e-5)  # what nibabel/FSL use
    written = io.write_volume(vol.array, vol.geometry, tmp_path / "map.nii.gz")
    back = nibabel.load(str(written))
    np.testing.assert_allclose(back.affine, sform, atol=1e-4)
    np.testing.assert_allclose(back.header.get_qform(), sform, atol=1e-4)  # qform and sform now agree


def test_nifti2_read_like_nibabel():
    import nibabel
    from nibabel.testing import data_path

    path = f"{data_path}/example_nifti2.nii.gz"
    ref = nibabel.load(path)
    s = io.read_series(path)
    np.testing.assert_array_equal(s.array, np.asanyarray(ref.dataobj).transpose(2, 1, 0, 3))
    np.testing.assert_allclose(s.geometry.ijk_to_ras(), ref.affine, atol=1e-4)
    assert s.n_frames == 2


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_time_last_nrrd_in_3d_space(tmp_path, encoding):
    arr = np.random.default_rng(2).random((2, 3, 4, 5)).astype(np.float32)
    path = _nrrd_time_last(tmp_path / f"t_{encoding}.nrrd", arr, encoding=encoding)
    s = io.read_series(path, tr=1.2)
    np.testing.assert_array_equal(s.array, arr)
    np.testing.assert_allclose(s.geometry.spacing, (1.5, 2.0, 3.0))
    np.testing.assert_allclose(s.geometry.origin, (10.0, 20.0, 30.0))
    ras = _nrrd_time_last(tmp_path / "ras.nrrd", arr, space="right-anterior-superior")
    np.testing.assert_allclose(io.read_series(ras, tr=1.0).geometry.origin, (-10.0, -20.0, 30.0))
    np.testing.assert_allclose(io.read_series(ras, tr=1.0).geometry.direction_matrix, np.diag([-1.0, -1.0, 1.0]))


def test_siemens_mosaic_read_with_dcm2niix_geometry(tmp_path):
    import gzip
    import os

    import nibabel

    data_dir = os.path.join(os.path.dirname(nibabel.__file__), "nicom", "tests", "data")
    (tmp_path / "mosaic").mkdir()
    (tmp_path / "mosaic" / "dwi.dcm").write_bytes(gzip.open(os.path.join(data_dir, "siemens_dwi_1000.dcm.gz")).read())
    vol = io.read_volume(tmp_path / "mosaic")
    assert vol.array.shape == (48, 128, 128)  # not one 896x896 slice
    # nibabel's own test (test_dicomwrappers.EXPECTED_AFFINE, as SPM/dcm2niix place it): the first voxel's
    # centre, not the mosaic's corner; nibabel indexes (row, column, slice), this is (i = column, j = row, k)
    expected_ras = np.array([[-1.796875, 0, 0, 115], [0, -1.79684984, -0.01570896, 135.028779],
                             [0, -0.0094084375, 2.99995887, -78.710481], [0, 0, 0, 1]])
    np.testing.assert_allclose(vol.geometry.ijk_to_ras(), expected_ras, atol=1e-4)


def test_mosaic_without_csa_refused_by_name(tmp_path):
    import shutil

    from nibabel.testing import data_path

    (tmp_path / "m").mkdir()
    shutil.copy(f"{data_path}/0.dcm", tmp_path / "m" / "0.dcm")  # a MOSAIC whose CSA header does not fit its pixels
    with pytest.raises(PerfusionAIError, match=r"0\.dcm: is a Siemens MOSAIC image that cannot be unpacked"):
        io.read_volume(tmp_path / "m")


def test_pictures_refused_by_name(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 4), np.uint8), isVector=True), str(tmp_path / "a.png"))
    for reader in (io.read_series, io.read_volume):
        with pytest.raises(PerfusionAIError, match=r"a\.png: is a PNG picture, not a medical image"):
            reader(tmp_path / "a.png")


def test_messages_name_what_differs_and_no_double_4d(tmp_path):
    ref = io.Geometry((3, 4, 5), (1, 1, 1), (0, 0, 0))
    flipped = io.Geometry((3, 4, 5), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = io.write_volume(np.ones((3, 4, 5), np.uint8), flipped, tmp_path / "m.nii.gz")
    with pytest.raises(PerfusionAIError) as err:
        io.read_mask(path, ref)
    text = str(err.value)
    assert "m.nii.gz" in text and "direction (1, 0, 0, 0, -1, 0, 0, 0, 1) vs (1, 0, 0, 0, 1, 0, 0, 0, 1)" in text
    path3 = io.write_volume(np.ones((3, 4, 5), np.float32), ref, tmp_path / "t1.nii.gz")
    for name in ("4D series", "series", "DSC series"):
        with pytest.raises(PerfusionAIError) as err:
            io.read_series(path3, name=name)
        assert "4D 4D" not in str(err.value) and "t1.nii.gz" in str(err.value)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_rerun_replaces_the_verbs_outputs_as_a_whole(tmp_path):
    out = tmp_path / "out"
    with io.run_label("dsc maps"):
        with io.atomic_output_dir(out) as stage:
            for name in ("cbf.nii.gz", "k1.nii.gz", "k2.nii.gz", "summary.json"):
                (stage / name).write_text("leakage run")
        (out / "notes.txt").write_text("the user's own file")
        with io.atomic_output_dir(out) as stage:
            for name in ("cbf.nii.gz", "summary.json"):
                (stage / name).write_text("plain run")
    # the stale k1/k2 of the leakage run are gone; the user's file stays
    assert _names(out) == [io.MANIFEST_NAME, "cbf.nii.gz", "notes.txt", "summary.json"]
    assert (out / "summary.json").read_text() == "plain run"
    # another verb writing into the same folder does not remove dsc maps' outputs
    with io.run_label("prm ct"):
        with io.atomic_output_dir(out) as stage:
            (stage / "prm.nii.gz").write_text("prm")
        with io.atomic_output_dir(out) as stage:
            (stage / "prm_stats.json").write_text("prm")
    assert _names(out) == [io.MANIFEST_NAME, "cbf.nii.gz", "notes.txt", "prm_stats.json", "summary.json"]


def test_folder_named_like_an_output_is_never_deleted(tmp_path):
    out = tmp_path / "out"
    (out / "cbf.nii.gz").mkdir(parents=True)
    (out / "cbf.nii.gz" / "precious.txt").write_text("keep me")
    with pytest.raises(PerfusionAIError, match=r"cbf\.nii\.gz: a folder of this name exists and was not written"):
        with io.atomic_output_dir(out) as stage:
            (stage / "cbf.nii.gz").write_text("map")
    assert (out / "cbf.nii.gz" / "precious.txt").read_text() == "keep me"
    assert _names(tmp_path) == ["out"]  # no stage left behind
    # a folder a perfusionai run wrote is replaced as a whole
    with io.atomic_output_dir(tmp_path / "o2") as stage:
        (stage / "figures").mkdir()
        (stage / "figures" / "a.png").write_text("1")
    with io.atomic_output_dir(tmp_path / "o2") as stage:
        (stage / "figures").mkdir()
        (stage / "figures" / "b.png").write_text("2")
    assert _names(tmp_path / "o2" / "figures") == ["b.png"]


def test_output_that_would_overwrite_an_input_is_refused(tmp_path):
    folder = tmp_path / "S"
    folder.mkdir()
    reference = folder / "prm.nii.gz"
    reference.write_text("the reference PRM")
    with pytest.raises(PerfusionAIError, match=r"would overwrite the input .*S/prm\.nii\.gz"):
        with io.atomic_output_dir(folder, inputs=[str(reference)]) as stage:
            (stage / "prm.nii.gz").write_text("prediction")
    assert reference.read_text() == "the reference PRM"
    assert _names(folder) == ["prm.nii.gz"] and _names(tmp_path) == ["S"]
    # a stale output of an earlier run that is an input of this one is not deleted either
    with io.atomic_output_dir(tmp_path / "o") as stage:
        (stage / "lungs.nii.gz").write_text("mask")
        (stage / "perfusion.nii.gz").write_text("1")
    with io.atomic_output_dir(tmp_path / "o", inputs=[tmp_path / "o" / "lungs.nii.gz"]) as stage:
        (stage / "perfusion.nii.gz").write_text("2")
    assert (tmp_path / "o" / "lungs.nii.gz").read_text() == "mask"


def test_stage_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    leftover = tmp_path / f".out.partial-{pid}-abc123"
    (leftover / "cbf.nii.gz").parent.mkdir()
    (leftover / "cbf.nii.gz").write_text("half")
    alive = tmp_path / f".out.partial-{os.getpid()}-other"  # a run in progress: kept
    alive.mkdir()
    with io.atomic_output_dir(tmp_path / "out") as stage:
        (stage / "a.txt").write_text("ok")
    assert not leftover.exists() and alive.exists()


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    import errno

    with pytest.raises(PerfusionAIError, match=r"out: cannot write the outputs \(No space left on device\)"):
        with io.atomic_output_dir(tmp_path / "out") as stage:
            (stage / "a.nii.gz").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert _names(tmp_path) == []


def test_write_json_writes_strict_json(tmp_path):
    import json

    path = io.write_json({"spearman": float("nan"), "x": [1.0, float("inf")], "n": np.int64(3)}, tmp_path / "a.json")
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}")) == \
        {"spearman": None, "x": [1.0, None], "n": 3}
