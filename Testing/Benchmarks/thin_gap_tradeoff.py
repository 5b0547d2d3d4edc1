#!/usr/bin/env python3
"""What the clinical 10 mm gap trades: heart PSNR against the segmenter's Dice, for ways of combining the slices the
bundled model already makes.

    python Testing/Benchmarks/thin_gap_tradeoff.py [--data ../shared/data/acdc/training] [--model calid-acdc]
        [--threads 2]

Every ACDC patient with 5 mm slices that the model's card names, in two groups: its validation patients and its
training patients (choose on the second, report on the first). Per stack, K=2 (10 mm gaps, the removed-slice
protocol of ``calid evaluate``): the model's slices with its bundled settings (its last step at a 10 mm gap,
``LastStep.at``), its latent estimate before that step, its own morph (``GapItems``: the flow it conditions
on), the TV-L1 morph, linear and cubic B-spline interpolation (``calid evaluate``'s peers), and variants of the last
step made of the same parts:

- the shape-space mix with the morph at several weights (``motion.shape_average``; 0.5 was the bundled step before
  it was set per gap, ``calid.gap_mix``);
- the aligned mix: the estimate averaged with the warped neighbours carried onto it (``motion.carried_onto``; the
  bundled step since stop 32), at a few weights and shares of the cross-fade;
- a share of the linear cross-fade blended in, whole or only its detail (above a Gaussian of 1.5 px);
- a slight Gaussian blur of the mix;
- the sharp rendition (``generation.RENDITIONS``: the partner alone, what ``--segmentation`` segments) and the
  bundled step's difference from it kept only below 1 px (the hedge split by frequency).

Scores: heart-box PSNR and SSIM (``calid.metrics.slice_scores``) and the mean Dice of the bundled segmenter on the
removed slices of the stack in which they are replaced (``calid evaluate-segmentation``'s "network on ..." rows).
The model's slices are made in process exactly as ``upsample_image`` makes them (one intensity map per stack,
rounded to the input's integers). Not a test: it prints one Markdown table per group.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CaLIDUpsample"))

from calid import geometry, motion  # noqa: E402
from calid.evaluation import PEER_FLOW, bspline_on_grid  # noqa: E402
from calid.imageio import find_labels  # noqa: E402
from calid.generation import (RENDITIONS, GapItems, default_steps, generate_missing_phases,  # noqa: E402
                              generate_renditions)
from calid.intensity import IntensityMap  # noqa: E402
from calid.metrics import heart_box, linear_missing, slice_scores  # noqa: E402
from calid.modelindex import ACDC_MODEL  # noqa: E402
from calid.segmentation.inference import labels_from_probabilities, predict_probabilities  # noqa: E402
from calid.segmentation.scores import label_scores  # noqa: E402
from calid.segmentation.store import load_segmenter  # noqa: E402
from calid.training.data import find_volumes  # noqa: E402
from calid.training.duplicates import leaked  # noqa: E402
from benchmark_cli import model_or_error  # noqa: E402

FACTOR = 2
THIN_MM = 5.5  # stacks at most this far apart: the 5 mm ACDC stacks, whose removed slices lie 10 mm apart
GAP_MM = 10.0  # the gap between the kept slices: what the model's last step is set by


def components(model, kept: np.ndarray) -> dict[str, np.ndarray]:
    """The model's slices for the missing positions of ``kept`` (n, h, w), scanner units: ``final`` (bundled
    settings, the volume's balanced rendition), ``sharp`` (the sharp rendition ``--segmentation`` reads,
    ``generation.RENDITIONS``), ``estimate`` (before the last step), ``morph`` (its own flow, the shape mix's other
    half) and ``aligned`` (the warped neighbours carried onto the estimate, the aligned mix's other half)."""
    intensity = IntensityMap.fit(kept[None])
    stacks = intensity.to_network(kept[None])
    steps = default_steps(model)
    gaps = GapItems(model, stacks, FACTOR, 1)
    renditions = generate_renditions(model, stacks, FACTOR, steps, flows=gaps.flows, gap_mm=GAP_MM,
                                     renditions=RENDITIONS)
    estimate = generate_missing_phases(model, stacks, FACTOR, steps, flows=gaps.flows, refine=False)[0, 0]
    parts = {"final": renditions["balanced"][0, 0], "sharp": renditions["sharp"][0, 0], "estimate": estimate,
             "morph": gaps.morph(), "aligned": gaps.carried_onto(estimate)[0]}
    return {name: intensity.from_network(x) for name, x in parts.items()}


def variants(kept: np.ndarray, bspline: np.ndarray, parts: dict[str, np.ndarray], bundled: str,
             flow: str) -> dict[str, np.ndarray]:
    """Every row of the table for one stack: the peers (``bspline``: its removed slices, made on the image grid), the
    model's parts and the variants of its last step (``bundled``: the title of the model's own)."""
    linear = linear_missing(kept, FACTOR)
    rows = {
        "linear": linear,
        "cubic B-spline": bspline,
        "TV-L1 morph (the protocol's peer)": motion.morph_missing(kept, FACTOR, PEER_FLOW),
        "the model's own morph": parts["morph"],
        "the model's latent estimate, before the last step": parts["estimate"],
    }
    mixes = {weight: motion.shape_average(parts["estimate"].astype(np.float32), parts["morph"].astype(np.float32),
                                          weight, flow) for weight in (0.5, 0.65, 0.8)}
    for weight, mixed in mixes.items():
        rows[f"shape-space mix, weight {weight:g}"] = mixed
    for share in (0.1, 0.2):
        rows[f"mix 0.5 + linear cross-fade, share {share:g}"] = (1 - share) * mixes[0.5] + share * linear
    # Both directions at once: the mix toward the morph (Dice up) and a share of the cross-fade (PSNR up).
    rows["mix 0.8 + linear cross-fade, share 0.2"] = 0.8 * mixes[0.8] + 0.2 * linear
    crossfade_detail = (linear - mixes[0.5]) - gaussian_filter(linear - mixes[0.5], (0, 1.5, 1.5))
    rows["mix 0.5 + the cross-fade's detail (above 1.5 px), share 0.2"] = mixes[0.5] + 0.2 * crossfade_detail
    rows["mix 0.5, Gaussian blur 0.5 px"] = gaussian_filter(mixes[0.5], (0, 0.5, 0.5))
    for weight, share in ((1.0, 0.0), (0.8, 0.0), (0.8, 0.1), (0.8, 0.2), (0.5, 0.1)):
        aligned = parts["estimate"] + weight * (parts["aligned"] - parts["estimate"])
        name = f"aligned mix, weight {weight:g} + linear cross-fade, share {share:g}"
        rows[name] = aligned + share * (linear - aligned)
    rows[bundled] = parts["final"]
    rows["the sharp rendition (what --segmentation segments)"] = parts["sharp"]
    # The hedge split by frequency: the sharp rendition's edges, the balanced one's low frequencies (stop 37).
    rows["sharp rendition + the bundled step's difference from it below 1 px (Gaussian)"] = (
        parts["sharp"] + gaussian_filter(parts["final"] - parts["sharp"], (0, 1.0, 1.0)))
    return {name: np.rint(x) for name, x in rows.items()}  # the product writes the input's integer type


def dice(segmenter, real: np.ndarray, missing: np.ndarray, truth: np.ndarray, inplane) -> float:
    """The segmenter's mean Dice (RV, myocardium, LV cavity) on the removed slices of ``real`` replaced by
    ``missing``."""
    network, card = segmenter
    stack = real.copy()
    stack[1::FACTOR] = missing
    labels = labels_from_probabilities(predict_probabilities(network, card["config"], stack, inplane, "cpu"))
    return label_scores(labels[1::FACTOR], truth[1::FACTOR], None, hd95=False)["dice_mean"]


def score_stack(image: sitk.Image, labels_path: Path, model, segmenter, bundled: str,
                flow: str) -> dict[str, tuple[float, float, float]]:
    axis = geometry.find_slice_axis(image)
    real = geometry.to_stack(sitk.GetArrayFromImage(image), axis).astype(np.float32)
    truth = geometry.to_stack(sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path))), axis)
    m = (real.shape[0] - 1) // FACTOR * FACTOR + 1
    real, truth = real[:m], truth[:m]
    kept, removed, box = real[::FACTOR], real[1::FACTOR], heart_box(truth > 0)
    inplane = geometry.inplane_spacing(image, axis)
    index = [slice(None)] * 3
    index[axis] = slice(0, m)
    reference = image[tuple(index)]
    index[axis] = slice(0, m, FACTOR)
    bspline = geometry.to_stack(bspline_on_grid(image[tuple(index)], reference), axis)[1::FACTOR]
    with torch.no_grad():
        rows = variants(kept, bspline, components(model, kept), bundled, flow)
    return {name: (*slice_scores(removed, x, real, box), dice(segmenter, real, x, truth, inplane))
            for name, x in rows.items()}


def table(title: str, scores: dict[str, list[tuple[float, float, float]]], stacks: int) -> str:
    lines = [f"{title} ({stacks} stacks, K=2, 10 mm gaps)", "",
             "| slices | heart PSNR dB | heart SSIM | segmenter Dice |", "|---|---|---|---|"]
    for name, values in scores.items():
        psnr, ssim, dice_mean = np.mean(values, axis=0)
        lines.append(f"| {name} | {psnr:.3f} | {ssim:.4f} | {dice_mean:.4f} |")
    return "\n".join(lines)


def command_line(description: str) -> tuple[argparse.ArgumentParser, argparse.Namespace, object, dict]:
    """The options the in-process ACDC benchmarks share (--data, --model, --threads), parsed, and the model they
    name, loaded on the CPU: (parser, args, model, card)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "acdc" / "training")
    parser.add_argument("--model", default=ACDC_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.data.is_dir():
        parser.error(f"--data {args.data} is not a folder (ACDC's training folder, patientNNN below it)")
    torch.set_num_threads(args.threads)
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    model, card = model_or_error(parser, args.model)
    model.eval()
    return parser, args, model, card


def main() -> None:
    parser, args, model, card = command_line(__doc__.splitlines()[0])
    if model.motion is None or model.last_step.space == "pixel":
        parser.error(f"{args.model} does not mix with the morph in shape or aligned space: this benchmark varies "
                     "that mix")
    weight, share = model.last_step.at(GAP_MM)
    bundled = (f"bundled: {model.last_step.space} mix {weight:g} + linear cross-fade, share {share:g} "
               "(its 10 mm setting)")
    split = card["training"]["split"]
    entries = find_volumes([str(args.data)])
    left_out = leaked(split, entries)  # a validation patient whose scans a training patient holds too
    validation = set(split["validation"])
    segmenter = load_segmenter(None, "cpu")
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, int] = defaultdict(int)
    for patient, path in entries:
        image, labels_path = sitk.ReadImage(str(path)), find_labels(Path(path))
        if image.GetSpacing()[geometry.find_slice_axis(image)] > THIN_MM or labels_path is None or patient in left_out:
            continue
        group = "validation" if patient in validation else "training"
        for name, values in score_stack(image, labels_path, model, segmenter, bundled,
                                        model.motion.flow).items():
            groups[group][name].append(values)
        counts[group] += 1
        print(f"{Path(path).name}: done", file=sys.stderr, flush=True)
    if left_out:
        print(f"left out, copies of training patients' scans: {', '.join(sorted(left_out))}\n")
    for group in ("training", "validation"):
        if counts[group]:
            print(table(f"{args.model}, its {group} patients with 5 mm slices", groups[group], counts[group]) + "\n")


if __name__ == "__main__":
    main()
