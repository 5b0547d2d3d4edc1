"""Cine (2D+T) input: geometry and time kept, acquired slices exact in every phase, shared noise, bad inputs."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from calid.cine import Cine, read_input, write_cine
from calid.cli import main
from calid.engine import UpsampleOptions
from calid.errors import CalidError
from calid.generation import generate_missing, generate_missing_phases
from calid.imageio import write_image
from calid.modelstore import load_model
from calid.networks import TINY_CONFIG, CaLID
from calid.pipeline_settings import MotionSettings
from calid.progress import Progress

TIMES = (25.0, 65.0, 105.0)


def make_cine(volume: sitk.Image, times=TIMES) -> sitk.Image:
    """A 4D cine from the real (oblique) sample: one shifted copy per phase, time origin and spacing set."""
    frames = [sitk.Cast(volume, sitk.sitkInt16) + 7 * t for t in range(len(times))]
    return sitk.JoinSeries(frames, times[0], times[1] - times[0])


def upsample(source, target, *extra, model) -> int:
    return main(["upsample", str(source), str(target), "--model", str(model), "--steps", "1", "--progress", "none",
                 *map(str, extra)])


def stacks(image: sitk.Image) -> np.ndarray:
    """(t, z, y, x) voxels of a 4D image or of a sequence NRRD read as vectors."""
    array = sitk.GetArrayFromImage(image)
    return np.moveaxis(array, -1, 0) if image.GetNumberOfComponentsPerPixel() > 1 else array


@pytest.fixture
def cine(small_image) -> sitk.Image:
    return make_cine(small_image)


def test_4d_nifti_round_trip_keeps_geometry_time_and_acquired_slices(cine, tmp_path, tiny_model_dir):
    source = tmp_path / "cine.nii.gz"
    sitk.WriteImage(cine, str(source))
    assert upsample(source, tmp_path / "dense.nii.gz", "--factor", "2", model=tiny_model_dir) == 0
    dense = sitk.ReadImage(str(tmp_path / "dense.nii.gz"))
    assert dense.GetSize() == (64, 64, 11, 3)
    assert dense.GetPixelID() == cine.GetPixelID()
    np.testing.assert_allclose(dense.GetSpacing(), [*cine.GetSpacing()[:2], cine.GetSpacing()[2] / 2, 40.0], rtol=1e-6)
    np.testing.assert_allclose(dense.GetOrigin(), cine.GetOrigin(), atol=1e-4)
    assert dense.GetOrigin()[3] == pytest.approx(TIMES[0])
    np.testing.assert_allclose(dense.GetDirection(), cine.GetDirection(), atol=1e-6)
    assert np.array_equal(stacks(dense)[:, ::2], stacks(cine))


def test_sequence_nrrd_round_trip_keeps_frame_times_and_fields(small_image, tmp_path, tiny_model_dir):
    times = (0.0, 33.5, 67.0, 100.5)
    four_d = make_cine(small_image[:, :, :3], times)
    source = tmp_path / "cine.seq.nrrd"
    write_cine(four_d, Cine(four_d, times, {"quantity": "time", "unit": "ms"}), source)
    read = read_input(source)
    assert isinstance(read, Cine) and read.times == times
    assert read.sequence_fields == {"index type": "numeric", "quantity": "time", "unit": "ms"}
    assert upsample(source, tmp_path / "dense.seq.nrrd", "--factor", "3", model=tiny_model_dir) == 0
    dense = sitk.ReadImage(str(tmp_path / "dense.seq.nrrd"))
    assert dense.GetNumberOfComponentsPerPixel() == 4 and dense.GetSize() == (64, 64, 7)
    assert dense.GetMetaData("NRRD_kinds[pixel]") == "list"
    assert dense.GetMetaData("axis 3 index values") == "0 33.5 67 100.5"
    assert dense.GetMetaData("axis 3 unit") == "ms"
    np.testing.assert_allclose(dense.GetDirection(), small_image.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(dense.GetOrigin(), small_image.GetOrigin(), atol=1e-9)
    assert np.array_equal(stacks(dense)[:, ::3], stacks(four_d))


def test_sequence_with_list_axis_first_is_read(small_image, tmp_path):
    """Older Slicer versions wrote the frames as the first NRRD axis (axis 0 index values)."""
    volume = sitk.Cast(small_image[:8, :8, :3], sitk.sitkInt16)
    vector = sitk.Compose([volume, volume + 1, volume + 2])
    vector.SetMetaData("axis 0 index type", "numeric")
    vector.SetMetaData("axis 0 index values", "10 20 30")
    sitk.WriteImage(vector, str(tmp_path / "old.seq.nrrd"))
    read = read_input(tmp_path / "old.seq.nrrd")
    assert isinstance(read, Cine) and read.times == (10.0, 20.0, 30.0)
    assert np.array_equal(stacks(read.image)[2], sitk.GetArrayFromImage(volume + 2))


def test_dicom_cine_round_trip(cine, tmp_path, tiny_model_dir):
    write_image(cine, tmp_path / "cine_dicom")
    assert len(list((tmp_path / "cine_dicom").iterdir())) == 18
    read = read_input(tmp_path / "cine_dicom")
    assert isinstance(read, Cine) and read.times == TIMES
    assert np.array_equal(stacks(read.image), stacks(cine))
    assert upsample(tmp_path / "cine_dicom", tmp_path / "dense_dicom", model=tiny_model_dir) == 0
    dense = read_input(tmp_path / "dense_dicom")
    assert dense.times == TIMES and dense.image.GetSize() == (64, 64, 11, 3)
    assert np.array_equal(stacks(dense.image)[:, ::2], stacks(cine))


def test_a_dicom_cine_of_one_series_per_slice_position_is_one_cine(cine, tmp_path):
    """Siemens exports a short-axis cine as one series per slice position: "several series" was refused, and one
    series per folder is a single slice. A localizer beside a stack is still refused, its series named."""
    folder = tmp_path / "export"
    folder.mkdir()
    for k in range(cine.GetSize()[2]):
        write_image(cine[:, :, k:k + 1, :], tmp_path / f"slice{k}", description=f"cine slice {k}")
        for file in (tmp_path / f"slice{k}").iterdir():
            file.rename(folder / f"s{k}_{file.name}")
    read = read_input(folder)
    assert isinstance(read, Cine) and read.times == TIMES
    assert np.array_equal(stacks(read.image), stacks(cine))
    np.testing.assert_allclose(read.image.GetOrigin()[:3], cine.GetOrigin()[:3], atol=1e-4)
    np.testing.assert_allclose(read.image.GetDirection(), cine.GetDirection(), atol=1e-6)
    mixed = tmp_path / "mixed"
    write_image(sitk.Cast(cine[:, :, :, 0], sitk.sitkInt16), mixed, description="SAX stack")
    write_image(sitk.Cast(cine[:, :, :2, 0], sitk.sitkInt16), tmp_path / "scout", description="Localizer")
    for file in (tmp_path / "scout").iterdir():
        file.rename(mixed / f"scout_{file.name}")
    with pytest.raises(CalidError, match=r"holds 2 DICOM series \(.*(SAX stack: 6 files.*Localizer: 2 files|"
                                          r"Localizer: 2 files.*SAX stack: 6 files)"):
        read_input(mixed)


def test_phases_batched_with_shared_noise_equal_single_stacks(small_image, tiny_model_dir):
    """Shared noise: each phase gets exactly the noise a single stack gets, so batching changes nothing."""
    model, _ = load_model(str(tiny_model_dir), torch.device("cpu"))
    phases = np.random.default_rng(0).normal(size=(3, 4, 32, 32)).astype(np.float32)
    together = generate_missing_phases(model, phases, 2, 2, seed=3, samples=2)
    for t in range(3):
        alone = generate_missing(model, phases[t], 2, 2, seed=3, samples=2)
        np.testing.assert_allclose(together[:, t], alone, atol=1e-5)
    again = generate_missing_phases(model, phases, 2, 2, seed=3, samples=2)
    assert np.array_equal(together, again)


def test_shared_noise_is_identical_across_equal_phases_and_independent_is_not(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), torch.device("cpu"))
    phase = np.random.default_rng(1).normal(size=(3, 32, 32)).astype(np.float32)
    same = np.stack([phase] * 3)
    shared = generate_missing_phases(model, same, 2, 2, seed=0, shared_noise=True)
    independent = generate_missing_phases(model, same, 2, 2, seed=0, shared_noise=False)
    np.testing.assert_allclose(shared[:, 1], shared[:, 0], atol=1e-5)
    assert np.abs(independent[:, 1] - independent[:, 0]).max() > 1e-3


def test_one_progress_over_the_whole_cine(cine, tiny_model_dir):
    from calid.engine import upsample_cine

    stream = io.StringIO()
    progress = Progress("json", stream=stream)
    upsample_cine(Cine(cine, TIMES), UpsampleOptions(factor=2, steps=2, device="cpu", model=str(tiny_model_dir)),
                  progress=progress)
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert progress.total == 3 * 6 + 3 * 5 * 2 + 3 * 5 + 3 * 6  # encode, 2 steps, decode, reconstruct


def test_segmenting_a_cine_moves_the_progress_phase_by_phase_after_the_new_slices(cine, tmp_path, tiny_model_dir):
    from calid.engine import upsample_cine_file

    stream = io.StringIO()
    options = UpsampleOptions(factor=2, steps=1, device="cpu", model=str(tiny_model_dir))
    upsample_cine_file(Cine(cine, TIMES), tmp_path / "out.nii.gz", options, progress=Progress("json", stream=stream),
                       segmentation_path=tmp_path / "labels.nii.gz")
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    segmenting = [e for e in progress if e["stage"] == "segmenting"]
    dense_slices = 2 * 6 - 1
    assert [e["done"] for e in segmenting] == [progress[-1]["total"] - dense_slices * k for k in (2, 1, 0)]
    assert segmenting[0]["fraction"] < 1.0 and progress[-len(segmenting) - 1]["stage"] != "segmenting"


def test_cine_uncertainty_is_a_map_per_phase_zero_on_acquired_slices(cine, tmp_path, error_head_model_dir):
    source = tmp_path / "cine.nii.gz"
    sitk.WriteImage(cine, str(source))
    assert upsample(source, tmp_path / "dense.nii.gz", "--uncertainty", tmp_path / "u.nii.gz",
                    model=error_head_model_dir) == 0
    expected = stacks(sitk.ReadImage(str(tmp_path / "u.nii.gz")))
    assert expected.shape == (3, 11, 64, 64)
    assert not expected[:, ::2].any() and (expected[:, 1::2] > 0).all()
    assert not np.allclose(expected[0, 1::2], expected[1, 1::2])  # each phase its own map


def test_a_segmented_cines_map_figures_are_inside_each_phases_heart(sample_image, tmp_path, error_head_model_dir):
    """With --segmentation and --uncertainty a cine's per-slice figures include each phase's heart (they had none).
    The whole sample's field of view, where the segmenter finds the heart."""
    from calid.engine import upsample_cine_file

    options = UpsampleOptions(factor=2, steps=1, device="cpu", model=str(error_head_model_dir))
    result = upsample_cine_file(Cine(make_cine(sample_image), TIMES), tmp_path / "out.nii.gz", options,
                                tmp_path / "u.nii.gz", segmentation_path=tmp_path / "labels.nii.gz")
    maps, labels = stacks(result.uncertainty), stacks(result.labels)
    assert len(result.uncertainty_slices) == 3 * (sample_image.GetSize()[2] - 1)
    with_heart = 0
    for entry in result.uncertainty_slices:
        t, k = entry["phase"], entry["slice"]
        heart = labels[t, k] > 0
        assert entry["heart_expected_error"] == (pytest.approx(float(maps[t, k][heart].mean()), rel=1e-5)
                                                 if heart.any() else None)
        with_heart += heart.any()
    assert with_heart > 0


def sequence_file(path: Path, volume: sitk.Image, values: str, index_type: str = "numeric") -> Path:
    frames = [sitk.Cast(volume, sitk.sitkInt16) + t for t in range(len(values.split()))]
    vector = sitk.Compose(frames)
    vector.SetMetaData("axis 0 index type", index_type)
    vector.SetMetaData("axis 0 index values", values)
    sitk.WriteImage(vector, str(path))
    return path


def dicom_cine(folder: Path, cine: sitk.Image) -> Path:
    write_image(cine, folder)
    return folder


def rewrite_dicom(path: Path, **tags: str) -> None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image = reader.Execute()
    for tag, value in tags.items():
        image.SetMetaData(tag.replace("_", "|"), value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)


def bad_cines(tmp: Path, small_image: sitk.Image, cine: sitk.Image) -> dict[str, tuple[Path, str]]:
    cases = {"non-uniform time": (sequence_file(tmp / "uneven.seq.nrrd", small_image, "0 40 120 160"),
                                  "frame times are not uniform"),
             "text index": (sequence_file(tmp / "text.seq.nrrd", small_image, "pre post", "text"), "is text"),
             "one slice": (tmp / "one.nii.gz", "at least 2 acquired slices")}
    sitk.WriteImage(make_cine(small_image[:, :, 2:3]), str(tmp / "one.nii.gz"))
    missing = dicom_cine(tmp / "missing_frame", cine)
    (missing / "phase002_slice0003.dcm").unlink()
    cases["DICOM missing frame"] = (missing, "mismatched phases (missing or extra frames)")
    extra = dicom_cine(tmp / "extra_frame", cine)
    copy = extra / "phase004_slice0002.dcm"
    copy.write_bytes((extra / "phase003_slice0002.dcm").read_bytes())
    rewrite_dicom(copy, **{"0018_1060": "145", "0008_0018": "1.2.3.4.5.6.7"})
    cases["DICOM extra frame"] = (extra, "positions have 3 phases, but")
    uneven = dicom_cine(tmp / "uneven_dicom", cine)
    for k in range(1, 7):
        rewrite_dicom(uneven / f"phase003_slice{k:04d}.dcm", **{"0018_1060": "200"})
    cases["DICOM non-uniform trigger times"] = (uneven, "frame times are not uniform")
    duplicate = dicom_cine(tmp / "duplicate", cine)
    rewrite_dicom(duplicate / "phase002_slice0004.dcm", **{"0018_1060": "25"})
    cases["DICOM duplicate trigger time"] = (duplicate, "same trigger time")
    return cases


BAD = ["non-uniform time", "text index", "one slice", "DICOM missing frame", "DICOM extra frame",
       "DICOM non-uniform trigger times", "DICOM duplicate trigger time"]


@pytest.mark.parametrize("name", BAD)
def test_bad_cine_input_is_one_line_error_and_no_output(name, small_image, cine, tmp_path, tiny_model_dir, capsys):
    (tmp_path / "in").mkdir()
    source, expected = bad_cines(tmp_path / "in", small_image, cine)[name]
    code = upsample(source, tmp_path / "out.nii.gz", model=tiny_model_dir)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("calid: error:") and expected in err and len(err.splitlines()) == 1, err
    assert [p.name for p in tmp_path.iterdir() if p.name != "in"] == []


def test_a_cine_is_segmented_phase_by_phase_as_its_volumes_are(sample_image, tmp_path, tiny_model_dir, capsys):
    # The whole field of view (the segmenter finds the heart in it), each phase the same volume: the cine's one
    # intensity map is then that volume's own, and each phase is upsampled exactly as the volume alone is.
    volume = sitk.Cast(sample_image, sitk.sitkInt16)
    cine = sitk.JoinSeries([volume] * len(TIMES), TIMES[0] / 1000, (TIMES[1] - TIMES[0]) / 1000)  # NIfTI: seconds
    source, labels_path = tmp_path / "cine.nii.gz", tmp_path / "labels.nii.gz"
    sitk.WriteImage(cine, str(source))
    assert upsample(source, tmp_path / "out.nii.gz", "--segmentation", labels_path, model=tiny_model_dir) == 0
    report = json.loads(capsys.readouterr().out)
    dense, labels = sitk.ReadImage(str(tmp_path / "out.nii.gz")), sitk.ReadImage(str(labels_path))
    assert labels.GetSize() == dense.GetSize() and labels.GetSpacing() == dense.GetSpacing()
    assert labels.GetOrigin() == dense.GetOrigin() and labels.GetDirection() == dense.GetDirection()
    phases = report["volumes"]["phases"]
    assert [p["time_ms"] for p in phases] == list(TIMES)
    lv = [p["lv_cavity_ml"] for p in phases]
    assert lv[report["volumes"]["lv_end_diastole_phase"]] == max(lv) and max(lv) > 0

    sitk.WriteImage(volume, str(tmp_path / "phase1.nii.gz"))
    assert upsample(tmp_path / "phase1.nii.gz", tmp_path / "phase1_x2.nii.gz", "--segmentation",
                    tmp_path / "phase1_labels.nii.gz", model=tiny_model_dir) == 0
    alone = json.loads(capsys.readouterr().out)["volumes"]
    assert alone == {k: v for k, v in phases[1].items() if k not in ("phase", "time_ms")}
    np.testing.assert_array_equal(stacks(labels)[1], sitk.GetArrayFromImage(sitk.ReadImage(
        str(tmp_path / "phase1_labels.nii.gz"))))


def test_a_cine_with_user_labels_and_a_bad_noise_option_are_refused(cine, small_image, tmp_path, tiny_model_dir,
                                                                     capsys):
    source = tmp_path / "cine.nii.gz"
    sitk.WriteImage(cine, str(source))
    mine = tmp_path / "mine.nii.gz"
    sitk.WriteImage(sitk.Cast(small_image * 0, sitk.sitkUInt8), str(mine))
    assert upsample(source, tmp_path / "out.nii.gz", "--segmentation", tmp_path / "seg.nii.gz",
                    "--input-segmentation", mine, model=tiny_model_dir) == 2
    err = capsys.readouterr().err.strip()
    assert "--input-segmentation is for a single volume, not a cine" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cine.nii.gz", "mine.nii.gz"]
    with pytest.raises(CalidError, match="--cine-noise"):
        UpsampleOptions(cine_noise="random").check()


@pytest.mark.parametrize("extra, message", [
    (("--segmentation", "labels_folder"), "labels are written as one 4D file"),
    (("--segmentation", "labels.nhdr"), "not .nhdr"),
    (("--uncertainty", "map.nhdr"), "not .nhdr"),
])
def test_a_cine_output_that_cannot_be_written_is_refused_before_any_is(extra, message, cine, tmp_path, tiny_model_dir,
                                                                       capsys):
    source = tmp_path / "cine.nii.gz"
    sitk.WriteImage(cine, str(source))
    flag, name = extra
    assert upsample(source, tmp_path / "out.nii.gz", flag, tmp_path / name, model=tiny_model_dir) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["cine.nii.gz"]


def test_frame_times_are_reported_in_ms_only_where_the_file_names_their_unit(small_image, tmp_path):
    """ITK reads a NIfTI time axis in seconds (the JSON's ``time_ms`` was 1000 times too small); a MetaImage, like a
    NIfTI without a time unit (Sunnybrook's: 1 per frame), does not say: no time rather than frame numbers as ms."""
    cine = make_cine(small_image, tuple(t / 1000 for t in TIMES))
    sitk.WriteImage(cine, str(tmp_path / "cine.nii.gz"))
    sitk.WriteImage(cine, str(tmp_path / "cine.mha"))
    assert read_input(tmp_path / "cine.nii.gz").times_ms == TIMES
    assert read_input(tmp_path / "cine.mha").times_ms == (None,) * len(TIMES)
    assert read_input(sequence_file(tmp_path / "plain.seq.nrrd", small_image, "25 65 105")).times_ms == (None,) * 3
    vector = sitk.ReadImage(str(tmp_path / "plain.seq.nrrd"))
    vector.SetMetaData("axis 0 index values", "0.025 0.065 0.105")
    vector.SetMetaData("axis 0 unit", "s")
    sitk.WriteImage(vector, str(tmp_path / "seconds.seq.nrrd"))
    assert read_input(tmp_path / "seconds.seq.nrrd").times_ms == TIMES


def test_a_cine_whose_source_names_no_time_unit_is_written_to_nifti_without_one(small_image, tmp_path):
    """ITK writes every NIfTI time axis in seconds: Sunnybrook's unit-less frames 1, 2, 3 came back a second apart,
    and as 1000 ms trigger times in DICOM."""
    sitk.WriteImage(make_cine(small_image, (1.0, 2.0, 3.0)), str(tmp_path / "cine.mha"))  # MetaImage: no unit
    frames = read_input(tmp_path / "cine.mha")
    assert frames.time_unit is None
    write_cine(frames.image, frames, tmp_path / "cine.nii.gz")
    again = read_input(tmp_path / "cine.nii.gz")
    assert again.time_unit is None and again.times == (1.0, 2.0, 3.0) and again.times_ms == (None,) * 3
    assert gzip.decompress((tmp_path / "cine.nii.gz").read_bytes())[123] & 0x38 == 0  # xyzt_units: no time unit


def test_a_cine_written_in_another_format_keeps_its_times_in_that_formats_unit(cine, tmp_path):
    """A DICOM cine's trigger times are ms, a NIfTI's time axis seconds: 40 ms frames were written to NIfTI as 40 s,
    and a NIfTI's 0.04 s frames to DICOM as 0.04 ms; a sequence NRRD names its unit."""
    write_image(cine, tmp_path / "dicom")
    from_dicom = read_input(tmp_path / "dicom")
    assert from_dicom.time_unit == "ms" and from_dicom.times == TIMES
    write_cine(from_dicom.image, from_dicom, tmp_path / "cine.nii.gz")
    nifti = read_input(tmp_path / "cine.nii.gz")
    np.testing.assert_allclose(nifti.times, [t / 1000 for t in TIMES], rtol=1e-6)  # seconds in the file
    assert nifti.times_ms == TIMES and from_dicom.image.GetSpacing()[3] == 40.0  # the caller's image kept its axis
    write_cine(nifti.image, nifti, tmp_path / "again")
    assert read_input(tmp_path / "again").times == TIMES  # back to ms trigger times
    write_cine(from_dicom.image, from_dicom, tmp_path / "cine.seq.nrrd")
    sequence = read_input(tmp_path / "cine.seq.nrrd")  # the unit in NRRD's "units" field, as Slicer writes it
    assert sitk.ReadImage(str(tmp_path / "cine.seq.nrrd")).GetMetaData("NRRD_units[pixel]") == "ms"
    assert sequence.time_unit == "ms" and sequence.times_ms == TIMES


@pytest.mark.parametrize("options", [dict(samples=2, cine_noise="independent"), dict(), dict(plus=True),
                                     dict(method="morph")], ids=["independent", "shared", "plus", "morph"])
def test_a_cine_made_in_parts_of_its_phases_equals_it_made_at_once(options, monkeypatch):
    """A long cine is made a few phases at a time (``stack_upsampling.phase_parts``: its memory); every phase's new
    slices, sharp rendition and map come out the same, starting noise (independent, shared, CaLID+'s inverted) and
    padding included (30 x 30 slices are padded to the network's multiple), up to float32 rounding (a network's CPU
    kernels may round another batch size differently), and the progress, with units reserved after the generation
    (a segmentation's), still runs once from 0 to 1."""
    from calid import stack_upsampling

    torch.manual_seed(0)
    options = UpsampleOptions(factor=2, steps=1, **options)
    if options.plus:  # CaLID+ inverts latents: a model that diffuses them, so without motion (and map)
        model = CaLID({**TINY_CONFIG, "diffusion_target": "latent"})
    else:
        model = CaLID(TINY_CONFIG)
        model.set_motion(MotionSettings("dis"))
        model.add_error_head()
    model.eval()
    stacks = (np.random.default_rng(2).normal(size=(5, 4, 30, 30)) * 100 + 300).astype(np.float32)
    run = dict(want_uncertainty=model.error_head is not None and options.method == "calid", want_sharp=True)
    whole = stack_upsampling.new_slices(stacks, options, model, 2, 1, torch.device("cpu"), 10.0, **run)
    monkeypatch.setattr(stack_upsampling, "PIXELS_AT_ONCE", 2 * 3 * 30 * 30 * options.samples)  # two phases' slices
    assert stack_upsampling.phase_parts(stacks.shape, 2, options.samples) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    stream = io.StringIO()
    progress = Progress("json", stream=stream)
    progress.reserve(7)
    parts = stack_upsampling.new_slices(stacks, options, model, 2, 1, torch.device("cpu"), 10.0, progress, **run)
    for name in ("balanced", "sharp", "error"):
        if getattr(whole, name) is not None:
            np.testing.assert_allclose(getattr(parts, name), getattr(whole, name), rtol=1e-5, atol=1e-3,
                                       err_msg=name)
    assert (parts.error is None) == (not run["want_uncertainty"])
    progress.advance(7)
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] < 0.4
