"""perfusionai.mrml on Slicer's real MRML classes (the slicer-core wheel, Slicer 5.12).

Every test builds nodes in a fresh vtkMRMLScene and checks exact round trips
against the arrays and geometry it started from.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML classes for Python) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

from perfusionai import mrml  # noqa: E402
from perfusionai.errors import PerfusionAIError  # noqa: E402
from perfusionai.io import Geometry  # noqa: E402
from perfusionai.labels import LOBE_LABELS, PRM_LABELS  # noqa: E402




def _oblique_direction(angle_deg: float) -> tuple[float, ...]:
    a = np.deg2rad(angle_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    b = np.deg2rad(angle_deg / 2)
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


GEOMETRIES = {
    "axial": Geometry((5, 6, 7), (0.9, 1.1, 3.0), (-12.5, 30.0, 7.25)),
    "oblique": Geometry((4, 8, 6), (1.25, 0.75, 2.5), (3.0, -4.0, 5.0), _oblique_direction(23.0)),
    # LAS: i -> left, j -> anterior, k -> superior; in LPS the j column is negated, det < 0 (left-handed).
    "las": Geometry((3, 5, 4), (2.0, 2.0, 4.0), (10.0, 20.0, -30.0),
                    (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)),
}


def _assert_same_geometry(a: Geometry, b: Geometry):
    assert tuple(a.shape) == tuple(b.shape)
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(GEOMETRIES))
def test_volume_round_trip_is_exact(scene, kind):
    geometry = GEOMETRIES[kind]
    rng = np.random.default_rng(1)
    array = rng.normal(size=geometry.shape).astype(np.float32)
    node = mrml.volume_node_from_array(array, geometry, f"vol-{kind}")
    # The node's own matrix is Slicer's RAS form of the LPS geometry.
    np.testing.assert_allclose(mrml.ijk_to_ras_of_node(node), geometry.ijk_to_ras(), atol=1e-12)
    back, back_geometry = mrml.array_from_volume_node(node)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, array)
    _assert_same_geometry(back_geometry, geometry)
    # KJI order: voxel [k, j, i] of the array is voxel (i, j, k) of the vtkImageData.
    k, j, i = 2, 3, 1
    assert node.GetImageData().GetScalarComponentAsDouble(i, j, k, 0) == pytest.approx(float(array[k, j, i]))
    if kind == "las":
        assert np.linalg.det(geometry.ijk_to_ras()[:3, :3]) < 0
        assert np.linalg.det(mrml.ijk_to_ras_of_node(node)[:3, :3]) < 0


def test_update_existing_node_replaces_voxels_and_geometry(scene):
    g1, g2 = GEOMETRIES["axial"], GEOMETRIES["oblique"]
    node = mrml.volume_node_from_array(np.zeros(g1.shape, np.float32), g1, "first")
    second = np.arange(np.prod(g2.shape), dtype=np.int64).reshape(g2.shape)
    mrml.volume_node_from_array(second, g2, "second", node=node)
    back, geometry = mrml.array_from_volume_node(node)
    np.testing.assert_array_equal(back, second)  # int64 was stored as int32 (Slicer rejects int64)
    assert back.dtype == np.int32
    _assert_same_geometry(geometry, g2)
    assert node.GetName() == "second"


def test_label_volume_is_stored_as_int16(scene):
    geometry = GEOMETRIES["axial"]
    labels = np.zeros(geometry.shape, dtype=np.int64)
    labels[1, 2, 3] = 4
    node = mrml.volume_node_from_array(labels, geometry, "labels", label=True)
    assert node.GetClassName() == "vtkMRMLLabelMapVolumeNode"
    back, _ = mrml.array_from_volume_node(node)
    assert back.dtype == np.int16 and back[1, 2, 3] == 4 and back.sum() == 4


@pytest.mark.parametrize("kind", ["oblique", "las"])
def test_sequence_round_trip_values_and_frame_times(scene, kind):
    geometry = GEOMETRIES[kind]
    rng = np.random.default_rng(2)
    times = np.array([0.0, 1.5, 3.0, 4.5, 6.1])
    data = rng.uniform(0, 500, size=tuple(geometry.shape) + (times.size,)).astype(np.float32)
    sequence, browser = mrml.sequence_node_from_series(data, geometry, times, "dsc",
                                                       sequences_logic=scene.sequences_logic)
    assert sequence.GetNumberOfDataNodes() == times.size
    assert browser.GetMasterSequenceNode().GetID() == sequence.GetID()
    series = mrml.series_from_node(sequence)
    np.testing.assert_array_equal(series.array, data)
    np.testing.assert_array_equal(series.times, times)
    _assert_same_geometry(series.geometry, geometry)
    assert series.tr == pytest.approx(1.5)
    # The proxy volume the browser shows (what users see in the views) stands for the whole series.
    proxy = browser.GetProxyNode(sequence)
    assert proxy is not None and mrml.sequence_of_proxy(proxy).GetID() == sequence.GetID()
    np.testing.assert_array_equal(mrml.series_from_node(proxy).array, data)


def test_sequence_times_in_milliseconds_start_at_zero(scene):
    geometry = GEOMETRIES["axial"]
    data = np.ones(tuple(geometry.shape) + (3,), np.float32)
    sequence, _ = mrml.sequence_node_from_series(data, geometry, [1000.0, 2500.0, 4000.0], "ms",
                                                 index_unit="ms", browser=False)
    series = mrml.series_from_node(sequence)
    np.testing.assert_allclose(series.times, [0.0, 1.5, 3.0], rtol=0, atol=1e-12)
    # A TR override replaces the node's timing.
    np.testing.assert_allclose(mrml.series_from_node(sequence, tr=2.0).times, [0.0, 2.0, 4.0])


def test_sequence_with_frames_on_different_grids_is_refused(scene):
    geometry = GEOMETRIES["axial"]
    sequence, _ = mrml.sequence_node_from_series(np.zeros(tuple(geometry.shape) + (2,), np.float32),
                                                 geometry, [0.0, 1.0], "bad", browser=False)
    frame = slicer.vtkMRMLScalarVolumeNode()
    slicer.util.updateVolumeFromArray(frame, np.zeros((2, 2, 2), np.float32))
    sequence.SetDataNodeAtValue(frame, "2.0")
    with pytest.raises(PerfusionAIError, match="another voxel grid"):
        mrml.series_from_node(sequence)


def test_multivolume_node_frames_and_times(scene):
    """A MultiVolume as Slicer's MultiVolumeImporter leaves it: [k,j,i,frames] voxels + attributes."""
    geometry = GEOMETRIES["oblique"]
    rng = np.random.default_rng(3)
    data = rng.uniform(0, 100, size=tuple(geometry.shape) + (4,)).astype(np.float32)
    node = slicer.util.addVolumeFromArray(data, ijkToRAS=geometry.ijk_to_ras(), name="mv",
                                          nodeClassName="vtkMRMLVectorVolumeNode")
    node.SetAttribute("MultiVolume.FrameLabels", "120,1620,3120,4620")
    node.SetAttribute("MultiVolume.NumberOfFrames", "4")
    node.SetAttribute("MultiVolume.FrameIdentifyingDICOMTagName", "TriggerTime")
    node.SetAttribute("MultiVolume.FrameIdentifyingDICOMTagUnits", "ms")
    node.SetAttribute("MultiVolume.DICOM.EchoTime", "30")
    assert mrml.is_multivolume_node(node)
    series = mrml.series_from_node(node)
    np.testing.assert_array_equal(series.array, data)
    np.testing.assert_allclose(series.times, [0.0, 1.5, 3.0, 4.5], atol=1e-12)
    assert series.te == pytest.approx(0.030)
    _assert_same_geometry(series.geometry, geometry)


def test_scalar_volume_is_not_a_series(scene):
    geometry = GEOMETRIES["axial"]
    node = mrml.volume_node_from_array(np.zeros(geometry.shape, np.float32), geometry, "3d")
    with pytest.raises(PerfusionAIError, match="sequence of volumes or a MultiVolume"):
        mrml.series_from_node(node)


def test_labels_to_segmentation_names_colours_and_geometry(scene):
    geometry = GEOMETRIES["oblique"]
    labels = np.zeros(geometry.shape, np.uint8)
    labels[0:2, 0:3, 0:2] = 1
    labels[2:4, 4:8, 3:6] = 3
    labels[3, 0, 5] = 4
    source = mrml.volume_node_from_array(np.zeros(geometry.shape, np.float32), geometry, "source")
    segmentation = mrml.segmentation_node_from_labels(labels, geometry, PRM_LABELS, "PRM",
                                                      reference_volume_node=source)
    segments = mrml.segments_of(segmentation)
    assert [name for _, name, _ in segments] == ["Normal", "Emphysema", "Uncategorized"]
    for (_, _, color), value in zip(segments, (1, 3, 4)):
        np.testing.assert_allclose(color, PRM_LABELS[value].rgb, atol=1e-6)
    assert segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()) == source.GetID()
    # Each segment, exported back onto the source grid, is exactly its label's voxels.
    for (segment_id, _, _), value in zip(segments, (1, 3, 4)):
        mask = mrml.mask_from_node(segmentation, geometry, segment_id=segment_id)
        np.testing.assert_array_equal(mask, labels == value)
    # Temporary label map and colour table nodes are gone.
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    # Union of all segments.
    np.testing.assert_array_equal(mrml.mask_from_node(segmentation, geometry), labels != 0)


def test_lobe_segmentation_has_all_six_names(scene):
    geometry = GEOMETRIES["axial"]
    labels = np.zeros(geometry.shape, np.int16)
    for value in range(1, 7):
        labels.reshape(-1)[value * 10:value * 10 + 5] = value
    segmentation = mrml.segmentation_node_from_labels(labels, geometry, LOBE_LABELS, "lobes")
    assert [n for _, n, _ in mrml.segments_of(segmentation)] == [LOBE_LABELS[v].name for v in range(1, 7)]


def test_unnamed_label_is_refused(scene):
    geometry = GEOMETRIES["axial"]
    labels = np.zeros(geometry.shape, np.int16)
    labels[0, 0, 0] = 9
    with pytest.raises(PerfusionAIError, match=r"labels \[9\]"):
        mrml.segmentation_node_from_labels(labels, geometry, PRM_LABELS, "PRM")


def test_mask_from_label_map_checks_grid_and_emptiness(scene):
    geometry = GEOMETRIES["axial"]
    mask = np.zeros(geometry.shape, np.uint8)
    mask[1:3, 2:4, 3:5] = 1
    node = mrml.volume_node_from_array(mask, geometry, "aif", label=True)
    np.testing.assert_array_equal(mrml.mask_from_node(node, geometry, what="AIF region"), mask != 0)
    with pytest.raises(PerfusionAIError, match="not on the grid"):
        mrml.mask_from_node(node, GEOMETRIES["oblique"], what="AIF region")
    empty = mrml.volume_node_from_array(np.zeros(geometry.shape, np.uint8), geometry, "empty", label=True)
    with pytest.raises(PerfusionAIError, match="AIF region is empty"):
        mrml.mask_from_node(empty, geometry, what="AIF region")


def test_table_contents(scene):
    rows = [{"map": "cbf", "median": 52.5, "unit": "mL/100 g/min"},
            {"map": "mtt", "median": 4.25, "unit": "s"}]
    node = mrml.table_node_from_rows(rows, "DSC medians", units={"median": "various"})
    assert node.GetNumberOfRows() == 2 and node.GetNumberOfColumns() == 3
    assert [node.GetColumnName(c) for c in range(3)] == ["map", "median", "unit"]
    back = mrml.rows_of_table_node(node)
    assert [r["map"] for r in back] == ["cbf", "mtt"]
    assert [float(r["median"]) for r in back] == [52.5, 4.25]
    assert node.GetTable().GetColumn(1).GetClassName() == "vtkDoubleArray"
    assert node.GetColumnUnitLabel("median") == "various"
    # Rewriting the same node replaces its columns.
    mrml.table_node_from_rows([{"x": 1.0}], "again", node=node)
    assert node.GetNumberOfColumns() == 1 and node.GetName() == "again"


def test_plot_curves_builds_chart_with_named_series(scene):
    t = np.linspace(0, 10, 11)
    nodes = {}
    chart = mrml.plot_curves(t, {"AIF": np.sin(t), "tissue": np.cos(t)}, "DSC curves", show=False, nodes=nodes)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    table = nodes["table"]
    assert [table.GetColumnName(c) for c in range(3)] == ["time (s)", "AIF", "tissue"]
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "AIF"), np.sin(t))
    assert nodes["series"][0].GetPlotType() == nodes["series"][0].PlotTypeLine


def test_map_display_colour_window_threshold_and_overlay(scene):
    geometry = GEOMETRIES["axial"]
    cbf = np.zeros(geometry.shape, np.float32)
    cbf[1:4, 1:5, 1:6] = np.linspace(10, 90, 60, dtype=np.float32).reshape(3, 4, 5)
    node = mrml.volume_node_from_array(cbf, geometry, "CBF")
    mrml.show_map(node, "cbf")
    display = node.GetDisplayNode()
    # slicer-core has no file-based colour tables, so the documented fallback is used.
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeRainbow"
    low, high = mrml.display_range(cbf)
    assert 10 <= low < 12 and 88 < high <= 90
    assert display.GetWindowLevelMin() == pytest.approx(low, rel=1e-6)
    assert display.GetWindowLevelMax() == pytest.approx(high, rel=1e-6)
    assert display.GetApplyThreshold() and 0 < display.GetLowerThreshold() < 10
    assert node.GetAttribute("PerfusionAI.Units") == "mL/100 g/min"
    mrml.show_map(node, "tmax", window=(0.0, 12.0))
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 12.0)
    # Overlay on a background volume in every slice view.
    background = mrml.volume_node_from_array(np.ones(geometry.shape, np.float32), geometry, "frame")
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    mrml.show_overlay(background, node, opacity=0.4)
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == background.GetID()
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)


def test_colour_lookup_without_colour_logic_fails_clearly():
    sc = slicer.vtkMRMLScene()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = sc
    try:
        with pytest.raises(RuntimeError, match="no colour table"):
            mrml.color_node_id_for_map("cbf")
    finally:
        slicer.mrmlScene = previous


# --------------------------------------------------------------------------------------
# The DSCDeconvolution Logic's data path: nodes -> core -> nodes


def _dsc_phantom():
    from perfusionai.phantoms.dsc import make_dsc_phantom

    return make_dsc_phantom(shape=(4, 16, 16), n_frames=50, tumour=False, lesion=False)


def test_dsc_nodes_to_core_to_nodes_matches_truth(scene):
    from perfusionai.dsc.pipeline import DSCOptions, compute_dsc_maps
    from perfusionai.labels import LabelInfo
    from perfusionai.slicer_support import output_from_result

    phantom = _dsc_phantom()
    sequence, browser = mrml.sequence_node_from_series(phantom.signal, phantom.geometry, phantom.times, "DSC",
                                                       sequences_logic=scene.sequences_logic)
    assert browser.GetProxyNode(sequence) is not None
    aif_segmentation = mrml.segmentation_node_from_labels(
        phantom.aif_mask.astype(np.uint8), phantom.geometry, {1: LabelInfo("artery", "artery", (1, 0, 0))}, "AIF")
    artery_id = mrml.segments_of(aif_segmentation)[0][0]
    brain = mrml.volume_node_from_array(phantom.brain_mask, phantom.geometry, "brain", label=True)

    inputs = mrml.dsc_inputs_from_nodes(sequence, te=phantom.te, aif_node=aif_segmentation,
                                        aif_segment_id=artery_id, mask_node=brain)
    np.testing.assert_array_equal(inputs.aif_mask, phantom.aif_mask)
    np.testing.assert_array_equal(inputs.mask, phantom.brain_mask)
    np.testing.assert_allclose(inputs.times, phantom.times)

    result = compute_dsc_maps(inputs.series.array, inputs.times, DSCOptions(te=inputs.te, method="Tikhonov"),
                              mask=inputs.mask, aif_mask=inputs.aif_mask)
    output = output_from_result(result, inputs.series.geometry)
    nodes = mrml.dsc_output_to_nodes(output, sequence, prefix="DSC", show=False,
                                     attributes={"Method": "Tikhonov"}, sequences_logic=scene.sequences_logic)

    tissue = phantom.tissue_mask
    cbf_node = nodes["maps"]["cbf"]
    cbf, geometry = mrml.array_from_volume_node(cbf_node)
    assert geometry.same_grid(phantom.geometry)
    truth_cbf = float(np.median(phantom.truth["cbf"][tissue]))
    assert abs(float(np.median(cbf[tissue])) - truth_cbf) <= 0.10 * truth_cbf
    cbv, _ = mrml.array_from_volume_node(nodes["maps"]["cbv"])
    truth_cbv = float(np.median(phantom.truth["cbv_discrete"][tissue]))
    assert abs(float(np.median(cbv[tissue])) - truth_cbv) <= 0.10 * truth_cbv
    assert cbf_node.GetAttribute("PerfusionAI.Method") == "Tikhonov"
    assert cbf_node.GetAttribute("PerfusionAI.Units") == "mL/100 g/min"

    rows = mrml.rows_of_table_node(nodes["table"])
    assert [r["map"] for r in rows] == ["cbv", "cbf", "mtt", "tmax", "ttp"]
    medians = nodes["table"].GetTable().GetColumnByName("median")
    for index, row in enumerate(rows):
        assert medians.GetValue(index) == pytest.approx(result.summary["medians_in_mask"][row["map"]], rel=1e-12)
    assert nodes["chart"].GetNumberOfPlotSeriesNodes() == 2
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(nodes["plot"]["table"], "AIF (1/s)"), result.aif)

    # The overlay background is the browser's proxy volume, moved to the mid-bolus frame (the AIF peak).
    frame = int(np.argmax(result.aif))
    assert browser.IsProxyNodeID(nodes["background"].GetID())
    assert browser.GetSelectedItemNumber() == frame
    background, _ = mrml.array_from_volume_node(nodes["background"])
    np.testing.assert_array_equal(background, phantom.signal[..., frame])


def test_dsc_inputs_refuse_missing_or_millisecond_te(scene):
    phantom = _dsc_phantom()
    sequence, _ = mrml.sequence_node_from_series(phantom.signal, phantom.geometry, phantom.times, "DSC",
                                                 browser=False)
    with pytest.raises(PerfusionAIError, match="echo time .* is not known"):
        mrml.dsc_inputs_from_nodes(sequence)
    with pytest.raises(PerfusionAIError, match="looks like milliseconds"):
        mrml.dsc_inputs_from_nodes(sequence, te=30.0)


def test_lobe_segments_carry_standard_terminology_and_show_in_3d(scene):
    import vtk

    # the application's Segmentations module registers the conversion rules; slicer-core does not
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    rules = [type(r).__name__ for r in factory.GetConverterRules()] if factory.GetConverterRules() else []
    if "vtkBinaryLabelmapToClosedSurfaceConversionRule" not in rules:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    labels = np.zeros((6, 8, 8), dtype=np.uint8)
    for value in LOBE_LABELS:
        labels[value - 1, 2:6, 2:6] = value
    seg = mrml.segmentation_node_from_labels(labels, Geometry(labels.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
                                             LOBE_LABELS, "lobes")
    segmentation = seg.GetSegmentation()
    tags = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), value)
        tags[segment.GetName()] = str(value)
    assert "~SCT^45653009^Upper lobe of lung~SCT^24028007^Right~" in tags["Right upper lobe"]
    assert "~SCT^90572001^Lower lobe of lung~SCT^7771000^Left~" in tags["Left lower lobe"]
    assert tags["Right middle lobe"].startswith("Segmentation category and type - 3D Slicer General Anatomy list")
    assert mrml.terminology_entry("Lingula") is None and mrml.terminology_entry("Emphysema") is None
    mrml.show_segmentation_3d(seg)
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    assert seg.GetDisplayNode().GetVisibility3D()
    mrml.show_segmentation_3d(seg, visible=False)
    assert not seg.GetDisplayNode().GetVisibility3D()
