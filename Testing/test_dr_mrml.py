"""The MRML glue the DiffusionRelaxation Logic relies on, on real MRML classes (slicer-core wheel).

Checks that a diffusion series stored as a sequence node carries its b-values/TEs as node
attributes that the core reads back, that DR maps display with a colour table, and that ROI
statistics (including empty cells) land in a table node.
"""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML classes for Python) is not installed")

from perfusionai import mrml  # noqa: E402
from perfusionai.dr import models, pipeline  # noqa: E402
from perfusionai.phantoms.dr import make_dr_phantom  # noqa: E402




def test_sequence_attributes_carry_the_protocol_and_maps_come_back_as_nodes(scene):
    ph = make_dr_phantom(shape=(1, 12, 12), snr=None, seed=4)
    sequence, _ = mrml.sequence_node_from_series(ph.dwi, ph.geometry, list(range(ph.protocol.n)), "DR",
                                                 index_unit="", browser=False)
    mrml.set_attributes(sequence, {"bvals": " ".join(f"{b:g}" for b in ph.protocol.bvals),
                                   "tes": " ".join(f"{t:g}" for t in ph.protocol.tes)})
    attributes = {name: sequence.GetAttribute(name) for name in sequence.GetAttributeNames()}
    series = mrml.series_from_node(sequence)
    bvals, tes = pipeline.protocol_from_attributes(attributes, series.n_frames)
    np.testing.assert_array_equal(bvals, ph.protocol.bvals)
    np.testing.assert_array_equal(tes, ph.protocol.tes)
    protocol = pipeline.check_protocol(series.n_frames, bvals, tes, "t2ivimkurtosis")
    maps, status, _ = pipeline.fit_series(series.array, protocol, "t2ivimkurtosis", mask=ph.body)
    assert np.abs(maps["t2t"][ph.body] / ph.truth["t2t"][ph.body] - 1).max() < 1e-3
    node = mrml.volume_node_from_array(maps["dt"], series.geometry, "DR dt")
    mrml.show_map(node, "dt")
    mrml.set_attributes(node, {"Units": models.MAP_UNITS["dt"]})
    assert node.GetDisplayNode().GetColorNodeID()
    assert node.GetAttribute("PerfusionAI.Units") == "um2/ms"
    back, geometry = mrml.array_from_volume_node(node)
    assert geometry.same_grid(ph.geometry)
    np.testing.assert_allclose(back, maps["dt"])
    roi = ph.tumour & ph.body
    rows = pipeline.roi_statistics(maps, roi, "tumour") + pipeline.roi_statistics({"f": maps["f"]}, ph.body & ~ph.body)
    table = mrml.table_node_from_rows(rows, "DR statistics")
    assert table.GetNumberOfRows() == len(models.ADVANCED_MAPS) + 1
    read = mrml.rows_of_table_node(table)
    assert read[0]["map"] == "s0" and float(read[4]["median"]) == pytest.approx(float(np.median(maps["dt"][roi])), rel=1e-5)
