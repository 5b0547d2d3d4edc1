"""CaLID networks, built on MONAI's generative components.

* ``AutoencoderKL`` (MONAI): the 2D KL-VAE, 1 channel -> ``latent_channels`` at 1/4 resolution.
* ``ContextEncoder`` (tau_theta1, hand-written: MONAI has no equivalent): a light convolutional encoder of
  the two acquired neighbour latents, modulated (FiLM) by the fractional position alpha of the target
  slice between them.
* ``ControlNet`` (MONAI, tau_theta2): takes the context map and the noisy latent and returns residuals
  that are added to the denoiser U-Net at every scale of its encoder and at its middle block.
* ``DiffusionModelUNet`` (MONAI, epsilon_theta): the latent denoiser. Its input is the noisy latent
  concatenated with the neighbour latents and an alpha plane, so the context also reaches it directly.

tau_theta1, tau_theta2 and epsilon_theta are trained jointly (single stage), as in the paper.
Everything is described by a plain-dict config stored in the model card, so a model directory is
self-describing and loads without code changes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet, UNet
from torch import nn

from .error_calibration import ErrorCalibration
from .motion import warp
from .pipeline_settings import LastStep, MotionSettings

DEFAULT_CONFIG: dict[str, Any] = {
    "vae": {
        "channels": [16, 32, 64],
        "num_res_blocks": 1,
        # 8 channels at 1/4 resolution: with 4, a VAE trained for minutes on CPU reconstructed ACDC slices
        # at ~22 dB PSNR, worse than a 1.2-pixel Gaussian blur (~25 dB), capping every generated slice.
        "latent_channels": 8,
        "norm_num_groups": 8,
    },
    "denoiser": {
        "channels": [32, 64, 128],
        "num_res_blocks": 1,
        "attention_levels": [False, False, True],
        "num_head_channels": 32,
        "norm_num_groups": 16,
        "context_channels": 32,
    },
    "diffusion": {
        "num_train_timesteps": 1000,
        "schedule": "scaled_linear_beta",
        "beta_start": 0.0015,
        "beta_end": 0.0195,
        "prediction_type": "v_prediction",
    },
    # Latents are divided by this so that they have roughly unit variance (set after VAE training).
    "latent_scale": 1.0,
    # "residual": diffuse the target latent's departure from the linear interpolation of its neighbours'
    # latents, so an untrained denoiser already gives latent-linear interpolation and training only has to
    # learn the correction. The first ACDC model diffused the latent itself ("latent"): after 2200 CPU steps
    # its best (1-step) estimate only matched linear interpolation (18.25 vs 18.31 dB on two 5 mm stacks).
    "diffusion_target": "residual",
}

TINY_CONFIG: dict[str, Any] = {
    "vae": {"channels": [8, 16, 16], "num_res_blocks": 1, "latent_channels": 4, "norm_num_groups": 8},
    "denoiser": {
        "channels": [16, 32, 32],
        "num_res_blocks": 1,
        "attention_levels": [False, False, True],
        "num_head_channels": 16,
        "norm_num_groups": 8,
        "context_channels": 16,
    },
    "diffusion": copy.deepcopy(DEFAULT_CONFIG["diffusion"]),
    "latent_scale": 1.0,
    "diffusion_target": "residual",
}
"""A very small configuration for tests and smoke runs (randomly initialised, fast on CPU)."""

CONFIG_KEYS = ("vae", "denoiser", "diffusion", "latent_scale")
DIFFUSION_TARGETS = ("latent", "residual")


def build_vae(cfg: dict[str, Any]) -> AutoencoderKL:
    """The 2D KL autoencoder: len(channels) levels give 2**(levels-1) downsampling (x4 by default)."""
    v = cfg["vae"]
    levels = len(v["channels"])
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(v["channels"]),
        num_res_blocks=(v["num_res_blocks"],) * levels,
        attention_levels=(False,) * levels,
        latent_channels=v["latent_channels"],
        norm_num_groups=v["norm_num_groups"],
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


class ContextEncoder(nn.Module):
    """tau_theta1: encode the neighbour latents (below, above) and alpha into a context feature map.

    alpha enters through FiLM (a per-channel scale and shift from a small MLP), so the same encoder
    serves any position between the neighbours: x2, x3, x4 or an arbitrary target spacing.
    """

    def __init__(self, latent_channels: int, context_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(2 * latent_channels, context_channels, 3, padding=1)
        self.film = nn.Sequential(nn.Linear(1, context_channels), nn.SiLU(), nn.Linear(context_channels, 2 * context_channels))
        self.body = nn.Sequential(
            nn.SiLU(),
            nn.Conv2d(context_channels, context_channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(context_channels, context_channels, 3, padding=1),
        )

    def forward(self, z_below: torch.Tensor, z_above: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(torch.cat([z_below, z_above], dim=1))
        scale, shift = self.film(alpha.reshape(-1, 1).to(h.dtype)).chunk(2, dim=1)
        h = h * (1 + scale[..., None, None]) + shift[..., None, None]
        return h + self.body(h)


class LatentInterpolator(nn.Module):
    """epsilon_theta with its two conditioning networks; predicts the diffusion target for a latent slice."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        d = cfg["denoiser"]
        lc = cfg["vae"]["latent_channels"]
        levels = len(d["channels"])
        common = dict(
            spatial_dims=2,
            channels=tuple(d["channels"]),
            num_res_blocks=(d["num_res_blocks"],) * levels,
            attention_levels=tuple(d["attention_levels"]),
            num_head_channels=d["num_head_channels"],
            norm_num_groups=d["norm_num_groups"],
        )
        self.context_encoder = ContextEncoder(lc, d["context_channels"])
        self.context_injector = ControlNet(
            in_channels=lc,
            conditioning_embedding_in_channels=d["context_channels"],
            conditioning_embedding_num_channels=(d["context_channels"],),
            **common,
        )
        # Denoiser input: noisy latent, both neighbour latents, alpha plane.
        self.unet = DiffusionModelUNet(in_channels=3 * lc + 1, out_channels=lc, **common)
        self.downsampling = 2 ** (levels - 1)

    def forward(
        self,
        z_t: torch.Tensor,
        timesteps: torch.Tensor,
        z_below: torch.Tensor,
        z_above: torch.Tensor,
        alpha: torch.Tensor,
    ) -> torch.Tensor:
        context = self.context_encoder(z_below, z_above, alpha)
        down_res, mid_res = self.context_injector(x=z_t, timesteps=timesteps, controlnet_cond=context)
        alpha_plane = alpha.reshape(-1, 1, 1, 1).to(z_t.dtype).expand(-1, 1, *z_t.shape[2:])
        x = torch.cat([z_t, z_below, z_above, alpha_plane], dim=1)
        return self.unet(
            x, timesteps, down_block_additional_residuals=down_res, mid_block_additional_residual=mid_res
        )


REFINER_CONFIG: dict[str, Any] = {"channels": [16, 32, 64], "num_res_units": 1, "norm": "batch"}
"""Batch norm for new refiners, as for the error head (``ERROR_HEAD_CONFIG``); configs without "norm" (the first
refiners) keep MONAI's instance norm."""


class Refiner(nn.Module):
    """A light pixel-space stage after decoding: sees the estimate, both warped neighbours and alpha, adds a correction.

    The latent stage works at a quarter of the resolution; walls that the flow put a pixel or two off, and texture
    that the detail transfer carried along, are fixed here, where the warped neighbours are seen at full resolution.
    MONAI's ``UNet``; its correction is scaled by ``gain``, which starts at 0, so an untrained refiner changes nothing.
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        channels = tuple(cfg["channels"])
        self.net = UNet(spatial_dims=2, in_channels=4, out_channels=1, channels=channels,
                        strides=(2,) * (len(channels) - 1), num_res_units=cfg["num_res_units"],
                        norm=cfg.get("norm", "instance"))
        self.gain = nn.Parameter(torch.zeros(()))
        self.multiple = 2 ** (len(channels) - 1)

    def forward(self, estimate: torch.Tensor, warped_below: torch.Tensor, warped_above: torch.Tensor,
                alpha: torch.Tensor) -> torch.Tensor:
        return estimate + self.gain * self.net(_pixel_inputs(estimate, warped_below, warped_above, alpha))


class SynthesisRefiner(nn.Module):
    """A refiner that builds the slice from the neighbours' real pixels, as video-frame interpolation does.

    The residual ``Refiner`` repaints the estimate; it raised the pixels but lowered the segmenter's Dice. This one
    was built to keep the neighbours' sharp walls: the net says, per pixel, how to move each warped neighbour a little
    further (a flow correction in pixels), how to mix the two (``m``, starting at alpha: the morph), how much of that
    sharp mix to take over the estimate (``s``, starting at 1/2) and a small residual (IFRNet and RIFE end the same
    way: two flows, a fusion mask, a residual). Measured on unseen patients (docs/measurements.md): the best pixels
    of any refiner, but a lower Dice still, so no bundled model carries it.

        out = estimate + s * ((1 - m) * below(p + d_below) + m * above(p + d_above) - estimate) + r

    All of the net's output is scaled by ``gain`` (0 at first), so the untrained refiner is the even mix of the
    estimate and the morph.
    """

    OUTPUTS = 7  # d_below (2), d_above (2), m, s, r

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        channels = tuple(cfg["channels"])
        self.net = UNet(spatial_dims=2, in_channels=5, out_channels=self.OUTPUTS, channels=channels,
                        strides=(2,) * (len(channels) - 1), num_res_units=cfg["num_res_units"], norm=cfg["norm"])
        self.gain = nn.Parameter(torch.zeros(()))
        self.multiple = 2 ** (len(channels) - 1)

    def forward(self, estimate: torch.Tensor, warped_below: torch.Tensor, warped_above: torch.Tensor,
                alpha: torch.Tensor) -> torch.Tensor:
        o = self.gain * self.net(_pixel_inputs_and_disagreement(estimate, warped_below, warped_above, alpha))
        below, above = warp(warped_below, o[:, 0:2]), warp(warped_above, o[:, 2:4])
        m = torch.sigmoid(o[:, 4:5] + torch.logit(_plane(alpha, estimate), eps=1e-3))
        s = torch.sigmoid(o[:, 5:6])
        return estimate + s * ((1 - m) * below + m * above - estimate) + o[:, 6:7]


REFINERS = {"residual": Refiner, "synthesis": SynthesisRefiner}
"""The refiner kinds a config may name (``"kind"``; configs without it are the first, residual refiners)."""


def _plane(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per item (N,) as a constant channel shaped like ``like`` (N, 1, H, W)."""
    return values.reshape(-1, 1, 1, 1).to(like.dtype).expand_as(like)


def _pixel_inputs(estimate: torch.Tensor, warped_below: torch.Tensor, warped_above: torch.Tensor,
                  alpha: torch.Tensor) -> torch.Tensor:
    """What the pixel-space stages see: the estimate, both warped neighbours and an alpha plane (N, 4, H, W)."""
    return torch.cat([estimate, warped_below, warped_above, _plane(alpha, estimate)], dim=1)


def _pixel_inputs_and_disagreement(estimate: torch.Tensor, warped_below: torch.Tensor, warped_above: torch.Tensor,
                                   alpha: torch.Tensor) -> torch.Tensor:
    """``_pixel_inputs`` and the warped neighbours' disagreement, large where the flow could not explain the change
    between them (N, 5, H, W)."""
    return torch.cat([_pixel_inputs(estimate, warped_below, warped_above, alpha), (warped_above - warped_below).abs()],
                     dim=1)


ERROR_HEAD_CONFIG: dict[str, Any] = {"channels": [16, 32, 64], "num_res_units": 1, "norm": "batch"}
"""Batch norm, not MONAI's default instance norm: the head is trained on 128-pixel crops near the heart and run on
whole slices, and instance norm's per-image statistics differ between the two (mostly heart vs mostly background):
with it, the head over-predicted the error of its own training slices by 1.4x."""
GAP_UNIT_MM = 10.0  # the gap plane is the distance between the two acquired neighbours in units of 10 mm
MIN_LOG_SCALE, MAX_LOG_SCALE = -9.0, 2.0  # 1e-4 to 7 network units (the range is about [-1, 1])
INITIAL_LOG_SCALE = -2.5  # about the bundled models' mean |error| (0.08-0.13 network units): Adam moves a bias
# ~lr a step, so starting at 0 (b = 1) cost ~1000 steps of the budget just to get there


class ErrorHead(nn.Module):
    """How far off a generated slice is, per pixel: the scale b of a Laplace distribution of its error.

    b is the expected absolute error, so the map it gives is calibrated in intensity units (network units here;
    ``calid.stack_upsampling`` maps them to the input's). Trained on the model's own output for slices removed from the
    training stacks with the Laplace negative log-likelihood (``laplace_nll``). It sees what the refiner sees, the
    warped neighbours' disagreement (large where the flow could not explain the change between them), and the gap
    in mm between them (errors grow with it, and the images alone do not say how far apart the neighbours are).
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        channels = tuple(cfg["channels"])
        self.net = UNet(spatial_dims=2, in_channels=6, out_channels=1, channels=channels,
                        strides=(2,) * (len(channels) - 1), num_res_units=cfg["num_res_units"], norm=cfg["norm"])
        self.offset = nn.Parameter(torch.tensor(INITIAL_LOG_SCALE))
        self.multiple = 2 ** (len(channels) - 1)
        self.calibration = _calibration(cfg.get("calibration"))  # fitted after training (``calid.error_calibration``)

    def uncalibrated(self, estimate: torch.Tensor, warped_below: torch.Tensor, warped_above: torch.Tensor,
                     alpha: torch.Tensor, gap_mm: torch.Tensor) -> torch.Tensor:
        """log b (N, 1, H, W) as trained (the Laplace loss takes this): what the calibration is fitted on."""
        inputs = torch.cat([_pixel_inputs_and_disagreement(estimate, warped_below, warped_above, alpha),
                            _plane(gap_mm / GAP_UNIT_MM, estimate)], dim=1)
        return (self.offset + self.net(inputs)).clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)

    def forward(self, estimate: torch.Tensor, warped_below: torch.Tensor, warped_above: torch.Tensor,
                alpha: torch.Tensor, gap_mm: torch.Tensor) -> torch.Tensor:
        """Calibrated log b (N, 1, H, W): ``exp`` gives the expected absolute error of ``estimate`` in network units.
        ``gap_mm`` (N,): distance between the two neighbours."""
        raw = self.uncalibrated(estimate, warped_below, warped_above, alpha, gap_mm)
        return self.calibration(raw, gap_mm).clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)


def _calibration(cfg: dict[str, Any] | None) -> ErrorCalibration:
    """The config's calibration; that of the first heads (a factor per gap: ``log_factor``, ``log_factor_per_10mm``)
    is converted."""
    if cfg and "log_factor" in cfg:
        return ErrorCalibration.from_line(cfg["log_factor"], cfg["log_factor_per_10mm"])
    return ErrorCalibration(cfg)


def laplace_nll(log_scale: torch.Tensor, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``target`` under Laplace(estimate, exp(log_scale)), up to log 2."""
    return (log_scale + (target - estimate).abs() * torch.exp(-log_scale)).mean()


class CaLID(nn.Module):
    """The whole model: VAE + conditional latent denoiser. ``config`` is the dict stored in the model card."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.vae = build_vae(config)
        self.interpolator = LatentInterpolator(config)
        self.register_buffer("latent_scale", torch.tensor(float(config.get("latent_scale", 1.0))))
        self.diffusion_target = config.get("diffusion_target", "latent")
        if self.diffusion_target not in DIFFUSION_TARGETS:
            raise ValueError(f"diffusion_target must be one of {DIFFUSION_TARGETS}, not {self.diffusion_target!r}")
        # Residuals are divided by this so that they have roughly unit variance (set by the trainer).
        self.register_buffer("residual_scale", torch.tensor(1.0))
        # A motion-aware model (``motion`` set, ``calid.pipeline_settings``) builds on the acquired neighbours warped
        # along their optical flow to the new slice's position (``calid.motion``): its residual base is the
        # optical-flow morph instead of the cross-fade, and tau_theta1 sees the two warped slices (their
        # disagreement shows where the flow failed). Same networks and weights layout as a model without it.
        self.motion = None
        if config.get("motion") is not None:
            self.set_motion(MotionSettings.from_config(config["motion"]))  # written back in today's form
        self.refiner = None
        if config.get("refiner") is not None:
            self.add_refiner(config["refiner"])
        self.error_head = None
        if config.get("error_head") is not None:
            self.add_error_head(config["error_head"])
        self.last_step = LastStep.from_config(config)
        self._check_last_step(self.last_step)

    def set_motion(self, settings: MotionSettings) -> None:
        """Make the model motion-aware, or change its flow settings. Turning a model of the older design into one
        keeps every weight (fine-tuning then teaches it the new base); other views or smoothing change no network
        (the bundled models took 8 views without retraining; docs/measurements.md)."""
        self._check_motion_base()
        self.motion = settings
        self.config["motion"] = settings.to_config()

    def set_last_step(self, step: LastStep) -> None:
        """How the final slices are mixed (``pipeline_settings.LastStep``), written to the card."""
        self._check_last_step(step)
        self.last_step = step
        step.write_to(self.config)

    def _check_motion_base(self) -> None:
        if self.diffusion_target != "residual":
            raise ValueError("a motion-aware model diffuses residuals to the morph: this one diffuses latents")

    def _check_last_step(self, step: LastStep) -> None:
        if step.needs_motion and self.motion is None:
            raise ValueError("the last step's mix (morph mix, its space, a gap mix) needs the warped neighbours: it "
                             "needs a motion-aware model")

    def add_error_head(self, cfg: dict[str, Any] | None = None) -> None:
        """Give a motion-aware model the ``ErrorHead`` behind its calibrated uncertainty map (untrained until
        ``calid train --error-head-steps``)."""
        if self.motion is None:
            raise ValueError("the error head sees the warped neighbours: it needs a motion-aware model")
        cfg = copy.deepcopy(cfg or ERROR_HEAD_CONFIG)
        self.error_head = ErrorHead(cfg)
        self.config["error_head"] = cfg

    def add_refiner(self, cfg: dict[str, Any] | None = None) -> None:
        """Give a motion-aware model a pixel-space refiner of the config's kind (``REFINERS``; default the residual
        ``Refiner``, which changes nothing until trained)."""
        if self.motion is None:
            raise ValueError("the refiner sees the warped neighbours: it needs a motion-aware model")
        cfg = copy.deepcopy(cfg or REFINER_CONFIG)
        kind = cfg.get("kind", "residual")
        if kind not in REFINERS:
            raise ValueError(f"refiner kind must be one of {tuple(REFINERS)}, not {kind!r}")
        self.refiner = REFINERS[kind](cfg)
        self.config["refiner"] = cfg

    def new_denoiser(self, channels: list[int]) -> None:
        """Replace tau_theta1, tau_theta2 and the U-Net by untrained ones with these widths per level (as many levels
        as before), keeping the VAE, the motion settings, the last step and the residual scale: a larger denoiser
        on a trained model's latents (``calid train --init M --denoiser-channels``). The widths must be multiples
        of the denoiser's ``norm_num_groups`` and, where it attends, of its ``num_head_channels``."""
        current = self.config["denoiser"]
        if len(channels) != len(current["channels"]):
            raise ValueError(f"give {len(current['channels'])} widths, one per level, not {len(channels)}")
        attends = [c for c, a in zip(channels, current["attention_levels"]) if a]
        if any(c <= 0 or c % current["norm_num_groups"] for c in channels) or any(
                c % current["num_head_channels"] for c in attends):
            raise ValueError(f"widths must be positive multiples of {current['norm_num_groups']} (and of "
                             f"{current['num_head_channels']} where the level attends), not {channels}")
        self.config["denoiser"] = {**current, "channels": [int(c) for c in channels]}
        self.interpolator = LatentInterpolator(self.config)

    @property
    def vae_downsampling(self) -> int:
        """Image pixels per latent pixel along each axis (4 by default)."""
        return 2 ** (len(self.config["vae"]["channels"]) - 1)

    @property
    def spatial_multiple(self) -> int:
        """Slice height/width must be a multiple of this (VAE x4, then the U-Net's own downsampling)."""
        return self.vae_downsampling * self.interpolator.downsampling

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image slices (N,1,H,W) in network intensity range -> scaled latent means (N,C,H/4,W/4)."""
        z_mu, _ = self.vae.encode(x)
        return z_mu / self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z * self.latent_scale)

    def linear_latent(self, z_below: torch.Tensor, z_above: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        a = alpha.reshape(-1, 1, 1, 1).to(z_below.dtype)
        return (1 - a) * z_below + a * z_above

    def to_diffusion(self, z: torch.Tensor, z_below: torch.Tensor, z_above: torch.Tensor,
                     alpha: torch.Tensor) -> torch.Tensor:
        """A target latent -> the clean sample the diffusion process works on (see ``diffusion_target``)."""
        if self.diffusion_target == "latent":
            return z
        return (z - self.linear_latent(z_below, z_above, alpha)) / self.residual_scale

    def from_diffusion(self, x: torch.Tensor, z_below: torch.Tensor, z_above: torch.Tensor,
                       alpha: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_diffusion``: a denoised sample -> the target latent."""
        if self.diffusion_target == "latent":
            return x
        return self.linear_latent(z_below, z_above, alpha) + x * self.residual_scale
