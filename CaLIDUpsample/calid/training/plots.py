"""The training curves PNG: loss per stage and validation PSNR of the model next to linear interpolation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    for stage in ("vae", "denoiser"):
        rows = [r for r in history if r.get("stage") == stage]
        if rows:
            ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{stage} loss")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    if ax_loss.lines:  # a validation logged before the first loss row: no curve yet, and no legend to warn about
        ax_loss.legend()
    val = [r for r in history if r.get("stage") == "validation"]
    if val:
        for key, label in (("val_psnr_model", "CaLID"), ("val_psnr_linear", "linear")):
            ax_val.plot([r["step"] for r in val], [r[key] for r in val], marker="o", label=label)
        ax_val.legend()
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("PSNR on removed slices, K=2 (dB)")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
