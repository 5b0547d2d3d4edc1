"""The calibrated uncertainty map (issue 16): the error head's loss, the map's units and geometry, the per-slice
figures in the command line's JSON, training the head, and the calibration report of ``calid evaluate``.

The models here are tiny and random (``conftest``): these tests check what the map means and where it lies, not
how well it is calibrated, which ``calid evaluate --uncertainty`` measures on real patients.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from calid import UpsampleOptions, upsample_image
from calid.calibration import calibration_report
from calid.cli import main
from calid.imageio import read_image, write_image
from calid.modelstore import load_model
from calid.networks import ERROR_HEAD_CONFIG, CaLID, ErrorHead, laplace_nll
from calid.uncertainty import slice_summaries

OBLIQUE = (0.8, -0.6, 0.0, 0.36, 0.48, -0.8, 0.48, 0.64, 0.6)


def test_laplace_loss_is_lowest_where_the_scale_is_the_mean_absolute_error():
    torch.manual_seed(0)
    estimate, target = torch.zeros(1, 1, 64, 64), torch.randn(1, 1, 64, 64) * 0.3
    mean_abs = float(target.abs().mean())
    scales = torch.linspace(0.05, 1.0, 96)
    losses = [float(laplace_nll(torch.full_like(target, float(b)).log(), estimate, target)) for b in scales]
    assert abs(float(scales[int(np.argmin(losses))]) - mean_abs) < 0.012


def test_calibration_report_of_a_calibrated_map_is_one_and_of_a_doubled_map_is_two():
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 0.2, 400_000)
    error = rng.laplace(0.0, scale)
    right, doubled = calibration_report(scale, np.abs(error)), calibration_report(2 * scale, np.abs(error))
    assert right["ratio"] == pytest.approx(1.0, abs=0.01) and doubled["ratio"] == pytest.approx(2.0, abs=0.02)
    low, high = right["worst_bin_ratios"]
    assert 0.95 < low <= high < 1.05  # every judged bin, not only the mean
    assert sum(b["share"] for b in right["bins"]) == pytest.approx(1.0)
    assert right["spearman"] > 0.3 and calibration_report(rng.permutation(scale), np.abs(error))["spearman"] < 0.02
    scale[7] = np.nan  # its bin was skipped by the verdict, which then read as calibrated
    with pytest.raises(ValueError, match="NaN or infinite"):
        calibration_report(scale, np.abs(error))


def test_map_is_in_the_inputs_units_zero_on_acquired_slices_and_on_the_dense_grid(small_image, error_head_model_dir):
    model, _ = load_model(error_head_model_dir)
    image = sitk.Cast(small_image, sitk.sitkFloat32)
    image.SetDirection(OBLIQUE)
    options = UpsampleOptions(factor=2, steps=1, device="cpu")
    result = upsample_image(image, options, model, want_uncertainty=True)
    tripled = upsample_image(image * 3.0, options, model, want_uncertainty=True)
    expected = sitk.GetArrayFromImage(result.uncertainty)
    for field in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(result.uncertainty, field)() == getattr(result.image, field)()
    assert not expected[::2].any() and (expected[1::2] > 0).all()
    # Intensities three times larger: the same slices three times further off, so the map triples.
    np.testing.assert_allclose(sitk.GetArrayFromImage(tripled.uncertainty), 3 * expected, rtol=1e-4)
    assert [s["slice"] for s in result.uncertainty_slices] == [1, 3, 5, 7, 9]
    np.testing.assert_allclose([s["expected_error"] for s in result.uncertainty_slices],
                               expected[1::2].mean(axis=(1, 2)), rtol=1e-6)


def test_map_does_not_need_samples_and_samples_do_not_change_its_meaning(small_image, error_head_model_dir):
    model, _ = load_model(error_head_model_dir)
    one = upsample_image(small_image, UpsampleOptions(factor=2, steps=1, device="cpu"), model, want_uncertainty=True)
    four = upsample_image(small_image, UpsampleOptions(factor=2, steps=1, samples=4, device="cpu"), model,
                          want_uncertainty=True)
    a, b = (sitk.GetArrayFromImage(r.uncertainty)[1::2] for r in (one, four))
    assert not np.array_equal(a, b) and 0.5 < b.mean() / a.mean() < 2  # the head judges the averaged estimate


def test_map_and_slices_share_one_estimate_of_the_flows_and_the_map_is_the_same(small_image, error_head_model_dir,
                                                                              monkeypatch):
    from calid import motion, stack_upsampling

    model, _ = load_model(error_head_model_dir)
    options = UpsampleOptions(factor=2, steps=1, device="cpu")
    calls = []
    estimate_flows = motion.stack_flows
    monkeypatch.setattr(motion, "stack_flows", lambda *a, **k: calls.append(1) or estimate_flows(*a, **k))
    shared = upsample_image(small_image, options, model, want_uncertainty=True)
    assert len(calls) == 1  # the slices' flows serve the map: no second estimate
    monkeypatch.setattr(stack_upsampling, "gap_flows", lambda *a: None)  # each stage estimates its own, as before
    apart = upsample_image(small_image, options, model, want_uncertainty=True)
    assert len(calls) == 3
    for a, b in ((shared.image, apart.image), (shared.uncertainty, apart.uncertainty)):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_slice_summaries_average_inside_the_labels_of_each_generated_slice():
    values = np.zeros((5, 4, 6), np.float32)  # dense stack along z (numpy axis 0): acquired 0, 2, 4
    values[1], values[3] = 2.0, 4.0
    values[3, :2] = 10.0
    labels = np.zeros((5, 4, 6), np.uint8)
    labels[3, :2, :3] = 2
    summaries = slice_summaries(sitk.GetImageFromArray(values), 2, 2, sitk.GetImageFromArray(labels))
    assert summaries == [{"slice": 1, "expected_error": 2.0, "heart_expected_error": None},
                         {"slice": 3, "expected_error": 7.0, "heart_expected_error": 10.0}]


def test_a_cines_slice_summaries_take_each_phases_own_heart():
    """A cine's labels are 4D: each phase's figures are inside that phase's labels (with --segmentation a cine
    gave no heart figure at all)."""
    values = np.zeros((2, 3, 4, 6), np.float32)  # (phase, dense z, y, x): acquired 0 and 2
    values[0, 1], values[1, 1] = 1.0, 3.0
    values[1, 1, :2] = 9.0
    labels = np.zeros_like(values, dtype=np.uint8)
    labels[1, 1, :2, :3] = 3  # heart only in phase 1
    summaries = slice_summaries(sitk.GetImageFromArray(values, isVector=False), 2, 2,
                                sitk.GetImageFromArray(labels, isVector=False))
    assert summaries == [{"slice": 1, "expected_error": 1.0, "heart_expected_error": None, "phase": 0},
                         {"slice": 1, "expected_error": 6.0, "heart_expected_error": 9.0, "phase": 1}]


def test_a_map_written_as_dicom_is_exactly_zero_on_acquired_slices(tmp_path):
    """DICOM stores the map as integers with a slope: from an intercept of 0, so that its zeros stay zeros (from the
    range's middle they read back 6e-6, which the overlay's threshold would colour)."""
    values = np.zeros((5, 8, 8), np.float32)
    values[1], values[3] = np.linspace(0, 0.37, 64).reshape(8, 8), 0.2
    write_image(sitk.GetImageFromArray(values), tmp_path / "map")
    back = sitk.GetArrayFromImage(read_image(tmp_path / "map"))
    assert not back[[0, 2, 4]].any()
    np.testing.assert_allclose(back, values, rtol=0, atol=0.37 / 65000)


def test_upsample_json_names_the_unit_and_every_generated_slice_with_its_heart_figure(tmp_path, small_image,
                                                                                    error_head_model_dir, capsys):
    source = tmp_path / "in.nrrd"
    sitk.WriteImage(small_image, str(source))
    code = main(["upsample", str(source), str(tmp_path / "out.nrrd"), "--model", str(error_head_model_dir),
                 "--uncertainty", str(tmp_path / "u.nrrd"), "--segmentation", str(tmp_path / "labels.nrrd"),
                 "--steps", "1", "--progress", "json"])
    assert code == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["event"] == "done" and done["uncertainty_unit"] == "expected |error|, input intensity units"
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "u.nrrd")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nrrd")))
    assert [s["slice"] for s in done["uncertainty_slices"]] == [1, 3, 5, 7, 9]
    for entry in done["uncertainty_slices"]:
        k, heart = entry["slice"], labels[entry["slice"]] > 0
        assert entry["expected_error"] == pytest.approx(float(expected[k].mean()), rel=1e-5)
        assert entry["heart_expected_error"] == (pytest.approx(float(expected[k][heart].mean()), rel=1e-5)
                                                 if heart.any() else None)


def test_error_head_stage_trains_the_head_only_and_its_model_gives_a_map(dataset, tmp_path, error_head_model_dir,
                                                                         small_image):
    from calid.training.config import TrainConfig
    from calid.training.trainer import train

    model_dir = train(TrainConfig(data=[str(dataset)], output=str(tmp_path / "head"), init=str(error_head_model_dir),
                                  denoiser_steps=0, error_head_steps=4, denoiser_batch=2, lr=1e-2, warmup=1,
                                  val_every=4, val_volumes=1, log_every=2, val_fraction=0.25, device="cpu"), "none")
    trained, card = load_model(model_dir)
    base, _ = load_model(error_head_model_dir)
    assert card["config"]["error_head"] and card["training"]["error_head_steps"] == 4
    kept = {k: v for k, v in trained.state_dict().items() if not k.startswith("error_head.")}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in kept.items())  # the rest of the model is untouched
    assert any(c != 0 for row in card["config"]["error_head"]["calibration"]["correction"] for c in row)  # fitted
    rows = [json.loads(line) for line in (tmp_path / "head" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("val_error_ratio", 0) > 0 for r in rows)  # validation reports predicted / actual error
    result = upsample_image(small_image, UpsampleOptions(factor=2, steps=1, device="cpu"), trained,
                            want_uncertainty=True)
    assert sitk.GetArrayFromImage(result.uncertainty)[1::2].min() > 0


def test_recalibration_brings_each_gap_sizes_mean_prediction_to_its_mean_error(dataset, error_head_model_dir):
    from calid.training.data import EstimateSampler, find_volumes, load_volumes
    from calid.training.trainer import calibrate_error_head

    model, _ = load_model(error_head_model_dir)
    sampler = EstimateSampler(model, load_volumes(find_volumes([str(dataset)])), 32, torch.Generator().manual_seed(0),
                              "cpu", 1, refine=True)

    def ratios() -> dict[float, float]:
        sums: dict[float, list[float]] = {}
        for e, b, a, t, alpha, gap in sampler.whole_slices(model.error_head.multiple):
            group = sums.setdefault(float(gap), [0.0, 0.0])
            group[0] += float(model.error_head(e, b, a, alpha, gap).exp().sum())
            group[1] += float((t - e).abs().sum())
        return {g: p / a for g, (p, a) in sums.items()}

    with torch.no_grad():
        before = ratios()
        calibration = calibrate_error_head(model, sampler, torch.device("cpu"))
        after = ratios()
    assert len(before) == 2 and all(abs(np.log(r)) > 0.05 for r in before.values())  # random head: far off
    assert all(abs(np.log(r)) < 0.05 for r in after.values())  # per gap size, the mean is the mean error
    assert model.config["error_head"]["calibration"] == calibration == model.error_head.calibration.to_config()
    reloaded = CaLID(model.config).error_head.calibration.to_config()
    assert reloaded == calibration  # what the model card stores is what is applied


def _laplace_pairs(seed: int, power: float, gaps=(10.0, 20.0)):
    """Synthetic raw log b and |error|: the true expected error is exp(power x (log b + 2.5) - 2.5) x gap / 10 mm."""
    g = torch.Generator().manual_seed(seed)
    for i in range(24):
        gap = torch.tensor([gaps[i % len(gaps)]])
        raw = torch.randn(1, 1, 64, 64, generator=g) * 0.6 - 2.5
        truth = torch.exp(power * (raw + 2.5) - 2.5) * gap / 10
        error = (-truth * torch.log(torch.rand(raw.shape, generator=g))).abs()  # |Laplace(0, b)| is Exp(1/b)
        yield raw, error, gap, truth


def test_calibration_learns_a_head_that_is_too_flat_per_gap_and_keeps_its_order():
    from calid.error_calibration import ErrorCalibration

    fitted = ErrorCalibration.fit((r, e, g) for r, e, g, _ in _laplace_pairs(0, power=1.4))
    for raw, _, gap, truth in _laplace_pairs(1, power=1.4):  # unseen draws
        ratio = float(fitted(raw, gap).exp().mean() / truth.mean())
        assert 0.93 < ratio < 1.07, (float(gap), ratio)
        low = raw < raw.quantile(0.1)  # the voxels the head gives least error: where a constant factor fails
        assert 0.8 < float(fitted(raw, gap).exp()[low].mean() / truth[low].mean()) < 1.25
    grid = torch.linspace(-7, 1, 400).reshape(1, 1, 1, -1).expand(3, 1, 1, -1)
    mapped = fitted(grid, torch.tensor([10.0, 14.0, 35.0]))
    assert bool((mapped.diff(dim=-1) >= 0).all())  # a larger b still means a larger expected error


@pytest.mark.parametrize("site_gaps", [(20.0,), (16.0, 20.0)])
def test_a_refit_on_slices_without_10_mm_gaps_keeps_the_calibration_it_replaces_there(site_gaps):
    """A site whose stacks are all 8-10 mm apart gives 16-20 mm gaps only: the measured 10 mm row stays (16 mm gaps
    weigh on the 10 mm knot too, and refitted it from gaps 6 mm away)."""
    from calid.error_calibration import ErrorCalibration

    before = ErrorCalibration.fit((r, e, g) for r, e, g, _ in _laplace_pairs(0, power=1.4))
    assert before.gaps_mm.tolist() == [10.0, 20.0]
    wide_only = [(r, e * 1.3, g) for r, e, g, _ in _laplace_pairs(2, power=1.4, gaps=site_gaps)]
    alone = ErrorCalibration.fit(iter(wide_only))
    assert alone.gaps_mm.tolist() == [10.0, 20.0][2 - len(site_gaps):]  # without keep: refitted, or 20 mm stands in
    refit = ErrorCalibration.fit(iter(wide_only), keep=before)
    assert refit.gaps_mm.tolist() == [10.0, 20.0]
    raw = torch.linspace(-4, -1, 50).reshape(1, 1, 1, -1)
    ten = torch.tensor([10.0])
    assert torch.allclose(refit(raw, ten), before(raw, ten), atol=2e-3)  # the kept row, resampled on the new knots
    assert not torch.allclose(refit(raw, torch.tensor([20.0])), before(raw, torch.tensor([20.0])), atol=1e-2)


def test_calibration_of_the_first_heads_a_factor_per_gap_still_loads():
    from calid.error_calibration import ErrorCalibration

    old = ErrorHead({**ERROR_HEAD_CONFIG, "calibration": {"log_factor": 0.1, "log_factor_per_10mm": 0.02}})
    shifted = old.calibration(torch.zeros(2, 1, 3, 3), torch.tensor([10.0, 25.0]))
    assert torch.allclose(shifted[:, 0, 0, 0], torch.tensor([0.12, 0.15]))
    assert torch.equal(ErrorCalibration()(torch.full((1, 1, 2, 2), -2.0), torch.tensor([12.0])),
                       torch.full((1, 1, 2, 2), -2.0))  # unfitted: the identity


def test_error_head_needs_a_motion_aware_model(dataset, tmp_path, tiny_model_dir):
    from calid.errors import CalidError
    from calid.training.config import TrainConfig
    from calid.training.trainer import Trainer

    with pytest.raises(CalidError, match="motion-aware"):
        Trainer(TrainConfig(data=[str(dataset)], output=str(tmp_path / "e"), init=str(tiny_model_dir),
                            error_head_steps=2))


@pytest.mark.slow
def test_evaluate_reports_calibration_per_setting_and_region_with_a_diagram(dataset, tmp_path, error_head_model_dir,
                                                                            capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(dataset), "--output", str(out), "--model", str(error_head_model_dir), "--factor", "2",
                 "--steps", "1", "--patients", "patient000,patient003", "--uncertainty", "--progress", "none"]) == 0
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    regions = report["calibration"]["K=2, 10 mm stacks (20 mm gaps)"]
    assert set(regions) == {"slice", "heart"}  # the sample is a crop of the heart: its box is the whole slice
    for r in regions.values():
        assert r["ratio"] == pytest.approx(r["mean_predicted"] / r["mean_actual"])
        assert sum(b["share"] for b in r["bins"]) == pytest.approx(1.0) and -1 <= r["spearman"] <= 1
    assert "Uncertainty map against the actual |error|" in capsys.readouterr().out
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
