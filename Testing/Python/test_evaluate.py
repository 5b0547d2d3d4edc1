"""``calid evaluate`` (removed-slice protocol), on real sample data (the demo picture: test_preview.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from calid.cli import main
from calid.evaluation import bspline_on_grid
from calid.imageio import find_labels
from calid.errors import CalidError
from calid.training.data import find_volumes, load_split

pytestmark = pytest.mark.slow


def test_evaluate_scores_calid_and_the_three_peers_with_heart_region(dataset, tmp_path, tiny_model_dir, capsys):
    code = main(["evaluate", str(dataset), "--output", str(tmp_path / "eval"), "--model", str(tiny_model_dir),
                 "--factor", "2", "--factor", "3", "--steps", "2", "--patients", "patient000,patient003", "--montage",
                 "--progress", "none"])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text(encoding="utf-8"))
    assert {r["patient"] for r in report["volumes"]} == {"patient000", "patient003"}
    row = report["volumes"][0]
    for method in ("calid", "morph", "linear", "bspline"):
        assert 0 < row[f"{method}_psnr"] < 100 and -1 <= row[f"{method}_ssim"] <= 1
        assert f"{method}_heart_psnr" in row  # labels beside the image define the heart box
    assert {(s["factor"]) for s in report["summary"]} == {2, 3}
    table = (tmp_path / "eval" / "results.md").read_text(encoding="utf-8")
    assert "| K=2, 10 mm stacks (20 mm gaps) |" in table and "bspline" in table and "| morph |" in table
    assert row["morph_seconds"] > 0
    k2 = next(s for s in report["summary"] if s["factor"] == 2)
    members = [r for r in report["volumes"] if r["factor"] == 2]
    paired = k2["calid_minus"]["morph"]["heart_psnr"]
    differences = [r["calid_heart_psnr"] - r["morph_heart_psnr"] for r in members]
    assert paired["volumes"] == len(members) == 2
    assert paired["mean"] == pytest.approx(np.mean(differences))
    assert paired["sem"] == pytest.approx(np.std(differences, ddof=1) / np.sqrt(2))
    assert paired["wins"] == sum(d > 0 for d in differences)
    assert set(k2["calid_minus"]) == {"morph", "linear", "bspline"}
    assert "| K=2, 10 mm stacks (20 mm gaps) | bspline |" in table  # the paired table
    png = (tmp_path / "eval" / "montage.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    height = int.from_bytes(png[20:24], "big")  # one row per case, each case once (4 here, not 3 worst + 3 best)
    assert height == round(2.6 * len(report["volumes"]) * 80)
    assert "linear" in capsys.readouterr().out


def test_evaluate_skips_a_cine_beside_the_frames_and_says_so(dataset, tmp_path, tiny_model_dir):
    """ACDC's own release holds patientNNN_4d.nii.gz beside the ED and ES frames: the run scores the frames and
    names the cine it left out (it stopped on it)."""
    frame = sitk.ReadImage(str(dataset / "patient000" / "patient000_frame01.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(dataset / "patient000" / "patient000_4d.nii.gz"))
    code = main(["evaluate", str(dataset), "--output", str(tmp_path / "eval"), "--model", str(tiny_model_dir),
                 "--steps", "1", "--patients", "patient000", "--progress", "none"])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text(encoding="utf-8"))
    assert [r["file"] for r in report["volumes"]] == [str(dataset / "patient000" / "patient000_frame01.nii.gz")]
    assert report["skipped_cines"] == [str(dataset / "patient000" / "patient000_4d.nii.gz")]
    assert "Skipped 1 cine(s)" in (tmp_path / "eval" / "results.md").read_text(encoding="utf-8")


def test_a_groups_heart_scores_do_not_depend_on_whether_its_first_volume_has_labels():
    from calid.evaluation import summarise

    common = {"factor": 2, "spacing_mm": 10.0, "seconds": 1.0, "morph_seconds": 1.0}
    plain = {**common, "patient": "a", **{f"{m}_{s}": 20.0 for m in ("calid", "morph", "linear", "bspline")
                                        for s in ("psnr", "ssim")}}
    labelled = {**plain, "patient": "b", **{f"{m}_heart_{s}": 18.0 for m in ("calid", "morph", "linear", "bspline")
                                            for s in ("psnr", "ssim")}}
    for rows in ([plain, labelled], [labelled, plain]):
        (entry,) = summarise(rows)
        assert entry["calid_heart_psnr"] == 18.0 and entry["heart_volumes"] == 1 and entry["volumes"] == 2


def test_bspline_baseline_keeps_acquired_slices(sample_image):
    kept = sample_image[:, :, ::2]
    reference = sample_image[:, :, : (sample_image.GetSize()[2] - 1) // 2 * 2 + 1]
    dense = bspline_on_grid(kept, reference)
    np.testing.assert_allclose(dense[::2], sitk.GetArrayFromImage(kept), atol=1e-3)


def test_labels_are_found_beside_images(dataset):
    image = dataset / "patient001" / "patient001_frame01.nii.gz"
    assert find_labels(image) == dataset / "patient001" / "patient001_frame01_gt.nii.gz"


def test_a_file_skipped_as_labels_is_found_as_the_images_labels(tmp_path):
    """Training skips label files as images and evaluation pairs them with their image: one list of names for both
    (a ``_mask`` file used to be skipped but never found)."""
    folder = tmp_path / "case1"
    folder.mkdir()
    image = folder / "scan.nrrd"
    for path in (image, folder / "scan_mask.nrrd"):
        sitk.WriteImage(sitk.Image([8, 8, 3], sitk.sitkInt16), str(path))
    assert find_volumes([tmp_path]) == [("case1", image)]
    assert find_labels(image) == folder / "scan_mask.nrrd"


def test_patients_can_come_from_a_split_file_or_a_model_card(tmp_path):
    split = {"train": ["patient001"], "validation": ["patient002", "patient003"]}
    (tmp_path / "split.json").write_text(json.dumps(split), encoding="utf-8")
    (tmp_path / "model.json").write_text(json.dumps({"name": "m", "training": {"split": split}}), encoding="utf-8")
    assert load_split(tmp_path / "split.json") == load_split(tmp_path / "model.json") == split
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CalidError, match="not a split file or model card"):
        load_split(tmp_path / "bad.json")


def test_segmentation_evaluation_scores_the_network_on_calid_and_on_every_peer(dataset, tmp_path, tiny_model_dir):
    from calid.segmentation.evaluation import SegEvaluateConfig, evaluate_segmentation

    cfg = SegEvaluateConfig(data=[str(dataset)], output=str(tmp_path / "seg"), model=str(tiny_model_dir),
                            patients="patient000", device="cpu")
    table = evaluate_segmentation(cfg, "none")
    methods = {r["method"] for r in json.loads((tmp_path / "seg" / "segmentation_results.json").read_text())["summary"]}
    assert {"network on the real slices (ceiling)", "network on CaLID",
            "network on CaLID, sharp rendition (--segmentation)", "network on morph", "network on linear",
            "network on bspline", "contour interpolation of kept labels"} <= methods
    assert "| network on morph |" in table
    report = json.loads((tmp_path / "seg" / "segmentation_results.json").read_text())
    on_calid = [s for s in report["summary"] if s["method"] == "network on CaLID"]
    assert on_calid and all("dice_minus" in s for s in report["summary"] if "sharp rendition" in s["method"])
    for s in on_calid:
        rows = {r["method"]: r for r in report["rows"] if r["setting"] == s["setting"]}
        for key in ("dice_mean", "dice_myo"):
            paired = s["dice_minus"]["morph"][key]
            assert paired["volumes"] == 1 and paired["wins"] in (0, 1)
            assert paired["mean"] == pytest.approx(rows["network on CaLID"][key] - rows["network on morph"][key])
        assert set(s["dice_minus"]) == {"morph", "linear", "bspline"}
        assert f"| {s['setting']} | volume | linear |" in table
        assert f"| {s['setting']} | sharp (--segmentation) | bspline |" in table


def test_paired_difference_counts_wins_and_gives_the_standard_error():
    from calid.paired import describe, paired_difference

    paired = paired_difference([20.0, 21.0, 19.5], [19.5, 20.5, 19.5])
    assert paired == {"mean": pytest.approx(1 / 3), "sem": pytest.approx(np.std([0.5, 0.5, 0], ddof=1) / np.sqrt(3)),
                      "wins": 2, "volumes": 3}
    assert describe(paired) == "+0.333 ± 0.167 (2/3)"
    assert describe(paired_difference([0.8], [0.9]), 4) == "-0.1000 ± – (0/1)"
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([1.0], [])
