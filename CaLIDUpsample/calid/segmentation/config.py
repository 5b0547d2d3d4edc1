"""Settings of ``calid train-segmentation`` (imports nothing heavy: the CLI builds its parser from them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SegTrainConfig:
    data: list[str]
    output: str
    split: str | None = None
    init: str | None = None  # start from this segmentation model (continue training, or fine-tune on a site's data)
    preset: str = "default"
    steps: int = 3000
    batch: int = 16
    crop: int = 128
    lr: float = 2e-3
    warmup: int = 100
    val_every: int = 500
    log_every: int = 50
    checkpoint_every: int = 250
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    name: str = "calid-segmentation"
    data_terms: str = "as stated by the data owner"
    citation: str = ""
    extra: dict = field(default_factory=dict)
