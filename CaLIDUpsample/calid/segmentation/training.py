"""``calid train-segmentation``: the 2D U-Net on labelled short-axis stacks (ACDC label convention).

Slices are resampled once to the network's pixel size; batches are random crops centred near the heart
(most of the time) or anywhere (so the network also learns what is not heart), with flips, 90° rotations
and small gamma/contrast changes. Dice + cross-entropy loss (MONAI), AdamW with warm-up and cosine decay,
validation Dice per structure on whole validation stacks, atomic checkpoints and exact ``--resume``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.losses import DiceCELoss

from .. import geometry
from ..devices import autocast, resolve_device
from ..errors import CalidError
from ..imageio import LABEL_TAGS, find_labels, read_image, validate_volume
from ..intensity import IntensityMap
from ..modelstore import inherited_provenance
from ..progress import Progress
from ..training import data
from ..training.checkpoint import load_checkpoint, read_checkpoint_info, run_folder, save_checkpoint
from ..training.metrics_log import append_metrics, forget_after
from ..training.schedule import warmup_cosine
from .inference import segment_stack
from .labels import LABELS
from .network import DEFAULT_CONFIG, TINY_CONFIG, build_segmenter, network_size, to_grid
from .scores import label_scores
from .config import SegTrainConfig
from .store import load_segmenter, save_segmenter

PRESETS = {"default": DEFAULT_CONFIG, "tiny": TINY_CONFIG}
HEART_CENTRED = 0.8
"""Share of crops centred near the labelled heart; the rest are anywhere in the slice."""
METRIC_FIELDS = ["step", "stage", "loss", "lr", "seconds_per_step", "val_dice_rv", "val_dice_myo", "val_dice_lv",
                 "val_dice_mean"]


@dataclass
class LabelledStack:
    patient: str
    image: sitk.Image
    labels: sitk.Image
    slices: torch.Tensor  # (n, 1, H, W) network range, on the network grid
    label_slices: torch.Tensor  # (n, 1, H, W) uint8, on the network grid


def find_labelled(folders: list[str], patients: set[str] | None = None) -> list[tuple[str, Path, Path]]:
    found = [(p, f, find_labels(f)) for p, f in data.find_volumes(folders) if patients is None or p in patients]
    return [(p, f, lab) for p, f, lab in found if lab is not None]


def load_labelled(entries: list[tuple[str, Path, Path]], pixel_mm: float) -> list[LabelledStack]:
    stacks = []
    for patient, image_path, label_path in entries:
        image = validate_volume(read_image(image_path), str(image_path))
        labels = read_image(label_path)
        if labels.GetSize() != image.GetSize():
            raise CalidError(f"labels {label_path} do not match the grid of {image_path}")
        axis = geometry.find_slice_axis(image)
        stack = geometry.to_stack(sitk.GetArrayFromImage(image), axis).astype(np.float32)
        label_stack = geometry.to_stack(sitk.GetArrayFromImage(labels), axis).astype(np.uint8)
        size = network_size(stack.shape[1:], geometry.inplane_spacing(image, axis), pixel_mm)
        slices = to_grid(torch.from_numpy(IntensityMap.fit(stack).to_network(stack))[:, None], size)
        label_slices = to_grid(torch.from_numpy(np.ascontiguousarray(label_stack))[:, None], size, labels=True)
        stacks.append(LabelledStack(patient, image, labels, slices.contiguous(), label_slices.contiguous()))
    return stacks


class LabelledSliceSampler:
    """Random (image, labels) crops with the same flips/rotations for both and intensity jitter for the image."""

    def __init__(self, stacks: list[LabelledStack], crop: int, generator: torch.Generator):
        self.pairs = [(s.slices[i, 0], s.label_slices[i, 0]) for s in stacks for i in range(s.slices.shape[0])]
        self.crop = crop
        self.generator = generator

    def _origin(self, size: int, centre: float | None) -> int:
        g = self.generator
        if size <= self.crop:
            return 0
        if centre is None:
            return int(torch.randint(size - self.crop + 1, (), generator=g))
        jitter = (torch.rand((), generator=g).item() * 2 - 1) * self.crop / 4
        return int(np.clip(round(centre - self.crop / 2 + jitter), 0, size - self.crop))

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        images, labels = [], []
        for i in torch.randint(len(self.pairs), (size,), generator=g).tolist():
            image = data.pad_to(self.pairs[i][0], self.crop, -1.0)
            label = data.pad_to(self.pairs[i][1], self.crop, 0)
            heart = torch.nonzero(label)
            centred = len(heart) > 0 and torch.rand((), generator=g) < HEART_CENTRED
            cy, cx = heart.float().mean(0).tolist() if centred else (None, None)
            y0, x0 = self._origin(image.shape[0], cy), self._origin(image.shape[1], cx)
            pair = torch.stack([image, label.float()])[:, y0:y0 + self.crop, x0:x0 + self.crop]
            pair = data.dihedral(pair, g)
            images.append(data.intensity_jitter(pair[0], g))
            labels.append(pair[1].round().long())
        return torch.stack(images)[:, None], torch.stack(labels)[:, None]


class SegmentationTrainer:
    def __init__(self, cfg: SegTrainConfig, progress_mode: str = "bar"):
        if cfg.preset not in PRESETS:
            raise CalidError(f"unknown preset {cfg.preset} (use {', '.join(PRESETS)})")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.base_card: dict[str, Any] = {}
        if cfg.init:
            network, self.base_card = load_segmenter(cfg.init, "cpu")
            self.config = dict(self.base_card["config"])
        else:
            self.config = dict(PRESETS[cfg.preset])
        self.out = Path(cfg.output)
        self.progress_mode = progress_mode
        self.generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.network = (network if cfg.init else build_segmenter(self.config)).to(self.device)
        self.history: list[dict[str, Any]] = []

    def _prepare_data(self) -> None:
        entries = find_labelled(self.cfg.data)
        if not entries:
            raise CalidError("no labelled volumes found (labels are files named like the image with "
                             f"{'/'.join(LABEL_TAGS)})")
        if self.cfg.resume and (self.out / "split.json").is_file():  # the run's own split, whatever --seed says now
            split = data.load_split(self.out / "split.json")
        elif self.cfg.split:
            split = data.load_split(Path(self.cfg.split))
        else:
            patients = sorted({p for p, _, _ in entries})
            split = data.split_patients([(p, f) for p, f, _ in entries], 0.15, self.cfg.seed, {})
            split["train"] = [p for p in patients if p not in split["validation"]]
        self.split = split
        (self.out / "split.json").write_text(json.dumps(split, indent=2) + "\n", encoding="utf-8")
        train_set, val_set = set(split["train"]), set(split["validation"])
        self.train_stacks = load_labelled([e for e in entries if e[0] in train_set], self.config["pixel_mm"])
        self.val_stacks = load_labelled([e for e in entries if e[0] in val_set], self.config["pixel_mm"])
        if not self.train_stacks:
            raise CalidError("no labelled training volumes in the split's training patients")
        self.sources = sorted({str(Path(p).resolve()) for p in self.cfg.data})

    def run(self) -> Path:
        cfg = self.cfg
        with run_folder(self.out, cfg.resume) as checkpoint:
            self._prepare_data()
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=cfg.lr, weight_decay=1e-4)
        step = 0
        if cfg.resume:
            step = read_checkpoint_info(checkpoint)["step"]
            forget_after(self.out, step)
            self.history = load_checkpoint(checkpoint, {"network": self.network}, optimizer, self.generator)["history"]
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", cfg.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, cfg.steps), last_epoch=step - 1)
        sampler = LabelledSliceSampler(self.train_stacks, cfg.crop, self.generator)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        progress = Progress(self.progress_mode, cfg.steps, "training segmentation")
        progress.advance(step)
        self.network.train()
        running, count, tick = 0.0, 0, time.monotonic()
        while step < cfg.steps:
            images, labels = (t.to(self.device) for t in sampler.batch(cfg.batch))
            with autocast(self.device):
                loss = loss_fn(self.network(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            running, count = running + loss.item(), count + 1
            progress.advance(1, loss=round(loss.item(), 4))
            if step % cfg.log_every == 0 or step == cfg.steps:
                self._log({"step": step, "stage": "segmentation", "loss": running / count,
                           "lr": schedule.get_last_lr()[0], "seconds_per_step": (time.monotonic() - tick) / count}, progress)
                running, count, tick = 0.0, 0, time.monotonic()
            if (step % cfg.val_every == 0 or step == cfg.steps) and self.val_stacks:
                self._validate(step, progress)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(checkpoint, {"network": self.network}, optimizer, self.generator,
                                {"step": step, "history": self.history})
        progress.close()
        return self._export()

    @torch.no_grad()
    def _validate(self, step: int, progress: Progress) -> None:
        self.network.eval()
        scores = []
        for s in self.val_stacks:
            axis = geometry.find_slice_axis(s.image)
            stack = geometry.to_stack(sitk.GetArrayFromImage(s.image), axis).astype(np.float32)
            truth = geometry.to_stack(sitk.GetArrayFromImage(s.labels), axis)
            labels = segment_stack(self.network, self.config, stack, geometry.inplane_spacing(s.image, axis), self.device)
            scores.append(label_scores(labels, truth, hd95=False))
        row = {"step": step, "stage": "validation",
               **{f"val_{k}": float(np.mean([sc[k] for sc in scores])) for k in scores[0]}}
        self._log(row, progress)
        self.network.train()

    def _log(self, row: dict[str, Any], progress: Progress) -> None:
        self.history.append(row)
        append_metrics(self.out, METRIC_FIELDS, row)
        progress.event("metrics", **row)

    def _export(self) -> Path:
        cfg = self.cfg
        validation = [r for r in self.history if r["stage"] == "validation"]
        terms, citation = inherited_provenance(cfg.data_terms, cfg.citation, self.base_card)
        card = {
            "name": cfg.name,
            "description": "2D U-Net segmentation of SAX MRI: 1 RV cavity, 2 LV myocardium, 3 LV cavity",
            "labels": {str(k): v for k, v in LABELS.items()},
            "normalisation": "per volume: 0.5th/99.5th intensity percentiles mapped to -1/+1; slices resampled "
                             f"to {self.config['pixel_mm']} mm pixels",
            "training": {"data": self.sources, "terms": terms, "citation": citation, "split": self.split,
                         "train_volumes": len(self.train_stacks), "steps": cfg.steps, "device": str(self.device),
                         "base_model": self.base_card.get("name"), "base_model_sha256": self.base_card.get("sha256"),
                         "settings": {k: v for k, v in asdict(cfg).items() if k not in ("data", "output", "extra")}},
            "metrics": {"training_validation": {k: v for k, v in (validation[-1] if validation else {}).items()
                                                if k.startswith("val_")}, **cfg.extra},
        }
        return save_segmenter(self.network, self.config, self.out / "model", card)


def train_segmentation(cfg: SegTrainConfig, progress_mode: str = "bar") -> Path:
    return SegmentationTrainer(cfg, progress_mode).run()
