"""The segmentation network (a 2D MONAI U-Net) and the in-plane grid it sees.

Slices are resampled to a fixed pixel size (``pixel_mm`` in the config, 1.5 mm: the median of ACDC) before
the network and the class probabilities are resampled back, so the network sees hearts of one physical
size whatever the scanner's matrix and field of view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from .labels import LABELS

DEFAULT_CONFIG = {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2,
                  "pixel_mm": 1.5, "classes": len(LABELS) + 1}
TINY_CONFIG = {**DEFAULT_CONFIG, "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
SPATIAL_MULTIPLE = 16


def build_segmenter(config: dict) -> torch.nn.Module:
    return UNet(spatial_dims=2, in_channels=1, out_channels=config["classes"], channels=config["channels"],
                strides=config["strides"], num_res_units=config["num_res_units"])


def network_size(shape: tuple[int, int], spacing: tuple[float, float], pixel_mm: float) -> tuple[int, int]:
    """Rows and columns of a slice of ``shape`` pixels of ``spacing`` mm when resampled to ``pixel_mm``."""
    return tuple(max(1, round(n * s / pixel_mm)) for n, s in zip(shape, spacing))


def to_grid(slices: torch.Tensor, size: tuple[int, int], labels: bool = False) -> torch.Tensor:
    """Resample (batch, channels, rows, cols): bilinear for images/probabilities, nearest for label maps."""
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    if labels:
        return F.interpolate(slices.float(), size=size, mode="nearest-exact").to(slices.dtype)
    return F.interpolate(slices, size=size, mode="bilinear", align_corners=False)


def pad_to_multiple(x: torch.Tensor, value: float, multiple: int = SPATIAL_MULTIPLE) -> tuple[torch.Tensor, tuple]:
    """Pad the last two dimensions to a multiple of the U-Net's total stride, and to at least two of it (its deepest
    layer normalises over its pixels and refuses a single one: a field of view under 24 mm failed); returns the crop
    to undo it."""
    h, w = x.shape[-2:]
    ph, pw = (max(-size % multiple, 2 * multiple - size) for size in (h, w))
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)
    return x, (slice(ph // 2, ph // 2 + h), slice(pw // 2, pw // 2 + w))
