#!/usr/bin/env python3
"""Where the bundled pipeline's ceiling is: its slices when the latent estimate is replaced by the true one.

    python Testing/Benchmarks/latent_ceiling.py [--data ../shared/data/acdc/training] [--model calid-acdc]
        [--threads 2]

Every validation stack the model's card names (patients whose scans are a training patient's left out, as
``calid evaluate`` does), K=2 (the removed-slice protocol), grouped by the gap between the kept slices (10 mm: 5 mm
stacks, 20 mm: 10 mm stacks). Rows: linear interpolation and the TV-L1 morph (the protocol's peers); the model's
slices (the balanced rendition the volume carries, the sharp one ``--segmentation`` reads, and its latent estimate
before the last step); the same three with the **oracle latent**, the VAE encoding of the real removed slice put in
place of what the denoiser makes (everything after it, the decoder, the detail transfer along the flows and the last
step, unchanged); the same three with **no residual**, the denoiser's output replaced by zero (the latent is then
the blend of the warped neighbours' latents it diffuses the residual to, and the last step works on that); and the
VAE round trip of the real slice alone. The oracle rows bound what a better denoiser could give in this pipeline, the
no-residual rows show what today's denoiser adds, and the round trip bounds what the VAE lets through. Scores as in ``thin_gap_tradeoff.py``:
heart-box PSNR and SSIM, and the bundled segmenter's mean Dice on the removed slices. Not a test: it prints a
Markdown table per gap.

The oracle and the zero residual are put in by replacing the model's ``from_diffusion`` (the last operation of the
denoising) on this one model object while all of a stack's slices go through one batch; nothing in the product
changes.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CaLIDUpsample"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from calid import geometry, motion  # noqa: E402
from calid.evaluation import PEER_FLOW  # noqa: E402
from calid.imageio import find_labels  # noqa: E402
from calid.generation import GapItems, default_steps, generate_renditions, pad_to_multiple  # noqa: E402
from calid.intensity import IntensityMap  # noqa: E402
from calid.metrics import heart_box, linear_missing, slice_scores  # noqa: E402
from calid.segmentation.store import load_segmenter  # noqa: E402
from calid.training.data import find_volumes  # noqa: E402
from calid.training.duplicates import leaked  # noqa: E402
from thin_gap_tradeoff import command_line, dice  # noqa: E402

FACTOR = 2
ONE_BATCH = 1 << 16  # every missing slice of a stack in one denoiser call, so the oracle lines up with the items


LATENTS = {"model": "model: ", "none": "no residual: ", "oracle": "oracle latent: "}


def model_slices(model, kept: np.ndarray, removed: np.ndarray, gap_mm: float, latent: str) -> dict[str, np.ndarray]:
    """The model's balanced and sharp renditions and its latent estimate for the missing slices of ``kept`` (scanner
    units), from the denoiser's latent (``latent`` "model"), from the blend it adds its residual to ("none"), or from
    the VAE encoding of ``removed`` ("oracle", then also the VAE round trip of ``removed``)."""
    oracle = latent == "oracle"
    intensity = IntensityMap.fit(kept[None])
    stacks = intensity.to_network(kept[None])
    gaps = GapItems(model, stacks, FACTOR, 1)
    steps = default_steps(model)
    if oracle:
        padded, _, _ = pad_to_multiple(intensity.to_network(removed[None]).astype(np.float32), model.spatial_multiple)
        truth = model.encode(torch.from_numpy(padded[0][:, None])).float()
        model.from_diffusion = lambda denoised, *condition: truth
    elif latent == "none":
        residual_to = model.from_diffusion
        model.from_diffusion = lambda denoised, *condition: residual_to(torch.zeros_like(denoised), *condition)
    try:
        renditions = generate_renditions(model, stacks, FACTOR, steps, flows=gaps.flows, gap_mm=gap_mm,
                                         renditions=("balanced", "sharp"), batch_size=ONE_BATCH)
        estimate = generate_renditions(model, stacks, FACTOR, steps, flows=gaps.flows, refine=False,
                                       batch_size=ONE_BATCH)["balanced"]
    finally:
        if latent != "model":
            del model.from_diffusion  # the class's method again
    parts = {"balanced": renditions["balanced"][0, 0], "sharp": renditions["sharp"][0, 0],
             "latent estimate": estimate[0, 0]}
    if oracle:
        parts["VAE round trip of the real slice"] = gaps.crop(model.decode(truth).float())
    return {name: intensity.from_network(x) for name, x in parts.items()}


def score_stack(image: sitk.Image, labels_path: Path, model, segmenter) -> tuple[int, dict[str, tuple]]:
    axis = geometry.find_slice_axis(image)
    spacing = image.GetSpacing()[axis]
    real = geometry.to_stack(sitk.GetArrayFromImage(image), axis).astype(np.float32)
    truth = geometry.to_stack(sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path))), axis)
    m = (real.shape[0] - 1) // FACTOR * FACTOR + 1
    real, truth = real[:m], truth[:m]
    kept, removed, box = real[::FACTOR], real[1::FACTOR], heart_box(truth > 0)
    rows = {"linear": linear_missing(kept, FACTOR), "TV-L1 morph (the protocol's peer)":
            motion.morph_missing(kept, FACTOR, PEER_FLOW)}
    with torch.no_grad():
        for latent, prefix in LATENTS.items():
            for name, x in model_slices(model, kept, removed, spacing * FACTOR, latent).items():
                rows[name if name.startswith("VAE") else prefix + name] = x
    inplane = geometry.inplane_spacing(image, axis)
    return round(spacing * FACTOR), {name: (*slice_scores(removed, np.rint(x), real, box),
                                            dice(segmenter, real, np.rint(x), truth, inplane))
                                     for name, x in rows.items()}


def main() -> None:
    _, args, model, card = command_line(__doc__.splitlines()[0])
    split = card["training"]["split"]
    entries = find_volumes([str(args.data)])
    left_out = leaked(split, entries)
    validation = set(split["validation"]) - set(left_out)
    segmenter = load_segmenter(None, "cpu")
    scores: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for patient, path in entries:
        labels_path = find_labels(Path(path))
        if patient not in validation or labels_path is None:
            continue
        gap, rows = score_stack(sitk.ReadImage(str(path)), labels_path, model, segmenter)
        for name, values in rows.items():
            scores[gap][name].append(values)
        print(f"{Path(path).name}: done", file=sys.stderr, flush=True)
    print(f"{args.model}, validation patients (left out: {', '.join(sorted(left_out)) or 'none'})")
    for gap, rows in sorted(scores.items()):
        print(f"\nK=2, {gap} mm gaps, {len(next(iter(rows.values())))} stacks\n\n"
              "| slices | heart PSNR dB | heart SSIM | segmenter Dice |\n|---|---|---|---|")
        for name, values in rows.items():
            psnr, ssim, dice_mean = np.mean(values, axis=0)
            print(f"| {name} | {psnr:.3f} | {ssim:.4f} | {dice_mean:.4f} |")


if __name__ == "__main__":
    main()
