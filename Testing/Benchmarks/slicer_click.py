#!/usr/bin/env python3
"""Click to result in Slicer: ``CaLIDUpsampleLogic.process`` with a cold worker, then with the standby worker.

    python Testing/Benchmarks/slicer_click.py [--repeats 3] [--factor 2]

What the Upsample button costs, measured on slicer-core's real MRML scene (no Qt): export of the volume node,
the ``calid`` worker, and loading the dense volume back into a node. *Cold*: a new worker process per run.
*Standby*: the panel's default (``logic.setStandby(True)``): each run is given to a worker that has already
imported the engine; the clock starts once it is ready, as it is while the user sets up the run. The stack is
ACDC patient001 end-diastole (216x256x10, 10 mm) from ``../shared/data``, or the bundled sample without it;
default model, CPU. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CaLIDUpsample"))

import slicer  # noqa: E402

from CaLIDLib import CaLIDUpsampleLogic  # noqa: E402
from CaLIDLib.volumes import update_node_from_file  # noqa: E402

ACDC_CASE = REPO.parent / "shared" / "data" / "acdc" / "training" / "patient001" / "patient001_frame01.nii.gz"
SAMPLE = REPO / "CaLIDUpsample" / "Resources" / "SampleData" / "CaLIDSample_SCD0000101_phase07.nrrd"


def wait_until_ready(logic: CaLIDUpsampleLogic) -> None:
    """Until the standby worker has printed its ready line (it prints nothing before)."""
    while logic.standby.lines.empty():
        time.sleep(0.05)


def click_seconds(logic: CaLIDUpsampleLogic, node, factor: int, standby: bool) -> float:
    if standby:
        wait_until_ready(logic)
    start = time.perf_counter()
    logic.process(node, factor=factor, device="cpu")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--factor", type=int, default=2)
    args = parser.parse_args()
    source = ACDC_CASE if ACDC_CASE.is_file() else SAMPLE
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAX")
    update_node_from_file(node, source)
    print(f"stack: {source.name}; K={args.factor}; repeats: {args.repeats}; CPU")
    print("| worker | s per click (median) | min | max |\n|---|---|---|---|")
    for standby in (False, True):
        logic = CaLIDUpsampleLogic(scene, python=sys.executable)
        logic.setStandby(standby)
        runs = [click_seconds(logic, node, args.factor, standby) for _ in range(args.repeats)]
        logic.setStandby(False)
        print(f"| {'standby' if standby else 'cold'} | {statistics.median(runs):.2f} | {min(runs):.2f} | {max(runs):.2f} |")


if __name__ == "__main__":
    main()
