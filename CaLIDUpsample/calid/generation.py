"""Generating the missing slices of normalised stacks with a CaLID model: the model-level pipeline.

Like a diffusers pipeline, this holds the sampling loop and nothing about files, geometry or scanner intensities:
``generate_missing_phases`` takes stacks (phases, n, h, w) in the network's range and returns every missing slice of
every gap of every phase from one batched pass (encode the acquired slices, estimate their motion when the model is
motion-aware, denoise, decode, restore the detail the VAE loses, the last step); ``generate_renditions`` gives the
last step's renditions (``RENDITIONS``) of the same pass. ``calid.stack_upsampling`` wraps them for stacks in the
input's units, ``calid.engine`` for images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import motion, slice_positions
from .devices import autocast
from .errors import CalidError
from .networks import CaLID
from .progress import Progress
from .sampling import denoise, invert, make_scheduler, slerp

MAX_STEPS = 1000
DEFAULT_STEPS = 8
"""DDIM steps when neither the user nor the model's config (``default_steps``) says otherwise (the paper's)."""
MAX_SAMPLES = 64
RENDITIONS = ("balanced", "sharp")
"""What the last step of a motion-aware model makes of its estimate. ``"balanced"``: averaged with its partner (the
acquired neighbours carried onto it) and the cross-fade by the weights the model sets for the gap, the lowest pixel
error (what the volume shows). ``"sharp"``: the partner alone, each acquired neighbour resampled once onto the
model's walls (``motion.carried_onto``): 0.2-0.5 dB less heart PSNR, but the slices the segmenter reads best (Dice
+0.008 to +0.011 on validation patients, docs/measurements.md stop 36; blurring the hedge lowers its Dice): what
``--segmentation`` segments. A motion-aware model that mixes with the morph in shape or pixel space (none bundled)
has no carried partner: its sharp rendition is the morph itself. A model without motion has one rendition: both
names give it."""
CPU_BATCH = 16
"""Slices of 256 x 256 (ACDC's and Sunnybrook's size) in a CPU batch; fewer of larger slices (``slices_like``): the
networks' full-resolution activations of a batch, not the cine's arrays, were most of a 512 x 512 cine's peak
memory (docs/measurements.md, stop 46)."""
ITEMS_AT_ONCE = 64
"""Slices of 256 x 256 warped and aligned in one pass (``GapItems.parts``; fewer of larger slices, as for the
batches): enough for the flows' thread pool."""
GPU_BYTES_PER_LATENT_PIXEL = 64 * 1024  # measured peak per batch item and latent pixel, with margin


def slices_like(count: int, pixels: int) -> int:
    """``count`` slices of 256 x 256 as slices of ``pixels`` pixels each: as many or fewer, at least one."""
    return max(1, min(count, count * 256 * 256 // pixels))


def choose_batch_size(device: torch.device, latent_pixels: int, pixels: int) -> int:
    """A batch for slices of ``pixels`` (``latent_pixels`` in the VAE's latent space): on the CPU ``CPU_BATCH``
    slices' worth of pixels, on CUDA what its free memory holds."""
    if device.type != "cuda":
        return slices_like(CPU_BATCH, pixels)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(256, free * 0.7 // (GPU_BYTES_PER_LATENT_PIXEL * latent_pixels / 1024))))


def run_batched(fn: Callable[[slice], None], count: int, batch: int) -> int:
    """Call ``fn`` on consecutive slices of ``range(count)``; on CUDA out-of-memory halve the batch and retry."""
    start = 0
    while start < count:
        stop = min(start + batch, count)
        try:
            fn(slice(start, stop))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch == 1:
                raise CalidError("CUDA out of memory even with batch size 1: use --device cpu") from None
            batch = max(1, batch // 2)
            continue
        start = stop
    return batch


def generate_missing(model: CaLID, stack: np.ndarray, factor: int, steps: int = DEFAULT_STEPS, **options) -> np.ndarray:
    """Missing slices of a normalised stack (n, h, w) -> array (samples, (n-1)*(K-1), h, w), same range.

    Slice m of the result lies between acquired slices ``m // (K-1)`` and ``m // (K-1) + 1`` at fraction
    ``(m % (K-1) + 1) / K`` (``slice_positions.dense_positions``). ``options``: those of ``generate_missing_phases``.
    """
    return generate_missing_phases(model, stack[None], factor, steps, **options)[:, 0]


def generate_missing_phases(model: CaLID, stacks: np.ndarray, factor: int, steps: int = DEFAULT_STEPS,
                            **options) -> np.ndarray:
    """The balanced rendition of ``generate_renditions`` (same arguments): (samples, phases, missing, h, w)."""
    return generate_renditions(model, stacks, factor, steps, **options)["balanced"]


def pad_to_multiple(stacks: np.ndarray, multiple: int, value: float | None = None) -> tuple[np.ndarray, int, int]:
    """Pad (phases, n, h, w) in-plane to the network's multiple with ``value`` (default their minimum); returns
    (padded, ph, pw)."""
    h, w = stacks.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    pads = ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    return np.pad(stacks, pads, constant_values=float(stacks.min()) if value is None else value), ph, pw


def generation_units(phases: int, n: int, factor: int, steps: int, samples: int = 1, plus: bool = False) -> int:
    """The progress units ``generate_renditions`` counts for ``phases`` stacks of ``n`` slices: an encoding per
    acquired slice (and its inversion steps for CaLID+), the denoising steps and a decoding per new slice, and the
    decoding of the acquired slices for the detail transfer."""
    acquired = phases * n
    items = samples * phases * slice_positions.missing_count(n, factor)
    return acquired + (acquired * steps if plus else 0) + items * steps + items + acquired


def _gap_items(phases: int, n: int, factor: int, samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(below, above, alpha) of every generated item, ordered (sample, phase, missing slice).

    ``below``/``above`` index the acquired slices of all phases flattened (phase * n + slice), so one
    batched pass serves every phase of a cine.
    """
    below, above, alpha = slice_positions.dense_positions(n, factor)
    offsets = np.arange(phases)[:, None] * n
    below_t = torch.as_tensor((offsets + below).ravel()).repeat(samples)
    above_t = torch.as_tensor((offsets + above).ravel()).repeat(samples)
    alpha_t = torch.as_tensor(np.tile(alpha, phases), dtype=torch.float32).repeat(samples)
    return below_t, above_t, alpha_t


def _initial_noise(seed: int, samples: int, phases: int, missing: int, shape: tuple[int, ...],
                   shared: bool, part: range | None = None) -> torch.Tensor:
    """Starting noise of the ``part`` of the run's ``phases`` being made (default all), ordered like
    ``_gap_items``: what those phases get when the whole run is made at once. ``shared``: the same noise for a dense
    slice position in every phase (temporal coherence); both draw exactly the single-stack noise when there is one
    phase. Independent noise is drawn for the whole run and the part's kept: the bundled models' latents hold half a
    float per pixel, so that is about 2 bytes per new pixel and sample, briefly, before the part's own working copies
    are made."""
    part = range(phases) if part is None else part
    generator = torch.Generator().manual_seed(seed)
    if not shared:
        noise = torch.randn((samples, phases, missing, *shape), generator=generator)[:, part.start:part.stop]
        return noise.reshape(samples * len(part) * missing, *shape)
    noise = torch.randn((samples, 1, missing, *shape), generator=generator)
    return noise.expand(samples, len(part), missing, *shape).reshape(samples * len(part) * missing, *shape)


def phase_range(stacks: np.ndarray, phases: slice | None) -> range:
    """The phases of stacks (phases, n, h, w) that ``phases`` selects (all for None), as a range of step 1: a
    long cine is made in consecutive parts of its phases (``stack_upsampling.phase_parts``)."""
    part = range(len(stacks))[phases or slice(None)]
    if part.step != 1 or not part:
        raise ValueError(f"phases must select consecutive phases of the {len(stacks)}, not {phases}")
    return part


def gap_flows(model: CaLID, stacks: np.ndarray, phases: slice | None = None) -> torch.Tensor | None:
    """The optical flow of every gap of the ``phases`` of stacks (phases, n, h, w) (default all), on the padded grid
    the model works on: (phases * (n - 1), 2, H, W), or None for a model without motion.

    ``generate_missing_phases`` and ``expected_error`` estimate them when not given; a caller that needs both (an
    upsample with its uncertainty map, the error head's training examples) estimates them once here and passes
    them to each: with 8 views they are 8 DIS flows a gap, most of the map's cost.
    """
    if model.motion is None:
        return None
    part = phase_range(stacks, phases)
    padded = pad_to_multiple(stacks[part.start:part.stop], model.spatial_multiple, float(stacks.min()))[0]
    return model.motion.flows(padded)


class GapItems:
    """Every item to generate (sample, phase, missing slice) and the padded grid the flows and networks work on;
    also what the error head's and refiner's examples are made of (``training.data.EstimateSampler``).

    ``phases``: the items of those phases of ``stacks`` only (default all; ``phase_range``), on the grid padded
    with the minimum of all of them, so that an item is the same whichever part of a cine it is made in.
    ``below``/``above`` index the acquired slices of those phases flattened; ``flows`` (motion-aware models) hold one
    flow per gap of those phases (``gap_flows``: estimated here unless given), ``gap_of`` maps an item's lower
    acquired slice to its gap.
    """

    def __init__(self, model: CaLID, stacks: np.ndarray, factor: int, samples: int,
                 flows: torch.Tensor | None = None, phases: slice | None = None):
        part = phase_range(stacks, phases)
        self.pad_value = float(stacks.min())
        mine = stacks[part.start:part.stop]
        count, n, self.h, self.w = mine.shape
        self.padded, self.ph, self.pw = pad_to_multiple(mine, model.spatial_multiple, self.pad_value)
        self.latent_hw = tuple(s // model.vae_downsampling for s in self.padded.shape[2:])  # the latents' grid
        self.below, self.above, self.alpha = _gap_items(count, n, factor, samples)
        self.images = torch.from_numpy(self.padded.reshape(count * n, 1, *self.padded.shape[2:]))
        self.flows = self.gap_of = None
        if model.motion is not None:
            self.flows = gap_flows(model, stacks, phases) if flows is None else flows
            if self.flows.shape != (count * (n - 1), 2, *self.padded.shape[2:]):
                raise ValueError(f"flows of shape {tuple(self.flows.shape)} do not belong to stacks {mine.shape}")
            self.gap_of = self.below - self.below // n  # acquired slice (phase * n + i) -> gap (phase * (n - 1) + i)

    def __len__(self) -> int:
        return len(self.alpha)

    def warped(self, part: slice | torch.Tensor, images: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both acquired neighbours (of ``images``, default the padded slices) of the items in ``part``, warped
        along their flow to the items' positions."""
        images = self.images if images is None else images
        return motion.warped_neighbours(images[self.below[part]], images[self.above[part]],
                                        self.flows[self.gap_of[part]], self.alpha[part])

    def morph(self) -> np.ndarray:
        """Every item's optical-flow morph: both warped neighbours blended by its alpha, (items, h, w)."""
        return self.blended_warps(self.images)

    def carried_onto(self, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every item's acquired neighbours carried onto its ``estimate`` (items, h, w) and blended by its alpha
        (``motion.carried_onto``): resampled twice (the ``"aligned"`` morph mix's partner) and once (the sharp
        rendition, ``RENDITIONS``), each (items, h, w)."""
        twice, once = np.empty_like(estimate), np.empty_like(estimate)
        for part in self.parts():
            padded = self.pad(estimate[part], self.pad_value)
            carried = motion.carried_onto(padded, self.images[self.below[part]], self.images[self.above[part]],
                                          self.flows[self.gap_of[part]], self.alpha[part])
            twice[part], once[part] = (self.crop(x) for x in carried)
        return twice, once

    def blended_warps(self, images: torch.Tensor) -> np.ndarray:
        """Every item's two neighbours of ``images`` (padded, like ``self.images``) warped to it and blended by its
        alpha, (items, h, w): the morph of those images."""
        out = np.empty((len(self), self.h, self.w), np.float32)
        for part in self.parts():
            out[part] = self.crop(motion.blend(*self.warped(part, images), self.alpha[part]))
        return out

    def parts(self) -> list[slice]:
        """The items in parts of ``ITEMS_AT_ONCE`` (of 256 x 256 pixels: fewer of larger slices): warping every
        item of a cine at once held several full-size copies of each (neighbours, flows, sampling grids, alignment
        flows), about 8 MB per 256 x 256 item; each item is computed on its own either way, so the result is the
        same."""
        at_once = slices_like(ITEMS_AT_ONCE, self.padded.shape[2] * self.padded.shape[3])
        return [slice(start, start + at_once) for start in range(0, len(self), at_once)]

    def batch_size(self, device: torch.device) -> int:
        """``choose_batch_size`` for slices of the padded grid."""
        return choose_batch_size(device, self.latent_hw[0] * self.latent_hw[1],
                                 self.padded.shape[2] * self.padded.shape[3])

    def cross_fade(self, acquired: np.ndarray) -> np.ndarray:
        """Every item's two acquired neighbours in ``acquired`` (all phases' slices flattened, (phases * n, h, w)),
        blended linearly by its alpha, without motion: (items, h, w)."""
        a = self.alpha.numpy()[:, None, None]
        return (1 - a) * acquired[self.below.numpy()] + a * acquired[self.above.numpy()]

    def pad(self, x: np.ndarray, value: float = 0.0) -> torch.Tensor:
        """Slices (N, h, w) onto the padded grid (N, 1, H, W)."""
        ph, pw = self.ph, self.pw
        return torch.nn.functional.pad(torch.from_numpy(x)[:, None], (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2),
                                       value=value)

    def crop(self, x: torch.Tensor) -> np.ndarray:
        """Inverse of ``pad``: (N, 1, H, W) -> (N, h, w) on the input's grid."""
        return x[:, 0, self.ph // 2: self.ph // 2 + self.h, self.pw // 2: self.pw // 2 + self.w].cpu().numpy()


@dataclass
class _Batches:
    """Runs a network over consecutive parts of the items on one device (``run_batched``), keeping the batch size a
    CUDA out-of-memory shrank it to for the next network, and the progress every part advances."""

    device: torch.device
    size: int
    progress: Progress

    def run(self, fn: Callable[[slice], None], count: int) -> None:
        self.size = run_batched(fn, count, self.size)


@torch.no_grad()
def generate_renditions(
    model: CaLID,
    stacks: np.ndarray,
    factor: int,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    samples: int = 1,
    plus: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    progress: Progress | None = None,
    shared_noise: bool = True,
    refine: bool = True,
    flows: torch.Tensor | None = None,
    gap_mm: float | None = None,
    renditions: tuple[str, ...] = ("balanced",),
    phases: slice | None = None,
) -> dict[str, np.ndarray]:
    """Missing slices of every phase of normalised stacks (phases, n, h, w) -> for each of ``renditions``
    (``RENDITIONS``), (samples, phases, missing, h, w).

    ``phases``: make those phases only (consecutive, ``phase_range``; default all), exactly as they come out when
    every phase is made at once (the same starting noise and padding): ``stack_upsampling`` makes a long cine in
    parts of its phases so that its memory stays bounded. ``flows`` are then those phases' only.

    The phases go through the same batched passes; per phase the result is what ``generate_missing`` gives for that
    phase's stack alone, up to the starting noise (see ``_initial_noise``) and float rounding.
    ``refine=False`` leaves out a model's pixel-space refiner and its morph mix (the refiner's training data is the
    unrefined output). ``flows``: the stacks' ``gap_flows``, when the caller has them already. ``gap_mm``: the
    distance between neighbouring acquired slices (the input's slice spacing), which a model with a per-gap last
    step (``LastStep.gap_mix``) needs. Every rendition comes from the same estimate; ``refine=False`` gives the
    estimate under every name.
    """
    unknown = set(renditions) - set(RENDITIONS)
    if unknown or not renditions:
        raise ValueError(f"renditions must be some of {RENDITIONS}, not {renditions}")
    if refine and model.last_step.gap_mix is not None and gap_mm is None:
        raise ValueError("this model's last step depends on the gap between acquired slices: pass gap_mm")
    device = torch.device(device)
    part = phase_range(stacks, phases)
    count, n, h, w = len(part), *stacks.shape[1:]
    acquired = count * n
    missing = slice_positions.missing_count(n, factor)
    progress = progress or Progress("none")
    progress.set_stage("estimating motion" if model.motion is not None and flows is None else "preparing")
    gaps = GapItems(model, stacks, factor, samples, flows, phases)
    batches = _Batches(device, batch_size or gaps.batch_size(device), progress)
    progress.expect(generation_units(count, n, factor, steps, samples, plus))
    scheduler = make_scheduler(model.config["diffusion"])

    progress.set_stage("encoding acquired slices")
    latents = _encoded(model, gaps, batches)
    if plus:
        progress.set_stage("inverting acquired slices (CaLID+)")
        z_init = _inverted_start(model, scheduler, latents, gaps, count, n, steps, batches)
    else:
        z_init = _initial_noise(seed, samples, len(stacks), missing, tuple(latents.shape[1:]), shared_noise,
                                part).to(device)
    progress.set_stage("generating missing slices")
    z_final = _denoised(model, scheduler, z_init, latents, gaps, steps, batches)
    progress.set_stage("decoding")
    out = _decoded(model, z_final, gaps, batches)
    acquired_slices = stacks[part.start:part.stop].reshape(acquired, h, w)
    out += _lost_detail(model, acquired_slices, latents, gaps, batches)
    if refine and model.refiner is not None:
        progress.set_stage("refining")
        _refine(model, out, gaps, batches)
    finished = _last_step(model, out, gaps, acquired_slices, gap_mm, renditions) if refine else \
        dict.fromkeys(renditions, out)
    return {name: x.reshape(samples, count, missing, h, w) for name, x in finished.items()}


def _encoded(model: CaLID, gaps: GapItems, batches: _Batches) -> torch.Tensor:
    """The VAE latents of the acquired slices (``gaps.images``, N, 1, H, W), one progress unit each."""
    images = gaps.images
    latents = torch.empty((len(images), model.config["vae"]["latent_channels"], *gaps.latent_hw),
                          device=batches.device)

    def encode(part: slice) -> None:
        with autocast(batches.device):
            latents[part] = model.encode(images[part].to(batches.device)).float()
        batches.progress.advance(part.stop - part.start)

    batches.run(encode, len(images))
    return latents


def _inverted_start(model: CaLID, scheduler, latents: torch.Tensor, gaps: GapItems, phases: int, n: int, steps: int,
                    batches: _Batches) -> torch.Tensor:
    """CaLID+'s starting latents: every acquired slice inverted by DDIM to noise (as the ``alpha`` = 0 end of the gap
    above it, the last slice as the ``alpha`` = 1 end of the gap below), then each new slice's the slerp of its
    neighbours' by its ``alpha``."""
    device = batches.device
    inverted = torch.empty_like(latents)
    lo = (torch.arange(phases)[:, None] * n + torch.clamp(torch.arange(n), max=n - 2)).ravel()
    ends = (torch.arange(n) == n - 1).float().repeat(phases)

    def invert_part(part: slice) -> None:
        cond = (latents[lo[part]], latents[lo[part] + 1], ends[part].to(device))
        with autocast(device):
            inverted[part] = invert(lambda z, t: model.interpolator(z, t, *cond), scheduler,
                                    model.to_diffusion(latents[part], *cond), steps,
                                    on_step=lambda _: batches.progress.advance(part.stop - part.start)).float()

    batches.run(invert_part, len(latents))
    return slerp(inverted[gaps.below], inverted[gaps.above], gaps.alpha.to(device))


def _denoised(model: CaLID, scheduler, z_init: torch.Tensor, latents: torch.Tensor, gaps: GapItems, steps: int,
              batches: _Batches) -> torch.Tensor:
    """Every item's final latent: DDIM from ``z_init``, conditioned on its acquired neighbours' latents, or
    (motion-aware models) on the latents of both neighbours warped along their flow to the item's position."""
    device = batches.device
    z_final = torch.empty_like(z_init)

    def neighbours(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if gaps.flows is None:
            return latents[gaps.below[part]], latents[gaps.above[part]]
        with autocast(device):
            return tuple(model.encode(w.to(device)).float() for w in gaps.warped(part))

    def denoise_part(part: slice) -> None:
        cond = (*neighbours(part), gaps.alpha[part].to(device))
        with autocast(device):
            denoised = denoise(lambda z, t: model.interpolator(z, t, *cond), scheduler, z_init[part], steps,
                               on_step=lambda _: batches.progress.advance(part.stop - part.start)).float()
        z_final[part] = model.from_diffusion(denoised, *cond)

    batches.run(denoise_part, len(z_init))
    return z_final


def _decoded(model: CaLID, latents: torch.Tensor, gaps: GapItems, batches: _Batches) -> np.ndarray:
    """``latents`` decoded onto the input's grid (N, h, w), one progress unit each."""
    out = np.empty((len(latents), gaps.h, gaps.w), dtype=np.float32)

    def decode(part: slice) -> None:
        with autocast(batches.device):
            out[part] = gaps.crop(model.decode(latents[part]).float())
        batches.progress.advance(part.stop - part.start)

    batches.run(decode, len(latents))
    return out


def _lost_detail(model: CaLID, acquired: np.ndarray, latents: torch.Tensor, gaps: GapItems,
                 batches: _Batches) -> np.ndarray:
    """The detail transfer: what the VAE loses on the acquired neighbours (fine texture, a slight intensity bias),
    interpolated by each item's alpha (and carried along the flow by motion-aware models), to be added to the
    decoded items so that generated slices match the acquired ones they sit between."""
    lost = acquired - _decoded(model, latents, gaps, batches)
    if gaps.flows is None:
        return gaps.cross_fade(lost)
    return gaps.blended_warps(gaps.pad(lost))


def _refine(model: CaLID, out: np.ndarray, gaps: GapItems, batches: _Batches) -> None:
    """The model's pixel-space refiner over the decoded items, in place."""
    device = batches.device

    def refine_part(part: slice) -> None:
        estimate = gaps.pad(out[part], gaps.pad_value)
        with autocast(device):
            out[part] = gaps.crop(model.refiner(estimate.to(device), *(w.to(device) for w in gaps.warped(part)),
                                                gaps.alpha[part].to(device)).float())

    batches.run(refine_part, len(out))


def _last_step(model: CaLID, out: np.ndarray, gaps: GapItems, acquired: np.ndarray, gap_mm: float | None,
               renditions: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The model's slices averaged with the morph (``pipeline_settings.LastStep``; in the ``"aligned"`` space with
    the warped neighbours carried onto the slices, ``motion.carried_onto``), then with the linear cross-fade of the
    acquired neighbours: by the weights the model's last step sets for this gap for the balanced
    rendition, all weight on the partner resampled once and no cross-fade for the sharp one (``RENDITIONS``). Both
    partners come from one set of alignment flows."""
    step = model.last_step
    balanced = step.at(gap_mm)
    weights = {"balanced": balanced, "sharp": balanced if model.motion is None else (1.0, 0.0)}
    partners = None
    finished = {}
    for name in renditions:
        weight, linear = weights[name]
        mixed = out
        if weight and step.space == "shape":
            mixed = motion.shape_average(out, gaps.morph(), weight, model.motion.flow)
        elif weight:
            if partners is None:  # (resampled twice, once) or the morph for both
                partners = gaps.carried_onto(out) if step.space == "aligned" else (gaps.morph(),) * 2
            mixed = out + weight * (partners[name == "sharp"] - out)
        if linear:
            mixed = mixed + linear * (gaps.cross_fade(acquired) - mixed)
        finished[name] = mixed
    return finished


def require_error_head(model: CaLID) -> None:
    """The one-line refusal of an uncertainty map by a model that cannot make one."""
    if model.error_head is None:
        raise CalidError("this model has no error head, so it gives no calibrated uncertainty map: use a bundled "
                         "model, or train one with calid train --init MODEL --error-head-steps N")


@torch.no_grad()
def expected_error(model: CaLID, stacks: np.ndarray, generated: np.ndarray, factor: int, gap_mm: float,
                   device: torch.device | str = "cpu", batch_size: int | None = None,
                   flows: torch.Tensor | None = None, phases: slice | None = None) -> np.ndarray:
    """The model's error head on generated slices: expected absolute error (phases, missing, h, w), network units.

    ``gap_mm``: the distance between neighbouring acquired slices (the input's slice spacing).
    ``generated`` (phases, missing, h, w) is the estimate for ``stacks`` (phases, n, h, w) in the same range, as
    ``generate_missing_phases`` (averaged over samples) returns it, so the map can be asked of any estimate, the
    refined one included. ``flows``: the stacks' ``gap_flows`` if the caller has them (estimated here otherwise:
    DIS, ~5 ms a gap and view). ``phases``: ``generated`` (and ``flows``) are those phases' only, as
    ``generate_renditions`` makes a part of a cine.
    """
    require_error_head(model)
    device = torch.device(device)
    count, missing, h, w = generated.shape
    if count != len(phase_range(stacks, phases)):
        raise ValueError(f"generated slices of {count} phases do not belong to {phases} of stacks {stacks.shape}")
    gaps = GapItems(model, stacks, factor, 1, flows, phases)
    flat = np.ascontiguousarray(generated.reshape(count * missing, h, w), dtype=np.float32)
    out = np.empty_like(flat)
    batch = batch_size or gaps.batch_size(device)
    gap = torch.full((len(gaps),), float(gap_mm), device=device)

    def predict(part: slice) -> None:
        estimate = gaps.pad(flat[part], gaps.pad_value).to(device)
        with autocast(device):
            log_scale = model.error_head(estimate, *(w.to(device) for w in gaps.warped(part)),
                                         gaps.alpha[part].to(device), gap[part])
            out[part] = gaps.crop(log_scale.float().exp())

    run_batched(predict, len(gaps), batch)
    return out.reshape(count, missing, h, w)


def default_steps(model: CaLID) -> int:
    return int(model.config.get("default_steps", DEFAULT_STEPS))
