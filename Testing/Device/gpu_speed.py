#!/usr/bin/env python3
"""Seconds of work for the issue's speed case (ACDC patient001 end-diastole, x2) on a lent GPU, the CPU beside it.

    python Testing/Device/gpu_speed.py [.gpu_kit/speed_case.npz] [--model NAME] [--device cuda] [--threads 16]
        [--repeats 5]

What ``calid upsample`` does between reading and writing the file: ``stack_upsampling.new_slices``, the engine's
own generation stage (the intensity map, the gap flows on the CPU's threads with OpenCV, the networks on
``--device``, the slices back in scanner units), without and with the calibrated uncertainty map (``--uncertainty``:
the flows estimated once, then the error head); the flows' share is read off its progress stages. Reading and
writing files are left out because the GPU machine's image has no SimpleITK; they take about 0.1 s of the 2-thread
CPU process (``make benchmark``, README Performance). The first pass warms up (CUDA context, cuDNN's choice of
kernels) and is not counted; the median of ``--repeats`` is. Run by ``gpu_session.sh``; runs on a CPU too
(``--device cpu``). Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CaLIDUpsample"))

from calid.devices import for_inference, resolve_device, software_line  # noqa: E402
from calid.generation import default_steps  # noqa: E402
from calid.modelindex import DEFAULT_MODEL  # noqa: E402
from calid.modelstore import load_model  # noqa: E402
from calid.progress import Progress  # noqa: E402
from calid.stack_upsampling import UpsampleOptions, new_slices  # noqa: E402

FACTOR = 2


def synchronised(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StageClock(Progress):
    """A silent progress that notes when each stage starts (the device synchronised first)."""

    def __init__(self, device: torch.device):
        super().__init__("none")
        self.device = device
        self.starts: dict[str, float] = {}

    def set_stage(self, stage: str) -> None:
        self.starts.setdefault(stage, synchronised(self.device))
        super().set_stage(stage)


def upsample_work(model, stack: np.ndarray, gap_mm: float, device: torch.device, with_map: bool) -> dict[str, float]:
    """One pass of the engine's generation stage; seconds of its flows and of the rest."""
    clock = StageClock(device)
    start = synchronised(device)
    new_slices(stack[None], UpsampleOptions(factor=FACTOR), model, FACTOR, default_steps(model), device, gap_mm,
               clock, want_uncertainty=with_map)
    done = synchronised(device)
    networks_start = clock.starts["encoding acquired slices"]
    flows = networks_start - clock.starts.get("estimating motion", networks_start)  # none without motion
    return {"flows": flows, "rest": done - start - flows, "total": done - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", type=Path, nargs="?", default=REPO / ".gpu_kit" / "speed_case.npz")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with np.load(args.case, allow_pickle=False) as case:
        stack, gap_mm, name = case["stack"].astype(np.float32), float(case["spacing_mm"]), str(case["name"])
    model = for_inference(load_model(args.model, device)[0], device)
    title = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name} ({stack.shape[0]} slices, {stack.shape[1]} x {stack.shape[2]}), x{FACTOR}, {args.model}, "
          f"{title}, {args.threads} CPU threads; {software_line()}")
    print("\n| run | flows s (CPU) | generation s | total s |\n|---|---|---|---|")
    with torch.no_grad():
        for with_map in (False, True):
            upsample_work(model, stack, gap_mm, device, with_map)  # warm-up
            times = [upsample_work(model, stack, gap_mm, device, with_map) for _ in range(args.repeats)]
            median = {k: statistics.median(t[k] for t in times) for k in times[0]}
            print(f"| {'with the uncertainty map' if with_map else 'slices'} | {median['flows']:.3f} | "
                  f"{median['rest']:.3f} | {median['total']:.3f} |")


if __name__ == "__main__":
    main()
