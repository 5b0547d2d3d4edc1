#!/usr/bin/env python3
"""Ejection fractions from a whole cine: ``calid upsample CINE DENSE --segmentation LABELS`` against Sunnybrook's experts.

    python Testing/Benchmarks/cycle_sunnybrook.py [--data ../shared/data/sunnybrook] [--model calid-acdc] [--threads 2]

Each of the 5 Sunnybrook cines (GE 1.5 T; neither ``calid-acdc`` nor the segmenter ``calid-seg-acdc`` saw them) goes
through the product's cine segmentation (``engine.upsample_file``: K=2, every phase upsampled, each phase's dense
volume segmented on the sharp rendition of its new slices) and, as the peer a user has without CaLID, through the
segmenter on the acquired slices alone, phase by phase (``calid segment``'s code path). The experts drew the LV blood
pool on two frames (end diastole and end systole) and not on every slice, so the LV volumes are compared on their
frames and their contoured slices: the voxels of those acquired slices times the acquired grid's voxel volume (the
experts' own slice summation; on the dense grid the acquired slices are every K-th), and the ejection fraction from
them. The whole-cycle columns are what a user reads off the product's JSON (``segmentation.measures.cycle_volumes``:
the largest and smallest LV cavity over the 20 phases, every slice; on the acquired grid the same rule on the
acquired slices alone). Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CaLIDUpsample"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from calid.cine import phase_of, read_input  # noqa: E402
from calid.devices import software_line  # noqa: E402
from calid.engine import UpsampleOptions, upsample_file  # noqa: E402
from calid.segmentation.inference import segment_image  # noqa: E402
from calid.segmentation.measures import cycle_volumes, structure_volumes  # noqa: E402
from calid.segmentation.store import load_segmenter  # noqa: E402
from benchmark_cli import model_or_error, sunnybrook_cines  # noqa: E402

FACTOR = 2
EXPERT_LV, OUR_LV = 1, 3  # Sunnybrook's blood-pool label, ours (LV cavity)


def ejection_fraction(end_diastole: float, end_systole: float) -> float:
    return 100.0 * (end_diastole - end_systole) / end_diastole


def experts_frames(contours: np.ndarray) -> tuple[int, int, dict[int, list[int]]]:
    """(end-diastolic frame, end-systolic frame, the slices contoured in each): of the contoured frames, the
    larger blood pool is end diastole."""
    drawn = {t: [z for z in range(contours.shape[1]) if (contours[t, z] == EXPERT_LV).any()]
             for t in range(contours.shape[0]) if (contours[t] == EXPERT_LV).any()}
    if len(drawn) != 2:
        raise SystemExit(f"expected two contoured frames, found {sorted(drawn)}")
    ed, es = sorted(drawn, key=lambda t: -(contours[t] == EXPERT_LV).sum())
    return ed, es, drawn


def lv_ml(labels: np.ndarray, label: int, slices: list[int], voxel_ml: float) -> float:
    """LV cavity volume (mL) on ``slices`` of one frame's labels (slices, rows, cols)."""
    return float((labels[slices] == label).sum()) * voxel_ml


def lv_ejection_fraction(cycle: dict) -> float:
    """The LV ejection fraction of ``cycle_volumes``' report, NaN where the product gives none (no LV found)."""
    value = cycle["ejection_fractions"]["lv_ejection_fraction_percent"]
    return float("nan") if value is None else value


def whole_cycle(path: Path, options: UpsampleOptions) -> tuple[object, float]:
    """``calid upsample PATH --segmentation`` in process with ``options``: (its result, seconds)."""
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = upsample_file(path, Path(folder) / "dense.nii.gz", options,
                               segmentation_path=Path(folder) / "labels.nii.gz")
        return result, time.perf_counter() - started


def score_cine(path: Path, network, card, model: str, peers: tuple[str, ...]) -> dict:
    cine = read_input(path)  # the product's reader: the image and its frame times
    contours = sitk.GetArrayFromImage(sitk.ReadImage(str(path).replace("_sa_cine.", "_sa_cine_contours.")))
    ed, es, drawn = experts_frames(contours)
    voxel_ml = float(np.prod(cine.image.GetSpacing()[:3])) / 1000.0

    result, product_s = whole_cycle(path, UpsampleOptions(factor=FACTOR, device="cpu", model=model))
    peer_fractions = {f"{method} cycle": lv_ejection_fraction(whole_cycle(
        path, UpsampleOptions(factor=FACTOR, device="cpu", method=method))[0].volumes) for method in peers}
    dense = sitk.GetArrayFromImage(result.labels)[:, ::FACTOR]  # (t, z, y, x): the acquired slices' positions
    acquired = [segment_image(phase_of(cine.image, t), network, card["config"]) for t in range(len(cine.times))]
    acquired_arrays = [sitk.GetArrayFromImage(labels) for labels in acquired]

    def at_experts(arrays, label) -> tuple[float, float]:
        return lv_ml(arrays[ed], label, drawn[ed], voxel_ml), lv_ml(arrays[es], label, drawn[es], voxel_ml)

    whole_acquired, _ = cycle_volumes([structure_volumes(labels) for labels in acquired], cine.times_ms)
    return {"experts": at_experts(contours, EXPERT_LV), "dense": at_experts(dense, OUR_LV),
            "acquired": at_experts(acquired_arrays, OUR_LV),
            "dense cycle": lv_ejection_fraction(result.volumes),
            "acquired cycle": lv_ejection_fraction(whole_acquired),
            "phases": (ed, es, result.volumes["lv_end_diastole_phase"], result.volumes["lv_end_systole_phase"]),
            "seconds": product_s, **peer_fractions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sunnybrook")
    parser.add_argument("--model", default="calid-acdc", help="the interpolation model (default: one that never "
                        "saw Sunnybrook; the default model calid-acdc-scd was fine-tuned on these cines)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", action="store_true", help="also the whole-cycle EF of the dense labels that "
                        "--method linear and --method morph give (the product's peers), as a last column")
    args = parser.parse_args()
    cases = sunnybrook_cines(parser, args.data)
    model_or_error(parser, args.model)  # a wrong name stops here, in one line, not at the first cine
    peers = ("linear", "morph") if args.peers else ()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    network, card = load_segmenter(None, torch.device("cpu"))
    print(f"{args.model} + {card.get('name', 'calid-seg-acdc')}, K={FACTOR}, {args.threads} threads; {software_line()}\n")
    print("| cine | experts EDV / ESV mL, EF % | CaLID dense labels, experts' frames and slices | acquired slices "
          "alone, the same | EF over the whole cycle: CaLID dense / acquired alone | frames ED, ES: experts / CaLID "
          "cycle | s (product) |" + (" whole-cycle EF: linear / morph dense labels |" if peers else "") +
          "\n|---|---|---|---|---|---|---|" + ("---|" if peers else ""))
    errors: dict[str, list[float]] = {}
    for path in cases:
        r = score_cine(path, network, card, args.model, peers)
        truth = ejection_fraction(*r["experts"])
        cells = []
        for name in ("experts", "dense", "acquired"):
            edv, esv = r[name]
            cells.append(f"{edv:.1f} / {esv:.1f}, {ejection_fraction(edv, esv):.1f}")
            if name != "experts":
                errors.setdefault(name, []).append(ejection_fraction(edv, esv) - truth)
        for name in ("dense cycle", "acquired cycle", *(f"{method} cycle" for method in peers)):
            errors.setdefault(name, []).append(r[name] - truth)
        ed, es, our_ed, our_es = r["phases"]
        peer_cell = " / ".join(f"{r[f'{method} cycle']:.1f}" for method in peers)
        print(f"| {path.name.split('_')[0]} | " + " | ".join(cells) + f" | {r['dense cycle']:.1f} / "
              f"{r['acquired cycle']:.1f} | {ed}, {es} / {our_ed}, {our_es} | {r['seconds']:.0f} |"
              + (f" {peer_cell} |" if peers else ""), flush=True)
    print("\nEF minus the experts' (percentage points), mean / mean absolute over the cines:")
    for name, values in errors.items():
        print(f"- {name}: {statistics.mean(values):+.1f} / {statistics.mean(map(abs, values)):.1f}")


if __name__ == "__main__":
    main()
