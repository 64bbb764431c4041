"""DWI volume nodes (what Slicer makes of a DWI NRRD file) as DiffusionRelaxation input, on slicer-core.

Builds real ``vtkMRMLDiffusionWeightedVolumeNode``s, both through the node API and by
loading a hand-written DWMRI NRRD header with Slicer's own NRRD reader, and checks
exact round trips of voxels, oblique geometry and b-values, then that the DR fit the
module's Logic runs recovers a phantom's maps from such a node.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML classes for Python) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

from perfusionai import mrml  # noqa: E402
from perfusionai.dr import pipeline  # noqa: E402
from perfusionai.errors import PerfusionAIError  # noqa: E402
from perfusionai.io import Geometry  # noqa: E402
from perfusionai.phantoms.dr import make_dr_phantom  # noqa: E402




def _rotation(angle_deg: float) -> np.ndarray:
    a, b = np.deg2rad(angle_deg), np.deg2rad(angle_deg / 3)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rz @ ry


OBLIQUE = Geometry((3, 5, 4), (1.25, 0.8, 3.0), (12.0, -7.5, 4.25), tuple(_rotation(27.0).ravel()))


def _dwi_node(scene, array_kjin: np.ndarray, geometry: Geometry, bvals, name="DWI"):
    """A DWI volume node filled through Slicer's API: voxels, IJK-to-RAS, one gradient and b-value per volume."""
    node = scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_kjin))
    node.SetIJKToRASMatrix(mrml.vtk_matrix_from_array(geometry.ijk_to_ras()))
    node.SetNumberOfGradients(len(bvals))
    for index, b in enumerate(bvals):
        node.SetDiffusionGradient(index, (0.0, 0.0, 0.0) if b == 0 else (0.0, 0.6, 0.8))
        node.SetBValue(index, float(b))
    return node


def test_dwi_node_round_trip_of_voxels_geometry_and_bvalues(scene):
    bvals = [0.0, 50.0, 400.0, 1000.0, 2000.0]
    rng = np.random.default_rng(3)
    array = rng.uniform(10.0, 900.0, size=tuple(OBLIQUE.shape) + (len(bvals),)).astype(np.float32)
    node = _dwi_node(scene, array, OBLIQUE, bvals)
    node.SetAttribute("EchoTime", "78")

    series = mrml.series_from_node(node)
    assert series.array.dtype == np.float32 and series.array.shape == array.shape
    np.testing.assert_array_equal(series.array, array)
    # Voxel (i, j, k), volume n of the vtkImageData is array[k, j, i, n].
    k, j, i, n = 2, 4, 1, 3
    assert node.GetImageData().GetScalarComponentAsDouble(i, j, k, n) == float(array[k, j, i, n])
    assert series.times is None and series.n_frames == len(bvals)
    assert tuple(series.geometry.shape) == tuple(OBLIQUE.shape)
    np.testing.assert_allclose(series.geometry.spacing, OBLIQUE.spacing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(series.geometry.origin, OBLIQUE.origin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(series.geometry.direction, OBLIQUE.direction, rtol=0, atol=1e-12)

    np.testing.assert_array_equal(mrml.bvalues_of_node(node), bvals)
    got_bvals, got_tes = mrml.diffusion_protocol_of_node(node, series.n_frames)
    np.testing.assert_array_equal(got_bvals, bvals)
    np.testing.assert_array_equal(got_tes, np.full(len(bvals), 78.0))


def test_dwi_nrrd_loaded_by_slicer_reads_back_exactly(scene, tmp_path):
    """Slicer's NRRD reader: b = nominal b x |g|^2, LPS space directions become the node's IJK-to-RAS."""
    size_i, size_j, size_k, volumes = 4, 3, 2, 4
    values = np.arange(size_i * size_j * size_k * volumes, dtype="<f4")
    (tmp_path / "dwi.raw").write_bytes(values.tobytes())
    spacing = (1.5, 0.9, 2.5)
    rotation = _rotation(31.0)
    columns = [rotation[:, axis] * spacing[axis] for axis in range(3)]  # LPS direction of i, j, k times spacing
    origin = (-20.0, 15.5, 3.0)
    vector = "({})".format
    header = [
        "NRRD0005", "type: float", "dimension: 4", "space: left-posterior-superior",
        f"sizes: {size_i} {size_j} {size_k} {volumes}",
        "space directions: " + " ".join(vector(",".join(repr(float(x)) for x in c)) for c in columns) + " none",
        "kinds: space space space list", "endian: little", "encoding: raw",
        "space origin: " + vector(",".join(repr(x) for x in origin)),
        "measurement frame: (1,0,0) (0,1,0) (0,0,1)",
        "modality:=DWMRI", "DWMRI_b-value:=1000",
        "DWMRI_gradient_0000:=0 0 0", "DWMRI_gradient_0001:=1 0 0",
        "DWMRI_gradient_0002:=0 0.6 0.8", "DWMRI_gradient_0003:=0 0 0.5",
        "data file: dwi.raw", "",
    ]
    (tmp_path / "dwi.nhdr").write_text("\n".join(header))
    node = scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", "loaded")
    storage = scene.AddNewNodeByClass("vtkMRMLNRRDStorageNode")
    storage.SetFileName(str(tmp_path / "dwi.nhdr"))
    assert storage.ReadData(node) == 1

    series = mrml.series_from_node(node)
    # The list axis is the slowest in the file: volume n, voxel (i, j, k) is value n*24 + k*12 + j*4 + i.
    expected = values.reshape(volumes, size_k, size_j, size_i).transpose(1, 2, 3, 0)
    np.testing.assert_array_equal(series.array, expected)
    np.testing.assert_allclose(series.geometry.spacing, spacing, rtol=0, atol=1e-9)
    np.testing.assert_allclose(series.geometry.origin, origin, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.reshape(series.geometry.direction, (3, 3)), rotation, rtol=0, atol=1e-9)
    np.testing.assert_allclose(mrml.bvalues_of_node(node), [0.0, 1000.0, 1000.0, 250.0], rtol=1e-12, atol=0)
    bvals, tes = mrml.diffusion_protocol_of_node(node, series.n_frames)
    np.testing.assert_array_equal(bvals, mrml.bvalues_of_node(node))
    assert tes is None


def test_dr_fit_from_a_dwi_node_recovers_the_phantom(scene):
    """The Logic's path: series_from_node, the node's protocol, check_protocol, fit_series."""
    ph = make_dr_phantom(shape=(1, 10, 10), snr=None, seed=5)
    node = _dwi_node(scene, ph.dwi.astype(np.float32), _oblique_grid_like(ph.geometry), ph.protocol.bvals, "DR DWI")
    # TEs do not fit in a DWI node; they come from an attribute (or a file), as for sequences.
    node.SetAttribute("PerfusionAI.tes", " ".join(f"{t:g}" for t in ph.protocol.tes))
    node.SetAttribute("PerfusionAI.bvals", "1 2 3")  # a stale attribute: the node's own b-values win

    series = mrml.series_from_node(node)
    bvals, tes = mrml.diffusion_protocol_of_node(node, series.n_frames)
    np.testing.assert_array_equal(bvals, ph.protocol.bvals)
    np.testing.assert_array_equal(tes, ph.protocol.tes)
    protocol = pipeline.check_protocol(series.n_frames, bvals, tes, "t2ivimkurtosis")
    maps, status, _ = pipeline.fit_series(series.array, protocol, "t2ivimkurtosis", mask=ph.body)
    for name in ("dt", "k", "t2t", "f"):
        truth = ph.truth[name][ph.body]
        assert np.abs(maps[name][ph.body] - truth).max() <= 1e-3 * np.abs(truth).max(), name
    node_out = mrml.volume_node_from_array(maps["dt"], series.geometry, "DR dt")
    assert mrml.geometry_of_node(node_out).same_grid(series.geometry)


def _oblique_grid_like(geometry: Geometry) -> Geometry:
    """The phantom's grid turned oblique (same shape and spacing)."""
    return Geometry(geometry.shape, geometry.spacing, (5.0, -3.0, 8.0), tuple(_rotation(19.0).ravel()))


def test_dwi_node_with_b_values_not_matching_its_volumes_is_refused(scene):
    array = np.ones(tuple(OBLIQUE.shape) + (3,), dtype=np.float32)
    node = _dwi_node(scene, array, OBLIQUE, [0.0, 500.0])
    with pytest.raises(PerfusionAIError, match="2 b-values for 3 volumes"):
        mrml.series_from_node(node)
