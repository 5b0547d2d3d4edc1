"""Segmentation: the bundled network on the real sample, labels on the dense grid, the user's sparse labels,
volumes and ejection fractions, bad inputs, and a short real training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from calid.cli import main
from calid.imageio import write_image
from calid.modelindex import DEFAULT_SEGMENTATION_MODEL, SEGMENTATION_FORMAT, list_models
from calid.segmentation.contour import contour_interpolation
from calid.segmentation.inference import segment_image
from calid.segmentation.measures import absence_warning, cycle_volumes, ejection_fractions, structure_volumes
from calid.segmentation.sparse import densify, shape_depth
from calid.segmentation.store import load_segmenter
from conftest import SAMPLE_LABELS
from test_errors import assert_clean_failure, run_cli

SUNNYBROOK_LV_CAVITY = 1  # the sample's contours: 1 LV blood pool (ours: 3)


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def user_labels_of_sample(sample_image: sitk.Image) -> sitk.Image:
    """The expert LV contours of the sample, in our label convention, on the sample's grid."""
    contours = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS)))
    labels = sitk.GetImageFromArray(np.where(contours == SUNNYBROOK_LV_CAVITY, 3, 0).astype(np.uint8))
    labels.CopyInformation(sample_image)
    return labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_bundled_segmenter_is_listed_apart_and_finds_the_lv(sample_image, tmp_path, capsys):
    assert [m["name"] for m in list_models(SEGMENTATION_FORMAT)] == [DEFAULT_SEGMENTATION_MODEL]
    assert DEFAULT_SEGMENTATION_MODEL not in {m["name"] for m in list_models()}  # not an interpolation model
    _, card = load_segmenter()
    assert card["labels"] == {"1": "right ventricle cavity", "2": "left ventricle myocardium", "3": "left ventricle cavity"}
    write_image(sample_image, tmp_path / "sax.nrrd")
    code = main(["segment", str(tmp_path / "sax.nrrd"), str(tmp_path / "labels.nii.gz"), "--device", "cpu"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    labels = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    assert same_geometry(labels, sample_image)  # oblique Sunnybrook geometry kept exactly
    assert labels.GetPixelID() == sitk.sitkUInt8
    array = sitk.GetArrayFromImage(labels)
    assert set(np.unique(array)) <= {0, 1, 2, 3}
    # A different vendor than the training data: the LV cavity still overlaps the expert's contours.
    expert = sitk.GetArrayFromImage(user_labels_of_sample(sample_image)) == 3
    assert dice(array == 3, expert) > 0.7
    assert report["volumes"]["lv_cavity_ml"] == pytest.approx((array == 3).sum() * np.prod(sample_image.GetSpacing()) / 1000, rel=1e-3)


def test_upsample_writes_labels_on_the_dense_grid(sample_image, tiny_model_dir, tmp_path, capsys):
    write_image(sample_image, tmp_path / "sax.nrrd")
    code = main(["upsample", str(tmp_path / "sax.nrrd"), str(tmp_path / "dense.nrrd"), "--factor", "3",
                 "--model", str(tiny_model_dir), "--steps", "1", "--device", "cpu",
                 "--segmentation", str(tmp_path / "dense_labels.nrrd")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    dense, labels = sitk.ReadImage(str(tmp_path / "dense.nrrd")), sitk.ReadImage(str(tmp_path / "dense_labels.nrrd"))
    assert same_geometry(labels, dense) and labels.GetSize()[2] == (12 - 1) * 3 + 1
    assert report["volumes"] == structure_volumes(labels)


def test_labels_are_made_on_the_sharp_rendition_of_the_new_slices(sample_image, tmp_path, monkeypatch):
    """The bundled model's volume holds its balanced slices; the segmenter is given the same grid with the sharp
    rendition (``generation.RENDITIONS``) of the new slices, and the acquired slices unchanged."""
    import calid.segmentation.pipeline as pipeline
    from calid.engine import UpsampleOptions, upsample_file

    segmented, real_segment_dense = [], pipeline.segment_dense

    def recording(image, *args, **kwargs):  # the real segment_dense, noting what it was given
        segmented.append(image)
        return real_segment_dense(image, *args, **kwargs)

    monkeypatch.setattr(pipeline, "segment_dense", recording)
    write_image(sample_image, tmp_path / "sax.nrrd")
    result = upsample_file(tmp_path / "sax.nrrd", tmp_path / "dense.nrrd", UpsampleOptions(factor=2, device="cpu"),
                           segmentation_path=tmp_path / "labels.nrrd")
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "dense.nrrd"))).astype(float)
    given = sitk.GetArrayFromImage(segmented[0]).astype(float)
    assert segmented[0] is result.sharp_image and same_geometry(segmented[0], result.image)
    np.testing.assert_array_equal(given[::2], sitk.GetArrayFromImage(sample_image))
    np.testing.assert_array_equal(written, sitk.GetArrayFromImage(result.image))
    assert np.abs(given[1::2] - written[1::2]).mean() > 1  # another rendition of the new slices
    assert np.abs(given[1::2] - written[1::2]).mean() < 0.2 * np.abs(written[1::2] - written[:-1:2]).mean()


def test_input_segmentation_is_kept_on_acquired_slices_and_filled_between(sample_image, tmp_path):
    user = user_labels_of_sample(sample_image)
    write_image(sample_image, tmp_path / "sax.nrrd")
    write_image(user, tmp_path / "user.nrrd")
    code = main(["upsample", str(tmp_path / "sax.nrrd"), str(tmp_path / "dense.nrrd"), "--factor", "2",
                 "--device", "cpu",  # the bundled model: the new slices must look like a heart for the network
                 "--segmentation", str(tmp_path / "dense_labels.nrrd"), "--input-segmentation", str(tmp_path / "user.nrrd")])
    assert code == 0
    dense = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "dense_labels.nrrd")))
    sparse = sitk.GetArrayFromImage(user)
    np.testing.assert_array_equal(dense[::2], sparse)  # the user's labels, exactly
    between = dense[1::2]
    for k in range(1, 9):  # inside the contoured range, every new slice has an LV cavity near its neighbours'
        assert dice(between[k] == 3, (sparse[k] == 3) | (sparse[k + 1] == 3)) > 0.6


def test_shape_interpolation_of_two_discs_gives_the_mean_radius():
    yy, xx = np.mgrid[:64, :64]
    disc = lambda r: ((yy - 32) ** 2 + (xx - 32) ** 2 <= r * r).astype(np.uint8) * 3  # noqa: E731
    sparse = np.stack([disc(10), disc(20)])
    dense = densify(sparse, 2, (1.0, 1.0), None, None)
    np.testing.assert_array_equal(dense[[0, 2]], sparse)
    radius = np.sqrt((dense[1] == 3).sum() / np.pi)
    assert radius == pytest.approx(15, abs=0.6)
    depth = shape_depth(disc(10), (2.0, 2.0))  # in mm: 2 mm pixels double the distance
    assert depth[2, 32, 32] == pytest.approx(20, abs=2.1) and depth[0].max() < -50  # RV absent: far outside


def test_contour_interpolation_fills_between_kept_slices():
    kept = np.zeros((3, 32, 32), np.uint8)
    kept[:, 8:24, 8:24] = 3
    dense = contour_interpolation(kept, 2)
    assert dense.shape == (5, 32, 32)
    assert ((dense[1] == 3) & (kept[0] == 3)).sum() > 0.9 * (kept[0] == 3).sum()


def test_volumes_and_ejection_fractions(tmp_path, capsys):
    ed = np.zeros((4, 10, 10), np.uint8)
    ed[:, :5, :] = 3  # 200 voxels LV cavity
    ed[:, 5:7, :] = 2  # 80 voxels myocardium
    ed[:, 7:, :4] = 1  # 48 voxels RV cavity
    es = ed.copy()
    es[:, :2, :] = 0  # LV cavity 120
    es[:, 7:, :2] = 0  # RV cavity 24
    paths = []
    for name, array in (("ed", ed), ("es", es)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 5.0))  # 20 mm^3 voxels
        paths.append(tmp_path / f"{name}.nrrd")
        write_image(image, paths[-1])
    assert main(["volumes", str(paths[0]), str(paths[1])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["end_diastole"] == {"rv_cavity_ml": 0.96, "lv_myocardium_ml": 1.6, "lv_cavity_ml": 4.0,
                                      "lv_myocardium_mass_g": 1.68}
    assert report["lv_ejection_fraction_percent"] == 40.0 and report["rv_ejection_fraction_percent"] == 50.0
    with pytest.raises(Exception, match="swapped"):
        ejection_fractions(report["end_systole"], report["end_diastole"])


@pytest.mark.parametrize("change, expected", [
    ("spacing", "spacing (2.0, 2.0, 6.0) differs from that of the end-diastole labels, (2.0, 2.0, 5.0)"),
    ("size", "must lie on the grid of the end-diastole labels"),
    ("same file", "given as both end diastole and end systole"),
    ("huge value", "unknown label values 1e+20"),
])
def test_end_systole_off_end_diastoles_grid_is_refused(change, expected, tmp_path, capsys):
    """Another grid (another scan, or another patient) gave an ejection fraction anyway, exit 0; a float label of
    1e20 was named as a negative integer."""
    ed = np.zeros((4, 10, 10), np.uint8)
    ed[:, :5, :] = 3
    es = ed.copy()
    es[:, :2, :] = 0
    ed_path, es_path = tmp_path / "ed.nrrd", tmp_path / "es.nrrd"
    image = sitk.GetImageFromArray(ed)
    image.SetSpacing((2.0, 2.0, 5.0))
    write_image(image, ed_path)
    image = sitk.GetImageFromArray(es[:, :9] if change == "size" else es.astype(np.float64))
    image.SetSpacing((2.0, 2.0, 6.0 if change == "spacing" else 5.0))
    if change == "huge value":
        image[3, 3, 1] = 1e20
    write_image(image, es_path)
    code, err = run_cli(["volumes", ed_path, ed_path if change == "same file" else es_path], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


def test_segment_refuses_a_label_map_and_a_bad_output_before_any_work(sample_image, tmp_path, capsys, monkeypatch):
    """A ground-truth file was segmented without a word (exit 0); an output in a missing folder failed only after
    the model had run; a mistyped suffix made a DICOM folder silently."""
    import calid.segmentation.store

    labels = user_labels_of_sample(sample_image)
    write_image(labels, tmp_path / "sax_gt.nrrd")
    write_image(sample_image, tmp_path / "sax.nrrd")
    code, err = run_cli(["segment", tmp_path / "sax_gt.nrrd", tmp_path / "labels.nrrd", "--device", "cpu"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "a label map, not an MR image" in err, err
    code, err = run_cli(["upsample", tmp_path / "sax_gt.nrrd", tmp_path / "dense.nrrd", "--method", "linear"], capsys)
    assert code == 2 and "a label map, not an MR image" in err and not (tmp_path / "dense.nrrd").exists()
    monkeypatch.setattr(calid.segmentation.store, "load_segmenter", lambda *args: pytest.fail("loaded the model"))
    code, err = run_cli(["segment", tmp_path / "sax.nrrd", tmp_path / "no" / "labels.nrrd"], capsys)
    assert code == 2 and "output folder does not exist" in err
    monkeypatch.undo()
    assert main(["segment", str(tmp_path / "sax.nrrd"), str(tmp_path / "labels.nrd"), "--device", "cpu"]) == 0
    assert "labels.nrd has no image file suffix" in capsys.readouterr().err and (tmp_path / "labels.nrd").is_dir()


def test_one_ventricle_that_cannot_be_measured_leaves_the_other_and_every_volume(tmp_path, capsys):
    """Labels without an RV, or with only the RV larger at end systole (a segmenter's miss): the LV's ejection
    fraction and every volume are still given, the RV's null with a warning (all of it was lost to one error)."""
    ed = np.zeros((4, 10, 10), np.uint8)
    ed[:, :5, :], ed[:, 5:7, :] = 3, 2
    es = ed.copy()
    es[:, :2, :] = 0
    paths = [tmp_path / "ed.nrrd", tmp_path / "es.nrrd"]
    for path, array in zip(paths, (ed, es)):
        write_image(sitk.GetImageFromArray(array), path)
    assert main(["volumes", str(paths[0]), str(paths[1])]) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["lv_ejection_fraction_percent"] == 40.0 and report["rv_ejection_fraction_percent"] is None
    assert report["end_diastole"]["rv_cavity_ml"] is None and report["end_diastole"]["lv_cavity_ml"] == 0.2
    warnings = printed.err.splitlines()
    assert len(warnings) == 3 and all(w.startswith("calid: warning:") for w in warnings)
    assert "found no RV cavity" in warnings[0] and "no RV cavity at end diastole" in warnings[2]
    larger_rv = dict(report["end_systole"], rv_cavity_ml=5.0)
    fractions, problems = ejection_fractions(dict(report["end_diastole"], rv_cavity_ml=4.0), larger_rv)
    assert fractions["lv_ejection_fraction_percent"] == 40.0 and fractions["rv_ejection_fraction_percent"] is None
    assert len(problems) == 1 and "larger at end systole" in problems[0]


def test_a_cines_labels_are_refused_by_volumes_and_evaluate_segmentation(tmp_path, capsys):
    """Both read one phase: ``volumes`` summed a cine's phases into one wrong figure, exit 0; evaluate-segmentation
    failed as an internal error."""
    frame = np.zeros((4, 10, 10), np.uint8)
    frame[:, :5, :] = 3
    cine = sitk.JoinSeries([sitk.GetImageFromArray(frame)] * 3)
    (tmp_path / "p1").mkdir()
    write_image(cine, tmp_path / "p1" / "scan.nii.gz")
    write_image(cine, tmp_path / "p1" / "scan_gt.nii.gz")
    for args in (["volumes", tmp_path / "p1" / "scan_gt.nii.gz"],
                 ["evaluate-segmentation", tmp_path, "--output", tmp_path / "out", "--device", "cpu"]):
        code, err = run_cli(args, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "is 4D" in err, err
    assert not (tmp_path / "out").exists()


def test_evaluate_segmentation_refuses_stacks_too_short_for_every_factor(tmp_path, capsys):
    """As calid evaluate does: a report without the removed-slice rows it was asked for is not written."""
    (tmp_path / "p1").mkdir()
    frame = np.zeros((2, 32, 32), np.uint8)
    frame[:, 8:20, 8:20] = 3
    write_image(sitk.GetImageFromArray(frame.astype(np.int16) * 100), tmp_path / "p1" / "scan.nii.gz")
    write_image(sitk.GetImageFromArray(frame), tmp_path / "p1" / "scan_gt.nii.gz")
    code, err = run_cli(["evaluate-segmentation", tmp_path, "--output", tmp_path / "out", "--device", "cpu"], capsys)
    assert code == 2 and "no stack had enough slices" in err.splitlines()[-1], err
    assert not (tmp_path / "out").exists()


def test_a_structure_absent_from_both_scores_null_in_the_json_report():
    from calid.segmentation.evaluation import _finite

    report = {"summary": [{"dice_rv": float("nan"), "dice_lv": 0.9}], "hd95": (float("inf"), 2.0)}
    assert json.loads(json.dumps(_finite(report))) == {"summary": [{"dice_rv": None, "dice_lv": 0.9}],
                                                       "hd95": [None, 2.0]}


def test_a_missed_structure_is_counted_beside_the_hd95_mean_it_has_no_distance_in():
    """One volume's RV 1 mm off, another's RV missed (HD95 undefined): the mean is over the one volume, and the table
    says so instead of showing 1 mm "over 2 volumes"."""
    from calid.segmentation.evaluation import markdown_table, summarise

    scores = {"dice_rv": 0.9, "dice_myo": 0.8, "dice_lv": 0.9, "dice_mean": 0.87, "hd95_myo": 2.0, "hd95_lv": 3.0}
    rows = [{"setting": "acquired slices", "method": "network", "patient": p, "file": p, **scores, "hd95_rv": rv}
            for p, rv in (("a", 1.0), ("b", float("nan")))]
    (entry,) = summarise(rows)
    assert entry["hd95_rv"] == 1.0 and entry["hd95_volumes"] == {"hd95_rv": 1, "hd95_myo": 2, "hd95_lv": 2}
    assert "1.0 / 2.0 / 3.0 (of 1 / 2 / 2 volumes: a structure missed has none)" in markdown_table([entry])


def test_a_cycle_takes_each_ventricles_largest_and_smallest_cavity_and_reports_a_missing_one():
    def phase(lv, rv):
        return {"rv_cavity_ml": rv, "lv_myocardium_ml": 90.0, "lv_cavity_ml": lv, "lv_myocardium_mass_g": 94.5}

    cycle, problems = cycle_volumes([phase(150, 90), phase(120, 100), phase(60, 40), phase(100, 70)],
                                    (0.0, 40.0, 80.0, 120.0))
    assert [p["time_ms"] for p in cycle["phases"]] == [0.0, 40.0, 80.0, 120.0] and cycle["phases"][2]["lv_cavity_ml"] == 60
    assert (cycle["lv_end_diastole_phase"], cycle["lv_end_systole_phase"]) == (0, 2)
    assert (cycle["rv_end_diastole_phase"], cycle["rv_end_systole_phase"]) == (1, 2)  # the RV's own extremes
    assert cycle["ejection_fractions"] == {"lv_stroke_volume_ml": 90.0, "lv_ejection_fraction_percent": 60.0,
                                           "rv_stroke_volume_ml": 60.0, "rv_ejection_fraction_percent": 60.0}
    assert problems == [] and cycle["rv_missing_phases"] == []
    cycle, problems = cycle_volumes([phase(150, None), phase(60, None)], (None, None))
    assert cycle["ejection_fractions"]["rv_ejection_fraction_percent"] is None and cycle["rv_end_systole_phase"] is None
    assert cycle["ejection_fractions"]["lv_ejection_fraction_percent"] == 60.0  # the LV's is still given
    assert problems == ["no RV cavity found in any phase: no RV ejection fraction"]


def test_a_phase_whose_ventricle_the_segmenter_missed_is_not_its_end_systole():
    """An RV found in every phase but one: its end systole was that empty phase, and its ejection fraction 100 %."""
    volumes = [{"rv_cavity_ml": rv, "lv_myocardium_ml": 90.0, "lv_cavity_ml": 100.0, "lv_myocardium_mass_g": 94.5}
               for rv in (160.0, 120.0, None, 75.0, 130.0)]
    cycle, problems = cycle_volumes(volumes, (0.0, 40.0, 80.0, 120.0, 160.0))
    assert (cycle["rv_end_diastole_phase"], cycle["rv_end_systole_phase"]) == (0, 3)
    assert cycle["ejection_fractions"]["rv_ejection_fraction_percent"] == pytest.approx(53.1)
    assert cycle["rv_missing_phases"] == [2] and "1 of 5 phases (2)" in problems[0]


def test_a_cavity_of_a_few_voxels_rounding_to_zero_gives_no_ejection_fraction_not_a_crash():
    volumes = [{"rv_cavity_ml": rv, "lv_myocardium_ml": 90.0, "lv_cavity_ml": 100.0 - 10 * t,
                "lv_myocardium_mass_g": 94.5} for t, rv in enumerate((0.0, 0.0, 0.0))]
    cycle, _ = cycle_volumes(volumes, (0.0, 40.0, 80.0))
    assert cycle["ejection_fractions"]["rv_ejection_fraction_percent"] is None
    assert cycle["ejection_fractions"]["lv_ejection_fraction_percent"] == 20.0


def test_a_volume_without_a_heart_gives_null_volumes_and_says_so():
    empty = sitk.GetImageFromArray(np.zeros((4, 10, 10), np.uint8))
    volumes = structure_volumes(empty)
    assert volumes == {"rv_cavity_ml": None, "lv_myocardium_ml": None, "lv_cavity_ml": None,
                       "lv_myocardium_mass_g": None}
    assert "no RV cavity, LV myocardium, LV cavity" in absence_warning(volumes)
    assert absence_warning(structure_volumes(sitk.GetImageFromArray(np.full((2, 3, 3), 3, np.uint8)))).startswith(
        "the segmentation found no RV cavity, LV myocardium: their")


def test_the_mass_is_computed_before_the_volume_is_rounded():
    labels = sitk.GetImageFromArray(np.full((1, 1, 1), 2, np.uint8))
    labels.SetSpacing((1.0, 1.0, 188916.0))  # one voxel of 188.916 mL
    volumes = structure_volumes(labels)
    assert volumes["lv_myocardium_ml"] == 188.92 and volumes["lv_myocardium_mass_g"] == 198.36  # not 198.37


def test_a_field_of_view_smaller_than_the_networks_deepest_layer_is_segmented(small_image):
    """8 x 8 pixels (11 mm) reach the segmenter's deepest layer as one pixel, which its normalisation refuses: the
    input is padded to two of its strides (it ended in an internal error and no output at all)."""
    network, card = load_segmenter()
    labels = segment_image(small_image[28:36, 28:36, :], network, card["config"], "cpu")
    assert labels.GetSize() == (8, 8, small_image.GetSize()[2])


@pytest.mark.parametrize("change, expected", [({"pixel_mm": -1.5}, "pixel_mm must be a number of mm"),
                                              ({"channels": [4096] * 5}, "do not fit the config in its card"),
                                              ({"strides": "2"}, "has an invalid config")])
def test_a_segmentation_model_with_a_bad_card_is_refused_in_one_line(change, expected, small_image, tmp_path,
                                                                        capsys):
    """A negative pixel size segmented nothing, silently; 4096 channels allocated 10 GB first; a bad stride was an
    internal error."""
    import shutil

    from calid.modelstore import resolve_model_dir

    model = tmp_path / "seg"
    shutil.copytree(resolve_model_dir(DEFAULT_SEGMENTATION_MODEL, card_format=SEGMENTATION_FORMAT), model)
    card = json.loads((model / "model.json").read_text(encoding="utf-8"))
    card["config"].update(change)
    (model / "model.json").write_text(json.dumps(card), encoding="utf-8")
    write_image(small_image, tmp_path / "sax.nrrd")
    code, err = run_cli(["segment", tmp_path / "sax.nrrd", tmp_path / "labels.nrrd", "--model", model], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "labels.nrrd").exists()


def test_an_image_given_as_labels_is_named_as_such_in_a_short_line(small_image, tmp_path, capsys):
    """Its hundreds of intensities were all listed in the one line."""
    write_image(small_image, tmp_path / "sax.nrrd")
    code, err = run_cli(["volumes", tmp_path / "sax.nrrd"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and len(err) < 300, err
    assert "more: is it an image, not a label map?" in err


@pytest.mark.parametrize("problem, expected", [
    ("size", "must lie on the grid of the image"),
    ("direction", "direction"),
    ("far origin", "origin"),  # 0.4 mm off, 5 m from the scanner's centre: a tolerance relative to the origin let it in
    ("values", "unknown label values 4, 7"),
    ("alone", "--input-segmentation needs --segmentation"),
])
def test_bad_input_segmentation(problem, expected, small_image, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    write_image(small_image, tmp_path / "sax.nrrd")
    labels = sitk.Image(small_image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(small_image)
    if problem == "size":
        labels = labels[:, :, :-1]
    elif problem == "direction":
        labels.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    elif problem == "far origin":
        far = sitk.Image(small_image)
        far.SetOrigin((5000.0, -5000.0, 5000.0))
        write_image(far, tmp_path / "sax.nrrd")
        labels.SetOrigin((5000.4, -5000.0, 5000.0))
    elif problem == "values":
        labels[10, 10, 1], labels[11, 10, 1] = 4, 7
    write_image(labels, tmp_path / "user.nrrd")
    args = ["upsample", tmp_path / "sax.nrrd", out / "out.nrrd", "--model", tiny_model_dir, "--steps", "1",
            "--input-segmentation", tmp_path / "user.nrrd"]
    if problem != "alone":
        args += ["--segmentation", out / "out_labels.nrrd"]
    code, err = run_cli(args, capsys)
    assert_clean_failure(code, err, out, expected)


def test_train_segmentation_end_to_end_and_resume(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train-segmentation", str(dataset), "--output", str(run), "--preset", "tiny", "--crop", "32",
            "--batch", "2", "--val-every", "2", "--log-every", "1", "--checkpoint-every", "2", "--progress", "none"]
    assert main(args + ["--steps", "2"]) == 0
    split = (run / "split.json").read_bytes()
    assert main(args + ["--steps", "4", "--resume", "--seed", "7"]) == 0  # the run's own split, not the new seed's
    assert (run / "split.json").read_bytes() == split
    network, card = load_segmenter(run / "model")
    assert card["format"] == SEGMENTATION_FORMAT and card["training"]["steps"] == 4
    assert set(card["training"]["split"]) == {"train", "validation"}
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:] if ",segmentation," in r] == ["1", "2", "3", "4"]
    capsys.readouterr()
    assert main(args + ["--steps", "4"]) == 2  # an existing run is never overwritten without --resume
    assert "already holds a training run" in capsys.readouterr().err
