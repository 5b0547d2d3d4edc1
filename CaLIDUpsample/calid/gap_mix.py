"""The last step of a motion-aware model's slices, set per gap: how much of the morph and of linear they take.

A motion-aware model's final slices are ``(1 - linear) * mix + linear * L``, where ``mix`` is the model's slice
averaged with the optical-flow morph by the weight ``morph`` (``pipeline_settings.LastStep``, in pixel, shape or
aligned space) and ``L`` the linear cross-fade of the two acquired neighbours. Both weights are read off a table of
gap sizes (the distance between the two acquired neighbours, in mm): linear in the gap between its knots, constant
beyond the first and last.

Why per gap: the best last step is not the same at every gap (``Testing/Benchmarks/thin_gap_tradeoff.py``,
docs/measurements.md "The 10 mm gap"). At 10 mm gaps, chosen on the training patients, more of the morph (0.8:
walls where the flow puts them, for the segmenter) and a fifth of the cross-fade (it hedges a wall's position, for
PSNR) beat the one weight 0.5 on both; at 20 mm gaps the same choice loses on every figure and 0.5 alone stays best
(on 54 training stacks with 20 mm gaps, stop 30, no other weight or share of the cross-fade keeps the Dice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GapMix:
    """Knots ``gaps_mm`` (increasing) with the morph weight and the linear share at each, all in [0, 1]."""

    gaps_mm: tuple[float, ...]
    morph: tuple[float, ...]
    linear: tuple[float, ...]

    def __post_init__(self):
        if not self.gaps_mm or not len(self.gaps_mm) == len(self.morph) == len(self.linear):
            raise ValueError("a gap mix needs one morph weight and one linear share at each gap knot, and a knot")
        if any(b <= a for a, b in zip(self.gaps_mm, self.gaps_mm[1:])) or self.gaps_mm[0] <= 0:
            raise ValueError(f"the gap knots must be positive and increasing, not {list(self.gaps_mm)}")
        for name, values in (("morph weight", self.morph), ("linear share", self.linear)):
            if any(not 0.0 <= v <= 1.0 for v in values):
                raise ValueError(f"every {name} must lie in [0, 1], not {list(values)}")

    def at(self, gap_mm: float) -> tuple[float, float]:
        """(morph weight, linear share) at a gap of ``gap_mm``."""
        return (float(np.interp(gap_mm, self.gaps_mm, self.morph)),
                float(np.interp(gap_mm, self.gaps_mm, self.linear)))

    @classmethod
    def parse(cls, text: str) -> GapMix:
        """From the command line's ``GAP:MORPH:LINEAR,...``, e.g. ``10:0.8:0.2,20:0.5:0``."""
        try:
            knots = sorted(tuple(float(v) for v in part.split(":")) for part in text.split(","))
        except ValueError:
            knots = [()]
        if any(len(knot) != 3 for knot in knots):
            raise ValueError(f"expected GAP_MM:MORPH:LINEAR[,...] such as 10:0.8:0.2,20:0.5:0, not {text!r}")
        return cls(*zip(*knots))

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> GapMix:
        return cls(*(tuple(float(v) for v in cfg[key]) for key in ("gaps_mm", "morph", "linear")))

    def to_config(self) -> dict[str, list[float]]:
        return {"gaps_mm": list(self.gaps_mm), "morph": list(self.morph), "linear": list(self.linear)}
