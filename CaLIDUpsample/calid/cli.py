"""The ``calid`` command line: upsample, segment, volumes, models, devices, train, evaluate, train-segmentation,
evaluate-segmentation (and ``standby`` for the Slicer modules).

Errors the user can fix end in one line on stderr and exit code 2; a cancel (Ctrl-C or SIGTERM, which is
what the Slicer module sends first) exits with 130 and leaves no output behind. Set ``CALID_DEBUG=1`` to see
tracebacks of unexpected failures.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import traceback
from dataclasses import fields
from pathlib import Path

from . import __version__
from .choices import (CINE_NOISE, FLOW_METHODS, MORPH_MIX_SPACES, PROGRESS_MODES, REFINER_KINDS, REFINER_LOSSES,
                      UPSAMPLE_METHODS)
from .errors import CalidError, Cancelled
from .modelindex import DEFAULT_MODEL
from .segmentation.config import SegTrainConfig
from .training.config import TrainConfig

EXIT_ERROR = 2
EXIT_CANCELLED = 130


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Cancelled()


def _add_upsample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upsample", help="upsample a SAX stack (file, DICOM folder, folder or list of inputs)")
    p.add_argument("input", help="volume file, DICOM series folder, or a folder / list file of inputs (cohort)")
    p.add_argument("output", help="output file (format from its suffix), DICOM folder, or output folder (cohort)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--factor", type=int, help="integer upsampling factor K >= 2 (default 2)")
    size.add_argument("--spacing", type=float, help="target slice spacing in mm (K is chosen so spacing <= this)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the model's own, from its card; 8 if it has none)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same output (default 0)")
    p.add_argument("--model", help=f"bundled/user model name or model directory (default: {DEFAULT_MODEL})")
    p.add_argument("--method", choices=UPSAMPLE_METHODS, default="calid",
                   help="calid (the model, default), or for comparison on your scan: morph (optical-flow morph of the "
                        "neighbours) or linear interpolation")
    p.add_argument("--samples", type=int, default=1, help="average this many samples (default 1)")
    p.add_argument("--uncertainty", help="write the model's calibrated uncertainty map here: the expected absolute "
                                         "error of every voxel, in the input's intensity units (0 on acquired slices)")
    p.add_argument("--plus", action="store_true", help="CaLID+: start from the slerp of the neighbours' inverted latents")
    p.add_argument("--slice-axis", type=int, choices=(0, 1, 2), help="slice axis (default: largest spacing)")
    p.add_argument("--progress", choices=PROGRESS_MODES, default=None,
                   help="progress output (default: bar on a terminal, none otherwise)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    p.add_argument("--batch-size", type=int, help="slices per batch (default: from free memory)")
    p.add_argument("--cine-noise", choices=CINE_NOISE, default="shared",
                   help="cine input: same starting noise for a slice position in every phase (default, less flicker) "
                        "or independent per phase")
    p.add_argument("--csv", help="cohort mode: where to write the CSV report (default OUTPUT/calid_cohort.csv)")
    p.add_argument("--segmentation", help="also write labels on the dense grid here (1 RV, 2 LV myocardium, 3 LV cavity; "
                                          "the new slices segmented in their sharp rendition, which the network reads "
                                          "best; a cine phase by phase, with ejection fractions over the cycle)")
    p.add_argument("--input-segmentation", help="your labels of the acquired slices: kept exactly, new slices filled")
    p.add_argument("--segmentation-model", help="segmentation model name or directory (default: the bundled one)")


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment a SAX volume: 1 RV cavity, 2 LV myocardium, 3 LV cavity")
    p.add_argument("input", help="volume file or DICOM series folder")
    p.add_argument("output", help="label volume file (same grid and geometry as the input)")
    p.add_argument("--model", help="segmentation model name or directory (default: the bundled one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--slice-axis", type=int, choices=(0, 1, 2))
    p.add_argument("--threads", type=int)
    e = sub.add_parser("evaluate-segmentation", help="Dice/HD95 on acquired slices and on removed slices (K)")
    e.add_argument("data", nargs="+", help="folders of SAX volumes with label files beside them")
    e.add_argument("--output", required=True, help="folder for segmentation_results.json and .md")
    e.add_argument("--model", help="interpolation model (default: bundled)")
    e.add_argument("--segmentation-model", help="segmentation model (default: bundled)")
    e.add_argument("--factor", type=_bounded("factor", int), action="append", help="K (repeatable; default 2)")
    e.add_argument("--patients", help="split.json or model card (its validation patients), or comma-separated ids")
    e.add_argument("--shape-mm", type=float, action="append", help="shape weights of --input-segmentation to compare")
    e.add_argument("--device", default="auto")
    e.add_argument("--threads", type=int)
    e.add_argument("--progress", choices=PROGRESS_MODES, default=None)
    v = sub.add_parser("volumes", help="structure volumes (mL) of a label volume; ejection fractions from ED and ES")
    v.add_argument("labels", help="label volume (end-diastole when a second one is given)")
    v.add_argument("end_systole", nargs="?", help="end-systole label volume: adds stroke volumes and ejection fractions")


BOUNDS = {
    **dict.fromkeys(("vae_steps", "denoiser_steps", "refiner_steps", "error_head_steps", "warmup", "min_timestep"),
                    (lambda v: v >= 0, "0 or more")),
    **dict.fromkeys(("steps", "vae_batch", "denoiser_batch", "batch", "val_every", "val_volumes", "log_every",
                     "checkpoint_every"), (lambda v: v >= 1, "at least 1")),
    "factor": (lambda v: v >= 2, "at least 2"),
    "crop": (lambda v: v >= 32, "at least 32"),
    "lr": (lambda v: v > 0, "positive"),
    **dict.fromkeys(("ema_decay", "val_fraction"), (lambda v: 0 <= v < 1, "from 0 to below 1")),
}
"""What each numeric option of the training and evaluation commands accepts. Out of range, a value was trained with
(a negative step count exported the base model as a new one) or failed deep inside as an internal error."""


def _bounded(name: str, kind: type):
    """An argparse ``type`` for option ``name``: ``kind`` (int or float) within ``BOUNDS[name]``."""
    accepts, wording = BOUNDS.get(name, (lambda v: True, ""))

    def parse(text: str):
        value = kind(text)
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {wording}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def _widths(text: str) -> list[int]:
    """``--denoiser-channels``: comma-separated positive whole numbers."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) <= 0:
        raise argparse.ArgumentTypeError(f"give positive whole numbers separated by commas, such as 64,128,256, not {text!r}")
    return widths


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model, or fine-tune one with --init")
    p.add_argument("data", nargs="*", help="folders of SAX volumes (labels are ignored); or --pack")
    p.add_argument("--pack", help="read the training and validation stacks and their split from this pack "
                                  "(calid.training.pack: loads without SimpleITK, for a lent GPU machine)")
    p.add_argument("--flows-up-front", action="store_true",
                   help="motion-aware models: estimate every training pair's flow in parallel (--threads) before "
                        "the first step, instead of as batches draw them (a GPU would wait for them)")
    p.add_argument("--no-recalibrate", dest="recalibrate", action="store_false",
                   help="leave a kept error head's calibration as it is, for a later run to refit (a lent GPU's "
                        "minutes go to training; calid train DATA --init MODEL --denoiser-steps 0 --motion FLOW "
                        "refits it)")
    p.add_argument("--output", required=True, help="run folder: checkpoint, metrics, curves and model/")
    p.add_argument("--init", help="start from this model (fine-tuning: the VAE is kept, the denoiser tuned)")
    p.add_argument("--preset", default="default", help="architecture preset for new models: default or tiny")
    p.add_argument("--name", default="calid-model", help="model name written in the model card")
    p.add_argument("--description", default="")
    p.add_argument("--data-source", default="", help="what the model card names as the training data (default: "
                   "the data folders' paths)")
    p.add_argument("--data-terms", default="as stated by the data owner", help="terms of the training data")
    p.add_argument("--citation", default="", help="citation required by the training data")
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for name, text in (
        ("vae_steps", "VAE training steps"), ("denoiser_steps", "denoiser steps"),
        ("refiner_steps", "pixel-space refiner steps after the denoiser (motion-aware models)"),
        ("error_head_steps", "error-head steps last: the calibrated uncertainty map (motion-aware models)"),
        ("vae_batch", "VAE batch size"),
        ("denoiser_batch", "denoiser batch size"), ("lr", "peak learning rate"), ("warmup", "warm-up steps"),
        ("ema_decay", "EMA decay"), ("min_timestep", "lowest diffusion timestep trained"),
        ("val_fraction", "share of validation patients"),
        ("val_every", "validate every N steps"), ("val_volumes", "validation stacks used"),
        ("log_every", "log metrics every N steps"), ("checkpoint_every", "checkpoint every N steps"), ("seed", "random seed"),
    ):
        default = defaults[name]
        p.add_argument("--" + name.replace("_", "-"), type=_bounded(name, type(default)), default=default,
                       help=f"{text} (default {default})")
    p.add_argument("--denoiser-channels", type=_widths, metavar="C1,C2,C3",
                   help="train a new denoiser (tau_theta1, tau_theta2 and U-Net) with these widths per level; with "
                        "--init on that model's VAE, motion and last step (a larger denoiser; the default preset's "
                        "is 32,64,128)")
    p.add_argument("--denoiser-minutes", type=float,
                   help="end the denoiser stage after this many minutes of it and export its weights as they are "
                        "(the card records the steps trained); the learning rate follows --denoiser-steps")
    p.add_argument("--split", help="JSON file with 'train' and 'validation' patient lists")
    p.add_argument("--refiner-loss", choices=REFINER_LOSSES, default="mse",
                   help="the refiner's loss (default mse; l1+ssim adds 0.5 x (1 - SSIM); l1+ssim+seg also the bundled "
                        "segmenter's consistency between refined and real slices)")
    p.add_argument("--refiner-kind", choices=REFINER_KINDS, default="residual",
                   help="a new refiner's design: residual (a correction added to the estimate) or synthesis (the "
                        "slice rebuilt from the neighbours' pixels along corrected flows, mixed with the estimate)")
    p.add_argument("--morph-mix", type=float,
                   help="average the final slices with the optical-flow morph by this weight in [0, 1] (motion-aware "
                        "models; default: as the --init model). An error head not retrained is recalibrated")
    p.add_argument("--refiner-thin-weight", type=float, default=1.0,
                   help="draw the refiner's and the error head's examples from thin-slice stacks (<= 6 mm) this many "
                        "times as often")
    p.add_argument("--motion", choices=FLOW_METHODS,
                   help="make the model motion-aware: condition on the neighbours warped along this optical flow "
                        "(dis-fine: DIS refined to full resolution; default: as the --init model, else not). A "
                        "motion-aware --init model keeps its flow views and smoothing; an error head not retrained "
                        "is recalibrated")
    p.add_argument("--flow-smooth", type=float,
                   help="average each gap's optical flow with its neighbouring gaps' along the stack by this weight "
                        "in [0, 0.5) (motion-aware models; default: as the --init model, else 0). An error head not "
                        "retrained is recalibrated")
    p.add_argument("--morph-mix-space", choices=MORPH_MIX_SPACES,
                   help="average with the morph pixel by pixel, in shape space along a flow between the two, or "
                        "(aligned) with the warped neighbours carried onto the model's slices (default: as the --init "
                        "model, else pixel). An error head not retrained is recalibrated")
    p.add_argument("--gap-mix", metavar="GAP_MM:MORPH:LINEAR,...",
                   help="set the last step per gap between acquired slices (motion-aware models; default: as the "
                        "--init model): at each gap knot, the morph mix weight and the share of the linear cross-fade, "
                        "both in [0, 1], linear in the gap between knots, e.g. 10:0.8:0.2,20:0.5:0. --morph-mix "
                        "replaces it with one weight. An error head not retrained is recalibrated")
    p.add_argument("--flow-views", type=int,
                   help="average each gap's optical flow over this many in-plane orientations of the pair, 1 to 8 "
                        "(motion-aware models; default: as the --init model, else 1). An error head not retrained is "
                        "recalibrated")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --output where it stopped")
    p.add_argument("--progress", choices=PROGRESS_MODES, default=None)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="removed-slice evaluation against the optical-flow morph, linear and B-spline")
    p.add_argument("data", nargs="+", help="folders of SAX volumes (labels beside them define the heart region)")
    p.add_argument("--output", required=True, help="folder for results.json and results.md")
    p.add_argument("--model", help="model name or directory (default: bundled)")
    p.add_argument("--factor", type=_bounded("factor", int), action="append",
                   help="K to evaluate (repeatable; default 2)")
    p.add_argument("--patients", help="split.json or model card (its validation patients), or comma-separated patient ids")
    p.add_argument("--max-spacing", type=float, help="only stacks with slice spacing <= this (mm)")
    p.add_argument("--min-spacing", type=float, help="only stacks with slice spacing >= this (mm)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the model's own)")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--plus", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--montage", action="store_true", help="PNG of the best and worst cases")
    p.add_argument("--uncertainty", action="store_true",
                   help="also judge the model's uncertainty map against the actual errors (reliability table and PNG)")
    p.add_argument("--progress", choices=PROGRESS_MODES, default=None)


def _add_train_segmentation(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-segmentation", help="train the segmentation network on labelled SAX volumes")
    p.add_argument("data", nargs="+", help="folders of SAX volumes with label files beside them (_gt, _seg, _label)")
    p.add_argument("--output", required=True, help="run folder: checkpoint, metrics and model/")
    p.add_argument("--split", help="split.json or model card whose patient split to use (same as the interpolation model)")
    p.add_argument("--preset", default="default", help="default or tiny")
    p.add_argument("--init", help="start from this segmentation model (continue training or fine-tune)")
    p.add_argument("--name", default="calid-segmentation", help="model name written in the model card")
    p.add_argument("--data-terms", default="as stated by the data owner", help="terms of the training data")
    p.add_argument("--citation", default="", help="citation required by the training data")
    defaults = {f.name: f.default for f in fields(SegTrainConfig)}
    for name in ("steps", "batch", "crop", "lr", "warmup", "val_every", "log_every", "checkpoint_every", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=_bounded(name, type(defaults[name])),
                       default=defaults[name], help=f"(default {defaults[name]})")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --output where it stopped")
    p.add_argument("--progress", choices=PROGRESS_MODES, default=None)


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad argument is one line, ``calid: error: ...``, and exit code 2, like every other error; argparse printed
    the whole usage block before it. Sub-commands' parsers are of the same class (argparse makes them so)."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"calid: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="calid", description="CaLID: cardiac latent interpolation diffusion")
    parser.add_argument("--version", action="version", version=f"calid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_upsample(sub)
    models = sub.add_parser("models", help="list bundled and user models")
    models.add_argument("--json", action="store_true")
    sub.add_parser("devices", help="print the torch build and usable devices as JSON")
    _add_train(sub)
    _add_evaluate(sub)
    _add_train_segmentation(sub)
    _add_segment(sub)
    standby = sub.add_parser("standby", help="import the engine now, then run the calid arguments written to FILE "
                                              "(a JSON list; used by the Slicer modules)")
    standby.add_argument("--command-file", required=True, metavar="FILE",
                         help="the file to wait for (write it elsewhere, then rename it)")
    standby.add_argument("--idle-minutes", type=float, default=60.0,
                         help="exit when nothing arrives for this long, or as soon as FILE's folder is removed "
                              "(default 60)")
    return parser


def _progress_mode(requested: str | None) -> str:
    return requested or ("bar" if sys.stderr.isatty() else "none")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise CalidError(f"--threads must be positive, not {threads}")
        import torch

        torch.set_num_threads(threads)


def cmd_upsample(args: argparse.Namespace) -> int:
    from .cohort import is_cohort_input, run_cohort
    from .engine import UpsampleOptions, upsample_file
    from .progress import Progress
    from .uncertainty import UNIT as UNCERTAINTY_UNIT

    _set_threads(args.threads)
    options = UpsampleOptions(factor=args.factor, spacing=args.spacing, steps=args.steps, seed=args.seed,
                              samples=args.samples, plus=args.plus, slice_axis=args.slice_axis,
                              device=args.device, model=args.model, batch_size=args.batch_size,
                              cine_noise=args.cine_noise, method=args.method)
    options.check()
    mode = _progress_mode(args.progress)
    source = Path(args.input)
    if is_cohort_input(source):
        if args.uncertainty or args.segmentation or args.input_segmentation:
            raise CalidError("--uncertainty and segmentations apply to a single input, not to a cohort")
        from .imageio import has_image_suffix, series_folders_below

        if has_image_suffix(args.output):  # it was made a folder of that name
            below = series_folders_below(source) if source.is_dir() else []
            nested = f"; its sub-folders hold DICOM series ({', '.join(below)}): give one of them" if below else ""
            raise CalidError(f"{source} is a cohort (a folder of inputs or a list): give an output folder, not "
                             f"the file {args.output}{nested}")
        failures = run_cohort(source, Path(args.output), options, mode, Path(args.csv) if args.csv else None)
        return 1 if failures else 0
    progress = Progress(mode, subject=source.name)  # the bar reads "<input>: <stage>"
    try:
        from .cine import input_warning
        from .imageio import warn_if_dicom_by_typo

        warning = input_warning(source, args.slice_axis)  # an isotropic volume is upsampled too: say so first
        if warning:
            progress.warning(warning)
        for path in (args.output, args.uncertainty, args.segmentation):
            warn_if_dicom_by_typo(path, progress.warning)
        result = upsample_file(source, args.output, options, args.uncertainty, progress=progress,
                               segmentation_path=args.segmentation, input_segmentation_path=args.input_segmentation,
                               segmentation_model=args.segmentation_model)
    finally:
        progress.close()
    summary = {"output": str(args.output), "uncertainty": args.uncertainty, "factor": result.factor,
               "slice_axis": result.slice_axis, "size": list(result.image.GetSize()),
               "spacing": list(result.image.GetSpacing()), "device": result.device,
               "seconds": round(result.seconds, 2)}
    if result.labels is not None:
        summary.update(segmentation=str(args.segmentation), volumes=result.volumes)
    if result.uncertainty_slices is not None:
        summary.update(uncertainty_unit=UNCERTAINTY_UNIT, uncertainty_slices=result.uncertainty_slices)
    if mode == "json":
        print(json.dumps({"event": "done", **summary}), flush=True)
    else:
        print(f"wrote {args.output}: {summary['size']} voxels, slice spacing "
              f"{result.image.GetSpacing()[result.slice_axis]:g} mm (x{result.factor}) in {summary['seconds']} s on {result.device}",
              file=sys.stderr)
        if result.volumes is not None:
            print(json.dumps({"segmentation": str(args.segmentation), "volumes": result.volumes}))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .devices import resolve_device
    from .imageio import (LABELS_DESCRIPTION, check_outputs, dicom_identity, read_image, refuse_label_map,
                          run_identity, validate_volume, warn_if_dicom_by_typo, write_image)
    from .segmentation.inference import segment_image
    from .segmentation.measures import absence_warning, structure_volumes
    from .segmentation.store import load_segmenter

    _set_threads(args.threads)
    check_outputs([args.output], [args.input])  # before the model is loaded and the volume segmented
    warn_if_dicom_by_typo(args.output, lambda text: print(f"calid: warning: {text}", file=sys.stderr))
    source = read_image(args.input)
    image = refuse_label_map(validate_volume(source), args.input)
    device = resolve_device(args.device)
    network, card = load_segmenter(args.model, device)
    labels = segment_image(image, network, card["config"], device, args.slice_axis)
    write_image(labels, args.output, identity=run_identity(dicom_identity(source)), description=LABELS_DESCRIPTION)
    volumes = structure_volumes(labels)
    absent = absence_warning(volumes)
    if absent:
        print(f"calid: warning: {absent}", file=sys.stderr)
    print(json.dumps({"output": str(args.output), "volumes": volumes}))
    return 0


def cmd_evaluate_segmentation(args: argparse.Namespace) -> int:
    from .segmentation.evaluation import SegEvaluateConfig, evaluate_segmentation
    from .segmentation.pipeline import DEFAULT_SHAPE_MM

    _set_threads(args.threads)
    cfg = SegEvaluateConfig(data=args.data, output=args.output, model=args.model,
                            segmentation_model=args.segmentation_model, factors=args.factor or [2],
                            patients=args.patients, shape_mm=args.shape_mm or [DEFAULT_SHAPE_MM], device=args.device)
    print(evaluate_segmentation(cfg, _progress_mode(args.progress)))
    return 0


def cmd_volumes(args: argparse.Namespace) -> int:
    from .imageio import read_image, validate_volume
    from .segmentation.measures import absence_warning, ejection_fractions, structure_volumes
    from .segmentation.sparse import check_labels

    phases = {"end_diastole" if args.end_systole else "volumes": args.labels}
    if args.end_systole:
        phases["end_systole"] = args.end_systole
    if args.end_systole and Path(args.end_systole).resolve() == Path(args.labels).resolve():
        raise CalidError(f"{args.labels} is given as both end diastole and end systole: give each phase's labels")
    read = {}
    for phase, path in phases.items():  # every file checked before anything is measured or said
        labels = validate_volume(read_image(path), str(path))  # 3D only: a 4D label file is refused here
        # end systole on end diastole's grid: another grid (another scan, another patient) gave a fraction anyway
        first = next(iter(read.values()), labels)
        check_labels(labels, first, source=str(path), reference="the end-diastole labels")
        read[phase] = labels
    report = {}
    for (phase, path), labels in zip(phases.items(), read.values()):
        report[phase] = structure_volumes(labels)
        absent = absence_warning(report[phase])
        if absent:
            print(f"calid: warning: {path}: {absent}", file=sys.stderr)
    if args.end_systole:
        fractions, problems = ejection_fractions(report["end_diastole"], report["end_systole"])
        report.update(fractions)
        for problem in problems:
            print(f"calid: warning: {problem}", file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .modelindex import INTERPOLATION_FORMAT, SEGMENTATION_FORMAT, list_models, unreadable_models, user_models_dir

    models = [{**m, "kind": kind} for kind, card_format in (("interpolation", INTERPOLATION_FORMAT),
                                                           ("segmentation", SEGMENTATION_FORMAT))
              for m in list_models(card_format)]  # the segmentation models too: `segment --model NAME` takes them
    for broken in unreadable_models():
        print(f"calid: skipped {broken['path']}: {broken['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    for m in models:
        print(f"{m['name']:<24} {m['kind']:<14} {m['source']:<8} {m['path']}")
    print(f"(user models folder: {user_models_dir()})")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:  # noqa: ARG001
    from .devices import describe_devices

    print(json.dumps(describe_devices()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.trainer import train

    _set_threads(args.threads)
    cfg = TrainConfig(
        data=args.data, output=args.output, preset=args.preset, init=args.init, vae_steps=args.vae_steps,
        denoiser_steps=args.denoiser_steps, refiner_steps=args.refiner_steps, vae_batch=args.vae_batch,
        denoiser_channels=args.denoiser_channels, denoiser_minutes=args.denoiser_minutes,
        denoiser_batch=args.denoiser_batch, refiner_loss=args.refiner_loss, refiner_kind=args.refiner_kind,
        refiner_thin_weight=args.refiner_thin_weight, morph_mix=args.morph_mix, flow_views=args.flow_views,
        flow_smooth=args.flow_smooth, morph_mix_space=args.morph_mix_space, gap_mix=args.gap_mix,
        error_head_steps=args.error_head_steps,
        lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay, min_timestep=args.min_timestep, motion=args.motion,
        val_fraction=args.val_fraction, split=args.split, pack=args.pack, flows_up_front=args.flows_up_front,
        recalibrate=args.recalibrate,
        val_every=args.val_every, val_volumes=args.val_volumes, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device, resume=args.resume,
        name=args.name, description=args.description, data_source=args.data_source, data_terms=args.data_terms,
        citation=args.citation,
    )
    model_dir = train(cfg, _progress_mode(args.progress))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, the process that wrote the model says so, once
        return 0
    if args.progress == "json":
        print(json.dumps({"event": "done", "model": str(model_dir)}), flush=True)
    else:
        print(f"model written to {model_dir}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import EvaluateConfig, evaluate

    _set_threads(args.threads)
    cfg = EvaluateConfig(data=args.data, output=args.output, model=args.model, factors=args.factor or [2],
                         patients=args.patients, max_spacing=args.max_spacing, min_spacing=args.min_spacing,
                         steps=args.steps, samples=args.samples, plus=args.plus, seed=args.seed, device=args.device,
                         montage=args.montage, uncertainty=args.uncertainty)
    table = evaluate(cfg, _progress_mode(args.progress))
    print(table)
    return 0


def cmd_train_segmentation(args: argparse.Namespace) -> int:
    from .segmentation.training import train_segmentation

    _set_threads(args.threads)
    names = {f.name for f in fields(SegTrainConfig)} - {"extra"}
    cfg = SegTrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    model_dir = train_segmentation(cfg, _progress_mode(args.progress))
    print(f"segmentation model written to {model_dir}", file=sys.stderr)
    return 0


def cmd_standby(args: argparse.Namespace) -> int:
    from .standby import READY_EVENT, preload, wait_for_command

    if not args.idle_minutes > 0:
        raise CalidError(f"--idle-minutes must be positive, not {args.idle_minutes}")
    preload()
    print(json.dumps(READY_EVENT), flush=True)
    argv = wait_for_command(Path(args.command_file), args.idle_minutes)
    return 0 if argv is None else main(argv)


COMMANDS = {"upsample": cmd_upsample, "models": cmd_models, "devices": cmd_devices, "train": cmd_train,
            "evaluate": cmd_evaluate,
            "train-segmentation": cmd_train_segmentation, "segment": cmd_segment, "volumes": cmd_volumes,
            "evaluate-segmentation": cmd_evaluate_segmentation, "standby": cmd_standby}


def _tolerate_narrow_consoles() -> None:
    """A C/POSIX locale console cannot print the tables' ± or mm³: escape such characters, never crash."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _internal_error(exc: Exception) -> int:
    """An unexpected failure: one line, the traceback only on request."""
    if os.environ.get("CALID_DEBUG"):
        traceback.print_exc()
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    print(f"calid: internal error: {type(exc).__name__}: {message} (set CALID_DEBUG=1 for details)", file=sys.stderr)
    return 1


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (``poll`` reports an error on its end; a broken pipe
    elsewhere, such as a worker's, is an internal error). If so, standard output is pointed at the null device, so
    that the interpreter's own flush at exit does not fail again."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poller.poll(0)):
            return False
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
        return True
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no file behind sys.stdout
        return False


def main(argv: list[str] | None = None) -> int:
    _tolerate_narrow_consoles()
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except CalidError as exc:
        print(f"calid: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, Cancelled):
        print("calid: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except BrokenPipeError as exc:
        if not _stdout_closed():
            return _internal_error(exc)
        return 1  # the reader stopped reading (`calid models --json | head`): nothing more to say
    except Exception as exc:  # noqa: BLE001
        return _internal_error(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
