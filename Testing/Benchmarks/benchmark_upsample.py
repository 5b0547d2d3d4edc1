"""Seconds per volume and peak memory of ``calid upsample``, end to end, next to linear interpolation.

    python Testing/Benchmarks/benchmark_upsample.py [--model NAME_OR_DIR] [--steps N] [--repeats 3] [--threads 2]

The stack is ACDC-sized (10 slices, 256 x 216): ACDC patient001 end-diastole when ../shared/data is present,
otherwise the bundled Sunnybrook sample resampled in-plane to that size. Each CaLID timing is a whole
``calid upsample`` process (interpreter start, imports, model load, read, generate, write), the way a user
or a cold Slicer worker runs it; peak memory is the child's maximum resident set size. The *standby* rows are
what the Slicer modules do by default: a ``calid standby`` process has already started and imported the engine
(the time it took, and the memory it holds while waiting, are given) and the time runs from sending it the
command file to its exit. The *uncertainty map* row is the whole process with ``--uncertainty`` (K=2), the
price of the calibrated map. Linear interpolation is SimpleITK resampling in this process (what a user would run
instead). Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from calid.devices import software_line
from calid.standby import hand_over

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


def upsample_arguments(source: Path, folder: Path, factor: int, device: str, model: str | None, threads: int,
                       steps: int | None) -> list[str]:
    """The ``calid`` arguments of one run, after ``calid``."""
    arguments = ["upsample", str(source), str(folder / f"out_x{factor}.nrrd"), "--factor", str(factor), "--device",
                 device, "--threads", str(threads), "--progress", "none"]
    arguments += ["--model", model] if model else []
    arguments += ["--steps", str(steps)] if steps else []
    return arguments


def time_calid(arguments: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one ``calid upsample`` process: the usage ``os.wait4`` reports for that
    child alone (``RUSAGE_CHILDREN`` is the largest peak of any child so far, so every row after the first read the
    first's when it was larger). Linux counts a child's peak from this process's resident size when it starts it,
    which every ``calid`` process passes (it imports the same libraries and more)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "calid", *arguments])
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    return seconds, usage.ru_maxrss / 2**20  # kB on Linux


def resident_gb(pid: int) -> float | None:
    """Current resident memory of a process (Linux ``/proc``; None elsewhere)."""
    status = Path(f"/proc/{pid}/status")
    if not status.is_file():
        return None
    kb = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
    return kb / 2**20


def time_standby(arguments: list[str], folder: Path) -> tuple[float, float, float | None]:
    """(seconds from handing over the command line to exit, seconds the standby took to get ready, GB held waiting)."""
    command_file = folder / "command.json"
    start = time.perf_counter()
    worker = subprocess.Popen([sys.executable, "-m", "calid", "standby", "--command-file", str(command_file)],
                              stdout=subprocess.PIPE, text=True)
    assert json.loads(worker.stdout.readline()) == {"event": "ready"}
    ready = time.perf_counter() - start
    waiting_gb = resident_gb(worker.pid)
    start = time.perf_counter()
    hand_over(command_file, json.dumps(arguments))  # as the Slicer logic does
    worker.stdout.read()
    if worker.wait() != 0:
        raise RuntimeError(f"calid standby failed on {arguments}")
    return time.perf_counter() - start, ready, waiting_gb


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
        print("software: " + software_line())
        for device in devices:
            for factor in (2, 4):
                arguments = upsample_arguments(source, folder, factor, device, args.model, args.threads, args.steps)
                runs = [time_calid(arguments) for _ in range(args.repeats)]
                rows.append({"method": "CaLID (whole process)", "device": device, "factor": factor,
                             "seconds_median": round(statistics.median(r[0] for r in runs), 2),
                             "seconds_min": round(min(r[0] for r in runs), 2),
                             "peak_rss_gb": round(max(r[1] for r in runs), 2)})
                warm = [time_standby(arguments, folder) for _ in range(args.repeats)]
                held = [w[2] for w in warm if w[2] is not None]
                if factor == 2:
                    mapped = [time_calid(arguments + ["--uncertainty", str(folder / "uncertainty.nrrd")])
                              for _ in range(args.repeats)]
                    rows.append({"method": "CaLID + uncertainty map (whole process)", "device": device, "factor": factor,
                                 "seconds_median": round(statistics.median(r[0] for r in mapped), 2),
                                 "seconds_min": round(min(r[0] for r in mapped), 2),
                                 "peak_rss_gb": round(max(r[1] for r in mapped), 2)})
                rows.append({"method": f"CaLID (standby worker; ready after {statistics.median(w[1] for w in warm):.1f} s"
                                       + (f", holding {max(held):.2f} GB" if held else "") + ")",
                             "device": device, "factor": factor,
                             "seconds_median": round(statistics.median(w[0] for w in warm), 2),
                             "seconds_min": round(min(w[0] for w in warm), 2), "peak_rss_gb": None})
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
