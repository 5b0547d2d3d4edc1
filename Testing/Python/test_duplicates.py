"""One scan filed under two patients (ACDC's patient074 and patient076) never sits on both sides of a split.

Real files made from the real sample: a "copy" is the same voxels written again in another format with another
origin, as a second export of one scan would be.
"""

from __future__ import annotations

import json

import SimpleITK as sitk

from calid.evaluation import select_patients
from calid.imageio import write_image
from calid.training.data import find_volumes, split_patients
from calid.training.duplicates import fingerprint, leaked, same_scan_groups


def _cohort(root, sample_image, patients=10):
    """``patients`` ACDC-like folders of distinct real slabs; the last one holds a copy of the first's scan."""
    for i in range(patients - 1):
        folder = root / f"patient{i:03d}"
        folder.mkdir(parents=True)
        write_image(sample_image[8 * i: 8 * i + 64, 16:80, :], folder / f"patient{i:03d}_frame01.nii.gz")
    copy = sitk.ReadImage(str(root / "patient000" / "patient000_frame01.nii.gz"))
    copy.SetOrigin([x + 5.0 for x in copy.GetOrigin()])
    folder = root / f"patient{patients - 1:03d}"
    folder.mkdir()
    write_image(copy, folder / f"patient{patients - 1:03d}_frame01.nrrd")
    return root


def test_a_copy_in_another_format_is_found_and_distinct_scans_are_not(tmp_path, sample_image):
    root = _cohort(tmp_path / "data", sample_image)
    volumes = find_volumes([root])
    assert same_scan_groups(volumes) == [{"patient000", "patient009"}]
    assert fingerprint(root / "patient001" / "patient001_frame01.nii.gz") != fingerprint(
        root / "patient002" / "patient002_frame01.nii.gz")


def test_split_keeps_copies_of_one_scan_on_the_same_side_whatever_the_seed(tmp_path, sample_image):
    volumes = find_volumes([_cohort(tmp_path / "data", sample_image)])
    sides = set()
    for seed in range(12):
        split = split_patients(volumes, 0.3, seed, {})
        assert sorted(split["train"] + split["validation"]) == sorted({p for p, _ in volumes})
        side = "validation" if "patient000" in split["validation"] else "train"
        assert "patient009" in split[side]
        sides.add(side)
    assert sides == {"train", "validation"}  # the pair is placed by the seed like any patient, but always together


def test_evaluation_leaves_out_a_validation_patient_whose_scan_is_a_training_patients(tmp_path, sample_image):
    root = _cohort(tmp_path / "data", sample_image)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["patient000", "patient001"], "validation": ["patient002", "patient009"]}))
    assert leaked(json.loads(split.read_text()), find_volumes([root])) == {"patient009": ["patient000"]}
    selection = select_patients(str(split), [str(root)])
    assert selection.wanted == {"patient002"}
    assert selection.note() == ("Left out, a training patient's scans under another name: patient009 "
                                "(its scans are patient000's).")
    assert select_patients("patient002,patient009", [str(root)]).wanted == {"patient002", "patient009"}
