"""CaLIDUpsampleLogic: upsample a volume node with the ``calid`` worker in a background process.

The input node is written to a temporary NRRD, ``calid upsample --progress json`` runs with Slicer's Python,
its progress lines are parsed, and only when it succeeds is the result loaded into the output node
(created then, so a cancelled or failed run leaves the scene unchanged). The temporary folder is always
removed. ``waitForCompletion=True`` (scripting, default) blocks; ``False`` returns at once and the caller
calls ``poll()`` from a timer, as the panel does.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .protocol import parse_line
from .volumes import update_node_from_file, write_node
from .worker import WorkerProcess

MODULE_DIR = Path(__file__).resolve().parents[1]  # holds the ``calid`` engine package

ProgressCallback = Callable[[float, str, "float | None"], None]
"""``callback(fraction in [0, 1], stage text, estimated seconds remaining or None)``."""


class WorkerError(RuntimeError):
    """The worker failed; the message is the worker's own one-line explanation."""


@dataclass
class _Run:
    worker: WorkerProcess
    folder: Path
    input_volume: object
    output_volume: object
    uncertainty_volume: object
    factor: int | None
    progress: ProgressCallback | None
    on_finished: Callable[[object, Exception | None], None] | None
    stage: str = ""
    log: list[str] = field(default_factory=list)
    error: str = ""


class CaLIDUpsampleLogic:
    def __init__(self, scene=None, python: str | None = None):
        if scene is None:
            import slicer

            scene = slicer.mrmlScene
        self.scene = scene
        self.python = python or shutil.which("PythonSlicer") or sys.executable
        self.run: _Run | None = None
        self.logCallback: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ command
    def workerCommand(self, inputPath: Path, outputPath: Path, factor=2, spacing=None, device="auto", steps=8, seed=0,
                      model=None, samples=1, uncertaintyPath=None) -> list[str]:
        cmd = [self.python, "-m", "calid", "upsample", str(inputPath), str(outputPath), "--progress", "json",
               "--device", device, "--steps", str(steps), "--seed", str(seed), "--samples", str(samples)]
        cmd += ["--spacing", str(spacing)] if spacing else ["--factor", str(factor)]
        if model:
            cmd += ["--model", str(model)]
        if uncertaintyPath:
            cmd += ["--uncertainty", str(uncertaintyPath)]
        return cmd

    @staticmethod
    def workerEnvironment() -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MODULE_DIR), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # ------------------------------------------------------------------ public API
    def process(self, inputVolume, outputVolume=None, factor=2, spacing=None, device="auto", steps=8, seed=0,
                outputSegmentation=None, waitForCompletion=True, progressCallback: ProgressCallback | None = None,
                model=None, samples=1, uncertaintyVolume=None, onFinished=None):
        """Upsample ``inputVolume``; returns the output volume node (blocking) or None (non-blocking).

        Non-blocking: call ``poll()`` until it returns False; ``onFinished(outputVolume, error)`` is called.
        """
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("input volume is empty")
        if outputVolume is not None and outputVolume is inputVolume:
            raise ValueError("the output volume must not be the input volume")
        if outputSegmentation is not None:
            raise NotImplementedError("segmentation output needs the CaLID segmentation model, not bundled yet")
        if self.run is not None:
            raise RuntimeError("an upsampling is already running")
        folder = Path(tempfile.mkdtemp(prefix="CaLID-"))
        try:
            write_node(inputVolume, folder / "input.nrrd")
            command = self.workerCommand(folder / "input.nrrd", folder / "output.nrrd", factor, spacing, device, steps,
                                         seed, model, samples, folder / "uncertainty.nrrd" if uncertaintyVolume is not None else None)
            worker = WorkerProcess(command, self.workerEnvironment())
            self.run = _Run(worker, folder, inputVolume, outputVolume, uncertaintyVolume, None if spacing else factor,
                            progressCallback, onFinished)
            worker.start()
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            self.run = None
            raise
        if not waitForCompletion:
            return None
        run = self.run
        run.worker.wait(self._onLine)
        return self._finish(run, raise_errors=True)

    def poll(self) -> bool:
        """For the panel's timer: forward new output; on completion load results. True while running."""
        run = self.run
        if run is None:
            return False
        if run.worker.poll(self._onLine):
            return True
        self._finish(run, raise_errors=False)
        return False

    def cancel(self) -> None:
        if self.run is not None:
            self.run.worker.cancel()

    @property
    def isRunning(self) -> bool:
        return self.run is not None

    # ------------------------------------------------------------------ internals
    def _onLine(self, line: str) -> None:
        run = self.run
        event = parse_line(line)
        if event is None or run is None:
            return
        if event.kind == "stage":
            run.stage = event.text
        elif event.kind == "progress" and run.progress is not None:
            run.progress(event.fraction, run.stage, None)
        elif event.kind == "eta" and run.progress is not None:
            run.progress(event.fraction, run.stage, event.data.get("remaining_s"))
        elif event.kind == "log":
            run.log.append(event.text)
            if event.text.startswith("calid: "):
                run.error = event.text.split(": ", 2)[-1] if event.text.startswith("calid: error:") else event.text
            if self.logCallback is not None:
                self.logCallback(event.text)

    def _finish(self, run: _Run, raise_errors: bool):
        output, error = None, None
        try:
            code = run.worker.returncode
            if run.worker.cancelled:
                return None
            if code != 0:
                raise WorkerError(run.error or f"the CaLID worker failed (exit code {code})")
            output = run.output_volume
            if output is None:
                name = f"{run.input_volume.GetName()}_CaLID" + (f"_x{run.factor}" if run.factor else "")
                output = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            update_node_from_file(output, run.folder / "output.nrrd")
            if run.uncertainty_volume is not None:
                update_node_from_file(run.uncertainty_volume, run.folder / "uncertainty.nrrd")
            self._showLikeInput(run.input_volume, output)
            return output
        except Exception as exc:
            error = exc
            if raise_errors:
                raise
            return None
        finally:
            shutil.rmtree(run.folder, ignore_errors=True)
            self.run = None
            if run.on_finished is not None:
                run.on_finished(output, error)

    def _showLikeInput(self, inputVolume, outputVolume) -> None:
        """Same window/level as the input, and the same place (study) in the subject hierarchy."""
        source = inputVolume.GetDisplayNode()
        if source is not None:
            if outputVolume.GetDisplayNode() is None:
                outputVolume.CreateDefaultDisplayNodes()
            target = outputVolume.GetDisplayNode()
            if target is not None:
                target.SetAutoWindowLevel(False)
                target.SetWindowLevel(source.GetWindow(), source.GetLevel())
        try:
            import slicer

            hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        except (ImportError, AttributeError):
            return
        if hierarchy is not None:
            parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(inputVolume))
            hierarchy.SetItemParent(hierarchy.GetItemByDataNode(outputVolume), parent)
