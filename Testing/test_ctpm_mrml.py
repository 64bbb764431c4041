"""PerfusionTranslation's node conversions on Slicer's real MRML classes (slicer-core wheel).

The module's Logic turns a prediction into: the perfusion map (colour overlay on the CT), the
high/low functional lung as a segmentation, the volumes table and the SPECT evaluation table.
These are the same ``perfusionai.mrml`` calls with the core's ``FUNCTION_LABELS`` and ``volume_rows``.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML classes for Python) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

from perfusionai import mrml  # noqa: E402
from perfusionai.ctpm.predict import (FUNCTION_LABELS, PerfusionPrediction, high_low_labels,  # noqa: E402
                                      lung_labels_on_ct_grid, volume_rows)
from perfusionai.errors import PerfusionAIError  # noqa: E402
from perfusionai.io import Geometry  # noqa: E402




def _prediction():
    geometry = Geometry((6, 8, 10), (1.5, 1.5, 2.5), (-7.0, 3.0, 11.0),
                        (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    labels = np.zeros(geometry.shape, np.uint8)
    labels[1:5, 2:7, 1:4] = 1
    labels[1:5, 2:7, 6:9] = 2
    perfusion = np.where(labels > 0, np.linspace(0.2, 1.0, labels.size).reshape(labels.shape), 0).astype(np.float32)
    return PerfusionPrediction(perfusion, high_low_labels(perfusion, labels > 0), labels), geometry


def test_prediction_to_nodes(scene):
    result, geometry = _prediction()
    ct = mrml.volume_node_from_array(np.full(geometry.shape, -800, np.int16), geometry, "CT")
    perfusion = mrml.volume_node_from_array(result.perfusion, geometry, "CT perfusion (DL-CTPM)")
    mrml.show_map(perfusion, "perfusion", window=(0.0, 1.0))
    values, node_geometry = mrml.array_from_volume_node(perfusion)
    assert node_geometry.same_grid(geometry)
    np.testing.assert_array_equal(values, result.perfusion)
    display = perfusion.GetDisplayNode()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)

    segmentation = mrml.segmentation_node_from_labels(result.high_low, geometry, FUNCTION_LABELS,
                                                      "CT functional lung", reference_volume_node=ct)
    segments = mrml.segments_of(segmentation)
    assert [name for _, name, _ in segments] == ["Low function", "High function"]
    for segment_id, name, _ in segments:
        value = 1 if name == "Low function" else 2
        np.testing.assert_array_equal(mrml.mask_from_node(segmentation, geometry, segment_id), result.high_low == value)

    rows = volume_rows(result, geometry)
    table = mrml.table_node_from_rows(rows, "volumes", units={"Lung (mL)": "mL"})
    assert table.GetNumberOfRows() == 3
    back = mrml.rows_of_table_node(table)
    voxel_ml = np.prod(geometry.spacing) / 1000
    assert float(back[2]["Lung (mL)"]) == pytest.approx((result.lung_labels > 0).sum() * voxel_ml, abs=0.05)
    high = (result.high_low == 2).sum() / (result.lung_labels > 0).sum() * 100
    assert float(back[2]["High function (%)"]) == pytest.approx(high, abs=0.05)


def test_lung_label_map_must_lie_on_the_ct_grid(scene):
    result, geometry = _prediction()
    node = mrml.volume_node_from_array(result.lung_labels, geometry, "lungs", label=True)
    labels, labels_geometry = mrml.array_from_volume_node(node)
    np.testing.assert_array_equal(lung_labels_on_ct_grid(labels, labels_geometry, geometry), result.lung_labels)
    shifted = Geometry(geometry.shape, geometry.spacing, (0.0, 0.0, 0.0), geometry.direction)
    with pytest.raises(PerfusionAIError, match="lungs: is not on the CT grid"):
        lung_labels_on_ct_grid(labels, labels_geometry, shifted, "lungs")
