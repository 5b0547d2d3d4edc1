"""Volume node <-> file exchange for the worker, with explicit RAS (Slicer) <-> LPS (ITK files) geometry.

Written with SimpleITK from the node's voxel array and IJK-to-RAS matrix, so it works with the bare MRML
scene of ``slicer-core`` as well as in the application, and the geometry is exactly what the node holds.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
import vtk.util.numpy_support

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def matrix_array(matrix) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4 x 4 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix_array(matrix)


def ijk_to_world(node) -> np.ndarray | None:
    """The node's IJK-to-RAS carried through its parent transforms into world RAS, where the slice views place it;
    None under a transform that is not linear (a warp has no one slice plane to measure along)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return ijk_to_ras(node)
    if not parent.IsTransformToWorldLinear():
        return None
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return matrix_array(matrix) @ ijk_to_ras(node)


def voxels(node) -> np.ndarray:
    """The node's voxel values, flat (a view of its image data)."""
    return vtk.util.numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())


def image_from_node(node) -> sitk.Image:
    array = voxels(node)
    dims = node.GetImageData().GetDimensions()
    image = sitk.GetImageFromArray(array.reshape(dims[2], dims[1], dims[0]).copy())
    m = ijk_to_ras(node)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction = LPS_FROM_RAS @ (m[:3, :3] / spacing)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin((LPS_FROM_RAS @ m[:3, 3]).tolist())
    return image


def write_node(node, path: Path) -> None:
    sitk.WriteImage(image_from_node(node), str(path))


def write_nodes(nodes, folder: Path) -> list[Path]:
    """Each node as ``folder/<node name>.nrrd``, names made file-safe and unique (the trainer's patient ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for node in nodes:
        if node is None or node.GetImageData() is None:
            raise ValueError(f"volume {node.GetName() if node else None} is empty")
        stem = re.sub(r"[^\w.-]+", "_", node.GetName() or "").strip("._") or "volume"
        name, copy = stem, 1
        while any(p.stem.lower() == name.lower() for p in paths):  # names differing only in case clash on some disks
            copy += 1
            name = f"{stem}_{copy}"
        paths.append(folder / f"{name}.nrrd")
        write_node(node, paths[-1])
    return paths


def update_node_from_file(node, path: Path) -> None:
    """Voxels and geometry of ``path`` into ``node`` (IJK-to-RAS set from the file, not recomputed)."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = vtk.util.numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    direction = LPS_FROM_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = direction * np.array(image.GetSpacing())
    m[:3, 3] = LPS_FROM_RAS @ np.array(image.GetOrigin())
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, m[r, c])
    node.SetAndObserveImageData(image_data)
    node.SetIJKToRASMatrix(matrix)
