"""Slicer-side helpers shared by the four PerfusionAI modules (imports slicer; never used by the core).

* :func:`ensureDependencies` -- one confirmation listing every package a run needs (torch through
  the PyTorch extension, without a second prompt), then the install through ``slicer.packaging``
  (5.12) or ``slicer.util.pip_install`` (5.10); declining returns False, it is not an error;
* :class:`BackgroundRun` -- the one execution path of every module (:meth:`BackgroundRun.runJob`):
  the domain's job (``perfusionai.jobs``) on files written from the nodes, run by ``job.run()`` here
  or as ``PythonSlicer -m perfusionai <job.to_argv()> --progress lines``, the same on Slicer 5.10 and
  5.12: ``slicer.util.launchConsoleProcess`` (the signature both versions share), a reader thread
  and a ``qt.QTimer`` that polls it; ``PROGRESS`` lines to a progress callback, every other line
  to a log callback; Cancel, scene close and application exit kill the process tree; any
  exception while reading the outputs becomes an ``{"error": ...}`` outcome;
* :class:`RunPanel` -- the Apply / progress / log (with elapsed time) / Cancel / completion
  handling of a module panel, shared by the four widgets;
* :func:`computeDevice` -- the CPU/GPU choice of the learned methods;
* :class:`Show3DButton` -- the result segmentations in 3D; :func:`addFolderBrowseButton` -- a
  *Folder...* button beside a path field (a ctkPathLineEdit browses files only);
* :func:`registerGeneratedSample` -- a phantom in the Sample Data module that also loads from a
  script (``SampleData.downloadSample(name)``), through SampleData's own download-and-load path.

The Qt-free parts (command lines, progress parsing, process-tree killing, requirement checks)
live in :mod:`perfusionai.slicer_support` and are tested there. The extension installs this
package next to the modules (top-level CMakeLists.txt); in a source checkout each module puts
the checkout root on ``sys.path``, which makes it importable as well.
"""

import logging
import os
import queue
import shutil
import threading
import time

import qt
import slicer
from slicer.i18n import tr as _

from perfusionai import slicer_support
from perfusionai.errors import PerfusionAIError

#: Where the modules' help text links to (the README's "3D Slicer extension" section; EXTENSION_HOMEPAGE).
DOCUMENTATION_URL = "https://github.com/PerfusionAI/SlicerPerfusionAI#3d-slicer-extension"


def documentationLink() -> str:
    """The help-text paragraph linking to the documentation."""
    return _('<p>Documentation: <a href="{url}">{url}</a></p>').format(url=DOCUMENTATION_URL)


#: How often a background run's output is polled (ms).
POLL_INTERVAL_MS = 100
#: How torch appears in the one confirmation (it is installed by the PyTorch extension, not pip).
TORCH_LISTING = "torch (through the PyTorch extension)"


# --------------------------------------------------------------------------------------
# dependencies


def _pyTorchLogic(neededBy):
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise PerfusionAIError(slicer_support.pytorch_extension_missing_message(neededBy))
    return PyTorchUtils.PyTorchUtilsLogic()


def ensureDependencies(requester, requirements, torchNeededBy=None) -> bool:
    """Install what is missing of ``requirements`` (pip strings) and, with ``torchNeededBy``, torch.

    One confirmation lists every package (in testing mode Slicer confirms without asking, so
    the self-tests install through this same path). Returns False when the user declines;
    raises :class:`PerfusionAIError` when the PyTorch extension is absent or an install failed.
    """
    missing = slicer_support.missing_requirements(list(requirements))
    torchLogic = None
    if torchNeededBy:
        torchLogic = _pyTorchLogic(torchNeededBy)
        if torchLogic.torchInstalled():
            torchLogic = None
    if not missing and torchLogic is None:
        return True
    listing = list(missing) + ([TORCH_LISTING] if torchLogic is not None else [])
    if not slicer.util.confirmOkCancelDisplay(
            _("{requester} needs these Python packages, which will be downloaded and installed now:").format(
                requester=requester) + "\n\n" + "\n".join(listing),
            windowTitle=_("{requester} - Install Python Packages").format(requester=requester),
            detailedText="\n".join(listing)):
        logging.info(f"{requester}: installation of {', '.join(listing)} declined")
        return False
    if torchLogic is not None:
        torch = torchLogic.installTorch(askConfirmation=False,
                                        torchVersionRequirement=slicer_support.TORCH_VERSION_REQUIREMENT)
        if torch is None:
            raise PerfusionAIError(_("Installing torch through the PyTorch extension failed; see the log."))
    if missing:
        _pipInstall(missing, requester)
        still = slicer_support.missing_requirements(missing)
        if still:
            raise PerfusionAIError(_("These packages could not be installed: {packages}; see the log.").format(
                packages=", ".join(still)))
    return True


def _pipInstall(requirements, requester) -> None:
    """pip install through Slicer: ``slicer.packaging.pip_ensure`` (5.12, already confirmed) or ``pip_install`` (5.10)."""
    try:
        import slicer.packaging as packaging  # Slicer >= 5.12
    except ImportError:
        packaging = None
    if packaging is not None:
        packaging.pip_ensure(list(requirements), prompt_install=False, requester=requester, skip_in_testing=False)
    else:
        slicer.util.pip_install(list(requirements))


def moduleRequirements(moduleFile, extras=()) -> list:
    """The pip requirements of a module: ``Resources/Requirements/<Module>.txt`` (+ ``<Module>-<extra>.txt``)."""
    return slicer_support.module_requirements(moduleFile, extras)


def computeDevice(choice="auto"):
    """``(device, message)`` for a learned method: "cuda" when chosen/auto and a GPU is seen, else "cpu".

    ``choice``: "auto", "cpu" or "cuda". The message says what was found and what falls back.
    """
    try:
        import torch
        hasGpu = bool(torch.cuda.is_available())
        gpuName = torch.cuda.get_device_name(0) if hasGpu else ""
    except ImportError:
        hasGpu, gpuName = False, ""
    if choice == "cpu":
        return "cpu", _("Running on the CPU (chosen).")
    if hasGpu:
        return "cuda", _("Running on the GPU ({name}).").format(name=gpuName)
    if choice == "cuda":
        return "cpu", _("No GPU found: running on the CPU instead (slower).")
    return "cpu", _("No GPU found: running on the CPU.")


# --------------------------------------------------------------------------------------
# sample data generated on the fly

#: URI scheme of generated samples; a SampleData URL rewrite rule turns it into a file:// URL.
PHANTOM_URI_PREFIX = "perfusionai://phantoms/"


def registerGeneratedSample(category, sampleName, thumbnailFileName, files, writeFiles, customDownloader=None):
    """Register a phantom that is generated, not downloaded, for the Sample Data button *and* for scripts.

    The Sample Data button calls ``customDownloader(source)``; ``SampleData.downloadSample(sampleName)``
    from a script ignores it (SampleData's ``downloadFromSource`` downloads ``uris``), so the sample
    also has one ``perfusionai://phantoms/<sampleName>/<file>`` URI per file and a URL rewrite rule
    (``SampleDataLogic.registerUrlRewriteRule``) that writes the files once with ``writeFiles(folder)``
    into ``slicer.app.cachePath`` and returns their ``file://`` URL; SampleData then copies them into
    its cache and loads them with the given file types.

    ``files``: ``[(fileName, nodeName, fileType), ...]`` (fileType e.g. "SequenceFile", "SegmentationFile").
    """
    import pathlib

    import SampleData

    prefix = PHANTOM_URI_PREFIX + sampleName + "/"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=category,
        sampleName=sampleName,
        thumbnailFileName=thumbnailFileName,
        uris=[prefix + fileName for fileName, _n, _t in files],
        fileNames=[fileName for fileName, _n, _t in files],
        nodeNames=[nodeName for _f, nodeName, _t in files],
        loadFileTypes=[fileType for _f, _n, fileType in files],
        customDownloader=customDownloader,
    )

    def generatedFileUrl(url):
        if not str(url).startswith(prefix):
            return url
        folder = os.path.join(slicer.app.cachePath, "PerfusionAI", sampleName)
        if not all(os.path.isfile(os.path.join(folder, fileName)) for fileName, _n, _t in files):
            stage = workDirectory(sampleName)
            try:
                writeFiles(stage)
                os.makedirs(os.path.dirname(folder), exist_ok=True)
                shutil.rmtree(folder, ignore_errors=True)
                shutil.move(stage, folder)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        return pathlib.Path(folder, str(url)[len(prefix):]).as_uri()

    SampleData.SampleDataLogic.registerUrlRewriteRule("PerfusionAI" + sampleName, generatedFileUrl)


def writeNodeFile(node, path, storageClassName) -> None:
    """Write ``node`` to ``path`` with a storage node of ``storageClassName`` (removed again)."""
    storage = slicer.mrmlScene.AddNewNodeByClass(storageClassName)
    try:
        storage.SetFileName(path)
        if not storage.WriteData(node):
            raise PerfusionAIError(f"{path}: writing {node.GetName()} failed")
    finally:
        slicer.mrmlScene.RemoveNode(storage)


# --------------------------------------------------------------------------------------
# background runs


def workDirectory(name) -> str:
    """A new, unique folder under Slicer's temporary folder (``slicer.app.temporaryPath``)."""
    import tempfile

    os.makedirs(slicer.app.temporaryPath, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{name}-", dir=slicer.app.temporaryPath)


class BackgroundRun:
    """A ``perfusionai`` command run in a background process of the Slicer application.

    ``name`` labels the log lines and the temporary folder. Usage::

        run = BackgroundRun("DSCDeconvolution")
        workDir = run.newWorkDir()                # write the inputs here
        run.start(command, readOutputs, progressCallback, completedCallback)

    ``readOutputs()`` turns the finished run's files into scene nodes; it is called only when the
    process exited with status 0 and was not cancelled. ``completedCallback(outcome)`` receives
    ``{"nodes": readOutputs()}``, ``{"error": message}`` or ``{"cancelled": True}``, once.
    """

    def __init__(self, name) -> None:
        self.name = name
        self.process = None
        self.workDir = None
        self.startTime = None
        self.outcome = None
        self._output = []
        self._lines = None
        self._reader = None
        self._timer = None
        self._sceneObserverTag = None
        self._cancelRequested = False
        self._readOutputs = None
        self._progressCallback = None
        self._completedCallback = None
        self._logCallback = None
        # A process left running when the application quits would keep computing unseen.
        slicer.app.connect("aboutToQuit()", self.cancel)

    @property
    def isRunning(self) -> bool:
        return self.process is not None

    @property
    def elapsedSeconds(self) -> float:
        return 0.0 if self.startTime is None else time.time() - self.startTime

    def newWorkDir(self) -> str:
        """A fresh temporary folder for this run's inputs and outputs (removed when the run ends)."""
        self.workDir = workDirectory(self.name)
        return self.workDir

    def start(self, command, readOutputs, progressCallback=None, completedCallback=None, waitForCompletion=False,
              cpuOnly=True, logCallback=None):
        """Launch ``command``; without waiting returns None and reports through ``completedCallback``.

        With ``waitForCompletion`` the run is followed here and the nodes are returned (an error
        raises :class:`PerfusionAIError`). ``cpuOnly`` hides CUDA from the process.
        """
        if self.isRunning:
            raise PerfusionAIError(_("{name}: a computation is already running; cancel it first.").format(
                name=self.name))
        logging.info(self.name + ": " + " ".join(command))
        self._output = []
        self.outcome = None
        self._cancelRequested = False
        self._readOutputs = readOutputs
        self._progressCallback = progressCallback
        self._completedCallback = completedCallback
        self._logCallback = logCallback
        environment = slicer_support.background_environment(slicer.util.startupEnvironment().get("PYTHONPATH"),
                                                            cpu_only=cpuOnly)
        # The arguments both 5.10 and 5.12 accept; the output is read here, not by the 5.12-only keywords.
        self.process = slicer.util.launchConsoleProcess(command, updateEnvironment=environment)
        self.startTime = time.time()
        self._lines = queue.Queue()
        self._reader = threading.Thread(target=self._readLines, args=(self.process.stdout, self._lines),
                                        name=f"{self.name} output", daemon=True)
        self._reader.start()
        self._sceneObserverTag = slicer.mrmlScene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent,
                                                              self._onSceneClose)
        if waitForCompletion:
            while not self.poll():
                time.sleep(0.05)
            if self.outcome.get("error"):
                raise PerfusionAIError(self.outcome["error"])
            return self.outcome.get("nodes")
        self._startPolling()
        return None

    def runJob(self, job, readOutputs, inBackground=True, waitForCompletion=False, progressCallback=None,
               completedCallback=None, logCallback=None, cpuOnly=True):
        """Run a job specification (``perfusionai.jobs.Job``) whose inputs lie in :meth:`newWorkDir`.

        ``inBackground`` False: ``job.run(progressCallback)`` in this process, then ``readOutputs()``
        (returns the nodes). True: ``PythonSlicer -m perfusionai <job.to_argv()> --progress lines`` as
        :meth:`start` runs it. Either way ``readOutputs()`` reads the job's ``out`` folder into nodes,
        so both routes give the same nodes.
        """
        if not inBackground:
            if self.isRunning:
                raise PerfusionAIError(_("{name}: a computation is already running; cancel it first.").format(
                    name=self.name))
            logging.info(self.name + ": in process: " + " ".join(job.to_argv()))
            self.startTime = time.time()
            try:
                job.run(progress=progressCallback)
                return readOutputs()
            finally:
                if self.workDir and os.path.isdir(self.workDir):
                    shutil.rmtree(self.workDir, ignore_errors=True)
                self.workDir = None
        command = [slicer_support.python_launcher(), "-m", "perfusionai", *job.to_argv(), "--progress", "lines"]
        return self.start(command, readOutputs, progressCallback, completedCallback,
                          waitForCompletion=waitForCompletion, cpuOnly=cpuOnly, logCallback=logCallback)

    def cancel(self) -> None:
        """Stop the running process (the launcher and the Python process it started)."""
        if self.process is None:
            return
        self._cancelRequested = True
        slicer_support.kill_process_tree(self.process.pid)

    def poll(self) -> bool:
        """Hand new output lines to the callbacks; finish the run when the process has ended. True when done."""
        if self.process is None:
            return True
        self._drain()
        if self.process.poll() is None or self._reader.is_alive():
            return False
        self._drain()
        self._stopPolling()
        self.outcome = self._collect(self.process.returncode)
        if self.outcome.get("error"):
            logging.error(self.name + ": " + self.outcome["error"])
        completedCallback, self._completedCallback = self._completedCallback, None
        self._progressCallback = self._logCallback = None
        if completedCallback is not None:
            try:
                completedCallback(self.outcome)
            except Exception:  # a timer callback must not raise into Qt's event loop
                logging.exception(self.name + ": the completion handler failed")
        return True

    # -- internals ----------------------------------------------------------------------

    @staticmethod
    def _readLines(stream, lines) -> None:
        for line in iter(stream.readline, ""):
            lines.put(line.rstrip("\n"))
        stream.close()

    def _drain(self) -> None:
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            self._onLine(line)

    def _startPolling(self) -> None:
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.poll)
        self._timer.start()

    def _stopPolling(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _onSceneClose(self, caller=None, event=None) -> None:
        if self.isRunning:
            logging.info(self.name + ": scene closed, stopping the background run")
            self.cancel()

    def _onLine(self, line) -> None:
        self._output.append(line)
        try:
            parsed = slicer_support.parse_progress_line(line)
            if parsed is not None:
                if self._progressCallback is not None:
                    self._progressCallback(parsed[0], parsed[1])
            elif line.strip():
                logging.info("perfusionai: " + line)
                if self._logCallback is not None:
                    self._logCallback(line)
        except Exception:  # a GUI callback failing must not stop the run's bookkeeping
            logging.exception(self.name + ": a progress/log handler failed")

    def _collect(self, returnCode) -> dict:
        """The outcome of a finished run; the scene nodes are read before the folder is removed."""
        try:
            if self._cancelRequested:
                outcome = {"cancelled": True}
            elif returnCode != 0:
                outcome = {"error": slicer_support.error_message_from_output(self._output)}
            else:
                outcome = {"nodes": self._readOutputs()}
        except PerfusionAIError as exc:
            outcome = {"error": str(exc)}
        except Exception as exc:  # reading outputs runs in a timer callback: never let it escape
            logging.exception(self.name + ": reading the results failed")
            outcome = {"error": _("Reading the results failed: {error}").format(error=f"{type(exc).__name__}: {exc}")}
        finally:
            self.process = None
            if self._sceneObserverTag is not None:
                slicer.mrmlScene.RemoveObserver(self._sceneObserverTag)
                self._sceneObserverTag = None
            if self.workDir and os.path.isdir(self.workDir):
                shutil.rmtree(self.workDir, ignore_errors=True)
            self.workDir = None
            self._readOutputs = None
        return outcome


# --------------------------------------------------------------------------------------
# the panel side: Apply / progress / log / Cancel / completion


class RunPanel:
    """The run controls of a module panel, the same in the four modules.

    ``ui`` must have ``applyButton``, ``cancelButton``, ``progressBar`` and ``statusLabel``;
    ``layout`` is the panel's layout, where a collapsible "Log" box (time-stamped lines with the
    elapsed time) is added. ``describe`` is the task ("Computing the DSC maps") used in messages;
    ``cancel()`` stops a background run; ``refresh()`` updates the panel (Apply enabled) when a run ends.
    Usage in a widget::

        self.runPanel = RunPanel(self.ui, self.layout, _("Computing the DSC maps"))
        ...
        def onApplyButton(self):
            self.runPanel.run(lambda: self.logic.ensureDependencies(...),
                              lambda progress, log, done: self.logic.processWithParameterNode(
                                  p, progressCallback=progress, logCallback=log, completedCallback=done),
                              self.showResults, background=p.runInBackground)
    """

    def __init__(self, ui, layout, describe, cancel=None, refresh=None) -> None:
        self.ui = ui
        self.describe = describe
        self.cancelFunction = cancel
        self.refresh = refresh
        self.running = False
        self.startTime = None
        self._background = False
        self._showResults = None
        self.logBox = None
        self.logText = None
        if layout is not None:
            import ctk

            self.logBox = ctk.ctkCollapsibleButton()
            self.logBox.text = _("Log")
            self.logBox.collapsed = True
            boxLayout = qt.QVBoxLayout(self.logBox)
            self.logText = qt.QPlainTextEdit()
            self.logText.setReadOnly(True)
            self.logText.setMaximumBlockCount(2000)
            boxLayout.addWidget(self.logText)
            layout.addWidget(self.logBox)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.enabled = False
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

    # -- log ---------------------------------------------------------------------------

    def log(self, message) -> None:
        elapsed = "" if self.startTime is None else f"[{time.time() - self.startTime:7.1f} s] "
        if self.logText is not None:
            self.logText.appendPlainText(elapsed + str(message))
        logging.info(str(message))

    # -- the run -----------------------------------------------------------------------

    def run(self, ensure, start, showResults, background=True) -> None:
        """``ensure()`` -> bool (dependencies); ``start(progress, log, completed)`` -> nodes or None (background)."""
        with slicer.util.tryWithErrorDisplay(_("{task} failed.").format(task=self.describe), waitCursor=False):
            try:
                if not ensure():
                    self.ui.statusLabel.text = _("Not started: the needed packages were not installed.")
                    return
                self._begin(background, showResults)
                nodes = start(self.onProgress, self.log, self.onCompleted if background else None)
                if not background:
                    self.onCompleted({"nodes": nodes})
            except PerfusionAIError as exc:
                self._end()
                self.ui.statusLabel.text = _("Failed.")
                self.log(_("Failed: {error}").format(error=exc))
                slicer.util.errorDisplay(str(exc))
            except Exception:
                self._end()
                self.ui.statusLabel.text = _("Failed.")
                raise

    def _begin(self, background, showResults) -> None:
        self.running = True
        self._background = background
        self._showResults = showResults
        self.startTime = time.time()
        if self.logText is not None:
            self.logText.clear()
        self.log(_("{task} started.").format(task=self.describe))
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting...")
        self.ui.applyButton.enabled = False
        self.ui.cancelButton.enabled = background

    def _end(self) -> None:
        self.running = False
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.enabled = False
        if self.refresh is not None:
            self.refresh()

    def onProgress(self, fraction, message) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        if message:
            self.log(f"{100 * fraction:5.1f} %  {message}")
        if not self._background:
            slicer.app.processEvents()

    def onCancel(self) -> None:
        if self.cancelFunction is not None:
            self.cancelFunction()
        self.ui.statusLabel.text = _("Cancelling...")
        self.log(_("Cancel requested."))

    def onCompleted(self, outcome) -> None:
        """``outcome``: {"nodes": ...} on success, {"cancelled": True} or {"error": message}."""
        self._end()
        elapsed = time.time() - (self.startTime or time.time())
        if outcome.get("cancelled"):
            self.ui.statusLabel.text = _("Cancelled.")
            self.log(_("Cancelled after {seconds:.1f} s.").format(seconds=elapsed))
            return
        if outcome.get("error"):
            self.ui.statusLabel.text = _("Failed.")
            self.log(_("Failed after {seconds:.1f} s: {error}").format(seconds=elapsed, error=outcome["error"]))
            slicer.util.errorDisplay(_("{task} failed:").format(task=self.describe) + "\n" + outcome["error"])
            return
        self.log(_("Done in {seconds:.1f} s.").format(seconds=elapsed))
        try:
            message = self._showResults(outcome["nodes"]) if self._showResults is not None else None
            self.ui.statusLabel.text = message or _("Done.")
        except Exception as exc:  # may run in a timer callback: report, never raise into Qt
            logging.exception("showing the results failed")
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("{task}: showing the results failed:").format(task=self.describe) + f"\n{exc}")


# --------------------------------------------------------------------------------------
# small panel helpers


class Show3DButton:
    """A checkable *Show 3D* button for the result segmentations (closed surfaces built when first shown)."""

    def __init__(self, layout) -> None:
        self.segmentations = []
        self.button = qt.QPushButton(_("Show 3D"))
        self.button.checkable = True
        self.button.enabled = False
        self.button.toolTip = _("Show the result segmentation(s) in the 3D view")
        self.button.connect("toggled(bool)", self.onToggled)
        layout.addWidget(self.button)

    def setSegmentations(self, nodes) -> None:
        self.segmentations = [n for n in nodes if n is not None]
        self.button.enabled = bool(self.segmentations)
        if self.button.checked:
            self.onToggled(True)

    def onToggled(self, checked) -> None:
        from perfusionai import mrml

        for node in self.segmentations:
            if node.GetScene() is not None:
                mrml.show_segmentation_3d(node, bool(checked))


def addFolderBrowseButton(pathLineEdit, title):
    """Add a *Folder...* button to a ctkPathLineEdit, for models stored as folders (the field's own
    browse button picks files, e.g. a model .zip)."""
    button = qt.QToolButton()
    button.text = _("Folder...")
    button.toolTip = _("Choose a model folder")

    def choose():
        folder = qt.QFileDialog.getExistingDirectory(pathLineEdit, title, pathLineEdit.currentPath)
        if folder:
            pathLineEdit.currentPath = folder

    button.connect("clicked()", choose)
    pathLineEdit.layout().addWidget(button)
    return button
