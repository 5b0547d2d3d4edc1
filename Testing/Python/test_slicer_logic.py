"""CaLIDUpsampleLogic against slicer-core's real MRML scene, with the real ``calid`` worker process."""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402
import vtk.util.numpy_support  # noqa: E402

from CaLIDLib import CaLIDUpsampleLogic, WorkerError  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.slow]


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def volume_node(scene, array_kji: np.ndarray, spacing=(1.3, 1.4, 8.0), origin=(-40.0, 25.0, 12.5), name="SAX"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    data = vtk.vtkImageData()
    data.SetDimensions(array_kji.shape[2], array_kji.shape[1], array_kji.shape[0])
    data.GetPointData().SetScalars(vtk.util.numpy_support.numpy_to_vtk(array_kji.ravel(), deep=True))
    node.SetAndObserveImageData(data)
    m = np.eye(4)
    m[:3, :3] = rotation(0.4, -0.7, 1.1) * np.array(spacing)  # oblique, anisotropic
    m[:3, 3] = origin
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, m[r, c])
    node.SetIJKToRASMatrix(matrix)
    return node


def node_array(node) -> np.ndarray:
    dims = node.GetImageData().GetDimensions()
    return vtk.util.numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])


def ras(node, ijk) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint([*ijk, 1.0])[:3])


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def sample_array(small_image) -> np.ndarray:
    return sitk.GetArrayFromImage(small_image)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def volumes(scene):
    return scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems()


def test_output_node_lies_exactly_where_the_input_lay(scene, sample_array, tiny_model_dir, private_tmp):
    node = volume_node(scene, sample_array)
    calls = []
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    out = logic.process(node, factor=3, device="cpu", steps=2, model=str(tiny_model_dir),
                        progressCallback=lambda f, stage, eta: calls.append((f, eta)))
    assert out is not None and out is not node and out.GetName() == "SAX_CaLID_x3"
    a, b = node_array(node), node_array(out)
    assert b.shape == ((a.shape[0] - 1) * 3 + 1, *a.shape[1:])
    assert np.array_equal(b[::3], a)
    for k in range(a.shape[0]):
        for ij in ((0, 0), (63, 0), (0, 63), (40, 17)):
            np.testing.assert_allclose(ras(out, (*ij, 3 * k)), ras(node, (*ij, k)), atol=1e-3)
    np.testing.assert_allclose(ras(out, (0, 0, 1)) - ras(out, (0, 0, 0)), (ras(node, (0, 0, 1)) - ras(node, (0, 0, 0))) / 3, atol=1e-4)
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and len(fractions) > 3
    # One call per step, each with the time left (the panel shows it; a second call without it wiped it).
    assert all(eta is not None and eta >= 0 for _, eta in calls)
    assert list(private_tmp.iterdir()) == []


def test_existing_output_node_is_filled(scene, sample_array, tiny_model_dir, private_tmp):
    node = volume_node(scene, sample_array)
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    out = CaLIDUpsampleLogic(scene, python=sys.executable).process(node, target, factor=2, device="cpu", steps=1,
                                                                    model=str(tiny_model_dir))
    assert out is target and node_array(target).shape[0] == 2 * sample_array.shape[0] - 1


def test_peer_methods_give_their_own_nodes_beside_calid_for_comparison(scene, sample_array, private_tmp):
    """What the panel's Method choice runs: linear interpolation and the morph through the same worker and geometry."""
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    linear = logic.process(node, factor=2, device="cpu", method="linear")
    morph = logic.process(node, factor=2, device="cpu", method="morph")
    assert (linear.GetName(), morph.GetName()) == ("SAX_linear_x2", "SAX_morph_x2")
    a = node_array(node).astype(np.float64)
    for out in (linear, morph):
        assert np.array_equal(node_array(out)[::2], node_array(node))
        np.testing.assert_allclose(ras(out, (5, 7, 2)), ras(node, (5, 7, 1)), atol=1e-3)
    np.testing.assert_allclose(node_array(linear)[1::2], np.rint((a[:-1] + a[1:]) / 2), atol=1)
    assert not np.array_equal(node_array(morph), node_array(linear))
    again = logic.process(node, factor=2, device="cpu", method="linear")  # a second result is told apart by name
    assert again.GetName() == "SAX_linear_x2_1" and linear.GetName() == "SAX_linear_x2"


def test_cancel_in_the_middle_leaves_no_node_and_no_files(scene, sample_array, tiny_model_dir, private_tmp):
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    before = volumes(scene)
    seen = []

    def cancel_midway(fraction, stage, eta):
        seen.append(fraction)
        if fraction > 0.2:
            logic.cancel()

    result = logic.process(node, factor=4, device="cpu", steps=200, model=str(tiny_model_dir), progressCallback=cancel_midway)
    assert result is None and 0.2 < max(seen) < 1.0
    assert volumes(scene) == before
    assert list(private_tmp.iterdir()) == []
    assert not logic.isRunning


def test_shutdown_mid_run_stops_the_worker_and_removes_the_patients_exported_volume(scene, sample_array, tiny_model_dir,
                                                                                      private_tmp):
    """The panel's cleanup (a module reloaded, Slicer closing) only cancelled, and nothing finished the run after it:
    the exported input stayed in the temporary folder. Now the worker is waited for, the folder removed, the run's
    callbacks (the panel's, going away) not called, and the scene no longer observed."""
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    called = []
    logic.process(node, factor=4, device="cpu", steps=200, model=str(tiny_model_dir), waitForCompletion=False,
                  progressCallback=lambda *args: called.append(args), onFinished=lambda *args: called.append(args))
    worker = logic.job.worker
    assert [p.name for p in private_tmp.iterdir()] and worker.returncode is None
    logic.shutdown()
    assert worker.returncode is not None and not logic.isRunning and list(private_tmp.iterdir()) == []
    assert called == [] and volumes(scene) == 1
    logic.cancel = lambda: called.append("observed")
    scene.Clear(0)
    assert called == []


def test_an_output_deleted_during_the_run_gets_a_new_node_not_a_lost_result(scene, sample_array, private_tmp):
    """The result went into the deleted node, out of the scene, and the run said "Done" all the same."""
    node = volume_node(scene, sample_array)
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chosen")
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    finished = []
    logic.process(node, chosen, factor=2, method="linear", waitForCompletion=False,
                  onFinished=lambda out, err: finished.append((out, err)))
    scene.RemoveNode(chosen)
    while logic.poll():
        pass
    (out, err), = finished
    assert err is None and out is not chosen and out.GetScene() is scene and out.GetName() == "SAX_linear_x2"
    assert node_array(out).shape[0] == 2 * sample_array.shape[0] - 1


def test_a_progress_callback_that_raises_ends_the_run_and_the_next_one_runs(scene, sample_array, private_tmp):
    """The callback's exception reaches the caller; the worker is stopped, its folder (the patient's volume)
    removed, and the logic is free again: before, every later run was refused as "already in progress"."""
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    before = volumes(scene)

    def broken(fraction, stage, eta):
        raise ZeroDivisionError("the caller's bug")

    with pytest.raises(ZeroDivisionError, match="the caller's bug"):
        logic.process(node, factor=2, method="linear", progressCallback=broken)
    assert not logic.isRunning and volumes(scene) == before and list(private_tmp.iterdir()) == []
    assert node_array(logic.process(node, factor=2, method="linear")).shape[0] == 2 * sample_array.shape[0] - 1


def test_the_workers_warnings_reach_the_log_or_a_scripts_output(scene, sample_array, private_tmp, capsys):
    dense = volume_node(scene, sample_array, spacing=(1.3, 1.4, 1.5))  # not a sparse stack: upsampled, with a warning
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    logic.process(dense, factor=2, method="linear")
    assert "calid: warning: the volume does not look like a sparse short-axis stack" in capsys.readouterr().out
    logged = []
    logic.logCallback = logged.append
    logic.process(dense, factor=2, method="linear")
    assert any(line.startswith("the volume does not look like") for line in logged)


def test_failing_worker_raises_its_message_and_leaves_the_scene_unchanged(scene, sample_array, tiny_model_dir, private_tmp):
    broken = sample_array.astype(np.float32)
    broken[1, 3, 3] = np.nan
    node = volume_node(scene, broken)
    before = volumes(scene)
    with pytest.raises(WorkerError, match="NaN/Inf"):
        CaLIDUpsampleLogic(scene, python=sys.executable).process(node, device="cpu", model=str(tiny_model_dir))
    assert volumes(scene) == before
    assert list(private_tmp.iterdir()) == []


def test_non_blocking_run_is_driven_by_poll(scene, sample_array, tiny_model_dir, private_tmp):
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    finished = []
    assert logic.process(node, factor=2, device="cpu", steps=1, model=str(tiny_model_dir), waitForCompletion=False,
                         onFinished=lambda out, err: finished.append((out, err))) is None
    while logic.poll():
        pass
    (out, err), = finished
    assert err is None and node_array(out).shape[0] == 2 * sample_array.shape[0] - 1


def test_a_factor_and_a_spacing_together_are_refused(scene, sample_array):
    """The spacing won without a word, where calid refuses the pair; a spacing of 0 read as none."""
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    with pytest.raises(ValueError, match="a factor or a target spacing, not both"):
        logic.process(node, factor=4, spacing=5.0, method="linear")
    with pytest.raises(ValueError, match="must be positive, not 0"):
        logic.process(node, spacing=0, method="linear")
    assert volumes(scene) == 1 and not logic.isRunning


def test_input_and_output_must_differ(scene, sample_array):
    node = volume_node(scene, sample_array)
    with pytest.raises(ValueError, match="must not be the input"):
        CaLIDUpsampleLogic(scene, python=sys.executable).process(node, node)


def test_the_map_may_not_replace_the_input_or_the_output(scene, sample_array):
    node, out = volume_node(scene, sample_array), volume_node(scene, sample_array, name="out")
    for map_node in (node, out):
        with pytest.raises(ValueError, match="uncertainty volume must be a node of its own"):
            CaLIDUpsampleLogic(scene, python=sys.executable).process(node, out, uncertaintyVolume=map_node)
    assert node_array(node).shape == sample_array.shape


def test_a_map_from_a_peer_or_an_unknown_method_is_refused_before_the_worker_starts(scene, sample_array,
                                                                                   private_tmp):
    """The worker refused it too, but only after the volume was written and a process had started."""
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    with pytest.raises(ValueError, match="uncertainty map is the model's .* morph gives none"):
        logic.process(node, method="morph", uncertaintyVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))
    with pytest.raises(ValueError, match="method must be one of calid, morph, linear, not bspline"):
        logic.process(node, method="bspline")
    assert not logic.isRunning and list(private_tmp.iterdir()) == []


def test_labelmaps_and_vector_volumes_are_refused_in_one_line(scene, sample_array):
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labels.SetAndObserveImageData(volume_node(scene, sample_array).GetImageData())
    rgb = volume_node(scene, np.repeat(sample_array[..., None], 3, axis=-1).reshape(sample_array.shape[0],
                                                                                      sample_array.shape[1], -1))
    rgb.GetImageData().SetDimensions(sample_array.shape[2], sample_array.shape[1], sample_array.shape[0])
    rgb.GetImageData().GetPointData().GetScalars().SetNumberOfComponents(3)
    for node, phrase in ((labels, "is a labelmap"), (rgb, "vector/RGB")):
        with pytest.raises(ValueError, match=phrase):
            CaLIDUpsampleLogic(scene, python=sys.executable).process(node, method="linear")


def test_a_transformed_input_gives_an_output_where_the_input_is(scene, sample_array, private_tmp):
    """The worker's voxels lie in the input's own frame: the output goes under the input's parent transform."""
    node = volume_node(scene, sample_array)
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    matrix.SetElement(1, 3, -7.0)
    shift.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(shift.GetID())
    elsewhere = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "elsewhere")
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    target.SetAndObserveTransformNodeID(elsewhere.GetID())
    for given in (None, target):
        out = CaLIDUpsampleLogic(scene, python=sys.executable).process(node, given, factor=2, method="linear")
        assert out.GetTransformNodeID() == shift.GetID()
        np.testing.assert_allclose(ras(out, (5, 7, 4)), ras(node, (5, 7, 2)), atol=1e-4)


def test_standby_worker_runs_the_next_upsampling_and_another_then_waits(scene, sample_array, tiny_model_dir, private_tmp):
    node = volume_node(scene, sample_array)
    options = dict(factor=2, device="cpu", steps=2, seed=3, model=str(tiny_model_dir))
    cold = node_array(CaLIDUpsampleLogic(scene, python=sys.executable).process(node, **options)).copy()
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    logic.setStandby(True)
    first = logic.standby
    assert first is not None and first.isStandingBy
    warm = logic.process(node, **options)
    assert first.returncode == 0 and first.command[3] == "upsample"  # the waiting worker ran this upsampling
    assert np.array_equal(node_array(warm), cold)  # same run, same result as a fresh process
    assert logic.standby is not None and logic.standby is not first and logic.standby.isStandingBy
    waiting = logic.standby.process
    logic.setStandby(False)
    assert logic.standby is None and waiting.wait(10) is not None
    assert list(private_tmp.iterdir()) == []


def test_cancelling_a_run_of_the_standby_worker_leaves_nothing(scene, sample_array, tiny_model_dir, private_tmp):
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    logic.setStandby(True)
    first = logic.standby
    before = volumes(scene)

    def cancel_midway(fraction, stage, eta):
        if fraction > 0.2:
            logic.cancel()

    result = logic.process(node, factor=4, device="cpu", steps=200, model=str(tiny_model_dir), progressCallback=cancel_midway)
    assert result is None and first.cancelled and first.returncode != 0
    assert volumes(scene) == before and logic.standby is not first and logic.standby.isStandingBy
    logic.setStandby(False)
    assert list(private_tmp.iterdir()) == []  # inputs, outputs and every standby folder removed
