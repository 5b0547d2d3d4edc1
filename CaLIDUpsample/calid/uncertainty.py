"""Per-slice figures of an uncertainty map, for the command line's JSON and the Slicer table.

The map itself (expected absolute error per voxel, the input's intensity units) comes from the model's error head
(``networks.ErrorHead`` through ``generation.expected_error``); here it is only summarised, so that a reader finds
the generated slices least to be trusted without opening the volume.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from . import geometry, slice_positions

UNIT = "expected |error|, input intensity units"


def slice_summaries(uncertainty: sitk.Image, axis: int, factor: int, labels: sitk.Image | None = None) -> list[dict]:
    """One entry per generated slice of ``uncertainty`` (3D, or 4D for a cine: then each carries its ``phase``).

    ``slice`` is the dense index along ``axis``; ``expected_error`` the slice's mean; ``heart_expected_error`` the
    mean over the voxels ``labels`` (same grid and phases) marks > 0 on that slice, None without labels or heart
    there.
    """
    values = sitk.GetArrayFromImage(uncertainty).astype(np.float64)
    phases = values if uncertainty.GetDimension() == 4 else values[None]
    label_phases = None if labels is None else sitk.GetArrayFromImage(labels).reshape(phases.shape)
    summaries = []
    for t, phase in enumerate(phases):
        stack = geometry.to_stack(phase, axis)
        heart = None if label_phases is None else geometry.to_stack(label_phases[t], axis) > 0
        n = slice_positions.acquired_count(stack.shape[0], factor)
        for k in sorted(slice_positions.generated_slices(n, factor).tolist()):
            entry = {"slice": int(k), "expected_error": float(stack[k].mean()), "heart_expected_error": None}
            if heart is not None and heart[k].any():
                entry["heart_expected_error"] = float(stack[k][heart[k]].mean())
            if len(phases) > 1:
                entry["phase"] = t
            summaries.append(entry)
    return summaries
