"""DSCDeconvolution: CBV, CBF, MTT, Tmax and TTP maps from a 4D DSC-MRI series in 3D Slicer.

The module binds widgets and calls the Logic; the Logic writes the input nodes to files with
``perfusionai.mrml`` / ``slicer_support``, builds the job (``perfusionai.dsc.job.DSCMapsJob``), runs it
in-process (``job.run()``) or as ``PythonSlicer -m perfusionai dsc maps`` in a background process,
and reads the output folder back into nodes the same way for both. All numerics live in
the ``perfusionai`` package, which the extension installs next to this file.
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
from perfusionai.dsc import methods as dsc_methods  # noqa: E402
from perfusionai.dsc.maps import CBV_WINDOWS, INTEGRATIONS  # noqa: E402
from perfusionai.errors import PerfusionAIError  # noqa: E402
from PerfusionAISlicerLib import (  # noqa: E402
    BackgroundRun,
    documentationLink,
    RunPanel,
    addFolderBrowseButton,
    computeDevice,
    ensureDependencies,
    moduleRequirements,
)

#: The methods of the DSC registry (perfusionai.dsc.methods), by their canonical names.
METHOD_CHOICES = list(dsc_methods.METHODS)
AIF_MODES = ["Automatic", "Region"]
DEVICES = ["auto", "cpu", "cuda"]
#: ``DSCMapsJob`` fields that the Logic's ``process`` accepts in ``peerOptions`` (issue 15's peer features,
#: all in the panel's parameter node) ...
PEER_OPTIONS = ("parametric_shape", "parametric_dispersion_s", "aif_gamma_fit", "fwhm_map", "te2",
                "leakage_max_k2_cv", "save_residue", "auto_mask", "motion_correction", "aif_quadratic",
                "cbv_window", "cbv_integration", "refine_tmax")
#: ... and those accepted from Python only (not in the panel).
SCRIPT_OPTIONS = ("baseline_frames",)


#
# DSCDeconvolution
#


class DSCDeconvolution(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DSC Deconvolution")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Perfusion")]
        self.parent.dependencies = []
        self.parent.contributors = ["PerfusionAI team"]
        self.parent.helpText = _("""
Perfusion maps from a dynamic susceptibility contrast (DSC) MRI series: CBV [mL/100 g],
CBF [mL/100 g/min], MTT [s], Tmax [s] and TTP [s] by deconvolution (sSVD, cSVD, oSVD, Tikhonov),
the model-based delay-aware parametric fit, or learned methods (PHAE, tmax-net; trained on phantoms).
Select the 4D series (sequence or MultiVolume), the AIF (automatic or a drawn region), optionally a
brain mask, then Apply. "Advanced / peer options" adds FWHM, K2 CV, residue and regularisation maps,
a gamma-variate AIF fit, dual echo, an automatic brain mask, motion correction, a quadratic AIF and
the CBV window / integration.
""")
        self.parent.helpText += documentationLink()
        self.parent.acknowledgementText = _("""
Built on the PerfusionAI library. Deconvolution after Ostergaard et al. 1996 and Wu et al. 2003.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: the DSC phantom, generated on the fly (no download)
#


#: The files of the DSC phantom sample as ``SampleData.downloadSample("DSCPhantom")`` loads them.
DSC_PHANTOM_FILES = (("DSCPhantom.seq.nrrd", "DSCPhantom", "SequenceFile"),
                     ("DSCPhantom-brain.seg.nrrd", "DSCPhantom brain", "SegmentationFile"),
                     ("DSCPhantom-arteries.seg.nrrd", "DSCPhantom arteries", "SegmentationFile"))


def registerSampleData():
    """Add the DSC phantom to the Sample Data module: built in the scene by the Sample Data button,
    written once to files and loaded by SampleData's own path from a script
    (``SampleData.downloadSample("DSCPhantom")`` returns the 4D sequence)."""
    from PerfusionAISlicerLib import registerGeneratedSample

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    registerGeneratedSample("PerfusionAI", "DSCPhantom", os.path.join(iconsPath, "DSCDeconvolution.png"),
                            DSC_PHANTOM_FILES, writeDSCPhantomFiles, customDownloader=loadDSCPhantom)


def writeDSCPhantomFiles(folder):
    """Write the default DSC phantom as the files of :data:`DSC_PHANTOM_FILES` into ``folder``."""
    from PerfusionAISlicerLib import writeNodeFile
    from perfusionai.labels import LabelInfo

    built = loadDSCPhantom(show=False)
    phantom = built["phantom"]
    created = [built["series"], built["browser"], built["brainMask"], built["aifMask"]]
    proxy = built["browser"].GetProxyNode(built["series"]) if built["browser"] is not None else None
    created.append(proxy)
    try:
        writeNodeFile(built["series"], os.path.join(folder, DSC_PHANTOM_FILES[0][0]),
                      "vtkMRMLVolumeSequenceStorageNode")
        for (fileName, nodeName, _type), mask, color in ((DSC_PHANTOM_FILES[1], phantom.brain_mask, (0.9, 0.8, 0.5)),
                                                       (DSC_PHANTOM_FILES[2], phantom.aif_mask, (0.85, 0.1, 0.1))):
            segment = nodeName.split(" ", 1)[1]
            segmentation = mrml.segmentation_node_from_labels(
                (mask > 0).astype("uint8"), phantom.geometry, {1: LabelInfo(segment, segment, color)}, nodeName)
            created.append(segmentation)
            writeNodeFile(segmentation, os.path.join(folder, fileName), "vtkMRMLSegmentationStorageNode")
    finally:
        for node in created:
            if node is not None and node.GetScene() is not None:
                slicer.mrmlScene.RemoveNode(node)


def loadDSCPhantom(source=None, show=True, **phantomOptions):
    """Build the DSC phantom in the scene: a 4D sequence, its brain mask and its arterial voxels.

    ``source`` is the Sample Data entry (unused); ``phantomOptions`` go to
    ``perfusionai.phantoms.dsc.make_dsc_phantom`` (default: 8x32x32 voxels, 50 frames, SNR 80,
    with a lesion and a tumour). Returns ``{"series": sequence node, "browser": browser node,
    "brainMask": label map, "aifMask": label map, "phantom": DSCPhantom with the truth maps}``.
    """
    from perfusionai.phantoms.dsc import make_dsc_phantom

    options = {"shape": (8, 32, 32), "n_frames": 50, "snr": 80.0, "seed": 1}
    options.update(phantomOptions)
    phantom = make_dsc_phantom(**options)
    sequence, browser = mrml.sequence_node_from_series(phantom.signal, phantom.geometry, phantom.times,
                                                       "DSCPhantom")
    mrml.set_attributes(sequence, {"EchoTime_s": phantom.te, "Note": "digital phantom with known truth"})
    brain = mrml.volume_node_from_array(phantom.brain_mask, phantom.geometry, "DSCPhantom brain", label=True)
    aif = mrml.volume_node_from_array(phantom.aif_mask, phantom.geometry, "DSCPhantom arteries", label=True)
    proxy = browser.GetProxyNode(sequence)
    if proxy is not None and show:
        slicer.util.setSliceViewerLayers(background=proxy, fit=slicer.app.layoutManager() is not None)
    return {"series": sequence, "browser": browser, "brainMask": brain, "aifMask": aif, "phantom": phantom}


#
# DSCDeconvolutionParameterNode
#


@parameterNodeWrapper
class DSCDeconvolutionParameterNode:
    """The module's settings, saved with the scene.

    inputSeries - the 4D DSC series (sequence of volumes, or MultiVolume / sequence proxy volume).
    aifMode - "Automatic" AIF selection or the drawn "Region".
    aifRegion, aifSegmentId - arterial region (segmentation + segment, or label map).
    brainMask, brainMaskSegmentId - optional mask (maps are computed inside it).
    method - deconvolution or learned method.
    echoTime - TE in s (0: from the series). frameInterval - TR in s (0: from the series).
    svdThreshold - sSVD/cSVD truncation relative to the largest singular value (0: method default).
    kh, rho - haematocrit factor and brain density.
    leakageCorrection - Boxerman-Schmainda-Weisskoff correction.
    modelPath - model folder/zip for PHAE / tmax-net. trainPhaeOnSeries - train PHAE on this series first.
    runInBackground - run in a background process (GUI stays responsive, Cancel works).
    overlayOpacity - opacity of the CBF overlay.
    device - learned methods: auto (the GPU when found, else the CPU), cpu or cuda.
    outputCbf - the volume that receives the CBF map (overwritten); none: a new volume per run.

    Peer options (issue 15; each is a ``DSCMapsJob`` field, 0 meaning "not set" for the numbers):
    parametricShape - parametric method: fixed gamma shape of the residue (0: fitted).
    parametricDispersion - parametric method: exponential dispersion of the input in s.
    aifGammaFit - replace the AIF by a gamma-variate fit of its first pass (recirculation removed).
    fwhmMap - also an FWHM map [s] of each concentration curve.
    secondEcho, echoTime2 - dual echo: the second echo's series and its TE in s (0: from the node);
        delta R2* extrapolated to TE = 0.
    leakageMaxK2Cv - with leakage correction: correct only where K2's coefficient of variation is at
        most this (0: everywhere); adds the K2 CV map.
    saveResidue - also the residue (a sequence, one volume per lag), regularisation and oscillation-index maps.
    autoMask - without a brain mask: an automatic head mask (returned as a label map).
    motionCorrection - rigid frame-to-frame motion correction (ANTsPy).
    aifQuadraticA, aifQuadraticB - arterial delta R2* = A C + B C^2 (A > 0 turns it on; 1/(s mM), 1/(s mM^2)).
    cbvWindow - CBV integration window: full or first_pass. cbvIntegration - trapezoid or sum.
    refineTmax - parabolic sub-sample Tmax.
    """

    # Node unions name None: Slicer's parameterNodeWrapper writes None into a fresh node.
    inputSeries: Union[vtkMRMLSequenceNode, vtkMRMLScalarVolumeNode, None]
    aifMode: Annotated[str, Choice(AIF_MODES)] = "Automatic"
    aifRegion: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    aifSegmentId: str = ""
    brainMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    brainMaskSegmentId: str = ""
    method: Annotated[str, Choice(METHOD_CHOICES)] = "oSVD"
    echoTime: Annotated[float, WithinRange(0.0, 0.5)] = 0.0
    frameInterval: Annotated[float, WithinRange(0.0, 60.0)] = 0.0
    svdThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    kh: Annotated[float, WithinRange(0.1, 2.0)] = 0.73
    rho: Annotated[float, WithinRange(0.5, 2.0)] = 1.04
    leakageCorrection: bool = False
    # Text, not pathlib.Path: an empty Path reads "." (the path widget is synced in the widget).
    modelPath: str = ""
    trainPhaeOnSeries: bool = False
    runInBackground: bool = True
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    device: Annotated[str, Choice(DEVICES)] = "auto"
    outputCbf: Optional[vtkMRMLScalarVolumeNode]
    parametricShape: Annotated[float, WithinRange(0.0, 50.0)] = 0.0
    parametricDispersion: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
    aifGammaFit: bool = False
    fwhmMap: bool = False
    secondEcho: Union[vtkMRMLSequenceNode, vtkMRMLScalarVolumeNode, None]
    echoTime2: Annotated[float, WithinRange(0.0, 0.5)] = 0.0
    leakageMaxK2Cv: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    saveResidue: bool = False
    autoMask: bool = False
    motionCorrection: bool = False
    aifQuadraticA: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    aifQuadraticB: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    cbvWindow: Annotated[str, Choice(list(CBV_WINDOWS))] = "full"
    cbvIntegration: Annotated[str, Choice(list(INTEGRATIONS))] = "trapezoid"
    refineTmax: bool = False


#
# DSCDeconvolutionWidget
#


class DSCDeconvolutionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._syncingSegments = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DSCDeconvolution.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DSCDeconvolutionLogic()
        self.runPanel = RunPanel(self.ui, self.layout, _("Computing the DSC maps"), cancel=self.logic.cancel,
                                 refresh=self._updateGui)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.aifSegmentSelector.connect("currentSegmentChanged(QString)", self.onAifSegmentChanged)
        self.ui.brainMaskSegmentSelector.connect("currentSegmentChanged(QString)", self.onBrainMaskSegmentChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        addFolderBrowseButton(self.ui.modelPathLineEdit, _("PHAE / tmax-net model folder"))
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

    def setParameterNode(self, inputParameterNode: Optional[DSCDeconvolutionParameterNode]) -> None:
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
        regionMode = p.aifMode == "Region"
        self.ui.aifRegionSelector.setVisible(regionMode)
        self.ui.aifRegionLabel.setVisible(regionMode)
        aifIsSegmentation = regionMode and p.aifRegion is not None and p.aifRegion.IsA("vtkMRMLSegmentationNode")
        maskIsSegmentation = p.brainMask is not None and p.brainMask.IsA("vtkMRMLSegmentationNode")
        self.ui.aifSegmentSelector.setVisible(aifIsSegmentation)
        self.ui.brainMaskSegmentSelector.setVisible(maskIsSegmentation)
        # The segment selectors and the path field are not bound by connectGui (segment lists are
        # dynamic; an empty Path would show "."); syncing them must not write back while updating.
        self._syncingSegments = True
        try:
            if aifIsSegmentation:
                self.ui.aifSegmentSelector.setCurrentNode(p.aifRegion)
                if p.aifSegmentId:
                    self.ui.aifSegmentSelector.setCurrentSegmentID(p.aifSegmentId)
            if maskIsSegmentation:
                self.ui.brainMaskSegmentSelector.setCurrentNode(p.brainMask)
                if p.brainMaskSegmentId:
                    self.ui.brainMaskSegmentSelector.setCurrentSegmentID(p.brainMaskSegmentId)
            if self.ui.modelPathLineEdit.currentPath != p.modelPath:
                self.ui.modelPathLineEdit.currentPath = p.modelPath
        finally:
            self._syncingSegments = False

        method = dsc_methods.resolve_method(p.method)
        learned = method.learned
        self.ui.modelPathLineEdit.enabled = learned and not p.trainPhaeOnSeries
        self.ui.trainPhaeCheckBox.enabled = method.name == "phae"
        self.ui.learnedNoteLabel.setVisible(learned)
        self.ui.deviceComboBox.enabled = learned
        self.ui.svdThresholdSpinBox.enabled = method.applies("threshold")
        parametric = method.name == "parametric"
        self.ui.parametricShapeSpinBox.enabled = parametric
        self.ui.parametricDispersionSpinBox.enabled = parametric
        self.ui.leakageMaxK2CvSpinBox.enabled = p.leakageCorrection
        self.ui.autoMaskCheckBox.enabled = p.brainMask is None
        self.ui.echoTime2SpinBox.enabled = p.secondEcho is not None
        self.ui.aifQuadraticBSpinBox.enabled = p.aifQuadraticA > 0

        running = self.logic.isRunning or self.runPanel.running
        ready = p.inputSeries is not None and (not regionMode or p.aifRegion is not None)
        self.ui.applyButton.enabled = ready and not running
        self.ui.applyButton.toolTip = _("Compute the perfusion maps") if ready else _("Select the 4D DSC series "
                                                                                       "(and the AIF region)")

    def onAifSegmentChanged(self, segmentId) -> None:
        if self._parameterNode and not self._syncingSegments:
            self._parameterNode.aifSegmentId = segmentId or ""

    def onBrainMaskSegmentChanged(self, segmentId) -> None:
        if self._parameterNode and not self._syncingSegments:
            self._parameterNode.brainMaskSegmentId = segmentId or ""

    def onModelPathChanged(self, path) -> None:
        if self._parameterNode and not self._syncingSegments:
            self._parameterNode.modelPath = path or ""

    def onApplyButton(self) -> None:
        p = self._parameterNode
        self.runPanel.run(
            lambda: self.logic.ensureDependencies(p.method),
            lambda progress, log, completed: self.logic.processWithParameterNode(
                p, waitForCompletion=not p.runInBackground, progressCallback=progress, logCallback=log,
                completedCallback=completed),
            self.showResults, background=p.runInBackground)

    def showResults(self, nodes) -> str:
        self.ui.resultsTableView.setMRMLTableNode(nodes["table"])
        return _("Done: maps, curves and medians added to the scene.")


#
# DSCDeconvolutionLogic
#


class DSCDeconvolutionLogic(ScriptedLoadableModuleLogic):
    """Nodes in, perfusionai core, nodes out. Usable without the GUI (see the README)::

        logic = DSCDeconvolution.DSCDeconvolutionLogic()
        results = logic.process(getNode("DSCPhantom"), te=0.03, method="oSVD")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._run = BackgroundRun("DSCDeconvolution")

    def getParameterNode(self):
        return DSCDeconvolutionParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._run.isRunning

    # -- dependencies -------------------------------------------------------------------

    def ensureDependencies(self, method) -> bool:
        """Install what ``method`` needs (one confirmation; torch through the PyTorch extension).

        Returns False when the user declined.
        """
        learned = dsc_methods.is_learned(method)
        return ensureDependencies(_("DSC Deconvolution"), moduleRequirements(__file__, ["learned"] if learned else []),
                                  torchNeededBy=_("The learned methods (PHAE, tmax-net)") if learned else None)

    # -- processing ---------------------------------------------------------------------

    def processWithParameterNode(self, p, waitForCompletion=True, progressCallback=None, completedCallback=None,
                                 logCallback=None):
        """Run :meth:`process` with the settings stored in a parameter node."""
        model = slicer_support.path_or_none(p.modelPath)
        return self.process(
            p.inputSeries,
            te=p.echoTime or None,
            tr=p.frameInterval or None,
            aifNode=p.aifRegion if p.aifMode == "Region" else None,
            aifSegmentId=p.aifSegmentId or None,
            maskNode=p.brainMask,
            maskSegmentId=p.brainMaskSegmentId or None,
            method=p.method,
            threshold=p.svdThreshold or None,
            kh=p.kh,
            rho=p.rho,
            leakageCorrection=p.leakageCorrection,
            modelPath=None if (p.trainPhaeOnSeries and dsc_methods.resolve_method(p.method).name == "phae") else model,
            overlayOpacity=p.overlayOpacity,
            device=p.device,
            cbfNode=p.outputCbf,
            secondEchoNode=p.secondEcho,
            peerOptions=self.peerOptions(p),
            waitForCompletion=waitForCompletion,
            progressCallback=progressCallback,
            completedCallback=completedCallback,
            logCallback=logCallback,
        )

    @staticmethod
    def peerOptions(p) -> dict:
        """The ``DSCMapsJob`` fields of a parameter node's peer options (0 = not set for the numbers)."""
        return {
            "parametric_shape": p.parametricShape or None,
            "parametric_dispersion_s": float(p.parametricDispersion),
            "aif_gamma_fit": bool(p.aifGammaFit),
            "fwhm_map": bool(p.fwhmMap),
            "te2": (p.echoTime2 or None) if p.secondEcho is not None else None,
            "leakage_max_k2_cv": (p.leakageMaxK2Cv or None) if p.leakageCorrection else None,
            "save_residue": bool(p.saveResidue),
            "auto_mask": bool(p.autoMask) and p.brainMask is None,
            "motion_correction": bool(p.motionCorrection),
            "aif_quadratic": (float(p.aifQuadraticA), float(p.aifQuadraticB)) if p.aifQuadraticA > 0 else None,
            "cbv_window": p.cbvWindow,
            "cbv_integration": p.cbvIntegration,
            "refine_tmax": bool(p.refineTmax),
        }

    def process(self, seriesNode, te=None, tr=None, aifNode=None, aifSegmentId=None, maskNode=None,
                maskSegmentId=None, method="oSVD", threshold=None, kh=0.73, rho=1.04, leakageCorrection=False,
                modelPath=None, overlayOpacity=0.6, showResults=True, waitForCompletion=True,
                progressCallback=None, completedCallback=None, logCallback=None, device="auto",
                cbfNode=None, secondEchoNode=None, peerOptions=None):
        """Compute DSC maps from scene nodes and add the results to the scene.

        :param seriesNode: sequence node of volumes, or MultiVolume node.
        :param te: echo time in seconds (None: from the series).
        :param tr: frame interval in seconds (None: from the series).
        :param aifNode: segmentation or label map of arterial voxels; None selects the AIF automatically.
        :param maskNode: optional brain mask (segmentation or label map).
        :param method: a method of ``perfusionai.dsc.methods.METHODS`` (sSVD, cSVD, oSVD, Tikhonov,
            parametric, PHAE, tmax-net).
        :param modelPath: model for PHAE / tmax-net; PHAE without a model is trained on this series first.
        :param device: learned methods: "auto" (the GPU when one is found, else the CPU), "cpu" or "cuda".
        :param cbfNode: an existing scalar volume that receives the CBF map (overwritten); None: a new one.
        :param secondEchoNode: dual echo: the second echo (sequence or MultiVolume on the same grid).
        :param peerOptions: ``{DSCMapsJob field: value}`` for the fields in :data:`PEER_OPTIONS` and
            :data:`SCRIPT_OPTIONS`
            (e.g. ``{"fwhm_map": True, "save_residue": True, "auto_mask": True}``); extra output maps
            (fwhm, k2_cv, fit_r2, converged, regularisation, oscillation_index) come back as volume
            nodes with units, the residue as a sequence node, an automatic mask as a label map.
        :param waitForCompletion: True computes in this process and returns the result nodes;
            False starts a background process, returns None and calls ``completedCallback(outcome)``.
        :return: ``{"maps": {name: volume node}, "series": {name: sequence node}, "table", "chart", "plot",
            "background", "autoMask": label map or None}`` when waiting.
        """
        if self.isRunning:
            raise PerfusionAIError(_("A DSC computation is already running; cancel it first."))
        peer = dict(peerOptions or {})
        unknown = sorted(set(peer) - set(PEER_OPTIONS) - set(SCRIPT_OPTIONS))
        if unknown:
            raise PerfusionAIError(_("Unknown DSC peer options: {names}").format(names=", ".join(unknown)))
        inputs = mrml.dsc_inputs_from_nodes(seriesNode, te=te, tr=tr, aif_node=aifNode, aif_segment_id=aifSegmentId,
                                            mask_node=maskNode, mask_segment_id=maskSegmentId)
        echo2 = None
        if secondEchoNode is not None:
            echo2, peer["te2"] = mrml.dsc_second_echo_from_node(secondEchoNode, inputs.series, te2=peer.get("te2"),
                                                                tr=tr)
        elif peer.get("te2") is not None:
            raise PerfusionAIError(_("TE2 needs the second echo series."))
        key = dsc_methods.resolve_method(method).name
        settings = {"method": key, "te": inputs.te, "threshold": threshold, "kh": kh, "rho": rho,
                    "leakageCorrection": leakageCorrection, "modelPath": modelPath,
                    "overlayOpacity": overlayOpacity, "showResults": showResults, "device": device,
                    "cbfNode": cbfNode, "echo2": echo2, "peer": peer}
        if key == "tmax-net" and not modelPath:
            raise PerfusionAIError(_("tmax-net needs a model file; choose one or use PHAE."))
        return self._runJob(seriesNode, inputs, settings, inBackground=not waitForCompletion,
                            progressCallback=progressCallback, completedCallback=completedCallback,
                            logCallback=logCallback)

    def _attributes(self, settings):
        attributes = {"Method": settings["method"], "EchoTime_s": settings["te"], "kh": settings["kh"],
                      "rho": settings["rho"], "LeakageCorrection": settings["leakageCorrection"]}
        if dsc_methods.is_learned(settings["method"]):
            attributes["Model"] = settings["modelPath"] or "PHAE trained on this series"
            attributes["ModelNote"] = slicer_support.model_note(settings["modelPath"])
        return attributes

    def _outputToNodes(self, seriesNode, output, inputs, settings):
        """The result nodes of a run, the same for the in-process and the background route; every
        node records the perfusionai version and all options."""
        prefix = f"DSC {settings['method']}"
        nodes = mrml.dsc_output_to_nodes(output, seriesNode, prefix=prefix,
                                         show=settings["showResults"], opacity=settings["overlayOpacity"],
                                         attributes=self._attributes(settings), series=inputs.series,
                                         reuse={"cbf": settings.get("cbfNode")},
                                         mask=output.auto_mask)
        recorded = list(nodes["maps"].values()) + list(nodes["series"].values()) + [nodes["table"], nodes["chart"]]
        mrml.record_provenance(recorded + ([nodes["autoMask"]] if nodes["autoMask"] is not None else []),
                               {k: v for k, v in settings.items() if k not in ("showResults", "cbfNode", "echo2")})
        return nodes

    @staticmethod
    def _device(settings, logCallback):
        """The device of a learned method (GPU detected, CPU fallback said in the log); "cpu" otherwise."""
        if not dsc_methods.is_learned(settings["method"]):
            return "cpu"
        device, message = computeDevice(settings.get("device", "auto"))
        if logCallback is not None:
            logCallback(message)
        return device

    def _runJob(self, seriesNode, inputs, settings, inBackground, progressCallback=None, completedCallback=None,
                logCallback=None):
        """The DSC bridge: the nodes' arrays to files, ``DSCMapsJob`` (``dsc maps``) run here or in the
        background, its output folder read back into nodes the same way for both routes."""
        from perfusionai.dsc.job import DSCMapsJob

        workDir = self._run.newWorkDir()
        files = slicer_support.write_dsc_inputs(os.path.join(workDir, "inputs"), inputs.series.array,
                                                inputs.series.geometry, inputs.times, mask=inputs.mask,
                                                aif_mask=inputs.aif_mask)
        echo2File = None
        if settings.get("echo2") is not None:
            echo2File = slicer_support.write_dsc_inputs(os.path.join(workDir, "echo2"), settings["echo2"],
                                                        inputs.series.geometry, inputs.times).series
        outDir = os.path.join(workDir, "maps")
        job = DSCMapsJob(dsc=str(files.series), out=outDir, te=float(settings["te"]), tr=float(files.tr),
                         aif_mask=str(files.aif_mask) if files.aif_mask is not None else None,
                         aif_auto=files.aif_mask is None, mask=str(files.mask) if files.mask is not None else None,
                         method=settings["method"], threshold=settings["threshold"], kh=float(settings["kh"]),
                         rho=float(settings["rho"]), leakage_correction=bool(settings["leakageCorrection"]),
                         model_path=str(settings["modelPath"]) if settings["modelPath"] else None,
                         device=self._device(settings, logCallback),
                         dsc_echo2=str(echo2File) if echo2File is not None else None,
                         **settings.get("peer", {}))
        settings = dict(settings, job=job.to_json())

        def readOutputs():
            return self._outputToNodes(seriesNode, slicer_support.read_dsc_outputs(outDir), inputs, settings)

        return self._run.runJob(job, readOutputs, inBackground=inBackground, progressCallback=progressCallback,
                                completedCallback=completedCallback, logCallback=logCallback,
                                cpuOnly=not dsc_methods.is_learned(settings["method"]))

    def cancel(self) -> None:
        """Stop a running background computation (the launcher and the Python process it started)."""
        self._run.cancel()


#
# DSCDeconvolutionTest
#


class DSCDeconvolutionTest(ScriptedLoadableModuleTest):
    """Runs the Logic on the DSC phantom built in the scene and checks the maps against its truth."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # A clean Slicer lacks some packages: install them through the module's own path (in
        # testing mode Slicer confirms by itself), or skip naming them.
        if not self._dependencies():
            return
        self.setUp()
        self.test_DSCDeconvolution_InProcess()
        self.setUp()
        self.test_DSCDeconvolution_BackgroundProcess()
        self.setUp()
        self.test_DSCDeconvolution_SampleDataScriptedPath()

    def _dependencies(self) -> bool:
        requirements = moduleRequirements(__file__)
        reason = []
        try:
            if DSCDeconvolutionLogic().ensureDependencies("Tikhonov"):
                return True
        except PerfusionAIError as exc:
            logging.error(str(exc))
            reason = [str(exc)]
        self.delayDisplay(_("DSCDeconvolution self-test SKIPPED: needs {packages}").format(
            packages=", ".join(reason + slicer_support.missing_requirements(requirements))))
        return False

    def _phantom(self):
        # Noise-free and without lesion/tumour: checks the plumbing against exact truth, not the
        # noise behaviour of the solvers (the core's own tests cover that).
        return loadDSCPhantom(shape=(4, 16, 16), n_frames=50, snr=float("inf"), tumour=False, lesion=False)

    def _assertMatchesTruth(self, nodes, phantom, tolerance=0.10):
        tissue = phantom.tissue_mask
        for mapName, truthName in (("cbf", "cbf"), ("cbv", "cbv_discrete")):
            values, geometry = mrml.array_from_volume_node(nodes["maps"][mapName])
            self.assertTrue(geometry.same_grid(phantom.geometry))
            measured = slicer_support.median_inside(values, tissue)
            truth = slicer_support.median_inside(phantom.truth[truthName], tissue)
            self.assertLessEqual(abs(measured - truth), tolerance * truth, f"{mapName}: {measured} vs {truth}")
        self.assertEqual(nodes["table"].GetNumberOfRows(), 5)
        self.assertEqual(nodes["chart"].GetNumberOfPlotSeriesNodes(), 2)

    def test_DSCDeconvolution_InProcess(self):
        self.delayDisplay("Building the DSC phantom")
        scene = self._phantom()
        phantom = scene["phantom"]
        logic = DSCDeconvolutionLogic()
        nodes = logic.process(scene["series"], te=phantom.te, aifNode=scene["aifMask"], maskNode=scene["brainMask"],
                              method="Tikhonov", waitForCompletion=True)
        self._assertMatchesTruth(nodes, phantom)
        self.assertEqual(nodes["maps"]["cbf"].GetAttribute("PerfusionAI.Method"), "Tikhonov")
        self.delayDisplay("In-process DSC maps match the phantom truth")

    def test_DSCDeconvolution_BackgroundProcess(self):
        scene = self._phantom()
        phantom = scene["phantom"]
        logic = DSCDeconvolutionLogic()
        seen = []
        outcomes = []
        logic.process(scene["series"], te=phantom.te, aifNode=scene["aifMask"], maskNode=scene["brainMask"],
                      method="Tikhonov", waitForCompletion=False,
                      progressCallback=lambda f, m: seen.append(f), completedCallback=outcomes.append)
        while logic.isRunning:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(len(outcomes), 1, "the completion callback runs once")
        self.assertNotIn("error", outcomes[0], outcomes[0].get("error"))
        self.assertTrue(seen and seen[-1] == 1.0)
        self._assertMatchesTruth(outcomes[0]["nodes"], phantom)
        self.delayDisplay("Background-process DSC maps match the phantom truth")

    def test_DSCDeconvolution_SampleDataScriptedPath(self):
        """``SampleData.downloadSample("DSCPhantom")`` from a script loads the phantom files (no download)."""
        import SampleData

        registerSampleData()
        series = SampleData.downloadSample("DSCPhantom")
        self.assertTrue(series is not None and series.IsA("vtkMRMLSequenceNode"))
        brain = slicer.util.getNode("DSCPhantom brain")
        arteries = slicer.util.getNode("DSCPhantom arteries")
        nodes = DSCDeconvolutionLogic().process(series, te=0.03, aifNode=arteries, maskNode=brain, method="oSVD")
        self.assertEqual(nodes["table"].GetNumberOfRows(), 5)
        self.delayDisplay("DSC phantom loaded by SampleData.downloadSample and processed")
