"""The motion prior: optical flow between two acquired neighbours, and both warped to a new slice's position.

Linear interpolation cross-fades the neighbours, so a wall that moved between them appears twice, faintly. The
heart's walls move several pixels from one short-axis slice to the next; warping each neighbour along the flow
to the new slice's fractional position ``alpha`` moves the wall instead (the "optical-flow morph" peer of
``shared/docs/evaluation.md``). Motion-aware models (``"motion"`` in their config) build on these warped
neighbours: they encode the two warped slices, condition on them, and diffuse the residual to the blend of their
latents, so that with a zero residual they give the morph (within 0.1 dB on ACDC validation stacks). Warping the
neighbours' latents instead (the flow averaged to the 4x coarser latent grid: no extra encoding) started 0.5 dB
below the morph on 5 mm stacks, whole slice and heart box alike, and was dropped.

Convention: ``flow`` maps ``below`` onto ``above``: ``above(p + flow(p)) ~ below(p)``, as (rows, cols) in pixels.
The slice at ``alpha`` is ``(1 - alpha) * below(p - alpha * flow) + alpha * above(p + (1 - alpha) * flow)``.
Flows are symmetric, ``(f_ab - f_ba) / 2``, so swapping the neighbours gives the same slices.

Estimators: ``"dis"`` (OpenCV's dense inverse search, medium preset, ~5 ms a pair on a CPU; the bundled models ran it
until stop 31), ``"dis-fine"`` (the same search refined down to full resolution, the preset's finest scale 1 -> 0: what
the bundled models run; in 8 views ~0.5 s a 256x216 pair on one thread, 4x ``"dis"``, about +1.5 s on the whole
upsampling of a 10-slice ACDC stack x2 on 2 CPU threads) and ``"tvl1"`` (scikit-image's TV-L1 with the evaluation
protocol's settings, ~100 ms a pair: the peer the tables report). On the 15 ACDC validation patients ``"dis"`` and
``"tvl1"`` give the same morph within 0.03 dB heart PSNR (K=2, one view). With 8 views ``"dis-fine"`` raised the
bundled model's slices by +0.03 dB heart PSNR, SSIM +0.004 and the segmenter's Dice +0.003 with 10 mm gaps (validation
and training patients alike) and SSIM and Dice a little with 20 mm gaps (stop 30, in process, the model's weights and
calibration unchanged; docs/measurements.md); on the Sunnybrook cines it was level (heart -0.03 dB) and flickered
a little more (stop 31).

``views``: DIS is not equivariant to rotating or flipping the slices (its patch grid and coarse-to-fine search are
tied to the image axes), so each of the 8 in-plane orientations of a pair gives a somewhat different flow, each
wrong in its own places. The flow of ``views > 1`` is the mean of the flows estimated in that many orientations,
each brought back to the slice's own frame: one flow, one warp, as sharp as a single one. With 8 views the DIS morph
gained +0.07 dB heart PSNR with 10 mm gaps and +0.09 dB with 20 mm gaps on the ACDC validation patients, and the
bundled model conditioned on it +0.05 / +0.09 dB (docs/measurements.md), for 8x the flow time (~50 ms a pair).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from .choices import FLOW_METHODS
from .slice_positions import dense_positions

# In-plane orientations (quarter turns, column flip) in the order ``views`` takes them: the identity first, so one
# view is the plain flow.
VIEWS = ((0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False), (3, True))
TVL1_SETTINGS = dict(attachment=10, tightness=0.3, num_warp=5, num_iter=10)  # evaluation.md's settings


def _unit_pair(below: np.ndarray, above: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both slices scaled by their joint 1st/99th percentiles to [0, 1]: flow estimators assume a fixed range."""
    low, high = np.percentile(np.stack([below, above]), [1, 99])
    scale = max(float(high - low), 1e-6)
    return (np.clip((below - low) / scale, 0, 1).astype(np.float32),
            np.clip((above - low) / scale, 0, 1).astype(np.float32))


DIS_MIN_SIZE = 16
"""Rows and columns DIS needs at least (OpenCV refuses a slice under 12 pixels either way)."""


def _dis_flow(reference: np.ndarray, moving: np.ndarray, finest_scale: int = 1) -> np.ndarray:
    """DIS with the medium preset; ``finest_scale`` 1 (the preset's) stops its coarse-to-fine search at half
    resolution and upsamples, 0 refines down to full resolution."""
    import cv2

    h, w = reference.shape
    # DIS refuses images under its patch size; a smaller slice is edge-padded to DIS_MIN_SIZE and its flow cropped.
    pad = ((0, max(DIS_MIN_SIZE - h, 0)), (0, max(DIS_MIN_SIZE - w, 0)))
    reference, moving = np.pad(reference, pad, mode="edge"), np.pad(moving, pad, mode="edge")
    estimator = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    estimator.setFinestScale(finest_scale)
    flow = estimator.calc(np.rint(reference * 255).astype(np.uint8), np.rint(moving * 255).astype(np.uint8), None)
    return np.stack([flow[:h, :w, 1], flow[:h, :w, 0]])  # OpenCV gives (x, y); we use (rows, cols)


def _tvl1_flow(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    from skimage.registration import optical_flow_tvl1

    return optical_flow_tvl1(reference, moving, **TVL1_SETTINGS).astype(np.float32)


ESTIMATORS = {"dis": _dis_flow, "dis-fine": partial(_dis_flow, finest_scale=0), "tvl1": _tvl1_flow}  # FLOW_METHODS


def _in_view(image: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    image = np.rot90(image, turns)
    return np.ascontiguousarray(image[:, ::-1] if flip else image)


def _flow_from_view(flow: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """A flow (2, h', w') estimated on ``_in_view`` images, as a flow (2, h, w) of the original images: the field is
    turned back with the images, and its (rows, cols) components with it."""
    rows, cols = flow
    if flip:
        rows, cols = rows[:, ::-1], -cols[:, ::-1]
    for _ in range(turns):  # one quarter turn back: (rows, cols) of the view are (-cols, rows) of the slice
        rows, cols = np.rot90(cols, -1), -np.rot90(rows, -1)
    return np.stack([rows, cols])


def pair_flow(below: np.ndarray, above: np.ndarray, method: str = "dis", views: int = 1) -> np.ndarray:
    """Symmetric flow (2, h, w) from ``below`` to ``above`` (see the module's convention), averaged over ``views``
    in-plane orientations (``VIEWS``)."""
    if method not in FLOW_METHODS:
        raise ValueError(f"flow method must be one of {FLOW_METHODS}, not {method!r}")
    check_views(views)
    estimate = ESTIMATORS[method]
    b, a = _unit_pair(np.asarray(below, np.float32), np.asarray(above, np.float32))
    flows = []
    for turns, flip in VIEWS[:views]:
        vb, va = _in_view(b, turns, flip), _in_view(a, turns, flip)
        flows.append(_flow_from_view((estimate(vb, va) - estimate(va, vb)) / 2, turns, flip))
    return np.mean(flows, axis=0, dtype=np.float32)


def check_views(views: int) -> None:
    if not isinstance(views, int) or not 1 <= views <= len(VIEWS):
        raise ValueError(f"flow views must be a whole number from 1 to {len(VIEWS)}, not {views!r}")


def stack_flows(stacks: np.ndarray, method: str = "dis", views: int = 1) -> np.ndarray:
    """Flows of every gap of every phase: stacks (phases, n, h, w) -> (phases * (n - 1), 2, h, w), phase-major,
    the gaps estimated in parallel (``pair_flows``)."""
    phases, n = stacks.shape[:2]
    return pair_flows([(stacks[p, i], stacks[p, i + 1]) for p in range(phases) for i in range(n - 1)], method, views)


def pair_flows(pairs: list[tuple[np.ndarray, np.ndarray]], method: str = "dis", views: int = 1) -> np.ndarray:
    """``pair_flow`` of each (below, above) pair -> (N, 2, h, w), estimated in parallel by as many threads as torch
    may use (``--threads``): OpenCV and scikit-image release the GIL, and each pair's flow is independent of the
    others, so the result is the same.

    OpenCV's own threads are off meanwhile: DIS splits each call over all cores by itself, and with the pairs
    already spread over the threads that only made them contend (the 8-view full-resolution flows of 44 cine pairs
    on 2 threads: 10.7 s with OpenCV's threads, 8.5 s without; the flows are the same to the bit)."""
    import cv2

    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            return np.stack(list(pool.map(lambda pair: pair_flow(*pair, method, views), pairs)))
    finally:
        cv2.setNumThreads(opencv_threads)


def check_smoothing(weight: float) -> None:
    if not 0.0 <= weight < 0.5:
        raise ValueError(f"the flow smoothing weight must lie in [0, 0.5), not {weight}")


def smooth_along_stack(flows: torch.Tensor, phases: int, weight: float) -> torch.Tensor:
    """Each gap's flow averaged with the flows of the gaps below and above it in the same phase, weights
    ``[weight, 1 - 2 * weight, weight]`` (renormalised at the stack's ends); ``flows`` (phases * gaps, 2, H, W) as
    ``stack_flows`` orders them.

    Why: the heart's in-plane motion changes smoothly from one gap to the next, while the estimator's errors do not
    carry over from gap to gap, so a little of the neighbouring gaps' flows averages some of them away. Weight 0.15
    gained +0.05 dB heart PSNR with 10 and 20 mm gaps on the ACDC validation patients; 0.3 lowered the SSIM
    (docs/measurements.md).
    """
    check_smoothing(weight)
    f = flows.reshape(phases, -1, *flows.shape[1:])
    gaps = f.shape[1]
    if weight == 0 or gaps < 2:
        return flows
    total = f * (1 - 2 * weight)
    norm = torch.full((gaps,), 1 - 2 * weight, dtype=flows.dtype)
    total[:, 1:] += weight * f[:, :-1]
    total[:, :-1] += weight * f[:, 1:]
    norm[1:] += weight
    norm[:-1] += weight
    return (total / norm.view(1, gaps, 1, 1, 1)).reshape(flows.shape)


def motion_flows(stacks: np.ndarray, method: str, views: int, smooth: float) -> torch.Tensor:
    """The flows of every gap of stacks (phases, n, h, w): ``stack_flows`` smoothed along each stack. One place for
    the models' flows (``pipeline_settings.MotionSettings``) and the morphs', so that the two cannot drift apart."""
    return smooth_along_stack(torch.from_numpy(stack_flows(stacks, method, views)), stacks.shape[0], smooth)


def shape_average(first: np.ndarray, second: np.ndarray, weight: float, method: str = "dis",
                  views: int = 1) -> np.ndarray:
    """``(1 - weight) * first + weight * second`` in shape space: slices (N, h, w) carried toward each other along
    the flow between them (``pair_flow``) to fraction ``weight``, then blended, so that where the two put a wall in
    different places the result has one wall between them, not two faint ones (the morph of ``first`` and
    ``second``)."""
    flows = torch.from_numpy(pair_flows(list(zip(first, second)), method, views))
    alpha = torch.full((len(first),), float(weight))
    first_t, second_t = (torch.from_numpy(np.ascontiguousarray(x, np.float32))[:, None] for x in (first, second))
    return blend(*warped_neighbours(first_t, second_t, flows, alpha), alpha)[:, 0].numpy()


ALIGN_FLOW = "dis"
"""The flow ``carried_onto`` aligns with: the medium preset, whatever the model's gap flow. The displacements left
between an estimate and a warped neighbour are small; on 36 ACDC training stacks (10 and 20 mm gaps) the medium
preset's alignment scored +0.01 to +0.03 dB heart PSNR and the same SSIM as the full-resolution one, the segmenter's
Dice within ±0.004, for a quarter of the time (stop 32, docs/measurements.md)."""


def carried_onto(reference: torch.Tensor, below: torch.Tensor, above: torch.Tensor, flow: torch.Tensor,
                 alpha: torch.Tensor, method: str = ALIGN_FLOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Both acquired neighbours (N, 1, H, W), whose gap ``flow`` (N, 2, H, W) brings them to the new slices'
    positions ``alpha`` (``warped_neighbours``), carried onto ``reference`` (N, 1, H, W; the model's estimate) along
    a one-view flow from it to each warped neighbour, and blended by ``alpha``: the acquired slices' own pixels,
    with the walls where the estimate puts them. Two ways from the same flows: resampled twice (to ``alpha``, then
    onto the estimate: the ``"aligned"`` morph mix's partner, as the bundled models were tuned on it) and resampled
    once, along the two displacements composed (``composed``): each bilinear resampling blurs a little, and the
    segmenter reads the sharper one better (Dice +0.002 to +0.003, docs/measurements.md stop 36)."""
    to_below, to_above = neighbour_displacements(flow, alpha)
    warped_below, warped_above = warp(below, to_below), warp(above, to_above)
    ref = [r[0].numpy() for r in reference]
    flows = torch.from_numpy(pair_flows([(r, n[0].numpy()) for r, n in zip(ref * 2, [*warped_below, *warped_above])],
                                        method))
    below_flow, above_flow = flows.chunk(2)
    twice = blend(warp(warped_below, below_flow), warp(warped_above, above_flow), alpha)
    once = blend(warp(below, composed(below_flow, to_below)), warp(above, composed(above_flow, to_above)), alpha)
    return twice, once


def composed(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The displacement (N, 2, H, W) of sampling along ``then`` from where ``first`` points: ``warp(x,
    composed(first, then))`` is ``warp(warp(x, then), first)`` with one bilinear resampling instead of two."""
    return first + warp(then, first)


def warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``images`` (N, C, H, W) at ``p + flow(p)``, bilinear, edges repeated; ``flow`` (N, 2, H, W) in pixels."""
    n, _, h, w = images.shape
    rows = torch.arange(h, dtype=flow.dtype, device=flow.device).view(1, h, 1)
    cols = torch.arange(w, dtype=flow.dtype, device=flow.device).view(1, 1, w)
    y = (rows + flow[:, 0]) * (2 / max(h - 1, 1)) - 1
    x = (cols + flow[:, 1]) * (2 / max(w - 1, 1)) - 1
    grid = torch.stack([x, y], dim=-1).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def warped_neighbours(below: torch.Tensor, above: torch.Tensor, flow: torch.Tensor,
                      alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both neighbours (N, C, H, W) carried to fraction ``alpha`` (N,) of the way from ``below`` to ``above``."""
    to_below, to_above = neighbour_displacements(flow, alpha)
    return warp(below, to_below), warp(above, to_above)


def neighbour_displacements(flow: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a new slice at fraction ``alpha`` (N,) samples each neighbour, relative to its own pixels, along the
    gap's ``flow`` (N, 2, H, W) from below to above: ``-alpha * flow`` and ``(1 - alpha) * flow``."""
    a = alpha.reshape(-1, 1, 1, 1).to(flow.dtype)
    return -a * flow, (1 - a) * flow


def blend(warped_below: torch.Tensor, warped_above: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    a = alpha.reshape(-1, 1, 1, 1).to(warped_below.dtype)
    return (1 - a) * warped_below + a * warped_above


def morph_missing(kept: np.ndarray, factor: int, method: str = "dis", views: int = 1, smooth: float = 0.0
                  ) -> np.ndarray:
    """The optical-flow morph of a stack (n, h, w): its missing slices at factor K, in ``dense_positions`` order.
    ``smooth``: each gap's flow averaged with its neighbouring gaps' (``smooth_along_stack``)."""
    below, above, alpha = dense_positions(kept.shape[0], factor)
    stack = np.asarray(kept, np.float32)
    flows = motion_flows(stack[None], method, views, smooth)[below]
    images = torch.from_numpy(stack)[:, None]
    alpha_t = torch.as_tensor(alpha, dtype=torch.float32)
    wb, wa = warped_neighbours(images[below], images[above], flows, alpha_t)
    return blend(wb, wa, alpha_t)[:, 0].numpy().astype(np.float64)
