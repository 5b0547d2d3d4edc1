"""Cine upsampling on the 5 Sunnybrook cines: removed-slice quality over all phases, temporal flicker, speed.

    python Testing/Benchmarks/cine_sunnybrook.py [--data ../shared/data/sunnybrook] [--threads 2] [--model NAME]
        [--held-out-models DIR] [--skip-timing] [--uncertainty [--uncertainty-json FILE]]

Protocol (``shared/docs/evaluation.md``, K=2, every phase): keep slices 0, 2, 4, ... of each 4D cine, upsample
the kept cine by 2 with ``calid-acdc``'s default options (the ACDC-only model: the default, ``calid-acdc-scd``,
was fine-tuned on these cines), and score only the removed slices against the real
ones (``calid.metrics.slice_scores``, whole slice and heart box = labelled region of any phase + 10 px) next to
the peers ``calid evaluate`` scores: linear interpolation (``calid.metrics.linear_missing``), cubic B-spline
(SimpleITK, phase by phase, ``calid.evaluation.bspline_on_grid``) and the optical-flow morph (TV-L1); scores are
averaged over phases, then over patients.
Flicker: mean absolute phase-to-phase difference of the removed slices' estimates divided by the same quantity
on the real removed slices (1 = as much frame-to-frame change as the real cine), for shared starting noise
across phases (the default) and independent per-phase noise. Speed: wall time of one whole ``calid upsample``
process (start, imports, model load, read, generate, write) on a 20-phase cine with >= 12 slices, x2, CPU.
``--held-out-models DIR`` scores each cine with the model fine-tuned without it (leave-one-patient-out, written by
``finetune_sunnybrook.py --keep-models DIR``): what a site gets after fine-tuning on its own cines.
``--uncertainty``: the shared-noise run also writes the model's uncertainty map (every phase), judged against the
actual errors of the removed slices as ``calid evaluate --uncertainty`` does (``calid.calibration``, all cines
pooled), with its cost: seconds of the same upsampling with and without the map.
Not a test: it prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CaLIDUpsample"))

from calid import geometry  # noqa: E402
from calid.calibration import CalibrationPool, markdown as calibration_markdown  # noqa: E402
from calid.cine import cine_from_4d  # noqa: E402
from calid.devices import software_line  # noqa: E402
from calid.engine import UpsampleOptions, upsample_cine  # noqa: E402
from calid.evaluation import PEER_FLOW, bspline_on_grid  # noqa: E402
from calid.metrics import heart_box, linear_missing, slice_scores, unit_range  # noqa: E402
from calid.modelindex import ACDC_MODEL  # noqa: E402
from calid.motion import morph_missing  # noqa: E402
from benchmark_cli import model_or_error, sunnybrook_cines  # noqa: E402

FACTOR = 2
NOISES = ("shared", "independent")
PEERS = {"linear": "linear", "bspline": "cubic B-spline", "morph": "optical-flow morph"}


def removed_slice_case(path: Path) -> tuple[sitk.Image, np.ndarray, np.ndarray, np.ndarray,
                                             tuple[slice, slice] | None]:
    """(kept 4D cine, real stacks (t, n, h, w) truncated to the last kept slice, kept stacks, the removed slices'
    cubic B-spline estimate (t, removed, h, w), heart box)."""
    image = sitk.ReadImage(str(path))
    axis = geometry.find_slice_axis(image)
    assert axis == 2, f"{path.name}: slice axis {axis}, expected k"
    last = (image.GetSize()[2] - 1) // FACTOR * FACTOR
    kept = image[:, :, 0:last + 1:FACTOR, :]
    real = np.stack([geometry.to_stack(a, axis) for a in sitk.GetArrayFromImage(image)])[:, :last + 1]
    bspline = np.stack([geometry.to_stack(bspline_on_grid(kept[:, :, :, t], image[:, :, 0:last + 1, t]),
                                          axis)[1::FACTOR] for t in range(image.GetSize()[3])])
    labels_path = path.with_name(path.name.replace("_sa_cine.nii.gz", "_sa_cine_contours.nii.gz"))
    box = None
    if labels_path.is_file():
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
        box = heart_box(labels.reshape(-1, *labels.shape[-2:]) > 0)
    return kept, real, real[:, ::FACTOR], bspline, box


def flicker(stacks: np.ndarray) -> float:
    """Mean absolute difference between consecutive phases (axis 0) of float stacks."""
    return float(np.abs(np.diff(stacks.astype(np.float64), axis=0)).mean())


def phase_scores(real: np.ndarray, estimate: np.ndarray, box) -> np.ndarray:
    """(phases, 4): PSNR, SSIM whole slice, PSNR, SSIM heart box of the removed slices, per phase."""
    rows = []
    for t in range(real.shape[0]):
        removed = real[t, 1::FACTOR]
        rows.append([*slice_scores(removed, estimate[t], real[t]),
                     *(slice_scores(removed, estimate[t], real[t], box) if box else (np.nan, np.nan))])
    return np.asarray(rows)


def evaluate_case(path: Path, model, pools: dict[str, CalibrationPool] | None = None) -> dict:
    """Scores of one cine; with ``pools`` ({"slice": ..., "heart": ...}) the map's calibration data go there too."""
    kept_image, real, kept, bspline, box = removed_slice_case(path)
    removed = real[:, 1::FACTOR]
    peers = {"linear": np.stack([linear_missing(k, FACTOR) for k in kept]), "bspline": bspline,
             "morph": np.stack([morph_missing(k, FACTOR, PEER_FLOW) for k in kept])}
    row = {"case": path.name.split("_")[0], "size": "x".join(str(s) for s in sitk.ReadImage(str(path)).GetSize()),
           "flicker_real": flicker(removed)}
    for name, estimate in peers.items():
        row[name] = phase_scores(real, estimate, box).mean(axis=0)
        row[f"flicker_{name}"] = flicker(estimate) / flicker(removed)
    for noise in NOISES:
        started = time.perf_counter()
        options = UpsampleOptions(factor=FACTOR, device="cpu", cine_noise=noise)
        result = upsample_cine(cine_from_4d(kept_image), options, model=model)
        dense = np.stack([geometry.to_stack(a, 2) for a in sitk.GetArrayFromImage(result.image)])
        assert dense.shape == real.shape and np.array_equal(dense[:, ::FACTOR], kept), "acquired slices changed"
        estimate = dense[:, 1::FACTOR]
        row[noise] = phase_scores(real, estimate, box).mean(axis=0)
        row[f"flicker_{noise}"] = flicker(estimate) / flicker(removed)
        row[f"seconds_{noise}"] = time.perf_counter() - started
    if pools is not None:
        started = time.perf_counter()
        result = upsample_cine(cine_from_4d(kept_image), UpsampleOptions(factor=FACTOR, device="cpu"), model=model,
                               want_uncertainty=True)
        row["seconds_with_map"] = time.perf_counter() - started
        predicted = np.stack([geometry.to_stack(a, 2) for a in sitk.GetArrayFromImage(result.uncertainty)])[:, 1::FACTOR]
        estimate = np.stack([geometry.to_stack(a, 2) for a in sitk.GetArrayFromImage(result.image)])[:, 1::FACTOR]
        scale = unit_range(real)[1]
        error = removed.astype(np.float64) - estimate
        pools["slice"].add(predicted, error, scale)
        if box is not None:
            pools["heart"].add(predicted[..., box[0], box[1]], error[..., box[0], box[1]], scale)
    return row


def time_cli(path: Path, threads: int, model: str | None) -> float:
    """Wall seconds of one whole ``calid upsample`` process, x2, CPU."""
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, "-m", "calid", "upsample", str(path), str(Path(folder) / "dense.nii.gz"), "--factor",
               str(FACTOR), "--device", "cpu", "--threads", str(threads), "--progress", "none"]
        if model:
            cmd += ["--model", model]
        env = {**os.environ, "PYTHONPATH": str(REPO / "CaLIDUpsample")}
        started = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        return time.perf_counter() - started


def table(rows: list[dict], speed: tuple[str, float], threads: int) -> str:
    def fmt(values) -> str:
        return " | ".join(f"{v:.2f}" if i % 2 == 0 else f"{v:.3f}" for i, v in enumerate(values))

    lines = ["| cine (x,y,z,t) | method | PSNR dB | SSIM | heart PSNR dB | heart SSIM | flicker ratio "
             "| s (in-process) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in [*rows, mean_row(rows)]:
        name = f"{row['case']} ({row['size']})"
        for peer, title in PEERS.items():
            lines.append(f"| {name} | {title} | {fmt(row[peer])} | {row[f'flicker_{peer}']:.3f} | |")
        for noise in NOISES:
            lines.append(f"| {name} | CaLID, {noise} noise | {fmt(row[noise])} | {row[f'flicker_{noise}']:.3f} | "
                         f"{row[f'seconds_{noise}']:.1f} |")
    mean = mean_row(rows)
    lines += ["", f"CaLID (shared noise) - linear, PSNR averaged over phases and cines: "
                  f"{mean['shared'][0] - mean['linear'][0]:+.2f} dB whole slice, "
                  f"{mean['shared'][2] - mean['linear'][2]:+.2f} dB heart box (target +1.5 dB); against B-spline "
                  f"{mean['shared'][0] - mean['bspline'][0]:+.2f} / {mean['shared'][2] - mean['bspline'][2]:+.2f} dB; "
                  f"against the morph "
                  f"{mean['shared'][0] - mean['morph'][0]:+.2f} dB whole slice, {mean['shared'][2] - mean['morph'][2]:+.2f} dB "
                  f"heart box.",
              f"Whole `calid upsample` process on {speed[0]} x2, CPU, --threads {threads}: {speed[1]:.1f} s "
              f"(target <= 120 s; 1-min load after the run {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
              + software_line() + ")."]
    return "\n".join(lines)


def mean_row(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k not in ("case", "size")]
    return {"case": "mean", "size": f"{len(rows)} cines", **{k: np.mean([r[k] for r in rows], axis=0) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sunnybrook")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=ACDC_MODEL,
                        help=f"model name or directory (default: {ACDC_MODEL}, which has never seen these cines)")
    parser.add_argument("--held-out-models", type=Path,
                        help="score each cine with DIR/<patient>, a model fine-tuned without that patient "
                             "(finetune_sunnybrook.py --keep-models DIR) instead of --model")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--uncertainty", action="store_true", help="also judge the model's uncertainty map")
    parser.add_argument("--uncertainty-json", type=Path, help="with --uncertainty: also write its report here (JSON)")
    args = parser.parse_args()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    torch.set_num_threads(args.threads)
    cases = sunnybrook_cines(parser, args.data)
    model, _ = model_or_error(parser, args.model)
    rows = []
    pools = {"slice": CalibrationPool(), "heart": CalibrationPool()} if args.uncertainty else None
    for path in cases:
        if args.held_out_models:
            model, _ = model_or_error(parser, args.held_out_models / path.name.split("_")[0])
        rows.append(evaluate_case(path, model, pools))
        print(f"{path.name}: done", file=sys.stderr, flush=True)
    sizes = {p: sitk.ReadImage(str(p)).GetSize() for p in cases}  # timed: the first of >= 12 slices, else the largest
    big = next((p for p in cases if sizes[p][2] >= 12), max(cases, key=lambda p: sizes[p][2]))
    size = "x".join(str(s) for s in sizes[big])
    speed = (f"{big.name.split('_')[0]} ({size})", float("nan") if args.skip_timing else time_cli(big, args.threads,
                                                                                                    args.model))
    print(table(rows, speed, args.threads))
    if pools is not None:
        plain = np.mean([r["seconds_shared"] for r in rows])
        with_map = np.mean([r["seconds_with_map"] for r in rows])
        print(f"\nUncertainty map, all phases of all cines pooled (K=2, removed slices; map cost: {with_map:.1f} s "
              f"per cine with it, {plain:.1f} s without, in-process):\n")
        reports = {region: pool.report() for region, pool in pools.items() if pool.predicted}  # no contours: no heart
        print(calibration_markdown({"Sunnybrook K=2": reports}))
        if args.uncertainty_json:
            args.uncertainty_json.write_text(json.dumps({"seconds_with_map": with_map, "seconds_without": plain,
                                                         **reports}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
