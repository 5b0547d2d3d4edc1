"""Upsampling short-axis images: options, checks, geometry and intensities around the generation of new slices.

One pipeline serves volumes and cines: a volume is a one-phase cine. ``upsample_image`` (3D) and ``upsample_cine``
(4D, ``calid.cine`` reads and writes them) check the input, fit one intensity map, have every missing slice of every
phase made in one batched pass by ``--method`` (the model through ``calid.generation``, or a peer), and put them on
the dense grid with the input's geometry; ``upsample_file`` reads and writes. Acquired slices are copied from the
input array unchanged; only the missing ones are generated.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import SimpleITK as sitk
import torch

from . import geometry, motion, slice_positions
from .cine import Cine, read_input, write_cine
from .devices import for_inference, resolve_device
from .errors import CalidError
from .generation import (MAX_SAMPLES, MAX_STEPS, default_steps, expected_error, gap_flows, generate_renditions,
                         require_error_head)
from .imageio import check_pixels, read_image, validate_volume, write_image
from .intensity import IntensityMap
from .metrics import linear_missing
from .modelstore import load_model
from .networks import CaLID
from .progress import Progress
from .sampling import max_sampling_steps
from .uncertainty import slice_summaries

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
    uncertainty_slices: list[dict] | None = None
    """``uncertainty.slice_summaries`` of the map (inside the heart too once ``labels`` are made)."""
    sharp_image: sitk.Image | None = None
    """``image`` with the sharp rendition of the new slices (``generation.RENDITIONS``), what ``--segmentation``
    segments; only when asked for (``want_sharp``); the same pixels as ``image`` for the classical methods."""


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
    axis = geometry.find_slice_axis(image, options.slice_axis)
    factor = geometry.resolve_factor(image, axis, options.factor, options.spacing)
    device = resolve_device(options.device)
    if options.method != "calid":
        return axis, factor, device, None, 0
    if model is None:
        model, _ = load_model(options.model, device)
    model = for_inference(model, device)
    if want_uncertainty:
        require_error_head(model)  # before the generation it would come after
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
                   device: torch.device, gap_mm: float, progress: Progress | None = None,
                   flows: torch.Tensor | None = None,
                   renditions: tuple[str, ...] = ("balanced",)) -> dict[str, np.ndarray]:
    """Missing slices of normalised stacks (phases, n, h, w) by ``options.method``: for each of ``renditions``
    (``generation.RENDITIONS``; the classical methods have one), (samples, phases, missing, h, w).
    ``gap_mm``: the stacks' slice spacing. ``flows``: the model's ``gap_flows`` of the stacks, if already estimated."""
    if options.method == "calid":
        return generate_renditions(model, stacks, factor, steps, seed=options.seed, samples=options.samples,
                                   plus=options.plus, device=device, batch_size=options.batch_size, progress=progress,
                                   shared_noise=options.cine_noise == "shared", flows=flows, gap_mm=gap_mm,
                                   renditions=renditions)
    progress = progress or Progress("none")
    progress.total = len(stacks)
    progress.set_stage(f"{options.method} interpolation")
    out = []
    for stack in stacks:
        if options.method == "morph":
            out.append(motion.product_morph(stack, factor))
        else:
            out.append(linear_missing(stack, factor))
        progress.advance(1)
    return dict.fromkeys(renditions, np.stack(out)[None].astype(np.float32))


def dense_stack(acquired: np.ndarray, generated: np.ndarray, factor: int, dtype: np.dtype) -> np.ndarray:
    """Interleave acquired slices (n, h, w), unchanged, with generated ones ((n-1)*(K-1), h, w) cast to ``dtype``."""
    n = acquired.shape[0]
    dense = np.empty(((n - 1) * factor + 1, *acquired.shape[1:]), dtype=dtype)
    dense[::factor] = acquired
    dense[slice_positions.generated_slices(n, factor)] = _cast_like(generated, dtype)
    return dense


def _upsample_phases(image: sitk.Image, phases: np.ndarray, options: UpsampleOptions, model: CaLID | None,
                     progress: Progress | None, want_uncertainty: bool, want_sharp: bool = False) -> UpsampleResult:
    """The one pipeline: ``phases`` (t, z, y, x) of ``image`` (3D: one phase; 4D: a cine) onto the dense grid.

    One intensity map is fitted on all phases (they stay comparable) and all phases go through one batched
    generation; the result has ``image``'s dimension, pixel type, origin and direction.
    """
    started = time.perf_counter()
    axis, factor, device, model, steps = prepare_run(image, options, model, want_uncertainty)
    loaded = time.perf_counter()
    stacks = np.stack([geometry.to_stack(phase, axis) for phase in phases])
    intensity = IntensityMap.fit(stacks)
    network_stacks = intensity.to_network(stacks)
    flows = None
    if want_uncertainty:  # the slices and their map are made on the same flows: estimated once
        if progress is not None:
            progress.set_stage("estimating motion")
        flows = gap_flows(model, network_stacks)
    gap_mm = image.GetSpacing()[axis]
    renditions = missing_slices(options, model, network_stacks, factor, steps, device, gap_mm, progress, flows,
                                ("balanced", "sharp") if want_sharp else ("balanced",))
    generated = renditions["balanced"].mean(axis=0)
    error = None
    if want_uncertainty:
        if progress is not None:
            progress.set_stage("predicting the expected error")
        error = intensity.size_from_network(expected_error(model, network_stacks, generated, factor, gap_mm, device,
                                                           options.batch_size, flows))
    generated = intensity.from_network(generated)

    def dense_image(acquired: np.ndarray, new: np.ndarray, dtype: np.dtype) -> sitk.Image:
        dense = np.stack([geometry.from_stack(dense_stack(acquired[t], new[t], factor, dtype), axis)
                          for t in range(len(acquired))])
        return geometry.dense_image(dense if image.GetDimension() == 4 else dense[0], image, axis, factor)

    result = dense_image(stacks, generated, phases.dtype)
    uncertainty = None if error is None else dense_image(np.zeros_like(stacks, np.float32), error, np.float32)
    sharp = None
    if want_sharp:
        sharp = dense_image(stacks, intensity.from_network(renditions["sharp"].mean(axis=0)), phases.dtype)
    done = time.perf_counter()
    return UpsampleResult(result, uncertainty, factor, axis, done - started, str(device),
                          {"load_s": loaded - started, "generate_s": done - loaded},
                          uncertainty_slices=None if uncertainty is None else slice_summaries(uncertainty, axis, factor),
                          sharp_image=sharp)


def upsample_image(image: sitk.Image, options: UpsampleOptions | None = None, model: CaLID | None = None,
                   progress: Progress | None = None, want_uncertainty: bool = False,
                   want_sharp: bool = False) -> UpsampleResult:
    """Upsample a 3D ``SimpleITK.Image`` along its slice axis; returns the dense image (and uncertainty).

    The dense image has the input's pixel type, origin and direction; slice spacing / K; its slice i*K is
    input slice i unchanged. ``want_uncertainty``: also the model's calibrated map of the expected absolute error
    (``uncertainty``, input intensity units, 0 on acquired slices) and its per-slice figures; it needs a model
    with an error head. ``want_sharp``: also the sharp rendition of the new slices (``sharp_image``), from the same
    pass.
    """
    image = validate_volume(image)
    return _upsample_phases(image, sitk.GetArrayFromImage(image)[None], options or UpsampleOptions(), model,
                            progress, want_uncertainty, want_sharp)


def upsample_cine(cine: Cine, options: UpsampleOptions | None = None, model: CaLID | None = None,
                  progress: Progress | None = None, want_uncertainty: bool = False) -> UpsampleResult:
    """Every phase on the dense grid (4D image, time axis kept), all phases generated in one batched pass.

    Acquired slices of every phase are copied unchanged; ``options.cine_noise`` picks shared or independent
    starting noise across phases.
    """
    image = check_pixels(cine.image)
    return _upsample_phases(image, sitk.GetArrayFromImage(image), options or UpsampleOptions(), model, progress,
                            want_uncertainty)


def upsample_cine_file(cine: Cine, output_path: str | os.PathLike, options: UpsampleOptions | None = None,
                       uncertainty_path: str | os.PathLike | None = None, model: CaLID | None = None,
                       progress: Progress | None = None) -> UpsampleResult:
    """Upsample a cine read by ``read_input`` and write it (and its uncertainty) in the output's form."""
    result = upsample_cine(cine, options, model, progress, want_uncertainty=uncertainty_path is not None)
    write_cine(result.image, cine, output_path)
    if uncertainty_path is not None:
        write_cine(result.uncertainty, cine, uncertainty_path)
    return result


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
    labels of the acquired slices, when given), segmented on the sharp rendition of the new slices
    (``generation.RENDITIONS``: the segmenter reads it better than the written volume's balanced one, whose walls
    lie in the same places). Inputs are all checked, and everything computed, before the
    first output is written. A cine (4D file, sequence NRRD, DICOM cine folder) is upsampled phase by phase on
    the dense grid and written in the same form (``calid.cine``).
    """
    if input_segmentation_path is not None and segmentation_path is None:
        raise CalidError("--input-segmentation needs --segmentation (where to write the dense labels)")
    for target in filter(None, (output_path, uncertainty_path, segmentation_path)):
        if Path(target).resolve() in {Path(p).resolve() for p in filter(None, (input_path, input_segmentation_path))}:
            raise CalidError(f"output {target} would overwrite the input")
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
    result = upsample_image(image, options, model, progress, want_uncertainty=uncertainty_path is not None,
                            want_sharp=segmenter is not None)
    if segmenter is not None:
        from .segmentation.measures import structure_volumes
        from .segmentation.pipeline import segment_dense

        if progress is not None:
            progress.set_stage("segmenting")
        result.labels = segment_dense(result.sharp_image, result.slice_axis, result.factor, *segmenter,
                                      sparse_labels=sparse, device=device)
        result.volumes = structure_volumes(result.labels)
        if result.uncertainty is not None:
            result.uncertainty_slices = slice_summaries(result.uncertainty, result.slice_axis, result.factor,
                                                        result.labels)
    write_image(result.image, output_path)
    if uncertainty_path is not None:
        write_image(result.uncertainty, uncertainty_path)
    if segmentation_path is not None:
        write_image(result.labels, segmentation_path)
    return result
