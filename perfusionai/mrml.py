"""The only bridge between PerfusionAI's core and 3D Slicer's MRML scene.

Everything else in :mod:`perfusionai` works on numpy arrays plus a
:class:`perfusionai.io.Geometry`; this module converts MRML nodes to those and
back, and sets up the display of results. It imports ``slicer`` (and ``vtk``)
lazily inside functions, so ``import perfusionai.mrml`` works anywhere, and the
functions run both inside Slicer and on the ``slicer-core`` wheel (the tests).

Conventions
-----------
* Arrays are ``[k, j, i]`` (3D) and ``[k, j, i, t]`` (4D, time last), the order of
  ``slicer.util.arrayFromVolume``. Geometry is the node's IJK-to-RAS matrix,
  converted to :class:`Geometry` (LPS) and back without loss, so oblique and
  left-handed grids survive a round trip exactly (no voxel reordering here).
* Frame times are in seconds from the first frame.
* Nodes are added to ``slicer.mrmlScene``.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from .errors import PerfusionAIError, input_error
from .io import Geometry, Series, check_same_grid
from .labels import LabelInfo

#: Preferred colour table per map type, best first. File-based tables exist only in the
#: full application; the table/PET ids also exist in slicer-core, so each list ends with one.
MAP_COLOR_NODE_IDS: Mapping[str, tuple[str, ...]] = {
    "cbf": ("vtkMRMLColorTableNodeFileColdToHotRainbow.txt", "vtkMRMLColorTableNodeRainbow"),
    "cbv": ("vtkMRMLColorTableNodeFileColdToHotRainbow.txt", "vtkMRMLColorTableNodeRainbow"),
    "mtt": ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeRainbow"),
    "tmax": ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeRainbow"),
    "ttp": ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeOcean"),
    "perfusion": ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeRainbow"),
}
DEFAULT_MAP_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeRainbow",
                              "vtkMRMLColorTableNodeGrey")

#: Units of each map (volume node attribute "PerfusionAI.Units" and table column units).
from .dsc.maps import MAP_UNITS  # noqa: E402  (the package's one table)

#: Index units of sequence nodes / MultiVolume frame labels, as seconds per unit.
_TIME_UNIT_SECONDS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "ms": 1e-3, "msec": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
    "min": 60.0, "minute": 60.0, "minutes": 60.0,
}


def _slicer():
    import slicer

    return slicer


def _scene():
    slicer = _slicer()
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("slicer.mrmlScene is not set (run inside Slicer or set it to a vtkMRMLScene)")
    return scene


def _node_label(node) -> str:
    return f"node '{node.GetName()}'" if node is not None else "node"


# --------------------------------------------------------------------------------------
# geometry


def vtk_matrix_from_array(matrix: np.ndarray):
    """A ``vtkMatrix4x4`` holding a 4x4 numpy matrix."""
    import vtk

    m = vtk.vtkMatrix4x4()
    arr = np.asarray(matrix, dtype=float)
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(arr[r, c]))
    return m


def array_from_vtk_matrix(matrix) -> np.ndarray:
    """A 4x4 numpy array from a ``vtkMatrix4x4``."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def ijk_to_ras_of_node(volume_node) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a volume node (numpy)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return array_from_vtk_matrix(m)


def geometry_of_node(volume_node) -> Geometry:
    """The :class:`Geometry` (LPS) of a volume node; shape from its image data as ``(k, j, i)``."""
    image = volume_node.GetImageData()
    if image is None:
        raise input_error(volume_node.GetName(), "volume node has no image data")
    dims = image.GetDimensions()
    return Geometry.from_ijk_to_ras(ijk_to_ras_of_node(volume_node), (dims[2], dims[1], dims[0]))


def set_node_geometry(volume_node, geometry: Geometry) -> None:
    """Place a volume node on ``geometry`` (sets its IJK-to-RAS matrix)."""
    volume_node.SetIJKToRASMatrix(vtk_matrix_from_array(geometry.ijk_to_ras()))


# --------------------------------------------------------------------------------------
# scalar volumes


def array_from_volume_node(volume_node) -> tuple[np.ndarray, Geometry]:
    """Copy a scalar volume node's voxels and geometry.

    Returns
    -------
    array
        ``[k, j, i]`` copy of the voxels (the node's own type).
    geometry
        Its voxel grid (LPS).
    """
    slicer = _slicer()
    if volume_node is None:
        raise input_error(None, "no volume selected")
    geometry = geometry_of_node(volume_node)
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    if array.ndim != 3:
        raise input_error(volume_node.GetName(), f"is not a 3D scalar volume (array shape {array.shape})")
    return array, geometry


def _storable_array(array: np.ndarray, label: bool) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if label:
        # updateVolumeFromArray rejects int64 (np.argmax output); label maps fit int16.
        if np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize > 2:
            return arr.astype(np.int16)
        if np.issubdtype(arr.dtype, np.floating):
            return np.round(arr).astype(np.int16)
    elif arr.dtype == np.int64 or arr.dtype == np.uint64:
        return arr.astype(np.int32)
    elif arr.dtype == np.float16:
        return arr.astype(np.float32)
    return np.ascontiguousarray(arr)


def volume_node_from_array(
    array: np.ndarray,
    geometry: Geometry,
    name: str,
    node=None,
    label: bool = False,
):
    """Put a ``[k, j, i]`` array on ``geometry`` into a (new or given) volume node.

    Parameters
    ----------
    node
        Existing node to update (its voxels and geometry are replaced), or None to
        add a new ``vtkMRMLScalarVolumeNode`` (``vtkMRMLLabelMapVolumeNode`` when
        ``label``) with default display nodes.
    label
        Store as a label map (int16).
    """
    slicer = _slicer()
    arr = _storable_array(array, label)
    if tuple(arr.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {arr.shape} does not match geometry shape {tuple(geometry.shape)}")
    if node is None:
        class_name = "vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode"
        node = slicer.util.addVolumeFromArray(arr, ijkToRAS=geometry.ijk_to_ras(), name=name,
                                              nodeClassName=class_name)
    else:
        slicer.util.updateVolumeFromArray(node, arr)
        set_node_geometry(node, geometry)
        if name:
            node.SetName(name)
    return node


# --------------------------------------------------------------------------------------
# 4D series: sequence nodes and MultiVolume nodes


def _seconds_per_unit(unit: Optional[str], what: str) -> float:
    key = (unit or "").strip().lower()
    if key not in _TIME_UNIT_SECONDS:
        raise input_error(what, f"unknown time unit '{unit}' (expected s, ms or min)")
    return _TIME_UNIT_SECONDS[key]


def _relative_times(values: Sequence[str], unit: Optional[str], what: str) -> Optional[np.ndarray]:
    try:
        numbers = np.array([float(v) for v in values], dtype=float)
    except ValueError:
        return None
    if numbers.size == 0 or not np.all(np.isfinite(numbers)):
        return None
    times = (numbers - numbers[0]) * _seconds_per_unit(unit, what)
    if numbers.size > 1 and np.any(np.diff(times) <= 0):
        raise input_error(what, "frame times are not strictly increasing; give the frame interval (TR) instead")
    return times


def is_multivolume_node(node) -> bool:
    """True for a MultiVolume node (``vtkMRMLMultiVolumeNode`` or a volume with its attributes)."""
    if node is None:
        return False
    if node.GetClassName() == "vtkMRMLMultiVolumeNode":
        return True
    return node.IsA("vtkMRMLVolumeNode") and node.GetAttribute("MultiVolume.FrameLabels") is not None


def is_diffusion_weighted_node(node) -> bool:
    """True for a ``vtkMRMLDiffusionWeightedVolumeNode`` (what Slicer makes of a DWI NRRD file)."""
    return node is not None and node.IsA("vtkMRMLDiffusionWeightedVolumeNode")


def bvalues_of_node(node) -> Optional[np.ndarray]:
    """The b-values (s/mm^2), one per volume, of a diffusion-weighted volume node; None for other nodes.

    Slicer's NRRD reader stores b = nominal ``DWMRI_b-value`` x |gradient|^2 per gradient
    (and normalises the gradients), so these are the effective b-values of the volumes.
    """
    if not is_diffusion_weighted_node(node):
        return None
    return np.array([node.GetBValue(index) for index in range(node.GetNumberOfGradients())], dtype=float)


def _frames_of_vector_volume(node, too_few: str) -> tuple[np.ndarray, Geometry]:
    """float32 ``[k, j, i, frames]`` copy and geometry of a multi-component volume node (2+ frames)."""
    data = np.array(_slicer().util.arrayFromVolume(node), dtype=np.float32, copy=True)
    if data.ndim != 4 or data.shape[-1] < 2:
        raise input_error(node.GetName(), f"{too_few} (array shape {data.shape})")
    return data, geometry_of_node(node)


def series_from_node(node, tr: Optional[float] = None) -> Series:
    """Read a 4D series from a sequence node of volumes, a MultiVolume node or a DWI volume node.

    Parameters
    ----------
    node
        ``vtkMRMLSequenceNode`` whose data nodes are scalar volumes on one grid
        (frame times from the index values and the index unit), or a MultiVolume
        node (``[k, j, i, frames]`` voxels; times from the attribute
        ``MultiVolume.FrameLabels`` in ``MultiVolume.FrameIdentifyingDICOMTagUnits``,
        milliseconds when absent, as Slicer's MultiVolumeImporter writes them),
        or a ``vtkMRMLDiffusionWeightedVolumeNode`` (``[k, j, i, volumes]`` voxels, no
        timing; its b-values come from :func:`bvalues_of_node`).
    tr
        Frame interval in seconds; when given it overrides the node's timing.

    Returns
    -------
    Series
        ``array`` float32 ``[k, j, i, t]``; ``times`` in s from the first frame (None
        when the node has no numeric timing and no ``tr`` is given); ``te`` in s when
        a MultiVolume node carries ``MultiVolume.DICOM.EchoTime`` (ms).
    """
    if node is None:
        raise input_error(None, "no 4D series selected")
    sequence = sequence_of_proxy(node)
    if sequence is not None:
        node = sequence  # the volume a sequence browser shows stands for its whole sequence
    name = node.GetName()
    te = None
    if node.IsA("vtkMRMLSequenceNode"):
        count = node.GetNumberOfDataNodes()
        if count < 2:
            raise input_error(name, f"sequence has {count} frame(s); a 4D series needs at least 2")
        frames = []
        geometry = None
        for index in range(count):
            frame = node.GetNthDataNode(index)
            if frame is None or not frame.IsA("vtkMRMLScalarVolumeNode"):
                raise input_error(name, f"frame {index} of the sequence is not a scalar volume")
            array, frame_geometry = array_from_volume_node(frame)
            if geometry is None:
                geometry = frame_geometry
            elif not geometry.same_grid(frame_geometry):
                raise input_error(name, f"frame {index} is on another voxel grid than frame 0")
            frames.append(array)
        data = np.stack(frames, axis=-1).astype(np.float32, copy=False)
        values = [node.GetNthIndexValue(i) for i in range(count)]
        times = _relative_times(values, node.GetIndexUnit(), name)
    elif is_multivolume_node(node):
        data, geometry = _frames_of_vector_volume(node, "MultiVolume node has no frames")
        labels = node.GetAttribute("MultiVolume.FrameLabels")
        unit = node.GetAttribute("MultiVolume.FrameIdentifyingDICOMTagUnits")
        times = None
        if labels:
            values = [v for v in labels.split(",") if v.strip()]
            if len(values) != data.shape[-1]:
                raise input_error(name, f"MultiVolume.FrameLabels has {len(values)} values for "
                                        f"{data.shape[-1]} frames")
            times = _relative_times(values, unit if unit else "ms", name)
        echo = node.GetAttribute("MultiVolume.DICOM.EchoTime")
        if echo:
            try:
                te = float(echo) * 1e-3
            except ValueError:
                te = None
    elif is_diffusion_weighted_node(node):
        data, geometry = _frames_of_vector_volume(node, "diffusion-weighted volume has fewer than 2 volumes")
        if node.GetNumberOfGradients() != data.shape[-1]:
            raise input_error(name, f"diffusion-weighted volume has {node.GetNumberOfGradients()} b-values for "
                                    f"{data.shape[-1]} volumes")
        times = None
    else:
        raise input_error(name, f"is a {node.GetClassName()}; a sequence of volumes or a MultiVolume "
                                f"node, or a diffusion-weighted volume node, was expected")
    if tr is not None:
        if not (math.isfinite(tr) and tr > 0):
            raise input_error("TR", f"must be a positive number of seconds, got {tr}")
        times = np.arange(data.shape[-1], dtype=float) * float(tr)
    tr_value = float(tr) if tr is not None else (
        float(np.median(np.diff(times))) if times is not None and times.size > 1 else None)
    return Series(np.ascontiguousarray(data), geometry, times, tr_value, te, name)


def sequence_of_proxy(node):
    """The sequence whose browser shows ``node`` as its proxy (current frame), else None."""
    if node is None or node.IsA("vtkMRMLSequenceNode") or node.GetScene() is None:
        return None
    scene = node.GetScene()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(index, "vtkMRMLSequenceBrowserNode")
        if browser.IsProxyNodeID(node.GetID()):  # IsProxyNode(const char*) is deprecated
            return browser.GetSequenceNode(node)
    return None


def attributes_of_node(node) -> dict[str, str]:
    """Attributes of a series node and, for a sequence proxy, of its sequence (the node's own win)."""
    attributes: dict[str, str] = {}
    for source in (sequence_of_proxy(node), node):
        if source is not None:
            for name in source.GetAttributeNames() or ():
                attributes[name] = source.GetAttribute(name)
    return attributes


def diffusion_protocol_of_node(node, n_volumes: int) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """b-values (s/mm^2) and echo times (ms) that a diffusion series node carries, each None when absent.

    A diffusion-weighted volume node's b-values come from the node itself
    (:func:`bvalues_of_node`); otherwise, and for the echo times always, from the
    attributes read by :func:`perfusionai.dr.pipeline.protocol_from_attributes`
    (``PerfusionAI.bvals``/``PerfusionAI.tes``, DWMRI keys, ``EchoTime``).
    """
    from .dr.pipeline import protocol_from_attributes

    name = node.GetName()
    node_bvals = bvalues_of_node(node)
    if node_bvals is not None and node_bvals.size != n_volumes:
        raise input_error(name, f"lists {node_bvals.size} b-values for {n_volumes} volumes")
    attributes = attributes_of_node(node)
    if node_bvals is not None:
        # The node's b-values win; stale b-value attributes must not make a valid node fail.
        attributes = {k: v for k, v in attributes.items()
                      if k not in ("PerfusionAI.bvals", "bvals", "DWMRI_b-value")}
    bvals, tes = protocol_from_attributes(attributes, n_volumes, source=name)
    return (node_bvals if node_bvals is not None else bvals), tes


def sequence_node_from_series(
    array: np.ndarray,
    geometry: Geometry,
    times: Sequence[float],
    name: str,
    index_unit: str = "s",
    browser: bool = True,
    sequences_logic=None,
):
    """Store a ``[k, j, i, t]`` series as a sequence node of scalar volumes.

    Parameters
    ----------
    times
        Frame times in ``index_unit``; written with ``repr`` precision so they read back exactly.
    browser
        Also add a sequence browser node (so the series can be browsed and shown).
    sequences_logic
        ``vtkSlicerSequencesLogic`` that creates the browser's proxy node; default
        ``slicer.modules.sequences.logic()`` in the application (none in slicer-core).

    Returns
    -------
    (sequence_node, browser_node or None)
    """
    slicer = _slicer()
    scene = _scene()
    data = np.asarray(array)
    values = [float(t) for t in times]
    if data.ndim != 4 or data.shape[-1] != len(values):
        raise ValueError(f"array shape {data.shape} does not match {len(values)} frame times")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("time")
    sequence.SetIndexUnit(index_unit)
    frame = slicer.vtkMRMLScalarVolumeNode()
    matrix = vtk_matrix_from_array(geometry.ijk_to_ras())
    for index, value in enumerate(values):
        slicer.util.updateVolumeFromArray(frame, np.ascontiguousarray(data[..., index]))
        frame.SetIJKToRASMatrix(matrix)
        # SetDataNodeAtValue deep-copies the frame, so one scratch node serves all frames.
        sequence.SetDataNodeAtValue(frame, repr(value))
    browser_node = None
    if browser:
        browser_node = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", name + " browser")
        browser_node.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        if sequences_logic is None:
            modules = getattr(slicer, "modules", None)  # only in the application
            sequences_logic = modules.sequences.logic() if modules is not None else None
        if sequences_logic is not None:
            # Creates the proxy volume that the slice views show for the selected frame.
            sequences_logic.UpdateProxyNodesFromSequences(browser_node)
    return sequence, browser_node


# --------------------------------------------------------------------------------------
# masks and segmentations


def _temporary_reference_volume(geometry: Geometry):
    return volume_node_from_array(np.zeros(tuple(geometry.shape), dtype=np.uint8), geometry,
                                  "__perfusionai_reference__")


def mask_from_node(node, reference: Geometry, segment_id: Optional[str] = None,
                   what: str = "mask") -> np.ndarray:
    """A boolean ``[k, j, i]`` mask on ``reference``'s grid from a label map or a segmentation.

    Parameters
    ----------
    node
        ``vtkMRMLLabelMapVolumeNode`` / scalar volume (nonzero voxels are inside; it
        must lie on the reference grid), or ``vtkMRMLSegmentationNode`` (the
        segment ``segment_id``, or the union of all segments when None, resampled
        onto the reference grid by Slicer).
    what
        Name used in error messages ("AIF region", "brain mask").
    """
    slicer = _slicer()
    scene = _scene()
    if node is None:
        raise input_error(None, f"no {what} selected")
    if node.IsA("vtkMRMLSegmentationNode"):
        import vtk

        segmentation = node.GetSegmentation()
        ids = vtk.vtkStringArray()
        if segment_id:
            if segmentation.GetSegment(segment_id) is None:
                raise input_error(node.GetName(), f"has no segment '{segment_id}' for the {what}")
            ids.InsertNextValue(segment_id)
        else:
            for index in range(segmentation.GetNumberOfSegments()):
                ids.InsertNextValue(segmentation.GetNthSegmentID(index))
        if ids.GetNumberOfValues() == 0:
            raise input_error(node.GetName(), f"segmentation has no segments for the {what}")
        reference_node = _temporary_reference_volume(reference)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__perfusionai_mask__")
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                node, ids, labelmap, reference_node)
            if not ok:
                raise input_error(node.GetName(), f"the {what} could not be converted to a label map")
            mask = np.array(slicer.util.arrayFromVolume(labelmap)) != 0
        finally:
            display = labelmap.GetDisplayNode()
            color = display.GetColorNode() if display is not None else None
            scene.RemoveNode(labelmap)
            if color is not None and color.GetName() and "__perfusionai_mask__" in color.GetName():
                scene.RemoveNode(color)
            scene.RemoveNode(reference_node)
    elif node.IsA("vtkMRMLVolumeNode"):
        array, geometry = array_from_volume_node(node)
        if not geometry.same_grid(reference):
            raise input_error(node.GetName(), f"{what} is not on the grid of the 4D series "
                                              f"({geometry.describe()} vs {reference.describe()})")
        mask = array != 0
    else:
        raise input_error(node.GetName(), f"is a {node.GetClassName()}; a label map or segmentation "
                                          f"was expected for the {what}")
    if mask.shape != tuple(reference.shape):
        raise input_error(node.GetName(), f"{what} has shape {mask.shape}, expected {tuple(reference.shape)}")
    if not mask.any():
        raise input_error(node.GetName(), f"{what} is empty")
    return mask


def color_table_node_from_labels(table: Mapping[int, LabelInfo], name: str):
    """A user colour table node with one named colour per label (label 0: transparent background)."""
    scene = _scene()
    size = max(table) + 1 if table else 1
    color_node = scene.CreateNodeByClass("vtkMRMLColorTableNode")
    color_node.SetTypeToUser()
    color_node.SetNumberOfColors(size)
    color_node.SetName(name)
    color_node.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for value in range(1, size):
        info = table.get(value)
        if info is None:
            color_node.SetColor(value, f"label {value}", 0.5, 0.5, 0.5, 0.0)
        else:
            r, g, b = info.rgb
            color_node.SetColor(value, info.name, float(r), float(g), float(b), 1.0)
    color_node.HideFromEditorsOff()
    scene.AddNode(color_node)
    color_node.UnRegister(None)
    return color_node


def segmentation_node_from_labels(
    labels: np.ndarray,
    geometry: Geometry,
    table: Mapping[int, LabelInfo],
    name: str,
    reference_volume_node=None,
    node=None,
):
    """Turn a ``[k, j, i]`` integer label map into a segmentation node (new, or ``node`` reused:
    its segments are replaced and its name kept).

    Each label value present in ``labels`` and listed in ``table`` becomes one
    segment named and coloured from ``table``; labels missing from ``table`` are
    refused (they would get meaningless names). Lobe and lung segments get Slicer's
    standard terminology entry (:func:`terminology_entry`). The segmentation's reference
    geometry is ``reference_volume_node`` (e.g. the source image) or the label grid.
    """
    slicer = _slicer()
    scene = _scene()
    values = np.unique(np.asarray(labels))
    unknown = [int(v) for v in values if v != 0 and int(v) not in table]
    if unknown:
        raise PerfusionAIError(f"label map '{name}' has labels {unknown} that have no name")
    labelmap = volume_node_from_array(labels, geometry, name + " labels", label=True)
    color_node = color_table_node_from_labels(table, name + " colors")
    try:
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(color_node.GetID())
        if node is not None:
            segmentation = node
            segmentation.GetSegmentation().RemoveAllSegments()
        else:
            segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node or labelmap)
        if reference_volume_node is not None:
            segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(),
                                            reference_volume_node.GetID())
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
        if not ok:
            raise PerfusionAIError(f"label map '{name}' could not be imported as a segmentation")
        _tag_standard_terminology(segmentation)
    finally:
        scene.RemoveNode(labelmap)
        scene.RemoveNode(color_node)
    return segmentation


#: Standard terminology of lung structures: Slicer's "3D Slicer General Anatomy list" entries
#: (SNOMED CT codes, as SlicerTotalSegmentator tags its lung segments), keyed by segment name.
_RIGHT, _LEFT = ("24028007", "Right"), ("7771000", "Left")
_ANATOMY_TERMS = {
    "Right upper lobe": ("45653009", "Upper lobe of lung", _RIGHT),
    "Right middle lobe": ("72481006", "Middle lobe of lung", _RIGHT),
    "Right lower lobe": ("90572001", "Lower lobe of lung", _RIGHT),
    "Left upper lobe": ("45653009", "Upper lobe of lung", _LEFT),
    "Left lower lobe": ("90572001", "Lower lobe of lung", _LEFT),
    "Right lung": ("39607008", "Lung", _RIGHT),
    "Left lung": ("39607008", "Lung", _LEFT),
}


def terminology_entry(segment_name: str) -> Optional[str]:
    """Slicer's terminology entry string for a lung/lobe segment name, or None (no standard term)."""
    term = _ANATOMY_TERMS.get(segment_name)
    if term is None:
        return None
    code, meaning, (side_code, side) = term
    return ("Segmentation category and type - 3D Slicer General Anatomy list"
            "~SCT^123037004^Anatomical Structure"
            f"~SCT^{code}^{meaning}"
            f"~SCT^{side_code}^{side}"
            "~Anatomic codes - DICOM master list~^^~^^")


def _tag_standard_terminology(segmentation_node) -> None:
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        entry = terminology_entry(segment.GetName())
        if entry is not None:
            segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def show_segmentation_3d(segmentation_node, visible: bool = True) -> None:
    """Show (building the closed-surface representation once) or hide a segmentation in 3D views."""
    if visible:
        segmentation_node.CreateClosedSurfaceRepresentation()
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    display.SetVisibility3D(bool(visible))


def segments_of(segmentation_node) -> list[tuple[str, str, tuple[float, float, float]]]:
    """``[(segment id, name, (r, g, b)), ...]`` of a segmentation node, in order."""
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        out.append((segmentation.GetNthSegmentID(index), segment.GetName(), tuple(segment.GetColor())))
    return out


# --------------------------------------------------------------------------------------
# tables and plots


def table_node_from_rows(rows: Sequence[Mapping[str, object]], name: str, node=None,
                         units: Optional[Mapping[str, str]] = None):
    """Write rows of ``{column: value}`` into a table node (strings stay text, numbers become doubles).

    Columns appear in the order of first appearance; a missing cell is empty text
    (string column) or NaN (numeric column). ``units`` sets column unit labels.
    """
    import vtk

    scene = _scene()
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    else:
        node.RemoveAllColumns()
        node.SetName(name)
    table = node.GetTable()
    for column in columns:
        cells = [row.get(column) for row in rows]
        numeric = all(c is None or (isinstance(c, (int, float, np.number)) and not isinstance(c, bool))
                      for c in cells)
        if numeric:
            array = vtk.vtkDoubleArray()
            for c in cells:
                array.InsertNextValue(float("nan") if c is None else float(c))
        else:
            array = vtk.vtkStringArray()
            for c in cells:
                array.InsertNextValue("" if c is None else str(c))
        array.SetName(column)
        table.AddColumn(array)
    table.Modified()
    for column, unit in (units or {}).items():
        if column in columns:
            node.SetColumnUnitLabel(column, unit)
    node.Modified()
    return node


def rows_of_table_node(node) -> list[dict[str, str]]:
    """Read a table node back as rows of ``{column: text}``."""
    columns = [node.GetColumnName(c) for c in range(node.GetNumberOfColumns())]
    return [{columns[c]: node.GetCellText(r, c) for c in range(len(columns))}
            for r in range(node.GetNumberOfRows())]


def plot_curves(x: np.ndarray, curves: Mapping[str, np.ndarray], title: str, x_name: str = "time (s)",
                show: bool = True, nodes: Optional[dict] = None):
    """Plot curves against ``x`` in a chart (table, plot series and chart nodes).

    Returns the chart node; ``nodes`` (a dict) receives ``table``, ``chart`` and
    ``series`` so a later call can update the same plot.
    """
    slicer = _slicer()
    names = list(curves)
    columns = [np.asarray(x, dtype=float)] + [np.asarray(curves[n], dtype=float) for n in names]
    length = columns[0].shape[0]
    if any(c.shape != (length,) for c in columns):
        raise ValueError("every curve needs one value per x")
    nodes = {} if nodes is None else nodes
    chart = slicer.util.plot(np.stack(columns, axis=1), xColumnIndex=0, columnNames=[x_name] + names,
                             title=title, show=show, nodes=nodes)
    for series in nodes.get("series", []):
        series.SetPlotType(series.PlotTypeLine)
    chart.SetXAxisTitle(x_name)
    return chart


# --------------------------------------------------------------------------------------
# display


def color_node_id_for_map(map_type: str) -> str:
    """The first colour node id of ``MAP_COLOR_NODE_IDS[map_type]`` present in the scene."""
    scene = _scene()
    for node_id in MAP_COLOR_NODE_IDS.get(map_type.lower(), DEFAULT_MAP_COLOR_NODE_IDS):
        if scene.GetNodeByID(node_id) is not None:
            return node_id
    for node_id in DEFAULT_MAP_COLOR_NODE_IDS:
        if scene.GetNodeByID(node_id) is not None:
            return node_id
    raise RuntimeError("no colour table is available in the scene (the Colors module logic is not set up)")


def display_range(array: np.ndarray, lower_percentile: float = 1.0,
                  upper_percentile: float = 99.0) -> tuple[float, float]:
    """Robust display range of a map: percentiles of its finite nonzero voxels.

    Zero voxels are the background outside the mask, so they are left out.
    Returns ``(0, 1)`` for an empty map.
    """
    values = np.asarray(array, dtype=float)
    values = values[np.isfinite(values) & (values != 0)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [lower_percentile, upper_percentile])
    if not high > low:
        high = low + max(abs(low) * 0.1, 1e-6)
    return float(low), float(high)


def show_map(volume_node, map_type: str, window: Optional[tuple[float, float]] = None,
             hide_zero: bool = True) -> None:
    """Set a parameter map's display: colour table for its type, window/level, zero hidden.

    Parameters
    ----------
    window
        ``(min, max)`` display range; default :func:`display_range` of the voxels.
    hide_zero
        Threshold out voxels at 0 (outside the mask) so the overlay shows only tissue.
    """
    slicer = _slicer()
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    array = slicer.util.arrayFromVolume(volume_node)
    low, high = window if window is not None else display_range(array)
    display.SetAndObserveColorNodeID(color_node_id_for_map(map_type))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)
    if hide_zero:
        display.AutoThresholdOff()
        # Values at exactly 0 are background; a tiny positive floor keeps every tissue value.
        floor = min(low, 0.0) if low < 0 else 1e-6 * max(abs(high), 1.0)
        display.SetThreshold(floor, float(np.finfo(np.float32).max))
        display.ApplyThresholdOn()
    units = MAP_UNITS.get(map_type.lower())
    volume_node.SetAttribute("PerfusionAI.MapType", map_type.lower())
    if units:
        volume_node.SetAttribute("PerfusionAI.Units", units)


def show_overlay(background_node, foreground_node, opacity: float = 0.6, fit: bool = False,
                 legend: bool = True) -> None:
    """Show ``foreground_node`` over ``background_node`` in every slice view.

    ``fit`` resets the slice views to the volume (only meaningful with a layout); ``legend`` adds
    a colour legend (title: map type and units) to the overlaid map (:func:`add_color_legend`).
    """
    slicer = _slicer()
    slicer.util.setSliceViewerLayers(background=background_node, foreground=foreground_node,
                                     foregroundOpacity=float(opacity), fit=fit)
    if legend:
        add_color_legend(foreground_node)


def add_color_legend(volume_node, title: Optional[str] = None):
    """A colour legend for a parametric map (Slicer's color legend display node), titled with its units.

    ``title`` defaults to ``"<MAP TYPE> [<units>]"`` from the attributes :func:`show_map` set.
    Returns the ``vtkMRMLColorLegendDisplayNode`` (None when the node has no display).
    """
    slicer = _slicer()
    legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(volume_node)
    if legend is None:
        return None
    if title is None:
        map_type = volume_node.GetAttribute("PerfusionAI.MapType") or volume_node.GetName()
        units = volume_node.GetAttribute("PerfusionAI.Units")
        title = f"{map_type.upper()} [{units}]" if units else map_type.upper()
    legend.SetTitleText(title)
    return legend


def set_attributes(node, attributes: Mapping[str, object], prefix: str = "PerfusionAI.") -> None:
    """Record small metadata (method, options, model) on a node; saved with the scene."""
    for key, value in attributes.items():
        node.SetAttribute(prefix + key, "" if value is None else str(value))


def record_provenance(nodes: Sequence, options: Mapping[str, object]) -> None:
    """Record the perfusionai version (``PerfusionAI.Version``) and every option of the run
    (``PerfusionAI.Options``, JSON; e.g. ``job.to_json()``) on each result node (None entries skipped)."""
    import json

    from . import __version__

    text = json.dumps(options, sort_keys=True, default=str)
    for node in nodes:
        if node is not None:
            set_attributes(node, {"Version": __version__, "Options": text})


def group_results(nodes: Sequence, input_node, folder_name: str) -> None:
    """Put result nodes in a subject-hierarchy folder ``folder_name`` beside ``input_node``."""
    _parent_with_input([n for n in nodes if n is not None], input_node, folder_name)


# --------------------------------------------------------------------------------------
# DSC: nodes in, nodes out (used by the DSCDeconvolution module's Logic)


class DSCNodeInputs:
    """The core inputs read from nodes: ``series`` (:class:`Series`), ``te`` s, masks ``[k, j, i]`` bool."""

    def __init__(self, series: Series, te: float, mask: Optional[np.ndarray], aif_mask: Optional[np.ndarray]):
        self.series = series
        self.te = te
        self.mask = mask
        self.aif_mask = aif_mask

    @property
    def times(self) -> np.ndarray:
        return self.series.frame_times()


def _resolve_te(te: Optional[float], series: Series) -> float:
    from .dsc.concentration import validate_te

    if te is None and series.te is None:
        raise input_error("TE", f"the echo time of '{series.path}' is not known; enter it in seconds (e.g. 0.03)")
    return validate_te(te if te is not None else series.te, "TE")


def dsc_inputs_from_nodes(series_node, te: Optional[float] = None, tr: Optional[float] = None,
                          aif_node=None, aif_segment_id: Optional[str] = None,
                          mask_node=None, mask_segment_id: Optional[str] = None) -> DSCNodeInputs:
    """Read a DSC run's inputs from the scene.

    Parameters
    ----------
    series_node
        Sequence node of volumes or MultiVolume node (:func:`series_from_node`).
    te, tr
        Echo time and frame interval in s; ``te`` None uses the node's (MultiVolume
        ``MultiVolume.DICOM.EchoTime``), ``tr`` None the node's frame times.
    aif_node, aif_segment_id
        Arterial region: label map or segmentation (+ segment id); None for automatic AIF.
    mask_node, mask_segment_id
        Optional brain mask, same kinds.
    """
    series = series_from_node(series_node, tr=tr)
    if series.times is None:
        raise input_error(series_node.GetName(), "has no frame times; enter the frame interval (TR) in seconds")
    resolved_te = _resolve_te(te, series)
    reference = series.geometry
    mask = mask_from_node(mask_node, reference, mask_segment_id, "brain mask") if mask_node is not None else None
    aif_mask = mask_from_node(aif_node, reference, aif_segment_id, "AIF region") if aif_node is not None else None
    return DSCNodeInputs(series, resolved_te, mask, aif_mask)


def dsc_second_echo_from_node(node, first: Series, te2: Optional[float] = None,
                              tr: Optional[float] = None) -> tuple[np.ndarray, float]:
    """The second echo of a dual-echo DSC series: ``(float [k, j, i, t], TE2 in s)``.

    ``node`` is a sequence or MultiVolume node on the first echo's grid with as many frames;
    ``te2`` None reads the node's echo time.
    """
    second = series_from_node(node, tr=tr)
    if tuple(second.array.shape) != tuple(first.array.shape):
        raise input_error(node.GetName(), f"second echo of shape {tuple(second.array.shape)} differs from the "
                                          f"first echo's {tuple(first.array.shape)}")
    check_same_grid(second.geometry, first.geometry, node.GetName(), "second echo")
    return second.array, _resolve_te(te2, second)


def _browser_for_sequence(sequence_node):
    scene = _scene()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(index, "vtkMRMLSequenceBrowserNode")
        if browser.IsSynchronizedSequenceNodeID(sequence_node.GetID(), True):  # the const char* overload of IsSynchronizedSequenceNode is deprecated
            return browser
    return None


def frame_volume_node(series_node, frame: int, name: str, series: Optional[Series] = None,
                      sequences_logic=None):
    """A volume showing frame ``frame`` of a series node.

    For a sequence with a browser, the browser jumps to the frame and its proxy
    node is returned; otherwise a new volume holding that frame is added.
    """
    if series_node.IsA("vtkMRMLSequenceNode"):
        browser = _browser_for_sequence(series_node)
        if browser is not None:
            browser.SetSelectedItemNumber(int(frame))
            if sequences_logic is not None:
                sequences_logic.UpdateProxyNodesFromSequences(browser)
            proxy = browser.GetProxyNode(series_node)
            if proxy is not None:
                return proxy
    if series is None:
        series = series_from_node(series_node)
    return volume_node_from_array(series.array[..., int(frame)], series.geometry, name)


def _parent_with_input(nodes: Sequence, input_node, folder_name: str) -> None:
    """Put result nodes in a subject-hierarchy folder next to the input (when the hierarchy exists)."""
    slicer = _slicer()
    scene = _scene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    input_item = hierarchy.GetItemByDataNode(input_node)
    parent = hierarchy.GetItemParent(input_item) if input_item else hierarchy.GetSceneItemID()
    folder = hierarchy.CreateFolderItem(parent, folder_name)
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, folder)
        else:  # the application adds items for new nodes itself; slicer-core does not
            hierarchy.CreateItem(folder, node)


def dsc_output_to_nodes(output, series_node, prefix: str = "DSC", show: bool = True,
                        overlay_map: str = "cbf", opacity: float = 0.6, attributes: Optional[Mapping] = None,
                        series: Optional[Series] = None, sequences_logic=None,
                        reuse: Optional[Mapping[str, object]] = None, mask: Optional[np.ndarray] = None) -> dict:
    """Put a DSC run's results into the scene and show them.

    Parameters
    ----------
    output
        :class:`perfusionai.slicer_support.DSCOutput`.
    series_node
        The input series (geometry, mid-bolus background frame, hierarchy parent).
    show
        Show ``overlay_map`` over the mid-bolus frame in the slice views and the
        curves in a plot view; False only builds the nodes (batch, tests).
    reuse
        ``{map name: volume node}`` chosen by the user: that map is written into that node
        (voxels, geometry and name replaced) instead of a new one.
    mask
        bool ``[k, j, i]``: the mask the run made itself (``auto_mask``), added as the label map
        ``"<prefix> automatic brain mask"``.

    Returns
    -------
    dict
        ``{"maps": {name: volume node}, "table": table node, "chart": chart node,
        "plot": {table, chart, series}, "background": frame volume node,
        "series": {name: sequence node}}`` (``series``: per-voxel curves such as the residue,
        one volume per lag, index unit s); ``"autoMask"``: the label map of ``mask`` or None.
    """
    map_nodes = {}
    reuse = {k: v for k, v in (reuse or {}).items() if v is not None}
    for name, array in output.maps.items():
        node = volume_node_from_array(array, output.geometry, f"{prefix} {name.upper()}", node=reuse.get(name))
        show_map(node, name)
        set_attributes(node, attributes or {})
        map_nodes[name] = node
    series_nodes = {}
    for name, (curves, lags) in getattr(output, "series", {}).items():
        sequence, _browser = sequence_node_from_series(curves, output.geometry, lags, f"{prefix} {name}",
                                                       browser=False)
        set_attributes(sequence, dict(attributes or {}, Units=MAP_UNITS.get(name, ""), MapType=name))
        series_nodes[name] = sequence
    mask_node = None
    if mask is not None:
        mask_node = volume_node_from_array(np.asarray(mask).astype(np.uint8), output.geometry,
                                           f"{prefix} automatic brain mask", label=True)
        set_attributes(mask_node, attributes or {})
    table = table_node_from_rows(output.median_rows(), f"{prefix} medians")
    plot_nodes: dict = {}
    chart = plot_curves(np.asarray(output.times), {"AIF (1/s)": output.aif,
                                                    "mean tissue (1/s)": output.tissue_curve},
                        f"{prefix} curves", x_name="time (s)", show=show, nodes=plot_nodes)
    series_node = sequence_of_proxy(series_node) or series_node
    frame = output.mid_bolus_frame()
    if sequences_logic is None:
        modules = getattr(_slicer(), "modules", None)  # only in the application
        sequences_logic = modules.sequences.logic() if modules is not None else None
    background = frame_volume_node(series_node, frame, f"{prefix} frame {frame}", series=series,
                                   sequences_logic=sequences_logic)
    if show and overlay_map in map_nodes:
        show_overlay(background, map_nodes[overlay_map], opacity=opacity, fit=True)
    created = list(map_nodes.values()) + list(series_nodes.values()) + [table, chart]
    if mask_node is not None:
        created.append(mask_node)
    browser = _browser_for_sequence(series_node) if series_node.IsA("vtkMRMLSequenceNode") else None
    if browser is None or not browser.IsProxyNodeID(background.GetID()):
        created.append(background)
    _parent_with_input(created, series_node, f"{prefix} results")
    return {"maps": map_nodes, "table": table, "chart": chart, "plot": plot_nodes, "background": background,
            "series": series_nodes, "autoMask": mask_node}
