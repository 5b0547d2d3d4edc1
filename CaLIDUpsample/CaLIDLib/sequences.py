"""Cine (2D+T) exchange for the worker: a sequence browser's volume sequence <-> a Slicer sequence NRRD.

In Slicer a cine is a ``vtkMRMLSequenceNode`` of volumes played by a ``vtkMRMLSequenceBrowserNode``, which
shows the current frame in a proxy volume node. The worker reads and writes ``.seq.nrrd`` (``calid.cine``),
the format of Slicer's own ``vtkMRMLVolumeSequenceStorageNode``, so both directions use that storage node
(present in ``slicer-core`` as in the application): frames and IJK-to-RAS go through unchanged. The storage
nodes are never added to the scene, so writing the input and reading the output leave no trace there.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["find_sequence", "playing_browser", "write_sequence", "new_sequence_like", "read_sequence_like",
           "add_to_browser"]


def find_sequence(scene, proxyVolume, browser=None):
    """``(browser, sequence)`` whose proxy is ``proxyVolume``, or None for a plain volume, which is also what the
    proxy of a one-frame sequence is upsampled as (the proxy is that frame).

    A given ``browser`` must play ``proxyVolume`` (a mistake otherwise, not a reason to fall back to 3D);
    without one, the scene's browsers are searched, so scripts need not know which browser shows the cine.
    """
    candidate = browser if browser is not None else playing_browser(scene, proxyVolume)
    if candidate is not None and candidate.IsProxyNode(proxyVolume.GetID()):
        sequence = candidate.GetSequenceNode(proxyVolume)
        if sequence is not None:
            return (candidate, sequence) if sequence.GetNumberOfDataNodes() > 1 else None
    if browser is not None:
        raise ValueError(f"{proxyVolume.GetName()} is not a proxy node of the browser {browser.GetName()}")
    return None


def playing_browser(scene, node):
    """The browser that plays ``node`` as a proxy (a frame of a cine), or None. Such a node shows whatever frame
    its browser is at: a result written into it would be replaced by the next frame shown."""
    if node is None:
        return None
    return next((browser for browser in _browsers(scene) if browser.IsProxyNode(node.GetID())), None)


def _browsers(scene) -> list:
    """Every sequence browser in the scene (none when the Sequences module never registered the class)."""
    nodes = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def write_sequence(sequence, path: Path) -> None:
    """The frames as one ``.seq.nrrd`` (list axis = the sequence index, its values the frame times)."""
    import slicer  # here, not at the top: CaLIDLib is imported by tools that run without Slicer

    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(sequence) or not path.is_file():
        raise RuntimeError(f"could not write the sequence {sequence.GetName()} (do all frames share one grid and voxel type?)")


def read_sequence_like(scene, path: Path, like, name: str):
    """A new sequence node in ``scene`` with the frames of ``path`` and the index of ``like``.

    The index name, unit, type and values are copied from the input sequence rather than taken from the file:
    the worker writes times as numbers, which need not spell them as the input did (``33.3`` vs ``33.29...``),
    and the output must line up with the input frame by frame in the same browser.
    """
    import slicer

    private = slicer.vtkMRMLScene()  # the reader wants a scene; a throwaway one keeps the user's untouched
    read = private.AddNewNodeByClass("vtkMRMLSequenceNode")
    storage = private.AddNewNodeByClass("vtkMRMLVolumeSequenceStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(read) or read.GetNumberOfDataNodes() != like.GetNumberOfDataNodes():
        raise RuntimeError(f"the worker's output {path.name} does not hold {like.GetNumberOfDataNodes()} frames")
    output = new_sequence_like(scene, like, name)
    for i in range(like.GetNumberOfDataNodes()):
        output.SetDataNodeAtValue(read.GetNthDataNode(i), like.GetNthIndexValue(i))
    return output


def new_sequence_like(scene, like, name: str):
    """An empty sequence node in ``scene`` with ``like``'s index name, unit and type, to be filled frame by frame
    at ``like``'s index values."""
    output = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    output.SetIndexName(like.GetIndexName())
    output.SetIndexUnit(like.GetIndexUnit())
    output.SetIndexType(like.GetIndexType())
    return output


def add_to_browser(scene, browser, sequence, proxyVolume=None):
    """Synchronize ``sequence`` in ``browser`` and return its proxy (``proxyVolume`` when given, else a new one).

    The Sequences module logic makes and refreshes proxies; the application's instance is used when there is
    one, otherwise (``slicer-core``, no application) a logic on this scene does the same. The browser is held
    unmodified while the sequence joins it: the application's logic answers the browser's change by making a proxy
    of its own, and a given ``proxyVolume`` then replaced that one, which stayed in the scene as a copy of a frame
    (a frozen segmentation over the one that plays, outside the input's transform).
    """
    logic = _sequences_logic(scene)
    modifying = browser.StartModify()
    try:
        logic.AddSynchronizedNode(sequence, proxyVolume, browser)
    finally:
        browser.EndModify(modifying)
    logic.UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    if proxy is None:
        raise RuntimeError(f"the browser {browser.GetName()} made no proxy node for {sequence.GetName()}")
    return proxy


def _sequences_logic(scene):
    """The application's Sequences logic when it manages ``scene``, else a fresh one bound to ``scene``."""
    import slicer

    try:
        logic = slicer.modules.sequences.logic()
        if logic.GetMRMLScene() is scene:
            return logic
    except AttributeError:
        pass
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    return logic
