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
