"""Is an uncertainty map calibrated? ``calid evaluate --uncertainty`` asks it of the model's map on removed slices.

A map is calibrated when its value is the expected size of the error where it says so: pooled over the voxels of
a setting, mean predicted / mean actual absolute error is 1, and so it is in every bin of voxels grouped by their
predicted error (the reliability table; its diagram is ``save_reliability_diagram``). The Spearman correlation
says whether it also ranks the voxels (where). Volumes are pooled after dividing both by the volume's 1st-99th
percentile range, the scale of the image metrics (``metrics.unit_range``), so that no scanner's units dominate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr

BINS = 10
SPEARMAN_VOXELS = 200_000
MIN_BIN_SHARE = 0.01  # bins with fewer voxels are listed but not judged


@dataclass
class CalibrationPool:
    """Predicted and actual absolute errors of the removed slices of many volumes, on the metrics' unit scale."""

    predicted: list[np.ndarray] = field(default_factory=list)
    actual: list[np.ndarray] = field(default_factory=list)

    def add(self, predicted: np.ndarray, actual: np.ndarray, scale: float) -> None:
        self.predicted.append((np.asarray(predicted, np.float64) / scale).ravel().astype(np.float32))
        self.actual.append((np.abs(np.asarray(actual, np.float64)) / scale).ravel().astype(np.float32))

    def report(self) -> dict:
        return calibration_report(np.concatenate(self.predicted), np.concatenate(self.actual))


def calibration_report(predicted: np.ndarray, actual: np.ndarray, bins: int = BINS, seed: int = 0) -> dict:
    """Ratio of means, Spearman correlation and the reliability table of voxel-wise predicted vs actual |error|.

    Bins are equal-width in predicted error up to its 99.5th percentile (the last one open above), so that a
    bin's place on the axis means the same in every table; each lists its share of voxels, mean predicted, mean
    and RMS actual error and their ratio (predicted / mean actual).
    """
    predicted, actual = predicted.astype(np.float64), actual.astype(np.float64)
    if not (np.isfinite(predicted).all() and np.isfinite(actual).all()):  # a NaN bin was skipped, not judged
        raise ValueError("a predicted or actual error is NaN or infinite: no calibration can be judged")
    pick = np.random.default_rng(seed).permutation(len(predicted))[:SPEARMAN_VOXELS]
    top = float(np.percentile(predicted, 99.5))
    edges = np.linspace(0.0, top, bins + 1)
    which = np.clip(np.digitize(predicted, edges[1:-1]), 0, bins - 1)
    table = []
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        mean_predicted, mean_actual = float(predicted[inside].mean()), float(actual[inside].mean())
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]) if b < bins - 1 else None,
                      "share": float(inside.mean()), "mean_predicted": mean_predicted, "mean_actual": mean_actual,
                      "rms_actual": float(np.sqrt((actual[inside] ** 2).mean())),
                      "ratio": mean_predicted / max(mean_actual, 1e-12)})
    judged = [row["ratio"] for row in table if row["share"] >= MIN_BIN_SHARE]
    return {"voxels": int(len(predicted)), "mean_predicted": float(predicted.mean()),
            "mean_actual": float(actual.mean()), "ratio": float(predicted.mean() / max(actual.mean(), 1e-12)),
            "spearman": float(spearmanr(predicted[pick], actual[pick]).statistic),
            "worst_bin_ratios": [min(judged), max(judged)] if judged else None, "bins": table}


def markdown(reports: dict[str, dict]) -> str:
    """``reports``: setting name -> {"slice": report, "heart": report}: a summary line per region, then the bins."""
    lines = ["| setting | region | voxels | mean predicted | mean actual | ratio | Spearman | bin ratios (>= 1 %) |",
             "|---|---|---|---|---|---|---|---|"]
    for setting, regions in reports.items():
        for region, r in regions.items():
            worst = "–" if r["worst_bin_ratios"] is None else "{:.2f}–{:.2f}".format(*r["worst_bin_ratios"])
            lines.append(f"| {setting} | {region} | {r['voxels']} | {r['mean_predicted']:.4f} | {r['mean_actual']:.4f} "
                         f"| {r['ratio']:.2f} | {r['spearman']:.2f} | {worst} |")
    lines += ["", "| setting | region | predicted bin | share | mean predicted | mean actual | RMS actual | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for setting, regions in reports.items():
        for region, r in regions.items():
            for row in r["bins"]:
                high = "∞" if row["high"] is None else f"{row['high']:.3f}"
                lines.append(f"| {setting} | {region} | {row['low']:.3f}–{high} | {100 * row['share']:.1f} % "
                             f"| {row['mean_predicted']:.4f} | {row['mean_actual']:.4f} | {row['rms_actual']:.4f} "
                             f"| {row['ratio']:.2f} |")
    return "\n".join(lines)


def save_reliability_diagram(reports: dict[str, dict], path) -> None:
    """Mean actual against mean predicted |error| per bin (marker area: share of voxels), with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(4.2 * len(reports), 4.0), squeeze=False)
    for ax, (setting, regions) in zip(axes[0], reports.items()):
        top = 0.0
        for region, r in regions.items():
            x = [row["mean_predicted"] for row in r["bins"]]
            y = [row["mean_actual"] for row in r["bins"]]
            ax.plot(x, y, "-", alpha=0.6)
            ax.scatter(x, y, s=[4 + 400 * row["share"] for row in r["bins"]],
                       label=f"{region}: ratio {r['ratio']:.2f}, ρ {r['spearman']:.2f}")
            top = max(top, *x, *y)
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="calibrated")
        ax.set_xlabel("predicted |error| (1st–99th percentile range = 1)")
        ax.set_ylabel("actual mean |error|")
        ax.set_title(setting, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
