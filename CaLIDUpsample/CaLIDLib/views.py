"""Showing a result in Slicer's views, Qt-free (the layout node and application logic are MRML objects)."""

from __future__ import annotations

TABLE_VIEW = "vtkMRMLTableViewNode"


def show_table(scene, application_logic, table) -> None:
    """Show ``table`` in a table view: selecting it only fills table views that exist, and Slicer's default
    layouts have none, so a layout without one is switched to Four-Up with a table (slice and 3D views kept)."""
    import slicer

    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None and TABLE_VIEW not in (layout.GetCurrentLayoutDescription() or ""):
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
    application_logic.GetSelectionNode().SetActiveTableID(table.GetID())
    application_logic.PropagateTableSelection()
