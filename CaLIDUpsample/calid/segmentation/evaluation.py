"""``calid evaluate-segmentation``: Dice/HD95 on real slices and the removed-slice protocol for labels.

Per labelled stack: (1) the network on every acquired slice against the manual labels; (2) for each K, keep
slices 0, K, 2K, ..., rebuild the removed slices and score the labels there against the manual ones:
the network on the real removed slices (the ceiling of the rows that follow), on the CaLID volume, on its sharp
rendition (``generation.RENDITIONS``: what ``--segmentation`` segments), on the optical-flow morph, on linear and on
cubic B-spline interpolation (the peers of ``calid evaluate``), morphological contour interpolation of the kept
slices' manual labels (``contour``: what a Slicer user would run otherwise), and
``--input-segmentation`` (kept manual labels + the network on the sharp rendition, as the product does) for each
``shape_mm`` weight.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import geometry, slice_positions
from ..devices import resolve_device
from ..engine import UpsampleOptions, upsample_image
from ..errors import CalidError
from ..evaluation import peer_missing, protocol_images, select_patients
from ..imageio import read_image, validate_volume
from ..modelstore import load_model
from ..paired import describe, paired_difference
from ..progress import Progress
from .contour import contour_interpolation, contour_pool
from .inference import labels_from_probabilities, predict_probabilities
from .pipeline import DEFAULT_SHAPE_MM
from .scores import label_scores
from .sparse import densify
from .store import load_segmenter
from .training import find_labelled

ON_REAL = "network on the real slices (ceiling)"
ON_CALID = "network on CaLID"
ON_SHARP = "network on CaLID, sharp rendition (--segmentation)"
PAIRED = (ON_CALID, ON_SHARP)  # the methods paired with each peer
PEERS = ("morph", "linear", "bspline")  # the network on each is compared with each of PAIRED, volume by volume
DICE_KEYS = ("dice_rv", "dice_myo", "dice_lv", "dice_mean")


@dataclass
class SegEvaluateConfig:
    data: list[str]
    output: str
    model: str | None = None
    segmentation_model: str | None = None
    factors: list[int] = field(default_factory=lambda: [2])
    patients: str | None = None
    shape_mm: list[float] = field(default_factory=lambda: [DEFAULT_SHAPE_MM])
    device: str = "auto"


def _finite(value):
    """``value`` with NaN and infinite numbers as None (JSON null): a structure absent from both the labels and the
    truth scores NaN, which ``json.dumps`` writes as ``NaN``, not JSON."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _removed_scores(labels: np.ndarray, truth: np.ndarray, removed: np.ndarray, spacing) -> dict[str, float]:
    return label_scores(labels[removed], truth[removed], spacing, hd95=False)


def peer_stacks(stack: np.ndarray, kept_image: sitk.Image, real_image: sitk.Image, factor: int,
                axis: int) -> dict[str, np.ndarray]:
    """For each of ``PEERS``, ``stack`` (slices first, ``geometry.to_stack``) cut to ``real_image``'s slices, its
    removed ones (not multiples of ``factor``) rebuilt by that peer from the kept ones (``protocol_images``): what
    the network is run on for "network on <peer>"."""
    m = real_image.GetSize()[axis]
    removed = slice_positions.removed_slices(m, factor)
    missing, _ = peer_missing(stack, kept_image, real_image, factor, axis)
    peers = {}
    for name in PEERS:
        peers[name] = stack[:m].copy()
        peers[name][removed] = missing[name]
    return peers


def evaluate_stack(image: sitk.Image, truth_image: sitk.Image, cfg: SegEvaluateConfig, interpolator, segmenter,
                   progress: Progress, pool=None) -> list[dict]:
    network, card = segmenter
    config = card["config"]
    device = resolve_device(cfg.device)
    axis = geometry.find_slice_axis(image)
    stack = geometry.to_stack(sitk.GetArrayFromImage(image), axis).astype(np.float32)
    truth = geometry.to_stack(sitk.GetArrayFromImage(truth_image), axis).astype(np.uint8)
    inplane = geometry.inplane_spacing(image, axis)
    slice_mm = image.GetSpacing()[axis]
    rows = []
    real = labels_from_probabilities(predict_probabilities(network, config, stack, inplane, device))
    rows.append({"setting": "acquired slices", "method": "network",
                 **label_scores(real, truth, (slice_mm, *inplane))})
    for factor in cfg.factors:
        m = slice_positions.protocol_count(stack.shape[0], factor)
        if m < factor + 1:
            continue
        removed = slice_positions.removed_slices(m, factor)
        real_image, kept_image = protocol_images(image, axis, m, factor)
        calid = upsample_image(kept_image, UpsampleOptions(factor=factor, device=cfg.device), interpolator,
                               want_sharp=True)
        calid_stack, sharp_stack = (geometry.to_stack(sitk.GetArrayFromImage(x), axis).astype(np.float32)
                                    for x in (calid.image, calid.sharp_image))
        peers = peer_stacks(stack, kept_image, real_image, factor, axis)
        setting = f"K={factor}, {slice_mm:g} mm stacks ({slice_mm * factor:g} mm gaps)"
        spacing = (slice_mm, *inplane)
        sharp_prob = predict_probabilities(network, config, sharp_stack, inplane, device)
        methods = {
            # The ceiling of every row below: the same network on the real removed slices, segmented in the same
            # stack of the protocol's slices (the "acquired slices" row above counts every slice of every stack).
            ON_REAL: labels_from_probabilities(predict_probabilities(network, config, stack[:m], inplane, device)),
            ON_CALID: labels_from_probabilities(predict_probabilities(network, config, calid_stack, inplane, device)),
            ON_SHARP: labels_from_probabilities(sharp_prob),
            **{f"network on {name}": labels_from_probabilities(predict_probabilities(network, config, peer, inplane,
                                                                                      device))
               for name, peer in peers.items()},
            "contour interpolation of kept labels": contour_interpolation(truth[:m:factor], factor, pool),
        }
        order = slice_positions.generated_slices(len(range(0, m, factor)), factor)
        for weight in cfg.shape_mm:
            name = f"kept labels + CaLID (shape {weight:g} mm)"
            methods[name] = densify(truth[:m:factor], factor, inplane, sharp_prob[order], weight)
        methods["kept labels, shape interpolation only"] = densify(truth[:m:factor], factor, inplane, None, None)
        for method, labels in methods.items():
            rows.append({"setting": setting, "method": method, **_removed_scores(labels, truth[:m], removed, spacing)})
        progress.advance(1)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Means over the volumes of each (setting, method). A structure the network missed, or that a volume's labels
    lack, has no HD95 (NaN): its mean is over the volumes that have one, and ``hd95_volumes`` says how many, so that
    a missed structure cannot pass for a small distance."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["setting"], r["method"])].append(r)
    summary = []
    for (setting, method), items in groups.items():
        entry = {"setting": setting, "method": method, "volumes": len(items)}
        for key in items[0]:
            if key.startswith(("dice_", "hd95_")):
                values = [r[key] for r in items if not math.isnan(r[key])]
                entry[key] = float(np.mean(values)) if values else math.nan
                if key.startswith("hd95_"):
                    entry.setdefault("hd95_volumes", {})[key] = len(values)
        if method in PAIRED:
            entry["dice_minus"] = {peer: _dice_minus(items, groups[(setting, f"network on {peer}")])
                                   for peer in PEERS if (setting, f"network on {peer}") in groups}
        summary.append(entry)
    return summary


def _dice_minus(ours: list[dict], theirs: list[dict]) -> dict[str, dict]:
    """``paired.paired_difference`` of each structure's Dice and of their mean (``DICE_KEYS``), the two methods'
    rows paired by volume (patient and file); a volume where either Dice is undefined (NaN) is left out of that
    structure's pairs. Per structure, because a lead or a shortfall in the mean can sit in one structure: with 10 mm
    gaps the bundled slices' shortfall against the morph is in the myocardium on training and validation stacks
    alike (docs/measurements.md, stop 35)."""
    by_volume = {(r["patient"], r["file"]): r for r in theirs}
    paired = [(r, by_volume[r["patient"], r["file"]]) for r in ours if (r["patient"], r["file"]) in by_volume]
    result = {}
    for key in DICE_KEYS:
        both = [(a[key], b[key]) for a, b in paired if not (math.isnan(a[key]) or math.isnan(b[key]))]
        if both:
            result[key] = paired_difference([a for a, _ in both], [b for _, b in both])
    return result


def markdown_table(summary: list[dict]) -> str:
    lines = ["| setting | vols | method | Dice RV | Dice myo | Dice LV | Dice mean | HD95 RV / myo / LV mm |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        hd = " / ".join(f"{s[k]:.1f}" for k in ("hd95_rv", "hd95_myo", "hd95_lv")) if "hd95_rv" in s else ""
        if hd and min(s["hd95_volumes"].values()) < s["volumes"]:
            hd += " (of " + " / ".join(str(s["hd95_volumes"][k]) for k in ("hd95_rv", "hd95_myo", "hd95_lv")) + \
                " volumes: a structure missed has none)"
        lines.append(f"| {s['setting']} | {s['volumes']} | {s['method']} | {s['dice_rv']:.3f} | {s['dice_myo']:.3f} | "
                     f"{s['dice_lv']:.3f} | {s['dice_mean']:.3f} | {hd} |")
    lines += ["", "Dice of the network on CaLID's slices minus the network on each peer, paired volume by volume: "
              "mean ± standard error (volumes where CaLID's is higher / volumes).", "",
              "| setting | CaLID's slices | peer | Dice RV | Dice myo | Dice LV | Dice mean |",
              "|---|---|---|---|---|---|---|"]
    for s in summary:
        for peer, by_key in s.get("dice_minus", {}).items():
            cells = " | ".join(describe(by_key[k], 4) if k in by_key else "–" for k in DICE_KEYS)
            slices = "sharp (--segmentation)" if s["method"] == ON_SHARP else "volume"
            lines.append(f"| {s['setting']} | {slices} | {peer} | {cells} |")
    return "\n".join(lines)


def evaluate_segmentation(cfg: SegEvaluateConfig, progress_mode: str = "bar") -> str:
    selection = select_patients(cfg.patients, cfg.data)
    entries = find_labelled(cfg.data, selection.wanted)
    if not entries:
        raise CalidError("no labelled volumes to evaluate (check the data folders and --patients)")
    device = resolve_device(cfg.device)
    interpolator, _ = load_model(cfg.model, device)
    segmenter = load_segmenter(cfg.segmentation_model, device)
    progress = Progress(progress_mode, len(entries) * len(cfg.factors), "evaluating segmentation")
    rows = []
    with contour_pool() as pool:
        for patient, image_path, label_path in entries:
            stack_rows = evaluate_stack(validate_volume(read_image(image_path), str(image_path)),
                                        validate_volume(read_image(label_path), str(label_path)), cfg,
                                        interpolator, segmenter, progress, pool)
            rows += [{"patient": patient, "file": image_path.name, **r} for r in stack_rows]
    progress.close()
    if not any(row["setting"].startswith("K=") for row in rows):  # as calid evaluate: not a report without them
        raise CalidError("no stack had enough slices for the requested factors")
    summary = summarise(rows)
    table = markdown_table(summary) + (f"\n\n{selection.note()}" if selection.left_out else "")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    report = {"summary": summary, "rows": rows, **({"left_out": selection.left_out} if selection.left_out else {})}
    (out / "segmentation_results.json").write_text(json.dumps(_finite(report), indent=2) + "\n", encoding="utf-8")
    (out / "segmentation_results.md").write_text(table + "\n", encoding="utf-8")
    return table
