"""``calid evaluate``: the removed-slice protocol of ``shared/docs/evaluation.md``.

For each stack and factor K: keep slices 0, K, 2K, ... (dropping the tail), upsample the kept stack with
the full product path (``upsample_image``: geometry, intensity mapping, model), and score the removed
slices against the real ones, next to linear and cubic B-spline interpolation (SimpleITK) of the same kept
stack, and the optical-flow morph (``calid.motion``, TV-L1 with the protocol's settings: the strongest peer that
needs no training). Heart-region scores use the bounding box of the manual labels found beside the image.
``--uncertainty`` also judges the model's uncertainty map against the actual errors of the same slices
(``calid.calibration``).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry, slice_positions
from .calibration import CalibrationPool, markdown as calibration_markdown, save_reliability_diagram
from .devices import resolve_device
from .engine import UpsampleOptions, upsample_image
from .errors import CalidError
from .generation import default_steps
from .imageio import FILE_SUFFIXES, find_labels, read_header, read_image, validate_volume
from .metrics import heart_box, linear_missing, slice_scores, unit_range, unit_scale
from .modelstore import load_model
from .motion import morph_missing
from .paired import describe, paired_difference
from .progress import Progress
from .training.data import find_volumes, load_split
from .training.duplicates import leaked

SCORED_METHODS = ("calid", "morph", "linear", "bspline")  # what the removed-slice protocol scores, CaLID first
PAIRED_SCORES = ("heart_psnr", "heart_ssim", "psnr", "ssim")  # CaLID minus each peer, volume by volume
PEER_FLOW = "tvl1"  # the morph as shared/docs/evaluation.md defines it


@dataclass
class EvaluateConfig:
    data: list[str]
    output: str
    model: str | None = None
    factors: list[int] | None = None
    patients: str | None = None
    max_spacing: float | None = None
    min_spacing: float | None = None
    steps: int | None = None
    samples: int = 1
    plus: bool = False
    seed: int = 0
    device: str = "auto"
    montage: bool = False
    uncertainty: bool = False


@dataclass
class PatientSelection:
    """The patients an evaluation scores (None: all), and the validation patients of a split it leaves out because
    they share a scan with one of its training patients (``training.duplicates``) -> those training patients."""

    wanted: set[str] | None
    left_out: dict[str, list[str]] = field(default_factory=dict)

    def note(self) -> str:
        """One line for the report, or "" when nothing was left out."""
        if not self.left_out:
            return ""
        named = "; ".join(f"{p} (its scans are {', '.join(t)}'s)" for p, t in self.left_out.items())
        return f"Left out, a training patient's scans under another name: {named}."


def select_patients(spec: str | None, data: list[str]) -> PatientSelection:
    """``--patients``: a split file or model card (its validation patients, less any that duplicate a training
    patient's scans in ``data``), or a comma-separated list of patients, or nothing (every patient)."""
    if not spec:
        return PatientSelection(None)
    if Path(spec).is_file():
        split = load_split(Path(spec))
        left_out = leaked(split, find_volumes(data))
        return PatientSelection(set(split["validation"]) - set(left_out), left_out)
    return PatientSelection({p.strip() for p in spec.split(",") if p.strip()})


def protocol_images(image: sitk.Image, axis: int, m: int, factor: int) -> tuple[sitk.Image, sitk.Image]:
    """The removed-slice protocol's two images of a stack: its first ``m`` slices (the reference grid) and every
    ``factor``-th of them (what is upsampled), both starting at the stack's origin."""
    index = [slice(None)] * 3
    index[axis] = slice(0, m)
    real_image = image[tuple(index)]
    index[axis] = slice(0, m, factor)
    kept_image = image[tuple(index)]
    kept_image.SetOrigin(image.GetOrigin())
    return real_image, kept_image


def bspline_on_grid(kept: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Cubic B-spline resampling of the kept stack onto the original grid (what a Slicer user would do)."""
    resampled = sitk.Resample(sitk.Cast(kept, sitk.sitkFloat64), reference, sitk.Transform(), sitk.sitkBSpline, 0.0)
    return sitk.GetArrayFromImage(resampled)


def peer_missing(stack: np.ndarray, kept_image: sitk.Image, real_image: sitk.Image, factor: int,
                 axis: int) -> tuple[dict[str, np.ndarray], float]:
    """The removed slices of ``stack`` (slices first, at least ``real_image``'s) rebuilt by each peer from the kept
    ones (``protocol_images``): the TV-L1 morph, linear and cubic B-spline interpolation; and the morph's seconds."""
    m = real_image.GetSize()[axis]
    kept = stack[:m:factor]
    started = time.perf_counter()
    morph = morph_missing(kept, factor, PEER_FLOW)
    seconds = time.perf_counter() - started
    removed = slice_positions.removed_slices(m, factor)
    return {"morph": morph, "linear": linear_missing(kept, factor),
            "bspline": geometry.to_stack(bspline_on_grid(kept_image, real_image), axis)[removed]}, seconds


def evaluate_volume(image: sitk.Image, labels: sitk.Image | None, factor: int, options: UpsampleOptions,
                    model, progress: Progress, want_uncertainty: bool = False) -> dict | None:
    """Scores of one stack at one factor, or None when it has too few slices for K.

    ``want_uncertainty``: the row also carries, under ``_calibration``, the predicted and actual absolute errors of
    the removed slices, the volume's scale and the heart box, for ``calibration.CalibrationPool``.
    """
    axis = geometry.find_slice_axis(image)
    n = image.GetSize()[axis]
    m = slice_positions.protocol_count(n, factor)
    if m < factor + 1:
        return None
    real_image, kept_image = protocol_images(image, axis, m, factor)
    result = upsample_image(kept_image, UpsampleOptions(**{**options.__dict__, "factor": factor}), model, progress,
                            want_uncertainty)
    if result.image.GetSize() != real_image.GetSize() or not np.allclose(result.image.GetSpacing(), real_image.GetSpacing()):
        raise CalidError(f"upsampled grid {result.image.GetSize()} does not match the original {real_image.GetSize()}")
    real = geometry.to_stack(sitk.GetArrayFromImage(real_image), axis).astype(np.float64)
    removed = slice_positions.removed_slices(m, factor)
    peers, morph_seconds = peer_missing(real, kept_image, real_image, factor, axis)
    estimates = {"calid": geometry.to_stack(sitk.GetArrayFromImage(result.image), axis)[removed], **peers}
    box = None
    if labels is not None:
        label_stack = geometry.to_stack(sitk.GetArrayFromImage(labels), axis)[:m]
        box = heart_box(label_stack > 0)
    row = {"factor": factor, "slices": m, "removed": len(removed), "seconds": round(result.seconds, 3),
           "morph_seconds": round(morph_seconds, 3), "device": result.device}
    for method, estimate in estimates.items():
        row[f"{method}_psnr"], row[f"{method}_ssim"] = slice_scores(real[removed], estimate, real)
        if box is not None:
            row[f"{method}_heart_psnr"], row[f"{method}_heart_ssim"] = slice_scores(real[removed], estimate, real, box)
    if want_uncertainty:
        predicted = geometry.to_stack(sitk.GetArrayFromImage(result.uncertainty), axis)[removed]
        row["_calibration"] = (predicted, real[removed] - estimates["calid"], unit_range(real)[1], box)
    row["_montage"] = (unit_scale(real[removed][len(removed) // 2], real),
                       {k: unit_scale(v[len(removed) // 2], real) for k, v in estimates.items()})
    return row


def evaluate(cfg: EvaluateConfig, progress_mode: str = "bar") -> str:
    selection = select_patients(cfg.patients, cfg.data)
    wanted = selection.wanted
    entries = [(p, f) for p, f in find_volumes(cfg.data) if wanted is None or p in wanted]
    if not entries:
        raise CalidError("no volumes to evaluate (check the data folders and --patients)")
    device = resolve_device(cfg.device)
    model, card = load_model(cfg.model, device)
    options = UpsampleOptions(steps=cfg.steps, seed=cfg.seed, samples=cfg.samples, plus=cfg.plus, device=str(device))
    factors = cfg.factors or [2]
    rows, montages = [], []
    pools: dict[tuple, dict[str, CalibrationPool]] = defaultdict(lambda: defaultdict(CalibrationPool))
    overall = Progress(progress_mode, len(entries) * len(factors), "evaluating")
    cines = []
    for patient, path in entries:
        header = read_header(path)  # ACDC's patientNNN_4d.nii.gz beside the frames: known without its voxels
        if header is not None and header.GetDimension() == 4 and header.GetSize()[3] > 1:
            cines.append(str(path))
            overall.advance(len(factors))
            continue
        image = validate_volume(read_image(path), str(path))
        spacing = image.GetSpacing()[geometry.find_slice_axis(image)]
        if (cfg.max_spacing and spacing > cfg.max_spacing) or (cfg.min_spacing and spacing < cfg.min_spacing):
            overall.advance(len(factors))
            continue
        label_path = find_labels(path)
        labels = read_image(label_path) if label_path else None
        for factor in factors:
            row = evaluate_volume(image, labels, factor, options, model, Progress("none"), cfg.uncertainty)
            overall.advance(1)
            if row is None:
                continue
            preview = row.pop("_montage")
            row.update(patient=patient, file=str(path), spacing_mm=round(spacing, 3))
            if cfg.uncertainty:
                predicted, error, scale, box = row.pop("_calibration")
                setting = (factor, row["spacing_mm"])
                pools[setting]["slice"].add(predicted, error, scale)
                if box is not None:
                    pools[setting]["heart"].add(predicted[(slice(None), *box)], error[(slice(None), *box)], scale)
            rows.append(row)
            montages.append((row, preview))
    overall.close()
    if not rows:
        raise CalidError("no stack had enough slices for the requested factors")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    report = {"model": card.get("name"), "model_sha256": card.get("sha256"), "device": str(device),
              "steps": cfg.steps or default_steps(model), "samples": cfg.samples, "plus": cfg.plus,
              "summary": summary, "volumes": rows, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    table = markdown_table(summary, str(device), cfg.uncertainty)
    if cines:
        report["skipped_cines"] = cines
        table += (f"\n\nSkipped {len(cines)} cine(s) (4D files; the protocol scores the single-phase volumes, "
                  "ACDC's ED and ES frames): " + ", ".join(Path(c).name for c in cines))
    if selection.left_out:
        report["left_out"] = selection.left_out
        table += "\n\n" + selection.note()
    if cfg.uncertainty:
        calibration = {setting_name(*setting): {region: pool.report() for region, pool in regions.items()}
                       for setting, regions in sorted(pools.items())}
        report["calibration"] = calibration
        table += "\n\nUncertainty map against the actual |error| of the removed slices:\n\n" + \
            calibration_markdown(calibration)
        save_reliability_diagram(calibration, out / "reliability.png")
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    if cfg.montage:
        save_montage(montages, out / "montage.png")
    return table


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["factor"], row["spacing_mm"])].append(row)
    summary = []
    for (factor, spacing), members in sorted(groups.items()):
        entry = {"factor": factor, "spacing_mm": spacing, "gap_mm": spacing * factor, "volumes": len(members),
                 "patients": len({r["patient"] for r in members}),
                 "seconds_per_volume": float(np.mean([r["seconds"] for r in members])),
                 "morph_seconds_per_volume": float(np.mean([r["morph_seconds"] for r in members]))}
        entry["heart_volumes"] = sum("calid_heart_psnr" in r for r in members)  # those with labels
        for key in sorted({key for r in members for key in r}):  # every volume's keys: the first may lack labels
            if key.endswith(("_psnr", "_ssim")):
                values = [r[key] for r in members if key in r]
                entry[key] = float(np.mean(values))
                entry[key + "_sd"] = float(np.std(values))
        entry["calid_minus"] = {peer: _calid_minus(members, peer) for peer in SCORED_METHODS[1:]}
        summary.append(entry)
    return summary


def _calid_minus(members: list[dict], peer: str) -> dict[str, dict]:
    """``paired.paired_difference`` of CaLID and ``peer`` for each of ``PAIRED_SCORES``, over the volumes that have
    it (heart scores need labels)."""
    paired = {}
    for score in PAIRED_SCORES:
        having = [r for r in members if f"calid_{score}" in r]
        if having:
            paired[score] = paired_difference([r[f"calid_{score}"] for r in having],
                                              [r[f"{peer}_{score}"] for r in having])
    return paired


def setting_name(factor: int, spacing_mm: float) -> str:
    return f"K={factor}, {spacing_mm:g} mm stacks ({spacing_mm * factor:g} mm gaps)"


def markdown_table(summary: list[dict], device: str, with_map: bool) -> str:
    lines = ["| setting | vols | method | PSNR dB | SSIM | heart PSNR dB | heart SSIM | s/vol |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        setting = setting_name(s["factor"], s["spacing_mm"])
        if s["heart_volumes"] != s["volumes"]:
            setting += f" (heart scores: the {s['heart_volumes']} with labels)"
        for method in SCORED_METHODS:
            heart = (f"{s[f'{method}_heart_psnr']:.2f} ± {s[f'{method}_heart_psnr_sd']:.2f} | "
                     f"{s[f'{method}_heart_ssim']:.3f}") if f"{method}_heart_psnr" in s else "– | –"
            seconds = {"calid": f"{s['seconds_per_volume']:.2f}",
                       "morph": f"{s['morph_seconds_per_volume']:.2f}"}.get(method, "")
            lines.append(f"| {setting} | {s['volumes']} | {method} | {s[f'{method}_psnr']:.2f} ± "
                         f"{s[f'{method}_psnr_sd']:.2f} | {s[f'{method}_ssim']:.3f} | {heart} | {seconds} |")
    lines += ["", "Scores per removed slice, averaged per volume, then over the volumes (each ED and each ES stack "
              "once); ± is the standard deviation across volumes. Heart: the in-plane box of all labels of the "
              f"volume, 10 px margin. s/vol: in process on {device}, model load and process start excluded"
              f"{', the uncertainty map included' if with_map else ''}; the morph's: its TV-L1 flows and warps.",
              "", "CaLID minus each peer, paired volume by volume: mean ± standard error (volumes where CaLID "
              "scores higher / volumes).", "",
              "| setting | peer | heart PSNR dB | heart SSIM | PSNR dB | SSIM |", "|---|---|---|---|---|---|"]
    for s in summary:
        for peer, scores in s["calid_minus"].items():
            cells = [describe(scores[k], 3 if k.endswith("psnr") else 4) if k in scores else "–"
                     for k in PAIRED_SCORES]
            lines.append(f"| {setting_name(s['factor'], s['spacing_mm'])} | {peer} | {' | '.join(cells)} |")
    return "\n".join(lines)


def save_montage(montages: list[tuple[dict, tuple]], path: Path, count: int = 3) -> None:
    """Worst and best cases by CaLID's PSNR gain over the morph: real, CaLID, morph, linear, B-spline (each case
    once: with fewer than ``2 * count`` the worst and the best overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = sorted(montages, key=lambda item: item[0]["calid_psnr"] - item[0]["morph_psnr"])
    chosen = ranked if len(ranked) <= 2 * count else ranked[:count] + ranked[-count:]
    fig, axes = plt.subplots(len(chosen), 1 + len(SCORED_METHODS), figsize=(12.5, 2.6 * len(chosen)), squeeze=False)
    for row_axes, (row, (real, estimates)) in zip(axes, chosen):
        panels = [("real", real)] + [(m, estimates[m]) for m in SCORED_METHODS]
        for ax, (title, img) in zip(row_axes, panels):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{title}" + (f" {row[f'{title}_psnr']:.1f} dB" if title != "real" else f" {row['patient']} K={row['factor']}"), fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
