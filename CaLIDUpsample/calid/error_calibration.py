"""The error head's calibration: a monotone map of its log b, per gap size, fitted on training slices.

Why not a constant factor: the Laplace loss makes E[|error| / b] = 1, not E[|error| | b] = b. A factor per gap size
fixed the head's mean, but not its ends: on unseen patients the voxels it gave the least error to had 1.5x less
than it said with 10 mm gaps and 1.5x more with 20 mm gaps (the lowest bins of the reliability table). So the
calibration is E[|error| | b], measured on the training slices in narrow bins of log b for a few gap sizes, made
non-decreasing (isotonic regression: a larger b must still mean a larger expected error, or the map would no longer
rank voxels) and stored in the model's config as a correction of log b at each bin centre:

    log b' = log b + correction(gap, log b)

linear in log b between bin centres, constant beyond the first and last, and linear in the gap between the gap
knots (constant beyond them). ``ErrorCalibration.fit`` does it; ``calid.training.trainer.calibrate_error_head`` calls
it at the end of the error head's stage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import isotonic_regression

GAP_KNOTS_MM = (10.0, 20.0, 30.0)  # the training examples' gaps: 5-10 mm stacks with every 2nd or 3rd slice removed
LOG_SCALE_EDGES = np.linspace(-7.0, 1.0, 65)  # bins of log b 0.125 wide: b from 1e-3 to 2.7 network units
MIN_BIN_WEIGHT = 500.0  # voxels (gap-weighted) a bin needs for its own correction; emptier bins are interpolated
NEAR_KNOT_MM = 2.5  # a refit refits a gap knot only from gaps this near it (``fit``'s ``keep``)


def _bracket(values: torch.Tensor, knots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each value, the knot interval it lies in and its place there: (upper knot index i >= 1, t in [0, 1]),
    so that linear interpolation is ``f[i - 1] * (1 - t) + f[i] * t``, constant beyond the first and last knot.
    Needs at least two knots."""
    i = torch.searchsorted(knots, values.contiguous(), right=True).clamp(1, len(knots) - 1)
    return i, ((values - knots[i - 1]) / (knots[i] - knots[i - 1])).clamp(0, 1)


def gap_weights(gap_mm: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """(N, len(knots)): hat weights of each gap on the gap knots, clamped beyond the first and last knot."""
    g = gap_mm.reshape(-1).to(knots.dtype)
    if len(knots) == 1:
        return torch.ones(len(g), 1, dtype=knots.dtype, device=g.device)
    i, t = _bracket(g, knots)
    w = torch.zeros(len(g), len(knots), dtype=knots.dtype, device=g.device)
    w.scatter_(1, (i - 1)[:, None], (1 - t)[:, None])
    w.scatter_add_(1, i[:, None], t[:, None])
    return w


class ErrorCalibration:
    """``log b -> log b + correction(gap, log b)``; the identity until fitted. Config: ``to_config`` / the constructor."""

    def __init__(self, cfg: dict[str, Any] | None = None):
        cfg = cfg or {}
        self.gaps_mm = torch.tensor(cfg.get("gaps_mm", [GAP_KNOTS_MM[0]]), dtype=torch.float32)
        self.log_scale = torch.tensor(cfg.get("log_scale", [0.0]), dtype=torch.float32)
        self.correction = torch.tensor(cfg.get("correction", [[0.0]]), dtype=torch.float32)
        if self.correction.shape != (len(self.gaps_mm), len(self.log_scale)):
            raise ValueError(f"the calibration's correction must be {len(self.gaps_mm)} x {len(self.log_scale)} (gap "
                             f"knots x log-scale knots), not {tuple(self.correction.shape)}")

    def to_config(self) -> dict[str, Any]:
        return {"gaps_mm": [round(float(g), 3) for g in self.gaps_mm],
                "log_scale": [round(float(x), 5) for x in self.log_scale],
                "correction": [[round(float(c), 5) for c in row] for row in self.correction]}

    def __call__(self, log_scale: torch.Tensor, gap_mm: torch.Tensor) -> torch.Tensor:
        """Calibrated log b (N, 1, H, W) from the head's raw log b and the gap (N,) in mm."""
        knots, corr = self.log_scale.to(log_scale.device), self.correction.to(log_scale.device)
        x = log_scale.float()
        if len(knots) == 1:
            per_gap = corr[:, 0].reshape(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[1:])
        else:
            i, t = _bracket(x, knots)
            per_gap = torch.stack([row[i - 1] * (1 - t) + row[i] * t for row in corr], dim=1)  # (N, G, 1, H, W)
        w = gap_weights(gap_mm, self.gaps_mm.to(log_scale.device))
        return (x + (per_gap * w.reshape(*w.shape, 1, 1, 1)).sum(1)).to(log_scale.dtype)

    def correction_at(self, gap_mm: float, log_scale: np.ndarray) -> np.ndarray:
        """The correction this calibration adds at ``gap_mm`` to each raw log b of ``log_scale``."""
        x = torch.tensor(log_scale, dtype=torch.float32).reshape(1, 1, 1, -1)
        return (self(x, torch.tensor([gap_mm])) - x).reshape(-1).double().numpy()

    @classmethod
    def fit(cls, pairs, keep: "ErrorCalibration | None" = None) -> "ErrorCalibration":
        """From (raw log b (N, 1, H, W), |error| (N, 1, H, W), gap mm (N,)) tensors: every training voxel binned by
        log b and weighted onto the gap knots; per knot, the bins' mean |error|, made non-decreasing in b by
        isotonic regression, over the bins' mean b is the correction.

        ``keep``, the calibration a refit replaces, keeps its own row for a gap knot that no gap within
        ``NEAR_KNOT_MM`` of it reaches: a site whose stacks are all 8-10 mm apart gives 16-20 mm gaps, and without
        the measured row the 10 mm knot was refitted from 16 mm gaps (or the 20 mm row stood in for it)."""
        knots = torch.tensor(GAP_KNOTS_MM, dtype=torch.float64)
        edges = torch.from_numpy(LOG_SCALE_EDGES)
        bins = len(edges) - 1
        weight, predicted, actual = (torch.zeros(len(knots), bins, dtype=torch.float64) for _ in range(3))
        near = torch.zeros(len(knots), dtype=torch.float64)  # voxels whose gap lies near each knot
        for log_scale, error, gap_mm in pairs:
            items_near = ((gap_mm.double().reshape(-1, 1) - knots).abs() <= NEAR_KNOT_MM).sum(0)  # per knot
            near += items_near * log_scale[0].numel()
            index = torch.bucketize(log_scale.double().flatten(1), edges[1:-1]).flatten()  # per voxel, items first
            b, e = log_scale.double().exp().flatten(1), error.double().flatten(1)
            for k, wk in enumerate(gap_weights(gap_mm, knots).unbind(1)):
                scale = wk[:, None].expand_as(b)
                weight[k] += torch.bincount(index, scale.flatten(), bins)
                predicted[k] += torch.bincount(index, (scale * b).flatten(), bins)
                actual[k] += torch.bincount(index, (scale * e).flatten(), bins)
        pooled = weight.sum(0)
        used = (pooled >= MIN_BIN_WEIGHT).numpy()
        if not used.any():
            return cls()
        centres = np.log((predicted.sum(0) / pooled.clamp(min=1e-12)).numpy()[used])
        gaps, rows = [], []
        for k in range(len(knots)):
            full = (weight[k] >= MIN_BIN_WEIGHT).numpy()
            if keep is not None and near[k] < MIN_BIN_WEIGHT and float(knots[k]) in keep.gaps_mm.tolist():
                gaps.append(float(knots[k]))
                rows.append(keep.correction_at(float(knots[k]), centres).tolist())
                continue
            if not full.any():
                continue
            log_b = np.log((predicted[k] / weight[k].clamp(min=1e-12)).numpy()[full])
            mean_error = (actual[k] / weight[k].clamp(min=1e-12)).numpy()[full]
            monotone = isotonic_regression(mean_error, weights=weight[k].numpy()[full]).x
            # Resampled at the shared centres, a non-decreasing piecewise-linear map stays non-decreasing.
            gaps.append(float(knots[k]))
            rows.append(np.interp(centres, log_b, np.log(np.maximum(monotone, 1e-6)) - log_b).tolist())
        return cls({"gaps_mm": gaps, "log_scale": centres.tolist(), "correction": rows})

    @classmethod
    def from_line(cls, log_factor: float, log_factor_per_10mm: float) -> "ErrorCalibration":
        """The first heads' calibration, a factor per gap (log b += log_factor + per_10mm x gap / 10 mm), in this
        form: exact from 10 to 30 mm, constant beyond."""
        return cls({"gaps_mm": list(GAP_KNOTS_MM), "log_scale": [0.0],
                    "correction": [[log_factor + log_factor_per_10mm * g / 10.0] for g in GAP_KNOTS_MM]})
