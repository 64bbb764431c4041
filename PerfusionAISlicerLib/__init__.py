"""Slicer-side helpers shared by the four PerfusionAI modules (imports slicer; never used by the core).

* :func:`ensurePythonRequirements` -- install missing pip requirements after one confirmation;
* :func:`ensureTorch` -- torch only through the PyTorch extension (PyTorchUtils);
* :class:`BackgroundRun` -- one ``PythonSlicer -m perfusionai ...`` run: ``PROGRESS`` lines to a
  progress callback, Cancel (kills the launcher and the Python process it started), the outcome
  protocol ``{"nodes"|"error"|"cancelled": ...}`` and removal of the run's temporary folder.

The Qt-free parts (command lines, progress parsing, process-tree killing, requirement checks)
live in :mod:`perfusionai.slicer_support` and are tested there. The extension installs this
package next to the modules (top-level CMakeLists.txt); in a source checkout each module puts
the checkout root on ``sys.path``, which makes it importable as well.
"""

import logging
import os
import shutil

import slicer
from slicer.i18n import tr as _

from perfusionai import slicer_support
from perfusionai.errors import PerfusionAIError


def ensurePythonRequirements(missing, requester) -> bool:
    """Install the pip requirement strings ``missing`` (after one confirmation); False when declined."""
    if not missing:
        return True
    try:
        import slicer.packaging as packaging  # Slicer >= 5.12
    except ImportError:
        packaging = None
    if packaging is not None:
        packaging.pip_ensure(missing, requester=requester)
    else:
        if not slicer.util.confirmOkCancelDisplay(
                _("{requester} needs these Python packages, which will be downloaded and installed now:").format(
                    requester=requester),
                detailedText="\n".join(missing)):
            return False
        slicer.util.pip_install(missing)
    return not slicer_support.missing_requirements(missing)


def ensureTorch(neededBy) -> bool:
    """Install torch through the PyTorch extension (needs the running application); False when declined."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise PerfusionAIError(slicer_support.pytorch_extension_missing_message(neededBy))
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled():
        torch = torchLogic.installTorch(askConfirmation=True,
                                        torchVersionRequirement=slicer_support.TORCH_VERSION_REQUIREMENT)
        if torch is None:
            return False
    return True


class BackgroundRun:
    """A ``perfusionai`` command run in a background process of the Slicer application.

    ``name`` labels the log lines and the temporary folder. Usage::

        run = BackgroundRun("DSCDeconvolution")
        workDir = run.newWorkDir()                # write the inputs here
        run.start(command, readOutputs, progressCallback, completedCallback)

    ``readOutputs()`` turns the finished run's files into scene nodes; it is called only when the
    process exited with status 0 and was not cancelled. ``completedCallback(outcome)`` receives
    ``{"nodes": readOutputs()}``, ``{"error": message}`` or ``{"cancelled": True}``.
    """

    def __init__(self, name) -> None:
        self.name = name
        self.process = None
        self.workDir = None
        self._output = []
        self._cancelRequested = False
        self._readOutputs = None
        self._progressCallback = None
        self._completedCallback = None

    @property
    def isRunning(self) -> bool:
        return self.process is not None

    def newWorkDir(self) -> str:
        """A fresh temporary folder for this run's inputs and outputs (removed when the run ends)."""
        self.workDir = slicer.util.tempDirectory(self.name)
        return self.workDir

    def start(self, command, readOutputs, progressCallback=None, completedCallback=None, waitForCompletion=False,
              cpuOnly=True):
        """Launch ``command``; without waiting returns None and reports through ``completedCallback``.

        With ``waitForCompletion`` the output is read here and the nodes are returned (an error
        raises :class:`PerfusionAIError`). ``cpuOnly`` hides CUDA from the process.
        """
        if self.isRunning:
            raise PerfusionAIError(_("{name}: a computation is already running; cancel it first.").format(
                name=self.name))
        logging.info(self.name + ": " + " ".join(command))
        self._output = []
        self._cancelRequested = False
        self._readOutputs = readOutputs
        self._progressCallback = progressCallback
        self._completedCallback = completedCallback
        environment = slicer_support.background_environment(slicer.util.startupEnvironment().get("PYTHONPATH"),
                                                            cpu_only=cpuOnly)
        if waitForCompletion:
            self.process = slicer.util.launchConsoleProcess(command, updateEnvironment=environment)
            for line in self.process.stdout:
                self._onLine(line.rstrip("\n"))
            outcome = self._collect(self.process.wait())
            if outcome.get("error"):
                raise PerfusionAIError(outcome["error"])
            return outcome.get("nodes")
        self.process = slicer.util.launchConsoleProcess(command, updateEnvironment=environment, blocking=False,
                                                        logCallback=self._onLine,
                                                        completedCallback=self._onCompleted)
        return None

    def cancel(self) -> None:
        """Stop the running process (the launcher and the Python process it started)."""
        if self.process is None:
            return
        self._cancelRequested = True
        slicer_support.kill_process_tree(self.process.pid)

    def _onLine(self, line) -> None:
        self._output.append(line)
        parsed = slicer_support.parse_progress_line(line)
        if parsed is not None and self._progressCallback is not None:
            self._progressCallback(parsed[0], parsed[1])
        elif parsed is None and line.strip():
            logging.info("perfusionai: " + line)

    def _onCompleted(self, returnCode) -> None:
        completedCallback = self._completedCallback
        outcome = self._collect(returnCode)
        if outcome.get("error"):
            logging.error(self.name + ": " + outcome["error"])
        if completedCallback is not None:
            completedCallback(outcome)

    def _collect(self, returnCode) -> dict:
        """The outcome of a finished run; the scene nodes are read before the folder is removed."""
        self.process = None
        try:
            if self._cancelRequested:
                outcome = {"cancelled": True}
            elif returnCode != 0:
                outcome = {"error": slicer_support.error_message_from_output(self._output)}
            else:
                outcome = {"nodes": self._readOutputs()}
        except PerfusionAIError as exc:
            outcome = {"error": str(exc)}
        finally:
            if self.workDir and os.path.isdir(self.workDir):
                shutil.rmtree(self.workDir, ignore_errors=True)
            self.workDir = None
            self._readOutputs = self._progressCallback = self._completedCallback = None
        return outcome
