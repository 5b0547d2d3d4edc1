"""CaLID against a peer volume by volume: the mean of the paired differences, its standard error, and on how many
volumes CaLID scored higher.

Why paired: the volumes of an evaluation differ far more from each other than the methods do (heart PSNR from 16
to 25 dB on the ACDC validation stacks, the methods within 1 dB on each), so two means with their spreads across
volumes cannot say whether one method is ahead; the spread of the per-volume differences can. An issue's target
("PSNR >= morph + 0.3 dB", "Dice >= the morph's") is then read beside the uncertainty of the figure it is judged on.
"""

from __future__ import annotations

import math

import numpy as np


def paired_difference(ours: list[float], theirs: list[float]) -> dict[str, float | int]:
    """``mean`` of ``ours - theirs`` (pairs in the same order), ``sem`` its standard error (NaN for one pair),
    ``wins``: pairs where ours is higher, ``volumes``: pairs."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired scores need two equal, non-empty lists, not {len(ours)} and {len(theirs)}")
    d = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    sem = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return {"mean": float(d.mean()), "sem": sem, "wins": int((d > 0).sum()), "volumes": len(d)}


def describe(p: dict[str, float | int], digits: int = 3) -> str:
    """``+0.327 ± 0.038 (8/8)``: mean ± standard error (volumes where ours is higher / volumes)."""
    sem = "–" if math.isnan(p["sem"]) else f"{p['sem']:.{digits}f}"
    return f"{p['mean']:+.{digits}f} ± {sem} ({p['wins']}/{p['volumes']})"
