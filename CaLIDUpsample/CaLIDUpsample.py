"""CaLIDUpsample: dense cardiac volumes from sparse short-axis MRI stacks (Slicer scripted module).

This file holds only the Qt panel (its base ``CaLIDPanel`` serves the CaLIDTraining panel too), the module
description and the self-test; the logic is the Qt-free ``CaLIDLib`` package (tested outside Slicer against
slicer-core), and the model runs in a background ``calid`` process started with Slicer's Python, so the
application never freezes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from CaLIDLib.support import require_supported  # importing CaLIDLib refuses Slicer 5.8's Python by itself

require_supported((slicer.app.majorVersion, slicer.app.minorVersion))  # Slicer >= 5.10, or one line at load

from slicer.i18n import tr as _  # noqa: E402
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402

from CaLIDLib import CaLIDUpsampleLogic as _QtFreeLogic  # noqa: E402
from CaLIDLib import WorkerProcess  # noqa: E402
from CaLIDLib.dependencies import (  # noqa: E402
    InstallError,
    ensureDependencies,
    install_summary,
    self_test_skip_reason,
)
from CaLIDLib.segmentations import RV_BASE_CAVEAT  # noqa: E402
from CaLIDLib.sequences import playing_browser  # noqa: E402
from CaLIDLib.uncertainty import largest_error_sentence  # noqa: E402
from CaLIDLib.views import show_table  # noqa: E402
from calid.choices import UPSAMPLE_METHODS  # noqa: E402
from calid.modelindex import DEFAULT_MODEL, import_model, list_models, user_models_dir  # noqa: E402

SAMPLE_FILE = "CaLIDSample_SCD0000101_phase07.nrrd"
SAMPLE_PATH = Path(__file__).parent / "Resources" / "SampleData" / SAMPLE_FILE


class CaLIDUpsample(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CaLID Upsample")
        self.parent.categories = [_("Cardiac")]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerCaLID contributors"]
        self.parent.helpText = _(
            "Fills the gaps between short-axis cardiac MRI slices with CaLID, a latent diffusion model conditioned "
            "on the neighbouring acquired slices. Acquired slices are kept unchanged; the output lies exactly where "
            "the input lies. Optionally segments the dense grid (RV cavity, LV myocardium, LV cavity; the new slices in "
            "the sharp rendition the segmenter reads best) with their volumes, or fills your own segmentation of the "
            "acquired slices. Research use only, not for diagnosis."
        )
        self.parent.acknowledgementText = _(
            "Method: Bubeck et al., Latent Interpolation Learning Using Diffusion Models for Cardiac Volume "
            "Reconstruction, arXiv 2508.13826. Bundled models trained on ACDC (Bernard et al., IEEE TMI 2018; "
            "non-commercial); the default one also on Sunnybrook Cardiac Data. Sample data: Sunnybrook Cardiac "
            "Data (Radau et al., MIDAS Journal 2009; CC0)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The bundled CC0 Sunnybrook crop in the Sample Data module, category Cardiac."""
    import SampleData

    folder = Path(__file__).parent / "Resources"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Cardiac",
        sampleName="CaLIDSample",
        uris=SAMPLE_PATH.as_uri(),
        fileNames=SAMPLE_FILE,
        nodeNames="CaLIDSample",
        thumbnailFileName=str(folder / "Icons" / "CaLIDUpsample.png"),
    )


def selectComboData(combo, value) -> bool:
    """Select the item holding ``value``; False when there is none (the combo box keeps what it shows)."""
    index = combo.findData(value)
    if index >= 0:
        combo.currentIndex = index
    return index >= 0


def nodeOfItsOwn(node, created: list):
    """``node``, or a new node of its class and name (appended to ``created``) when it already plays a sequence (a
    cine run's proxy, which a second run cannot fill)."""
    if node is None or playing_browser(slicer.mrmlScene, node) is None:
        return node
    created.append(slicer.mrmlScene.AddNewNodeByClass(node.GetClassName(), node.GetName()))
    return created[-1]


def fillModelCombo(combo, selected: str) -> bool:
    """Bundled and user models (a model fine-tuned or imported meanwhile appears); quiet, so nothing is stored.
    False when ``selected`` is not among them (deleted, or a scene saved on another machine)."""
    combo.blockSignals(True)
    combo.clear()
    for model in list_models():
        combo.addItem(f"{model['name']} ({model['source']})", model["name"])
    found = selectComboData(combo, selected)
    combo.blockSignals(False)
    return found


class DeviceSelector:
    """A device combo box filled by a short ``calid devices`` worker, so listing devices never imports torch into
    Slicer (only PyTorchUtils's installation does, once: see ``CaLIDLib.dependencies``).

    Shared with the CaLIDTraining panel. The combo box is filled quietly (the stored device is not overwritten);
    ``onListed`` is called after each filling, to select the device stored in the parameter node. The info label
    also says what the first run will install, and how big it is, while anything is missing.
    """

    def __init__(self, comboBox, infoLabel, logic, log, onListed):
        self.comboBox, self.infoLabel, self.logic, self.log, self.onListed = comboBox, infoLabel, logic, log, onListed
        self._probe = None
        self._lines = []

    @property
    def probing(self) -> bool:
        """The list is not complete yet: never filled, or Auto and CPU until the worker has said which GPUs there
        are. A stored device missing from it then is not replaced."""
        return self._probe is not None or self.comboBox.count == 0

    def probe(self):
        self._probe = WorkerProcess([self.logic.python, "-m", "calid", "devices"], self.logic.workerEnvironment())
        self._fill([(_("Auto"), "auto"), (_("CPU"), "cpu")], clear=True)  # probing: a stored GPU is kept meanwhile
        try:
            self._probe.start()
        except OSError as exc:
            self.log(f"cannot start the CaLID worker: {exc}")
            self._probe = None
            self.onListed()  # Auto and CPU are all there is
            return
        self._lines = []
        qt.QTimer.singleShot(200, self._poll)

    def _poll(self):
        if self._probe is None:
            return
        if self._probe.poll(self._lines.append):
            qt.QTimer.singleShot(200, self._poll)
            return
        self._probe = None
        info = next((json.loads(l) for l in self._lines if l.startswith("{")), None)
        summary = install_summary()
        if info is None:
            self.infoLabel.text = summary or _("PyTorch is installed but the device list failed: see the log.")
            if not summary:
                self.log("\n".join([_("calid devices failed:"), *self._lines[-20:]]))
            self.onListed()
            return
        items = [(f"{gpu['name']} ({gpu['memory_gb']} GB)", gpu["device"]) for gpu in info["cuda"]]
        if info["mps"]:
            items.append((_("Apple MPS (experimental)"), "mps"))
        self._fill(items)
        gpus = ", ".join(g["name"] for g in info["cuda"]) or _("no CUDA GPU")
        self.infoLabel.text = f"PyTorch {info['torch']} (CUDA {info['cuda_build'] or 'none'}): {gpus}" + (
            f"\n{summary}" if summary else "")

    def _fill(self, items, clear=False):
        self.comboBox.blockSignals(True)
        if clear:
            self.comboBox.clear()
        for label, device in items:
            self.comboBox.addItem(label, device)
        self.comboBox.blockSignals(False)
        self.onListed()


@parameterNodeWrapper
class CaLIDUpsampleParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputVolume: slicer.vtkMRMLScalarVolumeNode
    uncertaintyVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    inputSegmentation: slicer.vtkMRMLSegmentationNode
    factor: Annotated[int, WithinRange(2, 16)] = 2
    useTargetSpacing: bool = False
    targetSpacing: Annotated[float, WithinRange(0.1, 20.0)] = 2.0
    steps: Annotated[int, WithinRange(0, 100)] = 0  # 0: the model's own default (its card)
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    samples: Annotated[int, WithinRange(1, 64)] = 1
    device: str = "auto"
    model: str = DEFAULT_MODEL
    method: Annotated[str, Choice(list(UPSAMPLE_METHODS))] = "calid"  # or a peer to compare with: morph, linear


class CaLIDPanel(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """What the CaLID panels share (this one and CaLIDTraining's): the parameter node life cycle, the device and
    model combo boxes, and one background run driven by a timer, with progress bar, status line and log.

    A panel's .ui has ``deviceComboBox``, ``refreshDevicesButton``, ``torchInfoLabel``, ``modelComboBox``,
    ``progressBar``, ``statusLabel`` and ``logTextEdit``; the panel names its run button in ``runButton`` and the
    parameter its model combo box stores in ``modelParameter``, and defines ``updateButtons`` and ``_onFinished``.
    """

    modelParameter = "model"

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.devices = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = qt.QTimer()
        self._nodesForRun, self._selectionBeforeRun = [], (None, None)
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)

    def setupPanel(self, logic):
        """Load ``UI/<module>.ui`` and connect the shared parts; the panel connects its own buttons afterwards."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic
        self.logic.logCallback = self._log
        self.devices = DeviceSelector(self.ui.deviceComboBox, self.ui.torchInfoLabel, self.logic, self._log,
                                      self._selectStoredDevice)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.refreshDevicesButton.connect("clicked(bool)", self.devices.probe)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self._storeDevice)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._storeModel)
        self.ui.progressBar.setVisible(False)

    def cleanup(self):
        self.removeObservers()
        self._timer.stop()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()
        if install_summary() is None:  # torch and the rest there: a worker imports the engine meanwhile
            self.logic.setStandby(True)

    def exit(self):
        self.logic.setStandby(False)  # leaving the module gives its memory back
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        # the scene's run is cancelled and its nodes go with the scene: nothing of it is given back to the next one
        self._nodesForRun, self._selectionBeforeRun = [], (None, None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self._selectStoredDevice()
            stored = getattr(self._parameterNode, self.modelParameter)
            if not fillModelCombo(self.ui.modelComboBox, stored):  # run with what the combo box shows, and say so
                self._storeModel()
                self._log(_("Model {stored} is not available here: {shown} is chosen.").format(
                    stored=stored, shown=self.ui.modelComboBox.currentData))
            self.updateButtons()

    def _selectStoredDevice(self):
        """Show the stored device; once the list is complete, one that is not in it (a scene saved on another
        machine, a GPU gone) is replaced by what the combo box shows, so that the run uses what the panel says."""
        p = self._parameterNode
        if p and not selectComboData(self.ui.deviceComboBox, p.device) and not self.devices.probing:
            stored = p.device
            self._storeDevice()
            self._log(_("Device {stored} is not available here: {shown} is chosen.").format(
                stored=stored, shown=p.device))

    def _storeDevice(self, *_args):
        if self._parameterNode:
            self._parameterNode.device = self.ui.deviceComboBox.currentData or "auto"

    def _storeModel(self, *_args):
        if self._parameterNode:
            setattr(self._parameterNode, self.modelParameter, self.ui.modelComboBox.currentData or DEFAULT_MODEL)

    # -------------------------------------------------------------- the background run
    def _runStarted(self, cancelText):
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.runButton.text = cancelText
        self._timer.start()

    def _dependenciesReady(self):
        """Install on first use. A failure (offline, no PyTorch extension...) is one line in a dialog and the log,
        never only a traceback in the Python console; declining says why nothing happens."""
        installing = install_summary() is not None  # torch too
        try:
            ready = ensureDependencies(askConfirmation=True)
        except InstallError as exc:
            self._log(str(exc))
            slicer.util.errorDisplay(str(exc))
            return False
        if not ready:
            self._log(_("Nothing was installed: CaLID cannot run without these packages."))
        else:
            self.logic.setStandby(True)  # its packages have just been installed, or were there already
            if installing:  # the list said Auto and CPU and what the first run installs: now torch can say more
                self.devices.probe()
        return ready

    def _cancelRun(self, cancellingText):
        self.runButton.text = cancellingText
        self.runButton.enabled = False
        self.logic.cancel()

    def _poll(self):
        if not self.logic.poll():
            self._timer.stop()

    def _onProgress(self, fraction, stage, remaining):
        self.ui.progressBar.value = int(round(100 * fraction))
        eta = f" - {remaining:.0f} s left" if remaining is not None else ""
        self.ui.statusLabel.text = f"{stage}{eta}"

    def _runEnded(self):
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = ""

    def _log(self, text):
        self.ui.logTextEdit.appendPlainText(text)


class CaLIDUpsampleWidget(CaLIDPanel):
    def cleanup(self):
        self._dropNodesForRun()  # a run ended by the cleanup has no result: the nodes made for it would stay empty
        super().cleanup()

    def setup(self):
        self.setupPanel(CaLIDUpsampleLogic())
        self.runButton = self.ui.applyButton
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.devices.probe()  # first: the list is being made when the stored device is looked for
        self.initializeParameterNode()

    def initializeParameterNode(self):
        super().initializeParameterNode()
        if not self._parameterNode.inputVolume:  # the first MRI volume: labelmaps and vectors are volumes too
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            first = next((v for v in volumes if not v.IsA("vtkMRMLLabelMapVolumeNode") and v.GetImageData() is not None
                          and v.GetImageData().GetNumberOfScalarComponents() == 1), None)
            if first:
                self._parameterNode.inputVolume = first

    def updateButtons(self, caller=None, event=None):
        if self.logic.isRunning:
            return
        p = self._parameterNode
        model = bool(p and p.method == "calid")
        mapClash = bool(model and p.uncertaintyVolume and p.uncertaintyVolume in (p.inputVolume, p.outputVolume))
        ready = bool(p and p.inputVolume and p.outputVolume is not p.inputVolume and not mapClash)
        self.ui.applyButton.text = _("Upsample")
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (_("Upsample the input volume") if ready else
                                       _("The uncertainty volume must be a node of its own") if mapClash else
                                       _("Select an input volume, and an output other than the input"))
        self.ui.targetSpacingSpinBox.enabled = bool(p and p.useTargetSpacing)
        self.ui.factorSpinBox.enabled = not (p and p.useTargetSpacing)
        # the model's own settings: the peers have no error head, no diffusion steps and no samples to average
        for widget in (self.ui.uncertaintySelector, self.ui.stepsSpinBox, self.ui.samplesSpinBox):
            widget.enabled = model
        # the user's segments are filled into the output segmentation: without one they would be ignored
        self.ui.inputSegmentationSelector.enabled = bool(p and p.outputSegmentation)

    # -------------------------------------------------------------- models
    def onImportModel(self):
        folder = qt.QFileDialog.getExistingDirectory(None, _("Select a CaLID model folder (model.json + model.safetensors)"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
            target = import_model(folder)
            fillModelCombo(self.ui.modelComboBox, target.name)
            self._storeModel()

    def onOpenModelsFolder(self):
        folder = user_models_dir()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    # -------------------------------------------------------------- running
    def onApplyButton(self):
        if self.logic.isRunning:
            self._cancelRun(_("Cancelling..."))
            return
        if not self._dependenciesReady():
            return
        p = self._parameterNode
        self.ui.logTextEdit.clear()
        browser = playing_browser(slicer.mrmlScene, p.inputVolume)
        output = None if playing_browser(slicer.mrmlScene, p.outputVolume) is not None else p.outputVolume
        # A cine run's label and map proxies play their sequences: this run's go to new nodes, removed again (and the
        # user's own selection given back) when the run ends without a result.
        self._nodesForRun, self._selectionBeforeRun = [], (p.outputSegmentation, p.uncertaintyVolume)
        p.outputSegmentation = nodeOfItsOwn(p.outputSegmentation, self._nodesForRun)
        if p.method == "calid":  # the map is the model's: no peer fills one
            p.uncertaintyVolume = nodeOfItsOwn(p.uncertaintyVolume, self._nodesForRun)
        with slicer.util.tryWithErrorDisplay(_("Failed to start CaLID."), waitCursor=True):
            self.logic.process(
                p.inputVolume, output, sequenceBrowser=browser, factor=None if p.useTargetSpacing else p.factor,
                spacing=p.targetSpacing if p.useTargetSpacing else None,
                device=p.device, steps=p.steps, seed=p.seed, samples=p.samples, model=p.model, method=p.method,
                uncertaintyVolume=p.uncertaintyVolume if p.method == "calid" else None,
                outputSegmentation=p.outputSegmentation,
                inputSegmentation=p.inputSegmentation if p.outputSegmentation else None, waitForCompletion=False,
                progressCallback=self._onProgress, onFinished=self._onFinished,
            )
            self._runStarted(_("Cancel"))
        if not self.logic.isRunning:  # refused before it started
            self._dropNodesForRun()

    def _dropNodesForRun(self):
        """Remove the nodes made for a run that ended without a result (they would stay empty), and select again
        what the user had selected."""
        p = self._parameterNode
        if self._nodesForRun and p is not None:
            p.outputSegmentation, p.uncertaintyVolume = self._selectionBeforeRun
        for node in self._nodesForRun:
            slicer.mrmlScene.RemoveNode(node)
        self._nodesForRun = []

    def _onFinished(self, outputVolume, error):
        try:
            self._showResult(outputVolume, error)
        finally:  # the button reads "Upsample" again whatever showing the result did
            self.updateButtons()

    def _showResult(self, outputVolume, error):
        self._runEnded()
        if outputVolume is None:
            self._dropNodesForRun()
        else:
            self._nodesForRun = []
        if error is not None:
            slicer.util.errorDisplay(_("CaLID failed: ") + str(error))
        elif outputVolume is None:
            self._log(_("Cancelled."))
        else:
            # The output selector keeps the user's choice: a result put there would be overwritten by the next run.
            # This run's map over its result, or none: an earlier run's map would read as this one's.
            slicer.util.setSliceViewerLayers(background=outputVolume, foreground=self.logic.lastUncertaintyVolume,
                                             fit=True)
            self._log(_("Done: ") + outputVolume.GetName())
            sentence = largest_error_sentence(self.logic.lastUncertaintySlices)
            if sentence:
                self._log(sentence)
            # One table view: the volumes when a segmentation was asked for, else the uncertainty's per-slice figures.
            if self.logic.lastVolumesTable is not None:  # this run's own (the logic forgets the last run's)
                show_table(slicer.mrmlScene, slicer.app.applicationLogic(), self.logic.lastVolumesTable)
                self._log(RV_BASE_CAVEAT)
            elif self.logic.lastUncertaintyTable is not None:
                show_table(slicer.mrmlScene, slicer.app.applicationLogic(), self.logic.lastUncertaintyTable)


class CaLIDUpsampleLogic(ScriptedLoadableModuleLogic, _QtFreeLogic):
    """The module logic: parameter node handling from Slicer, everything else from ``CaLIDLib``.

    Console example::

        logic = slicer.util.getModuleLogic("CaLIDUpsample")
        dense = logic.process(getNode("CaLIDSample"), factor=4, device="cpu")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        _QtFreeLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self):
        return CaLIDUpsampleParameterNode(super().getParameterNode())


def skipWithoutEngine(testCase):
    """Skip a self-test where the engine cannot run (extension build machines: no PyTorch), saying why."""
    reason = self_test_skip_reason()
    if reason:
        testCase.skipTest(reason)


class CaLIDUpsampleTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a small CPU upsampling of the bundled sample (skipped without PyTorch)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        skipWithoutEngine(self)
        self.test_upsample_sample_on_cpu()

    def test_upsample_sample_on_cpu(self):
        import numpy as np

        self.delayDisplay("Loading the bundled sample")
        inputVolume = slicer.util.loadVolume(str(SAMPLE_PATH))
        fractions = []
        output = CaLIDUpsampleLogic().process(inputVolume, factor=2, device="cpu",
                                              progressCallback=lambda f, s, r: fractions.append(f))
        a, b = slicer.util.arrayFromVolume(inputVolume), slicer.util.arrayFromVolume(output)
        self.assertEqual(b.shape[0], 2 * a.shape[0] - 1)
        self.assertTrue(np.array_equal(b[::2], a))
        self.assertAlmostEqual(fractions[-1], 1.0)
        self.delayDisplay("Test passed")


__all__ = ["CaLIDPanel", "CaLIDUpsample", "CaLIDUpsampleLogic", "CaLIDUpsampleTest", "CaLIDUpsampleWidget",
           "skipWithoutEngine"]
