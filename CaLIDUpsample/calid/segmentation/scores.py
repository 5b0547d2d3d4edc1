"""Dice and 95th-percentile Hausdorff distance per structure, with MONAI's metrics, in physical units."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from .labels import LABELS, SHORT_NAMES


def label_scores(prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None,
                 hd95: bool = True) -> dict[str, float]:
    """``dice_rv``, ``dice_myo``, ``dice_lv``, ``dice_mean`` (and ``hd95_*`` in mm) of two label arrays.

    A structure absent from both arrays scores Dice 1 and is left out of HD95 (NaN), as MONAI does not
    define it; present in only one of them, Dice 0 and HD95 NaN.
    """
    classes = max(LABELS) + 1
    pred = one_hot(torch.from_numpy(prediction.astype(np.int64))[None, None], classes)
    real = one_hot(torch.from_numpy(truth.astype(np.int64))[None, None], classes)
    dice = compute_dice(pred, real, include_background=False, ignore_empty=False)[0]
    scores = {f"dice_{SHORT_NAMES[c]}": float(dice[c - 1]) for c in LABELS}
    scores["dice_mean"] = float(np.mean([scores[f"dice_{SHORT_NAMES[c]}"] for c in LABELS]))
    if hd95:
        both = [bool(pred[0, c].any() and real[0, c].any()) for c in range(classes)]
        with warnings.catch_warnings():  # MONAI 1.5 deprecates an argument its own HD95 still passes internally
            warnings.simplefilter("ignore", FutureWarning)
            distance = compute_hausdorff_distance(pred, real, include_background=False, percentile=95,
                                                  spacing=list(spacing) if spacing else None)[0]
        for c in LABELS:
            value = float(distance[c - 1]) if both[c] else math.nan
            scores[f"hd95_{SHORT_NAMES[c]}"] = value if math.isfinite(value) else math.nan
    return scores
