"""``python -m calid.preview INPUT DENSE PNG``: through-plane views of input, linear and CaLID side by side.

The through-plane (long-axis-like) cut is where slice interpolation shows: the input is drawn with its
real slice thickness, linear interpolation on the dense grid next to it, then the CaLID volume.
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from . import geometry  # noqa: E402
from .imageio import read_image  # noqa: E402
from .metrics import linear_missing  # noqa: E402


def through_plane(stack: np.ndarray, row: int, factor: int) -> np.ndarray:
    """A cut through all slices at one image row, each slice repeated ``factor`` times (physical aspect)."""
    return np.repeat(stack[:, row, :], factor, axis=0)


def save_preview(input_path: str, dense_path: str, png_path: str) -> None:
    image, dense = read_image(input_path), read_image(dense_path)
    axis = geometry.find_slice_axis(image)
    sparse = geometry.to_stack(sitk.GetArrayFromImage(image), axis).astype(np.float64)
    calid = geometry.to_stack(sitk.GetArrayFromImage(dense), axis).astype(np.float64)
    factor = (calid.shape[0] - 1) // (sparse.shape[0] - 1)
    linear = calid.copy()
    linear[[i for i in range(calid.shape[0]) if i % factor]] = linear_missing(sparse, factor)
    low, high = np.percentile(sparse, [1, 99.5])
    row = sparse.shape[1] // 2
    thickness = max(1, round(image.GetSpacing()[axis] / image.GetSpacing()[(axis + 1) % 3] / factor))
    panels = [("input (acquired slices)", through_plane(np.repeat(sparse, factor, axis=0)[: calid.shape[0]], row, thickness)),
              ("linear interpolation", through_plane(linear, row, thickness)),
              (f"CaLID x{factor}", through_plane(calid, row, thickness))]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (title, cut) in zip(axes, panels):
        ax.imshow(cut, cmap="gray", vmin=low, vmax=high, aspect="equal")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle("through-plane cut (slice direction vertical)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m calid.preview INPUT DENSE PNG")
    save_preview(*sys.argv[1:])
