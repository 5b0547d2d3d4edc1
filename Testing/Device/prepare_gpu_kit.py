#!/usr/bin/env python3
"""Make what a lent GPU machine needs for ``gpu_session.sh``, in the git-ignored folder ``.gpu_kit/``.

    python Testing/Device/prepare_gpu_kit.py [--data ../shared/data/acdc/training] [--model calid-acdc] [--crop 160]

The GPU machine's image has PyTorch, OpenCV, scikit-image, SciPy and safetensors but neither SimpleITK nor MONAI, and
at most 64 MiB travel to it (the repository's tracked files, about 22 MiB, included). So the kit holds:

- ``acdc.npz``: the model card's training stacks and its first ``--val-volumes`` validation stacks (the trainer's
  order), with its split, as a training pack (``calid.training.pack``: 8-bit, cut to the central ``--crop`` pixels
  square, where the training crops are drawn; uncut, the pack alone is over 60 MiB);
- ``speed_case.npz``: ACDC ``patient001`` end-diastole as the scanner stored it, for the GPU speed benchmark;
- MONAI's wheel (pure Python; torch and numpy are there).

ACDC's data never goes into git: ``.gpu_kit/`` is ignored. It prints what will travel and stops with an error if that
is over the limit. Not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CaLIDUpsample"))

from calid import geometry  # noqa: E402
from calid.modelindex import ACDC_MODEL  # noqa: E402
from calid.modelstore import read_card, resolve_model_dir  # noqa: E402
from calid.training import data  # noqa: E402
from calid.training.pack import write_pack  # noqa: E402

KIT = REPO / ".gpu_kit"
LIMIT_MIB = 64
SPEED_CASE = ("patient001", "patient001_frame01.nii.gz")  # the speed case: ACDC patient001 ED, x2


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "acdc" / "training")
    parser.add_argument("--model", default=ACDC_MODEL, help="whose card's split to pack (default %(default)s)")
    parser.add_argument("--crop", type=int, default=160, help="central square kept in-plane (default %(default)s)")
    parser.add_argument("--val-volumes", type=int, default=8, help="validation stacks packed (default %(default)s)")
    args = parser.parse_args()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    KIT.mkdir(exist_ok=True)
    card = read_card(resolve_model_dir(args.model))
    split = card["training"]["split"]
    entries = data.find_volumes([args.data])
    train = data.load_volumes([e for e in entries if e[0] in set(split["train"])])
    validation = data.validation_order(data.load_volumes([e for e in entries if e[0] in set(split["validation"])]))
    write_pack(KIT / "acdc.npz", train, validation[: args.val_volumes], split, crop=args.crop)

    image = sitk.ReadImage(str(args.data / SPEED_CASE[0] / SPEED_CASE[1]))
    axis = geometry.find_slice_axis(image)
    np.savez(KIT / "speed_case.npz", stack=geometry.to_stack(sitk.GetArrayFromImage(image), axis),
             spacing_mm=np.float64(image.GetSpacing()[axis]), name=np.array(SPEED_CASE[1]))

    for old in KIT.glob("monai-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "-d", str(KIT), f"monai=={metadata.version('monai')}"], check=True)

    kit = {p.name: p.stat().st_size for p in sorted(KIT.iterdir())}
    total = tracked_bytes() + sum(kit.values())
    print(f"{len(train)} training and {min(len(validation), args.val_volumes)} validation stacks, cut to "
          f"{args.crop} px")
    for name, size in kit.items():
        print(f"  .gpu_kit/{name}: {size / 2**20:.1f} MiB")
    print(f"travels with the tracked files: {total / 2**20:.1f} MiB of {LIMIT_MIB}")
    if total > LIMIT_MIB * 2**20:
        sys.exit(f"prepare_gpu_kit: over the {LIMIT_MIB} MiB transfer limit: use a smaller --crop")


if __name__ == "__main__":
    main()
