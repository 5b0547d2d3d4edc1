"""The same scan filed under two patients: found by content, so that a split never puts it on both sides.

Why: the ACDC training set holds one scan twice. ``patient074`` and ``patient076`` (same group, height and weight in
``Info.cfg``) have voxel-for-voxel identical ED and ES frames (their label files differ). A split by patient that
trains on one and validates on the other scores the model on a scan it learnt from. Files are compared by their
voxels, shape and spacing, not their bytes, since headers (and compression) can differ between copies.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import SimpleITK as sitk


def fingerprint(path: str | Path) -> str:
    """A digest of an image's voxels, size and spacing: equal for copies of one scan under any header or file name."""
    image = sitk.ReadImage(str(path))
    digest = hashlib.sha256(repr((image.GetSize(), tuple(round(s, 4) for s in image.GetSpacing()))).encode())
    digest.update(sitk.GetArrayViewFromImage(image).tobytes())
    return digest.hexdigest()


def same_scan_groups(volumes: list[tuple[str, Path]]) -> list[set[str]]:
    """Groups of two or more patients that share at least one scan (by ``fingerprint``), joined transitively."""
    owners: dict[str, set[str]] = defaultdict(set)
    for patient, path in volumes:
        owners[fingerprint(path)].add(patient)
    groups: list[set[str]] = []
    for patients in owners.values():
        touching = [g for g in groups if g & patients]
        merged = set(patients).union(*touching)
        groups = [g for g in groups if not g & patients] + [merged]
    return [g for g in groups if len(g) > 1]


def leaked(split: dict[str, list[str]], volumes: list[tuple[str, Path]]) -> dict[str, list[str]]:
    """Validation patients of ``split`` that share a scan with one of its training patients -> those patients."""
    train, validation = set(split["train"]), set(split["validation"])
    wanted = [(p, f) for p, f in volumes if p in train or p in validation]
    found: dict[str, list[str]] = {}
    for group in same_scan_groups(wanted):
        for patient in sorted(group & validation):
            if group & train:
                found[patient] = sorted(group & train)
    return found
