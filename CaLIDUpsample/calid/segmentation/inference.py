"""Label volumes from the segmentation network, on the input's own grid and geometry.

Each slice is normalised with the volume's intensity map (as for interpolation), resampled to the
network's pixel size, segmented (probabilities averaged over the eight rotations and flips of the slice, the
augmentations it was trained with: validation Dice +0.010 for four flips, +0.003 more for eight), and its class
probabilities are resampled back before the arg-max, so the labels lie on exactly the voxels of the image
they were computed from. Each structure keeps only its largest 3D connected component: a heart has one of
each, and stray islands elsewhere in the field of view are false positives (measured: validation Dice
+0.03 on ACDC).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .. import geometry
from ..devices import autocast
from ..intensity import IntensityMap
from .labels import LABELS
from .network import network_size, pad_to_multiple, to_grid

CPU_BATCH = 8
DIHEDRAL = [(turns, flip) for turns in range(4) for flip in (False, True)]


@torch.no_grad()
def predict_probabilities(network: torch.nn.Module, config: dict, stack: np.ndarray, spacing: tuple[float, float],
                          device: torch.device | str = "cpu", batch: int = CPU_BATCH) -> np.ndarray:
    """Class probabilities (slices, classes, rows, cols) of a stack (slices, rows, cols) in scanner units."""
    device = torch.device(device)
    normalised = torch.from_numpy(IntensityMap.fit(stack).to_network(stack))[:, None]
    size = network_size(stack.shape[1:], spacing, config["pixel_mm"])
    out = np.empty((stack.shape[0], config["classes"], *stack.shape[1:]), dtype=np.float32)
    for start in range(0, stack.shape[0], batch):
        part = to_grid(normalised[start:start + batch], size)
        padded, crop = pad_to_multiple(part, value=-1.0)
        probabilities = torch.zeros((len(part), config["classes"], *padded.shape[-2:]))
        for turns, flip in DIHEDRAL:
            view = torch.rot90(padded, turns, (-2, -1))
            with autocast(device):
                logits = network((view.flip(-1) if flip else view).to(device)).float()
            answer = torch.softmax(logits, dim=1).cpu()
            probabilities += torch.rot90(answer.flip(-1) if flip else answer, -turns, (-2, -1)) / len(DIHEDRAL)
        probabilities = probabilities[(..., *crop)]
        out[start:start + batch] = to_grid(probabilities, stack.shape[1:]).numpy()
    return out


def labels_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Arg-max labels (slices, rows, cols), each structure reduced to its largest 3D connected component."""
    labels = probabilities.argmax(axis=1).astype(np.uint8)
    for label in LABELS:
        mask = labels == label
        components, count = ndimage.label(mask)
        if count > 1:
            sizes = ndimage.sum(mask, components, range(1, count + 1))
            labels[mask & (components != int(np.argmax(sizes)) + 1)] = 0
    return labels


def segment_stack(network: torch.nn.Module, config: dict, stack: np.ndarray, spacing: tuple[float, float],
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Labels (slices, rows, cols), uint8, of a stack in scanner units."""
    return labels_from_probabilities(predict_probabilities(network, config, stack, spacing, device))


def segment_image(image: sitk.Image, network: torch.nn.Module, config: dict, device: torch.device | str = "cpu",
                  slice_axis: int | None = None) -> sitk.Image:
    """A uint8 label image with exactly the geometry of ``image`` (a validated 3D volume)."""
    axis = geometry.find_slice_axis(image, slice_axis)
    stack = geometry.to_stack(sitk.GetArrayFromImage(image), axis).astype(np.float32)
    labels = segment_stack(network, config, stack, geometry.inplane_spacing(image, axis), device)
    return labels_like(geometry.from_stack(labels, axis), image)


def labels_like(array_zyx: np.ndarray, reference: sitk.Image) -> sitk.Image:
    labels = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx.astype(np.uint8)))
    labels.CopyInformation(reference)
    return labels
