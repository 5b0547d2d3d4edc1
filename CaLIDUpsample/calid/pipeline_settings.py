"""A model's pipeline settings: what shapes its slices besides its weights.

Two value objects, stored in the model card beside the networks' config:

* ``MotionSettings``: how a motion-aware model finds the motion between two acquired neighbours (the optical-flow
  estimator, the in-plane views it is averaged over, its smoothing along the stack; ``calid.motion``).
* ``LastStep``: how its final slices are mixed from the latent estimate, the morph and the cross-fade (the morph
  weight, the space it is averaged in, and the per-gap table that overrides that weight: ``calid.gap_mix``).

Why apart from the networks (``calid.networks.CaLID``): they change without training, as a diffusers pipeline's
scheduler settings do. The bundled models took 8 flow views, the smoothing along the stack and the per-gap last step
with their weights unchanged (docs/measurements.md); each was chosen by measuring the slices, not by a gradient. As
frozen dataclasses a change is a new value (``dataclasses.replace``), checked once when it is made, and written to
the card in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import motion
from .choices import FLOW_METHODS, MORPH_MIX_SPACES
from .gap_mix import GapMix


@dataclass(frozen=True)
class MotionSettings:
    """The flow a motion-aware model warps its neighbours along (``calid.motion``): the estimator, the number of
    in-plane views it is averaged over (``motion.VIEWS``) and the weight of its smoothing along the stack."""

    flow: str
    views: int = 1
    smooth: float = 0.0

    def __post_init__(self):
        if self.flow not in FLOW_METHODS:
            raise ValueError(f"the flow must be one of {FLOW_METHODS}, not {self.flow!r}")
        motion.check_views(self.views)
        motion.check_smoothing(self.smooth)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> MotionSettings:
        """A card's ``"motion"``; cards written before views or smoothing existed mean one view, no smoothing."""
        return cls(cfg.get("flow"), cfg.get("views", 1), float(cfg.get("smooth") or 0.0))

    def to_config(self) -> dict[str, Any]:
        """The card's form: ``"smooth"`` only where the flows are smoothed, as the cards before it had none."""
        cfg: dict[str, Any] = {"flow": self.flow, "views": self.views}
        if self.smooth:
            cfg["smooth"] = self.smooth
        return cfg

    def flows(self, stacks: np.ndarray) -> torch.Tensor:
        """The flow of every gap of stacks (phases, n, h, w), phase-major (``motion.motion_flows``)."""
        return motion.motion_flows(stacks, self.flow, self.views, self.smooth)

    def morph_missing(self, kept: np.ndarray, factor: int) -> np.ndarray:
        """The optical-flow morph of a stack (n, h, w) on these flows: its missing slices at factor K."""
        return motion.morph_missing(kept, factor, self.flow, self.views, self.smooth)


PRODUCT_MORPH = MotionSettings("dis-fine", len(motion.VIEWS), 0.15)
"""The product's own morph (``--method morph``, the demo's picture): the bundled models' flow settings (a test keeps
them equal), so that a user comparing methods sees the morph the models build on. The evaluation's peer stays the
protocol's one TV-L1 flow, unsmoothed."""


@dataclass(frozen=True)
class LastStep:
    """How a motion-aware model's final slices are mixed (``calid.generation``): ``(1 - linear) * mix + linear * L``,
    where ``mix`` is the latent estimate averaged with its partner by the morph weight, in ``space``, and ``L`` the
    cross-fade of the acquired neighbours. The weight and the linear share come from ``gap_mix`` at the gap's size
    where the model has one, else ``morph_mix`` at every gap and no linear share.

    The spaces: ``"pixel"`` averages the estimate with the morph pixel by pixel; ``"shape"`` in shape space
    (``motion.shape_average``: one wall where the two put it in different places); ``"aligned"`` with the warped
    neighbours carried onto the estimate (``motion.carried_onto``): the acquired slices' own sharp pixels where the
    estimate puts the walls, what both bundled models use since stop 32 (docs/measurements.md).

    Why fixed weights and not learned ones: the latent estimate and the morph are about equally good on unseen
    patients and wrong in different ways (soft walls; sharp walls misplaced where the flow fails), and no trained
    refiner beat the fixed mix on the segmenter's Dice of unseen patients (docs/measurements.md).
    """

    morph_mix: float = 0.0
    space: str = "pixel"
    gap_mix: GapMix | None = None

    def __post_init__(self):
        if not 0.0 <= self.morph_mix <= 1.0:
            raise ValueError(f"the morph mix weight must lie in [0, 1], not {self.morph_mix}")
        if self.space not in MORPH_MIX_SPACES:
            raise ValueError(f"the morph mix space must be one of {MORPH_MIX_SPACES}, not {self.space!r}")

    @property
    def needs_motion(self) -> bool:
        """Whether the step names anything of the warped neighbours, which only a motion-aware model has."""
        return bool(self.morph_mix) or self.gap_mix is not None or self.space != "pixel"

    def at(self, gap_mm: float | None) -> tuple[float, float]:
        """(morph weight, linear share) at a gap of ``gap_mm`` between the acquired neighbours (None: a step
        without a per-gap table)."""
        return (self.morph_mix, 0.0) if self.gap_mix is None else self.gap_mix.at(gap_mm)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LastStep:
        """From a model config's ``"morph_mix"``, ``"morph_mix_space"`` and ``"gap_mix"`` (each may be absent)."""
        gap_mix = config.get("gap_mix")
        return cls(float(config.get("morph_mix") or 0.0), config.get("morph_mix_space", "pixel"),
                   None if gap_mix is None else GapMix.from_config(gap_mix))

    def write_to(self, config: dict[str, Any]) -> None:
        """Into a model config, in the cards' form: ``"morph_mix_space"`` only when not ``"pixel"`` and
        ``"gap_mix"`` only when set, as cards written before either existed."""
        config["morph_mix"] = self.morph_mix
        config.pop("morph_mix_space", None)
        config.pop("gap_mix", None)
        if self.space != "pixel":
            config["morph_mix_space"] = self.space
        if self.gap_mix is not None:
            config["gap_mix"] = self.gap_mix.to_config()
