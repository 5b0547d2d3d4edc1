"""Image quality on removed slices, as ``shared/docs/evaluation.md`` defines it.

Both the real and the reconstructed slices are scaled to [0, 1] by the real volume's 1st and 99th
percentiles and clipped; PSNR and SSIM (scikit-image, data range 1) are computed per slice and averaged.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .slice_positions import dense_positions


def unit_range(reference: np.ndarray) -> tuple[float, float]:
    """(1st percentile, its distance to the 99th) of a real volume: the scale every image metric is on."""
    low, high = np.percentile(reference, [1, 99])
    return float(low), max(float(high - low), 1e-12)


def unit_scale(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    low, scale = unit_range(reference)
    return np.clip((values.astype(np.float64) - low) / scale, 0.0, 1.0)


def slice_scores(real: np.ndarray, estimate: np.ndarray, reference: np.ndarray,
                 box: tuple[slice, slice] | None = None) -> tuple[float, float]:
    """Mean PSNR and SSIM over slices (slice axis first), optionally inside an in-plane box. A slice rebuilt
    exactly scores 100 dB (PSNR is infinite there)."""
    real_u, est_u = unit_scale(real, reference), unit_scale(estimate, reference)
    if box is not None:
        real_u, est_u = real_u[(slice(None), *box)], est_u[(slice(None), *box)]
    psnr, ssim = [], []
    for r, e in zip(real_u, est_u):
        mse = np.mean((r - e) ** 2)
        psnr.append(100.0 if mse == 0 else peak_signal_noise_ratio(r, e, data_range=1.0))
        side = min(7, *r.shape)
        win = side if side % 2 else side - 1  # scikit-image's 7x7 window; the largest odd one on a smaller box
        ssim.append(structural_similarity(r, e, data_range=1.0, win_size=win))
    return float(np.mean(psnr)), float(np.mean(ssim))


def heart_box(labels: np.ndarray, margin: int = 10) -> tuple[slice, slice] | None:
    """In-plane bounding box of all labelled voxels of a stack (slices first), with a margin in pixels."""
    mask = labels.any(axis=0) if labels.ndim == 3 else labels
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask)
    return (slice(max(rows.min() - margin, 0), rows.max() + margin + 1),
            slice(max(cols.min() - margin, 0), cols.max() + margin + 1))


def linear_missing(kept: np.ndarray, factor: int) -> np.ndarray:
    """Linear interpolation along the slice axis of the missing slices, in ``dense_positions`` order."""
    below, above, alpha = dense_positions(kept.shape[0], factor)
    a = alpha[:, None, None]
    return (1 - a) * kept[below].astype(np.float64) + a * kept[above].astype(np.float64)
