"""Segmentation model folders: ``model.safetensors`` + ``model.json`` (format ``calid-segmentation/1``).

They live where interpolation models live (bundled ``calid/models/``, then the user models folder) and are
told apart by the card's format, so each model selector lists only its own kind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CalidError
from ..modelindex import CARD_FILE, DEFAULT_SEGMENTATION_MODEL, SEGMENTATION_FORMAT
from ..modelstore import (build_checked, load_state_checked, read_card_of, read_weights, resolve_model_dir,
                          write_model_dir)
from .network import build_segmenter

CONFIG_KEYS = ("channels", "strides", "num_res_units", "pixel_mm", "classes")


def load_segmenter(name_or_dir: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load and verify a segmentation model; returns ``(network in eval mode on device, card)``."""
    model_dir = resolve_model_dir(name_or_dir, DEFAULT_SEGMENTATION_MODEL, SEGMENTATION_FORMAT)
    card = read_card_of(model_dir, SEGMENTATION_FORMAT)
    config = card.get("config", {})
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise CalidError(f"model card {model_dir / CARD_FILE} lacks config entries: {', '.join(missing)}")
    pixel_mm = config["pixel_mm"]
    if isinstance(pixel_mm, bool) or not isinstance(pixel_mm, (int, float)) or not 0.1 <= pixel_mm <= 10:
        raise CalidError(f"model card {model_dir / CARD_FILE} has an invalid config: pixel_mm must be a number of mm "
                         f"from 0.1 to 10, not {pixel_mm!r}")
    state = read_weights(model_dir, card)
    network = build_checked(build_segmenter, config, state, model_dir)
    load_state_checked(network, state, model_dir)
    return network.to(device).eval(), card


def save_segmenter(network: torch.nn.Module, config: dict, model_dir: str | os.PathLike,
                   card: dict[str, Any]) -> Path:
    return write_model_dir(network, model_dir, {**card, "format": SEGMENTATION_FORMAT, "config": config})
