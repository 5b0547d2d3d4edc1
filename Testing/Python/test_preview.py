"""The demo picture (``calid.preview``): removed-slice panels with their scores, through-plane cut, the morph."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from calid import geometry
from calid.engine import UpsampleOptions, upsample_file
from calid.metrics import slice_scores
from calid.preview import main, save_preview


def _demo(tmp_path, image, model_dir, factor: int):
    """Upsample ``image`` by ``factor`` with the model and draw its demo picture: (panels, PNG path)."""
    source, dense, png = tmp_path / "in.nrrd", tmp_path / "dense.nrrd", tmp_path / "demo.png"
    sitk.WriteImage(image, str(source))
    options = UpsampleOptions(factor=factor, steps=1, model=str(model_dir), device="cpu")
    upsample_file(source, dense, options)
    return save_preview(str(source), str(dense), str(png), options), png  # the removed-slice test runs at factor 2


def test_demo_picture_has_the_removed_slice_panels_with_scores_and_the_through_plane_cut(tmp_path, small_image,
                                                                                        tiny_model_dir):
    panels, png = _demo(tmp_path, small_image, tiny_model_dir, 4)

    removed = [p for p in panels if p.row == "removed slice"]
    assert [p.title.split("\n")[0] for p in removed] == ["real slice 3 (removed)", "linear interpolation",
                                                          "optical-flow morph", "CaLID (tiny)"]
    assert removed[0].psnr is None and all(0 < p.psnr < 100 and -1 <= p.ssim <= 1 for p in removed[1:])
    stack = geometry.to_stack(sitk.GetArrayFromImage(small_image), 2).astype(np.float64)
    expected = slice_scores(stack[3:4], (stack[2:3] + stack[4:5]) / 2, stack)  # 6 slices: 0, 2, 4 kept
    assert (removed[1].psnr, removed[1].ssim) == pytest.approx(expected)
    assert f"PSNR {expected[0]:.2f} dB, SSIM {expected[1]:.3f}" in removed[1].title
    assert [p.title for p in panels if p.row == "through-plane"] == [
        "input (acquired slices)", "linear interpolation x4", "CaLID x4"]
    with Image.open(png) as picture:
        assert picture.size == (1300, 780)


def test_demo_picture_shows_actual_and_expected_error_when_the_model_has_an_error_head(tmp_path, small_image,
                                                                                        error_head_model_dir):
    panels, png = _demo(tmp_path, small_image, error_head_model_dir, 2)
    removed = [p for p in panels if p.row == "removed slice"]
    assert [p.error_map for p in removed] == [False] * 4 + [True, True]
    assert removed[4].title.startswith("CaLID's\nactual |error|")
    assert removed[5].title.startswith("expected |error|\n(uncertainty map)")
    assert float(removed[5].title.split("mean ")[1]) > 0  # in intensity units, on a generated slice
    with Image.open(png) as picture:
        assert picture.size == (1300, 780)


def test_demo_command_says_what_is_wrong_in_one_line(tmp_path, sample_image):
    with pytest.raises(SystemExit, match=r"^calid.preview: error: input not found: .*missing.nrrd$"):
        main([str(tmp_path / "missing.nrrd"), str(tmp_path / "dense.nrrd"), str(tmp_path / "demo.png")])
    sitk.WriteImage(sample_image[:, :, :2], str(tmp_path / "two.nrrd"))
    with pytest.raises(SystemExit, match=r"^calid.preview: error: the removed-slice test needs at least 3 slices; "
                                         r"this input has 2$"):
        main([str(tmp_path / "two.nrrd"), str(tmp_path / "two.nrrd"), str(tmp_path / "demo.png")])
    sitk.WriteImage(sample_image, str(tmp_path / "sample.nrrd"))
    with pytest.raises(SystemExit, match=r"^calid.preview: error: the dense volume \(2 slices of 128 x 128\) is not "):
        main([str(tmp_path / "sample.nrrd"), str(tmp_path / "two.nrrd"), str(tmp_path / "demo.png")])
