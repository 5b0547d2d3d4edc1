"""Segmentation on the dense grid of an upsampled stack, with or without the user's sparse labels."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from .. import geometry, slice_positions
from .inference import labels_from_probabilities, labels_like, predict_probabilities
from .sparse import densify

DEFAULT_SHAPE_MM = 0.5
"""Weight of the drawn shape against the network when densifying user labels (see ``sparse``), chosen on
training patients (K=2, 0.5 to 8 mm and shape alone compared: 0.5 mm best on 5 mm stacks, within 0.01 of
the best on 10 mm stacks); a model card's ``sparse_shape_mm`` overrides it."""


def segment_dense(dense: sitk.Image, slice_axis: int, factor: int, network: torch.nn.Module, card: dict,
                  sparse_labels: np.ndarray | None = None, device: torch.device | str = "cpu") -> sitk.Image:
    """Labels on the dense image's grid. With ``sparse_labels`` (the acquired slices' labels, ITK array order of
    the input), those are kept exactly and the new slices are filled from them and from the network."""
    config = card["config"]
    stack = geometry.to_stack(sitk.GetArrayFromImage(dense), slice_axis).astype(np.float32)
    spacing = geometry.inplane_spacing(dense, slice_axis)
    probabilities = predict_probabilities(network, config, stack, spacing, device)
    if sparse_labels is None:
        labels = labels_from_probabilities(probabilities)
    else:
        n = geometry.to_stack(sparse_labels, slice_axis).shape[0]
        order = slice_positions.generated_slices(n, factor)
        labels = densify(geometry.to_stack(sparse_labels, slice_axis), factor, spacing, probabilities[order],
                         card.get("sparse_shape_mm", DEFAULT_SHAPE_MM))
    return labels_like(geometry.from_stack(labels, slice_axis), dense)
