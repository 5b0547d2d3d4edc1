"""DICOM series in and out, as scanner exports and PACS meet them: a derived series keeps its source's patient and
study, every output is a series of its own, and a damaged or nested export is named in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from calid import UpsampleOptions, upsample_file
from calid.cine import read_input
from calid.cli import main
from calid.errors import CalidError
from calid.imageio import read_image, write_image

LINEAR = UpsampleOptions(factor=2, method="linear", device="cpu")
SOURCE = {"0010|0010": "DOE^JANE", "0010|0020": "PID12345", "0020|000d": "1.2.826.0.1.3680043.9.7.1",
          "0020|0052": "1.2.826.0.1.3680043.9.7.2", "0008|1030": "CARDIAC MRI"}


def header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def tag(path: Path, key: str) -> str:
    return header(path).GetMetaData(key).strip()


@pytest.fixture
def acquired(tmp_path, small_image) -> Path:
    """A SAX series of the real sample in a patient's study, as a scanner writes one (here through our writer)."""
    folder = tmp_path / "SE0005"
    write_image(small_image, folder, identity=SOURCE, description="SAX stack")
    return folder


def test_a_derived_series_keeps_the_patient_study_and_frame_of_reference(acquired, tmp_path):
    upsample_file(acquired, tmp_path / "dense", LINEAR)
    first = sorted((tmp_path / "dense").iterdir())[0]
    for key, value in SOURCE.items():
        assert tag(first, key) == value, key
    assert tag(first, "0020|000e") != tag(sorted(acquired.iterdir())[0], "0020|000e")  # a series of its own
    assert tag(first, "0008|103e") == "CaLID upsampled"
    assert (tag(first, "0018|0020"), tag(first, "0018|0021")) == ("RM", "NONE")  # required of an MR image


def test_every_output_is_a_series_of_its_own_even_within_one_second(tmp_path, small_image):
    """UIDs from the time to the second gave two outputs written in the same second one series (and SOP UIDs)."""
    for name in ("a", "b"):
        write_image(small_image, tmp_path / name)
    files = [sorted((tmp_path / name).iterdir())[0] for name in ("a", "b")]
    for key in ("0020|000e", "0008|0018", "0020|000d"):
        assert tag(files[0], key) != tag(files[1], key), key
    assert all(len(tag(f, "0008|0018")) <= 64 for f in files)


def test_a_truncated_end_slice_is_named_not_dropped(acquired):
    last = sorted(acquired.iterdir())[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CalidError, match=rf"cannot be read \(truncated or damaged\?\): {last.name}"):
        read_image(acquired)  # GDCM left the file out of the series: the stack lost its end slice silently


def test_a_series_folder_with_a_stray_sub_folder_is_one_input_not_a_cohort(acquired, tmp_path, capsys):
    (acquired / "__MACOSX").mkdir()
    assert main(["upsample", str(acquired), str(tmp_path / "dense.nrrd"), "--method", "linear",
                 "--progress", "none"]) == 0
    assert read_image(tmp_path / "dense.nrrd").GetSize()[2] == 2 * read_image(acquired).GetSize()[2] - 1


def test_a_nested_export_names_the_folders_that_hold_series(acquired, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.move(str(acquired), str(export / "DICOM" / "S0001" / "SE0005"))
    assert main(["upsample", str(export), str(tmp_path / "dense.nrrd"), "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give an output folder" in err and "S0001/SE0005" in err, err
    assert not (tmp_path / "dense.nrrd").exists()
    with pytest.raises(CalidError, match="series are in sub-folders .*SE0005"):
        read_image(export / "DICOM")


def test_32_bit_integers_are_written_as_the_16_bits_an_mr_image_holds(tmp_path, small_image):
    """An input with an integer rescale is read as int32, and was written back as a 32-bit MR image (not allowed)."""
    wide = sitk.Cast(small_image, sitk.sitkInt32)
    write_image(wide, tmp_path / "out")
    first = sorted((tmp_path / "out").iterdir())[0]
    assert tag(first, "0028|0100") == "16"
    assert (sitk.GetArrayFromImage(read_image(tmp_path / "out")) == sitk.GetArrayFromImage(wide)).all()


def test_a_latin_1_patient_name_is_carried_in_utf_8(tmp_path, small_image):
    """European scanners write names in ISO_IR 100: ITK hands such bytes over undecoded, and the input was refused."""
    acquired = tmp_path / "latin"
    write_image(small_image, acquired, identity={**SOURCE, "0008|0005": "ISO_IR 100"})
    for file in acquired.iterdir():
        data = file.read_bytes()
        assert b"ISO_IR 100" in data and data.count(b"DOE^JANE") == 1
        file.write_bytes(data.replace(b"DOE^JANE", b"D\xd6E^JANE"))  # the same length: the header stays valid
    upsample_file(acquired, tmp_path / "dense", LINEAR)
    first = sorted((tmp_path / "dense").iterdir())[0]
    assert tag(first, "0010|0010") == "D\u00d6E^JANE" and tag(first, "0008|0005") == "ISO_IR 192"


def test_a_dicomdir_beside_the_series_is_no_damaged_file(acquired, tmp_path):
    """A DICOMDIR is a DICOM file of no series: the check for files GDCM left out took it for a damaged slice."""
    meta = b"\x02\x00\x02\x00UI\x14\x001.2.840.10008.1.3.10"  # Media Storage SOP Class: Media Storage Directory
    (acquired / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + meta + b"\x04\x000\x11CS\x06\x00EXPORT")
    assert read_image(acquired).GetSize()[2] == len(list(acquired.glob("*.dcm")))


def test_a_slice_acquired_again_is_named_as_such_not_as_a_cine(acquired):
    """Two images at one position of a stack were reported as a cine "with mismatched phases"."""
    again = sorted(acquired.iterdir())[2]
    image = sitk.ReadImage(str(again))
    image.SetMetaData("0008|0018", tag(again, "0008|0018") + ".9")  # another instance of the same series
    image.SetMetaData("0020|0013", "99")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(acquired / "again.dcm"))
    writer.Execute(image)
    with pytest.raises(CalidError, match=r"several images at slice position .*\(2 images\): a slice acquired again"):
        read_input(acquired)


def test_trigger_times_that_jitter_with_the_heartbeat_are_a_cine_and_a_missing_frame_is_not():
    from calid.cine import check_uniform_times

    check_uniform_times([0.0, 46.5, 88.5, 136.5, 180.0], "cine")  # ±1.5 ms around 45 ms frames: refused at 10 %
    with pytest.raises(CalidError, match="not uniform"):
        check_uniform_times([0.0, 45.0, 135.0, 180.0], "cine")  # one frame missing


def test_a_series_beside_volume_files_is_refused_not_taken_for_one_input(acquired, tmp_path, small_image, capsys):
    """The series was upsampled and the volumes beside it left out without a word."""
    mixed = tmp_path / "mixed"
    shutil.copytree(acquired, mixed)
    write_image(small_image, mixed / "a.nii.gz")
    assert main(["upsample", str(mixed), str(tmp_path / "out"), "--method", "linear"]) == 2
    assert "holds a DICOM series and volume files (a.nii.gz): put the series in a folder of its own" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()
