"""A training run's stacks in one file that loads without SimpleITK.

The GPU machine this project is lent has no SimpleITK, and what travels to it is limited (64 MiB with the
repository), so a run there reads its training and validation stacks from a pack (``calid train --pack``) instead
of image folders. Each stack is stored as the trainer uses it (``data.Volume``: normalised, slices first),
quantised to 8 bits between its own minimum and maximum (an error of at most (max - min) / 510 network units, a
small fraction of the VAE's reconstruction error) and optionally cut in-plane to a square around the slice's
centre, where short-axis acquisitions put the heart and where the training crops are drawn
(``data.crop_centred``). The file is a NumPy ``.npz`` read with ``allow_pickle=False``: numbers and strings,
nothing that runs.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import CalidError
from .data import Volume

FORMAT = "calid-training-pack-1"
LEVELS = 255


def centre_square(stack: np.ndarray, size: int | None) -> np.ndarray:
    """The central ``size`` x ``size`` part of every slice (a side shorter than ``size`` is kept whole)."""
    if size is None:
        return stack
    h, w = stack.shape[-2:]
    y0, x0 = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return stack[..., y0:y0 + size, x0:x0 + size]


def write_pack(path: str | os.PathLike, train: list[Volume], validation: list[Volume],
               split: dict[str, list[str]], crop: int | None = None) -> Path:
    """Write the stacks and the split they come from; returns the path. The file appears only when complete."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    ranges, spacings, patients, sources, roles = [], [], [], [], []
    for i, (role, volume) in enumerate([("train", v) for v in train] + [("validation", v) for v in validation]):
        stack = centre_square(volume.stack, crop)
        low, high = float(stack.min()), float(stack.max())
        arrays[f"stack{i}"] = np.rint((stack - low) / max(high - low, 1e-12) * LEVELS).astype(np.uint8)
        ranges.append((low, high))
        spacings.append(volume.slice_spacing)
        patients.append(volume.patient)
        sources.append(Path(volume.path).name)
        roles.append(role)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, format=np.array(FORMAT), ranges=np.array(ranges, dtype=np.float64),
                        spacings=np.array(spacings, dtype=np.float64), patients=np.array(patients),
                        sources=np.array(sources), roles=np.array(roles),
                        split_train=np.array(sorted(split["train"])),
                        split_validation=np.array(sorted(split["validation"])), **arrays)
    os.replace(partial, path)
    return path


def read_pack(path: str | os.PathLike) -> tuple[list[Volume], list[Volume], dict[str, list[str]]]:
    """(training volumes, validation volumes, split) from a pack written by ``write_pack``."""
    path = Path(path)
    if not path.is_file():
        raise CalidError(f"training pack not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as pack:
            if "format" not in pack.files or str(pack["format"]) != FORMAT:
                raise CalidError(f"{path} is not a CaLID training pack ({FORMAT})")
            volumes: dict[str, list[Volume]] = {"train": [], "validation": []}
            for i, ((low, high), spacing, patient, source, role) in enumerate(zip(
                    pack["ranges"], pack["spacings"], pack["patients"], pack["sources"], pack["roles"])):
                stack = (pack[f"stack{i}"].astype(np.float32) * np.float32((high - low) / LEVELS) + np.float32(low))
                volumes[str(role)].append(Volume(str(patient), f"{path.name}:{source}", stack, float(spacing)))
            split = {"train": pack["split_train"].tolist(), "validation": pack["split_validation"].tolist()}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CalidError(f"cannot read the training pack {path}: {exc}") from None
    return volumes["train"], volumes["validation"], split
