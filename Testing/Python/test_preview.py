"""The demo picture (``calid.preview``): removed-slice panels with their scores, through-plane cut, the morph."""

from __future__ import annotations

import re
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


def test_demo_command_says_what_is_wrong_in_one_line_before_any_work(tmp_path, sample_image, capsys, monkeypatch):
    """Exit status 2 and one line, as calid's; a 2D or 4D input, a missing folder or a suffix matplotlib cannot
    write were tracebacks, the last two after the whole model run."""
    import calid.preview

    sitk.WriteImage(sample_image[:, :, :2], str(tmp_path / "two.nrrd"))
    sitk.WriteImage(sample_image, str(tmp_path / "sample.nrrd"))
    sitk.WriteImage(sample_image[:, :, 3], str(tmp_path / "flat.nrrd"))
    sitk.WriteImage(sitk.JoinSeries([sample_image] * 2), str(tmp_path / "cine.nii.gz"))
    sample, png = str(tmp_path / "sample.nrrd"), str(tmp_path / "demo.png")
    monkeypatch.setattr(calid.preview, "removed_slice_panels", lambda *args: pytest.fail("the model ran"))
    for args, expected in (
            ([str(tmp_path / "missing.nrrd"), sample, png], r"input not found: .*missing.nrrd"),
            ([str(tmp_path / "two.nrrd"), str(tmp_path / "two.nrrd"), png],
             r"the removed-slice test needs at least 3 slices; this input has 2"),
            ([sample, str(tmp_path / "two.nrrd"), png], r"the dense volume \(2 slices of 128 x 128\) is not "),
            ([str(tmp_path / "flat.nrrd"), sample, png], r".*flat.nrrd is 2D"),
            ([str(tmp_path / "cine.nii.gz"), sample, png], r".*cine.nii.gz is 4D \(2 time points\): this step needs "
                                                           r"one cardiac phase"),
            ([sample, sample, str(tmp_path / "no" / "demo.png")], r"output folder does not exist"),
            ([sample, sample, str(tmp_path / "demo.txt")], r"cannot write a picture named .*demo.txt")):
        with pytest.raises(SystemExit) as ended:
            main(args)
        err = capsys.readouterr().err
        assert ended.value.code == 2 and len(err.splitlines()) == 1, err
        assert re.match(rf"^calid.preview: error: {expected}", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cine.nii.gz", "flat.nrrd", "sample.nrrd", "two.nrrd"]


def test_through_plane_cut_centres_each_acquired_slice_and_keeps_the_aspect_on_any_slice_axis():
    """The input band of slice i began at its dense row (half a band low, the last one a sliver), and with slices
    along y the rows were scaled by the wrong in-plane spacing."""
    from calid.preview import through_plane_panels

    sparse = np.arange(1, 5, dtype=np.float32)[:, None, None] * np.ones((4, 6, 5), np.float32)  # slice i holds i + 1
    image = sitk.GetImageFromArray(np.moveaxis(sparse, 0, 1).copy())  # (z, y, x): slices along y
    image.SetSpacing((2.0, 8.0, 1.0))  # x 2 mm, y 8 mm (the slice axis), z 1 mm
    dense = sitk.GetImageFromArray(np.repeat(np.moveaxis(sparse, 0, 1), 4, axis=1)[:, :13].copy())
    dense.SetSpacing((2.0, 2.0, 1.0))
    (panel, cut), *_ = through_plane_panels(image, dense, 1)
    # x4: dense rows 0..12; acquired slice i at row 4i, drawn over rows 4i-2 .. 4i+1; each row 2 mm / 2 mm (x) = 1
    assert cut[:, 0].tolist() == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4]  # 13 rows: not doubled
