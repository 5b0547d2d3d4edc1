"""The last step set per gap (``calid.gap_mix``): the weights follow the gap between the acquired slices."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from calid.cli import main
from calid.engine import UpsampleOptions, upsample_image
from calid.gap_mix import GapMix
from calid.generation import GapItems, generate_missing, generate_renditions
from calid.metrics import linear_missing
from calid.modelstore import save_model
from calid.networks import TINY_CONFIG, CaLID
from calid.pipeline_settings import LastStep, MotionSettings


@pytest.fixture(scope="module")
def motion_model() -> CaLID:
    torch.manual_seed(0)
    model = CaLID(TINY_CONFIG)
    model.set_motion(MotionSettings("dis"))
    return model.eval()


def test_weights_are_linear_in_the_gap_between_knots_and_constant_beyond():
    mix = GapMix.parse("20:0.5:0,10:0.8:0.2")  # knots in any order
    assert mix == GapMix((10.0, 20.0), (0.8, 0.5), (0.2, 0.0))
    assert mix.at(15.0) == pytest.approx((0.65, 0.1))
    assert mix.at(8.0) == pytest.approx((0.8, 0.2)) and mix.at(40.0) == pytest.approx((0.5, 0.0))
    assert GapMix.from_config(mix.to_config()) == mix
    for bad, why in (("10:0.8", "GAP_MM:MORPH:LINEAR"), ("10:0.8:0.2,20:0.5:0:1", "GAP_MM:MORPH:LINEAR"),
                     ("ten:0.8:0.2", "GAP_MM:MORPH:LINEAR"), ("10:1.5:0", r"\[0, 1\]"),
                     ("10:0.5:0,10:0.6:0", "increasing")):
        with pytest.raises(ValueError, match=why):
            GapMix.parse(bad)


def test_the_model_takes_the_weights_of_the_gap_it_is_given(motion_model, small_image):
    stack = sitk.GetArrayFromImage(small_image).astype(np.float32) / 500 - 1
    motion_model.set_last_step(LastStep(0.5))
    mixed = generate_missing(motion_model, stack, 2, 1)
    unmixed = generate_missing(motion_model, stack, 2, 1, refine=False)
    motion_model.set_last_step(LastStep(0.5, gap_mix=GapMix((10.0, 20.0), (0.5, 0.5), (1.0, 0.0))))
    linear = linear_missing(stack, 2)
    np.testing.assert_allclose(generate_missing(motion_model, stack, 2, 1, gap_mm=8.0)[0], linear, atol=1e-5)
    np.testing.assert_allclose(generate_missing(motion_model, stack, 2, 1, gap_mm=20.0), mixed, atol=1e-5)
    np.testing.assert_allclose(generate_missing(motion_model, stack, 2, 1, gap_mm=15.0)[0],
                               0.5 * mixed[0] + 0.5 * linear, atol=1e-5)
    np.testing.assert_allclose(generate_missing(motion_model, stack, 2, 1, refine=False), unmixed, atol=1e-6)
    with pytest.raises(ValueError, match="gap_mm"):
        generate_missing(motion_model, stack, 2, 1)
    rebuilt = CaLID(motion_model.config)  # the card carries the table
    assert rebuilt.last_step == motion_model.last_step and rebuilt.last_step.at(12.0) == pytest.approx((0.5, 0.8))
    motion_model.set_last_step(LastStep(0.3))  # one weight at every gap: no table
    assert "gap_mix" not in motion_model.config and motion_model.last_step.at(12.0) == (0.3, 0.0)


def test_the_sharp_rendition_is_the_partner_alone_from_the_same_pass(motion_model, small_image):
    """Balanced: the gap's weights (here half the partner, a fifth of the cross-fade); sharp: the aligned partner
    alone whatever the weights, each neighbour resampled once, from the same estimate."""
    stack = sitk.GetArrayFromImage(small_image).astype(np.float32)[None] / 500 - 1
    motion_model.set_last_step(LastStep(0.5, "aligned", GapMix((10.0, 20.0), (0.5, 0.5), (0.2, 0.2))))
    both = generate_renditions(motion_model, stack, 2, 1, gap_mm=10.0, renditions=("balanced", "sharp"))
    alone = generate_renditions(motion_model, stack, 2, 1, gap_mm=10.0)
    assert set(alone) == {"balanced"} and np.array_equal(both["balanced"], alone["balanced"])
    gaps = GapItems(motion_model, stack, 2, 1)
    estimate = generate_missing(motion_model, stack[0], 2, 1, refine=False)[0]
    twice, once = gaps.carried_onto(estimate)
    np.testing.assert_allclose(both["sharp"][0, 0], once, atol=1e-5)
    balanced = 0.8 * (0.5 * estimate + 0.5 * twice) + 0.2 * gaps.cross_fade(stack[0])
    np.testing.assert_allclose(both["balanced"][0, 0], balanced, atol=1e-5)
    assert np.abs(once - twice).mean() > 1e-3
    with pytest.raises(ValueError, match="renditions"):
        generate_renditions(motion_model, stack, 2, 1, gap_mm=10.0, renditions=("crisp",))


def test_upsample_reads_the_gap_from_the_input_slice_spacing(motion_model, small_image):
    """A table that is all linear at the input's slice spacing, and none of it 5 mm away: the product's slices
    are linear interpolation, so the engine gave the model the input's spacing as the gap."""
    spacing = small_image.GetSpacing()[2]
    linear = sitk.GetArrayFromImage(upsample_image(small_image, UpsampleOptions(factor=2, method="linear")).image)
    motion_model.set_last_step(LastStep(gap_mix=GapMix((spacing, spacing + 5), (0.0, 0.0), (1.0, 0.0))))
    at_spacing = sitk.GetArrayFromImage(upsample_image(small_image, UpsampleOptions(factor=2), motion_model).image)
    motion_model.set_last_step(LastStep(gap_mix=GapMix((spacing - 5, spacing), (0.0, 0.0), (1.0, 0.0))))
    beyond = sitk.GetArrayFromImage(upsample_image(small_image, UpsampleOptions(factor=2), motion_model).image)
    assert np.abs(at_spacing.astype(float) - linear).max() <= 1  # the same up to rounding of float32 sums
    assert np.abs(beyond.astype(float) - linear).mean() > 5  # the model's own slices


def test_a_bad_gap_mix_is_refused_in_one_line(motion_model, tmp_path, dataset, capsys):
    model_dir = save_model(motion_model, tmp_path / "m", {"name": "m"})
    code = main(["train", str(dataset), "--output", str(tmp_path / "run"), "--init", str(model_dir),
                 "--denoiser-steps", "0", "--gap-mix", "10:0.8", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "--gap-mix" in err and "GAP_MM:MORPH:LINEAR" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
