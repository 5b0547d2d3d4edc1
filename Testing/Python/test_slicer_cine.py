"""Cine (2D+T) through CaLIDUpsampleLogic with slicer-core's real sequence, browser and proxy nodes.

A sequence in, a sequence out: the dense frames become a new sequence in the input's browser, with the input's
time index, and every frame's acquired slices stay bit for bit where the input frame had them.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import vtk.util.numpy_support

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from CaLIDLib import CaLIDUpsampleLogic, WorkerError  # noqa: E402
from test_slicer_logic import node_array, private_tmp, ras, sample_array, volume_node  # noqa: E402,F401

pytestmark = [pytest.mark.slicer, pytest.mark.slow]

TIMES = ("0", "40", "80")


@pytest.fixture
def sequences_logic(monkeypatch):
    """A scene managed by the Sequences logic, as in the application (it registers the browser node class),
    reachable as ``slicer.modules.sequences.logic()`` as there."""
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(slicer.vtkMRMLScene())
    monkeypatch.setattr(slicer, "modules", SimpleNamespace(sequences=SimpleNamespace(logic=lambda: logic)),
                        raising=False)
    return logic


def cine_of(sequences_logic, array: np.ndarray, **geometry):
    """(scene, browser, input sequence, proxy): three phases of ``array``, oblique, at 0/40/80 ms."""
    scene = sequences_logic.GetMRMLScene()
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "SAX cine")
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("ms")
    for t, value in enumerate(TIMES):
        frame = volume_node(scene, np.roll(array, 3 * t, axis=2) + np.int16(5 * t), name=f"frame{t}", **geometry)
        sequence.SetDataNodeAtValue(frame, value)
        scene.RemoveNode(frame)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "SAX cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    sequences_logic.UpdateProxyNodesFromSequences(browser)
    return scene, browser, sequence, browser.GetProxyNode(sequence)


@pytest.fixture
def cine(sequences_logic, sample_array):
    """Three phases of a crop of the real sample (fast)."""
    return cine_of(sequences_logic, sample_array)


@pytest.fixture
def whole_cine(sequences_logic, sample_image):
    """Three phases of the whole real sample, in whose field of view the segmenter finds the heart, in a scene
    with the Segmentations logic registered, as the application does at start-up."""
    scene = sequences_logic.GetMRMLScene()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    scene.segmentations_logic = segmentations  # keep it alive as long as the scene
    return cine_of(sequences_logic, sitk.GetArrayFromImage(sample_image).astype(np.int16),
                   spacing=sample_image.GetSpacing())


def counts(scene) -> tuple[int, ...]:
    return tuple(scene.GetNodesByClass(c).GetNumberOfItems() for c in
                 ("vtkMRMLScalarVolumeNode", "vtkMRMLSequenceNode", "vtkMRMLSequenceBrowserNode"))


def test_sequence_in_sequence_out_in_the_same_browser(cine, tiny_model_dir, private_tmp):
    scene, browser, sequence, proxy = cine
    assert proxy is not None and browser.IsProxyNode(proxy.GetID())
    out = CaLIDUpsampleLogic(scene, python=sys.executable).process(proxy, factor=2, device="cpu", steps=1,
                                                                   model=str(tiny_model_dir))
    assert out is not None and out is not proxy and browser.IsProxyNode(out.GetID())
    dense = browser.GetSequenceNode(out)
    assert dense is not sequence and dense.GetName() == "SAX cine_CaLID_x2"
    assert browser.IsSynchronizedSequenceNodeID(dense.GetID()) and browser.GetMasterSequenceNode() is sequence
    assert dense.GetNumberOfDataNodes() == 3 and (dense.GetIndexName(), dense.GetIndexUnit()) == ("time", "ms")
    assert tuple(dense.GetNthIndexValue(i) for i in range(3)) == TIMES
    for t in range(3):
        before, after = sequence.GetNthDataNode(t), dense.GetNthDataNode(t)
        a, b = node_array(before), node_array(after)
        assert b.shape == (2 * a.shape[0] - 1, *a.shape[1:])
        assert np.array_equal(b[::2], a)  # acquired slices bit for bit
        for k in range(a.shape[0]):
            for ij in ((0, 0), (63, 0), (0, 63), (40, 17)):
                np.testing.assert_allclose(ras(after, (*ij, 2 * k)), ras(before, (*ij, k)), atol=1e-4)
    assert np.array_equal(node_array(out), node_array(dense.GetNthDataNode(browser.GetSelectedItemNumber())))
    assert list(private_tmp.iterdir()) == []


def test_explicit_browser_and_output_volume_as_proxy(cine, tiny_model_dir, private_tmp, monkeypatch):
    scene, browser, sequence, proxy = cine
    monkeypatch.delattr(slicer, "modules", raising=False)  # no application: the logic makes its own Sequences logic
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "dense cine")
    out = CaLIDUpsampleLogic(scene, python=sys.executable).process(proxy, target, factor=2, device="cpu", steps=1,
                                                                   model=str(tiny_model_dir), sequenceBrowser=browser)
    assert out is target and browser.GetSequenceNode(target).GetNumberOfDataNodes() == 3


def test_the_last_runs_proxy_is_refused_as_the_next_runs_output(cine, tiny_model_dir, private_tmp):
    """It would play two sequences, the earlier run's and the new one's, in one browser."""
    scene, browser, _sequence, proxy = cine
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    first = logic.process(proxy, factor=2, device="cpu", method="linear")
    with pytest.raises(ValueError, match="already plays a sequence"):
        logic.process(proxy, first, factor=3, device="cpu", method="linear")
    # Nor may a single volume's result go there: the browser's next frame would replace it.
    plain = volume_node(scene, node_array(proxy).copy(), name="plain")
    with pytest.raises(ValueError, match="already plays a sequence"):
        logic.process(plain, first, factor=3, device="cpu", method="linear")


def test_a_one_frame_sequence_is_upsampled_as_its_volume(sequences_logic, sample_array, private_tmp):
    scene = sequences_logic.GetMRMLScene()
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "single")
    frame = volume_node(scene, sample_array, name="frame0")
    sequence.SetDataNodeAtValue(frame, "0")
    scene.RemoveNode(frame)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    sequences_logic.UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    out = CaLIDUpsampleLogic(scene, python=sys.executable).process(proxy, factor=2, method="linear")
    assert not browser.IsProxyNode(out.GetID()) and np.array_equal(node_array(out)[::2], node_array(proxy))


def test_volume_not_played_by_the_given_browser_is_refused(cine, sample_array):
    scene, browser, _sequence, _proxy = cine
    other = volume_node(scene, sample_array, name="other")
    with pytest.raises(ValueError, match="not a proxy node"):
        CaLIDUpsampleLogic(scene, python=sys.executable).process(other, sequenceBrowser=browser)


def test_failing_worker_leaves_the_scene_unchanged(cine, tiny_model_dir, private_tmp):
    scene, browser, sequence, proxy = cine
    for t, value in enumerate(TIMES):  # float frames (one scalar type for the whole sequence), one NaN voxel
        frame = node_array(sequence.GetNthDataNode(t)).astype(np.float32)
        frame[1, 3, 3] = np.nan if t == 1 else frame[1, 3, 3]
        sequence.SetDataNodeAtValue(volume_node(scene, frame, name="float"), value)
        scene.RemoveNode(scene.GetFirstNodeByName("float"))
    before, synchronized = counts(scene), browser.GetNumberOfSynchronizedSequenceNodes()
    with pytest.raises(WorkerError, match="NaN/Inf"):
        CaLIDUpsampleLogic(scene, python=sys.executable).process(proxy, device="cpu", model=str(tiny_model_dir))
    assert counts(scene) == before and browser.GetNumberOfSynchronizedSequenceNodes() == synchronized
    assert list(private_tmp.iterdir()) == []


def test_a_result_that_fails_to_load_leaves_no_sequence_and_no_proxy(cine, private_tmp, monkeypatch):
    """The worker's output is read, its sequence joins the browser (which makes its proxy), and then the map's
    sequence cannot be read: everything the load had added goes again."""
    import CaLIDLib.logic

    scene, browser, _sequence, proxy = cine
    monkeypatch.setattr(CaLIDLib.logic, "segmentation_sequence",
                        lambda *args: (_ for _ in ()).throw(RuntimeError("labels unreadable")))
    before, synchronized = counts(scene), browser.GetNumberOfSynchronizedSequenceNodes()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "heart")
    with pytest.raises(RuntimeError, match="labels unreadable"):
        CaLIDUpsampleLogic(scene, python=sys.executable).process(proxy, factor=2, device="cpu", method="linear",
                                                                 outputSegmentation=segmentation)
    assert counts(scene) == before and browser.GetNumberOfSynchronizedSequenceNodes() == synchronized


def test_cancel_leaves_no_new_nodes_and_no_files(cine, tiny_model_dir, private_tmp):
    scene, browser, _sequence, proxy = cine
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    before, synchronized = counts(scene), browser.GetNumberOfSynchronizedSequenceNodes()
    seen = []

    def cancel_midway(fraction, stage, eta):
        seen.append(fraction)
        if fraction > 0.1:
            logic.cancel()

    result = logic.process(proxy, factor=4, device="cpu", steps=200, model=str(tiny_model_dir),
                           progressCallback=cancel_midway)
    assert result is None and 0.1 < max(seen) < 1.0
    assert counts(scene) == before and browser.GetNumberOfSynchronizedSequenceNodes() == synchronized
    assert list(private_tmp.iterdir()) == []
    assert not logic.isRunning


def segment_voxels(segmentation, name: str) -> int:
    """Voxels of the segment called ``name`` in its binary labelmap (0 when there is no such segment)."""
    content = segmentation.GetSegmentation()
    segment = content.GetSegment(content.GetSegmentIdBySegmentName(name))
    if segment is None:
        return 0
    image = segment.GetRepresentation("Binary labelmap")
    values = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return int((values == segment.GetLabelValue()).sum())


def test_a_cine_segmentation_is_a_sequence_of_segmentations_with_its_cycle_in_tables(whole_cine, tiny_model_dir,
                                                                                   private_tmp):
    scene, browser, _sequence, proxy = whole_cine
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Heart")
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    out = logic.process(proxy, factor=2, device="cpu", steps=1, model=str(tiny_model_dir),
                        outputSegmentation=segmentation)
    assert browser.IsProxyNode(segmentation.GetID())
    frames = browser.GetSequenceNode(segmentation)
    assert frames.GetNumberOfDataNodes() == 3 and (frames.GetIndexName(), frames.GetIndexUnit()) == ("time", "ms")
    assert tuple(frames.GetNthIndexValue(i) for i in range(3)) == TIMES
    per_frame, cycle = logic.lastFramesTable, logic.lastVolumesTable
    assert per_frame.GetNumberOfRows() == 3 and per_frame.GetColumnName(4) == "Left ventricle cavity (mL)"
    assert [per_frame.GetTable().GetValue(t, 1).ToDouble() for t in range(3)] == [float(t) for t in TIMES]  # ms
    voxel_ml = float(np.prod(out.GetSpacing())) / 1000.0
    for t in range(3):
        lv = segment_voxels(frames.GetNthDataNode(t), "Left ventricle cavity") * voxel_ml
        assert lv > 1 and abs(lv - per_frame.GetTable().GetValue(t, 4).ToDouble()) < 0.006  # mL, rounded to 0.01
    values = {cycle.GetCellText(r, 0): cycle.GetTable().GetValue(r, 1).ToDouble() for r in range(cycle.GetNumberOfRows())}
    edv, esv = values["Left ventricle end-diastolic volume"], values["Left ventricle end-systolic volume"]
    lv_per_frame = [per_frame.GetTable().GetValue(t, 4).ToDouble() for t in range(3)]
    assert (edv, esv) == (max(lv_per_frame), min(lv_per_frame))
    assert values["Left ventricle ejection fraction"] == pytest.approx(100 * (edv - esv) / edv, abs=0.06)
    assert list(private_tmp.iterdir()) == []
    with pytest.raises(ValueError, match="already plays a sequence"):  # it would tie this run's frames to the last's
        logic.process(proxy, outputSegmentation=segmentation)


def test_a_segmentation_deleted_during_a_cine_run_gets_a_new_proxy(whole_cine, tiny_model_dir, private_tmp):
    """The labels went into the deleted node, out of the scene, and the browser was given a node of no scene."""
    scene, browser, _sequence, proxy = whole_cine
    chosen = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Heart")
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    logic.process(proxy, factor=2, device="cpu", steps=1, model=str(tiny_model_dir), outputSegmentation=chosen,
                  waitForCompletion=False)
    scene.RemoveNode(chosen)
    while logic.poll():
        pass
    made = logic.lastSegmentation
    assert made is not None and made is not chosen and made.GetScene() is scene and browser.IsProxyNode(made.GetID())
    assert browser.GetSequenceNode(made).GetNumberOfDataNodes() == 3 and logic.lastFramesTable.GetNumberOfRows() == 3


def test_user_segments_on_a_cine_are_refused(cine):
    scene, _browser, _sequence, proxy = cine
    mine, heart = (scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name) for name in ("mine", "heart"))
    with pytest.raises(ValueError, match="single volumes"):
        CaLIDUpsampleLogic(scene, python=sys.executable).process(proxy, outputSegmentation=heart,
                                                                 inputSegmentation=mine)


def test_given_output_nodes_are_the_only_proxies_a_run_leaves(cine, private_tmp):
    """With the application's Sequences logic watching the browser, joining a sequence to it made a proxy of its
    own before the given node replaced it: that copy of a frame stayed in the scene (for a segmentation, a frozen
    frame over the one that plays)."""
    scene, browser, _sequence, proxy = cine
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "dense cine")
    out = CaLIDUpsampleLogic(scene, python=sys.executable).process(proxy, target, factor=2, device="cpu",
                                                                   method="linear")
    assert out is target and browser.IsProxyNode(target.GetID())
    volumes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    assert sorted(volumes.GetItemAsObject(i).GetName() for i in range(volumes.GetNumberOfItems())) == \
        sorted([proxy.GetName(), "dense cine"])
