"""Inputs that are not sparse stacks (isotropic, or two slices) are upsampled after one warning line."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from calid.cine import input_warning
from calid.cli import main
from calid.geometry import sparse_stack_warning
from calid.imageio import write_image


def isotropic(image: sitk.Image, mm: float = 1.5) -> sitk.Image:
    """The real sample resampled to mm-sized voxels over the same extent, keeping its oblique direction."""
    size = [int(n * s / mm) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [mm] * 3,
                         image.GetDirection(), 0, image.GetPixelID())


@pytest.fixture
def iso_image(small_image) -> sitk.Image:
    return isotropic(small_image[:, :, :3])  # 64 x 64 pixels of 1.37 mm, 3 slices 10 mm apart -> 58 x 58 x 20


def upsample(tmp_path, image, tiny_model_dir, *extra) -> int:
    source = tmp_path / "in.nrrd"
    write_image(image, source)
    code = main(["upsample", str(source), str(tmp_path / "out.nrrd"), "--model", str(tiny_model_dir),
                 "--steps", "1", "--device", "cpu", *extra])
    return code


def test_isotropic_volume_warns_once_naming_both_spacings_and_is_still_upsampled(tmp_path, iso_image, tiny_model_dir,
                                                                                capsys):
    code = upsample(tmp_path, iso_image, tiny_model_dir, "--progress", "none")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("calid: warning:")]
    assert code == 0 and len(warnings) == 1
    assert "slice spacing 1.5 mm along axis 2, in-plane 1.5 x 1.5 mm" in warnings[0]
    assert sitk.ReadImage(str(tmp_path / "out.nrrd")).GetSpacing()[2] == pytest.approx(0.75)


def test_warning_is_a_json_event_before_any_progress_in_json_mode(tmp_path, iso_image, tiny_model_dir, capsys):
    code = upsample(tmp_path, iso_image, tiny_model_dir, "--progress", "json")
    out = capsys.readouterr()
    events = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    assert code == 0 and "warning" not in out.err  # the Slicer worker reads stdout and stderr as one log
    assert events[0]["event"] == "warning" and "not look like a sparse short-axis stack" in events[0]["message"]
    assert [e["event"] for e in events].count("warning") == 1 and events[-1]["event"] == "done"


def test_a_real_sparse_stack_gives_no_warning(tmp_path, small_image, tiny_model_dir, capsys):
    code = upsample(tmp_path, small_image, tiny_model_dir, "--progress", "json")
    out = capsys.readouterr()
    assert code == 0 and "warning" not in out.out + out.err


def test_two_slices_warn_and_one_slice_is_left_to_the_error(sample_image):
    assert sparse_stack_warning(sample_image) is None
    assert "only 2 slices: slice spacing 10 mm along axis 2, in-plane 1.37 x 1.37 mm" in sparse_stack_warning(
        sample_image[:, :, 4:6])
    assert sparse_stack_warning(sample_image[:, :, 4:5]) is None  # resolve_factor refuses it in its own line


@pytest.mark.parametrize("name", ["iso.nii.gz", "dicom", "cine.nii.gz"])
def test_input_warning_reads_files_dicom_folders_and_cines(tmp_path, iso_image, sample_image, name):
    path = tmp_path / name
    if name.startswith("cine"):
        iso_image = sitk.JoinSeries([iso_image, iso_image], 0.0, 40.0)  # two phases: a 4D file
        write_image(sitk.JoinSeries([sample_image, sample_image], 0.0, 40.0), tmp_path / "sparse_cine.nii.gz")
        assert input_warning(tmp_path / "sparse_cine.nii.gz") is None
    write_image(iso_image, path)
    assert "slice spacing 1.5 mm along axis 2" in input_warning(path)
