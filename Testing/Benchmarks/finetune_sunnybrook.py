#!/usr/bin/env python3
"""Does fine-tuning help on another vendor's scans? Leave-one-patient-out on the 5 Sunnybrook cine stacks.

    python Testing/Benchmarks/finetune_sunnybrook.py [--base calid-acdc] [--steps 300] [--batch 16] [--threads 2]
        [--keep-models DIR | --models DIR] [--base-only]

For each Sunnybrook patient in turn: fine-tune the base model (``calid train --init``, denoiser only) on the
other four patients' cine stacks (every phase is a training stack), then score base and fine-tuned model on the
held-out patient with the removed-slice protocol at K=2 (``calid evaluate``, which scores linear, cubic B-spline and
the optical-flow morph in the same run; 8-10 mm stacks, so 16-20 mm gaps), on every ``--phase-stride``-th cardiac
phase. ``--base-only`` scores the base and the peers and stops (minutes instead of five fine-tuning runs). ``--models DIR``
scores the fine-tuned models an earlier run kept (``--keep-models DIR``) instead of training them again: for a change
that the fine-tuning does not train (the last step, the flows' settings, carried into their cards), the same
models with the new settings, without an hour of training. The Sunnybrook data (CC0) is read from
``../shared/data/sunnybrook``; everything written goes to a temporary folder. Not a test: it prints a table
and the JSON of every figure, with the wall time of each fine-tuning run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from calid.evaluation import EvaluateConfig, evaluate
from calid.modelindex import ACDC_MODEL
from calid.modelstore import read_card
from calid.paired import describe, paired_difference
from calid.training.config import TrainConfig
from calid.training.trainer import train

REPO = Path(__file__).resolve().parents[2]
SUNNYBROOK = REPO.parent / "shared" / "data" / "sunnybrook"
PEERS = {"linear": "linear", "bspline": "B-spline", "morph": "morph"}


def split_phases(folder: Path, stride: int) -> list[str]:
    """3D NIfTI per kept phase under ``folder/phases/<patient>/`` (with the contours as ``_gt`` where drawn),
    and a link to the 4D cine under ``folder/cine/<patient>/`` for training. Returns the patients."""
    patients = []
    for cine in sorted(SUNNYBROOK.glob("SCD*_sa_cine.nii.gz")):
        patient = cine.name.split("_")[0]
        image = sitk.ReadImage(str(cine))
        contours = sitk.ReadImage(str(cine).replace("_sa_cine", "_sa_cine_contours"))
        target = folder / "phases" / patient
        target.mkdir(parents=True)
        for t in range(0, image.GetSize()[3], stride):
            sitk.WriteImage(image[:, :, :, t], str(target / f"{patient}_t{t:02d}.nii.gz"))
            labels = contours[:, :, :, t]
            if sitk.GetArrayViewFromImage(labels).any():
                sitk.WriteImage(labels, str(target / f"{patient}_t{t:02d}_gt.nii.gz"))
        (folder / "cine" / patient).mkdir(parents=True)
        (folder / "cine" / patient / cine.name).symlink_to(cine)
        patients.append(patient)
    return patients


def per_patient(report_dir: Path) -> dict[str, dict[str, float]]:
    """Mean scores per patient from ``calid evaluate``'s results.json."""
    rows = json.loads((report_dir / "results.json").read_text(encoding="utf-8"))["volumes"]
    out: dict[str, dict[str, float]] = {}
    for patient in sorted({r["patient"] for r in rows}):
        mine = [r for r in rows if r["patient"] == patient]
        out[patient] = {f"{method}_{metric}": float(np.mean([r[f"{method}_{metric}"] for r in mine]))
                        for method in ("calid", *PEERS) for metric in ("psnr", "ssim")}
        out[patient]["volumes"] = len(mine)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=ACDC_MODEL,
                        help=f"model to fine-tune (default: {ACDC_MODEL}; the default model has seen every cine)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--min-timestep", type=int, default=0,
                        help="lowest diffusion timestep trained (default 0: the base model's own bound)")
    parser.add_argument("--phase-stride", type=int, default=2, help="evaluate every N-th phase (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-models", type=Path,
                        help="copy each fine-tuned model to DIR/<held-out patient> (for cine_sunnybrook.py --held-out-models)")
    parser.add_argument("--models", type=Path,
                        help="score the models an earlier --keep-models DIR run kept, DIR/<held-out patient>, "
                             "instead of fine-tuning")
    parser.add_argument("--base-only", action="store_true",
                        help="score the base model and the peers only, without fine-tuning")
    args = parser.parse_args()
    if args.models and args.keep_models:
        parser.error("--models scores kept models; --keep-models keeps new ones: give one of them")
    if not any(SUNNYBROOK.glob("SCD*_sa_cine.nii.gz")):
        parser.error(f"no SCD*_sa_cine.nii.gz in {SUNNYBROOK}: this benchmark reads the shared data beside the "
                     "repository")
    if args.keep_models and args.keep_models.exists() and any(args.keep_models.iterdir()):
        parser.error(f"--keep-models {args.keep_models} is not empty: its models would be found only after the "
                     "first fold's fine-tuning")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        patients = split_phases(folder, args.phase_stride)
        phases = str(folder / "phases")
        evaluate(EvaluateConfig(data=[phases], output=str(folder / "eval-base"), model=args.base, factors=[2],
                                device="cpu"), "none")
        base = per_patient(folder / "eval-base")
        results = []
        for held_out in [] if args.base_only else patients:
            if args.models:
                model_dir, minutes = args.models / held_out, float("nan")
            else:
                model_dir, minutes = fine_tune(folder, held_out, patients, args)
            if args.keep_models:
                shutil.copytree(model_dir, args.keep_models / held_out)
            card = read_card(Path(model_dir))
            evaluate(EvaluateConfig(data=[phases], output=str(folder / "eval" / held_out), model=str(model_dir),
                                    factors=[2], patients=held_out, device="cpu"), "none")
            tuned = per_patient(folder / "eval" / held_out)[held_out]
            results.append({"patient": held_out, "phases": tuned["volumes"], "finetune_minutes": round(minutes, 1),
                            **base_scores(base[held_out]), "tuned_psnr": tuned["calid_psnr"],
                            "tuned_ssim": tuned["calid_ssim"],
                            "trained_timesteps_from": card["config"]["diffusion"].get("min_timestep", 0)})
            print(json.dumps(results[-1]), flush=True)
    if args.base_only:
        results = [{"patient": p, "phases": base[p]["volumes"], **base_scores(base[p])} for p in patients]
        print(f"\nbase {args.base}, no fine-tuning; ", end="")
    else:
        how = (f"the models kept in {args.models} (their cards say how they were fine-tuned)" if args.models else
               f"{args.steps} steps, batch {args.batch}, lr {args.lr}")
        print(f"\nbase {args.base}; {how}, timesteps >= {results[0]['trained_timesteps_from']} (as trained: the base "
              f"model's bound or higher), ", end="")
    print(f"{args.threads} CPU threads; K=2 removed-slice protocol on phases 0, {args.phase_stride}, "
          f"{2 * args.phase_stride}, ...\n")
    print(results_table(results, tuned=not args.base_only))


def fine_tune(folder: Path, held_out: str, patients: list[str], args: argparse.Namespace) -> tuple[Path, float]:
    """The base fine-tuned on every patient but ``held_out`` (their cines linked into a fold folder): (model folder,
    minutes it took)."""
    fold = folder / "folds" / held_out
    fold.mkdir(parents=True)
    for p in patients:
        if p != held_out:
            (fold / p).symlink_to(folder / "cine" / p)
    started = time.perf_counter()
    model_dir = train(TrainConfig(data=[str(fold)], output=str(folder / "runs" / held_out), init=args.base,
                                  denoiser_steps=args.steps, denoiser_batch=args.batch, lr=args.lr,
                                  min_timestep=args.min_timestep,
                                  warmup=args.steps // 10, val_fraction=0.0, checkpoint_every=10**9,
                                  log_every=50, device="cpu", name=f"finetuned-without-{held_out}"), "none")
    return Path(model_dir), (time.perf_counter() - started) / 60


def base_scores(scores: dict[str, float]) -> dict[str, float]:
    """One held-out patient's peer and base-model figures from ``per_patient``, as the table's columns name them."""
    out = {f"{peer}_{metric}": scores[f"{peer}_{metric}"] for peer in PEERS for metric in ("psnr", "ssim")}
    return {**out, "base_psnr": scores["calid_psnr"], "base_ssim": scores["calid_ssim"]}


def results_table(results: list[dict], tuned: bool) -> str:
    """Markdown: per held-out patient and their mean, the peers, the base and (``tuned``) the fine-tuned model."""
    columns = [*(f"{title} PSNR / SSIM" for title in PEERS.values()), "base PSNR / SSIM"]
    if tuned:
        columns += ["fine-tuned PSNR / SSIM", "gain dB", "fine-tuning min"]
    lines = ["| held-out patient | phases | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    averaged = [k for k in results[0] if k.endswith(("psnr", "ssim", "minutes"))]
    mean = {"patient": "mean", "phases": sum(r["phases"] for r in results),
            **{k: float(np.mean([r[k] for r in results])) for k in averaged}}
    for r in results + [mean]:
        cells = [f"{r[f'{m}_psnr']:.2f} / {r[f'{m}_ssim']:.3f}" for m in (*PEERS, "base")]
        if tuned:
            cells += [f"{r['tuned_psnr']:.2f} / {r['tuned_ssim']:.3f}", f"{r['tuned_psnr'] - r['base_psnr']:+.2f}",
                      "–" if np.isnan(r["finetune_minutes"]) else f"{r['finetune_minutes']:.1f}"]
        lines.append(f"| {r['patient']} | {r['phases']} | " + " | ".join(cells) + " |")
    if tuned:
        for score, digits in (("psnr", 3), ("ssim", 4)):
            paired = paired_difference([r[f"tuned_{score}"] for r in results], [r[f"base_{score}"] for r in results])
            lines.append(f"\nFine-tuned minus base {score.upper()}, held-out patient by patient (mean ± standard error, "
                         f"patients where the fine-tuned model scores higher): {describe(paired, digits)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
