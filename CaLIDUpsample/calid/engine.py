"""Upsampling short-axis images: checks, files and geometry around the generation of new slices.

One pipeline serves volumes and cines: a volume is a one-phase cine. ``upsample_image`` (3D) and ``upsample_cine``
(4D, ``calid.cine`` reads and writes them) check the input and its options (``UpsampleOptions``, from
``calid.stack_upsampling``), load the model, hand the stacks to ``stack_upsampling.new_slices`` (every missing slice
of every phase by ``--method``, batched, a long cine in parts of its phases, with one intensity map) and put the new
slices on the dense grid
with the input's geometry; ``upsample_file`` reads and writes. Acquired slices are copied from the input array
unchanged; only the missing ones are generated.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry, slice_positions
from .cine import Cine, check_cine_output, phase_of, read_input, write_cine
from .devices import for_inference, resolve_device
from .errors import CalidError
from .generation import default_steps, require_error_head
from .imageio import (DICOM_DESCRIPTION, LABELS_DESCRIPTION, MAP_DESCRIPTION, check_direction, check_outputs,
                      check_pixels, dicom_identity, read_image, refuse_label_map, remove_output, run_identity,
                      validate_volume, write_image)
from .modelstore import load_model
from .networks import CaLID
from .progress import Progress
from .sampling import max_sampling_steps
from .stack_upsampling import UpsampleOptions, new_slices
from .uncertainty import slice_summaries


@dataclass
class UpsampleResult:
    image: sitk.Image
    uncertainty: sitk.Image | None
    factor: int
    slice_axis: int
    seconds: float
    device: str
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


def dense_stack(acquired: np.ndarray, generated: np.ndarray, factor: int, dtype: np.dtype) -> np.ndarray:
    """Interleave acquired slices (n, h, w), unchanged, with generated ones ((n-1)*(K-1), h, w) cast to ``dtype``."""
    n = acquired.shape[0]
    dense = np.empty((slice_positions.dense_count(n, factor), *acquired.shape[1:]), dtype=dtype)
    dense[::factor] = acquired
    dense[slice_positions.generated_slices(n, factor)] = _cast_like(generated, dtype)
    return dense


def _upsample_phases(image: sitk.Image, phases: np.ndarray, options: UpsampleOptions, model: CaLID | None,
                     progress: Progress | None, want_uncertainty: bool, want_sharp: bool = False) -> UpsampleResult:
    """The one pipeline: ``phases`` (t, z, y, x) of ``image`` (3D: one phase; 4D: a cine) onto the dense grid.

    One intensity map is fitted on all phases (they stay comparable) and the phases go through a batched generation
    (``stack_upsampling.new_slices``); the result has ``image``'s dimension, pixel type, origin and direction.
    """
    started = time.perf_counter()
    axis, factor, device, model, steps = prepare_run(image, options, model, want_uncertainty)
    stacks = np.stack([geometry.to_stack(phase, axis) for phase in phases])
    new = new_slices(stacks, options, model, factor, steps, device, image.GetSpacing()[axis], progress,
                     want_uncertainty, want_sharp)

    def dense_image(acquired: np.ndarray, generated: np.ndarray, dtype: np.dtype) -> sitk.Image:
        dense = None  # filled phase by phase: stacking a list of them held the whole cine twice
        for t in range(len(acquired)):
            phase = geometry.from_stack(dense_stack(acquired[t], generated[t], factor, dtype), axis)
            if dense is None:
                dense = np.empty((len(acquired), *phase.shape), dtype)
            dense[t] = phase
        return geometry.dense_image(dense if image.GetDimension() == 4 else dense[0], image, axis, factor)

    result = dense_image(stacks, new.balanced, phases.dtype)
    uncertainty = None if new.error is None else dense_image(np.zeros_like(stacks, np.float32), new.error, np.float32)
    sharp = None if new.sharp is None else dense_image(stacks, new.sharp, phases.dtype)
    done = time.perf_counter()
    return UpsampleResult(result, uncertainty, factor, axis, done - started, str(device),
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
    image = refuse_label_map(validate_volume(image))
    return _upsample_phases(image, sitk.GetArrayFromImage(image)[None], options or UpsampleOptions(), model,
                            progress, want_uncertainty, want_sharp)


def upsample_cine(cine: Cine, options: UpsampleOptions | None = None, model: CaLID | None = None,
                  progress: Progress | None = None, want_uncertainty: bool = False,
                  want_sharp: bool = False) -> UpsampleResult:
    """Every phase on the dense grid (4D image, time axis kept), the phases generated batched together (a long
    cine in parts of them: ``stack_upsampling.phase_parts``).

    Acquired slices of every phase are copied unchanged; ``options.cine_noise`` picks shared or independent
    starting noise across phases. ``want_uncertainty`` and ``want_sharp`` as for ``upsample_image``, per phase.
    """
    check_direction(cine.image)
    image = refuse_label_map(check_pixels(cine.image))
    return _upsample_phases(image, sitk.GetArrayFromImage(image), options or UpsampleOptions(), model, progress,
                            want_uncertainty, want_sharp)


def _load_segmenter(options: UpsampleOptions | None, name: str | None) -> tuple[torch.nn.Module, dict, torch.device]:
    """The segmentation network, its card and the device it runs on (``--device``, as the upsampling's)."""
    from .segmentation.store import load_segmenter

    device = resolve_device(options.device if options else "auto")
    return (*load_segmenter(name, device), device)


def _reserve_segmentation(progress: Progress | None, image: sitk.Image, options: UpsampleOptions | None) -> None:
    """Count the dense slices that the segmentation will read (a unit each, ``_segment_phase``) on ``progress``
    before the generation sets its own total, so that the bar is not full while every phase is still segmented."""
    if progress is None:
        return
    options = options or UpsampleOptions()
    axis = geometry.find_slice_axis(image, options.slice_axis)
    factor = geometry.resolve_factor(image, axis, options.factor, options.spacing)
    phases = image.GetSize()[3] if image.GetDimension() == 4 else 1
    progress.reserve(phases * slice_positions.dense_count(image.GetSize()[axis], factor))


def _segment_phase(result: UpsampleResult, sharp: sitk.Image, segmenter: tuple, sparse: np.ndarray | None = None,
                   progress: Progress | None = None) -> sitk.Image:
    """Labels of one dense volume, found on the sharp rendition of its new slices (``sharp``, 3D); its slices
    advance ``progress`` (``_reserve_segmentation``)."""
    from .segmentation.pipeline import segment_dense

    if progress is not None:
        progress.set_stage("segmenting")
    network, card, device = segmenter
    labels = segment_dense(sharp, result.slice_axis, result.factor, network, card, sparse_labels=sparse, device=device)
    if progress is not None:
        progress.advance(sharp.GetSize()[result.slice_axis])
    return labels


def upsample_cine_file(cine: Cine, output_path: str | os.PathLike, options: UpsampleOptions | None = None,
                       uncertainty_path: str | os.PathLike | None = None, model: CaLID | None = None,
                       progress: Progress | None = None, segmentation_path: str | os.PathLike | None = None,
                       segmentation_model: str | None = None) -> UpsampleResult:
    """Upsample a cine read by ``read_input`` and write it (and its uncertainty) in the output's form.

    ``segmentation_path``: every phase's dense volume segmented as a single volume is (on the sharp rendition of
    its new slices), the labels written as one 4D file (``cine.check_cine_output``), and ``result.volumes`` the
    volumes of every phase with each ventricle's end diastole, end systole and ejection fraction over the cycle
    (``segmentation.measures.cycle_volumes``). Everything is computed before the first output is written.
    """
    from .segmentation.measures import cycle_volumes, structure_volumes

    for path, labels in ((output_path, False), (uncertainty_path, False), (segmentation_path, True)):
        if path is not None:
            check_cine_output(path, labels)
    segmenter = None if segmentation_path is None else _load_segmenter(options, segmentation_model)
    if segmenter is not None:
        _reserve_segmentation(progress, cine.image, options)
    result = upsample_cine(cine, options, model, progress, want_uncertainty=uncertainty_path is not None,
                           want_sharp=segmenter is not None)
    if segmenter is not None:
        phases = [_segment_phase(result, phase_of(result.sharp_image, t), segmenter, progress=progress)
                  for t in range(result.sharp_image.GetSize()[3])]
        result.labels = sitk.JoinSeries(phases)
        result.labels.CopyInformation(result.image)
        result.volumes, problems = cycle_volumes([structure_volumes(labels) for labels in phases],
                                                    cine.times_ms)
        for problem in problems:
            (progress or Progress("none")).warning(problem)
        if result.uncertainty is not None:  # now with each phase's heart
            result.uncertainty_slices = slice_summaries(result.uncertainty, result.slice_axis, result.factor,
                                                        result.labels)
    identity = run_identity(cine.identity)
    write_outputs(_outputs(result, output_path, uncertainty_path, segmentation_path),
                  lambda image, path, description: write_cine(image, cine, path, identity, description))
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
    the dense grid and written in the same form (``calid.cine``), its labels too (``upsample_cine_file``).
    """
    if input_segmentation_path is not None and segmentation_path is None:
        raise CalidError("--input-segmentation needs --segmentation (where to write the dense labels)")
    check_outputs((output_path, uncertainty_path, segmentation_path), (input_path, input_segmentation_path))
    source = read_input(input_path)
    if isinstance(source, Cine):
        if input_segmentation_path is not None:
            raise CalidError("--input-segmentation is for a single volume, not a cine: give --segmentation alone")
        return upsample_cine_file(source, output_path, options, uncertainty_path, model, progress, segmentation_path,
                                  segmentation_model)
    image = source
    sparse = None
    if input_segmentation_path is not None:
        from .segmentation.sparse import check_labels

        sparse = check_labels(read_image(input_segmentation_path), validate_volume(image))
    segmenter = None if segmentation_path is None else _load_segmenter(options, segmentation_model)
    if segmenter is not None:
        _reserve_segmentation(progress, image, options)
    result = upsample_image(image, options, model, progress, want_uncertainty=uncertainty_path is not None,
                            want_sharp=segmenter is not None)
    if segmenter is not None:
        from .segmentation.measures import absence_warning, structure_volumes

        result.labels = _segment_phase(result, result.sharp_image, segmenter, sparse, progress)
        result.volumes = structure_volumes(result.labels)
        absent = absence_warning(result.volumes)
        if absent:
            (progress or Progress("none")).warning(absent)
        if result.uncertainty is not None:
            result.uncertainty_slices = slice_summaries(result.uncertainty, result.slice_axis, result.factor,
                                                        result.labels)
    identity = run_identity(dicom_identity(image))
    write_outputs(_outputs(result, output_path, uncertainty_path, segmentation_path),
                  lambda image, path, description: write_image(image, path, identity=identity,
                                                               description=description))
    return result


def _outputs(result: UpsampleResult, output_path, uncertainty_path, segmentation_path) -> list[tuple]:
    """A run's (image, path, DICOM series description) for ``write_outputs`` (the map was named like the volume)."""
    return [(result.image, output_path, DICOM_DESCRIPTION), (result.uncertainty, uncertainty_path, MAP_DESCRIPTION),
            (result.labels, segmentation_path, LABELS_DESCRIPTION)]


def write_outputs(outputs: list[tuple[sitk.Image | None, str | os.PathLike | None, str]],
                  write: Callable[[sitk.Image, str | os.PathLike, str], Path]) -> None:
    """Write a run's outputs (those with a path) in turn, each with its DICOM series description; should one fail
    (a full disk, a path no check could foresee), remove those already written, so that a failed run leaves no part
    of its result. (A file that was there before and was overwritten is gone then too: its old content was lost when
    it was overwritten.)"""
    written = []
    try:
        for image, path, description in outputs:
            if path is not None:
                write(image, path, description)
                written.append(path)
    except BaseException:
        for path in written:
            remove_output(path)
        raise
