"""The generation stage of an upsampling, on arrays: the new slices of short-axis stacks, in the input's units.

What ``calid upsample`` does between reading a file and writing one, geometry apart: one intensity map fitted on
every phase (they stay comparable), the new slices of every phase by ``--method`` (the model through
``calid.generation``, or a peer), batched, a long cine in parts of its phases (``phase_parts``), and, for the model,
its calibrated map of the expected error on the same gap flows. Nothing here reads files or needs SimpleITK, so a
machine without it (the lent GPU's image) times exactly what the engine runs (``Testing/Device/gpu_speed.py``);
``calid.engine`` checks the image, makes the stacks and puts the new slices on the dense grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import slice_positions
from .choices import CINE_NOISE, UPSAMPLE_METHODS
from .errors import CalidError
from .generation import (MAX_SAMPLES, MAX_STEPS, expected_error, gap_flows, generate_renditions,
                         generation_units, phase_range)
from .intensity import IntensityMap
from .metrics import linear_missing
from .networks import CaLID
from .pipeline_settings import PRODUCT_MORPH
from .progress import Progress

PIXELS_AT_ONCE = 2 ** 24
"""New-slice pixels (over all samples) made in one part of a cine (``phase_parts``): a 20-phase cine of 12 slices
of 256 x 256 upsampled x2 (14 million) is one part; a 30-phase cine of 512 x 512 (87 million) is six."""


@dataclass
class UpsampleOptions:
    """Options shared by the CLI, the Python API and the Slicer module (same names as the CLI flags)."""

    factor: int | None = None
    spacing: float | None = None
    steps: int | None = None  # None: the model's ``default_steps`` (measured best on its validation patients)
    seed: int = 0
    samples: int = 1
    plus: bool = False
    slice_axis: int | None = None
    device: str = "auto"
    model: str | None = None
    batch_size: int | None = None
    cine_noise: str = "shared"  # cine only: same starting noise for a dense slice position in every phase
    method: str = "calid"

    def check(self) -> None:
        for name in ("factor", "steps", "seed", "samples", "slice_axis", "batch_size"):  # the API's callers too
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise CalidError(f"--{name.replace('_', '-')} must be a whole number, not {value!r}")
        if self.spacing is not None and (isinstance(self.spacing, bool)
                                         or not isinstance(self.spacing, (int, float, np.number))):
            raise CalidError(f"--spacing must be a number of mm, not {self.spacing!r}")
        if self.method not in UPSAMPLE_METHODS:
            raise CalidError(f"--method must be one of {', '.join(UPSAMPLE_METHODS)}, not {self.method}")
        if self.method != "calid" and (self.samples > 1 or self.plus):
            raise CalidError(f"--samples and --plus apply to --method calid, not {self.method}")
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise CalidError(f"--steps must be between 1 and {MAX_STEPS}, not {self.steps}")
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise CalidError(f"--samples must be between 1 and {MAX_SAMPLES}, not {self.samples}")
        if self.plus and self.samples > 1:
            raise CalidError("--plus starts from deterministic inverted latents: use --samples 1 with it")
        if self.batch_size is not None and self.batch_size < 1:
            raise CalidError(f"--batch-size must be positive, not {self.batch_size}")
        if self.cine_noise not in CINE_NOISE:
            raise CalidError(f"--cine-noise must be one of {', '.join(CINE_NOISE)}, not {self.cine_noise}")


@dataclass
class NewSlices:
    """The new slices of stacks (phases, n, h, w): (phases, (n - 1) * (factor - 1), h, w) each, in the input's units,
    samples averaged."""

    balanced: np.ndarray
    """What the dense volume holds (``generation.RENDITIONS``)."""
    sharp: np.ndarray | None = None
    """The sharp rendition, what ``--segmentation`` segments (only when asked for)."""
    error: np.ndarray | None = None
    """The model's calibrated expected absolute error of ``balanced`` (only when asked for)."""


def missing_slices(options: UpsampleOptions, model: CaLID | None, stacks: np.ndarray, factor: int, steps: int,
                   device: torch.device, gap_mm: float, progress: Progress | None = None,
                   flows: torch.Tensor | None = None, renditions: tuple[str, ...] = ("balanced",),
                   phases: slice | None = None) -> dict[str, np.ndarray]:
    """Missing slices of normalised stacks (phases, n, h, w) by ``options.method``: for each of ``renditions``
    (``generation.RENDITIONS``; the classical methods have one), (samples, phases, missing, h, w).
    ``gap_mm``: the stacks' slice spacing. ``flows``: the model's ``gap_flows`` of the stacks, if already estimated.
    ``phases``: those phases only (``generation.phase_range``; default all), as they are when all are made."""
    if options.method == "calid":
        return generate_renditions(model, stacks, factor, steps, seed=options.seed, samples=options.samples,
                                   plus=options.plus, device=device, batch_size=options.batch_size, progress=progress,
                                   shared_noise=options.cine_noise == "shared", flows=flows, gap_mm=gap_mm,
                                   renditions=renditions, phases=phases)
    part = phase_range(stacks, phases)
    progress = progress or Progress("none")
    progress.expect(len(part))
    progress.set_stage(f"{options.method} interpolation")
    missing = slice_positions.missing_count(stacks.shape[1], factor)
    # Filled stack by stack: a cine's phases in float64 all at once were 5x these slices' memory.
    out = np.empty((1, len(part), missing, *stacks.shape[2:]), np.float32)
    for t, stack in enumerate(stacks[part.start:part.stop]):
        out[0, t] = PRODUCT_MORPH.morph_missing(stack, factor) if options.method == "morph" else \
            linear_missing(stack, factor)
        progress.advance(1)
    return dict.fromkeys(renditions, out)


def phase_parts(stacks_shape: tuple[int, ...], factor: int, samples: int = 1) -> list[slice]:
    """Consecutive parts of a cine's phases, each with at most ``PIXELS_AT_ONCE`` new-slice pixels (one phase at
    least): made part by part, the generation's working copies (flows, warps, decoded and last-step slices, about
    18 float32 copies of the new slices) are a part's, not the whole cine's."""
    phases, n, h, w = stacks_shape
    per_phase = max(1, samples * slice_positions.missing_count(n, factor) * h * w)
    at_once = max(1, PIXELS_AT_ONCE // per_phase)
    return [slice(start, min(start + at_once, phases)) for start in range(0, phases, at_once)]


def new_slices(stacks: np.ndarray, options: UpsampleOptions, model: CaLID | None, factor: int, steps: int,
               device: torch.device, gap_mm: float, progress: Progress | None = None, want_uncertainty: bool = False,
               want_sharp: bool = False) -> NewSlices:
    """The new slices of the input's stacks (phases, n, h, w), in its units; ``gap_mm``: their slice spacing.
    ``model`` and ``steps`` as ``engine.prepare_run`` gives them (None and 0 for the classical methods).

    A long cine is made in parts of its phases (``phase_parts``), each part's slices (and map) put in the result
    before the next part begins; every phase comes out as it would with all made at once."""
    intensity = IntensityMap.fit(stacks)
    network_stacks = intensity.to_network(stacks)
    phases, n, h, w = stacks.shape
    missing = slice_positions.missing_count(n, factor)
    result = NewSlices(*(np.empty((phases, missing, h, w)) if wanted else None
                         for wanted in (True, want_sharp, want_uncertainty)))
    parts = phase_parts(stacks.shape, factor, options.samples)
    progress = progress or Progress("none")
    units = [generation_units(p.stop - p.start, n, factor, steps, options.samples, options.plus)
             if options.method == "calid" else p.stop - p.start for p in parts]
    for index in progress.in_parts(units):
        part = parts[index]
        flows = None
        if want_uncertainty:  # the slices and their map are made on the same flows: estimated once
            progress.set_stage("estimating motion")
            flows = gap_flows(model, network_stacks, part)
        renditions = missing_slices(options, model, network_stacks, factor, steps, device, gap_mm, progress, flows,
                                    ("balanced", "sharp") if want_sharp else ("balanced",), part)
        balanced = _sample_mean(renditions["balanced"])
        if want_uncertainty:
            progress.set_stage("predicting the expected error")
            intensity.size_from_network(expected_error(model, network_stacks, balanced, factor, gap_mm, device,
                                                       options.batch_size, flows, part), result.error[part])
        intensity.from_network(balanced, result.balanced[part])
        if want_sharp:
            intensity.from_network(_sample_mean(renditions["sharp"]), result.sharp[part])
        del renditions, balanced, flows  # this part's working copies go before the next part makes its own
    return result


def _sample_mean(samples: np.ndarray) -> np.ndarray:
    """The mean over the samples axis; one sample is itself, not a copy (a cine's new slices are hundreds of MB)."""
    return samples[0] if len(samples) == 1 else samples.mean(axis=0)
