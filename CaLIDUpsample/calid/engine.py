"""Upsampling a short-axis stack: every missing slice of every gap generated in one batched pass.

``generate_missing`` works on a normalised stack (slices, rows, cols), ``generate_missing_phases`` on the stacks of
all phases of a cine at once (``calid.cine``); ``upsample_image`` wraps the first with
validation, geometry and intensity mapping for a ``SimpleITK.Image``; ``upsample_file`` reads and writes.
Acquired slices are copied from the input array unchanged; only the missing ones are generated.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry, motion
from .devices import autocast, resolve_device
from .errors import CalidError
from .imageio import read_image, validate_volume, write_image
from .intensity import IntensityMap
from .metrics import linear_missing
from .modelstore import load_model
from .networks import CaLID
from .progress import Progress
from .sampling import denoise, invert, make_scheduler, max_sampling_steps, slerp

MAX_STEPS = 1000
DEFAULT_STEPS = 8
"""DDIM steps when neither the user nor the model's config (``default_steps``) says otherwise (the paper's)."""
MAX_SAMPLES = 64
CPU_BATCH = 16
GPU_BYTES_PER_LATENT_PIXEL = 64 * 1024  # measured peak per batch item and latent pixel, with margin
CINE_NOISE = ("shared", "independent")
METHODS = ("calid", "morph", "linear")
"""``--method``: the model, or what a user gets without it (the optical-flow morph, linear interpolation), so that
a scan can be compared with the peers through the same geometry, intensity handling and outputs."""


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
        if self.method not in METHODS:
            raise CalidError(f"--method must be one of {', '.join(METHODS)}, not {self.method}")
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
class UpsampleResult:
    image: sitk.Image
    uncertainty: sitk.Image | None
    factor: int
    slice_axis: int
    seconds: float
    device: str
    timings: dict = field(default_factory=dict)
    labels: sitk.Image | None = None
    volumes: dict | None = None


def choose_batch_size(device: torch.device, latent_pixels: int) -> int:
    if device.type != "cuda":
        return CPU_BATCH
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


@torch.no_grad()
def generate_missing(
    model: CaLID,
    stack: np.ndarray,
    factor: int,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    samples: int = 1,
    plus: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Missing slices of a normalised stack (n, h, w) -> array (samples, (n-1)*(K-1), h, w), same range.

    Slice m of the result lies between acquired slices ``m // (K-1)`` and ``m // (K-1) + 1`` at fraction
    ``(m % (K-1) + 1) / K`` (``geometry.dense_positions``).
    """
    return generate_missing_phases(model, stack[None], factor, steps, seed, samples, plus, device, batch_size,
                                   progress)[:, 0]


def _pad_to_multiple(stacks: np.ndarray, multiple: int) -> tuple[np.ndarray, int, int]:
    """Pad (phases, n, h, w) in-plane to the network's multiple with the minimum; returns (padded, ph, pw)."""
    h, w = stacks.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    pads = ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    return np.pad(stacks, pads, constant_values=float(stacks.min())), ph, pw


def _gap_items(phases: int, n: int, factor: int, samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(below, above, alpha) of every generated item, ordered (sample, phase, missing slice).

    ``below``/``above`` index the acquired slices of all phases flattened (phase * n + slice), so one
    batched pass serves every phase of a cine.
    """
    below, above, alpha = geometry.dense_positions(n, factor)
    offsets = np.arange(phases)[:, None] * n
    below_t = torch.as_tensor((offsets + below).ravel()).repeat(samples)
    above_t = torch.as_tensor((offsets + above).ravel()).repeat(samples)
    alpha_t = torch.as_tensor(np.tile(alpha, phases), dtype=torch.float32).repeat(samples)
    return below_t, above_t, alpha_t


def _initial_noise(seed: int, samples: int, phases: int, missing: int, shape: tuple[int, ...],
                   shared: bool) -> torch.Tensor:
    """Starting noise, ordered like ``_gap_items``. ``shared``: the same noise for a dense slice position in
    every phase (temporal coherence); both draw exactly the single-stack noise when there is one phase."""
    generator = torch.Generator().manual_seed(seed)
    if not shared:
        return torch.randn((samples * phases * missing, *shape), generator=generator)
    noise = torch.randn((samples, 1, missing, *shape), generator=generator)
    return noise.expand(samples, phases, missing, *shape).reshape(samples * phases * missing, *shape)


@torch.no_grad()
def generate_missing_phases(
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
) -> np.ndarray:
    """Missing slices of every phase of normalised stacks (phases, n, h, w) -> (samples, phases, missing, h, w).

    All phases go through the same batched passes (one progress over the whole cine); per phase the result
    is what ``generate_missing`` gives for that phase's stack alone, up to the starting noise (see
    ``_initial_noise``).
    """
    device = torch.device(device)
    phases, n, h, w = stacks.shape
    acquired = phases * n
    padded, ph, pw = _pad_to_multiple(stacks, model.spatial_multiple)
    below_t, above_t, alpha_t = _gap_items(phases, n, factor, samples)
    missing = (n - 1) * (factor - 1)
    items = len(alpha_t)
    latent_hw = (padded.shape[2] // 4, padded.shape[3] // 4)
    batch = batch_size or choose_batch_size(device, latent_hw[0] * latent_hw[1])
    progress = progress or Progress("none")
    progress.total = (acquired + (acquired * steps if plus else 0) + items * steps + items + acquired
                      + (acquired if model.motion is not None else 0))
    scheduler = make_scheduler(model.config["diffusion"])

    progress.set_stage("encoding acquired slices")
    images = torch.from_numpy(padded.reshape(acquired, 1, *padded.shape[2:]))
    latents = torch.empty((acquired, model.config["vae"]["latent_channels"], *latent_hw), device=device)

    def encode(part: slice) -> None:
        with autocast(device):
            latents[part] = model.encode(images[part].to(device)).float()
        progress.advance(part.stop - part.start)

    batch = run_batched(encode, acquired, batch)

    if plus:
        progress.set_stage("inverting acquired slices (CaLID+)")
        inverted = torch.empty_like(latents)
        # Slice i is the alpha=0 end of the gap (i, i+1); the last slice is the alpha=1 end of its gap.
        lo = (torch.arange(phases)[:, None] * n + torch.clamp(torch.arange(n), max=n - 2)).ravel()
        ends = (torch.arange(n) == n - 1).float().repeat(phases)

        def invert_part(part: slice) -> None:
            cond = (latents[lo[part]], latents[lo[part] + 1], ends[part].to(device))
            with autocast(device):
                inverted[part] = invert(lambda z, t: model.interpolator(z, t, *cond), scheduler,
                                        model.to_diffusion(latents[part], *cond), steps,
                                        on_step=lambda _: progress.advance(part.stop - part.start)).float()

        batch = run_batched(invert_part, acquired, batch)
        z_init = slerp(inverted[below_t], inverted[above_t], alpha_t.to(device))
    else:
        z_init = _initial_noise(seed, samples, phases, missing, tuple(latents.shape[1:]), shared_noise).to(device)

    flows = latent_flows = gap_of = None
    if model.motion is not None:
        progress.set_stage("estimating motion")
        flows = torch.from_numpy(motion.stack_flows(padded, model.motion["flow"]))
        latent_flows = motion.latent_flow(flows, model.vae_downsampling).to(device)
        progress.advance(acquired)
        gap_of = below_t - below_t // n  # acquired slice (phase * n + i) -> its gap (phase * (n - 1) + i)

    def neighbours(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """What the denoiser is conditioned on: the acquired neighbours' latents, or (motion-aware models) both
        warped along their flow to the new slice's position."""
        below, above = latents[below_t[part]], latents[above_t[part]]
        if latent_flows is None:
            return below, above
        return motion.warped_neighbours(below, above, latent_flows[gap_of[part]], alpha_t[part].to(device))

    progress.set_stage("generating missing slices")
    z_final = torch.empty_like(z_init)

    def denoise_part(part: slice) -> None:
        cond = (*neighbours(part), alpha_t[part].to(device))
        with autocast(device):
            denoised = denoise(lambda z, t: model.interpolator(z, t, *cond), scheduler, z_init[part], steps,
                               on_step=lambda _: progress.advance(part.stop - part.start)).float()
        z_final[part] = model.from_diffusion(denoised, *cond)

    batch = run_batched(denoise_part, items, batch)

    progress.set_stage("decoding")
    out = np.empty((items, h, w), dtype=np.float32)
    reconstructed = np.empty((acquired, h, w), dtype=np.float32)

    def decoder(latent_source: torch.Tensor, target: np.ndarray):
        def decode(part: slice) -> None:
            with autocast(device):
                decoded = model.decode(latent_source[part]).float()[:, 0].cpu().numpy()
            target[part] = decoded[:, ph // 2: ph // 2 + h, pw // 2: pw // 2 + w]
            progress.advance(part.stop - part.start)
        return decode

    batch = run_batched(decoder(z_final, out), items, batch)
    run_batched(decoder(latents, reconstructed), acquired, batch)
    # Detail transfer: what the VAE loses on the acquired neighbours (fine texture, a slight intensity bias) is
    # added back, interpolated by alpha (and carried along the flow by motion-aware models), so generated slices
    # match the acquired ones they sit between.
    lost = stacks.reshape(acquired, h, w) - reconstructed
    if flows is None:
        a = alpha_t.numpy()[:, None, None]
        out += (1 - a) * lost[below_t.numpy()] + a * lost[above_t.numpy()]
    else:
        lost_t = torch.nn.functional.pad(torch.from_numpy(lost)[:, None], (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        warped = motion.warped_neighbours(lost_t[below_t], lost_t[above_t], flows[gap_of], alpha_t)
        out += motion.blend(*warped, alpha_t)[:, 0, ph // 2: ph // 2 + h, pw // 2: pw // 2 + w].numpy()
    return out.reshape(samples, phases, missing, h, w)


def default_steps(model: CaLID) -> int:
    return int(model.config.get("default_steps", DEFAULT_STEPS))


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def prepare_run(image: sitk.Image, options: UpsampleOptions, model: CaLID | None,
                want_uncertainty: bool) -> tuple[int, int, torch.device, CaLID | None, int]:
    """Check the options against the image and load the model: (slice axis, K, device, model, steps).

    Shared by volumes and cines (``image`` may be 4D: only its three spatial axes are looked at). The classical
    methods need no model (None, 0 steps).
    """
    options.check()
    if want_uncertainty and options.method != "calid":
        raise CalidError(f"an uncertainty map needs --method calid, not {options.method}")
    if want_uncertainty and options.samples < 2:
        raise CalidError("an uncertainty map needs at least 2 samples (--samples 2 or more)")
    axis = geometry.find_slice_axis(image, options.slice_axis)
    factor = geometry.resolve_factor(image, axis, options.factor, options.spacing)
    device = resolve_device(options.device)
    if options.method != "calid":
        return axis, factor, device, None, 0
    if model is None:
        model, _ = load_model(options.model, device)
    model = model.to(device).eval()
    if options.plus and model.diffusion_target != "latent":
        # The acquired slices are the alpha=0/1 ends of their gaps, where the residual is zero by definition:
        # their inversions carry no information (measured: 13.2 dB instead of 17.5 dB on two ACDC 5 mm stacks).
        raise CalidError("--plus (CaLID+) needs a model that diffuses latents; this model diffuses residuals "
                         "to an interpolation of its neighbours: leave --plus out")
    steps = options.steps or default_steps(model)
    most = max_sampling_steps(model.config["diffusion"])
    if steps > most:
        raise CalidError(f"this model was trained on diffusion timesteps >= {model.config['diffusion']['min_timestep']} "
                         f"only: use --steps {most}" + (" or fewer" if most > 1 else ""))
    return axis, factor, device, model, steps


def missing_slices(options: UpsampleOptions, model: CaLID | None, stacks: np.ndarray, factor: int, steps: int,
                   device: torch.device, progress: Progress | None = None) -> np.ndarray:
    """Missing slices of normalised stacks (phases, n, h, w) by ``options.method``: (samples, phases, missing, h, w)."""
    if options.method == "calid":
        return generate_missing_phases(model, stacks, factor, steps, options.seed, options.samples, options.plus,
                                       device, options.batch_size, progress,
                                       shared_noise=options.cine_noise == "shared")
    progress = progress or Progress("none")
    progress.total = len(stacks)
    progress.set_stage(f"{options.method} interpolation")
    out = []
    for stack in stacks:
        out.append(motion.morph_missing(stack, factor) if options.method == "morph" else linear_missing(stack, factor))
        progress.advance(1)
    return np.stack(out)[None].astype(np.float32)


def dense_stack(acquired: np.ndarray, generated: np.ndarray, factor: int, dtype: np.dtype) -> np.ndarray:
    """Interleave acquired slices (n, h, w), unchanged, with generated ones ((n-1)*(K-1), h, w) cast to ``dtype``."""
    n = acquired.shape[0]
    dense = np.empty(((n - 1) * factor + 1, *acquired.shape[1:]), dtype=dtype)
    dense[::factor] = acquired
    dense[geometry.generated_slices(n, factor)] = _cast_like(generated, dtype)
    return dense


def upsample_image(
    image: sitk.Image,
    options: UpsampleOptions | None = None,
    model: CaLID | None = None,
    progress: Progress | None = None,
    want_uncertainty: bool = False,
) -> UpsampleResult:
    """Upsample a 3D ``SimpleITK.Image`` along its slice axis; returns the dense image (and uncertainty).

    The dense image has the input's pixel type, origin and direction; slice spacing / K; its slice i*K is
    input slice i unchanged. ``want_uncertainty`` needs ``options.samples >= 2``.
    """
    options = options or UpsampleOptions()
    started = time.perf_counter()
    image = validate_volume(image)
    axis, factor, device, model, steps = prepare_run(image, options, model, want_uncertainty)
    loaded = time.perf_counter()

    array = sitk.GetArrayFromImage(image)
    stack = geometry.to_stack(array, axis)
    intensity = IntensityMap.fit(stack)
    generated = missing_slices(options, model, intensity.to_network(stack)[None], factor, steps, device, progress)
    generated = intensity.from_network(generated[:, 0])
    dense = dense_stack(stack, generated.mean(axis=0), factor, array.dtype)
    result_image = geometry.dense_image(geometry.from_stack(dense, axis), image, axis, factor)

    uncertainty = None
    if want_uncertainty:
        spread = dense_stack(np.zeros(stack.shape, np.float32), generated.std(axis=0), factor, np.float32)
        uncertainty = geometry.dense_image(geometry.from_stack(spread, axis), image, axis, factor)
    done = time.perf_counter()
    return UpsampleResult(result_image, uncertainty, factor, axis, done - started, str(device),
                          {"load_s": loaded - started, "generate_s": done - loaded})


def upsample_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: UpsampleOptions | None = None,
    uncertainty_path: str | os.PathLike | None = None,
    model: CaLID | None = None,
    progress: Progress | None = None,
    segmentation_path: str | os.PathLike | None = None,
    input_segmentation_path: str | os.PathLike | None = None,
    segmentation_model: str | None = None,
) -> UpsampleResult:
    """Read ``input_path`` (file or DICOM folder), upsample, write ``output_path`` (and the uncertainty).

    ``segmentation_path``: also write labels on the dense grid (from ``input_segmentation_path``, the user's
    labels of the acquired slices, when given). Inputs are all checked, and everything computed, before the
    first output is written. A cine (4D file, sequence NRRD, DICOM cine folder) is upsampled phase by phase on
    the dense grid and written in the same form (``calid.cine``).
    """
    if input_segmentation_path is not None and segmentation_path is None:
        raise CalidError("--input-segmentation needs --segmentation (where to write the dense labels)")
    for target in filter(None, (output_path, uncertainty_path, segmentation_path)):
        if Path(target).resolve() in {Path(p).resolve() for p in filter(None, (input_path, input_segmentation_path))}:
            raise CalidError(f"output {target} would overwrite the input")
    from .cine import Cine, read_input, upsample_cine_file

    source = read_input(input_path)
    if isinstance(source, Cine):
        if segmentation_path is not None:
            raise CalidError("--segmentation is not available for cine input yet: segment one phase as a 3D volume")
        return upsample_cine_file(source, output_path, options, uncertainty_path, model, progress)
    image = source
    sparse = None
    if input_segmentation_path is not None:
        from .segmentation.sparse import check_labels

        sparse = check_labels(read_image(input_segmentation_path), validate_volume(image))
    segmenter = None
    if segmentation_path is not None:
        from .segmentation.store import load_segmenter

        device = resolve_device(options.device if options else "auto")
        segmenter = load_segmenter(segmentation_model, device)
    result = upsample_image(image, options, model, progress, want_uncertainty=uncertainty_path is not None)
    if segmenter is not None:
        from .segmentation.measures import structure_volumes
        from .segmentation.pipeline import segment_dense

        if progress is not None:
            progress.set_stage("segmenting")
        result.labels = segment_dense(result.image, result.slice_axis, result.factor, *segmenter, sparse_labels=sparse,
                                      device=device)
        result.volumes = structure_volumes(result.labels)
    write_image(result.image, output_path)
    if uncertainty_path is not None:
        write_image(result.uncertainty, uncertainty_path)
    if segmentation_path is not None:
        write_image(result.labels, segmentation_path)
    return result
