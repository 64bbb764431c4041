"""PerfusionTranslation: SPECT-like lung perfusion predicted from a chest CT (DL-CTPM) in 3D Slicer.

The module binds widgets and calls the Logic; the Logic writes the input nodes to files, builds
the job (``perfusionai.ctpm.jobs.CTPMPredictJob``), runs it in-process (``job.run()``) or as
``PythonSlicer -m perfusionai ctpm predict`` in a background process, and reads the output folder
back into nodes the same way for both: the perfusion map as a colour overlay on the CT, the
high/low functional lung as a segmentation, a volumes table, and -- when a SPECT is selected --
the evaluation numbers (Spearman R, SSIM, Dice). All numerics live in the ``perfusionai``
package, which the extension installs next to this file.
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


#
# PerfusionTranslation
#


class PerfusionTranslation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Perfusion Translation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Perfusion")]
        self.parent.dependencies = []
        self.parent.contributors = ["PerfusionAI team"]
        self.parent.helpText = _("""
SPECT-like lung perfusion predicted from a chest CT (DL-CTPM, Ren et al. 2021): each lung is
cropped, resampled to the network size and enhanced, a 3D attention residual network predicts the
perfusion (SPECT divided by its 75th percentile in the lung, 0-1), and the two lungs are put back
on the CT grid. High functional lung: perfusion >= 0.66. Select the CT, optionally a lung mask
(else it is segmented automatically) and a model, then Apply. With a SPECT selected, the
prediction is compared with it (Spearman R, SSIM, Dice of high/low function).
Models trained on phantoms are labelled as such and are not for clinical use.
""")
        self.parent.helpText += documentationLink()
        self.parent.acknowledgementText = _("""
Built on the PerfusionAI library. Method after Ren et al., Int J Radiat Oncol Biol Phys 2021;110(5):1508-1518.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: the CT/SPECT lung phantom, generated on the fly (no download)
#


def registerSampleData():
    """Add the CT/SPECT lung phantom to the Sample Data module (built when clicked)."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="PerfusionAI",
        sampleName="CTPMPhantom",
        thumbnailFileName=os.path.join(iconsPath, "PerfusionTranslation.png"),
        uris="perfusionai://phantoms/ctpm",
        fileNames="CTPMPhantom.nrrd",
        nodeNames="CTPMPhantom",
        customDownloader=loadCTPMPhantom,
    )


def loadCTPMPhantom(source=None, **phantomOptions):
    """Build a chest CT phantom with its lung labels and paired SPECT in the scene.

    ``source`` is the Sample Data entry (unused); ``phantomOptions`` go to
    ``perfusionai.phantoms.ctpm.make_ctpm_phantom`` (``seed``; default grid 4 mm).
    Returns ``{"ct": volume, "lungs": label map, "spect": volume, "phantom": CTPMPhantom}``.
    """
    from perfusionai.phantoms.ctpm import make_ctpm_phantom, phantom_geometry

    options = {"seed": 900, "geometry": phantom_geometry(spacing_mm=(4.0, 4.0, 4.0))}
    options.update(phantomOptions)
    phantom = make_ctpm_phantom(**options)
    ct = mrml.volume_node_from_array(phantom.ct_hu, phantom.geometry, "CTPMPhantom")
    lungs = mrml.volume_node_from_array(phantom.lung_labels, phantom.geometry, "CTPMPhantom lungs", label=True)
    spect = mrml.volume_node_from_array(phantom.spect, phantom.spect_geometry, "CTPMPhantom SPECT")
    mrml.set_attributes(ct, {"Note": "digital phantom with known truth"})
    slicer.util.setSliceViewerLayers(background=ct, fit=slicer.app.layoutManager() is not None)
    return {"ct": ct, "lungs": lungs, "spect": spect, "phantom": phantom}


#
# PerfusionTranslationParameterNode
#


@parameterNodeWrapper
class PerfusionTranslationParameterNode:
    """The module's settings, saved with the scene.

    inputCT - chest CT in HU.
    lungMask, lungMaskSegmentId - optional lung mask (label map 1 right / 2 left, lobes, binary, or a
        segmentation); none: automatic CT lung mask.
    modelPath - DL-CTPM model folder or zip (weights.safetensors + model.json).
    spect - optional SPECT registered to the CT, for the evaluation numbers.
    runInBackground - predict in a background process (GUI stays responsive, Cancel works).
    overlayOpacity - opacity of the perfusion overlay.
    device - auto (the GPU when found, else the CPU), cpu or cuda.
    outputPerfusion, outputSegmentation - nodes that receive the results (overwritten); none: new nodes.
    """

    # Node unions name None: Slicer's parameterNodeWrapper writes None into a fresh node.
    inputCT: Optional[vtkMRMLScalarVolumeNode]
    lungMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    lungMaskSegmentId: str = ""
    # Text, not pathlib.Path: an empty Path reads "." (the path widget is synced in the widget).
    modelPath: str = ""
    spect: Optional[vtkMRMLScalarVolumeNode]
    runInBackground: bool = True
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputPerfusion: Optional[vtkMRMLScalarVolumeNode]
    outputSegmentation: Optional[vtkMRMLSegmentationNode]


#
# PerfusionTranslationWidget
#


class PerfusionTranslationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._syncingSegments = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PerfusionTranslation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = PerfusionTranslationLogic()
        self.runPanel = RunPanel(self.ui, self.layout, _("Predicting the perfusion map"), cancel=self.logic.cancel,
                                 refresh=self._updateGui)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.lungMaskSegmentSelector.connect("currentSegmentChanged(QString)", self.onLungMaskSegmentChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        addFolderBrowseButton(self.ui.modelPathLineEdit, _("DL-CTPM model folder"))
        self.show3D = Show3DButton(self.layout)
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
        if not self._parameterNode.inputCT:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputCT = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[PerfusionTranslationParameterNode]) -> None:
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
        """Show the segment selector for a segmentation mask; enable Apply when CT and model are set."""
        p = self._parameterNode
        if not p:
            return
        maskIsSegmentation = p.lungMask is not None and p.lungMask.IsA("vtkMRMLSegmentationNode")
        self.ui.lungMaskSegmentSelector.setVisible(maskIsSegmentation)
        self._syncingSegments = True
        try:
            if maskIsSegmentation:
                self.ui.lungMaskSegmentSelector.setCurrentNode(p.lungMask)
                if p.lungMaskSegmentId:
                    self.ui.lungMaskSegmentSelector.setCurrentSegmentID(p.lungMaskSegmentId)
            if self.ui.modelPathLineEdit.currentPath != p.modelPath:
                self.ui.modelPathLineEdit.currentPath = p.modelPath
        finally:
            self._syncingSegments = False
        running = self.logic.isRunning or self.runPanel.running
        ready = p.inputCT is not None and bool(p.modelPath)
        self.ui.applyButton.enabled = ready and not running
        self.ui.applyButton.toolTip = _("Predict the perfusion map") if ready else _("Select the CT and a model")

    def onLungMaskSegmentChanged(self, segmentId) -> None:
        if self._parameterNode and not self._syncingSegments:
            self._parameterNode.lungMaskSegmentId = segmentId or ""

    def onModelPathChanged(self, path) -> None:
        if self._parameterNode and not self._syncingSegments:
            self._parameterNode.modelPath = path or ""

    def onApplyButton(self) -> None:
        p = self._parameterNode
        self.runPanel.run(
            self.logic.ensureDependencies,
            lambda progress, log, completed: self.logic.processWithParameterNode(
                p, waitForCompletion=not p.runInBackground, progressCallback=progress, logCallback=log,
                completedCallback=completed),
            self.showResults, background=p.runInBackground)

    def showResults(self, nodes) -> str:
        self.ui.resultsTableView.setMRMLTableNode(nodes["table"])
        self.show3D.setSegmentations([nodes["segmentation"]])
        if nodes.get("evaluationTable") is not None:
            self.ui.evaluationTableView.setMRMLTableNode(nodes["evaluationTable"])
        return _("Done: perfusion overlay, high/low function segmentation and volumes added "
                 "(model: {label}).").format(label=nodes["modelLabel"])


#
# PerfusionTranslationLogic
#


class PerfusionTranslationLogic(ScriptedLoadableModuleLogic):
    """Nodes in, perfusionai core, nodes out. Usable without the GUI::

        logic = PerfusionTranslation.PerfusionTranslationLogic()
        results = logic.process(getNode("CTPMPhantom"), modelPath="/path/to/model", spectNode=getNode("CTPMPhantom SPECT"))
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._run = BackgroundRun("PerfusionTranslation")

    def getParameterNode(self):
        return PerfusionTranslationParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._run.isRunning

    # -- dependencies -------------------------------------------------------------------

    def ensureDependencies(self) -> bool:
        """torch (PyTorch extension) and the module's packages after one confirmation; False if declined."""
        return ensureDependencies(_("Perfusion Translation"), moduleRequirements(__file__),
                                  torchNeededBy=_("Perfusion Translation"))

    # -- processing ---------------------------------------------------------------------

    def processWithParameterNode(self, p, waitForCompletion=True, progressCallback=None, completedCallback=None,
                                 logCallback=None):
        """Run :meth:`process` with the settings stored in a parameter node."""
        return self.process(p.inputCT, modelPath=p.modelPath or None, lungMaskNode=p.lungMask,
                            lungMaskSegmentId=p.lungMaskSegmentId or None, spectNode=p.spect,
                            overlayOpacity=p.overlayOpacity, waitForCompletion=waitForCompletion,
                            progressCallback=progressCallback, completedCallback=completedCallback,
                            logCallback=logCallback, device=p.device, perfusionNode=p.outputPerfusion,
                            segmentationNode=p.outputSegmentation)

    def _lungLabels(self, lungMaskNode, lungMaskSegmentId, geometry):
        """The lung mask as labels on the CT grid (label maps keep 1 right / 2 left), or None."""
        from perfusionai.ctpm.predict import lung_labels_on_ct_grid

        if lungMaskNode is None:
            return None
        if lungMaskNode.IsA("vtkMRMLSegmentationNode"):
            return mrml.mask_from_node(lungMaskNode, geometry, lungMaskSegmentId, what="lung mask")
        labels, labelsGeometry = mrml.array_from_volume_node(lungMaskNode)
        return lung_labels_on_ct_grid(labels, labelsGeometry, geometry, lungMaskNode.GetName())

    def process(self, ctNode, modelPath, lungMaskNode=None, lungMaskSegmentId=None, spectNode=None,
                overlayOpacity=0.5, showResults=True, waitForCompletion=True, progressCallback=None,
                completedCallback=None, logCallback=None, device="auto", perfusionNode=None, segmentationNode=None):
        """Predict the perfusion map of ``ctNode`` and add the results to the scene.

        :param ctNode: chest CT volume in HU.
        :param modelPath: DL-CTPM model folder or zip.
        :param lungMaskNode: optional label map (1 right / 2 left, lobes 1-6, binary) or segmentation;
            None segments the lungs automatically.
        :param spectNode: optional SPECT registered to the CT; adds the evaluation numbers.
        :param perfusionNode, segmentationNode: existing nodes to write the perfusion map and the
            high/low function segmentation into (None: new nodes).
        :param waitForCompletion: True predicts in this process and returns the result nodes;
            False starts a background process, returns None and calls ``completedCallback(outcome)``.
        :return: ``{"perfusion", "segmentation", "table", "evaluationTable", "evaluation", "modelLabel"}``.
        """
        if self.isRunning:
            raise PerfusionAIError(_("A prediction is already running; cancel it first."))
        if not modelPath:
            raise PerfusionAIError(_("Select a DL-CTPM model (folder or .zip)."))
        ctHU, geometry = mrml.array_from_volume_node(ctNode)
        labels = self._lungLabels(lungMaskNode, lungMaskSegmentId, geometry)
        settings = {"modelPath": str(modelPath), "overlayOpacity": overlayOpacity, "showResults": showResults,
                    "spectNode": spectNode, "device": device, "perfusionNode": perfusionNode,
                    "segmentationNode": segmentationNode}
        return self._runJob(ctNode, ctHU, geometry, labels, settings, inBackground=not waitForCompletion,
                            progressCallback=progressCallback, completedCallback=completedCallback,
                            logCallback=logCallback)

    def _resultsToNodes(self, ctNode, result, geometry, settings):
        from perfusionai.ctpm.evaluation import evaluate_arrays
        from perfusionai.ctpm.predict import FUNCTION_LABELS, volume_rows

        name = ctNode.GetName()
        attributes = {"Method": "DL-CTPM", "Model": settings["modelPath"], "ModelLabel": result.model_label}
        perfusionNode = mrml.volume_node_from_array(result.perfusion, geometry, f"{name} perfusion (DL-CTPM)",
                                                    node=settings.get("perfusionNode"))
        mrml.show_map(perfusionNode, "perfusion", window=(0.0, 1.0))
        mrml.set_attributes(perfusionNode, attributes)
        segmentation = mrml.segmentation_node_from_labels(result.high_low, geometry, FUNCTION_LABELS,
                                                          f"{name} functional lung", reference_volume_node=ctNode,
                                                          node=settings.get("segmentationNode"))
        mrml.set_attributes(segmentation, attributes)
        table = mrml.table_node_from_rows(volume_rows(result, geometry), f"{name} functional lung volumes",
                                          units={"Lung (mL)": "mL", "High function (mL)": "mL",
                                                 "Low function (mL)": "mL", "High function (%)": "%"})
        evaluation, evaluationTable = None, None
        spectNode = settings["spectNode"]
        if spectNode is not None:
            spect, spectGeometry = mrml.array_from_volume_node(spectNode)
            evaluation = evaluate_arrays(result.perfusion, geometry, result.lung_labels > 0, spect, spectGeometry)
            rows = [{"Metric": key, "Value": evaluation[key]} for key in ("spearman", "ssim", "dice_high", "dice_low")]
            evaluationTable = mrml.table_node_from_rows(rows, f"{name} DL-CTPM vs {spectNode.GetName()}")
        if settings["showResults"]:
            mrml.show_overlay(ctNode, perfusionNode, opacity=settings["overlayOpacity"])
        created = [perfusionNode, segmentation, table, evaluationTable]
        mrml.group_results(created, ctNode, f"{name} DL-CTPM results")
        mrml.record_provenance(created, {"modelPath": settings["modelPath"], "modelLabel": result.model_label,
                                         "overlayOpacity": settings["overlayOpacity"], "job": settings.get("job"),
                                         "device": settings.get("device"),
                                         "spect": spectNode.GetName() if spectNode is not None else None})
        return {"perfusion": perfusionNode, "segmentation": segmentation, "table": table,
                "evaluationTable": evaluationTable, "evaluation": evaluation, "modelLabel": result.model_label}

    def _runJob(self, ctNode, ctHU, geometry, labels, settings, inBackground, progressCallback=None,
                completedCallback=None, logCallback=None):
        """The CT-to-perfusion bridge: the CT (and lung labels) to files, ``CTPMPredictJob`` (``ctpm predict``)
        run here or in the background, its output folder read back into nodes the same way for both routes."""
        from perfusionai.ctpm.jobs import CTPMPredictJob
        from perfusionai.ctpm.predict import read_prediction, write_predict_inputs

        workDir = self._run.newWorkDir()
        ctPath, maskPath = write_predict_inputs(os.path.join(workDir, "inputs"), ctHU, geometry, labels)
        outDir = os.path.join(workDir, "prediction")
        device, deviceMessage = computeDevice(settings["device"])
        if logCallback is not None:
            logCallback(deviceMessage)
        job = CTPMPredictJob(ct=str(ctPath), model=settings["modelPath"], out=outDir,
                             lung_mask=str(maskPath) if maskPath is not None else None, device=device)

        def readOutputs():
            result, resultGeometry, _summary = read_prediction(outDir)
            return self._resultsToNodes(ctNode, result, resultGeometry, dict(settings, job=job.to_json()))

        return self._run.runJob(job, readOutputs, inBackground=inBackground, progressCallback=progressCallback,
                                completedCallback=completedCallback, logCallback=logCallback, cpuOnly=False)

    def cancel(self) -> None:
        """Stop a running background prediction (the launcher and the Python process it started)."""
        self._run.cancel()


#
# PerfusionTranslationTest
#


class PerfusionTranslationTest(ScriptedLoadableModuleTest):
    """Trains a small model on phantoms, predicts a phantom CT in the scene (in-process and in the
    background) and checks the grid, the segmentation, the table and the evaluation numbers."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # A clean Slicer lacks torch and some packages: install them through the module's own path
        # (in testing mode Slicer confirms by itself), or skip naming them.
        if not self._dependencies():
            return
        self.setUp()
        self.test_PerfusionTranslation_InProcess()
        self.setUp()
        self.test_PerfusionTranslation_BackgroundProcess()

    def _dependencies(self) -> bool:
        reason = None
        try:
            if PerfusionTranslationLogic().ensureDependencies():
                return True
        except PerfusionAIError as exc:  # e.g. the PyTorch extension is not installed
            logging.error(str(exc))
            reason = str(exc)
        missing = slicer_support.missing_requirements(moduleRequirements(__file__) + ["torch"])
        self.delayDisplay(_("PerfusionTranslation self-test SKIPPED: needs {packages}").format(
            packages=", ".join(missing + ([reason] if reason else [])) or "the packages that were not installed"))
        return False

    def _model(self):
        from perfusionai.phantoms.ctpm import train_phantom_model

        if getattr(self, "_modelPath", None) is None:
            self.delayDisplay("Training a small model on phantoms (about a minute)")
            self._modelPath = os.path.join(workDirectory("PerfusionTranslationTest"), "model")
            train_phantom_model(self._modelPath, n_patients=8, epochs=8, device="cpu")
        return self._modelPath

    def _check(self, nodes, scene):
        phantom = scene["phantom"]
        values, geometry = mrml.array_from_volume_node(nodes["perfusion"])
        self.assertTrue(geometry.same_grid(phantom.geometry))
        lung = phantom.lung_labels > 0
        self.assertTrue(values.min() >= 0 and values.max() <= 1)
        self.assertTrue((values[~lung] == 0).all())
        names = [name for _, name, _ in mrml.segments_of(nodes["segmentation"])]
        self.assertIn("High function", names)
        self.assertEqual(nodes["table"].GetNumberOfRows(), 3)
        self.assertIn("trained on phantoms", nodes["modelLabel"])
        evaluation = nodes["evaluation"]
        self.assertIsNotNone(evaluation)
        self.assertGreater(evaluation["spearman"], 0.5, evaluation)

    def test_PerfusionTranslation_InProcess(self):
        self.delayDisplay("Building the CT/SPECT phantom")
        scene = loadCTPMPhantom()
        logic = PerfusionTranslationLogic()
        nodes = logic.process(scene["ct"], self._model(), lungMaskNode=scene["lungs"], spectNode=scene["spect"],
                              waitForCompletion=True)
        self._check(nodes, scene)
        self.delayDisplay("In-process prediction on the CT grid, evaluated against the SPECT")

    def test_PerfusionTranslation_BackgroundProcess(self):
        scene = loadCTPMPhantom()
        logic = PerfusionTranslationLogic()
        seen = []
        outcomes = []
        logic.process(scene["ct"], self._model(), lungMaskNode=scene["lungs"], spectNode=scene["spect"],
                      waitForCompletion=False, progressCallback=lambda f, m: seen.append(f),
                      completedCallback=outcomes.append)
        while logic.isRunning:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(len(outcomes), 1, "the completion callback runs once")
        self.assertNotIn("error", outcomes[0], outcomes[0].get("error"))
        self.assertTrue(seen and seen[-1] == 1.0)
        self._check(outcomes[0]["nodes"], scene)
        self.delayDisplay("Background prediction matches")
