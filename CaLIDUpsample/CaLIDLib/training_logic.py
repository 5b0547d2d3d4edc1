"""CaLIDTrainingLogic: fine-tune a CaLID model on volumes of the scene (or a data folder) with ``calid train``.

Scene volumes are exported to ``<temporary folder>/data/<node name>.nrrd`` (each one a patient of the
trainer's split); a folder is passed as it is. ``calid train --init BASE --progress json`` runs in the
background like the upsampling worker (``WorkerLogic``); its ``metrics`` events fill a table node and two
plot charts while it runs. The run folder ``<user models folder>/../runs/<name>`` (``~/.calid/runs`` by
default) keeps the checkpoint, metrics and curves; on success the finished ``model/`` is copied into the
user models folder under the chosen name, so ``calid models`` and the CaLID Upsample panel list it at once.

``timeLimitMinutes`` ends the training after that many minutes even if its steps are not done
(``--denoiser-minutes``) and the model is kept as it is then: on a machine of unknown speed a user can say how
long, not only how many steps.

Stop sends SIGTERM: ``calid train`` exits with code 130 and the last checkpoint stays as it was (checkpoints
are written atomically), so fine-tuning runs write one every ``checkpointEvery`` steps (25 by default) and
Stop loses at most that much work. ``resume=True`` continues the run from that checkpoint with ``--resume``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from calid.modelindex import BUNDLED_DIR, DEFAULT_MODEL, import_model, user_models_dir

from .background import FinishedCallback, ProgressCallback, WorkerLogic
from .curves import TrainingCurves
from .protocol import WorkerEvent
from .volumes import write_nodes

CHECKPOINT = "checkpoint.safetensors"  # calid.training.checkpoint.CHECKPOINT (whose package imports torch: not here)
CHECKPOINT_EVERY = 25
LOG_EVERY = 5
VALIDATIONS = 5
"""About this many validation passes per run: each one upsamples a few stacks, which is slow on a CPU."""


def runs_dir() -> Path:
    """Training run folders: beside the user models folder (``~/.calid/runs``, or next to ``$CALID_MODELS_DIR``)."""
    return user_models_dir().parent / "runs"


def describe_metrics(row: dict) -> str:
    """One log line for a ``metrics`` event."""
    if row.get("loss") is not None:
        return f"step {row['step']}: loss {row['loss']:.4g}"
    return (f"step {row['step']}: validation PSNR {row['val_psnr_model']:.2f} dB "
            f"(linear interpolation {row['val_psnr_linear']:.2f} dB)")


class CaLIDTrainingLogic(WorkerLogic):
    def __init__(self, scene=None, python: str | None = None):
        super().__init__(scene, python)
        self.curves: TrainingCurves | None = None

    @staticmethod
    def runFolder(outputName: str) -> Path:
        return runs_dir() / outputName

    @classmethod
    def canResume(cls, outputName: str) -> bool:
        """True when a stopped run of that name has a checkpoint to continue from."""
        return bool(outputName) and (cls.runFolder(outputName) / CHECKPOINT).is_file()

    # ------------------------------------------------------------------ command
    def workerCommand(self, data: Path, run: Path, baseModel: str, steps: int, batchSize: int, learningRate: float,
                      device: str, outputName: str, validationFraction: float, checkpointEvery: int, resume: bool,
                      description: str, timeLimitMinutes: float = 0, dataSource: str = "") -> list[str]:
        """``dataSource``: what the card names as the training data, when ``data`` is a temporary export of the
        scene's volumes (its path would name a folder gone after the run)."""
        cmd = [self.python, "-m", "calid", "train", str(data), "--output", str(run), "--init", str(baseModel),
               "--denoiser-steps", str(steps), "--denoiser-batch", str(batchSize), "--lr", str(learningRate),
               "--warmup", str(steps // 10), "--val-fraction", str(validationFraction),
               "--val-every", str(max(1, steps // VALIDATIONS)), "--log-every", str(LOG_EVERY),
               "--checkpoint-every", str(checkpointEvery), "--device", device, "--name", outputName,
               "--description", description, "--progress", "json"]
        if timeLimitMinutes > 0:
            cmd += ["--denoiser-minutes", str(timeLimitMinutes)]
        if dataSource:
            cmd += ["--data-source", dataSource]
        return cmd + ["--resume"] if resume else cmd

    # ------------------------------------------------------------------ public API
    def train(self, volumesOrFolder, baseModel: str = DEFAULT_MODEL, steps: int = 300, batchSize: int = 8,
              learningRate: float = 1e-4, timeLimitMinutes: float = 0, device: str = "auto",
              outputName: str = "calid-finetuned",
              validationFraction: float = 0.2, waitForCompletion: bool = True,
              progressCallback: ProgressCallback | None = None, resume: bool = False,
              onFinished: FinishedCallback | None = None, checkpointEvery: int = CHECKPOINT_EVERY):
        """Fine-tune ``baseModel`` on volume nodes (or a folder of volume files) into the user model ``outputName``;
        ``timeLimitMinutes`` > 0 ends it after that many minutes (the model as it is then).

        Returns the new model's folder (blocking), or None when stopped or non-blocking (then call ``poll()``
        until it returns False; ``onFinished(modelFolder, error)`` is called).
        """
        self._checkIdle()
        if not re.fullmatch(r"\w[\w.-]*", outputName or ""):
            raise ValueError(f"model name {outputName!r}: begin with a letter or digit; then letters, digits, '-', "
                             "'_' and '.' only")
        for what, value, smallest in (("steps", steps, 1), ("batch size", batchSize, 1),
                                      ("checkpoint interval", checkpointEvery, 1)):
            if int(value) != value or value < smallest:
                raise ValueError(f"{what} must be a whole number of at least {smallest}, not {value}")
        if not learningRate > 0:
            raise ValueError(f"learning rate must be positive, not {learningRate}")
        if timeLimitMinutes < 0:
            raise ValueError(f"time limit must be 0 (none) or a number of minutes, not {timeLimitMinutes}")
        if not 0 <= validationFraction < 1:
            raise ValueError(f"validation fraction must be from 0 (none) to below 1, not {validationFraction}")
        if (user_models_dir() / outputName).exists() or (BUNDLED_DIR / outputName).exists():  # of either kind
            raise ValueError(f"a model named {outputName} already exists: choose another name")
        source = self._source(volumesOrFolder)
        run = self.runFolder(outputName)
        checkpointed = self.canResume(outputName)
        if resume and not run.is_dir():
            raise ValueError(f"no stopped run named {outputName} to resume in {runs_dir()}")
        if not resume and checkpointed:
            raise ValueError(f"a run named {outputName} already exists in {runs_dir()}: "
                             "resume it or choose another name")
        if not checkpointed:  # stopped before its first checkpoint: nothing to continue, start again
            shutil.rmtree(run, ignore_errors=True)
        self._startCurves(outputName, run if checkpointed else None)
        onVolumes = "" if isinstance(source, Path) else \
            "3D Slicer volumes " + ", ".join(n.GetName() for n in source)
        description = f"fine-tuned in 3D Slicer from {baseModel} on {onVolumes or source}"

        def prepare(folder: Path):
            data = source
            if not isinstance(source, Path):
                data = folder / "data"
                write_nodes(source, data)
            command = self.workerCommand(data, run, baseModel, steps, batchSize, learningRate, device, outputName,
                                         validationFraction, checkpointEvery, checkpointed, description,
                                         timeLimitMinutes, onVolumes)
            return command, lambda: import_model(run / "model", outputName)

        return self._runWorker(prepare, progressCallback, onFinished, waitForCompletion)

    def stop(self) -> None:
        """Stop the run; it keeps its last checkpoint, and ``train(..., resume=True)`` continues from there."""
        self.cancel()

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _source(volumesOrFolder):
        """A data folder as a Path, or the list of volume nodes to export."""
        if isinstance(volumesOrFolder, (str, os.PathLike)):
            folder = Path(volumesOrFolder)
            if not folder.is_dir():
                raise ValueError(f"training data folder not found: {folder}")
            return folder
        nodes = [volumesOrFolder] if hasattr(volumesOrFolder, "GetImageData") else list(volumesOrFolder or [])
        if not nodes:
            raise ValueError("select at least one volume to train on")
        for node in nodes:  # before the run's curves are made: a refused start leaves the scene as it was
            if node is None or node.GetImageData() is None:
                raise ValueError(f"volume {node.GetName() if node else None} is empty")
        return nodes

    def _startCurves(self, outputName: str, resumedRun: Path | None) -> None:
        """The run's curves: empty for a new run, the metrics logged so far when resuming."""
        self.curves = TrainingCurves(self.scene, outputName)
        self.curves.clear()
        history = resumedRun / "metrics.jsonl" if resumedRun else None
        if history is not None and history.is_file():
            for line in history.read_text(encoding="utf-8").splitlines():
                self.curves.add(json.loads(line))

    def _onSceneStartClose(self, caller=None, event=None) -> None:
        """The run is cancelled (``WorkerLogic``) and its curves go with the scene: none is shown from it after."""
        super()._onSceneStartClose(caller, event)
        if hasattr(self, "curves"):  # see the base: at interpreter exit the attributes may be gone
            self.curves = None

    def _onEnded(self, result) -> None:
        """A run that ended without a model and without a single metrics row (the worker refused it, or it was
        stopped before its first log step) leaves no empty table and charts in the scene."""
        if result is None and self.curves is not None and not self.curves.rows():
            self.curves.remove()
            self.curves = None

    def _onEvent(self, event: WorkerEvent) -> None:
        if event.kind != "metrics" or self.curves is None:
            return
        self.curves.add(event.data)
        if self.logCallback is not None:
            self.logCallback(describe_metrics(event.data))
