"""Table nodes kept by the node whose figures they hold, so a run into the same node refills its tables."""

from __future__ import annotations


def referenced_table(scene, owner, reference: str, name: str):
    """The table node ``owner`` references as ``reference`` while it is still in the scene, else a new one that
    ``owner`` then references; named ``name`` and emptied, ready to be filled. Without it every run into the same
    segmentation or map added one more table of the same name, and the older ones read as current."""
    table = owner.GetNodeReference(reference)
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode")
        owner.SetNodeReferenceID(reference, table.GetID())
    table.SetName(name)
    table.RemoveAllColumns()
    return table
