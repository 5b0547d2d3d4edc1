"""CaLIDUpsampleLogic's segmentation output against slicer-core's real MRML scene, with the real worker and
the bundled segmentation model on the real (oblique) sample."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from CaLIDLib import CaLIDUpsampleLogic  # noqa: E402
from CaLIDLib.segmentations import (LEFT_VENTRICLE, RIGHT_VENTRICLE, STRUCTURES,  # noqa: E402
                                    load_labels_into_segmentation, structure_of_segment, terminology,
                                    write_segmentation_labels)
from conftest import SAMPLE_LABELS  # noqa: E402
from test_slicer_logic import node_array, private_tmp, volume_node  # noqa: E402, F401

pytestmark = [pytest.mark.slicer, pytest.mark.slow]


@pytest.fixture
def scene():
    """A scene with the Segmentations module logic registered, as the application does at start-up."""
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    scene.segmentations_logic = logic  # keep it alive as long as the scene
    return scene


@pytest.fixture
def sample_node(scene, sample_image):
    return volume_node(scene, sitk.GetArrayFromImage(sample_image), spacing=sample_image.GetSpacing())


def user_labels(shape) -> np.ndarray:
    contours = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS)))
    assert contours.shape == shape
    return np.where(contours == 1, 3, 0).astype(np.uint8)  # Sunnybrook's LV blood pool is our label 3


def segments(segmentation) -> dict[str, object]:
    content = segmentation.GetSegmentation()
    return {content.GetNthSegment(i).GetName(): content.GetNthSegment(i) for i in range(content.GetNumberOfSegments())}


def test_segmentation_output_has_standard_segments_geometry_and_volumes(scene, sample_node, tiny_model_dir, private_tmp):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "Study")
    hierarchy.CreateItem(study, sample_node)  # the application does this when a volume is loaded
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Heart")
    logic = CaLIDUpsampleLogic(scene, python=sys.executable)
    dense = logic.process(sample_node, factor=2, device="cpu", steps=1, model=str(tiny_model_dir),
                          outputSegmentation=segmentation)
    found = segments(segmentation)
    lv = found["Left ventricle cavity"]  # the bundled network finds the LV on this real scan
    assert lv.GetLabelValue() == 3 and "SCT^87878005^Left ventricle" in lv.GetTerminology()
    assert np.allclose(lv.GetColor(), STRUCTURES[3][3])
    if "Left ventricle myocardium" in found:
        entry = found["Left ventricle myocardium"].GetTerminology()
        assert "SCT^74281007^Myocardium" in entry and entry.endswith("SCT^87878005^Left ventricle~^^")
    assert set(found) <= {name for name, *_ in STRUCTURES.values()}
    # Referenced to the dense volume's grid, and filed in the input's study.
    reference = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
    assert reference is dense
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    table = logic.lastVolumesTable
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(table)) == study
    assert table.GetNumberOfRows() == 4 and table.GetCellText(2, 0) == "Left ventricle cavity volume"
    assert float(table.GetCellText(2, 1)) > 10  # mL: a real LV, not a few voxels
    assert list(private_tmp.iterdir()) == []
    # Run again into the same segmentation: its table is refilled, not joined by a second one of the same name.
    logic.process(sample_node, factor=3, device="cpu", method="linear", outputSegmentation=segmentation)
    tables = scene.GetNodesByClass("vtkMRMLTableNode")
    assert logic.lastVolumesTable is table and tables.GetNumberOfItems() == 1 and table.GetName() == "Heart volumes"
    logic.process(sample_node, factor=2, device="cpu", method="linear")  # no labels: no table of an earlier run's
    assert logic.lastVolumesTable is None and logic.lastFramesTable is None


def test_user_segments_are_kept_on_acquired_slices(scene, sample_node, private_tmp, tmp_path):
    sparse = user_labels(node_array(sample_node).shape)
    labels_file = tmp_path / "user.nrrd"
    image = sitk.GetImageFromArray(sparse)
    from CaLIDLib.volumes import image_from_node

    image.CopyInformation(image_from_node(sample_node))
    sitk.WriteImage(image, str(labels_file))
    user = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mine")
    load_labels_into_segmentation(scene, labels_file, user, sample_node)
    segments(user)["Left ventricle cavity"].SetName("LV blood pool")  # matched by its terminology, not its name
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Dense")
    dense = CaLIDUpsampleLogic(scene, python=sys.executable).process(  # bundled models: real new slices
        sample_node, factor=2, device="cpu", outputSegmentation=out, inputSegmentation=user)
    write_segmentation_labels(scene, out, dense, tmp_path / "dense.nrrd")
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "dense.nrrd")))
    np.testing.assert_array_equal(result[::2], sparse)
    assert (result[1::2][1:8] == 3).sum() > 0.5 * (sparse[1:9] == 3).sum() / 2


@pytest.mark.parametrize("name, terminology_of, expected", [
    ("LV blood pool", 3, 3), ("anything", 1, 1), ("anything", 2, 2), ("lv_cavity", None, 3), ("MYO", None, 2),
    ("Right-Ventricle", None, 1), ("Left atrium", None, None), ("Right atrium", None, None),
    ("RV myocardium", None, None), ("Right ventricle myocardium", None, None), ("Left ventricle cavity", None, 3),
    ("LVBP", None, 3), ("heart_ventricle_right", None, 1), ("heart_myocardium", None, 2),
    ("Left ventricle cavity 1", None, 3), ("Myocardium (LV)", None, 2)])
def test_user_segments_are_matched_whole_never_by_a_part_of_their_name(scene, name, terminology_of, expected):
    """Whole-heart segmentations hold atria and the RV's myocardium: a part of a name ("left", "myo") or a code
    found anywhere in the terminology took them for a ventricle's cavity or the LV's myocardium."""
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode").GetSegmentation()
    segment = segmentation.GetSegment(segmentation.AddEmptySegment("", name))
    if terminology_of is not None:
        segment.SetTerminology(terminology(terminology_of))
    assert structure_of_segment(segment) == expected


def test_myocardium_of_the_right_ventricle_is_not_the_left_ventricles(scene):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode").GetSegmentation()
    segment = segmentation.GetSegment(segmentation.AddEmptySegment("", "Myocardium"))
    segment.SetTerminology(terminology(2).replace(LEFT_VENTRICLE, RIGHT_VENTRICLE))
    assert structure_of_segment(segment) is None
    segment.SetTerminology(terminology(2).replace(LEFT_VENTRICLE, "SCT^80891009^Heart"))  # the region says no more
    assert structure_of_segment(segment) == 2


def test_unknown_user_segment_is_refused(scene, sample_node, tmp_path):
    user = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mine")
    user.GetSegmentation().AddEmptySegment("", "tumour")
    with pytest.raises(ValueError, match="tumour"):
        write_segmentation_labels(scene, user, sample_node, tmp_path / "x.nrrd")


@pytest.mark.parametrize("arrangement, switched", [("SlicerLayoutConventionalView", True),
                                                   ("SlicerLayout3DTableView", False)])
def test_volumes_table_is_shown_in_a_table_view(scene, arrangement, switched):
    """The default layouts have no table view; one that has one is kept."""
    from CaLIDLib.views import show_table

    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    layouts = slicer.vtkMRMLLayoutLogic()
    layouts.SetMRMLScene(scene)
    layout = layouts.GetLayoutNode()
    layout.SetViewArrangement(getattr(slicer.vtkMRMLLayoutNode, arrangement))
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "Heart volumes")
    show_table(scene, application, table)
    expected = slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView if switched else getattr(slicer.vtkMRMLLayoutNode, arrangement)
    assert layout.GetViewArrangement() == expected
    views = scene.GetNodesByClass("vtkMRMLTableViewNode")
    assert views.GetNumberOfItems() == 1 and views.GetItemAsObject(0).GetTableNodeID() == table.GetID()
