"""DDIM sampling in latent space (MONAI's ``DDIMScheduler``), DDIM inversion and slerp for CaLID+.

MONAI's ``DDIMScheduler.set_timesteps`` spaces timesteps with ``linspace`` while ``step`` moves the sample
by ``num_train_timesteps // num_inference_steps``; for 8 steps the sample is moved to t=874 and then the
model is asked about t=856. ``set_uniform_timesteps`` replaces the grid with one of exactly that stride,
ending at ``stride - 1`` so that the last step lands on the clean sample: both stay consistent.
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.networks.schedulers import DDIMScheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``f(z_t, timesteps) -> model output``: the interpolator with its conditioning already bound."""


def make_scheduler(diffusion_cfg: dict) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=diffusion_cfg["num_train_timesteps"],
        schedule=diffusion_cfg["schedule"],
        beta_start=diffusion_cfg["beta_start"],
        beta_end=diffusion_cfg["beta_end"],
        prediction_type=diffusion_cfg["prediction_type"],
        clip_sample=False,
    )


def set_uniform_timesteps(scheduler: DDIMScheduler, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    stride = scheduler.num_train_timesteps // steps
    scheduler.timesteps = torch.arange(steps - 1, -1, -1) * stride + (stride - 1)
    return scheduler.timesteps


def max_sampling_steps(diffusion_cfg: dict) -> int:
    """Most DDIM steps whose grid (``set_uniform_timesteps``) stays on the timesteps the model was trained on.

    A denoiser trained only on ``timesteps >= min_timestep`` (``calid train --min-timestep``: a model meant for
    one-step sampling spends all its training there) must never be asked about lower ones.
    """
    total, lowest = diffusion_cfg["num_train_timesteps"], diffusion_cfg.get("min_timestep", 0)
    return max(s for s in range(1, total + 1) if total // s - 1 >= lowest)


def training_target(scheduler: DDIMScheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict for ``z_t = add_noise(z0, noise, t)``."""
    kind = scheduler.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    return z0


def split_prediction(scheduler: DDIMScheduler, output: torch.Tensor, sample: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output at timestep t -> (predicted clean latent, predicted noise)."""
    a = scheduler.alphas_cumprod[t].to(sample)
    if scheduler.prediction_type == "epsilon":
        return (sample - (1 - a).sqrt() * output) / a.sqrt(), output
    if scheduler.prediction_type == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * output, a.sqrt() * output + (1 - a).sqrt() * sample
    return output, (sample - a.sqrt() * output) / (1 - a).sqrt()


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per batch item: alpha=0 gives z0, alpha=1 gives z1."""
    a = z0.flatten(1)
    b = z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)
    theta = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    alpha = alpha.to(a)
    w0 = torch.sin((1 - alpha) * theta) / torch.sin(theta)
    w1 = torch.sin(alpha * theta) / torch.sin(theta)
    out = w0[:, None] * a + w1[:, None] * b
    return out.reshape(z0.shape)


@torch.no_grad()
def denoise(
    denoiser: Denoiser,
    scheduler: DDIMScheduler,
    z_init: torch.Tensor,
    steps: int,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``z_init`` at the noisiest timestep down to a clean latent."""
    z = z_init
    for i, t in enumerate(set_uniform_timesteps(scheduler, steps)):
        timesteps = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        output = denoiser(z, timesteps).to(z.dtype)
        z, _ = scheduler.step(output, int(t), z)
        if on_step is not None:
            on_step(i + 1)
    return z


@torch.no_grad()
def invert(denoiser: Denoiser, scheduler: DDIMScheduler, z0: torch.Tensor, steps: int,
           on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion of clean latents up to the noisiest timestep of the same grid.

    MONAI's ``reversed_step`` cannot start from a clean latent on this grid, so the update is written
    out: at each step the model's prediction at the current level gives (z0, eps), which are re-noised to
    the next level. The first step evaluates the model at the first grid timestep (the usual
    approximation) and keeps the known clean latent.
    """
    grid = set_uniform_timesteps(scheduler, steps).flip(0)
    z = z0
    current = None
    for i, t_next in enumerate(grid.tolist()):
        t_eval = t_next if current is None else current
        timesteps = torch.full((z.shape[0],), t_eval, device=z.device, dtype=torch.long)
        clean, eps = split_prediction(scheduler, denoiser(z, timesteps).to(z.dtype), z, t_eval)
        if current is None:
            clean = z0
        a_next = scheduler.alphas_cumprod[t_next].to(z)
        z = a_next.sqrt() * clean + (1 - a_next).sqrt() * eps
        current = t_next
        if on_step is not None:
            on_step(i + 1)
    return z
