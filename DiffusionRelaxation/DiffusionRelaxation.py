"""DiffusionRelaxation: clinical ADC/IVIM/T2-IVIM-Kurtosis fits and learned advanced-protocol maps in 3D Slicer.

The module binds widgets and calls the Logic; the Logic writes the input nodes to files, builds the
domain's job (``perfusionai.dr.jobs.DRFitJob`` / ``DRPredictJob``), runs it in-process (``job.run()``)
or as ``PythonSlicer -m perfusionai dr fit|predict`` in a background process, and reads the output
folder back into volume nodes with colour tables, plus a table of ROI statistics, the same way for both.
All numerics live in the ``perfusionai`` package, which the extension installs next to this file.
Units: b s/mm2, TE and T2 ms, diffusivities um2/ms (= 1e-3 mm2/s).
"""

import logging
import os
import sys
import time
from typing import Annotated, Optional, Union

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import (
    vtkMRMLDiffusionWeightedVolumeNode,
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLSequenceNode,
)


def _makePerfusionAIImportable():
    """In a built extension ``perfusionai/`` lies next to this file; in a source checkout
    (module folder added to the additional module paths) it lies one folder up."""
    try:
        import perfusionai  # noqa: F401
        import PerfusionAISlicerLib  # noqa: F401
    except ImportError:
        checkoutRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isdir(os.path.join(checkoutRoot, "perfusionai")) and checkoutRoot not in sys.path:
            sys.path.insert(0, checkoutRoot)


_makePerfusionAIImportable()

from perfusionai import mrml  # noqa: E402
from perfusionai import slicer_support  # noqa: E402
from perfusionai.dr import models as drmodels  # noqa: E402
from perfusionai.errors import PerfusionAIError  # noqa: E402
from PerfusionAISlicerLib import (  # noqa: E402
    BackgroundRun,
    documentationLink,
    RunPanel,
    addFolderBrowseButton,
    ensureDependencies,
    moduleRequirements,
    workDirectory,
)

MODES = ["Fit", "Predict"]
FIT_MODELS = list(drmodels.MODELS)
#: Map shown over the first volume after a run, per model.
OVERLAY_MAP = {"clinical": "adc", "t2ivimkurtosis": "dt", "ivim": "d", "predict": "dt"}


#
# DiffusionRelaxation
#


class DiffusionRelaxation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Diffusion Relaxation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Perfusion")]
        self.parent.dependencies = []
        self.parent.contributors = ["PerfusionAI team"]
        self.parent.helpText = _("""
Diffusion-relaxation maps from a diffusion series (one volume per b-value and echo time):
clinical mono-exponential metrics (S0, ADC, ADC_fast, ADC_slow, F), the T2-IVIM-Kurtosis model
(S0, f, Dv [um2/ms], T2v [ms], Dt [um2/ms], K, T2t [ms]; needs two or more echo times) or classic
IVIM (S0, f, D*, D), or the advanced maps predicted from a clinical series by a trained model
(Macarro et al., JMRI 2025). The series is a sequence of volumes or a DWI volume (e.g. a loaded DWI
NRRD file). b-values (s/mm2) and echo times (ms) come from files, else from the DWI volume's own
b-values or the series' attributes. Maps are shown as colour overlays; the table lists statistics in the ROI.
""")
        self.parent.helpText += documentationLink()
        self.parent.acknowledgementText = _("""
Built on the PerfusionAI library. Model and clinical metrics after Macarro et al., J Magn Reson Imaging 2025;
61(2):1018-1021.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: the diffusion-relaxation phantom, generated on the fly (no download)
#


def registerSampleData():
    """Add the diffusion-relaxation phantom to the Sample Data module (built when clicked)."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="PerfusionAI",
        sampleName="DiffusionRelaxationPhantom",
        thumbnailFileName=os.path.join(iconsPath, "DiffusionRelaxation.png"),
        uris="perfusionai://phantoms/dr",
        fileNames="DiffusionRelaxationPhantom.seq.nrrd",
        nodeNames="DRPhantom",
        customDownloader=loadDRPhantom,
    )


def loadDRPhantom(source=None, **phantomOptions):
    """Build the diffusion-relaxation phantom in the scene.

    A sequence of the 21 advanced-protocol volumes whose attributes ``PerfusionAI.bvals`` (s/mm2)
    and ``PerfusionAI.tes`` (ms) carry the protocol, plus body and tumour label maps.
    ``phantomOptions`` go to ``perfusionai.phantoms.dr.make_dr_phantom``. Returns
    ``{"series", "browser", "body", "tumour", "phantom"}``.
    """
    from perfusionai.phantoms.dr import make_dr_phantom

    options = {"shape": (4, 32, 32), "snr": 60.0, "seed": 1}
    options.update(phantomOptions)
    phantom = make_dr_phantom(**options)
    volumeIndices = list(range(phantom.protocol.n))
    sequence, browser = mrml.sequence_node_from_series(phantom.dwi, phantom.geometry, volumeIndices, "DRPhantom",
                                                       index_unit="")
    mrml.set_attributes(sequence, {
        "bvals": " ".join(f"{b:g}" for b in phantom.protocol.bvals),
        "tes": " ".join(f"{t:g}" for t in phantom.protocol.tes),
        "Note": "digital phantom with known truth",
    })
    body = mrml.volume_node_from_array(phantom.body, phantom.geometry, "DRPhantom body", label=True)
    tumour = mrml.volume_node_from_array(phantom.tumour, phantom.geometry, "DRPhantom tumour", label=True)
    proxy = browser.GetProxyNode(sequence) if browser is not None else None
    if proxy is not None:
        slicer.util.setSliceViewerLayers(background=proxy, fit=slicer.app.layoutManager() is not None)
    return {"series": sequence, "browser": browser, "body": body, "tumour": tumour, "phantom": phantom}


#
# DiffusionRelaxationParameterNode
#


@parameterNodeWrapper
class DiffusionRelaxationParameterNode:
    """The module's settings, saved with the scene.

    inputSeries - the diffusion series (sequence of volumes, DWI volume, or MultiVolume / sequence proxy volume).
    bvalsPath, tesPath - b-value (s/mm2) and echo-time (ms) files; empty: from the series attributes.
    mask, maskSegmentId - optional fit region. roi, roiSegmentId - statistics region.
    mode - "Fit" a signal model or "Predict" with a trained model (modelPath).
    model - clinical, t2ivimkurtosis or ivim.
    noiseSigma - noise SD for the Rician noise-floor correction (0: off).
    overlayOpacity - opacity of the map shown over the first volume.
    runInBackground - run ``perfusionai dr fit|predict`` in a background process (Cancel works).
    outputMap - the volume that receives the shown map (``OVERLAY_MAP``: ADC, Dt or D; overwritten);
        none: a new volume per run.
    """

    # The binding sets the combo box's node types from this annotation; a DWI volume is a scalar
    # volume subclass and would be listed anyway, naming it keeps the .ui and the types in step.
    # Node unions name None: Slicer's parameterNodeWrapper writes None into a fresh node.
    inputSeries: Union[vtkMRMLSequenceNode, vtkMRMLScalarVolumeNode, vtkMRMLDiffusionWeightedVolumeNode, None]
    # Paths as text, not pathlib.Path: an empty Path reads "." (the path widgets are synced in the widget).
    bvalsPath: str = ""
    tesPath: str = ""
    mask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    maskSegmentId: str = ""
    roi: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    roiSegmentId: str = ""
    mode: Annotated[str, Choice(MODES)] = "Fit"
    model: Annotated[str, Choice(FIT_MODELS)] = "t2ivimkurtosis"
    modelPath: str = ""
    noiseSigma: Annotated[float, WithinRange(0.0, 1000000.0)] = 0.0
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    runInBackground: bool = True
    outputMap: Optional[vtkMRMLScalarVolumeNode]


#
# DiffusionRelaxationWidget
#


#: Path fields of the parameter node and their widgets, synced by the widget (an empty
#: pathlib.Path would read ".").
PATH_FIELDS = (("bvalsPath", "bvalsPathLineEdit"), ("tesPath", "tesPathLineEdit"), ("modelPath", "modelPathLineEdit"))


class DiffusionRelaxationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._syncingSegments = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffusionRelaxation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DiffusionRelaxationLogic()
        self.runPanel = RunPanel(self.ui, self.layout, _("Computing the diffusion-relaxation maps"),
                                 cancel=self.logic.cancel, refresh=self._updateGui)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.maskSegmentSelector.connect("currentSegmentChanged(QString)", self.onMaskSegmentChanged)
        self.ui.roiSegmentSelector.connect("currentSegmentChanged(QString)", self.onRoiSegmentChanged)
        for field, widgetName in PATH_FIELDS:
            getattr(self.ui, widgetName).connect("currentPathChanged(QString)",
                                                 lambda path, field=field: self.onPathChanged(field, path))
        addFolderBrowseButton(self.ui.modelPathLineEdit, _("Trained model folder"))
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()  # a background run must not add nodes to the next scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputSeries:
            firstSequence = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceNode")
            if firstSequence:
                self._parameterNode.inputSeries = firstSequence

    def setParameterNode(self, inputParameterNode: Optional[DiffusionRelaxationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui file are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        """Show the widgets that apply to the current choices; enable Apply when inputs are set."""
        p = self._parameterNode
        if not p:
            return
        predicting = p.mode == "Predict"
        self.ui.modelComboBox.setVisible(not predicting)
        self.ui.modelLabel.setVisible(not predicting)
        self.ui.modelPathLineEdit.setVisible(predicting)
        self.ui.modelPathLabel.setVisible(predicting)
        self.ui.learnedNoteLabel.setVisible(predicting)
        maskIsSegmentation = p.mask is not None and p.mask.IsA("vtkMRMLSegmentationNode")
        roiIsSegmentation = p.roi is not None and p.roi.IsA("vtkMRMLSegmentationNode")
        self.ui.maskSegmentSelector.setVisible(maskIsSegmentation)
        self.ui.roiSegmentSelector.setVisible(roiIsSegmentation)
        # The segment selectors and path fields are not bound by connectGui (segment lists are
        # dynamic); syncing them emits signals, which must not write back while the GUI is updated.
        self._syncingSegments = True
        try:
            if maskIsSegmentation:
                self.ui.maskSegmentSelector.setCurrentNode(p.mask)
                if p.maskSegmentId:
                    self.ui.maskSegmentSelector.setCurrentSegmentID(p.maskSegmentId)
            if roiIsSegmentation:
                self.ui.roiSegmentSelector.setCurrentNode(p.roi)
                if p.roiSegmentId:
                    self.ui.roiSegmentSelector.setCurrentSegmentID(p.roiSegmentId)
            for field, widgetName in PATH_FIELDS:
                widget = getattr(self.ui, widgetName)
                if widget.currentPath != getattr(p, field):
                    widget.currentPath = getattr(p, field)
        finally:
            self._syncingSegments = False
        running = self.logic.isRunning or self.runPanel.running
        ready = p.inputSeries is not None and (not predicting or bool(p.modelPath))
        self.ui.applyButton.enabled = ready and not running
        self.ui.applyButton.toolTip = (_("Fit or predict the maps") if ready else
                                       _("Select the diffusion series (and, to predict, a model folder)"))

    def onMaskSegmentChanged(self, segmentId) -> None:
        if self._parameterNode and not self._syncingSegments:
            self._parameterNode.maskSegmentId = segmentId or ""

    def onRoiSegmentChanged(self, segmentId) -> None:
        if self._parameterNode and not self._syncingSegments:
            self._parameterNode.roiSegmentId = segmentId or ""

    def onPathChanged(self, field, path) -> None:
        if self._parameterNode and not self._syncingSegments:
            setattr(self._parameterNode, field, path or "")

    def onApplyButton(self) -> None:
        p = self._parameterNode
        self.runPanel.run(
            lambda: self.logic.ensureDependencies(p.modelPath if p.mode == "Predict" else None),
            lambda progress, log, completed: self.logic.processWithParameterNode(
                p, waitForCompletion=not p.runInBackground, progressCallback=progress, logCallback=log,
                completedCallback=completed),
            self.showResults, background=p.runInBackground)

    def showResults(self, nodes) -> str:
        self.ui.resultsTableView.setMRMLTableNode(nodes["table"])
        return _("Done: maps and ROI statistics added to the scene.")


#
# DiffusionRelaxationLogic
#


class DiffusionRelaxationLogic(ScriptedLoadableModuleLogic):
    """Nodes in, perfusionai core, nodes out. Usable without the GUI::

        logic = DiffusionRelaxation.DiffusionRelaxationLogic()
        results = logic.process(getNode("DRPhantom"), mode="Fit", model="t2ivimkurtosis")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._run = BackgroundRun("DiffusionRelaxation")

    def getParameterNode(self):
        return DiffusionRelaxationParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._run.isRunning

    def cancel(self) -> None:
        """Stop a running background computation (the launcher and the Python process it started)."""
        self._run.cancel()

    # -- dependencies -------------------------------------------------------------------

    def ensureDependencies(self, modelPath=None) -> bool:
        """Install missing Python packages after one confirmation; torch only via the PyTorch extension.

        ``modelPath``: the model to predict with (a network model needs torch). Returns False when
        the user declined.
        """
        needsTorch = False
        if modelPath:
            from perfusionai.dr.learners import model_summary

            needsTorch = bool(model_summary(modelPath)["needs_torch"])
        return ensureDependencies(_("Diffusion Relaxation"), moduleRequirements(__file__),
                                  torchNeededBy=_("Network models") if needsTorch else None)

    # -- processing ---------------------------------------------------------------------

    def processWithParameterNode(self, p, waitForCompletion=True, progressCallback=None, completedCallback=None,
                                 logCallback=None):
        """Run :meth:`process` with the settings stored in a parameter node."""
        return self.process(
            p.inputSeries,
            mode=p.mode,
            model=p.model,
            bvalsPath=p.bvalsPath or None,
            tesPath=p.tesPath or None,
            maskNode=p.mask,
            maskSegmentId=p.maskSegmentId or None,
            roiNode=p.roi,
            roiSegmentId=p.roiSegmentId or None,
            modelPath=p.modelPath or None,
            noiseSigma=p.noiseSigma or None,
            overlayOpacity=p.overlayOpacity,
            mapNode=p.outputMap,
            waitForCompletion=waitForCompletion,
            progressCallback=progressCallback,
            completedCallback=completedCallback,
            logCallback=logCallback,
        )

    def readProtocol(self, seriesNode, series, model, bvalsPath=None, tesPath=None):
        """b-values (s/mm2) and TEs (ms) from the files when given, else from the series node
        (a DWI volume's own b-values, or the series attributes)."""
        from perfusionai.dr import pipeline

        fromHeader = mrml.diffusion_protocol_of_node(seriesNode, series.n_frames)
        bvals = pipeline.read_scheme_file(bvalsPath, "b-value file") if bvalsPath else fromHeader[0]
        tes = pipeline.read_scheme_file(tesPath, "echo-time file") if tesPath else fromHeader[1]
        if bvals is None:
            raise PerfusionAIError(_("The series carries no b-values (not a DWI volume, no attribute "
                                     "PerfusionAI.bvals or DWMRI keys); choose a b-value file."))
        return pipeline.check_protocol(series.n_frames, bvals, tes, model,
                                       bvals_name=bvalsPath or seriesNode.GetName(),
                                       tes_name=tesPath or seriesNode.GetName())

    def process(self, seriesNode, mode="Fit", model="t2ivimkurtosis", bvalsPath=None, tesPath=None, maskNode=None,
                maskSegmentId=None, roiNode=None, roiSegmentId=None, modelPath=None, noiseSigma=None,
                overlayOpacity=0.6, showResults=True, waitForCompletion=True, progressCallback=None,
                completedCallback=None, logCallback=None, mapNode=None):
        """Fit a signal model (``mode="Fit"``) or predict the advanced maps (``mode="Predict"``).

        :param seriesNode: sequence node of volumes, MultiVolume node, DWI volume node (e.g. a loaded DWI NRRD),
            or a sequence's proxy volume.
        :param model: clinical, t2ivimkurtosis or ivim (Fit).
        :param bvalsPath, tesPath: scheme files (s/mm2, ms); None: from the series attributes.
        :param maskNode: optional fit region (segmentation or label map).
        :param roiNode: statistics region (default: the fitted voxels).
        :param modelPath: model folder for Predict.
        :param noiseSigma: noise SD (signal units) for the Rician noise-floor correction.
        :param mapNode: an existing scalar volume that receives the shown map (ADC for clinical, Dt for
            t2ivimkurtosis and Predict, D for ivim; overwritten); None: a new volume.
        :param waitForCompletion: True computes in this process and returns the result nodes; False runs
            ``perfusionai dr fit|predict`` in a background process, returns None and calls
            ``completedCallback(outcome)``.
        :return: ``{"maps": {name: volume node}, "table": table node, "signals": sequence node or None}``.
        """
        if self.isRunning:
            raise PerfusionAIError(_("A diffusion-relaxation computation is already running; cancel it first."))
        series = mrml.series_from_node(seriesNode)
        if mode == "Predict":
            if not modelPath:
                raise PerfusionAIError(_("Choose a trained model folder to predict with."))
            protocol = self.readProtocol(seriesNode, series, "clinical", bvalsPath, tesPath)
        else:
            protocol = self.readProtocol(seriesNode, series, model, bvalsPath, tesPath)
        mask = mrml.mask_from_node(maskNode, series.geometry, maskSegmentId, "fit mask") if maskNode else None
        roi = (mrml.mask_from_node(roiNode, series.geometry, roiSegmentId, "statistics ROI"), roiNode.GetName()) \
            if roiNode is not None else None
        settings = {"mode": mode, "model": model, "modelPath": modelPath, "noiseSigma": noiseSigma,
                    "overlayOpacity": overlayOpacity, "showResults": showResults, "mapNode": mapNode}
        return self._runJob(seriesNode, series, protocol, mask, roi, settings, inBackground=not waitForCompletion,
                            progressCallback=progressCallback, completedCallback=completedCallback,
                            logCallback=logCallback)

    def _resultsToNodes(self, seriesNode, series, maps, signals, info, roi, settings):
        """Map volumes (colour tables, units), the ROI statistics table and predicted signals: the same for
        an in-process and a background run."""
        from perfusionai.dr import pipeline

        attributes = {"Source": seriesNode.GetName()}
        if settings["mode"] == "Predict":
            prefix = f"DR predicted ({info.get('algorithm', '')} {info.get('strategy', '')})"
            attributes.update({"Model": settings["modelPath"], "Algorithm": info.get("algorithm"),
                               "Strategy": info.get("strategy")})
            if info.get("trained_on_phantoms"):
                attributes["ModelNote"] = "trained on phantoms"
            overlayName = OVERLAY_MAP["predict"]
        else:
            prefix = f"DR {settings['model']}"
            attributes.update({"Model": settings["model"], "NoiseSigma": settings["noiseSigma"]})
            overlayName = OVERLAY_MAP[settings["model"]]
        if roi is not None:
            region, roiName = roi
        else:
            region, roiName = pipeline.fitted_region(maps), "fitted voxels"
        mapNodes = {}
        for name, values in maps.items():
            node = mrml.volume_node_from_array(values, series.geometry, f"{prefix} {name}",
                                               node=settings.get("mapNode") if name == overlayName else None)
            mrml.show_map(node, name)
            mrml.set_attributes(node, dict(attributes, Map=name, Units=drmodels.MAP_UNITS.get(name, "")))
            mapNodes[name] = node
        table = mrml.table_node_from_rows(pipeline.roi_statistics(maps, region, roiName), f"{prefix} statistics")
        signalsNode = None
        if signals is not None:
            advanced = info["advanced_protocol"]
            signalsNode, _browser = mrml.sequence_node_from_series(signals, series.geometry,
                                                                   list(range(len(advanced["bvals"]))),
                                                                   f"{prefix} signals", index_unit="")
            mrml.set_attributes(signalsNode, {"bvals": " ".join(f"{b:g}" for b in advanced["bvals"]),
                                              "tes": " ".join(f"{t:g}" for t in advanced["tes"])})
        if settings["showResults"] and overlayName in mapNodes:
            background = mrml.frame_volume_node(seriesNode, 0, f"{seriesNode.GetName()} b0", series=series)
            mrml.show_overlay(background, mapNodes[overlayName], opacity=settings["overlayOpacity"])
        created = list(mapNodes.values()) + [table, signalsNode]
        mrml.group_results(created, seriesNode, f"{prefix} results")
        mrml.record_provenance(created, {k: v for k, v in settings.items() if k not in ("showResults", "mapNode")})
        return {"maps": mapNodes, "table": table, "signals": signalsNode}

    def _runJob(self, seriesNode, series, protocol, mask, roi, settings, inBackground, progressCallback=None,
                completedCallback=None, logCallback=None):
        """The diffusion-relaxation bridge: the series, protocol and mask to files, ``DRFitJob`` /
        ``DRPredictJob`` run here or in the background (``perfusionai dr fit|predict``), the output folder
        read back into nodes the same way for both routes."""
        from perfusionai.dr.jobs import DRFitJob, DRPredictJob
        from perfusionai.io import write_series, write_volume

        workDir = self._run.newWorkDir()
        inputs = os.path.join(workDir, "inputs")
        os.makedirs(inputs, exist_ok=True)
        dwi = str(write_series(series.array, series.geometry, os.path.join(inputs, "dwi.nii.gz")))
        bvals = os.path.join(inputs, "bvals")
        with open(bvals, "w") as handle:
            handle.write(" ".join(f"{b:g}" for b in protocol.bvals) + "\n")
        tes = None
        if getattr(protocol, "tes", None) is not None:
            tes = os.path.join(inputs, "tes")
            with open(tes, "w") as handle:
                handle.write(" ".join(f"{t:g}" for t in protocol.tes) + "\n")
        maskPath = str(write_volume(mask.astype("uint8"), series.geometry, os.path.join(inputs, "mask.nii.gz"))) \
            if mask is not None else None
        outDir = os.path.join(workDir, "out")
        if settings["mode"] == "Predict":
            job = DRPredictJob(dwi=dwi, bvals=bvals, model=str(settings["modelPath"]), out=outDir, tes=tes,
                               mask=maskPath)
        else:
            job = DRFitJob(dwi=dwi, bvals=bvals, out=outDir, tes=tes, mask=maskPath, model=settings["model"],
                           noise_sigma=settings["noiseSigma"])
        settings = dict(settings, job=job.to_json())

        def readOutputs():
            maps, signals, info = slicer_support.read_dr_outputs(outDir)
            return self._resultsToNodes(seriesNode, series, maps, signals, info, roi, settings)

        return self._run.runJob(job, readOutputs, inBackground=inBackground, progressCallback=progressCallback,
                                completedCallback=completedCallback, logCallback=logCallback,
                                cpuOnly=settings["mode"] != "Predict")


#
# DiffusionRelaxationTest
#


class DiffusionRelaxationTest(ScriptedLoadableModuleTest):
    """Runs the Logic on the phantom built in the scene and checks the maps against its truth."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # A clean Slicer lacks some packages: install them through the module's own path (in
        # testing mode Slicer confirms by itself), or skip naming them.
        if not self._dependencies():
            return
        self.setUp()
        self.test_DiffusionRelaxation_BackgroundProcess()
        self.setUp()
        self.test_DiffusionRelaxation_FitAdvanced()
        self.setUp()
        self.test_DiffusionRelaxation_FitClinicalWithFiles()
        self.setUp()
        self.test_DiffusionRelaxation_FitDWIVolume()
        self.setUp()
        self.test_DiffusionRelaxation_Predict()

    def _dependencies(self) -> bool:
        reason = []
        try:
            if DiffusionRelaxationLogic().ensureDependencies():
                return True
        except PerfusionAIError as exc:
            logging.error(str(exc))
            reason = [str(exc)]
        self.delayDisplay(_("DiffusionRelaxation self-test SKIPPED: needs {packages}").format(
            packages=", ".join(reason + slicer_support.missing_requirements(moduleRequirements(__file__)))))
        return False

    def test_DiffusionRelaxation_BackgroundProcess(self):
        """``perfusionai dr fit`` in a background process gives the maps of the in-process fit."""
        scene = loadDRPhantom(shape=(2, 12, 12), snr=None)
        phantom = scene["phantom"]
        logic = DiffusionRelaxationLogic()
        outcomes, seen = [], []
        logic.process(scene["series"], mode="Fit", model="clinical", maskNode=scene["body"], waitForCompletion=False,
                      progressCallback=lambda f, m: seen.append(f), completedCallback=outcomes.append)
        while logic.isRunning:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(len(outcomes), 1, "the completion callback runs once")
        self.assertNotIn("error", outcomes[0], outcomes[0].get("error"))
        inProcess = logic.process(scene["series"], mode="Fit", model="clinical", maskNode=scene["body"])
        for name in drmodels.CLINICAL_MAPS:
            background, _g = mrml.array_from_volume_node(outcomes[0]["nodes"]["maps"][name])
            here, _g = mrml.array_from_volume_node(inProcess["maps"][name])
            self.assertTrue(abs(background[phantom.body] - here[phantom.body]).max() < 1e-4, name)
        self.delayDisplay("Background-process fit matches the in-process fit")

    def _assertRecovers(self, node, truth, region, tolerance):
        from perfusionai.metrics import bias_dispersion_index

        values, geometry = mrml.array_from_volume_node(node)
        bi, di = bias_dispersion_index(values[region], truth[region])
        self.assertLessEqual(abs(bi), tolerance, node.GetName())
        self.assertLessEqual(di, tolerance, node.GetName())

    def test_DiffusionRelaxation_FitAdvanced(self):
        self.delayDisplay("Building the noise-free diffusion-relaxation phantom")
        scene = loadDRPhantom(shape=(2, 20, 20), snr=None)
        phantom = scene["phantom"]
        logic = DiffusionRelaxationLogic()
        nodes = logic.process(scene["series"], mode="Fit", model="t2ivimkurtosis", maskNode=scene["body"],
                              roiNode=scene["tumour"])
        for name in drmodels.ADVANCED_MAPS:
            self._assertRecovers(nodes["maps"][name], phantom.truth[name], phantom.body, 1e-3)
        self.assertEqual(nodes["table"].GetNumberOfRows(), len(drmodels.ADVANCED_MAPS))
        self.assertEqual(nodes["maps"]["dt"].GetAttribute("PerfusionAI.Units"), "um2/ms")
        self.delayDisplay("T2-IVIM-Kurtosis maps match the phantom truth")

    def test_DiffusionRelaxation_FitClinicalWithFiles(self):
        scene = loadDRPhantom(shape=(2, 16, 16), snr=None)
        phantom = scene["phantom"]
        folder = workDirectory("DiffusionRelaxationTest")
        bvalsPath = os.path.join(folder, "bvals")
        with open(bvalsPath, "w") as handle:
            handle.write(" ".join(f"{b:g}" for b in phantom.protocol.bvals))
        tesPath = os.path.join(folder, "tes")
        with open(tesPath, "w") as handle:
            handle.write(" ".join(f"{t:g}" for t in phantom.protocol.tes))
        logic = DiffusionRelaxationLogic()
        nodes = logic.process(scene["series"], mode="Fit", model="clinical", bvalsPath=bvalsPath, tesPath=tesPath,
                              maskNode=scene["body"])
        self.assertEqual(sorted(nodes["maps"]), sorted(drmodels.CLINICAL_MAPS))
        self.assertEqual(nodes["table"].GetNumberOfRows(), len(drmodels.CLINICAL_MAPS))
        with self.assertRaises(PerfusionAIError):
            logic.process(scene["series"], mode="Fit", model="t2ivimkurtosis", bvalsPath=bvalsPath,
                          tesPath=bvalsPath)  # b-values given as echo times: 0 ms is refused
        self.delayDisplay("Clinical maps from b-value files")

    def test_DiffusionRelaxation_FitDWIVolume(self):
        """A DWI volume node (what Slicer makes of a DWI NRRD file): b-values from the node, TEs from an attribute."""
        from perfusionai.phantoms.dr import make_dr_phantom

        phantom = make_dr_phantom(shape=(2, 16, 16), snr=None, seed=3)
        dwi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", "DRPhantom DWI")
        slicer.util.updateVolumeFromArray(dwi, phantom.dwi.astype("float32"))
        mrml.set_node_geometry(dwi, phantom.geometry)
        dwi.SetNumberOfGradients(phantom.protocol.n)
        for index, bValue in enumerate(phantom.protocol.bvals):
            dwi.SetBValue(index, float(bValue))
        dwi.SetAttribute("PerfusionAI.tes", " ".join(f"{t:g}" for t in phantom.protocol.tes))
        body = mrml.volume_node_from_array(phantom.body, phantom.geometry, "DRPhantom body", label=True)
        nodes = DiffusionRelaxationLogic().process(dwi, mode="Fit", model="t2ivimkurtosis", maskNode=body)
        for name in drmodels.ADVANCED_MAPS:
            self._assertRecovers(nodes["maps"][name], phantom.truth[name], phantom.body, 1e-3)
        self.delayDisplay("T2-IVIM-Kurtosis maps from a DWI volume match the phantom truth")

    def test_DiffusionRelaxation_Predict(self):
        from perfusionai.dr import learners
        from perfusionai.phantoms.dr import make_dr_cohort

        cohort = make_dr_cohort(3, shape=(2, 20, 20), snr=60.0, seed=2)
        patients = [learners.patient_features(p.dwi, p.protocol, p.tumour, p.name) for p in cohort]
        trained = learners.train(patients, "lr", "signal-to-signal", trained_on_phantoms=True)
        modelPath = os.path.join(workDirectory("DiffusionRelaxationModel"), "model")
        learners.save_model(trained, modelPath)
        scene = loadDRPhantom(shape=(2, 20, 20), snr=60.0, seed=9)
        logic = DiffusionRelaxationLogic()
        nodes = logic.process(scene["series"], mode="Predict", modelPath=modelPath, maskNode=scene["tumour"])
        self.assertEqual(sorted(nodes["maps"]), sorted(drmodels.ADVANCED_MAPS))
        self.assertEqual(nodes["maps"]["k"].GetAttribute("PerfusionAI.ModelNote"), "trained on phantoms")
        self.assertIsNotNone(nodes["signals"])
        self.delayDisplay("Advanced maps predicted from the clinical volumes (model trained on phantoms)")
