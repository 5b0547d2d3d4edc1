#!/usr/bin/env python3
"""Does the bundled segmentation model work on another vendor's scans? Dice on the 5 Sunnybrook cines (GE).

    python Testing/Benchmarks/segment_sunnybrook.py [--data ../shared/data/sunnybrook] [--threads 2] [--removed-slices]

``calid-seg-acdc`` was trained on ACDC (Siemens) only; Sunnybrook's expert contours (CC0) were never seen. Every
contoured frame of each cine is segmented as a 3D volume (``calid segment``'s own code path) and scored on the
contoured slices only, since the experts drew some slices and frames and no right ventricle: LV cavity where a
blood-pool contour exists (Sunnybrook label 1, ours 3), LV myocardium where an epicardial contour exists (label 2,
both). Dice is pooled over the contoured slices of a frame, then averaged over frames, then over patients. Not a
test: it prints a table.

``--removed-slices``: the removed-slice protocol instead, as ``calid evaluate-segmentation`` runs it on ACDC: every
other slice of each contoured frame removed, rebuilt by ``calid-acdc`` (which never saw Sunnybrook) and by the peers,
and the network scored on the removed contoured slices only: on the model's volume, on its sharp rendition (what
``--segmentation`` segments), on the TV-L1 morph, on linear and on cubic B-spline interpolation, and on the real
slices.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CaLIDUpsample"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from calid import geometry, slice_positions  # noqa: E402
from calid.cine import phase_of  # noqa: E402
from calid.engine import UpsampleOptions, upsample_image  # noqa: E402
from calid.evaluation import protocol_images  # noqa: E402
from calid.modelstore import load_model  # noqa: E402
from calid.segmentation.evaluation import peer_stacks  # noqa: E402
from calid.segmentation.inference import labels_from_probabilities, predict_probabilities, segment_image  # noqa: E402
from calid.segmentation.store import load_segmenter  # noqa: E402
from benchmark_cli import sunnybrook_cines  # noqa: E402

SUNNYBROOK_TO_OURS = {1: 3, 2: 2}
"""Sunnybrook contour label -> our label (1 LV blood pool -> 3 LV cavity, 2 LV myocardium -> 2)."""


def dice_on_contoured_slices(labels: np.ndarray, contours: np.ndarray, theirs: int) -> float | None:
    """Dice of one structure over the slices (first axis) where the experts drew it; None where they drew none."""
    drawn = [z for z in range(contours.shape[0]) if (contours[z] == theirs).any()]
    if not drawn:
        return None
    truth, prediction = contours[drawn] == theirs, labels[drawn] == SUNNYBROOK_TO_OURS[theirs]
    return 2.0 * float((truth & prediction).sum()) / float(truth.sum() + prediction.sum())


def score_cine(path: Path, network, config) -> dict[str, list[float]]:
    cine = sitk.ReadImage(str(path))
    contours = sitk.GetArrayFromImage(sitk.ReadImage(str(path).replace("_sa_cine.", "_sa_cine_contours.")))
    scores: dict[str, list[float]] = {"lv": [], "myo": []}
    for t in range(cine.GetSize()[3]):
        if not contours[t].any():
            continue
        labels = sitk.GetArrayFromImage(segment_image(phase_of(cine, t), network, config))
        for name, theirs in (("lv", 1), ("myo", 2)):
            value = dice_on_contoured_slices(labels, contours[t], theirs)
            if value is not None:
                scores[name].append(value)
    return scores


REBUILT = ("CaLID volume", "CaLID sharp (--segmentation)", "morph", "linear", "B-spline", "real slices")


def rebuilt_stacks(image: sitk.Image, model) -> dict[str, np.ndarray]:
    """One frame (3D, slices along the last ITK axis) with every other slice removed and rebuilt by each of
    ``REBUILT``, (slices, rows, cols), cut to an odd number of slices."""
    stack = sitk.GetArrayFromImage(image).astype(np.float32)  # slices first: the slice axis is ITK's last
    m = slice_positions.protocol_count(stack.shape[0], 2)
    real_image, kept_image = protocol_images(image, 2, m, 2)
    result = upsample_image(kept_image, UpsampleOptions(factor=2, device="cpu"), model, want_sharp=True)
    peers = peer_stacks(stack, kept_image, real_image, 2, 2)
    stacks = {REBUILT[0]: sitk.GetArrayFromImage(result.image), REBUILT[1]: sitk.GetArrayFromImage(result.sharp_image),
              REBUILT[2]: peers["morph"], REBUILT[3]: peers["linear"], REBUILT[4]: peers["bspline"],
              REBUILT[5]: stack[:m]}
    return {name: x.astype(np.float32) for name, x in stacks.items()}


def score_removed_slices(path: Path, network, config, model) -> dict[tuple[str, str], list[float]]:
    """Per (rebuilt stack, structure), the Dice of each contoured frame on its removed contoured slices."""
    cine = sitk.ReadImage(str(path))
    contours = sitk.GetArrayFromImage(sitk.ReadImage(str(path).replace("_sa_cine.", "_sa_cine_contours.")))
    scores: dict[tuple[str, str], list[float]] = {}
    for t in range(cine.GetSize()[3]):
        if not contours[t].any():
            continue
        image = phase_of(cine, t)
        if geometry.find_slice_axis(image) != 2:
            raise SystemExit(f"{path.name}: slices are not along the last axis")
        stacks = rebuilt_stacks(image, model)
        removed = contours[t][:len(stacks["real slices"])].copy()
        removed[0::2] = 0  # the acquired slices are not scored
        spacing = geometry.inplane_spacing(image, 2)
        for name, stack in stacks.items():
            labels = labels_from_probabilities(predict_probabilities(network, config, stack, spacing, "cpu"))
            for structure, theirs in (("lv", 1), ("myo", 2)):
                value = dice_on_contoured_slices(labels, removed, theirs)
                if value is not None:
                    scores.setdefault((name, structure), []).append(value)
    return scores


def removed_slices_table(cases: list[Path], network, config) -> None:
    model, _ = load_model("calid-acdc", torch.device("cpu"))
    print("| patient | " + " | ".join(f"{name} LV / myo" for name in REBUILT) + " |\n|---|" + "---|" * len(REBUILT))
    means: dict[tuple[str, str], list[float]] = {}
    for path in cases:
        scores = score_removed_slices(path, network, config, model)
        for key, values in scores.items():
            means.setdefault(key, []).append(statistics.mean(values))
        print(f"| {path.name.split('_')[0]} | " + " | ".join(_lv_myo(scores, n) for n in REBUILT) + " |")
    print("| **mean** | " + " | ".join(f"**{_lv_myo(means, n)}**" for n in REBUILT) + " |")


def _lv_myo(scores: dict[tuple[str, str], list[float]], name: str) -> str:
    return f"{statistics.mean(scores[name, 'lv']):.3f} / {statistics.mean(scores[name, 'myo']):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sunnybrook")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--removed-slices", action="store_true",
                        help="the removed-slice protocol with calid-acdc and the peers (module docstring)")
    args = parser.parse_args()
    cases = sunnybrook_cines(parser, args.data)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    network, card = load_segmenter(None, "cpu")
    if args.removed_slices:
        removed_slices_table(cases, network, card["config"])
        return
    print("| patient | frames (LV / myo) | Dice LV cavity | Dice LV myocardium |\n|---|---|---|---|")
    means: dict[str, list[float]] = {"lv": [], "myo": []}
    for path in cases:
        scores = score_cine(path, network, card["config"])
        for name in means:
            means[name].append(statistics.mean(scores[name]))
        print(f"| {path.name.split('_')[0]} | {len(scores['lv'])} / {len(scores['myo'])} | "
              f"{means['lv'][-1]:.3f} | {means['myo'][-1]:.3f} |")
    print(f"| **mean** | | **{statistics.mean(means['lv']):.3f}** | **{statistics.mean(means['myo']):.3f}** |")


if __name__ == "__main__":
    main()
