"""The learning-rate schedule both trainers (``calid train`` and ``calid train-segmentation``) follow."""

from __future__ import annotations

import math


def warmup_cosine(warmup: int, total: int):
    """The factor of the learning rate at each step: a linear warm-up, then a cosine down to a tenth at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor
