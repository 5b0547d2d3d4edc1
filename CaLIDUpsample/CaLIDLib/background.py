"""The life cycle of one background ``calid`` run, shared by the CaLID logics (upsampling, fine-tuning).

A run gets a temporary folder for what the worker reads (volumes exported from the scene); its ``calid``
command runs with Slicer's Python in a ``WorkerProcess``; its output lines become progress and log callbacks.
When the worker ends, the results of a successful run are loaded by the concrete logic, a cancelled or
failed run loads nothing, and the temporary folder is removed in every case. Closing the scene cancels the run
(its results would land in the next scene, and the panel's parameter node is gone), even one whose worker has
just finished. ``waitForCompletion=True``
(scripting, default) blocks; ``False`` returns at once and the caller calls ``poll()`` from a timer, as
the panels do.

``setStandby(True)`` (the panels do it) keeps one ``calid standby`` worker ready between runs, so a run does
not wait for Python to start and import PyTorch and MONAI: measured by ``Testing/Benchmarks/benchmark_upsample.py``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .protocol import WorkerEvent, parse_line
from .worker import WorkerProcess

MODULE_DIR = Path(__file__).resolve().parents[1]  # holds the ``calid`` engine package

ProgressCallback = Callable[[float, str, "float | None"], None]
"""``callback(fraction in [0, 1], stage text, estimated seconds remaining or None)``."""

FinishedCallback = Callable[[object, "Exception | None"], None]
"""``onFinished(result or None, error or None)``: called once when a run ends, however it ends."""

Prepare = Callable[[Path], "tuple[list[str], Callable[[], object]]"]
"""``prepare(temporary folder) -> (worker command, load results)``: writes the worker's inputs there."""


class WorkerError(RuntimeError):
    """The worker failed; the message is the worker's own one-line explanation."""


@dataclass
class _Job:
    worker: WorkerProcess
    folder: Path
    load_results: Callable[[], object]
    progress: ProgressCallback | None
    on_finished: FinishedCallback | None
    stage: str = ""
    error: str = ""
    cancelled: bool = False
    """Cancelled by the caller or by the scene's closing: nothing is loaded, whatever the worker did."""


class WorkerLogic:
    """Base of the Qt-free logics: one background run at a time on ``scene``, with ``python`` as the worker."""

    def __init__(self, scene=None, python: str | None = None):
        if scene is None:
            import slicer

            scene = slicer.mrmlScene
        self.scene = scene
        self.python = python or shutil.which("PythonSlicer") or sys.executable
        self.job: _Job | None = None
        self.logCallback: Callable[[str], None] | None = None
        self.keepStandby = False
        self.standby: WorkerProcess | None = None
        self._closeObserver = self.scene.AddObserver(self.scene.StartCloseEvent, self._onSceneStartClose)

    @staticmethod
    def workerEnvironment() -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MODULE_DIR), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"  # what WorkerProcess reads, whatever the locale (cp1252 on Windows)
        return env

    def poll(self) -> bool:
        """For the panel's timer: forward new output; on completion load results. True while running."""
        job = self.job
        if job is None:
            return False
        if self._forward(job, wait=False):
            return True
        self._finish(job, raise_errors=False)
        return False

    def cancel(self) -> None:
        """Stop the run (its worker's whole process tree); ``poll`` or the blocking wait then finishes it."""
        if self.job is not None:
            self.job.cancelled = True
            self.job.worker.cancel()

    def shutdown(self) -> None:
        """End for good (the panel's cleanup: a module reloaded, the application closing): the standby worker
        stopped, the run cancelled and waited for (its tree killed after the grace), its folder, which holds the
        patient's exported volume, removed, and the scene no longer observed. The run's callbacks are not called:
        the panel that gave them is going away. Before, the cleanup only cancelled, and nothing was left to finish the
        run: the exported volume stayed in the temporary folder."""
        self.setStandby(False)
        job = self.job
        if job is not None:
            job.progress = job.on_finished = None
            self.cancel()
            job.worker.wait(lambda line: None)
            self._finish(job, raise_errors=False)
        self.scene.RemoveObserver(self._closeObserver)

    def _onSceneStartClose(self, caller=None, event=None) -> None:
        # At interpreter exit VTK may close a scene after Python has already torn this object down (its attributes
        # gone): nothing can be running then, and a traceback there would only alarm.
        if hasattr(self, "job"):
            self.cancel()

    @property
    def isRunning(self) -> bool:
        return self.job is not None

    def setStandby(self, enabled: bool) -> None:
        """Keep a worker that has already imported the engine waiting for the next run (it holds the memory of
        PyTorch and MONAI, a few hundred MB, while it waits), or stop the one waiting."""
        self.keepStandby = enabled
        if enabled:
            self._startStandby()
        elif self.standby is not None:
            self.standby.discard()
            self.standby.cancel()
            self.standby = None

    def _startStandby(self) -> None:
        if self.job is None and (self.standby is None or not self.standby.isStandingBy):
            if self.standby is not None:  # it ended while waiting (idle too long)
                self.standby.discard()
            self.standby = WorkerProcess.standby(self.python, self.workerEnvironment())

    def _newWorker(self, command: list[str]) -> WorkerProcess:
        """The waiting standby worker given this command, when it runs ``calid`` with this Python; else a new one."""
        standby, self.standby = self.standby, None
        if standby is not None and command[:3] == [self.python, "-m", "calid"] and standby.isStandingBy:
            standby.send(command[3:])
            return standby
        if standby is not None:
            standby.discard()
        worker = WorkerProcess(command, self.workerEnvironment())
        worker.start()
        return worker

    # ------------------------------------------------------------------ for the concrete logics
    def _runWorker(self, prepare: Prepare, progressCallback: ProgressCallback | None,
                   onFinished: FinishedCallback | None, waitForCompletion: bool):
        """Start the run; blocking: wait and return its results (None when cancelled), else return None."""
        self._checkIdle()
        folder = Path(tempfile.mkdtemp(prefix="CaLID-"))
        try:
            command, load_results = prepare(folder)
            self.job = _Job(self._newWorker(command), folder, load_results, progressCallback, onFinished)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            self.job = None
            raise
        if not waitForCompletion:
            return None
        job = self.job
        self._forward(job, wait=True)
        return self._finish(job, raise_errors=True)

    def _checkIdle(self) -> None:
        if self.job is not None:
            raise RuntimeError("a CaLID run is already in progress")

    def _onEvent(self, event: WorkerEvent) -> None:
        """Events beyond progress and log lines (``done``, training ``metrics``); ignored unless overridden."""

    def _onEnded(self, result) -> None:
        """Called once when a run ends, however it ends (``result`` None unless it succeeded), before
        ``onFinished``; nothing to do unless overridden."""

    # ------------------------------------------------------------------ internals
    def _forward(self, job: _Job, wait: bool) -> bool:
        """Deliver the worker's lines to the callbacks (until it ends when ``wait``); True while it runs.

        A callback that raises (or Ctrl-C in a blocking wait) ends the run as a cancel would, worker stopped and
        folder removed, and its exception goes on to the caller; before, the logic stayed "running" for ever."""
        try:
            if wait:
                job.worker.wait(self._onLine)
                return False
            return job.worker.poll(self._onLine)
        except BaseException:
            self.cancel()
            job.worker.wait(lambda line: None)
            self._finish(job, raise_errors=False)
            raise

    def _onLine(self, line: str) -> None:
        job = self.job
        event = parse_line(line)
        if event is None or job is None:
            return
        if event.kind == "stage":
            job.stage = event.text
        elif event.kind == "progress":
            if job.progress is not None:
                job.progress(event.fraction, job.stage, event.data.get("remaining_s"))
        elif event.kind == "log":
            if event.text.startswith("calid: "):
                job.error = event.text.split(": ", 2)[-1] if event.text.startswith("calid: error:") else event.text
            if self.logCallback is not None:
                self.logCallback(event.text)
            elif event.data.get("event") == "warning":  # a script without a log still hears the warnings
                print(f"calid: warning: {event.text}")
        else:
            self._onEvent(event)

    def _finish(self, job: _Job, raise_errors: bool):
        result, error = None, None
        try:
            code = job.worker.returncode
            if job.cancelled:
                return None
            if code != 0:
                raise WorkerError(job.error or f"the CaLID worker failed (exit code {code})")
            result = job.load_results()
            return result
        except Exception as exc:
            error = exc
            if raise_errors:
                raise
            return None
        finally:
            shutil.rmtree(job.folder, ignore_errors=True)
            job.worker.discard()
            self.job = None
            if self.keepStandby:
                self._startStandby()
            try:
                self._onEnded(result)
            finally:  # the panel's buttons and progress are restored whatever the hook does
                if job.on_finished is not None:
                    job.on_finished(result, error)
