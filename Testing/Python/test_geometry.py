"""Geometry is sacred: every format, oblique directions, any slice axis, acquired slices bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from calid import UpsampleOptions, upsample_file, upsample_image
from calid import geometry, slice_positions
from calid.errors import CalidError
from calid.imageio import read_image, write_image

FORMATS = [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", "dicom"]


def assert_dense_geometry(inp: sitk.Image, out: sitk.Image, axis: int, factor: int) -> None:
    assert out.GetPixelID() == inp.GetPixelID()
    np.testing.assert_allclose(out.GetOrigin(), inp.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), inp.GetDirection(), atol=1e-6)
    expected_spacing = list(inp.GetSpacing())
    expected_spacing[axis] /= factor
    np.testing.assert_allclose(out.GetSpacing(), expected_spacing, rtol=1e-6)
    size = list(inp.GetSize())
    size[axis] = (size[axis] - 1) * factor + 1
    assert list(out.GetSize()) == size
    # Acquired slice i lies at dense index i*K in patient space, with identical voxels.
    for i in range(inp.GetSize()[axis]):
        index_in = [0, 0, 0]
        index_in[axis] = i
        index_out = list(index_in)
        index_out[axis] = i * factor
        np.testing.assert_allclose(out.TransformIndexToPhysicalPoint(index_out),
                                   inp.TransformIndexToPhysicalPoint(index_in), atol=1e-3)
    a = geometry.to_stack(sitk.GetArrayFromImage(inp), axis)
    b = geometry.to_stack(sitk.GetArrayFromImage(out), axis)
    assert np.array_equal(b[::factor], a)


def test_sample_is_really_oblique(sample_image):
    direction = np.array(sample_image.GetDirection()).reshape(3, 3)
    assert np.abs(direction - np.round(direction)).max() > 0.1


@pytest.mark.parametrize("suffix", FORMATS)
def test_every_format_round_trips_with_exact_geometry(tmp_path, small_image, tiny_model_dir, suffix):
    source = tmp_path / ("in" if suffix == "dicom" else f"in{suffix}")
    target = tmp_path / ("out" if suffix == "dicom" else f"out{suffix}")
    write_image(small_image, source)
    before = read_image(source)
    upsample_file(source, target, UpsampleOptions(factor=2, steps=2, model=str(tiny_model_dir), device="cpu"))
    out = read_image(target)
    assert_dense_geometry(before, out, 2, 2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".calid")) == []


def test_a_float_volume_and_its_map_keep_their_values_as_dicom(tmp_path, small_image):
    """DICOM stores integers: a float volume (here with fractions and values over 32767) goes in with a rescale slope
    and intercept, each value back within half a slope; a cast to int16 had wrapped and truncated it."""
    values = sitk.GetArrayFromImage(small_image).astype(np.float32) * 87.25 + 0.125
    assert values.max() > 32767
    source = sitk.GetImageFromArray(values)
    source.CopyInformation(small_image)
    write_image(source, tmp_path / "in.nrrd")
    upsample_file(tmp_path / "in.nrrd", tmp_path / "out", UpsampleOptions(factor=2, method="linear", device="cpu"))
    out = read_image(tmp_path / "out")
    half_slope = float(np.ptp(values)) / 65000 / 2
    np.testing.assert_allclose(sitk.GetArrayFromImage(out)[::2], values, rtol=0, atol=half_slope * 1.01)
    np.testing.assert_allclose(out.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), source.GetDirection(), atol=1e-6)
    small = sitk.GetImageFromArray(np.linspace(0, 0.5, values.size, dtype=np.float32).reshape(values.shape))
    small.CopyInformation(small_image)
    write_image(small, tmp_path / "map")  # an uncertainty map's kind of values: fractions of one unit
    assert np.abs(sitk.GetArrayFromImage(read_image(tmp_path / "map")) - sitk.GetArrayFromImage(small)).max() < 1e-5


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_factors_on_the_real_sample(small_image, tiny_model_dir, factor):
    result = upsample_image(small_image, UpsampleOptions(factor=factor, steps=2, model=str(tiny_model_dir), device="cpu"))
    assert result.factor == factor
    assert_dense_geometry(small_image, result.image, 2, factor)


def test_slice_axis_found_on_axis_zero_of_a_permuted_oblique_volume(small_image, tiny_model_dir):
    permuted = sitk.PermuteAxes(small_image, [2, 0, 1])  # slices now along i, direction stays oblique
    assert geometry.find_slice_axis(permuted) == 0
    result = upsample_image(permuted, UpsampleOptions(factor=2, steps=2, model=str(tiny_model_dir), device="cpu"))
    assert result.slice_axis == 0
    assert_dense_geometry(permuted, result.image, 0, 2)


def test_a_single_slice_is_refused_whatever_spacing_its_header_gives_it(small_image):
    """Slicer gives a 2D image a 1 mm third axis: the largest spacing is then in its plane, which was upsampled."""
    single = small_image[:, :, 4:5]
    single.SetSpacing((1.37, 1.37, 1.0))
    with pytest.raises(CalidError, match="1 slice along axis 2: at least 2 acquired slices"):
        upsample_image(single, UpsampleOptions(factor=2, method="linear"))


def test_slice_axis_override(small_image, tiny_model_dir):
    result = upsample_image(small_image, UpsampleOptions(factor=2, steps=1, slice_axis=1, model=str(tiny_model_dir), device="cpu"))
    assert_dense_geometry(small_image, result.image, 1, 2)


@pytest.mark.parametrize("target,factor", [(5.0, 2), (4.0, 3), (2.5, 4), (3.0, 4)])
def test_spacing_option_picks_the_largest_spacing_not_above_target(small_image, tiny_model_dir, target, factor):
    result = upsample_image(small_image, UpsampleOptions(spacing=target, steps=1, model=str(tiny_model_dir), device="cpu"))
    assert result.factor == factor
    assert result.image.GetSpacing()[2] <= target + 1e-9


def test_spacing_option_reads_a_slice_spacing_with_rounding_noise_as_the_nominal_one(small_image):
    """A DICOM stack's spacing comes from its positions (8.000005 mm for 8 mm): asking for 4 mm gives K=2, not 3."""
    noisy = sitk.Image(small_image)
    noisy.SetSpacing((*small_image.GetSpacing()[:2], 8.000005))
    assert geometry.resolve_factor(noisy, 2, None, 4.0) == 2
    assert geometry.resolve_factor(noisy, 2, None, 3.9) == 3


def test_dicom_output_says_its_spacing_between_slices(tmp_path, small_image):
    """Each generated file's Spacing Between Slices (0018,0088) is the dense grid's; written as 2D images, GDCM had
    put 1 mm in every file (the positions were right, the header contradicted them)."""
    upsample_file_linear = UpsampleOptions(factor=2, method="linear", device="cpu")
    write_image(small_image, tmp_path / "in.nrrd")
    upsample_file(tmp_path / "in.nrrd", tmp_path / "out", upsample_file_linear)
    dense = small_image.GetSpacing()[2] / 2
    for name in sorted((tmp_path / "out").iterdir())[:3]:
        header = sitk.ImageFileReader()
        header.SetFileName(str(name))
        header.ReadImageInformation()
        assert float(header.GetMetaData("0018|0088")) == pytest.approx(dense, abs=1e-4)
    assert_dense_geometry(read_image(tmp_path / "in.nrrd"), read_image(tmp_path / "out"), 2, 2)


def test_dense_positions_cover_every_missing_slice_once():
    below, above, alpha = slice_positions.dense_positions(5, 4)
    index = slice_positions.dense_index(below, alpha, 4)
    assert sorted(index.tolist()) == [i for i in range(17) if i % 4]
    assert np.all(above == below + 1)
