"""CaLIDTraining: fine-tune a CaLID model on the site's own short-axis stacks (Slicer scripted module).

This file holds only the Qt panel, the module description and the self-test. The logic is the Qt-free
``CaLIDLib.training_logic`` (tested outside Slicer against slicer-core), and ``calid train`` runs in a
background process started with Slicer's Python, so the application never freezes.

``CaLIDLib``, the ``calid`` engine and ``CaLIDUpsample.py`` (whose ``CaLIDPanel`` this panel extends) belong
to the CaLIDUpsample module. Installed from the Extension Manager, both modules lie in the same
``qt-scripted-modules`` folder, which is on ``sys.path``. From a source checkout (both module folders added to
the additional module paths) they are in the sibling folder ``../CaLIDUpsample``, which is not on ``sys.path``
yet if this module is loaded first; it is added below.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

_SOURCE_SIBLING = Path(__file__).resolve().parents[1] / "CaLIDUpsample"
if (_SOURCE_SIBLING / "CaLIDLib").is_dir() and str(_SOURCE_SIBLING) not in sys.path:
    sys.path.append(str(_SOURCE_SIBLING))

import slicer  # noqa: E402
from CaLIDLib.support import require_supported  # noqa: E402 (importing CaLIDLib refuses Slicer 5.8's Python)

require_supported((slicer.app.majorVersion, slicer.app.minorVersion))  # Slicer >= 5.10, or one line at load

from slicer.i18n import tr as _  # noqa: E402
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

from CaLIDLib import CaLIDTrainingLogic as _QtFreeLogic  # noqa: E402
from calid.modelindex import DEFAULT_MODEL  # noqa: E402
from CaLIDUpsample import SAMPLE_PATH, CaLIDPanel, fillModelCombo, skipWithoutEngine  # noqa: E402


class CaLIDTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CaLID Training")
        self.parent.categories = [_("Cardiac")]
        self.parent.dependencies = ["CaLIDUpsample"]
        self.parent.contributors = ["SlicerCaLID contributors"]
        self.parent.helpText = _(
            "Fine-tunes a CaLID model on short-axis stacks of the scene (or a folder of volume files): the model's "
            "VAE is kept and its slice-interpolation denoiser trained further, in a background process. The new "
            "model appears in CaLID Upsample's model list. Stop keeps the last checkpoint; Resume continues. "
            "Research use only, not for diagnosis."
        )
        self.parent.acknowledgementText = _(
            "Method: Bubeck et al., Latent Interpolation Learning Using Diffusion Models for Cardiac Volume "
            "Reconstruction, arXiv 2508.13826. Bundled base models trained on ACDC (Bernard et al., IEEE TMI 2018; "
            "non-commercial; the default one also on Sunnybrook Cardiac Data, CC0): fine-tuned models inherit "
            "their terms."
        )


@parameterNodeWrapper
class CaLIDTrainingParameterNode:
    useDataFolder: bool = False
    dataFolder: Path
    validationFraction: Annotated[float, WithinRange(0.0, 0.5)] = 0.2
    baseModel: str = DEFAULT_MODEL
    steps: Annotated[int, WithinRange(1, 100000)] = 300
    batchSize: Annotated[int, WithinRange(1, 256)] = 8
    learningRate: Annotated[float, WithinRange(0.000001, 0.01)] = 0.0001
    timeLimitMinutes: Annotated[int, WithinRange(0, 10000)] = 0
    device: str = "auto"
    outputName: str = "calid-finetuned"


class CaLIDTrainingWidget(CaLIDPanel):
    """The panel; what it shares with CaLID Upsample's (parameter node, devices, models, run) is in ``CaLIDPanel``."""

    modelParameter = "baseModel"
    _runName = ""
    """The output name the current run started with (``_start``)."""

    def setup(self):
        self.setupPanel(CaLIDTrainingLogic())
        self.runButton = self.ui.startButton
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.showCurvesButton.connect("clicked(bool)", self.onShowCurves)
        self.ui.volumesComboBox.connect("checkedNodesChanged()", self.updateButtons)
        self.devices.probe()  # first: the list is being made when the stored device is looked for
        self.initializeParameterNode()

    def _trainingData(self):
        """The data folder, or the checked scene volumes; None while neither is chosen."""
        p = self._parameterNode
        if p is None:
            return None
        if p.useDataFolder:  # an empty path edit reads as Path(".")
            return p.dataFolder if str(p.dataFolder) != "." and p.dataFolder.is_dir() else None
        return self.ui.volumesComboBox.checkedNodes() or None

    def updateButtons(self, caller=None, event=None):
        if self.logic.isRunning:
            return
        p = self._parameterNode
        useFolder = bool(p and p.useDataFolder)
        self.ui.volumesComboBox.enabled = not useFolder
        self.ui.dataFolderPathLineEdit.enabled = useFolder
        ready = bool(p and p.outputName and self._trainingData())
        self.ui.startButton.text = _("Start")
        self.ui.startButton.enabled = ready
        self.ui.startButton.toolTip = (_("Start fine-tuning") if ready
                                       else _("Check training volumes (or choose a folder) and name the new model"))
        self.ui.resumeButton.enabled = ready and CaLIDTrainingLogic.canResume(p.outputName)
        self.ui.showCurvesButton.enabled = self.logic.curves is not None

    # -------------------------------------------------------------- running
    def onStartButton(self):
        if self.logic.isRunning:
            self._cancelRun(_("Stopping..."))
        else:
            self._start(resume=False)

    def onResumeButton(self):
        self._start(resume=True)

    def _start(self, resume):
        if not self._dependenciesReady():
            return
        p = self._parameterNode
        self.ui.logTextEdit.clear()
        self._runName = p.outputName  # the field stays editable meanwhile: Stop's message is about this run
        with slicer.util.tryWithErrorDisplay(_("Failed to start fine-tuning."), waitCursor=True):
            self.logic.train(
                self._trainingData(), baseModel=p.baseModel, steps=p.steps, batchSize=p.batchSize,
                learningRate=p.learningRate, timeLimitMinutes=p.timeLimitMinutes, device=p.device,
                outputName=p.outputName,
                validationFraction=p.validationFraction, waitForCompletion=False, progressCallback=self._onProgress,
                onFinished=self._onFinished, resume=resume,
            )
            self._runStarted(_("Stop"))
            self.ui.resumeButton.enabled = False
            self.ui.showCurvesButton.enabled = True

    def onShowCurves(self):
        slicer.modules.plots.logic().ShowChartInLayout(self.logic.curves.lossChart)

    def _onFinished(self, modelFolder, error):
        try:
            self._runEnded()
            if error is not None:
                slicer.util.errorDisplay(_("Fine-tuning failed: ") + str(error))
            elif modelFolder is None and self.logic.canResume(self._runName):
                self._log(_("Stopped: the run keeps its last checkpoint, Resume continues it."))
            elif modelFolder is None:  # stopped before its first checkpoint: Start begins it again
                self._log(_("Stopped before the first checkpoint: nothing was kept."))
            else:
                self._log(_("Done: model {name} is in the user models folder ({folder}); choose it in CaLID "
                            "Upsample.").format(name=modelFolder.name, folder=modelFolder.parent))
                fillModelCombo(self.ui.modelComboBox, self._parameterNode.baseModel)
        finally:  # the button reads "Start" again whatever the lines above did
            self.updateButtons()


class CaLIDTrainingLogic(ScriptedLoadableModuleLogic, _QtFreeLogic):
    """The module logic: parameter node handling from Slicer, everything else from ``CaLIDLib``.

    Console example::

        logic = slicer.util.getModuleLogic("CaLIDTraining")
        model = logic.train([getNode("CaLIDSample")], steps=300, device="cpu", outputName="calid-mysite")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        _QtFreeLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self):
        return CaLIDTrainingParameterNode(super().getParameterNode())


class CaLIDTrainingTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a two-step CPU fine-tune of the bundled model on the bundled sample and a copy,
    into a temporary models folder (skipped without PyTorch)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        skipWithoutEngine(self)
        self.test_fine_tune_on_cpu()

    def test_fine_tune_on_cpu(self):
        self.delayDisplay("Loading the bundled sample")
        sample = slicer.util.loadVolume(str(SAMPLE_PATH))
        copy = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, sample, "CaLIDSample copy")
        previous = os.environ.get("CALID_MODELS_DIR")
        with tempfile.TemporaryDirectory() as folder:
            os.environ["CALID_MODELS_DIR"] = str(Path(folder) / "models")
            try:
                fractions = []
                logic = CaLIDTrainingLogic()
                model = logic.train([sample, copy], steps=2, batchSize=2, device="cpu", outputName="selftest",
                                    progressCallback=lambda f, s, r: fractions.append(f))
                self.assertTrue((model / "model.safetensors").is_file())
                self.assertAlmostEqual(fractions[-1], 1.0)
                self.assertGreater(logic.curves.table.GetNumberOfRows(), 0)
            finally:
                if previous is None:
                    os.environ.pop("CALID_MODELS_DIR")
                else:
                    os.environ["CALID_MODELS_DIR"] = previous
        self.delayDisplay("Test passed")


__all__ = ["CaLIDTraining", "CaLIDTrainingLogic", "CaLIDTrainingTest", "CaLIDTrainingWidget"]
