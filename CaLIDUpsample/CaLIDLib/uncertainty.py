"""The calibrated uncertainty map of a CaLID run in Slicer: its overlay, its per-slice table, the log's sentence.

``calid upsample --uncertainty`` writes, per voxel of the dense grid, the expected absolute error predicted by
the model's error head, in the input's intensity units; it is exactly 0 on the acquired slices, which are the
input's own. The worker's ``done`` event adds the mean of each generated slice (``uncertainty_slices``: dense
``slice`` index, ``expected_error``, and ``heart_expected_error`` inside the dense segmentation, or null).

Qt-free: everything here works on slicer-core's bare MRML scene, where colour files, the colour legend and
slice views exist only if the test (or the application) made them, so each of those is optional.
"""

from __future__ import annotations

import numpy as np
import vtk

from .tables import referenced_table
from .volumes import ijk_to_ras, ijk_to_world, voxels

UNIT = "input intensity units"
LEGEND_TITLE = f"expected |error| ({UNIT})"
COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileViridis.txt",
                  "vtkMRMLColorTableNodeIron")
"""Colour maps whose lightness grows with the error, by preference: Slicer's Inferno and Viridis colour files
(perceptually uniform), else the built-in Iron heat map; in a scene with none of them the display keeps its own."""
OVERLAY_OPACITY = 0.5
HIGH_PERCENTILE = 99.0
"""The colour map ends at this percentile of the nonzero voxels: a few extreme voxels would darken the rest."""
TABLE_REFERENCE = "CaLIDPerSliceTable"
"""Node reference from an uncertainty volume to its table, so a run into the same volume refills that table."""
COLUMNS = ("slice", "position (mm)", "expected |error|", "heart expected |error|")


def show_uncertainty(scene, uncertainty, background, frames=None) -> None:
    """Overlay ``uncertainty`` on ``background`` in every slice view of ``scene`` (a bare scene has none).

    Window from 0 to a high percentile of the nonzero voxels (of every frame of ``frames``, a cine's sequence of
    maps, whose proxy ``uncertainty`` is: one display serves them all); the threshold starts just above 0, so
    acquired slices (exactly 0) show the image unveiled, and has no upper end, so no frame hides its largest
    errors. The colour legend names the unit; it needs the Colors module's legend node class, registered by the
    application (and by tests that want it).
    """
    values = voxels(uncertainty) if frames is None or not frames.GetNumberOfDataNodes() else np.concatenate(
        [voxels(frames.GetNthDataNode(t)).ravel() for t in range(frames.GetNumberOfDataNodes())])
    nonzero = values[values > 0]
    high = float(np.percentile(nonzero, HIGH_PERCENTILE)) if nonzero.size else 1.0
    if uncertainty.GetDisplayNode() is None:
        uncertainty.CreateDefaultDisplayNodes()
    display = uncertainty.GetDisplayNode()
    colour = next((id_ for id_ in COLOR_NODE_IDS if scene.GetNodeByID(id_) is not None), None)
    if colour is not None:
        display.SetAndObserveColorNodeID(colour)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, high)
    lowest = float(np.nextafter(np.float32(0), np.float32(1)))  # the smallest positive float32: only 0 is hidden
    display.SetAutoThreshold(False)
    display.SetThreshold(lowest, float(np.finfo(np.float32).max))
    display.SetApplyThreshold(True)
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        view = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        view.SetBackgroundVolumeID(background.GetID())
        view.SetForegroundVolumeID(uncertainty.GetID())
        view.SetForegroundOpacity(OVERLAY_OPACITY)
    if scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        import slicer

        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(uncertainty)
        if legend is not None:
            legend.SetTitleText(LEGEND_TITLE)
            legend.SetLabelFormat("%.3g")  # intensity units range from fractions (normalised data) to thousands


def slice_position(node, axis: int, index: int) -> float:
    """Signed distance (mm) from the world origin of dense slice ``index`` along the slice normal (the direction
    of the volume's ``axis``), in world RAS as the slice views' offset reads it: under a linear parent transform
    the transformed position, under a warp the node's own (no one plane to measure along). Read from the node's
    IJK-to-RAS, so the file's LPS needs no care here."""
    world = ijk_to_world(node)
    m = ijk_to_ras(node) if world is None else world
    normal = m[:3, axis] / np.linalg.norm(m[:3, axis])
    return float(normal @ (m[:3, 3] + index * m[:3, axis]))


def per_slice(slices: list[dict], volume, slice_axis: int) -> list[dict]:
    """The done event's ``uncertainty_slices``, each with its ``position_mm`` on ``volume`` (the dense grid, already
    under the input's parent transform)."""
    return [{**entry, "position_mm": slice_position(volume, slice_axis, entry["slice"])} for entry in slices]


def uncertainty_table(scene, slices: list[dict], uncertainty):
    """The per-slice figures of ``per_slice`` as a table node ``<uncertainty> per slice``: the one already
    referenced by ``uncertainty`` when it is still in the scene, else a new one. A null heart figure (no
    segmentation, or no heart on that slice) is an empty cell, not 0: that column holds text."""
    table = referenced_table(scene, uncertainty, TABLE_REFERENCE, f"{uncertainty.GetName()} per slice")
    for name, array in zip(COLUMNS, (vtk.vtkIntArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray(),
                                     vtk.vtkStringArray())):
        array.SetName(name)
        table.AddColumn(array)
    for name, unit in zip(COLUMNS[1:], ("mm", UNIT, UNIT)):
        table.SetColumnUnitLabel(name, unit)
    for entry in slices:
        row = table.AddEmptyRow()
        cells = table.GetTable()
        cells.SetValue(row, 0, vtk.vtkVariant(int(entry["slice"])))
        cells.SetValue(row, 1, vtk.vtkVariant(float(entry["position_mm"])))
        cells.SetValue(row, 2, vtk.vtkVariant(float(entry["expected_error"])))
        heart = entry.get("heart_expected_error")
        table.SetCellText(row, 3, "" if heart is None else f"{heart:.6g}")
    table.Modified()
    return table


def largest_error_sentence(slices: list[dict], count: int = 3) -> str:
    """The generated slices to look at first, for the panel's log: the ``count`` largest expected errors of
    ``per_slice`` with their value, unit and position; "" when there are no figures."""
    top = sorted(slices, key=lambda entry: entry["expected_error"], reverse=True)[:count]
    if not top:
        return ""

    def one(entry: dict) -> str:
        heart = entry.get("heart_expected_error")
        return (f"slice {entry['slice']} at {entry['position_mm']:.1f} mm: {entry['expected_error']:.3g}"
                + ("" if heart is None else f" (heart {heart:.3g})"))

    return f"Largest expected |error| ({UNIT}) on the generated slices: " + "; ".join(map(one, top)) + "."
