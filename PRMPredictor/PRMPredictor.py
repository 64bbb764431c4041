"""PRMPredictor: parametric response mapping (PRM) of the lungs from inspiratory/expiratory CT in 3D Slicer.

The module binds widgets and calls the Logic; the Logic writes the input nodes to files, builds
the job (``perfusionai.prm.jobs.PRMCTJob``), runs it in-process (``job.run()``) or as
``PythonSlicer -m perfusionai prm ct`` in a background process, and reads the output folder
back into nodes the same way for both: the PRM map as a
segmentation with the standard colours over the inspiratory CT, the expiratory CT
registered onto it, a table of %PRM per lung and lobe and the PRM scatter plot.
All numerics live in the ``perfusionai`` package, installed next to this file.
"""

import json
import logging
import os
import shutil
import sys
import time
import types
from typing import Annotated, Optional

import vtk

import qt
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
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode


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
from perfusionai.errors import PerfusionAIError  # noqa: E402
from PerfusionAISlicerLib import (  # noqa: E402
    BackgroundRun,
    documentationLink,
    RunPanel,
    Show3DButton,
    addFolderBrowseButton,
    computeDevice,
    ensureDependencies,
    moduleRequirements,
    workDirectory,
)
from perfusionai.labels import PRM_LABELS  # noqa: E402
from perfusionai.prm.lobes_import import CONVENTIONS  # noqa: E402

LOBE_CONVENTIONS = sorted(CONVENTIONS)
DEVICES = ["auto", "cpu", "cuda"]


#
# PRMPredictor
#


class PRMPredictor(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PRM Predictor")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Perfusion")]
        self.parent.dependencies = []
        self.parent.contributors = ["PerfusionAI team"]
        self.parent.helpText = _("""
Parametric response mapping (Galban et al. 2012) of the lungs from a paired inspiratory and
expiratory chest CT (HU): the expiratory CT is registered onto the inspiratory CT (ANTs rigid,
affine and SyN, lungs masked), every lung voxel is classified as normal (green), functional small
airways disease (yellow), emphysema (red) or uncategorized (white) with the -950 / -856 HU thresholds,
and %PRM is reported per lung and lobe. Select the two CT volumes (and optionally a lobe label map),
then Apply.
""")
        self.parent.helpText += documentationLink()
        self.parent.acknowledgementText = _("""
Built on the PerfusionAI library and ANTsPy. PRM after Galban et al., Nat Med 2012.
""")


#
# PRMPredictorParameterNode
#


@parameterNodeWrapper
class PRMPredictorParameterNode:
    """The module's settings, saved with the scene.

    inspiratoryVolume, expiratoryVolume - the CT pair in HU.
    lobes - optional lobe label map on the inspiratory grid; lobeConvention - its label numbering.
    register - register expiration to inspiration (off: the scans are already aligned).
    threads - registration threads. runInBackground - separate process (Cancel works).

    PRM from MRI: mriVibe, mriPostVibe, mriIrmax, mriPbf - the available sequences (one grid);
    mriLungMask - optional lung mask; mriCtPrm - optional CT-derived PRM for the comparison;
    mriLobeModelPath, mriPrmModelPath - the nnU-Net lobe model and the MRI -> PRM model (folder or
    zip; text, empty when unset); mriDevice - auto (GPU when found), cpu or cuda.
    outputSegmentation - the segmentation that receives the CT PRM classes (replaced); none: a new one.
    """

    inspiratoryVolume: Optional[vtkMRMLScalarVolumeNode]
    expiratoryVolume: Optional[vtkMRMLScalarVolumeNode]
    lobes: Optional[vtkMRMLLabelMapVolumeNode]
    lobeConvention: Annotated[str, Choice(LOBE_CONVENTIONS)] = "project"
    register: bool = True
    threads: Annotated[int, WithinRange(1, 64)] = 2
    runInBackground: bool = True
    mriVibe: Optional[vtkMRMLScalarVolumeNode]
    mriPostVibe: Optional[vtkMRMLScalarVolumeNode]
    mriIrmax: Optional[vtkMRMLScalarVolumeNode]
    mriPbf: Optional[vtkMRMLScalarVolumeNode]
    mriLungMask: Optional[vtkMRMLLabelMapVolumeNode]
    mriCtPrm: Optional[vtkMRMLLabelMapVolumeNode]
    mriLobeModelPath: str = ""
    mriPrmModelPath: str = ""
    mriDevice: Annotated[str, Choice(DEVICES)] = "auto"
    outputSegmentation: Optional[vtkMRMLSegmentationNode]


#
# PRMPredictorWidget
#


#: Path fields of the parameter node and their widgets, synced by the widget (an empty
#: pathlib.Path would read ".").
PATH_FIELDS = (("mriLobeModelPath", "mriLobeModelPathLineEdit"), ("mriPrmModelPath", "mriPrmModelPathLineEdit"))


class PRMPredictorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.mriLogic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._syncingPaths = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PRMPredictor.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = PRMPredictorLogic()
        self.mriLogic = PRMPredictorMRILogic()
        self.runPanel = RunPanel(self.ui, self.layout, _("Computing the PRM map"), cancel=self.logic.cancel,
                                 refresh=self._updateGui)
        # PRM from MRI (issue 6): its own Apply/Cancel buttons, the shared progress bar, status and log
        mriControls = types.SimpleNamespace(applyButton=self.ui.mriApplyButton, cancelButton=self.ui.mriCancelButton,
                                            progressBar=self.ui.progressBar, statusLabel=self.ui.statusLabel)
        self.mriRunPanel = RunPanel(mriControls, None, _("Predicting PRM from MRI"), cancel=self.mriLogic.cancel,
                                    refresh=self._updateGui)
        self.mriRunPanel.logText = self.runPanel.logText

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.mriApplyButton.connect("clicked(bool)", self.onMriApplyButton)
        for field, widgetName in PATH_FIELDS:
            getattr(self.ui, widgetName).connect("currentPathChanged(QString)",
                                                 lambda path, field=field: self.onPathChanged(field, path))
        addFolderBrowseButton(self.ui.mriLobeModelPathLineEdit, _("nnU-Net lobe model folder"))
        addFolderBrowseButton(self.ui.mriPrmModelPathLineEdit, _("MRI -> PRM model folder"))
        self.show3D = Show3DButton(self.layout)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.logic.cancel()
        self.mriLogic.cancel()
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
        self.mriLogic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[PRMPredictorParameterNode]) -> None:
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
        p = self._parameterNode
        if not p:
            return
        self._syncingPaths = True
        try:
            for field, widgetName in PATH_FIELDS:
                widget = getattr(self.ui, widgetName)
                if widget.currentPath != getattr(p, field):
                    widget.currentPath = getattr(p, field)
        finally:
            self._syncingPaths = False
        running = self.logic.isRunning or self.mriLogic.isRunning or self.runPanel.running or self.mriRunPanel.running
        ready = p.inspiratoryVolume is not None and p.expiratoryVolume is not None
        self.ui.applyButton.enabled = ready and not running
        self.ui.threadsSpinBox.enabled = p.register
        self.ui.lobeConventionComboBox.enabled = p.lobes is not None
        self.ui.applyButton.toolTip = _("Compute the PRM map") if ready else _("Select the inspiratory and "
                                                                                "expiratory CT")
        mriReady = bool(p.mriPrmModelPath) and any(
            n is not None for n in (p.mriVibe, p.mriPostVibe, p.mriIrmax, p.mriPbf))
        self.ui.mriApplyButton.enabled = mriReady and not running

    def onPathChanged(self, field, path) -> None:
        if self._parameterNode and not self._syncingPaths:
            setattr(self._parameterNode, field, path or "")

    def onApplyButton(self) -> None:
        p = self._parameterNode
        self.runPanel.run(
            lambda: self.logic.ensureDependencies(p.register),
            lambda progress, log, completed: self.logic.processWithParameterNode(
                p, waitForCompletion=not p.runInBackground, progressCallback=progress, logCallback=log,
                completedCallback=completed),
            self.showResults, background=p.runInBackground)

    def showResults(self, nodes) -> str:
        self.ui.resultsTableView.setMRMLTableNode(nodes["table"])
        self.show3D.setSegmentations([nodes["segmentation"]])
        if nodes.get("scatterPng"):
            self.ui.scatterLabel.setPixmap(qt.QPixmap(nodes["scatterPng"]))
        return _("Done: PRM segmentation, registered expiratory CT and table added.")

    def onMriApplyButton(self) -> None:
        p = self._parameterNode
        self.mriRunPanel.run(
            self.mriLogic.ensureDependencies,
            lambda progress, log, completed: self.mriLogic.processWithParameterNode(
                p, waitForCompletion=False, progressCallback=progress, logCallback=log, completedCallback=completed),
            self.showMriResults, background=True)

    def showMriResults(self, nodes) -> str:
        self.ui.resultsTableView.setMRMLTableNode(nodes["table"])
        self.show3D.setSegmentations([nodes["segmentation"], nodes.get("lobes")])
        self.ui.mriComparisonTableView.setMRMLTableNode(nodes.get("comparison"))
        return _("Done: predicted PRM ({model}) and table added.").format(model=nodes["model"])


#
# PRMPredictorLogic
#


class PRMPredictorLogic(ScriptedLoadableModuleLogic):
    """Nodes in, perfusionai core, nodes out. Usable without the GUI::

        logic = PRMPredictor.PRMPredictorLogic()
        nodes = logic.process(getNode("insp"), getNode("exp"))
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._run = BackgroundRun("PRMPredictor")

    def getParameterNode(self):
        return PRMPredictorParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._run.isRunning

    def ensureDependencies(self, register=True) -> bool:
        """Install the module's packages (ANTsPy when registering) after one confirmation; False when declined."""
        return ensureDependencies(_("PRM Predictor"), moduleRequirements(__file__, ["registration"] if register else []))

    def processWithParameterNode(self, p, waitForCompletion=True, progressCallback=None, completedCallback=None,
                                 logCallback=None):
        return self.process(p.inspiratoryVolume, p.expiratoryVolume, lobesNode=p.lobes,
                            lobeConvention=p.lobeConvention, register=p.register, threads=p.threads,
                            waitForCompletion=waitForCompletion, progressCallback=progressCallback,
                            completedCallback=completedCallback, logCallback=logCallback,
                            segmentationNode=p.outputSegmentation)

    def process(self, inspNode, expNode, lobesNode=None, lobeConvention="project", register=True, threads=2,
                showResults=True, waitForCompletion=True, progressCallback=None, completedCallback=None,
                logCallback=None, segmentationNode=None):
        """Compute the PRM map of two CT volume nodes and add the results to the scene.

        :param inspNode, expNode: inspiratory and expiratory CT (HU) volume nodes.
        :param lobesNode: optional lobe label map node on the inspiratory grid.
        :param lobeConvention: label numbering of the lobe map (see ``perfusionai.prm.lobes_import``).
        :param register: False when the scans are already aligned on one grid.
        :param segmentationNode: an existing segmentation to write the PRM classes into (its segments
            are replaced); None: a new one.
        :param waitForCompletion: True computes in this process and returns the nodes; False starts a
            background process, returns None and calls ``completedCallback(outcome)``.
        :return: ``{"segmentation", "registered", "table", "stats", "scatterPng"}`` when waiting.
        """
        if self.isRunning:
            raise PerfusionAIError(_("A PRM computation is already running; cancel it first."))
        if inspNode is None or expNode is None:
            raise PerfusionAIError(_("Select the inspiratory and the expiratory CT."))
        from perfusionai.io import Volume

        inspArray, inspGeometry = mrml.array_from_volume_node(inspNode)
        expArray, expGeometry = mrml.array_from_volume_node(expNode)
        insp = Volume(inspArray, inspGeometry, inspNode.GetName())
        exp = Volume(expArray, expGeometry, expNode.GetName())
        lobes = None
        if lobesNode is not None:
            lobeArray, lobeGeometry = mrml.array_from_volume_node(lobesNode)
            if not lobeGeometry.same_grid(inspGeometry):
                raise PerfusionAIError(f"{lobesNode.GetName()}: the lobe map is not on the inspiratory CT grid; "
                                       "resample it onto the inspiratory CT first")
            lobes = (lobeArray, lobeConvention)
        settings = {"register": register, "threads": threads, "showResults": showResults,
                    "segmentationNode": segmentationNode}
        return self._runJob(inspNode, insp, exp, lobes, settings, inBackground=not waitForCompletion,
                            progressCallback=progressCallback, completedCallback=completedCallback,
                            logCallback=logCallback)

    def _outputsToNodes(self, inspNode, outDir, settings):
        """Read a PRM output folder into the scene."""
        from perfusionai.io import read_volume
        from perfusionai.prm.stats import stats_rows

        prm = read_volume(os.path.join(outDir, "prm.nii.gz"), "PRM map")
        registered = read_volume(os.path.join(outDir, "exp_registered.nii.gz"), "registered expiratory CT")
        with open(os.path.join(outDir, "prm_stats.json")) as fh:
            stats = json.load(fh)
        name = inspNode.GetName()
        segmentation = mrml.segmentation_node_from_labels(prm.array, prm.geometry, PRM_LABELS, f"{name} PRM",
                                                          reference_volume_node=inspNode,
                                                          node=settings.get("segmentationNode"))
        registeredNode = mrml.volume_node_from_array(registered.array, registered.geometry,
                                                     f"{name} expiration registered")
        table = mrml.table_node_from_rows(stats_rows(stats), f"{name} PRM statistics",
                                          units={"normal": "%", "fsad": "%", "emph": "%", "uncategorized": "%",
                                                 "excluded": "%", "volume_ml": "mL"})
        attributes = {"Method": "PRM (Galban 2012)", "Direction": stats.get("info", {}).get("direction"),
                      "LungDiceAfterRegistration": stats.get("info", {}).get("lung_dice_after_registration")}
        for node in (segmentation, registeredNode, table):
            mrml.set_attributes(node, attributes)
        scatterPng = None
        scatterSource = os.path.join(outDir, "prm_scatter.png")
        if os.path.exists(scatterSource):
            scatterPng = os.path.join(slicer.app.temporaryPath, f"PRMPredictor_{int(time.time() * 1000)}.png")
            shutil.copyfile(scatterSource, scatterPng)
        if settings["showResults"]:
            slicer.util.setSliceViewerLayers(background=inspNode, fit=slicer.app.layoutManager() is not None)
        mrml.group_results([segmentation, registeredNode, table], inspNode, f"{name} PRM results")
        mrml.record_provenance([segmentation, registeredNode, table],
                               {k: v for k, v in settings.items() if k not in ("showResults", "segmentationNode")})
        return {"segmentation": segmentation, "registered": registeredNode, "table": table, "stats": stats,
                "scatterPng": scatterPng}

    def _runJob(self, inspNode, insp, exp, lobes, settings, inBackground, progressCallback=None,
                completedCallback=None, logCallback=None):
        """The PRM bridge: the CT pair (and lobes) to files, ``PRMCTJob`` (``prm ct``) run here or in the
        background, its output folder read back into nodes the same way for both routes."""
        from perfusionai.io import write_volume
        from perfusionai.prm.jobs import PRMCTJob

        workDir = self._run.newWorkDir()
        inputs = os.path.join(workDir, "inputs")
        inspPath = str(write_volume(insp.array, insp.geometry, os.path.join(inputs, "insp.nii.gz")))
        expPath = str(write_volume(exp.array, exp.geometry, os.path.join(inputs, "exp.nii.gz")))
        lobesPath = None
        if lobes is not None:
            lobesPath = str(write_volume(lobes[0], insp.geometry, os.path.join(inputs, "lobes.nii.gz")))
        outDir = os.path.join(workDir, "prm")
        job = PRMCTJob(insp=inspPath, exp=expPath, out=outDir, lobes=lobesPath,
                       lobe_convention=lobes[1] if lobes is not None else "project",
                       no_registration=not settings["register"], threads=int(settings["threads"]))
        settings = dict(settings, job=job.to_json())

        def readOutputs():
            nodes = self._outputsToNodes(inspNode, outDir, settings)
            if progressCallback is not None:
                progressCallback(1.0, _("PRM done"))
            return nodes

        return self._run.runJob(job, readOutputs, inBackground=inBackground, progressCallback=progressCallback,
                                completedCallback=completedCallback, logCallback=logCallback)

    def cancel(self) -> None:
        """Stop a running background computation (the launcher and the Python process it started)."""
        self._run.cancel()


#
# PRM from MRI (Xu et al.): nnU-Net lobes on VIBE, then the multi-sequence network -- issue 6
#



class PRMPredictorMRILogic(ScriptedLoadableModuleLogic):
    """PRM from inspiratory MRI: ``perfusionai prm predict`` (lobes with the nnU-Net lobe model, then
    the multi-sequence network) in a background process; nodes in, nodes out::

        logic = PRMPredictor.PRMPredictorMRILogic()
        nodes = logic.process(getNode("VIBE"), irmaxNode=getNode("IRmax"), pbfNode=getNode("PBF"),
                              lobeModelPath="lobes_model", prmModelPath="prm_model")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._run = BackgroundRun("PRMPredictorMRI")

    @property
    def isRunning(self) -> bool:
        return self._run.isRunning

    def ensureDependencies(self) -> bool:
        """torch (PyTorch extension), nnU-Net and the module's packages after one confirmation; False if declined."""
        return ensureDependencies(_("PRM Predictor (MRI)"), moduleRequirements(__file__, ["mri"]),
                                  torchNeededBy=_("PRM prediction from MRI"))

    def processWithParameterNode(self, p, waitForCompletion=True, progressCallback=None, completedCallback=None,
                                 logCallback=None):
        """Run :meth:`process` with the PRM-from-MRI settings stored in a parameter node."""
        return self.process(p.mriVibe, p.mriPostVibe, p.mriIrmax, p.mriPbf, lungMaskNode=p.mriLungMask,
                            ctPrmNode=p.mriCtPrm, lobeModelPath=p.mriLobeModelPath, prmModelPath=p.mriPrmModelPath,
                            device=p.mriDevice, waitForCompletion=waitForCompletion,
                            progressCallback=progressCallback, completedCallback=completedCallback,
                            logCallback=logCallback)

    def process(self, vibeNode=None, postVibeNode=None, irmaxNode=None, pbfNode=None, lungMaskNode=None,
                ctPrmNode=None, lobeModelPath="", prmModelPath="", device="auto", waitForCompletion=True,
                progressCallback=None, completedCallback=None, logCallback=None):
        """Predict PRM from the given MRI volume nodes (any subset of the four, on one grid).

        :param lungMaskNode: lung mask label map on the VIBE grid; without it the lobe model segments
            the lobes on VIBE and they are the lung mask.
        :param ctPrmNode: optional CT-derived PRM label map (labels 0-4) on the same grid, for Dice and %PRM.
        :param lobeModelPath: nnU-Net lobe model folder or zip; prmModelPath: MRI -> PRM model folder or zip.
        :return: the nodes (``{"segmentation", "lobes", "table", "comparison", "summary", "model"}``) when
            waiting, else None (``completedCallback(outcome)`` gets ``{"nodes": ...}``, ``{"cancelled": True}``
            or ``{"error": message}``).
        """
        from perfusionai.io import write_volume

        if self.isRunning:
            raise PerfusionAIError(_("A PRM prediction is already running; cancel it first."))
        sequences = {"vibe": vibeNode, "post_vibe": postVibeNode, "irmax": irmaxNode, "pbf": pbfNode}
        given = {k: n for k, n in sequences.items() if n is not None}
        if not given:
            raise PerfusionAIError(_("Select at least one MRI sequence (VIBE, post VIBE, IRmax, PBF)."))
        if not prmModelPath or not os.path.exists(prmModelPath):
            raise PerfusionAIError(_("Select the MRI -> PRM model (folder or zip)."))
        if lungMaskNode is None and (not lobeModelPath or vibeNode is None):
            raise PerfusionAIError(_("Select a lung mask, or a lobe model and the VIBE volume."))
        referenceNode = vibeNode if vibeNode is not None else next(iter(given.values()))
        from perfusionai.prm.jobs import PRMPredictJob

        workDir = self._run.newWorkDir()
        inputs = os.path.join(workDir, "inputs")
        files = {}
        for key, node in list(given.items()) + [("lung_mask", lungMaskNode), ("reference", ctPrmNode)]:
            if node is not None:
                array, geometry = mrml.array_from_volume_node(node)
                files[key] = str(write_volume(array, geometry, os.path.join(inputs, f"{key}.nii.gz")))
        outDir = os.path.join(workDir, "out")
        device, deviceMessage = computeDevice(device)
        if logCallback is not None:
            logCallback(deviceMessage)
        # The PRM-from-MRI bridge: PRMPredictJob ("prm predict"), always in a background process
        # (nnU-Net and the network take minutes); the output folder is read back into nodes.
        job = PRMPredictJob(model=str(prmModelPath), out=outDir, lobe_model=str(lobeModelPath) if lobeModelPath else None,
                            device=device, **files)

        def readOutputs():
            nodes = self._outputsToNodes(referenceNode, outDir)
            mrml.record_provenance([nodes["segmentation"], nodes["lobes"], nodes["table"], nodes["comparison"]],
                                   {"job": job.to_json()})
            if progressCallback is not None:
                progressCallback(1.0, _("PRM from MRI done"))
            return nodes

        return self._run.runJob(job, readOutputs, inBackground=True, waitForCompletion=waitForCompletion,
                                progressCallback=progressCallback, completedCallback=completedCallback,
                                logCallback=logCallback, cpuOnly=device == "cpu")

    def _outputsToNodes(self, referenceNode, outDir):
        """Predicted PRM (segmentation, standard colours), lobes, %PRM table and the CT comparison."""
        from perfusionai.io import read_volume
        from perfusionai.labels import LOBE_LABELS
        from perfusionai.prm.stats import stats_rows

        prm = read_volume(os.path.join(outDir, "prm.nii.gz"), "predicted PRM")
        with open(os.path.join(outDir, "prm_stats.json")) as fh:
            stats = json.load(fh)
        with open(os.path.join(outDir, "summary.json")) as fh:
            summary = json.load(fh)
        name = referenceNode.GetName()
        model = summary.get("model", "")
        segmentation = mrml.segmentation_node_from_labels(prm.array, prm.geometry, PRM_LABELS,
                                                          f"{name} PRM from MRI", reference_volume_node=referenceNode)
        lobesNode = None
        if os.path.exists(os.path.join(outDir, "lobes.nii.gz")):
            lobes = read_volume(os.path.join(outDir, "lobes.nii.gz"), "lobes")
            lobesNode = mrml.segmentation_node_from_labels(lobes.array, lobes.geometry, LOBE_LABELS,
                                                           f"{name} lobes", reference_volume_node=referenceNode)
        table = mrml.table_node_from_rows(stats_rows(stats), f"{name} PRM from MRI statistics",
                                          units={"normal": "%", "fsad": "%", "emph": "%", "uncategorized": "%",
                                                 "excluded": "%", "volume_ml": "mL"})
        comparison = None
        reference = summary.get("comparison_with_reference")
        if reference:
            rows = [{"measure": "Dice emphysema", "MRI": reference["dice_emph"], "CT": ""},
                    {"measure": "Dice abnormal (emphysema or fSAD)", "MRI": reference["dice_abnormal"], "CT": ""}]
            for key, label in (("emph", "%PRM emphysema"), ("fsad", "%PRM fSAD"), ("normal", "%PRM normal")):
                rows.append({"measure": label, "MRI": reference["pred"][key], "CT": reference["ref"][key]})
            comparison = mrml.table_node_from_rows(rows, f"{name} PRM from MRI vs CT")
        attributes = {"Method": "PRM from MRI (Xu et al.)", "Model": model,
                      "Sequences": ", ".join(summary.get("sequences_used", [])), "LobeModel": summary.get("lobe_model")}
        for node in (segmentation, lobesNode, table, comparison):
            if node is not None:
                mrml.set_attributes(node, attributes)
        slicer.util.setSliceViewerLayers(background=referenceNode, fit=slicer.app.layoutManager() is not None)
        mrml.group_results([segmentation, lobesNode, table, comparison], referenceNode, f"{name} PRM from MRI results")
        return {"segmentation": segmentation, "lobes": lobesNode, "table": table, "comparison": comparison,
                "summary": summary, "model": model}

    def cancel(self) -> None:
        """Stop a running prediction (the launcher and the Python process it started)."""
        self._run.cancel()


#
# PRMPredictorTest
#


class PRMPredictorTest(ScriptedLoadableModuleTest):
    """Runs the Logic on a small aligned PRM phantom in the scene and checks %PRM against its truth."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # A clean Slicer lacks some packages: install them through the module's own path (in
        # testing mode Slicer confirms by itself), or skip naming them. The cases run without
        # registration (aligned phantom), so ANTsPy is not needed.
        if not self._dependencies():
            return
        self.setUp()
        self.test_PRMPredictor_AlignedPhantom()
        self.setUp()
        self.test_PRMPredictor_BackgroundProcess()

    def _dependencies(self) -> bool:
        reason = []
        try:
            if PRMPredictorLogic().ensureDependencies(register=False):
                return True
        except PerfusionAIError as exc:
            logging.error(str(exc))
            reason = [str(exc)]
        self.delayDisplay(_("PRMPredictor self-test SKIPPED: needs {packages}").format(
            packages=", ".join(reason + slicer_support.missing_requirements(moduleRequirements(__file__)))))
        return False

    def _phantomNodes(self):
        from perfusionai.phantoms.prm import make_prm_phantom, truth_statistics

        phantom = make_prm_phantom(shape=(40, 56, 64), spacing_mm=5.0, noise_hu=0.0, deform=False)
        insp = mrml.volume_node_from_array(phantom.insp.array, phantom.geometry, "PRMPhantom insp")
        exp = mrml.volume_node_from_array(phantom.exp.array, phantom.geometry, "PRMPhantom exp")
        lobes = mrml.volume_node_from_array(phantom.lobes, phantom.geometry, "PRMPhantom lobes", label=True)
        return phantom, truth_statistics(phantom), insp, exp, lobes

    def _assertMatchesTruth(self, nodes, truth):
        whole = nodes["stats"]["whole_lung"]
        for key in ("normal", "fsad", "emph"):
            self.assertLess(abs(whole[key] - truth["whole_lung"][key]), 2.0, key)
        names = [segment[1] for segment in mrml.segments_of(nodes["segmentation"])]
        self.assertIn("Emphysema", names)
        self.assertEqual(nodes["table"].GetNumberOfRows(), 3 + len(nodes["stats"]["lobes"]))

    def test_PRMPredictor_AlignedPhantom(self):
        self.delayDisplay("Building the PRM phantom")
        phantom, truth, insp, exp, lobes = self._phantomNodes()
        logic = PRMPredictorLogic()
        nodes = logic.process(insp, exp, lobesNode=lobes, register=False, waitForCompletion=True)
        self._assertMatchesTruth(nodes, truth)
        self.delayDisplay("In-process PRM matches the phantom truth")

    def test_PRMPredictor_BackgroundProcess(self):
        phantom, truth, insp, exp, lobes = self._phantomNodes()
        logic = PRMPredictorLogic()
        seen = []
        outcomes = []
        logic.process(insp, exp, lobesNode=lobes, register=False, waitForCompletion=False,
                      progressCallback=lambda f, m: seen.append(f), completedCallback=outcomes.append)
        while logic.isRunning:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(len(outcomes), 1, "the completion callback runs once")
        self.assertNotIn("error", outcomes[0], outcomes[0].get("error"))
        self.assertTrue(seen and seen[-1] == 1.0)
        self._assertMatchesTruth(outcomes[0]["nodes"], truth)
        self.delayDisplay("Background-process PRM matches the phantom truth")
