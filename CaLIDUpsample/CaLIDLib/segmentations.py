"""Segmentation nodes <-> label files for the worker, with standard terminology, colours and a volumes table; a
cine's labels as a sequence of segmentation nodes, with its volumes per frame and ejection fractions.

Qt-free: works with slicer-core's MRML scene once the Segmentations module logic is registered (as it is in
the application). Label values follow ``calid.segmentation.labels`` (1 RV cavity, 2 LV myocardium,
3 LV cavity); each segment carries its SNOMED CT terminology, so DICOM SEG export and the Segment Editor
show the standard meaning.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
import vtk.util.numpy_support

from calid.cine import phase_of
from calid.segmentation.labels import LABELS
from calid.segmentation.measures import structure_volumes

from .sequences import new_sequence_like
from .tables import referenced_table
from .volumes import image_from_node, update_node_from_file

ANATOMY = "SCT^123037004^Anatomical Structure"
LEFT_VENTRICLE, RIGHT_VENTRICLE, MYOCARDIUM = "SCT^87878005^Left ventricle", "SCT^53085002^Right ventricle", "SCT^74281007^Myocardium"
STRUCTURES = {
    # label: (segment name, type code, anatomic region code, colour)
    1: ("Right ventricle cavity", RIGHT_VENTRICLE, "", (0.27, 0.51, 0.85)),
    2: ("Left ventricle myocardium", MYOCARDIUM, LEFT_VENTRICLE, (0.35, 0.73, 0.35)),
    3: ("Left ventricle cavity", LEFT_VENTRICLE, "", (0.86, 0.27, 0.27)),
}
"""Blood pools are coded as their ventricle and the myocardium as Myocardium in the Left ventricle region, the
SNOMED CT concepts of DICOM's cardiac context groups (CID 7152, 3463); colours: RV blue, myocardium green,
LV red, as cardiac MR tools draw them."""
assert set(STRUCTURES) == set(LABELS)


def terminology(label: int) -> str:
    """Slicer's terminology entry string: context~category~type~modifier~region context~region~region modifier."""
    _, type_code, region, _ = STRUCTURES[label]
    return (f"Segmentation category and type - DICOM master list~{ANATOMY}~{type_code}~^^~"
            f"Anatomic codes - DICOM master list~{region or '^^'}~^^")


def _segmentation_logic():
    import slicer

    return slicer.vtkSlicerSegmentationsModuleLogic


def load_labels_into_segmentation(scene, path: Path, segmentation, reference_volume) -> None:
    """Replace the segments of ``segmentation`` with the labels in ``path`` (one named segment per structure)."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CaLID labels (temporary)")
    try:
        update_node_from_file(labelmap, path)
        segmentation.GetSegmentation().RemoveAllSegments()
        if not _segmentation_logic().ImportLabelmapToSegmentationNode(labelmap, segmentation):
            raise RuntimeError(f"could not import the labels of {path} into {segmentation.GetName()}")
    finally:
        scene.RemoveNode(labelmap)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    content = segmentation.GetSegmentation()
    for index in range(content.GetNumberOfSegments()):
        segment = content.GetNthSegment(index)
        label = segment.GetLabelValue()
        if label in STRUCTURES:
            name, _, _, colour = STRUCTURES[label]
            segment.SetName(name)
            segment.SetColor(*colour)
            segment.SetTerminology(terminology(label))


SEGMENT_NAMES = {
    1: ("right ventricle", "right ventricle cavity", "right ventricular cavity", "right ventricle blood pool",
        "right ventricular blood pool", "rv", "rv cavity", "rv blood pool", "rv blood", "rvbp", "rv bp", "rvc",
        "rv endo", "heart ventricle right"),
    2: ("myocardium", "myo", "left ventricle myocardium", "left ventricular myocardium", "lv myocardium", "lv myo",
        "lvmyo", "myocardium (lv)", "heart myocardium"),
    3: ("left ventricle", "left ventricle cavity", "left ventricular cavity", "left ventricle blood pool",
        "left ventricular blood pool", "lv", "lv cavity", "lv blood pool", "lv blood", "lvbp", "lv bp", "lvc",
        "lv endo", "heart ventricle left"),
}
"""The names a user's segment may carry for each structure (ACDC's, TotalSegmentator's, common abbreviations),
compared whole (lower case, ``_`` and ``-`` read as spaces, a copy's trailing number dropped): a part of a name is
not enough, since whole-heart segmentations hold "Left atrium", "Right atrium" and "Right ventricle myocardium",
which must not become a ventricle's cavity or the left ventricle's myocardium."""
HEART = "80891009"
"""SNOMED CT Heart: a region that says no more than the type does (Myocardium in the Heart is the LV's here)."""


def _code_value(code: str) -> str:
    """The value of a coded term ``scheme^value^meaning`` ("SCT^87878005^Left ventricle" -> "87878005"), or ""."""
    return code.split("^")[1] if code.count("^") >= 2 else ""


def _terminology_codes(entry: str) -> tuple[str, str]:
    """(type code, anatomic region code) of a Slicer terminology entry string (``terminology``'s fields), each the
    code value alone ("" where absent)."""
    fields = entry.split("~")
    return (_code_value(fields[2]) if len(fields) > 2 else "", _code_value(fields[5]) if len(fields) > 5 else "")


def structure_of_segment(segment) -> int | None:
    """Which label a user's segment stands for: by its terminology's type and region codes where its type is one
    of the structures' (Myocardium in the Right ventricle region is none of them), else by its whole name
    (``SEGMENT_NAMES``: the Segment Editor gives new segments a generic type such as Tissue); None for anything
    else, which the caller refuses."""
    type_code, region = _terminology_codes(segment.GetTerminology() or "")
    if type_code in {_code_value(structure_type) for _, structure_type, _, _ in STRUCTURES.values()}:
        return next((label for label, (_, structure_type, structure_region, _) in STRUCTURES.items()
                     if type_code == _code_value(structure_type)
                     and region in {_code_value(structure_region), "", HEART}), None)
    name = re.sub(r"( \d+)+$", "", " ".join(segment.GetName().lower().replace("_", " ").replace("-", " ").split()))
    return next((label for label, names in SEGMENT_NAMES.items()
                 if name in names or name == STRUCTURES[label][0].lower()), None)


def write_segmentation_labels(scene, segmentation, reference_volume, path: Path) -> None:
    """The user's segments on the reference volume's grid as a label file (1 RV, 2 myocardium, 3 LV cavity).

    Raises ValueError naming the segments that match no structure: guessing would corrupt the labels.
    """
    content = segmentation.GetSegmentation()
    labels = None
    unknown = []
    for index in range(content.GetNumberOfSegments()):
        segment_id = content.GetNthSegmentID(index)
        label = structure_of_segment(content.GetSegment(segment_id))
        if label is None:
            unknown.append(content.GetSegment(segment_id).GetName())
            continue
        mask_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CaLID mask (temporary)")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            _segmentation_logic().ExportSegmentsToLabelmapNode(segmentation, ids, mask_node, reference_volume)
            mask = vtk.util.numpy_support.vtk_to_numpy(mask_node.GetImageData().GetPointData().GetScalars()) > 0
        finally:
            scene.RemoveNode(mask_node)
        labels = np.zeros(mask.shape, dtype=np.uint8) if labels is None else labels
        labels[mask] = label
    if unknown:
        raise ValueError(f"segments {', '.join(unknown)} match no structure (name them right ventricle, "
                         "myocardium or left ventricle, or set their terminology; remove atria and the right "
                         "ventricle's myocardium)")
    if labels is None:
        raise ValueError(f"segmentation {segmentation.GetName()} has no segments")
    reference = image_from_node(reference_volume)
    image = sitk.GetImageFromArray(labels.reshape(sitk.GetArrayViewFromImage(reference).shape))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))


RV_BASE_CAVEAT = ("Right-ventricle figures from the bundled segmenter run high: on unseen ACDC patients it draws RV "
                  "on the most basal slice or two where experts draw none (end-systolic volume +21 mL, RV ejection "
                  "fraction 8.5 points low; the LV's is unbiased). Check the basal slices; with your own labels of the "
                  "acquired slices (Your segmentation) both ejection fractions agreed within 2 points.")
"""What the panel's log says beside a volumes table (README, the bundled segmentation model: measured by
``Testing/Benchmarks/volumes_acdc.py``)."""
VOLUMES_TABLE = "CaLIDVolumesTable"
FRAMES_TABLE = "CaLIDFramesTable"
"""Node references from an output segmentation to its tables (``tables.referenced_table``)."""


def volumes_table(scene, labels_path: Path, segmentation, table=None):
    """A table node of structure volumes (mL) and myocardial mass (g) of a label file: ``table``, refilled, or
    the one ``segmentation`` keeps, ``<segmentation> volumes``."""
    volumes = structure_volumes(sitk.ReadImage(str(labels_path)))
    rows = [(STRUCTURES[label][0] + " volume", volumes[key], "mL")
            for label, key in ((1, "rv_cavity_ml"), (2, "lv_myocardium_ml"), (3, "lv_cavity_ml"))]
    rows.append(("Left ventricle myocardium mass", volumes["lv_myocardium_mass_g"], "g"))
    if table is None:
        table = referenced_table(scene, segmentation, VOLUMES_TABLE, f"{segmentation.GetName()} volumes")
    return _measures_table(rows, table)


def _measures_table(rows: list[tuple[str, float | None, str]], table):
    """``table`` refilled as Measure / Value / Unit; a None value (nothing to compute it from) is NaN, not a zero
    that would read as a measurement."""
    table.RemoveAllColumns()
    measure = table.AddColumn(vtk.vtkStringArray())
    measure.SetName("Measure")
    value = table.AddColumn(vtk.vtkDoubleArray())
    value.SetName("Value")
    unit = table.AddColumn(vtk.vtkStringArray())
    unit.SetName("Unit")
    for text, number, units in rows:
        row = table.AddEmptyRow()
        table.SetCellText(row, 0, text)
        table.GetTable().SetValue(row, 1, vtk.vtkVariant(float("nan") if number is None else float(number)))
        table.SetCellText(row, 2, units)
    table.Modified()
    return table


def segmentation_sequence(scene, labels_path: Path, like, reference_volume, name: str):
    """A new sequence of segmentation nodes in ``scene``, one per frame of the worker's 4D label file, each with
    the named segments ``load_labels_into_segmentation`` makes, indexed like the sequence ``like``."""
    labels = sitk.ReadImage(str(labels_path))
    size = list(labels.GetSize())
    if labels.GetDimension() != 4 or size[3] != like.GetNumberOfDataNodes():
        raise RuntimeError(f"the worker's labels {labels_path.name} do not hold {like.GetNumberOfDataNodes()} frames")
    output = new_sequence_like(scene, like, name)
    frame = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CaLID frame (temporary)")
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "frame.nrrd"
            for t in range(size[3]):  # the sequence keeps a copy of the frame node as it is now
                sitk.WriteImage(phase_of(labels, t), str(path))
                load_labels_into_segmentation(scene, path, frame, reference_volume)
                output.SetDataNodeAtValue(frame, like.GetNthIndexValue(t))
    except Exception:
        scene.RemoveNode(output)
        raise
    finally:
        scene.RemoveNode(frame)
    return output


FRAME_UNIT = "frame (from 1)"
"""Frames are counted from 1 in the tables, as the sequence browser counts them (the JSON's ``phase`` from 0)."""


def cycle_tables(scene, cycle: dict, segmentation, table=None) -> tuple:
    """The worker's ``volumes`` of a segmented cine (``calid.segmentation.measures.cycle_volumes``) as two table
    nodes: each ventricle's end-diastolic and end-systolic volume, frame, stroke volume and ejection fraction
    (``table``, refilled, or the one ``segmentation`` keeps, ``<segmentation> ejection fractions``), and every
    frame's volumes (``... per frame``, also kept by ``segmentation``)."""
    rows = []
    fractions = cycle["ejection_fractions"] or {}
    volume = lambda phase, key: None if phase is None else cycle["phases"][phase][key]
    frame = lambda phase: None if phase is None else phase + 1
    for side, title, key in (("lv", "Left ventricle", "lv_cavity_ml"), ("rv", "Right ventricle", "rv_cavity_ml")):
        ed, es = cycle[f"{side}_end_diastole_phase"], cycle[f"{side}_end_systole_phase"]
        rows += [(f"{title} end-diastolic volume", volume(ed, key), "mL"),
                 (f"{title} end-systolic volume", volume(es, key), "mL"),
                 (f"{title} end-diastolic frame", frame(ed), FRAME_UNIT),
                 (f"{title} end-systolic frame", frame(es), FRAME_UNIT),
                 (f"{title} stroke volume", fractions.get(f"{side}_stroke_volume_ml"), "mL"),
                 (f"{title} ejection fraction", fractions.get(f"{side}_ejection_fraction_percent"), "%")]
    name = f"{segmentation.GetName()} ejection fractions"
    summary = _measures_table(rows, table or referenced_table(scene, segmentation, VOLUMES_TABLE, name))
    frames = referenced_table(scene, segmentation, FRAMES_TABLE, f"{name} per frame")
    columns = (("Frame (from 1)", "phase"), ("Time (ms)", "time_ms"), ("Right ventricle cavity (mL)", "rv_cavity_ml"),
               ("Left ventricle myocardium (mL)", "lv_myocardium_ml"), ("Left ventricle cavity (mL)", "lv_cavity_ml"),
               ("Left ventricle myocardium mass (g)", "lv_myocardium_mass_g"))
    for title, _ in columns:
        frames.AddColumn(vtk.vtkDoubleArray()).SetName(title)
    for phase in cycle["phases"]:
        row = frames.AddEmptyRow()
        for column, (_, key) in enumerate(columns):
            value = frame(phase[key]) if key == "phase" else phase[key]
            frames.GetTable().SetValue(row, column, vtk.vtkVariant(float("nan") if value is None else float(value)))
    frames.Modified()
    return summary, frames
