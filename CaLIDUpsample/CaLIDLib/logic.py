"""CaLIDUpsampleLogic: upsample a volume node with the ``calid`` worker in a background process.

The input node is written to a temporary NRRD, ``calid upsample --progress json`` runs with Slicer's Python,
and only when it succeeds is the result loaded into the output node (created then, so a cancelled or failed
run leaves the scene unchanged). Starting, polling, cancelling and cleaning up are ``WorkerLogic``'s.

A cine (the proxy volume of a sequence browser) goes to the worker as one ``.seq.nrrd``; its result becomes a
new sequence synchronized in the same browser, so the dense frames play with the input (``sequences.py``).

An uncertainty output (the model's expected absolute error per voxel) is overlaid on the result in the slice
views, and the per-slice figures of the worker's ``done`` event become a table (``uncertainty.py``).
"""

from __future__ import annotations

from pathlib import Path

from calid.choices import UPSAMPLE_METHODS

from .background import ProgressCallback, WorkerError, WorkerLogic
from .protocol import WorkerEvent
from .segmentations import (cycle_tables, load_labels_into_segmentation, segmentation_sequence, volumes_table,
                            write_segmentation_labels)
from .sequences import add_to_browser, find_sequence, playing_browser, read_sequence_like, write_sequence
from .uncertainty import per_slice, show_uncertainty, uncertainty_table
from .volumes import update_node_from_file, write_node

__all__ = ["CaLIDUpsampleLogic", "WorkerError"]


def _output_name(input_name: str, method: str, factor: int, spacing) -> str:
    """``<input>_CaLID_x2``, or ``<input>_morph_x2`` / ``<input>_linear_x2`` for the peers, side by side in the scene;
    made unique when the result is loaded (a second run's is ``..._x2_1``, so that two results are never told apart
    by their order alone; a run that ends without a result takes no number)."""
    return f"{input_name}_{'CaLID' if method == 'calid' else method}" + ("" if spacing else f"_x{factor}")


class CaLIDUpsampleLogic(WorkerLogic):
    lastVolumesTable = None
    """The table node of structure volumes written by the last run with a segmentation output (a cine's: each
    ventricle's end-diastolic and end-systolic volumes and ejection fraction)."""
    lastFramesTable = None
    """The table node of every frame's volumes of the last cine run with a segmentation output."""
    lastUncertaintyTable = None
    """The table node of per-slice expected errors of the last run with an uncertainty output (None when its
    worker gave no per-slice figures)."""
    lastUncertaintySlices: list = []
    """Those figures as dicts: ``slice``, ``position_mm``, ``expected_error``, ``heart_expected_error``."""
    lastUncertaintyVolume = None
    """The node the last run's map was loaded into: the given one, or a new one where that was removed from the scene
    during the run (the proxy of the maps' sequence for a cine)."""
    lastSegmentation = None
    """Likewise, the segmentation node the last run's labels were loaded into."""
    _done: dict = {}
    """The ``done`` event of the current run (its summary: slice axis, per-slice figures)."""

    # ------------------------------------------------------------------ command
    def workerCommand(self, inputPath: Path, outputPath: Path, factor=2, spacing=None, device="auto", steps=None, seed=0,
                      model=None, samples=1, uncertaintyPath=None, segmentationPath=None,
                      inputSegmentationPath=None, method="calid") -> list[str]:
        """``steps`` None (or 0, the panel's "model default") leaves the choice to the model's card; ``method`` is
        ``calid upsample --method`` (the model, or a peer to compare with: "morph", "linear"). ``--samples`` only
        when averaging: the uncertainty map comes from the model's error head, not from samples."""
        cmd = [self.python, "-m", "calid", "upsample", str(inputPath), str(outputPath), "--progress", "json",
               "--device", device, "--seed", str(seed), "--method", method]
        cmd += ["--samples", str(samples)] if samples > 1 else []
        cmd += ["--steps", str(steps)] if steps else []
        cmd += ["--spacing", str(spacing)] if spacing else ["--factor", str(factor)]
        if model:
            cmd += ["--model", str(model)]
        if uncertaintyPath:
            cmd += ["--uncertainty", str(uncertaintyPath)]
        if segmentationPath:
            cmd += ["--segmentation", str(segmentationPath)]
        if inputSegmentationPath:
            cmd += ["--input-segmentation", str(inputSegmentationPath)]
        return cmd

    # ------------------------------------------------------------------ public API
    def process(self, inputVolume, outputVolume=None, factor=None, spacing=None, device="auto", steps=None, seed=0,
                outputSegmentation=None, waitForCompletion=True, progressCallback: ProgressCallback | None = None,
                model=None, samples=1, uncertaintyVolume=None, onFinished=None, inputSegmentation=None,
                outputTable=None, sequenceBrowser=None, method="calid"):
        """Upsample ``inputVolume``; returns the output volume node (blocking) or None (non-blocking).

        ``method``: "calid" (the model), or "morph" / "linear" to see on the same scan what the peers give.
        ``factor`` (default 2) or a target slice ``spacing`` in mm, not both.

        When ``inputVolume`` is the proxy of a sequence browser (``sequenceBrowser``, or found in the scene),
        every frame is upsampled: the result is a new sequence (same index name, unit and values) added to that
        browser, and the returned volume is its proxy (``outputVolume`` when given); ``uncertaintyVolume`` becomes
        the proxy of a second new sequence there, one map per frame, and ``outputSegmentation`` the proxy of a
        sequence of segmentations, one per frame, with the ejection fractions over the cycle in ``outputTable``
        and every frame's volumes in ``lastFramesTable``. ``inputSegmentation`` applies to single volumes only.

        ``outputSegmentation``: also segment the dense volume into it (RV cavity, LV myocardium, LV cavity),
        from ``inputSegmentation`` (the user's segments on the acquired slices, kept exactly) when given;
        the structure volumes go to ``outputTable`` (created when None). Non-blocking: call ``poll()`` until it
        returns False; ``onFinished(outputVolume, error)`` is called.

        ``uncertaintyVolume`` (method "calid"): filled with the expected absolute error of each voxel, in the
        input's intensity units, predicted by the model's error head (0 on acquired slices), and overlaid on the
        output in the slice views. Its per-slice figures (dense slice index, position along the slice normal,
        expected error, and inside the heart when segmenting) are the table ``lastUncertaintyTable``, named
        "<uncertainty> per slice", and ``lastUncertaintySlices``: with the uncertainty node, what a console user
        reads after the run.
        """
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("input volume is empty")
        if inputVolume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(f"{inputVolume.GetName()} is a labelmap: give the MRI volume (labels are not intensities "
                             "to interpolate)")
        if inputVolume.GetImageData().GetNumberOfScalarComponents() > 1:
            raise ValueError(f"{inputVolume.GetName()} is a vector/RGB volume: give a single-channel MRI volume")
        if outputVolume is not None and outputVolume is inputVolume:
            raise ValueError("the output volume must not be the input volume")
        if uncertaintyVolume is not None and uncertaintyVolume in (inputVolume, outputVolume):
            raise ValueError("the uncertainty volume must be a node of its own, not the input or the output volume")
        if inputSegmentation is not None and outputSegmentation is None:
            raise ValueError("an input segmentation needs an output segmentation to fill")
        if method not in UPSAMPLE_METHODS:
            raise ValueError(f"method must be one of {', '.join(UPSAMPLE_METHODS)}, not {method}")
        if factor is not None and spacing is not None:  # the spacing won, silently, where calid refuses the pair
            raise ValueError("give a factor or a target spacing, not both")
        if spacing is not None and not spacing > 0:  # 0 read as "no spacing"
            raise ValueError(f"the target spacing must be positive, not {spacing}")
        factor = 2 if factor is None and spacing is None else factor
        if uncertaintyVolume is not None and method != "calid":
            raise ValueError(f"an uncertainty map is the model's (method calid): {method} gives none; leave the "
                             "uncertainty volume out")
        cine = find_sequence(self.scene, inputVolume, sequenceBrowser)
        for node in filter(None, (outputVolume, uncertaintyVolume, outputSegmentation)):
            browser = playing_browser(self.scene, node)
            if browser is not None:  # it would play two sequences, or lose this result at the next frame shown
                raise ValueError(f"{node.GetName()} already plays a sequence in {browser.GetName()}: "
                                 "give a new node (or none)")
        if cine is not None:
            return self._processSequence(inputVolume, *cine, outputVolume, factor, spacing, device, steps, seed, model,
                                         samples, progressCallback, onFinished, waitForCompletion,
                                         method=method, uncertaintyVolume=uncertaintyVolume,
                                         outputSegmentation=outputSegmentation, inputSegmentation=inputSegmentation,
                                         outputTable=outputTable)

        def prepare(folder: Path):
            self._forgetLastRun()
            write_node(inputVolume, folder / "input.nrrd")
            uncertaintyPath = folder / "uncertainty.nrrd" if uncertaintyVolume is not None else None
            labelsPath = folder / "labels.nrrd" if outputSegmentation is not None else None
            sparsePath = None
            if inputSegmentation is not None:
                sparsePath = folder / "input_labels.nrrd"
                write_segmentation_labels(self.scene, inputSegmentation, inputVolume, sparsePath)
            command = self.workerCommand(folder / "input.nrrd", folder / "output.nrrd", factor, spacing, device, steps,
                                         seed, model, samples, uncertaintyPath, labelsPath, sparsePath, method)
            name = _output_name(inputVolume.GetName(), method, factor, spacing)
            return command, lambda: self._loadOutputs(folder, inputVolume, outputVolume, uncertaintyVolume, name,
                                                      outputSegmentation, outputTable)

        return self._runWorker(prepare, progressCallback, onFinished, waitForCompletion)

    # ------------------------------------------------------------------ internals
    def _forgetLastRun(self) -> None:
        """A run's figures and tables are its own: none of an earlier run's stays behind to be read as this one's."""
        self._done, self.lastUncertaintySlices, self.lastUncertaintyTable = {}, [], None
        self.lastVolumesTable = self.lastFramesTable = self.lastUncertaintyVolume = self.lastSegmentation = None

    def _stillInScene(self, node):
        """``node`` while it is in the scene, else None: a node the user gave and then deleted during the run is
        replaced by a new one at load; before, the result went into the deleted node and the run said "Done"."""
        return node if node is not None and node.GetScene() is self.scene else None

    def _processSequence(self, inputVolume, browser, sequence, outputVolume, factor, spacing, device, steps, seed,
                         model, samples, progressCallback, onFinished, waitForCompletion, method,
                         uncertaintyVolume=None, outputSegmentation=None, inputSegmentation=None, outputTable=None):
        """The cine run: the whole sequence in one worker call (one intensity map, phases batched). An uncertainty
        volume becomes the proxy of a second new sequence in the same browser, one map per phase, overlaid; an
        output segmentation the proxy of a third, one segmentation per phase (``calid upsample --segmentation``
        segments every phase and measures the cycle)."""
        if inputSegmentation is not None:
            raise ValueError("an input segmentation (your segments on the acquired slices) is for single volumes, "
                             "not for sequences: leave it out to segment the whole cine")
        name = _output_name(sequence.GetName(), method, factor, spacing)

        def prepare(folder: Path):
            self._forgetLastRun()
            write_sequence(sequence, folder / "input.seq.nrrd")
            uncertaintyPath = folder / "uncertainty.seq.nrrd" if uncertaintyVolume is not None else None
            labelsPath = folder / "labels.nii.gz" if outputSegmentation is not None else None
            command = self.workerCommand(folder / "input.seq.nrrd", folder / "output.seq.nrrd", factor, spacing,
                                         device, steps, seed, model, samples, uncertaintyPath, labelsPath,
                                         method=method)
            return command, lambda: self._loadSequence(folder, inputVolume, browser, sequence, outputVolume, name,
                                                       uncertaintyVolume, outputSegmentation, outputTable)

        return self._runWorker(prepare, progressCallback, onFinished, waitForCompletion)

    def _loadSequence(self, folder: Path, inputVolume, browser, sequence, outputVolume, name: str,
                      uncertaintyVolume=None, outputSegmentation=None, outputTable=None):
        """Output sequence (and uncertainty and segmentation sequences) into the input's browser; on any failure
        the new sequences are removed again, and the proxy the browser made for the first of them."""
        added, made = [], []
        name = self.scene.GenerateUniqueName(name)

        def proxy_of(sequence_node, given):
            node = add_to_browser(self.scene, browser, sequence_node, self._stillInScene(given))
            if node is not given:
                made.append(node)
            return node

        try:
            output = read_sequence_like(self.scene, folder / "output.seq.nrrd", sequence, name)
            added.append(output)
            proxy = proxy_of(output, outputVolume)
            if uncertaintyVolume is not None:
                maps = read_sequence_like(self.scene, folder / "uncertainty.seq.nrrd", sequence,
                                          f"{name} expected error")
                added.append(maps)
                uncertaintyVolume = proxy_of(maps, uncertaintyVolume)
            if outputSegmentation is not None:
                segments = segmentation_sequence(self.scene, folder / "labels.nii.gz", sequence, proxy,
                                                 f"{name} segmentation")
                added.append(segments)
                outputSegmentation = proxy_of(segments, outputSegmentation)
        except Exception:
            for node in added:
                browser.RemoveSynchronizedSequenceNode(node.GetID())
                self.scene.RemoveNode(node)
            for node in made:
                self.scene.RemoveNode(node)
            raise
        self.lastUncertaintyVolume, self.lastSegmentation = uncertaintyVolume, outputSegmentation
        if outputSegmentation is not None:
            self.lastVolumesTable, self.lastFramesTable = cycle_tables(
                self.scene, self._done["volumes"], outputSegmentation, self._stillInScene(outputTable))
            for node in (outputSegmentation, segments, self.lastVolumesTable, self.lastFramesTable):
                self._placeBeside(inputVolume, node)
        self._showLikeInput(inputVolume, proxy)
        self._placeBeside(inputVolume, output)
        if uncertaintyVolume is not None:
            show_uncertainty(self.scene, uncertaintyVolume, proxy, maps)
            self._placeBeside(inputVolume, maps)  # the study; the sequence itself takes no transform, its proxy does
            self._placeBeside(inputVolume, uncertaintyVolume)
        return proxy

    def _loadOutputs(self, folder: Path, inputVolume, outputVolume, uncertaintyVolume, name: str,
                     outputSegmentation=None, outputTable=None):
        output = self._stillInScene(outputVolume) or self.scene.AddNewNodeByClass(
            "vtkMRMLScalarVolumeNode", self.scene.GenerateUniqueName(name))
        update_node_from_file(output, folder / "output.nrrd")
        self._showLikeInput(inputVolume, output)
        if uncertaintyVolume is not None:
            self.lastUncertaintyVolume = self._stillInScene(uncertaintyVolume) or self.scene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", f"{output.GetName()} expected error")
            self._loadUncertainty(folder / "uncertainty.nrrd", inputVolume, output, self.lastUncertaintyVolume)
        if outputSegmentation is not None:
            outputSegmentation = self.lastSegmentation = self._stillInScene(outputSegmentation) or \
                self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{output.GetName()} segmentation")
            load_labels_into_segmentation(self.scene, folder / "labels.nrrd", outputSegmentation, output)
            self.lastVolumesTable = volumes_table(self.scene, folder / "labels.nrrd", outputSegmentation,
                                                  self._stillInScene(outputTable))
            self._placeBeside(inputVolume, outputSegmentation)
            self._placeBeside(inputVolume, self.lastVolumesTable)
        return output

    def _onEvent(self, event: WorkerEvent) -> None:
        if event.kind == "done":
            self._done = event.data

    def _loadUncertainty(self, path: Path, inputVolume, output, uncertainty) -> None:
        """The map on the output's grid, overlaid on it, and its per-slice table beside the input."""
        update_node_from_file(uncertainty, path)
        show_uncertainty(self.scene, uncertainty, output)
        self._placeBeside(inputVolume, uncertainty)
        self.lastUncertaintySlices = per_slice(self._done.get("uncertainty_slices") or [], output,
                                               self._done.get("slice_axis", 2))
        if self.lastUncertaintySlices:
            self.lastUncertaintyTable = uncertainty_table(self.scene, self.lastUncertaintySlices, uncertainty)
            self._placeBeside(inputVolume, self.lastUncertaintyTable)

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
        self._placeBeside(inputVolume, outputVolume)

    def _placeBeside(self, inputVolume, node) -> None:
        """Put ``node`` under the input's parent transform and in the same study (subject hierarchy folder).

        The worker's voxels lie in the input's own frame (its IJK-to-RAS), so an output lies where the input does
        only under the same transform; without it the output of a transformed input was displaced."""
        if node.IsA("vtkMRMLTransformableNode"):
            node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        try:
            import slicer

            hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        except (ImportError, AttributeError):
            return
        source = hierarchy.GetItemByDataNode(inputVolume) if hierarchy is not None else 0
        if not source:  # the input is in no study (a bare scene): nothing to follow
            return
        parent = hierarchy.GetItemParent(source)
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:  # the application creates items for new nodes; a bare MRML scene does not
            hierarchy.CreateItem(parent, node)
