"""The calibrated uncertainty output in Slicer (issue 16): loading, overlay, per-slice table, the log's sentence.

Against slicer-core's real MRML scene and real NRRD files written with SimpleITK (oblique, anisotropic, LPS),
without the engine: the worker is a stand-in that copies those files where ``calid upsample`` would write them
and prints a ``done`` event shaped like the engine's, so these tests hold whatever the engine computes. One slow
test runs the real worker with a tiny error-head model: the contract itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402

from CaLIDLib import CaLIDUpsampleLogic  # noqa: E402
from CaLIDLib.uncertainty import LEGEND_TITLE, largest_error_sentence  # noqa: E402
from CaLIDLib.volumes import update_node_from_file  # noqa: E402
from test_slicer_cine import cine, sequences_logic  # noqa: E402,F401
from test_slicer_logic import node_array, private_tmp, rotation, sample_array, volume_node  # noqa: E402,F401

pytestmark = [pytest.mark.slicer]

INFERNO = "vtkMRMLColorTableNodeFileInferno.txt"
IRON = "vtkMRMLColorTableNodeIron"
FAKE_WORKER = """import shutil, sys
shutil.copy(sys.argv[1], sys.argv[3])
shutil.copy(sys.argv[2], sys.argv[4])
print(sys.argv[5], flush=True)
"""


def app_like_scene(inferno=True, legend=True, views=("Red", "Yellow")):
    """A scene as the application sets it up: default colour tables (with Slicer's Inferno colour file when
    ``inferno``), the Colors module's legend node class when ``legend``, and one slice composite node per view."""
    scene = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(scene)
    scene.colour_logic = colours  # alive as long as the scene
    if inferno:
        node = slicer.vtkMRMLColorTableNode()
        node.SetSingletonTag(slicer.vtkMRMLColorLogic.GetFileColorNodeSingletonTag("Inferno.txt"))
        node.SetTypeToFile()
        node.SetName("Inferno")
        scene.AddNode(node)
        assert node.GetID() == INFERNO  # the ID the application gives its Inferno colour file
    if legend:
        scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    for name in views:
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode", name)
    return scene


def write_image(array_zyx: np.ndarray, path: Path, spacing, origin=(31.0, -12.5, 80.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(rotation(0.4, -0.7, 1.1).flatten().tolist())  # oblique
    sitk.WriteImage(image, str(path))
    return image


class Run:
    """A dense output and its uncertainty map along ``slice_axis`` (x=0 .. z=2, SimpleITK's order), factor 2:
    the map is 0 on the acquired (even) slices and on a background corner, positive elsewhere."""

    def __init__(self, folder: Path, slice_axis: int, heart: bool = True):
        rng = np.random.default_rng(7)
        self.slice_axis, self.folder = slice_axis, folder
        shape_xyz = [6, 7, 8]
        shape_xyz[slice_axis] = 9  # 5 acquired, 4 generated slices
        spacing = [1.3, 1.4, 1.5]
        spacing[slice_axis] = 4.0
        self.dense = rng.integers(0, 400, shape_xyz[::-1]).astype(np.int16)
        uncertainty = rng.uniform(1.0, 30.0, shape_xyz[::-1]).astype(np.float32)
        along = np.moveaxis(uncertainty, 2 - slice_axis, 0)  # a view: slices first
        along[::2] = 0.0
        along[:, :2, :2] = 0.0  # background inside generated slices too
        self.output_image = write_image(self.dense, folder / "prepared_output.nrrd", spacing)
        self.uncertainty_image = write_image(uncertainty, folder / "prepared_uncertainty.nrrd", spacing)
        self.uncertainty = uncertainty
        self.generated = list(range(1, 9, 2))
        self.slices = [{"slice": k, "expected_error": float(along[k].mean()),
                        "heart_expected_error": (float(along[k].max()) if heart and k != 5 else None)}
                       for k in self.generated]
        acquired = np.moveaxis(self.dense, 2 - slice_axis, 0)[::2]
        sparse_spacing = list(spacing)
        sparse_spacing[slice_axis] *= 2
        self.input_path = folder / "input_sparse.nrrd"
        write_image(np.moveaxis(acquired, 0, 2 - slice_axis).copy(), self.input_path, sparse_spacing)

    def done_event(self, with_slices=True) -> str:
        event = {"event": "done", "output": "output.nrrd", "uncertainty": "uncertainty.nrrd",
                 "slice_axis": self.slice_axis, "uncertainty_unit": "expected |error|, input intensity units"}
        if with_slices:
            event["uncertainty_slices"] = self.slices
        return json.dumps(event)

    def logic(self, scene, commands: list, with_slices=True) -> CaLIDUpsampleLogic:
        """A logic whose worker is the stand-in; the real ``workerCommand`` is still built (and kept in
        ``commands``) to know where the run's outputs go."""
        logic = CaLIDUpsampleLogic(scene, python=sys.executable)
        worker = self.folder / "fake_worker.py"
        worker.write_text(FAKE_WORKER)
        build = logic.workerCommand

        def command(*args, **kwargs):
            real = build(*args, **kwargs)
            commands.append(real)
            uncertainty = real[real.index("--uncertainty") + 1] if "--uncertainty" in real else "/dev/null"
            return [sys.executable, str(worker), str(self.folder / "prepared_output.nrrd"),
                    str(self.folder / "prepared_uncertainty.nrrd"), real[5], uncertainty,
                    self.done_event(with_slices)]

        logic.workerCommand = command
        return logic

    def input_node(self, scene):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX")
        update_node_from_file(node, self.input_path)
        return node


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ras_of_file(image: sitk.Image) -> np.ndarray:
    """The IJK-to-RAS matrix an image file means (its LPS geometry with x and y flipped)."""
    m = np.eye(4)
    flip = np.diag([-1.0, -1.0, 1.0])
    m[:3, :3] = flip @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = flip @ np.array(image.GetOrigin())
    return m


def column(table, name) -> list:
    array = table.GetTable().GetColumnByName(name)
    assert array is not None, f"no column {name!r}"
    return [array.GetValue(i) for i in range(array.GetNumberOfTuples())]


@pytest.fixture(params=[2, 0], ids=["slices-along-z", "slices-along-x"])
def run(request, tmp_path) -> Run:
    return Run(tmp_path, request.param)


def test_uncertainty_node_gets_the_file_geometry_and_voxels_exactly(run, private_tmp):
    scene = app_like_scene()
    uncertainty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX error")
    commands = []
    output = run.logic(scene, commands).process(run.input_node(scene), uncertaintyVolume=uncertainty)
    np.testing.assert_allclose(ijk_to_ras(uncertainty), ras_of_file(run.uncertainty_image), atol=1e-9)
    np.testing.assert_allclose(ijk_to_ras(uncertainty), ijk_to_ras(output), atol=1e-9)  # one grid, both nodes
    assert node_array(uncertainty).dtype == np.float32 and np.array_equal(node_array(uncertainty), run.uncertainty)
    assert np.array_equal(node_array(output), run.dense)
    assert list(private_tmp.iterdir()) == []


def test_overlay_uses_inferno_hides_zero_and_names_the_unit_in_the_legend(run, private_tmp):
    scene = app_like_scene()
    uncertainty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX error")
    output = run.logic(scene, []).process(run.input_node(scene), uncertaintyVolume=uncertainty)
    display = uncertainty.GetDisplayNode()
    assert display.GetColorNodeID() == INFERNO
    nonzero = run.uncertainty[run.uncertainty > 0]
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(0.0, abs=1e-6)
    assert display.GetWindowLevelMax() == pytest.approx(np.percentile(nonzero, 99), rel=1e-5)
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert 0.0 < display.GetLowerThreshold() <= nonzero.min()  # 0 (acquired, background) is transparent
    assert display.GetUpperThreshold() >= nonzero.max()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        view = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        assert (view.GetBackgroundVolumeID(), view.GetForegroundVolumeID()) == (output.GetID(), uncertainty.GetID())
        assert view.GetForegroundOpacity() == pytest.approx(0.5)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(uncertainty)
    assert legend is not None and legend.GetTitleText() == LEGEND_TITLE == "expected |error| (input intensity units)"


def test_without_the_colour_file_legend_or_views_the_overlay_falls_back_quietly(tmp_path, private_tmp):
    run = Run(tmp_path, 2)
    scene = app_like_scene(inferno=False, legend=False, views=())
    uncertainty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX error")
    run.logic(scene, []).process(run.input_node(scene), uncertaintyVolume=uncertainty)
    display = uncertainty.GetDisplayNode()
    assert display.GetColorNodeID() == IRON and display.GetApplyThreshold()
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode") == 0


def test_table_has_one_row_per_generated_slice_beside_the_input(run, private_tmp):
    scene = app_like_scene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "Study")
    source = run.input_node(scene)
    hierarchy.CreateItem(study, source)  # the application does this when a volume is loaded
    uncertainty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX error")
    logic = run.logic(scene, [])
    logic.process(source, uncertaintyVolume=uncertainty)
    table = logic.lastUncertaintyTable
    assert table is not None and table.GetName() == "SAX error per slice"
    assert column(table, "slice") == run.generated
    np.testing.assert_allclose(column(table, "expected |error|"), [s["expected_error"] for s in run.slices])
    assert column(table, "heart expected |error|") == [
        "" if s["heart_expected_error"] is None else f"{s['heart_expected_error']:.6g}" for s in run.slices]
    # the position along the slice normal, from the file's own LPS geometry (not the node's)
    image, axis = run.output_image, run.slice_axis
    normal = np.diag([-1.0, -1.0, 1.0]) @ np.array(image.GetDirection()).reshape(3, 3)[:, axis]
    expected = []
    for k in run.generated:
        index = [0, 0, 0]
        index[axis] = k
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        expected.append(float(normal @ (np.diag([-1.0, -1.0, 1.0]) @ lps)))
    np.testing.assert_allclose(column(table, "position (mm)"), expected, atol=1e-6)
    assert np.ptp(expected) == pytest.approx(6 * 4.0)  # slices 1 to 7, 4 mm apart
    assert table.GetColumnUnitLabel("expected |error|") == "input intensity units"
    for node in (uncertainty, table):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study


def test_table_positions_are_where_the_slice_views_are_under_a_parent_transform(run, private_tmp):
    """Under a linear parent transform (turned and moved) the positions are the world's, where a slice view's offset
    finds the slice; under a warp, which has no one plane, the node's own."""
    scene = app_like_scene()
    source = run.input_node(scene)
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_world = np.eye(4)
    to_world[:3, :3], to_world[:3, 3] = rotation(-0.3, 0.9, 0.2), (40.0, -25.0, 12.5)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, to_world[r, c])
    moved.SetMatrixTransformToParent(matrix)
    source.SetAndObserveTransformNodeID(moved.GetID())
    logic = run.logic(scene, [])
    output = logic.process(source, uncertaintyVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX error"))
    def positions(ijk_to_world):
        normal = ijk_to_world[:3, run.slice_axis] / np.linalg.norm(ijk_to_world[:3, run.slice_axis])
        return [float(normal @ (ijk_to_world[:3, 3] + k * ijk_to_world[:3, run.slice_axis])) for k in run.generated]

    own = positions(ras_of_file(run.output_image))
    assert output.GetParentTransformNode() is moved
    np.testing.assert_allclose(column(logic.lastUncertaintyTable, "position (mm)"),
                               positions(to_world @ ras_of_file(run.output_image)), atol=1e-6)
    assert not np.allclose(own, positions(to_world @ ras_of_file(run.output_image)), atol=1.0)  # centimetres apart

    warp = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    source.SetAndObserveTransformNodeID(warp.GetID())
    logic.process(source, uncertaintyVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX error 2"))
    np.testing.assert_allclose(column(logic.lastUncertaintyTable, "position (mm)"), own, atol=1e-6)


def test_a_map_node_deleted_during_the_run_gets_a_new_one_shown_and_named(run, private_tmp):
    scene = app_like_scene()
    source = run.input_node(scene)
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX error")
    logic = run.logic(scene, [])
    logic.process(source, uncertaintyVolume=chosen, waitForCompletion=False)
    scene.RemoveNode(chosen)
    while logic.poll():
        pass
    made = logic.lastUncertaintyVolume
    assert made is not chosen and made.GetScene() is scene and made.GetName() == "SAX_CaLID_x2 expected error"
    assert np.array_equal(node_array(made), run.uncertainty)
    assert scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode").GetForegroundVolumeID() == made.GetID()
    assert logic.lastUncertaintyTable.GetName() == "SAX_CaLID_x2 expected error per slice"


def test_a_second_run_refills_the_table_and_a_run_without_figures_leaves_none(tmp_path, private_tmp):
    run = Run(tmp_path, 2, heart=False)
    scene = app_like_scene()
    source = run.input_node(scene)
    uncertainty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX error")
    logic = run.logic(scene, [])
    logic.process(source, uncertaintyVolume=uncertainty)
    first = logic.lastUncertaintyTable
    logic.process(source, uncertaintyVolume=uncertainty)
    assert logic.lastUncertaintyTable is first and scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert column(first, "slice") == run.generated and set(column(first, "heart expected |error|")) == {""}
    logic.process(source)  # no uncertainty output: the previous run's figures are not this run's
    assert logic.lastUncertaintyTable is None and largest_error_sentence(logic.lastUncertaintySlices) == ""
    older = run.logic(scene, [], with_slices=False)  # a done event without per-slice figures
    older.process(source, uncertaintyVolume=uncertainty)
    assert older.lastUncertaintyTable is None and older.lastUncertaintySlices == []
    assert uncertainty.GetDisplayNode().GetApplyThreshold()  # the map is shown all the same


def test_largest_error_sentence_names_the_three_worst_slices_with_value_and_unit():
    slices = [{"slice": 1, "position_mm": -10.0, "expected_error": 4.0, "heart_expected_error": None},
              {"slice": 3, "position_mm": -2.0, "expected_error": 12.25, "heart_expected_error": 20.5},
              {"slice": 5, "position_mm": 6.0, "expected_error": 1.5, "heart_expected_error": None},
              {"slice": 7, "position_mm": 14.04, "expected_error": 9.0, "heart_expected_error": None}]
    sentence = largest_error_sentence(slices)
    assert sentence == ("Largest expected |error| (input intensity units) on the generated slices: "
                        "slice 3 at -2.0 mm: 12.2 (heart 20.5); slice 7 at 14.0 mm: 9; slice 1 at -10.0 mm: 4.")
    assert "slice 5" not in sentence
    assert largest_error_sentence([]) == ""


def test_the_panels_sentence_follows_a_run(tmp_path, private_tmp):
    run = Run(tmp_path, 0)
    scene = app_like_scene()
    logic = run.logic(scene, [])
    logic.process(run.input_node(scene), uncertaintyVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "U"))
    worst = sorted(run.slices, key=lambda s: -s["expected_error"])
    sentence = largest_error_sentence(logic.lastUncertaintySlices)
    named = [int(part.split(" at ")[0]) for part in sentence.split("slice ")[1:]]
    assert named == [s["slice"] for s in worst[:3]]


def test_worker_command_asks_for_the_uncertainty_without_samples(tmp_path):
    logic = CaLIDUpsampleLogic(slicer.vtkMRMLScene(), python=sys.executable)
    command = logic.workerCommand(tmp_path / "in.nrrd", tmp_path / "out.nrrd", uncertaintyPath=tmp_path / "u.nrrd")
    assert command[command.index("--uncertainty") + 1] == str(tmp_path / "u.nrrd")
    assert "--samples" not in command and command[command.index("--method") + 1] == "calid"
    averaged = logic.workerCommand(tmp_path / "in.nrrd", tmp_path / "out.nrrd", samples=4)
    assert averaged[averaged.index("--samples") + 1] == "4" and "--uncertainty" not in averaged


def test_run_through_the_logic_passes_uncertainty_without_samples(tmp_path, private_tmp):
    run = Run(tmp_path, 2)
    scene = app_like_scene()
    commands = []
    run.logic(scene, commands).process(run.input_node(scene), uncertaintyVolume=scene.AddNewNodeByClass(
        "vtkMRMLScalarVolumeNode", "U"))
    (command,) = commands
    assert "--uncertainty" in command and "--samples" not in command


@pytest.mark.slow
def test_cine_uncertainty_is_a_second_sequence_in_the_browser_overlaid_on_the_output(cine, error_head_model_dir,
                                                                                     private_tmp):
    scene, browser, sequence, proxy = cine
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")  # the cine under a parent transform
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    moved.SetMatrixTransformToParent(matrix)
    proxy.SetAndObserveTransformNodeID(moved.GetID())
    uncertainty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "U")
    out = CaLIDUpsampleLogic(scene, python=sys.executable).process(
        proxy, factor=2, device="cpu", steps=1, model=str(error_head_model_dir), uncertaintyVolume=uncertainty,
        sequenceBrowser=browser)
    # the overlay lies on the output, under the input's transform (it was left outside it: 25 mm off)
    assert uncertainty.GetTransformNodeID() == out.GetTransformNodeID() == moved.GetID()
    maps = browser.GetSequenceNode(uncertainty)
    assert maps is not None and maps is not browser.GetSequenceNode(out) and browser.IsProxyNode(uncertainty.GetID())
    assert maps.GetNumberOfDataNodes() == sequence.GetNumberOfDataNodes()
    for t in range(maps.GetNumberOfDataNodes()):
        frame = node_array(maps.GetNthDataNode(t))
        assert frame.shape == node_array(browser.GetSequenceNode(out).GetNthDataNode(t)).shape
        assert not frame[::2].any() and frame[1::2].min() > 0  # 0 on acquired slices, an error on generated ones
    display = uncertainty.GetDisplayNode()  # overlaid as for a volume: 0 (acquired slices) hidden by the threshold
    assert display.GetUpperThreshold() >= max(node_array(maps.GetNthDataNode(t)).max()
                                              for t in range(maps.GetNumberOfDataNodes()))  # no frame's top hidden
    assert display is not None and display.GetApplyThreshold() and 0 < display.GetLowerThreshold() < 1e-30
    assert list(private_tmp.iterdir()) == []


@pytest.mark.slow
def test_real_engine_fills_the_map_and_one_row_per_generated_slice(error_head_model_dir, sample_array, private_tmp):
    """The contract with the engine, end to end: the real worker and a tiny model with an (untrained) error head."""
    scene = app_like_scene()
    source = volume_node(scene, sample_array)
    uncertainty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX error")
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    output = logic.process(source, factor=2, device="cpu", model=str(error_head_model_dir),
                           uncertaintyVolume=uncertainty)
    np.testing.assert_allclose(ijk_to_ras(uncertainty), ijk_to_ras(output), atol=1e-6)
    values = node_array(uncertainty)
    assert values.shape == node_array(output).shape and not values[::2].any() and values[1::2].any()
    generated = list(range(1, values.shape[0], 2))
    assert column(logic.lastUncertaintyTable, "slice") == generated
    np.testing.assert_allclose(column(logic.lastUncertaintyTable, "expected |error|"),
                               [values[k].mean() for k in generated], rtol=1e-4)
    assert uncertainty.GetDisplayNode().GetColorNodeID() == INFERNO
