"""The refiner's losses (``calid train --refiner-loss``): what the pixel-space stage after decoding is asked for.

``l1+ssim``: the MSE- or L1-optimal refiner blurs, which costs SSIM against the morph, whose warped real images keep
their contrast; an SSIM term asks for that contrast back (Zhao et al., IEEE TCI 2017). ``l1+ssim+seg`` adds
segmentation consistency: the bundled segmenter (frozen) must see in the refined slice what it sees in the real one
(cross-entropy of its class probabilities on the refined slice against those on the real slice). Why: a refiner
trained for pixels alone raised PSNR and SSIM but lowered the segmenter's Dice on the new slices (the walls a
pixel loss trades off are what a segmentation is made of); no labels are needed, the real slice's own
segmentation is the target.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss

SSIM_WEIGHT = 0.5
SEGMENTATION_WEIGHT = 1.0
_SSIM = SSIMLoss(spatial_dims=2, data_range=2.0, kernel_type="uniform", win_size=7)  # calid.metrics' SSIM window

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l1_ssim_loss(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 plus SSIM_WEIGHT x (1 - SSIM), the SSIM as ``calid.metrics`` scores it (7 x 7 uniform window) over the
    network's range, shifted to [0, 2] as SSIM's luminance term expects non-negative images."""
    return F.l1_loss(estimate, target) + SSIM_WEIGHT * _SSIM(estimate + 1, target + 1)


class SegmentationConsistencyLoss:
    """``l1_ssim_loss`` plus SEGMENTATION_WEIGHT x the frozen segmenter's cross-entropy between refined and real.

    The crops are at the scanner's pixel size, not the segmenter's 1.5 mm grid: close enough for ACDC's 1.3-1.9 mm
    pixels, and the term compares two images of the same size, not an image with a label map."""

    def __init__(self, device: torch.device):
        from ..segmentation.store import load_segmenter

        self.segmenter, _ = load_segmenter(None, device)
        for p in self.segmenter.parameters():
            p.requires_grad_(False)

    def __call__(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            seen = self.segmenter(target).softmax(1)
        consistency = F.cross_entropy(self.segmenter(estimate), seen)
        return l1_ssim_loss(estimate, target) + SEGMENTATION_WEIGHT * consistency


def refiner_loss(name: str, device: torch.device) -> Loss:
    if name == "l1+ssim+seg":
        return SegmentationConsistencyLoss(device)
    return {"mse": F.mse_loss, "l1": F.l1_loss, "l1+ssim": l1_ssim_loss}[name]
