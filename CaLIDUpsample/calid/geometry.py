"""Slice-stack geometry: which axis holds the slices, and the dense grid that keeps every acquired slice.

Axes are ITK index axes (0 = i, 1 = j, 2 = k). The dense image has the input's origin and direction, the
slice spacing divided by the factor K, and ``(n - 1) * K + 1`` slices, so dense slice ``i * K`` lies exactly
where acquired slice ``i`` lay and the grid covers first-to-last acquired slice.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from .errors import CalidError
from .slice_positions import dense_count

SPACING_TOLERANCE_MM = 1e-3
"""Spacings within this many mm are the same (a slice spacing read from DICOM positions as 8.000005 mm is 8 mm)."""

MAX_FACTOR = 16
MAX_DENSE_SLICES = 2048


def find_slice_axis(image: sitk.Image, override: int | None = None) -> int:
    """The axis with the largest spacing (the last one on ties, which is k for isotropic stacks); a single slice's
    one-voxel axis whatever its spacing, so that it is refused as one slice instead of upsampled in its plane."""
    if override is not None:
        if override not in (0, 1, 2):
            raise CalidError(f"--slice-axis must be 0, 1 or 2, not {override}")
        return override
    size, spacing = image.GetSize(), image.GetSpacing()
    flat = [a for a in range(3) if size[a] == 1]
    return flat[-1] if flat else max(range(3), key=lambda a: (round(spacing[a], 6), a))


def resolve_factor(image: sitk.Image, axis: int, factor: int | None, spacing_mm: float | None) -> int:
    """The integer factor K from ``--factor`` or from a target spacing (the largest spacing <= target)."""
    if factor is not None and spacing_mm is not None:
        raise CalidError("give either --factor or --spacing, not both")
    slice_spacing = image.GetSpacing()[axis]
    if spacing_mm is not None:
        if not spacing_mm > 0:
            raise CalidError(f"--spacing must be positive, not {spacing_mm}")
        # The largest spacing <= target; a spacing read as 8.000005 mm is 8 mm (DICOM positions carry such noise).
        factor = math.ceil((slice_spacing - SPACING_TOLERANCE_MM) / spacing_mm)
        if factor < 2:
            raise CalidError(f"target spacing {spacing_mm} mm is not finer than the slice spacing {slice_spacing:g} mm")
    factor = 2 if factor is None else factor
    if factor < 2:
        raise CalidError(f"factor must be at least 2, not {factor}")
    if factor > MAX_FACTOR:
        asked = f"target spacing {spacing_mm:g} mm would take factor {factor}" if spacing_mm is not None else \
            f"factor {factor} is too large"
        raise CalidError(f"{asked} (at most {MAX_FACTOR})")
    n = image.GetSize()[axis]
    if n < 2:
        raise CalidError(f"input has {n} slice along axis {axis}: at least 2 acquired slices are needed")
    if dense_count(n, factor) > MAX_DENSE_SLICES:
        raise CalidError(f"factor {factor} on {n} slices would give more than {MAX_DENSE_SLICES} slices")
    return factor


def to_stack(array_zyx: np.ndarray, axis: int) -> np.ndarray:
    """A view of the voxel array (numpy order k, j, i) with the slice axis first: (slices, rows, cols)."""
    return np.moveaxis(array_zyx, 2 - axis, 0)


def from_stack(stack: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(stack, 0, 2 - axis)


def dense_image(array_zyx: np.ndarray, reference: sitk.Image, axis: int, factor: int) -> sitk.Image:
    """Wrap a dense voxel array in the reference image's geometry with the slice spacing divided by K.

    A 4D array (t, z, y, x) with a 4D reference is a cine: every phase gets the same dense grid, the time axis
    keeps the reference's origin and spacing (SimpleITK would read a 4D array as vectors unless told).
    """
    image = sitk.GetImageFromArray(array_zyx, isVector=False)
    spacing = list(reference.GetSpacing())
    spacing[axis] /= factor
    image.SetSpacing(spacing)
    image.SetOrigin(reference.GetOrigin())
    image.SetDirection(reference.GetDirection())
    return image


def inplane_spacing(image: sitk.Image, axis: int) -> tuple[float, float]:
    """Pixel size (rows, cols) in mm of the slices of ``to_stack(array, axis)``."""
    spacing = image.GetSpacing()
    rows, cols = (i for i in (2, 1, 0) if i != axis)
    return spacing[rows], spacing[cols]


SPARSE_RATIO = 2.0
"""A stack is sparse when its slice spacing is at least this many times its larger in-plane pixel size."""


def sparse_stack_warning(image: sitk.Image, axis: int | None = None) -> str | None:
    """One line saying why ``image`` does not look like a sparse short-axis stack, or None when it does.

    CaLID fills the gaps between thick, widely spaced slices; an isotropic (or already dense) volume, or one
    of only two slices, would be upsampled all the same, silently. The caller shows the line and goes on.
    ``image`` is a SimpleITK image or header (anything with ``GetSpacing()`` and ``GetSize()``; only the first
    three axes are read); ``axis`` defaults to the largest spacing, as the engine chooses it.
    """
    if len(image.GetSize()) < 3:
        return None  # not a volume: the engine's own check says so in one line
    axis = find_slice_axis(image, axis)
    spacing, count = image.GetSpacing()[axis], image.GetSize()[axis]
    rows, cols = inplane_spacing(image, axis)
    if count < 2:
        return None  # not a stack at all: resolve_factor refuses it with its own line
    problems = []
    if spacing < SPARSE_RATIO * max(rows, cols):
        problems.append(f"slices less than {SPARSE_RATIO:g}x the in-plane spacing apart")
    if count < 3:
        problems.append(f"only {count} slices")
    if not problems:
        return None
    return (f"the volume does not look like a sparse short-axis stack ({' and '.join(problems)}: slice spacing "
            f"{spacing:.3g} mm along axis {axis}, in-plane {rows:.3g} x {cols:.3g} mm); upsampling it anyway")
