"""``python -m calid.preview INPUT DENSE PNG``: the demo picture, the evidence a user needs to decide.

Top row, the removed-slice test on INPUT itself: every other acquired slice is dropped and rebuilt by linear
interpolation, by the optical-flow morph (``calid.motion``, as ``--method morph``) and by CaLID (factor 2), each
shown beside the real removed slice in the same window and titled with its PSNR/SSIM against it
(``metrics.slice_scores``, the real volume as reference). Linear interpolation and the morph are what a user
has without CaLID; only a slice that was really acquired can say which is closer. When the model has an error
head, two more: CaLID's actual |error| on that slice and the uncertainty map's expected |error| (``--uncertainty``),
in one colour scale, so a user sees whether the map points where the errors are. Bottom row, a through-plane
(long-axis-like) cut of DENSE, the upsampled result: input drawn with its real slice thickness | linear
interpolation on the same dense grid | CaLID, where slice interpolation shows as a whole.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from . import geometry, slice_positions  # noqa: E402
from .devices import resolve_device  # noqa: E402
from .engine import UpsampleOptions, upsample_image  # noqa: E402
from .errors import CalidError  # noqa: E402
from .imageio import output_folder, read_image, validate_volume  # noqa: E402
from .metrics import linear_missing, slice_scores  # noqa: E402
from .modelindex import DEFAULT_MODEL  # noqa: E402
from .modelstore import load_model  # noqa: E402
from .pipeline_settings import PRODUCT_MORPH  # noqa: E402
from .staging import staging_file  # noqa: E402


@dataclass
class Panel:
    """One picture of the figure: its title as drawn, and the scores it shows (None for real data and cuts)."""

    title: str
    row: str  # "removed slice" or "through-plane"
    psnr: float | None = None
    ssim: float | None = None
    error_map: bool = False  # an absolute error in intensity units (colour, from 0), not an image


def through_plane(stack: np.ndarray, row: int, factor: int) -> np.ndarray:
    """A cut through all slices at one image row, each slice repeated ``factor`` times (physical aspect)."""
    return np.repeat(stack[:, row, :], factor, axis=0)


def every_other_slice(image: sitk.Image, axis: int) -> sitk.Image:
    """The acquired slices 0, 2, 4, ... as an image of their own (twice the slice spacing, same origin)."""
    index = [slice(None)] * 3
    index[axis] = slice(0, None, 2)
    return image[tuple(index)]


def removed_slice_panels(image: sitk.Image, axis: int, options: UpsampleOptions
                         ) -> tuple[list[tuple[Panel, np.ndarray]], int]:
    """Drop every other slice, rebuild it three ways, score each against the real one; show the middle one.

    Returns the panels with their pictures and the index of the removed slice they show.
    """
    options = replace(options, factor=2, spacing=None)
    stack = geometry.to_stack(sitk.GetArrayFromImage(image), axis).astype(np.float64)
    kept_image = every_other_slice(image, axis)
    kept = geometry.to_stack(sitk.GetArrayFromImage(kept_image), axis).astype(np.float64)
    removed = slice_positions.generated_slices(kept.shape[0], 2)  # slices 1, 3, 5, ... of the input
    model, _ = load_model(options.model, resolve_device(options.device))
    with_map = model.error_head is not None
    result = upsample_image(kept_image, options, model, want_uncertainty=with_map)
    dense = geometry.to_stack(sitk.GetArrayFromImage(result.image), axis)
    estimates = {"linear interpolation": linear_missing(kept, 2),
                 "optical-flow morph": PRODUCT_MORPH.morph_missing(kept, 2),
                 f"CaLID ({Path(options.model or DEFAULT_MODEL).name})": dense[removed].astype(np.float64)}
    shown = len(removed) // 2
    real = stack[removed[shown]]
    panels = [(Panel(f"real slice {removed[shown]} (removed)", "removed slice"), real)]
    for name, estimate in estimates.items():
        psnr, ssim = slice_scores(real[None], estimate[shown][None], stack)
        mean_psnr, mean_ssim = slice_scores(stack[removed], estimate, stack)
        title = (f"{name}\nPSNR {psnr:.2f} dB, SSIM {ssim:.3f}\n"
                 f"(all {len(removed)} removed:\n{mean_psnr:.2f} dB, {mean_ssim:.3f})")
        panels.append((Panel(title, "removed slice", psnr, ssim), estimate[shown]))
    if with_map:
        actual = np.abs(dense[removed[shown]].astype(np.float64) - real)
        expected = geometry.to_stack(sitk.GetArrayFromImage(result.uncertainty), axis)[removed[shown]]
        panels += [(Panel(f"CaLID's\nactual |error|\nmean {actual.mean():.1f}", "removed slice", error_map=True), actual),
                   (Panel(f"expected |error|\n(uncertainty map)\nmean {expected.mean():.1f}", "removed slice",
                          error_map=True), expected.astype(np.float64))]
    return panels, int(removed[shown])


def through_plane_panels(image: sitk.Image, dense_image: sitk.Image, axis: int) -> list[tuple[Panel, np.ndarray]]:
    """Input | linear | CaLID cut along the slice direction at the middle image row of the dense result."""
    sparse = geometry.to_stack(sitk.GetArrayFromImage(image), axis).astype(np.float64)
    calid = geometry.to_stack(sitk.GetArrayFromImage(dense_image), axis).astype(np.float64)
    factor = (calid.shape[0] - 1) // (sparse.shape[0] - 1)
    if (factor < 2 or slice_positions.dense_count(sparse.shape[0], factor) != calid.shape[0]
            or calid.shape[1:] != sparse.shape[1:]):
        raise CalidError(f"the dense volume ({calid.shape[0]} slices of {calid.shape[1]} x {calid.shape[2]}) is not "
                         f"an upsampled result of the input ({sparse.shape[0]} of {sparse.shape[1]} x {sparse.shape[2]})")
    linear = calid.copy()
    linear[slice_positions.generated_slices(sparse.shape[0], factor)] = linear_missing(sparse, factor)
    row = sparse.shape[1] // 2
    # dense rows this tall (in the cut's column pixels: the stack's last axis) keep the physical aspect
    thickness = max(1, round(image.GetSpacing()[axis] / factor / geometry.inplane_spacing(image, axis)[1]))
    # each acquired slice drawn over the dense rows nearest to it, centred where it lies (half bands at the ends)
    nearest = np.floor(np.arange(calid.shape[0]) / factor + 0.5).astype(int)
    return [(Panel("input (acquired slices)", "through-plane"), through_plane(sparse[nearest], row, thickness)),
            (Panel(f"linear interpolation x{factor}", "through-plane"), through_plane(linear, row, thickness)),
            (Panel(f"CaLID x{factor}", "through-plane"), through_plane(calid, row, thickness))]


def save_preview(input_path: str, dense_path: str, png_path: str, options: UpsampleOptions | None = None,
                 note: str = "") -> list[Panel]:
    """Draw the demo picture (module docstring) to ``png_path``; returns its panels, top row first.

    ``options``: how CaLID rebuilds the removed slices (the bundled default model unless they name one; the
    factor is always 2).
    ``note``: a line printed under the picture (the demo's says that the default model has seen the sample).
    """
    picture_format = Path(png_path).suffix.lower().lstrip(".")
    if picture_format not in FigureCanvasAgg.get_supported_filetypes():
        raise CalidError(f"cannot write a picture named {png_path}: give a .png (or .pdf, .svg, .jpg) file")
    folder = output_folder(Path(png_path))  # before the model runs: it ended in a traceback after it
    image = validate_volume(read_image(input_path), str(input_path))  # a cine: one phase, said in one line
    dense = validate_volume(read_image(dense_path), str(dense_path))
    axis = geometry.find_slice_axis(image)
    if image.GetSize()[axis] < 3:
        raise CalidError(f"the removed-slice test needs at least 3 slices; this input has {image.GetSize()[axis]}")
    bottom = through_plane_panels(image, dense, axis)  # first: it checks DENSE before the model runs
    top, shown = removed_slice_panels(image, axis, options or UpsampleOptions())
    low, high = np.percentile(sitk.GetArrayViewFromImage(image), [1, 99.5])
    fig = plt.figure(figsize=(13, 7.8))
    grid = fig.add_gridspec(2, 12, height_ratios=[1.25, 1])
    width = 12 // len(top)
    cells = [grid[0, width * i: width * (i + 1)] for i in range(len(top))] + [grid[1, 4 * i: 4 * i + 4] for i in range(3)]
    errors = [picture for panel, picture in top if panel.error_map]
    error_top = float(np.percentile(np.concatenate([e.ravel() for e in errors]), 99)) if errors else 1.0
    axes = []
    for cell, (panel, picture) in zip(cells, top + bottom):
        axes.append(fig.add_subplot(cell))
        window = dict(cmap="inferno", vmin=0, vmax=error_top) if panel.error_map else dict(cmap="gray", vmin=low, vmax=high)
        axes[-1].imshow(picture, aspect="equal", interpolation="nearest", **window)
        axes[-1].set_title(panel.title, fontsize=10 if len(top) <= 4 or panel.row != "removed slice" else 9)
        axes[-1].axis("off")
    gap = 2 * image.GetSpacing()[axis]
    fig.suptitle(f"Removed-slice test: every other slice dropped ({gap:g} mm gaps), slice {shown} rebuilt from "
                 f"slices {shown - 1} and {shown + 1} (same window; scores against the real slice)")
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=9, style="italic")
    fig.tight_layout(rect=(0, 0.025 if note else 0, 1, 0.97), h_pad=4)
    fig.canvas.draw()  # places the equal-aspect axes: the second heading goes just under the top row
    under_top_row = min(ax.get_position().y0 for ax in axes[:len(top)]) - 0.012
    fig.text(0.5, under_top_row, "Through-plane cut of the upsampled result (slice direction vertical)",
             ha="center", va="top", fontsize=12)
    handle, staged = staging_file(folder, Path(png_path).suffix)  # whole or not at all
    try:
        with os.fdopen(handle, "wb") as out:
            fig.savefig(out, dpi=100, format=picture_format)
        os.replace(staged, png_path)
    finally:
        plt.close(fig)
        if os.path.exists(staged):
            os.unlink(staged)
    return [panel for panel, _ in top + bottom]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m calid.preview", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="the acquired stack (the removed-slice test runs on it)")
    parser.add_argument("dense", help="its upsampled result (calid upsample INPUT DENSE), for the through-plane cut")
    parser.add_argument("png", help="the picture to write")
    parser.add_argument("--model", help="model that rebuilds the removed slices (default: the bundled default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--note", default="", help="a line to print under the picture")
    args = parser.parse_args(argv)
    try:
        panels = save_preview(args.input, args.dense, args.png, UpsampleOptions(model=args.model, device=args.device),
                              args.note)
    except CalidError as exc:  # exit status 2, as calid's own one-line errors
        print(f"calid.preview: error: {exc}", file=sys.stderr)
        sys.exit(2)
    for panel in panels:
        print(panel.title.replace("\n", " "))
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
