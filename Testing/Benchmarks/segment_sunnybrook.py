#!/usr/bin/env python3
"""Does the bundled segmentation model work on another vendor's scans? Dice on the 5 Sunnybrook cines (GE).

    python Testing/Benchmarks/segment_sunnybrook.py [--data ../shared/data/sunnybrook] [--threads 2]

``calid-seg-acdc`` was trained on ACDC (Siemens) only; Sunnybrook's expert contours (CC0) were never seen. Every
contoured frame of each cine is segmented as a 3D volume (``calid segment``'s own code path) and scored on the
contoured slices only, since the experts drew some slices and frames and no right ventricle: LV cavity where a
blood-pool contour exists (Sunnybrook label 1, ours 3), LV myocardium where an epicardial contour exists (label 2,
both). Dice is pooled over the contoured slices of a frame, then averaged over frames, then over patients. Not a
test: it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CaLIDUpsample"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from calid.segmentation.inference import segment_image  # noqa: E402
from calid.segmentation.store import load_segmenter  # noqa: E402

SUNNYBROOK_TO_OURS = {1: 3, 2: 2}
"""Sunnybrook contour label -> our label (1 LV blood pool -> 3 LV cavity, 2 LV myocardium -> 2)."""


def frame(image: sitk.Image, t: int) -> sitk.Image:
    size = list(image.GetSize())
    return sitk.Extract(image, [*size[:3], 0], [0, 0, 0, t])


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
        labels = sitk.GetArrayFromImage(segment_image(frame(cine, t), network, config))
        for name, theirs in (("lv", 1), ("myo", 2)):
            value = dice_on_contoured_slices(labels, contours[t], theirs)
            if value is not None:
                scores[name].append(value)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sunnybrook")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    network, card = load_segmenter(None, "cpu")
    print("| patient | frames (LV / myo) | Dice LV cavity | Dice LV myocardium |\n|---|---|---|---|")
    means: dict[str, list[float]] = {"lv": [], "myo": []}
    for path in sorted(args.data.glob("SCD*_sa_cine.nii.gz")):
        scores = score_cine(path, network, card["config"])
        for name in means:
            means[name].append(statistics.mean(scores[name]))
        print(f"| {path.name.split('_')[0]} | {len(scores['lv'])} / {len(scores['myo'])} | "
              f"{means['lv'][-1]:.3f} | {means['myo'][-1]:.3f} |")
    print(f"| **mean** | | **{statistics.mean(means['lv']):.3f}** | **{statistics.mean(means['myo']):.3f}** |")


if __name__ == "__main__":
    main()
