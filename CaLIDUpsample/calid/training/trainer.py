"""``calid train``: the VAE, then the conditional latent denoiser (tau_theta1, tau_theta2, epsilon_theta jointly), then,
for motion-aware models, the optional pixel-space refiner and the error head of the uncertainty map.

One run goes through the stages with a single global step counter (``vae_steps``, ``denoiser_steps``,
``refiner_steps``, then ``error_head_steps``), writes an atomic checkpoint every ``checkpoint_every`` steps and at the end of each
stage, and can be resumed exactly (weights, EMA, optimizer, LR position, sampler RNG). Under ``torchrun``
the trained network is wrapped in DistributedDataParallel; each rank draws its own batches.
Fine-tuning (``init``) starts from an existing model and, by default, trains only the denoiser.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import slice_positions
from ..choices import REFINER_KINDS, REFINER_LOSSES
from ..devices import autocast, inference_layout, resolve_device
from ..error_calibration import ErrorCalibration
from ..errors import CalidError, first_few
from ..gap_mix import GapMix
from ..generation import default_steps, expected_error, generate_missing
from ..metrics import linear_missing, slice_scores
from ..modelstore import inherited_provenance, load_model, save_model
from ..networks import DEFAULT_CONFIG, REFINER_CONFIG, TINY_CONFIG, CaLID, laplace_nll
from ..pipeline_settings import MotionSettings
from ..progress import Progress
from ..sampling import make_scheduler, max_sampling_steps, training_target
from . import data, pack
from .checkpoint import (CHECKPOINT, load_checkpoint, load_rank_random_state, read_checkpoint_info, run_folder,
                         save_checkpoint, save_rank_random_state)
from .config import TrainConfig
from .losses import refiner_loss
from .metrics_log import append_metrics, forget_after
from .plots import plot_curves
from .schedule import warmup_cosine

PRESETS = {"default": DEFAULT_CONFIG, "tiny": TINY_CONFIG}
RESUMABLE = frozenset({"data", "pack", "split", "val_fraction", "output", "resume", "device", "flows_up_front",
                       "recalibrate", "denoiser_minutes", "val_every", "val_volumes", "log_every", "checkpoint_every",
                       "name", "description", "data_source", "data_terms", "citation", "extra"})
"""Options a resumed run may give otherwise than its stopped run: where its data lies (the split is the run
folder's own), where and how long it runs, what it logs and what it is called; not what it trains."""
KL_WEIGHT = 1e-6
METRIC_FIELDS = ["step", "stage", "loss", "lr", "seconds_per_step", "val_psnr_model", "val_psnr_linear",
                 "val_ssim_model", "val_ssim_linear", "val_error_ratio"]


@dataclass
class _StageState:
    """What one training stage updates: its network, optimizer, learning-rate schedule and EMA of the whole model."""

    trained: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: AveragedModel
    schedule: torch.optim.lr_scheduler.LambdaLR


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


class Trainer:
    def __init__(self, cfg: TrainConfig, progress_mode: str = "bar"):
        self.cfg = cfg
        self.rank, self.world = _distributed()
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        self.out = Path(cfg.output)
        self.progress_mode = progress_mode if self.rank == 0 else "none"
        self.generator = torch.Generator().manual_seed(cfg.seed + 1000 * self.rank)
        torch.manual_seed(cfg.seed + self.rank)
        self.base_card: dict[str, Any] = {}
        if cfg.init:
            self.model, self.base_card = load_model(cfg.init, "cpu")
            self.model.train()
        else:
            if cfg.preset not in PRESETS:
                raise CalidError(f"unknown preset {cfg.preset} (use {', '.join(PRESETS)})")
            self.model = CaLID(PRESETS[cfg.preset])
        if cfg.denoiser_minutes is not None and not cfg.denoiser_minutes > 0:
            raise CalidError(f"--denoiser-minutes must be positive, not {cfg.denoiser_minutes}")
        if cfg.denoiser_channels:
            try:
                self.model.new_denoiser(cfg.denoiser_channels)
            except ValueError as error:
                raise CalidError(f"--denoiser-channels: {error}") from None
        self._set_motion(cfg)
        if cfg.refiner_loss not in REFINER_LOSSES:
            raise CalidError(f"--refiner-loss must be one of {', '.join(REFINER_LOSSES)}, not {cfg.refiner_loss}")
        if cfg.refiner_kind not in REFINER_KINDS:
            raise CalidError(f"--refiner-kind must be one of {', '.join(REFINER_KINDS)}, not {cfg.refiner_kind}")
        if cfg.refiner_steps > 0 and self.model.refiner is None:
            if self.model.motion is None:
                raise CalidError("--refiner-steps needs a motion-aware model (--motion, or an --init model that is one)")
            self.model.add_refiner({**REFINER_CONFIG, "kind": cfg.refiner_kind})
        self._set_last_step(cfg)
        if cfg.error_head_steps > 0 and self.model.error_head is None:
            if self.model.motion is None:
                raise CalidError("--error-head-steps needs a motion-aware model (--motion, or an --init model that is one)")
            self.model.add_error_head()
        self.model.to(self.device)
        self.min_timestep = self._keep_sampling_on_trained_timesteps()
        self.vae_steps = 0 if cfg.init else cfg.vae_steps
        self.refitted_on: str | None = None  # what the error head's calibration was refitted on (the card says)
        vae_end, denoiser_end = self.vae_steps, self.vae_steps + cfg.denoiser_steps
        refiner_end = denoiser_end + cfg.refiner_steps
        # Each stage's global step range: one counter runs through the VAE, the denoiser, the refiner, the error head.
        self.stages = {"vae": (0, vae_end), "denoiser": (vae_end, denoiser_end), "refiner": (denoiser_end, refiner_end),
                       "error_head": (refiner_end, refiner_end + cfg.error_head_steps)}
        self.total_steps = refiner_end + cfg.error_head_steps
        self.history: list[dict[str, Any]] = []
        self.last_validation: dict[str, float] = {}
        self.denoiser_steps_trained: int | None = None  # set when --denoiser-minutes ended the stage early

    def _set_motion(self, cfg: TrainConfig) -> None:
        """``--motion``, ``--flow-views``, ``--flow-smooth``: each changes only what it names of the model's flow."""
        settings = self.model.motion
        if cfg.motion:
            settings = MotionSettings(cfg.motion) if settings is None else replace(settings, flow=cfg.motion)
        for option, field, value in (("--flow-views", "views", cfg.flow_views),
                                     ("--flow-smooth", "smooth", cfg.flow_smooth)):
            if value is None:
                continue
            if settings is None:
                raise CalidError(f"{option} needs a motion-aware model (--motion, or an --init model that is one)")
            try:
                settings = replace(settings, **{field: value})
            except ValueError as error:
                raise CalidError(f"{option}: {error}") from None
        if settings is not None:
            try:
                self.model.set_motion(settings)
            except ValueError as error:
                raise CalidError(f"--motion: {error}") from None

    def _set_last_step(self, cfg: TrainConfig) -> None:
        """``--morph-mix`` (one weight at every gap: it replaces a per-gap table), ``--morph-mix-space`` (keeps the
        weights) and ``--gap-mix`` (the per-gap table)."""
        step = self.model.last_step
        options = (("--morph-mix", cfg.morph_mix), ("--morph-mix-space", cfg.morph_mix_space),
                   ("--gap-mix", cfg.gap_mix))
        named = [option for option, value in options if value is not None]
        if named and self.model.motion is None:  # even a mix of 0 or the pixel space: they mean nothing here
            raise CalidError(f"{' / '.join(named)} needs a motion-aware model (--motion, or an --init model that is "
                             "one)")
        try:
            if cfg.morph_mix is not None:
                step = replace(step, morph_mix=cfg.morph_mix, gap_mix=None)
            if cfg.morph_mix_space is not None:
                step = replace(step, space=cfg.morph_mix_space)
            if cfg.morph_mix is not None or cfg.morph_mix_space is not None:
                self.model.set_last_step(step)
        except ValueError as error:
            raise CalidError(f"--morph-mix / --morph-mix-space: {error}") from None
        if cfg.gap_mix is not None:
            try:
                self.model.set_last_step(replace(step, gap_mix=GapMix.parse(cfg.gap_mix)))
            except ValueError as error:
                raise CalidError(f"--gap-mix: {error}") from None

    def _keep_sampling_on_trained_timesteps(self) -> int:
        """The lowest timestep the denoiser trains on: ``min_timestep``, or its base model's if higher.

        The model's config records it and its default steps stay above it (validation, export and every later
        ``calid upsample`` then respect it). Fine-tuning a one-step model without ``--min-timestep`` (the Slicer
        training module's default) thus keeps training where that model is sampled.
        """
        diffusion = self.model.config["diffusion"]
        if not 0 <= self.cfg.min_timestep < diffusion["num_train_timesteps"]:
            raise CalidError(f"--min-timestep must be between 0 and {diffusion['num_train_timesteps'] - 1}, "
                             f"not {self.cfg.min_timestep}")
        lowest = max(diffusion.get("min_timestep", 0), self.cfg.min_timestep)
        if lowest:
            diffusion["min_timestep"] = lowest
            self.model.config["default_steps"] = min(default_steps(self.model), max_sampling_steps(diffusion))
        return lowest

    # ---------------------------------------------------------------- data
    def _prepare_data(self) -> None:
        cfg = self.cfg
        if bool(cfg.pack) == bool(cfg.data):
            raise CalidError("give the training data as folders or as one --pack file, not both or neither")
        if cfg.pack:
            if cfg.split:
                raise CalidError("--split does not go with --pack: a pack carries the split it was made with")
            self._prepare_pack()
            return
        entries = data.find_volumes(cfg.data)
        split_file = self.out / "split.json"
        stacks = None
        if cfg.resume and split_file.is_file():
            split = data.load_split(split_file)
            self._check_resumed_data(split, entries)
        elif cfg.split:
            split = data.load_split(Path(cfg.split))
        else:  # split the patients that gave a stack: one whose files are all too short would validate nothing
            stacks = data.load_volumes(entries)
            usable = {v.patient for v in stacks}
            thin = {v.patient: v.slice_spacing <= data.THIN_SLICE_MM for v in stacks}
            split = data.split_patients([e for e in entries if e[0] in usable], cfg.val_fraction, cfg.seed, thin)
        if self.rank == 0:
            split_file.write_text(json.dumps(split, indent=2) + "\n", encoding="utf-8")
        self.split = split
        train_set, val_set = set(split["train"]), set(split["validation"])
        if stacks is None:
            stacks = data.load_volumes([e for e in entries if e[0] in train_set | val_set])
        self._use_volumes([v for v in stacks if v.patient in train_set], [v for v in stacks if v.patient in val_set])
        self.sources = sorted({str(Path(p).resolve()) for p in cfg.data})

    def _check_resumed_data(self, split: dict[str, list[str]], entries: list[tuple[str, Path]]) -> None:
        """A resumed run reads its stopped run's split: its patients must be in the data given now."""
        missing = sorted(set(split["train"]) - {patient for patient, _ in entries})
        if missing:
            raise CalidError(f"--resume: the stopped run trained on patients not in the data given now "
                             f"({first_few(missing)}): give the same data")

    def _prepare_pack(self) -> None:
        """The stacks and split of a pack (``pack.read_pack``); the split it was made with is the run's, and a resumed
        run's pack must hold the split it was started with."""
        train_volumes, val, self.split = pack.read_pack(self.cfg.pack)
        split_file = self.out / "split.json"
        if self.cfg.resume and split_file.is_file() and data.load_split(split_file) != self.split:
            raise CalidError("--resume: this pack holds another split than the stopped run's: give the same pack")
        if self.rank == 0:
            split_file.write_text(json.dumps(self.split, indent=2) + "\n", encoding="utf-8")
        self._use_volumes(train_volumes, val)
        self.sources = [str(Path(self.cfg.pack).resolve())]

    def _use_volumes(self, train_volumes: list[data.Volume], val: list[data.Volume]) -> None:
        self.train_volumes, self.val_volumes = train_volumes, data.validation_order(val)[: self.cfg.val_volumes]
        if not self.train_volumes:
            raise CalidError("no training volumes with at least 3 slices")

    @torch.no_grad()
    def _encode_training_latents(self) -> list[torch.Tensor]:
        """Latent stacks of every training volume in its 8 in-plane orientations (90-degree rotations, flipped or not).

        The encoder is frozen here, so orientations must be encoded up front: with only the stack and its transpose,
        a GPU run overfitted (validation fell after ~2000 steps of batch 128).
        """
        self.model.eval()
        multiple = self.model.vae_downsampling
        latents = []
        for v in self.train_volumes:
            for variant in (np.rot90(s, k, axes=(1, 2)) for s in (v.stack, v.stack[:, :, ::-1]) for k in range(4)):
                h, w = variant.shape[1:]
                x = torch.from_numpy(np.ascontiguousarray(variant))[:, None]
                x = torch.nn.functional.pad(x, (0, -w % multiple, 0, -h % multiple), value=float(variant.min()))
                with autocast(self.device):
                    z = torch.cat([self.model.encode(x[i:i + 16].to(self.device)).float() for i in range(0, len(x), 16)])
                latents.append(z.cpu())
        return latents

    # ---------------------------------------------------------------- stages
    def run(self) -> Path:
        with run_folder(self.out, self.cfg.resume) as checkpoint:
            info = read_checkpoint_info(checkpoint) if self.cfg.resume else {"step": 0}
            self._check_resumed_settings(info.get("settings"))
            self._prepare_data()
        step = info["step"]
        if step and self.rank == 0:
            forget_after(self.out, step)
        progress = Progress(self.progress_mode, self.total_steps, "training")
        if self.rank == 0 and self._calibration_is_stale():
            progress.reserve(len(self.train_volumes))  # the refit at the end: one unit per training stack
        if step:
            progress.advance(step)
        ran = False
        for stage, (start, end) in self.stages.items():
            if start < end and step < end:
                step, ran = self._stage(stage, step, progress), True
        if self.rank == 0 and self._calibration_is_stale():
            self._recalibrate_error_head(progress)
            ran = True
        if self.rank == 0 and (ran or not (self.out / "model").is_dir()):
            self._export()
        progress.close()
        if dist.is_initialized():
            dist.barrier()
        return self.out / "model"

    def _stage(self, stage: str, step: int, progress: Progress) -> int:
        """Train one stage from ``step`` (its start, or where a checkpoint left it) to its end; returns the step
        reached. The stage's result is its EMA weights: they are what the next stage and the export use."""
        state = self._stage_state(stage, step)
        net = DistributedDataParallel(state.trained) if self.world > 1 else state.trained
        sampler, batch_loss = self._stage_examples(stage, step, state.ema, progress)
        progress.set_stage(f"training {stage}")
        step = self._train_steps(stage, step, state, lambda: batch_loss(net), progress)
        self.model.load_state_dict(state.ema.module.state_dict())
        if stage == "error_head":
            calibrate_error_head(self.model, sampler, self.device)
        self._save(self.out / CHECKPOINT, state.ema, state.optimizer, step, stage)
        return step

    def _stage_state(self, stage: str, step: int) -> _StageState:
        """The stage's network unfrozen (the rest of the model frozen), its optimizer, EMA and learning-rate schedule,
        restored from the checkpoint when resuming: the weights alone at a stage boundary, everything inside one."""
        cfg = self.cfg
        start, end = self.stages[stage]
        trained = {"vae": self.model.vae, "denoiser": self.model.interpolator, "refiner": self.model.refiner,
                   "error_head": self.model.error_head}[stage]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in trained.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=1e-4)
        checkpoint = self.out / CHECKPOINT
        info: dict[str, Any] = {}
        if step == start and step > 0 and checkpoint.is_file():  # resuming at a stage boundary: weights only
            info = self._load(checkpoint, {"model": self.model}, None)
        if stage == "error_head":  # trained uncalibrated; its calibration is fitted anew at the end of the stage
            self.model.error_head.calibration = ErrorCalibration()
            self.model.config["error_head"].pop("calibration", None)
        if stage == "denoiser" and self.vae_steps > 0 and step == start:
            self._set_latent_scale()  # before the EMA copy is made: the EMA must never see another scale
        ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if step > start and checkpoint.is_file():  # resuming inside this stage: restore everything
            info = self._load(checkpoint, {"model": self.model, "ema": ema}, optimizer)
        self.history = info.get("history", self.history)
        self.last_validation = info.get("last_validation", self.last_validation)
        self.model.config["latent_scale"] = float(self.model.latent_scale)
        ema.module.latent_scale.copy_(self.model.latent_scale)  # a constant of the VAE, not an averaged weight
        ema.module.config["latent_scale"] = self.model.config["latent_scale"]
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", cfg.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, end - start),
                                                     last_epoch=step - start - 1)
        return _StageState(trained, optimizer, ema, schedule)

    def _stage_examples(self, stage: str, step: int, ema: AveragedModel,
                        progress: Progress) -> tuple[Any, Callable[[torch.nn.Module], torch.Tensor]]:
        """The stage's sampler of training examples and its loss on one batch of them, given the network to train
        (``DistributedDataParallel``-wrapped under torchrun)."""
        cfg, device = self.cfg, self.device
        if stage == "vae":
            sampler = data.SliceSampler(self.train_volumes, cfg.vae_crop, self.generator)

            def vae_loss(net: torch.nn.Module) -> torch.Tensor:
                x = sampler.batch(cfg.vae_batch).to(device)
                recon, mu, sigma = net(x)
                kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).sum((1, 2, 3)).mean()
                return (recon.float() - x).abs().mean() + KL_WEIGHT * kl

            return sampler, vae_loss
        if stage in ("refiner", "error_head"):
            progress.set_stage(f"making the {stage.replace('_', ' ')}'s examples")  # the model's output on removed slices
            sampler = self._estimate_sampler(refine=stage == "error_head")
            if stage == "refiner":
                loss_fn = refiner_loss(cfg.refiner_loss, device)

                def refined_loss(net: torch.nn.Module) -> torch.Tensor:
                    estimate, below, above, target, alpha, _ = (t.to(device)
                                                                for t in sampler.batch(cfg.denoiser_batch))
                    return loss_fn(net(estimate, below, above, alpha).float(), target)

                return sampler, refined_loss

            def error_loss(net: torch.nn.Module) -> torch.Tensor:
                estimate, below, above, target, alpha, gap_mm = (t.to(device)
                                                                 for t in sampler.batch(cfg.denoiser_batch))
                return laplace_nll(net(estimate, below, above, alpha, gap_mm).float(), estimate, target)

            return sampler, error_loss
        latents = None
        if self.model.motion is None:
            progress.set_stage("encoding training stacks")  # minutes on a CPU: 8 orientations of every stack
            latents = self._encode_training_latents()
        sampler = self._triplet_sampler(latents, self.generator)
        if step == self.stages[stage][0] and not cfg.init:  # a new denoiser; fine-tuning keeps its base model's scale
            self._set_residual_scale(data.with_generator(sampler, torch.Generator().manual_seed(0)))
            ema.module.residual_scale.copy_(self.model.residual_scale)
        scheduler = make_scheduler(self.model.config["diffusion"])

        def denoiser_loss(net: torch.nn.Module) -> torch.Tensor:
            below, target, above, alpha = self._latent_triplets(sampler, cfg.denoiser_batch)
            clean = self.model.to_diffusion(target, below, above, alpha)
            noise = torch.randn(clean.shape, generator=self.generator).to(device)
            t = torch.randint(self.min_timestep, scheduler.num_train_timesteps, (clean.shape[0],),
                              generator=self.generator).to(device)
            z_t = scheduler.add_noise(clean, noise, t)
            return torch.nn.functional.mse_loss(net(z_t, t, below, above, alpha).float(),
                                                training_target(scheduler, clean, noise, t))

        return sampler, denoiser_loss

    def _train_steps(self, stage: str, step: int, state: _StageState, batch_loss: Callable[[], torch.Tensor],
                     progress: Progress) -> int:
        """The optimisation loop of a stage, from ``step`` to its end (or, for the denoiser, ``denoiser_minutes``):
        logging, validation and checkpoints on rank 0."""
        cfg = self.cfg
        end = self.stages[stage][1]
        state.trained.train()
        running, count, tick = 0.0, 0, time.monotonic()
        deadline = tick + 60 * cfg.denoiser_minutes if stage == "denoiser" and cfg.denoiser_minutes else None
        first = step
        while step < end:
            with autocast(self.device):
                loss = batch_loss()
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(state.trained.parameters(), 1.0)
            state.optimizer.step()
            state.schedule.step()
            state.ema.update_parameters(self.model)
            before, step = step, step + 1
            if deadline is not None and step < end and self._out_of_time(deadline):
                # The stage ends here, its EMA weights taken as they are (logged, validated and exported as at its
                # planned end), and the run goes on from the stage's end.
                self.denoiser_steps_trained, step = step - first, end
            loss_value = loss.item()
            running, count = running + loss_value, count + 1
            progress.advance(step - before, loss=round(loss_value, 5))
            checkpoint_now = step % cfg.checkpoint_every == 0 and step < end
            if self.rank != 0:
                if checkpoint_now:  # its own random state, beside rank 0's checkpoint of this step
                    self._save(self.out / CHECKPOINT, state.ema, state.optimizer, step, stage)
                continue
            if step % cfg.log_every == 0 or step == end:
                self._log({"step": step, "stage": stage, "loss": running / count,
                           "lr": state.schedule.get_last_lr()[0],
                           "seconds_per_step": (time.monotonic() - tick) / count}, progress)
                running, count, tick = 0.0, 0, time.monotonic()
            if stage != "vae" and (step % cfg.val_every == 0 or step == end) and self.val_volumes:
                self._validate(state.ema.module, step, progress)
                state.trained.train()
            if checkpoint_now:  # after this step's log and validation, which a resumed run must not repeat
                self._save(self.out / CHECKPOINT, state.ema, state.optimizer, step, stage)
        return step

    def _out_of_time(self, deadline: float) -> bool:
        """Rank 0's clock decides for every process, so that all of them end the stage after the same step."""
        late = torch.tensor([float(time.monotonic() > deadline)])
        if self.world > 1:
            late = late.to(self.device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(late, 0)
        return bool(late.item())

    def _calibration_is_stale(self) -> bool:
        """The slices the error head describes were changed (a tuned denoiser, a new refiner, morph or gap mix, flow) but
        the head not retrained, and the run was not told to leave the refit for later (``--no-recalibrate``)."""
        cfg = self.cfg
        changed = (cfg.denoiser_steps > 0 or cfg.refiner_steps > 0 or cfg.morph_mix is not None
                   or cfg.motion is not None or cfg.flow_views is not None or cfg.flow_smooth is not None
                   or cfg.morph_mix_space is not None or cfg.gap_mix is not None)
        return self.model.error_head is not None and cfg.error_head_steps == 0 and changed and cfg.recalibrate

    def _recalibrate_error_head(self, progress: Progress) -> None:
        """Refit the head's calibration on the model's new final output (its weights stay): the map must describe
        the slices the model now makes."""
        progress.set_stage("recalibrating the error head on the new output")
        sampler = self._estimate_sampler(refine=True, on_volume=progress.advance)
        calibrate_error_head(self.model, sampler, self.device, refit=True)
        stacks = len(self.train_volumes)
        self.refitted_on = (f"its own final output, slices removed from the {stacks} training stack"
                            f"{'s' if stacks != 1 else ''} of the split (a gap knot none of their gaps reaches keeps "
                            "the base model's row)")

    def _estimate_sampler(self, refine: bool, on_volume: Callable[[], None] | None = None) -> data.EstimateSampler:
        """The model's own output on slices removed from the training stacks (``data.EstimateSampler``): the examples
        of the refiner (``refine=False``) and of the error head and its calibration (``refine=True``)."""
        self.model.eval()
        with inference_layout(self.model, self.device):
            return data.EstimateSampler(self.model, self.train_volumes,
                                        self.cfg.latent_crop * self.model.vae_downsampling, self.generator,
                                        self.device, default_steps(self.model), self.cfg.refiner_thin_weight,
                                        refine=refine, on_volume=on_volume)

    def _save(self, path: Path, ema: AveragedModel, optimizer: torch.optim.Optimizer, step: int, stage: str) -> None:
        """The checkpoint (rank 0: weights, optimizer, its random state, the log so far); every other process keeps
        its own random state beside it."""
        if self.rank != 0:
            save_rank_random_state(path, self.rank, self.generator, step)
            return
        info = {"step": step, "stage": stage, "history": self.history, "last_validation": self.last_validation,
                "settings": self._run_settings()}
        save_checkpoint(path, {"model": self.model, "ema": ema}, optimizer, self.generator, info)

    def _run_settings(self) -> dict[str, Any]:
        """What this run trains, as a resumed run must give it again: every option but those of ``RESUMABLE``, and
        the base model by its weights' checksum (``calid-acdc`` and its folder's path are one base)."""
        unused = {"preset", "vae_steps", "vae_batch", "vae_crop"} if self.cfg.init else set()  # no VAE is trained
        settings = {k: v for k, v in asdict(self.cfg).items() if k not in RESUMABLE | unused}
        settings["init"] = [self.base_card.get("name"), self.base_card.get("sha256")] if self.cfg.init else None
        return json.loads(json.dumps(settings))  # as the checkpoint's JSON gives them back (tuples become lists)

    def _check_resumed_settings(self, stopped: dict[str, Any] | None) -> None:
        """Refuse a resume whose options would train another model than the stopped run's (another base, schedule,
        batch or learning rate), naming them; a checkpoint written before settings were kept is not checked."""
        if stopped is None:
            return
        now = self._run_settings()
        changed = sorted(k for k in now.keys() | stopped.keys() if now.get(k) != stopped.get(k))
        if changed:
            def shown(settings: dict[str, Any], key: str) -> str:
                value = settings.get(key)
                return f"--{key.replace('_', '-')} {value[0] if key == 'init' and value else value}"

            raise CalidError("--resume with other options than the stopped run's: it was started with "
                             + ", ".join(shown(stopped, k) for k in changed) + "; now "
                             + ", ".join(shown(now, k) for k in changed) + ": give the same options")

    def _load(self, path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None
              ) -> dict[str, Any]:
        """``_save``'s inverse on every process: the checkpoint, then this process's own random state."""
        info = load_checkpoint(path, modules, optimizer, self.generator)
        if self.rank != 0:
            load_rank_random_state(path, self.rank, self.generator, info["step"])
        return info

    @torch.no_grad()
    def _set_latent_scale(self) -> None:
        """Latents are scaled to unit standard deviation over a sample of training slices."""
        self.model.eval()
        x = data.SliceSampler(self.train_volumes, 128, torch.Generator().manual_seed(0)).batch(64).to(self.device)
        z_mu, _ = self.model.vae.encode(x)
        self.model.latent_scale.fill_(float(z_mu.std()))
        self.model.config["latent_scale"] = float(z_mu.std())

    def _triplet_sampler(self, latents: list[torch.Tensor] | None, generator: torch.Generator):
        """Latent triplets of stacks encoded up front, or (motion-aware models) warped image crops encoded per batch."""
        if self.model.motion is None:
            return data.TripletSampler(latents, self.cfg.latent_crop, generator)
        sampler = data.MotionTripletSampler(self.train_volumes, self.cfg.latent_crop * self.model.vae_downsampling,
                                            generator, self.model.motion.flow)
        if self.cfg.flows_up_front:
            sampler.estimate_all_flows()
        return sampler

    @torch.no_grad()
    def _latent_triplets(self, sampler, size: int) -> tuple[torch.Tensor, ...]:
        """(below, target, above, alpha) latents on the device: image crops are encoded here with the frozen VAE."""
        below, target, above, alpha = (t.to(self.device) for t in sampler.batch(size))
        if isinstance(sampler, data.MotionTripletSampler):
            with autocast(self.device):
                below, target, above = self.model.encode(torch.cat([below, target, above])).float().chunk(3)
        return below, target, above, alpha

    @torch.no_grad()
    def _set_residual_scale(self, sampler) -> None:
        """Residuals to the base (latent-linear interpolation of the neighbours, warped or not) are scaled to unit
        standard deviation over 256 triplets of ``sampler`` (its own generator: training batches are unchanged)."""
        if self.model.diffusion_target != "residual":
            return
        below, target, above, alpha = self._latent_triplets(sampler, 256)
        residual = target - self.model.linear_latent(below, above, alpha)
        self.model.residual_scale.fill_(float(residual.std().clamp_min(1e-3)))

    # ---------------------------------------------------------------- reporting
    def _log(self, row: dict[str, Any], progress: Progress) -> None:
        self.history.append(row)
        append_metrics(self.out, METRIC_FIELDS, row)
        progress.event("metrics", **row)
        plot_curves(self.history, self.out / "curves.png")

    @torch.no_grad()
    def _validate(self, model: CaLID, step: int, progress: Progress) -> None:
        """Removed-slice protocol, K=2, model default steps, a few validation stacks: model vs linear, and (models
        with an error head) the ratio of the mean predicted to the mean actual absolute error."""
        model.eval()
        scores = {"model": [], "linear": []}
        predicted, actual = [], []
        for v in self.val_volumes:
            n = slice_positions.protocol_count(v.stack.shape[0], 2)
            real = v.stack[:n]
            kept = real[::2]
            generated = generate_missing(model, kept, 2, default_steps(model), device=self.device,
                                         gap_mm=2 * v.slice_spacing)[0]
            scores["model"].append(slice_scores(real[1::2], generated, real))
            scores["linear"].append(slice_scores(real[1::2], linear_missing(kept, 2), real))
            if model.error_head is not None:
                predicted.append(float(expected_error(model, kept[None], generated[None], 2, 2 * v.slice_spacing,
                                                      self.device).mean()))
                actual.append(float(np.abs(real[1::2] - generated).mean()))
        row = {"step": step, "stage": "validation"}
        for name, values in scores.items():
            row[f"val_psnr_{name}"] = float(np.mean([s[0] for s in values]))
            row[f"val_ssim_{name}"] = float(np.mean([s[1] for s in values]))
        if predicted:
            row["val_error_ratio"] = float(np.sum(predicted) / max(np.sum(actual), 1e-12))
        self.last_validation = {k: v for k, v in row.items() if k.startswith("val_")}
        self._log(row, progress)

    def _export(self) -> None:
        cfg = self.cfg
        terms, citation = inherited_provenance(cfg.data_terms, cfg.citation, self.base_card)
        card = {
            "name": cfg.name,
            "description": cfg.description or "CaLID latent interpolation diffusion model",
            "normalisation": "per volume: 0.5th/99.5th intensity percentiles mapped to -1/+1",
            "training": {
                "data": [cfg.data_source] if cfg.data_source else self.sources,
                "terms": terms,
                "citation": citation,
                "split": self.split,
                "train_volumes": len(self.train_volumes),
                "vae_steps": self.vae_steps,
                "denoiser_steps": cfg.denoiser_steps,
                **({} if self.denoiser_steps_trained is None else
                   {"denoiser_steps_trained": self.denoiser_steps_trained}),
                "refiner_steps": cfg.refiner_steps,
                "error_head_steps": cfg.error_head_steps,
                "base_model": self.base_card.get("name") if cfg.init else None,
                "base_model_sha256": self.base_card.get("sha256") if cfg.init else None,
                **({} if self.refitted_on is None else {"calibration_refitted_on": self.refitted_on}),
                # As the run used them: an --init run trains no VAE whatever --vae-steps says; resumed or not is
                # no setting of the model.
                "settings": {**{k: v for k, v in asdict(cfg).items() if k not in ("data", "output", "extra", "resume")},
                             "vae_steps": self.vae_steps},
                "device": str(self.device),
                "world_size": self.world,
            },
            "metrics": {"training_validation": self.last_validation, **cfg.extra},
        }
        save_model(self.model, self.out / "model", card)


@torch.no_grad()
def calibrate_error_head(model: CaLID, sampler: data.EstimateSampler, device: torch.device,
                         refit: bool = False) -> dict[str, Any]:
    """Fit the trained error head's calibration (``calid.error_calibration``) on whole training slices and record it
    in the config; training examples only, no validation patient. Returns the calibration's config. ``refit``: the
    head's current calibration keeps the gap knots these slices do not reach (``ErrorCalibration.fit``'s ``keep``)."""
    model.eval()
    head = model.error_head

    def pairs():
        for estimate, below, above, target, alpha, gap_mm in sampler.whole_slices(head.multiple):
            with autocast(device):
                raw = head.uncalibrated(*(t.to(device) for t in (estimate, below, above, alpha, gap_mm))).float()
            yield raw.cpu(), (target - estimate).abs(), gap_mm

    head.calibration = ErrorCalibration.fit(pairs(), keep=head.calibration if refit else None)
    model.config["error_head"]["calibration"] = head.calibration.to_config()
    return model.config["error_head"]["calibration"]


def train(cfg: TrainConfig, progress_mode: str = "bar") -> Path:
    return Trainer(cfg, progress_mode).run()

