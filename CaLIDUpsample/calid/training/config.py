"""Settings of a training run (no torch import: the command line reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    data: list[str]
    output: str
    preset: str = "default"
    init: str | None = None
    vae_steps: int = 2000
    denoiser_steps: int = 2200
    refiner_steps: int = 0  # > 0: then train the pixel-space refiner (motion-aware models) for this many steps
    refiner_loss: str = "mse"  # one of calid.choices.REFINER_LOSSES (calid.training.losses)
    refiner_kind: str = "residual"  # one of calid.choices.REFINER_KINDS: a new refiner's design (calid.networks.REFINERS)
    refiner_thin_weight: float = 1.0  # draw thin-slice stacks' examples this many times as often
    morph_mix: float | None = None  # set the model's morph mix (calid.pipeline_settings.LastStep); None: keep it
    error_head_steps: int = 0  # > 0: then train the error head behind the calibrated uncertainty map (motion-aware)
    denoiser_channels: list[int] | None = None  # a new, untrained denoiser of these widths (with init: on its VAE)
    denoiser_minutes: float | None = None  # end the denoiser stage after this many minutes of it
    vae_batch: int = 16
    denoiser_batch: int = 32
    vae_crop: int = 96
    latent_crop: int = 32
    lr: float = 2e-4
    warmup: int = 100
    ema_decay: float = 0.998
    motion: str | None = None  # "dis", "dis-fine" or "tvl1": make the model motion-aware (calid.motion) before training
    flow_views: int | None = None  # average each flow over this many in-plane views (calid.motion); None: keep it
    flow_smooth: float | None = None  # smooth each gap's flow along the stack by this weight (calid.motion); None: keep
    morph_mix_space: str | None = None  # "pixel", "shape" or "aligned" (calid.pipeline_settings.LastStep); None: keep
    gap_mix: str | None = None  # per-gap last step "GAP_MM:MORPH:LINEAR,..." (calid.gap_mix); None: keep it
    min_timestep: int = 0  # > 0: train the denoiser only where a few-step sampler asks it (see sampling)
    val_fraction: float = 0.15
    split: str | None = None
    pack: str | None = None  # read the stacks and split from this pack (calid.training.pack) instead of ``data``
    flows_up_front: bool = False  # motion-aware: estimate every training flow in parallel before the first step
    recalibrate: bool = True  # refit a kept error head's calibration on changed slices (False: leave it for later)
    val_every: int = 550
    val_volumes: int = 4
    log_every: int = 25
    checkpoint_every: int = 250
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    name: str = "calid-model"
    description: str = ""
    data_source: str = ""  # what the card names as its training data (default: the data folders' paths)
    data_terms: str = "as stated by the data owner"
    citation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
