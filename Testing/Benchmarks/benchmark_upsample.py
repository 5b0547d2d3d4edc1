"""Seconds per volume and peak memory of ``calid upsample``, end to end, next to linear interpolation.

    python Testing/Benchmarks/benchmark_upsample.py [--model NAME_OR_DIR] [--steps N] [--repeats 3] [--threads 2]

The stack is ACDC-sized (10 slices, 256 x 216): ACDC patient001 end-diastole when ../shared/data is present,
otherwise the bundled Sunnybrook sample resampled in-plane to that size. Each CaLID timing is a whole
``calid upsample`` process (interpreter start, imports, model load, read, generate, write), the way a user
or the Slicer worker runs it; peak memory is the child's maximum resident set size. Linear interpolation is
SimpleITK resampling in this process (what a user would run instead). Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
ACDC_CASE = REPO.parent / "shared" / "data" / "acdc" / "training" / "patient001" / "patient001_frame01.nii.gz"
SAMPLE = REPO / "CaLIDUpsample" / "Resources" / "SampleData" / "CaLIDSample_SCD0000101_phase07.nrrd"


def acdc_sized_stack(folder: Path) -> tuple[Path, str]:
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    if ACDC_CASE.is_file():
        return ACDC_CASE, "ACDC patient001 ED (real, 216x256x10)"
    sample = sitk.ReadImage(str(SAMPLE))[:, :, :10]
    size = (216, 256, 10)
    spacing = [sample.GetSpacing()[0] * sample.GetSize()[0] / size[0], sample.GetSpacing()[1] * sample.GetSize()[1] / size[1],
               sample.GetSpacing()[2]]
    reference = sitk.Image(size, sample.GetPixelID())
    reference.SetSpacing(spacing)
    reference.SetOrigin(sample.GetOrigin())
    reference.SetDirection(sample.GetDirection())
    path = folder / "stack.nrrd"
    sitk.WriteImage(sitk.Resample(sample, reference, sitk.Transform(), sitk.sitkLinear), str(path))
    return path, "bundled Sunnybrook sample resampled to 216x256x10"


def time_calid(source: Path, folder: Path, factor: int, device: str, model: str | None, threads: int,
               steps: int | None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one ``calid upsample`` process."""
    cmd = [sys.executable, "-m", "calid", "upsample", str(source), str(folder / f"out_x{factor}.nrrd"), "--factor",
           str(factor), "--device", device, "--threads", str(threads), "--progress", "none"]
    if model:
        cmd += ["--model", model]
    if steps:
        cmd += ["--steps", str(steps)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak_kb, before) / 2**20


def time_linear(source: Path, factor: int) -> float:
    image = sitk.ReadImage(str(source))
    start = time.perf_counter()
    reference = sitk.Image([image.GetSize()[0], image.GetSize()[1], (image.GetSize()[2] - 1) * factor + 1], image.GetPixelID())
    reference.SetSpacing([image.GetSpacing()[0], image.GetSpacing()[1], image.GetSpacing()[2] / factor])
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the model's own)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source, description = acdc_sized_stack(folder)
        print(f"stack: {description}; repeats: {args.repeats}; CPU threads: {args.threads}; "
              f"steps: {args.steps or 'model default'}")
        for device in devices:
            for factor in (2, 4):
                runs = [time_calid(source, folder, factor, device, args.model, args.threads, args.steps) for _ in range(args.repeats)]
                rows.append({"method": "CaLID (whole process)", "device": device, "factor": factor,
                             "seconds_median": round(statistics.median(r[0] for r in runs), 2),
                             "seconds_min": round(min(r[0] for r in runs), 2),
                             "peak_rss_gb": round(max(r[1] for r in runs), 2)})
        for factor in (2, 4):
            rows.append({"method": "linear (SimpleITK, in process)", "device": "cpu", "factor": factor,
                         "seconds_median": round(statistics.median(time_linear(source, factor) for _ in range(args.repeats)), 4),
                         "seconds_min": None, "peak_rss_gb": None})
    print("| method | device | K | s (median) | s (min) | peak RSS GB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['device']} | {r['factor']} | {r['seconds_median']} | {r['seconds_min'] or ''} | "
              f"{r['peak_rss_gb'] or ''} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
