"""Dense labels from a user's labels of the acquired slices (``--input-segmentation``).

The user's labels stay exactly as drawn on the acquired slices. On each new slice every structure gets a
shape score, the signed distance to its outline (mm, positive inside) interpolated linearly between the
two acquired slices around it, as in shape-based interpolation; the label is the arg-max over structures
of ``score / shape_mm + log(probability)`` where the probabilities come from the segmentation network on
the CaLID slice. ``shape_mm`` weighs drawn shape against image evidence (measured choice in the card).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import distance_transform_edt

from .. import slice_positions
from ..errors import CalidError, first_few
from ..geometry import SPACING_TOLERANCE_MM
from ..imageio import DIRECTION_TOLERANCE
from .labels import LABELS

ABSENT_MM = 100.0
"""Depth given to a structure missing from an acquired slice: it fades out towards that slice."""
ORIGIN_TOLERANCE_MM = 1e-3
"""How far the labels' origin may lie from the image's: a fixed distance, whatever the origin's size (a tolerance
relative to it let labels 0.4 mm off through at an origin of 5 m)."""


SHOWN_VALUES = 8
"""Unknown label values named in a refusal; an image given as labels has hundreds."""


def check_labels(labels: sitk.Image, image: sitk.Image, source: str = "input segmentation",
                 reference: str = "the image") -> np.ndarray:
    """The label array of a segmentation drawn on ``image`` (named ``reference`` in the errors: the end-diastole
    labels when ``image`` is those); one-line errors for any mismatch."""
    if labels.GetDimension() != image.GetDimension() or labels.GetSize() != image.GetSize():
        raise CalidError(f"{source} has size {labels.GetSize()}, {reference} {image.GetSize()}: it must lie on "
                         f"the grid of {reference}")
    for name, a, b, tolerance in (("spacing", labels.GetSpacing(), image.GetSpacing(), SPACING_TOLERANCE_MM),
                                  ("origin", labels.GetOrigin(), image.GetOrigin(), ORIGIN_TOLERANCE_MM),
                                  ("direction", labels.GetDirection(), image.GetDirection(), DIRECTION_TOLERANCE)):
        if not np.allclose(a, b, rtol=0, atol=tolerance):
            raise CalidError(f"{source} {name} {tuple(round(v, 4) for v in a)} differs from that of {reference}, "
                             f"{tuple(round(v, 4) for v in b)}")
    array = sitk.GetArrayFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise CalidError(f"{source} has non-integer values: give a label map")
    values = np.unique(array)  # compared as they are: a float of 1e20 cast to int first became a negative integer
    unknown = values[~np.isin(values, [0, *LABELS])]
    if unknown.size:
        known = ", ".join(f"{k} {v}" for k, v in LABELS.items())
        listed = first_few([f"{value:.10g}" for value in unknown.tolist()], SHOWN_VALUES)
        if len(unknown) > SHOWN_VALUES:
            listed += ": is it an image, not a label map?"
        raise CalidError(f"{source} has unknown label values {listed} (expected 0 and {known})")
    return array.astype(np.uint8)


def shape_depth(label_slice: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """(structures, rows, cols): signed distance to each structure's outline in mm, positive inside."""
    depth = np.empty((len(LABELS), *label_slice.shape), dtype=np.float32)
    for i, c in enumerate(sorted(LABELS)):
        mask = label_slice == c
        if not mask.any():
            depth[i] = -ABSENT_MM
            continue
        depth[i] = distance_transform_edt(mask, sampling=spacing) - distance_transform_edt(~mask, sampling=spacing)
    return depth


def densify(sparse_stack: np.ndarray, factor: int, spacing: tuple[float, float], probabilities: np.ndarray | None,
            shape_mm: float | None) -> np.ndarray:
    """Dense labels ((n-1)K+1, rows, cols): acquired slices copied, new slices filled.

    ``probabilities`` (new slices, classes, rows, cols) in ``slice_positions.dense_positions`` order, or None for
    shape interpolation alone; ``shape_mm`` None uses the network alone on the new slices.
    """
    n = sparse_stack.shape[0]
    below, above, alpha = slice_positions.dense_positions(n, factor)
    targets = slice_positions.generated_slices(n, factor)
    depths = np.stack([shape_depth(s, spacing) for s in sparse_stack])
    dense = np.empty((slice_positions.dense_count(n, factor), *sparse_stack.shape[1:]), dtype=np.uint8)
    dense[::factor] = sparse_stack
    for m, (b, a, t, target) in enumerate(zip(below, above, alpha, targets)):
        depth = (1 - t) * depths[b] + t * depths[a]
        shape = np.concatenate([-depth.max(axis=0, keepdims=True), depth])  # background: outside every structure
        if probabilities is None:
            score = shape
        else:
            evidence = np.log(np.clip(probabilities[m], 1e-6, 1.0))
            score = evidence if shape_mm is None else shape / shape_mm + evidence
        dense[target] = score.argmax(axis=0)
    return dense
