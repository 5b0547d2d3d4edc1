"""The motion prior (``calid.motion``), motion-aware models and ``--method``: what moves must move, geometry holds."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from calid.cli import main
from calid.engine import UpsampleOptions, upsample_image
from calid.errors import CalidError
from calid.generation import generate_missing
from calid.metrics import linear_missing
from calid.modelstore import load_model, save_model
from calid import motion
from calid.choices import FLOW_METHODS
from calid.motion import VIEWS, morph_missing, pair_flow, warp
from calid.networks import TINY_CONFIG, CaLID
from calid.pipeline_settings import PRODUCT_MORPH, LastStep, MotionSettings
from calid.training.data import MotionTripletSampler, TripletSampler, Volume


def disc_stack(centres_x: list[float], size: int = 64, radius: float = 9.0) -> np.ndarray:
    """Slices with a bright disc (a 'ventricle') whose centre moves along x from slice to slice."""
    rows, cols = np.mgrid[0:size, 0:size]
    return np.stack([200.0 * ((rows - size / 2) ** 2 + (cols - cx) ** 2 <= radius ** 2) + 20.0 for cx in centres_x])


@pytest.fixture(scope="module")
def real_slice(sample_image) -> np.ndarray:
    return sitk.GetArrayFromImage(sample_image)[5].astype(np.float64)


@pytest.mark.parametrize("method", ["dis", "dis-fine", "tvl1"])
def test_morph_moves_a_real_slice_part_of_the_way_where_linear_blends(real_slice, method):
    """Above = the slice moved 6 pixels: the morph's slices at 1/3 and 2/3 are it moved 2 and 4 pixels."""
    moved = np.stack([real_slice, np.roll(real_slice, 6, axis=1)])
    missing = morph_missing(moved, 3, method)
    inner = (slice(10, -10), slice(10, -10))
    for estimate, shift in zip(missing, (2, 4)):
        truth = np.roll(real_slice, shift, axis=1)[inner]
        blend = ((1 - shift / 6) * moved[0] + shift / 6 * moved[1])[inner]
        assert np.abs(estimate[inner] - truth).mean() < 0.05 * np.abs(blend - truth).mean()


def test_morph_of_equal_slices_is_that_slice_in_dense_positions_order(real_slice):
    kept = np.stack([real_slice, real_slice, real_slice[::-1]])
    missing = morph_missing(kept, 2)
    assert missing.shape == (2, *real_slice.shape)
    np.testing.assert_allclose(missing[0], real_slice, atol=0.01)  # gap 0 first, then gap 1 (float32 warps)


@pytest.fixture(scope="module")
def motion_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = CaLID(TINY_CONFIG)
    model.set_motion(MotionSettings("dis"))
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny-motion", {"name": "tiny-motion"})


def test_warp_is_bilinear_sampling_with_repeated_edges():
    rng = np.random.default_rng(0)
    image, flow = rng.random((30, 40)), rng.normal(0, 4, (2, 30, 40))
    rows, cols = np.mgrid[0:30, 0:40]
    expected = map_coordinates(image, [rows + flow[0], cols + flow[1]], order=1, mode="nearest")
    got = warp(torch.from_numpy(image)[None, None], torch.from_numpy(flow)[None])[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["dis", "dis-fine", "tvl1"])
def test_flow_follows_a_moving_wall_and_is_symmetric(method):
    below, above = disc_stack([26.0, 34.0])
    flow = pair_flow(below, above, method)
    inside = disc_stack([26.0])[0] > 100
    assert np.median(flow[1][inside]) == pytest.approx(8.0, abs=2.0)  # the disc moved 8 pixels along columns
    assert abs(np.median(flow[0][inside])) < 1.0
    np.testing.assert_allclose(pair_flow(above, below, method), -flow, atol=1e-4)


@pytest.mark.parametrize("view", VIEWS)
def test_a_flow_estimated_in_any_orientation_comes_back_in_the_slice_frame(monkeypatch, view):
    """A disc moved 8 pixels along columns and 4 along rows: the flow estimated on the turned or flipped pair, brought
    back, is that displacement, signs and axes included (a wrong turn would swap or negate them)."""
    rows, cols = np.mgrid[0:64, 0:64]
    below, above = (200.0 * ((rows - r) ** 2 + (cols - c) ** 2 <= 81) + 20.0 for r, c in ((28, 26), (32, 34)))
    monkeypatch.setattr(motion, "VIEWS", (view,))
    flow = pair_flow(below, above, "dis", 1)
    inside = ((rows - 28) ** 2 + (cols - 26) ** 2) <= 49
    assert np.median(flow[0][inside]) == pytest.approx(4.0, abs=1.5)
    assert np.median(flow[1][inside]) == pytest.approx(8.0, abs=1.5)


def test_flow_views_average_orientations_into_one_flow_that_still_follows_the_wall():
    below, above = disc_stack([26.0, 34.0])
    one, eight = pair_flow(below, above, "dis"), pair_flow(below, above, "dis", 8)
    inside = disc_stack([26.0])[0] > 100
    assert np.median(eight[1][inside]) == pytest.approx(8.0, abs=2.0) and not np.allclose(one, eight)
    np.testing.assert_allclose(pair_flow(above, below, "dis", 8), -eight, atol=1e-4)  # still symmetric
    for bad in (0, 9, 2.5):
        with pytest.raises(ValueError, match="1 to 8"):
            pair_flow(below, above, "dis", bad)


def test_pairs_estimated_in_parallel_are_each_pairs_own_flow_and_leave_opencv_threads_as_found():
    import cv2

    stacks = disc_stack([26.0, 30.0, 35.0, 33.0])
    pairs = list(zip(stacks[:-1], stacks[1:]))
    before = cv2.getNumThreads()
    torch.set_num_threads(2)
    together = motion.pair_flows(pairs, "dis-fine", 2)
    assert cv2.getNumThreads() == before
    for flow, pair in zip(together, pairs):
        np.testing.assert_array_equal(flow, pair_flow(*pair, "dis-fine", 2))


def test_every_flow_method_has_an_estimator_and_fine_dis_is_another_flow():
    assert tuple(motion.ESTIMATORS) == FLOW_METHODS
    below, above = disc_stack([26.0, 31.0])
    assert not np.allclose(pair_flow(below, above, "dis"), pair_flow(below, above, "dis-fine"), atol=1e-3)


def test_another_flow_keeps_a_motion_aware_models_views_and_smoothing(motion_model_dir):
    model, _ = load_model(motion_model_dir)
    model.set_motion(replace(model.motion, views=8, smooth=0.15))
    model.set_motion(replace(model.motion, flow="dis-fine"))
    assert model.config["motion"] == {"flow": "dis-fine", "views": 8, "smooth": 0.15}


def test_flow_views_change_the_model_output_and_travel_in_its_card(tmp_path, motion_model_dir, small_image):
    stack = sitk.GetArrayFromImage(small_image).astype(np.float32) / 500 - 1
    model, card = load_model(motion_model_dir)
    one = generate_missing(model, stack, 2, 1)
    model.set_motion(replace(model.motion, views=8))
    assert model.config["motion"] == {"flow": "dis", "views": 8} and CaLID(model.config).motion.views == 8
    assert not np.allclose(generate_missing(model, stack, 2, 1), one, atol=1e-3)
    with pytest.raises(ValueError, match="1 to 8"):
        replace(model.motion, views=0)
    older = tmp_path / "older"  # a card written before views existed: one view, the same slices as before
    older.mkdir()
    for f in motion_model_dir.iterdir():
        (older / f.name).write_bytes(f.read_bytes())
    card["config"]["motion"] = {"flow": "dis"}
    (older / "model.json").write_text(json.dumps(card), encoding="utf-8")
    old_model, _ = load_model(older)
    assert old_model.motion.views == 1
    np.testing.assert_array_equal(generate_missing(old_model, stack, 2, 1), one)


def test_morph_moves_the_wall_where_linear_interpolation_cross_fades():
    stack = disc_stack([24.0, 36.0], radius=10.0)
    truth = disc_stack([30.0], radius=10.0)[0]
    morph, linear = morph_missing(stack, 2)[0], linear_missing(stack, 2)[0]
    assert np.abs(morph - truth).mean() < 0.5 * np.abs(linear - truth).mean()
    edges = np.abs(linear - truth) > 50  # where linear interpolation leaves half-bright crescents
    assert edges.sum() > 50 and np.abs(morph - truth)[edges].mean() < 0.5 * np.abs(linear - truth)[edges].mean()


def test_motion_sampler_warps_neighbours_towards_the_target():
    stack = (disc_stack([22.0, 30.0, 38.0]) / 110 - 1).astype(np.float32)  # network range; the middle slice is truth
    volume = Volume("p", "disc", stack, 10.0)
    plain = TripletSampler([torch.from_numpy(stack)[:, None]], 64, torch.Generator().manual_seed(0), 0.0).batch(1)
    below, target, above, alpha = MotionTripletSampler([volume], 64, torch.Generator().manual_seed(0), "dis").batch(1)
    assert float(alpha) == 0.5 and below.shape == (1, 1, 64, 64)
    truth = torch.from_numpy(stack[1])
    assert any(torch.equal(target[0, 0], torch.rot90(t, k)) for t in (truth, truth.flip(-1)) for k in range(4))
    moved_error = float(((below + above) / 2 - target).abs().mean())
    plain_error = float(((plain[0] + plain[2]) / 2 - plain[1]).abs().mean())
    assert moved_error < 0.5 * plain_error


def test_motion_aware_model_round_trips_keeps_acquired_slices_and_oblique_geometry(small_image, motion_model_dir):
    model, card = load_model(motion_model_dir)
    assert model.motion == MotionSettings("dis") and card["config"]["motion"] == {"flow": "dis", "views": 1}
    oblique = sitk.Image(small_image)
    oblique.SetDirection((0.8, -0.6, 0.0, 0.36, 0.48, -0.8, 0.48, 0.64, 0.6))
    result = upsample_image(oblique, UpsampleOptions(factor=3, steps=1, device="cpu"), model)
    dense = sitk.GetArrayFromImage(result.image)
    np.testing.assert_array_equal(dense[::3], sitk.GetArrayFromImage(oblique))
    assert result.image.GetDirection() == oblique.GetDirection() and result.image.GetOrigin() == oblique.GetOrigin()
    again = upsample_image(oblique, UpsampleOptions(factor=3, steps=1, device="cpu"), model)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again.image), dense)


def test_motion_changes_what_the_model_is_conditioned_on(small_image, motion_model_dir):
    motion_model, _ = load_model(motion_model_dir)
    plain = CaLID(TINY_CONFIG)
    plain.load_state_dict(motion_model.state_dict())
    stack = sitk.GetArrayFromImage(small_image).astype(np.float32) / 500 - 1
    with_motion = generate_missing(motion_model, stack, 2, 1)
    without = generate_missing(plain, stack, 2, 1)
    assert with_motion.shape == without.shape and not np.allclose(with_motion, without, atol=1e-3)


@pytest.mark.parametrize("motion_config, message",
                         [({"flow": "magic"}, "magic"), ({"flow": "dis", "views": 9}, "1 to 8")])
def test_a_card_naming_an_unknown_flow_is_refused_in_one_line(tmp_path, motion_model_dir, motion_config, message):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in motion_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    card = json.loads((broken / "model.json").read_text(encoding="utf-8"))
    card["config"]["motion"] = motion_config
    (broken / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(CalidError, match=f"invalid config.*{message}"):
        load_model(broken)


@pytest.mark.parametrize("method", ["morph", "linear"])
def test_method_option_gives_the_peers_through_the_same_geometry(tmp_path, small_image, method):
    source = tmp_path / "in.nrrd"
    sitk.WriteImage(small_image, str(source))
    out = tmp_path / f"{method}.nrrd"
    assert main(["upsample", str(source), str(out), "--factor", "2", "--method", method, "--progress", "none"]) == 0
    dense, acquired = sitk.ReadImage(str(out)), sitk.GetArrayFromImage(small_image)
    array = sitk.GetArrayFromImage(dense)
    np.testing.assert_array_equal(array[::2], acquired)
    np.testing.assert_allclose(dense.GetDirection(), small_image.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(dense.GetOrigin(), small_image.GetOrigin(), atol=1e-6)
    if method == "linear":
        expected = np.rint(linear_missing(acquired.astype(np.float64), 2))
        np.testing.assert_allclose(array[1::2], expected, atol=1)
    else:  # the product's morph is the one the bundled models build on (PRODUCT_MORPH), not the plain one-view DIS
        product = np.rint(PRODUCT_MORPH.morph_missing(acquired.astype(np.float64), 2))
        plain = np.rint(morph_missing(acquired, 2))
        assert np.abs(array[1::2] - product).mean() < 0.1 * np.abs(array[1::2] - plain).mean()


def test_method_refuses_options_that_need_the_model(tmp_path, small_image, capsys):
    source = tmp_path / "in.nrrd"
    sitk.WriteImage(small_image, str(source))
    code = main(["upsample", str(source), str(tmp_path / "o.nrrd"), "--method", "morph", "--samples", "2",
                 "--uncertainty", str(tmp_path / "u.nrrd"), "--progress", "none"])
    assert code == 2 and not (tmp_path / "o.nrrd").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method calid" in err[0]


@pytest.mark.parametrize("kind", ["residual", "synthesis"])
def test_refiner_stage_trains_after_the_denoiser_and_is_used_at_inference(dataset, tmp_path, motion_model_dir, small_image,
                                                                          kind):
    from calid.networks import REFINERS
    from calid.training.config import TrainConfig
    from calid.training.trainer import train

    run = tmp_path / "refine"
    model_dir = train(TrainConfig(data=[str(dataset)], output=str(run), init=str(motion_model_dir), denoiser_steps=0,
                                  refiner_steps=4, refiner_loss="l1+ssim", refiner_kind=kind, denoiser_batch=2, lr=1e-2,
                                  warmup=1, val_every=4, val_volumes=1, log_every=2, val_fraction=0.25, device="cpu"),
                      "none")
    refined, card = load_model(model_dir)
    assert card["config"]["refiner"]["kind"] == kind and card["training"]["refiner_steps"] == 4
    assert type(refined.refiner) is REFINERS[kind]
    assert float(refined.refiner.gain.detach()) != 0  # trained: the correction is switched on
    stack = sitk.GetArrayFromImage(small_image).astype(np.float32) / 500 - 1
    with_refiner, without = generate_missing(refined, stack, 2, 1), generate_missing(refined, stack, 2, 1, refine=False)
    assert with_refiner.shape == without.shape and not np.allclose(with_refiner, without)
    base, _ = load_model(motion_model_dir)
    np.testing.assert_allclose(without, generate_missing(base, stack, 2, 1), atol=1e-5)  # the denoiser was kept


def test_synthesis_refiner_starts_as_the_even_mix_and_moves_pixels_along_its_flow_correction():
    from calid.motion import blend
    from calid.networks import REFINER_CONFIG, REFINERS, SynthesisRefiner
    from calid.choices import REFINER_KINDS

    assert tuple(REFINERS) == REFINER_KINDS  # the command line offers exactly the kinds a config may name
    refiner = SynthesisRefiner({**REFINER_CONFIG, "kind": "synthesis"}).eval()
    g = torch.Generator().manual_seed(0)
    estimate, below, above = (torch.rand((2, 1, 32, 32), generator=g) for _ in range(3))
    alpha = torch.tensor([0.5, 0.25])
    with torch.no_grad():
        np.testing.assert_allclose(refiner(estimate, below, above, alpha), 0.5 * estimate + 0.5 * blend(below, above, alpha),
                                   atol=1e-5)  # untrained: the estimate and the morph, evenly
        # Test double for the U-Net only: a fixed output that says "take the below neighbour, one row further down".
        out = torch.zeros((2, SynthesisRefiner.OUTPUTS, 32, 32))
        out[:, 0] = 1.0  # d_below: one row
        out[:, 4] = -20.0  # m -> 0: all below
        out[:, 5] = 20.0  # s -> 1: all sharp
        refiner.net.forward = lambda x: out
        refiner.gain.fill_(1.0)
        moved = refiner(estimate, below, above, alpha)
    np.testing.assert_allclose(moved[:, :, :-1], below[:, :, 1:], atol=1e-5)  # below(p + one row)


def test_refiner_ssim_term_asks_for_the_contrast_that_l1_alone_would_trade_for_a_bias(small_image):
    from calid.training.losses import l1_ssim_loss

    stack = sitk.GetArrayFromImage(small_image).astype(np.float32) / 500 - 1
    target = torch.from_numpy(stack[:, None]).clamp(-1, 1)
    flattened = target.mean() + 0.5 * (target - target.mean())  # what a blurring refiner does: half the contrast
    shifted = target + float((flattened - target).abs().mean())  # every structure kept, a constant bias
    l1 = torch.nn.functional.l1_loss
    assert float(l1(flattened, target)) == pytest.approx(float(l1(shifted, target)), rel=1e-4)  # L1 cannot tell
    assert float(l1_ssim_loss(target, target)) == pytest.approx(0.0, abs=1e-5)
    assert float(l1_ssim_loss(flattened, target)) > float(l1_ssim_loss(shifted, target)) + 0.03


def test_refiner_segmentation_term_is_least_where_the_bundled_segmenter_sees_the_real_slice(small_image):
    from calid.training.losses import SEGMENTATION_WEIGHT, l1_ssim_loss, refiner_loss

    loss = refiner_loss("l1+ssim+seg", torch.device("cpu"))
    assert not any(p.requires_grad for p in loss.segmenter.parameters())  # the segmenter is not trained
    stack = sitk.GetArrayFromImage(small_image).astype(np.float32) / 500 - 1
    target = torch.from_numpy(stack[:, None]).clamp(-1, 1)
    flattened = (target.mean() + 0.5 * (target - target.mean())).requires_grad_()

    def consistency(estimate):
        return (loss(estimate, target) - l1_ssim_loss(estimate, target)) / SEGMENTATION_WEIGHT

    with torch.no_grad():
        assert float(consistency(flattened)) > float(consistency(target)) + 1e-3  # cross-entropy >= its entropy
    loss(flattened, target).backward()
    assert flattened.grad is not None and float(flattened.grad.abs().sum()) > 0


@pytest.mark.parametrize("option", [{"morph_mix": 0.0}, {"morph_mix_space": "pixel"}, {"gap_mix": "10:0:0"}])
def test_a_last_step_option_needs_a_motion_aware_model_even_when_it_would_change_nothing(option, dataset, tmp_path,
                                                                                         tiny_model_dir):
    from calid.training.config import TrainConfig
    from calid.training.trainer import Trainer

    with pytest.raises(CalidError, match="needs a motion-aware model"):
        Trainer(TrainConfig(data=[str(dataset)], output=str(tmp_path / "r"), init=str(tiny_model_dir), **option))


def test_refiner_needs_a_motion_aware_model(dataset, tmp_path, tiny_model_dir):
    from calid.training.config import TrainConfig
    from calid.training.trainer import Trainer

    with pytest.raises(CalidError, match="motion-aware"):
        Trainer(TrainConfig(data=[str(dataset)], output=str(tmp_path / "r"), init=str(tiny_model_dir), refiner_steps=2))


def test_morph_mix_averages_the_final_slices_with_the_morph(motion_model_dir, small_image):
    stack = sitk.GetArrayFromImage(small_image).astype(np.float32) / 500 - 1
    model, _ = load_model(motion_model_dir)
    unmixed = generate_missing(model, stack, 2, 1)
    model.set_last_step(LastStep(1.0))
    morph = generate_missing(model, stack, 2, 1)
    assert not np.allclose(morph, unmixed)
    assert 64 % model.spatial_multiple == 0  # 64 x 64 slices: no padding, so the flows are those of morph_missing
    np.testing.assert_allclose(morph[0], morph_missing(stack, 2), atol=1e-5)  # weight 1: the model's own DIS morph
    model.set_last_step(LastStep(0.3))
    np.testing.assert_allclose(generate_missing(model, stack, 2, 1), 0.7 * unmixed + 0.3 * morph, atol=1e-5)
    np.testing.assert_allclose(generate_missing(model, stack, 2, 1, refine=False), unmixed, atol=1e-6)
    assert CaLID(model.config).last_step == LastStep(0.3)  # the card carries it
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LastStep(1.5)


def test_flow_smoothing_averages_each_gap_with_its_neighbours_within_a_phase():
    flows = torch.zeros((2 * 4, 2, 3, 3))  # 2 phases of 4 gaps
    flows[1] = 1.0  # phase 0, gap 1: a lone outlier
    flows[4:] = 5.0  # phase 1: constant
    smooth = motion.smooth_along_stack(flows, 2, 0.2)
    np.testing.assert_allclose(smooth[:4, 0, 0, 0], [0.2 / 0.8, 0.6, 0.2, 0.0], atol=1e-6)  # ends renormalised
    np.testing.assert_allclose(smooth[4:], flows[4:], atol=1e-6)  # a constant field stays; phases do not mix
    assert motion.smooth_along_stack(flows, 2, 0.0) is flows
    for bad in (-0.1, 0.5):
        with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
            motion.smooth_along_stack(flows, 2, bad)


def test_the_product_morph_is_the_morph_a_model_with_its_settings_builds_on(motion_model_dir, small_image):
    stack = sitk.GetArrayFromImage(small_image).astype(np.float32) / 500 - 1
    model, _ = load_model(motion_model_dir)
    model.set_motion(PRODUCT_MORPH)
    model.set_last_step(LastStep(1.0))  # the model's slices are its morph alone
    product = PRODUCT_MORPH.morph_missing(stack, 3)
    np.testing.assert_allclose(generate_missing(model, stack, 3, 1)[0], product, atol=1e-5)
    unsmoothed = morph_missing(stack, 3, PRODUCT_MORPH.flow, PRODUCT_MORPH.views)
    assert not np.allclose(product, unsmoothed, atol=1e-4)


def test_shape_average_moves_one_wall_halfway_where_a_pixel_average_shows_two():
    first, second = disc_stack([26.0, 34.0])
    shape = motion.shape_average(first[None], second[None], 0.5)[0]
    pixel = (first + second) / 2
    rows, cols = np.mgrid[0:64, 0:64]
    mass = lambda image: float(((image - 20) * cols).sum() / (image - 20).sum())
    assert mass(shape) == pytest.approx(30.0, abs=1.0)  # the disc halfway, as in the pixel average
    halfway = disc_stack([30.0])[0]
    assert np.abs(shape - halfway).mean() < 0.5 * np.abs(pixel - halfway).mean()  # but one disc, not two faint
    np.testing.assert_allclose(motion.shape_average(first[None], second[None], 0.0)[0], first, atol=1e-3)
    np.testing.assert_allclose(motion.shape_average(first[None], second[None], 1.0)[0], second, atol=1e-3)


def test_carried_onto_puts_the_neighbours_sharp_pixels_where_the_estimate_puts_the_walls(real_slice):
    """The estimate has the walls in the right place but soft; the warped neighbours are sharp but 3 pixels off,
    one each way: carried onto the estimate they are sharp and in place, nearer the truth than either."""
    truth = np.roll(real_slice, 3, axis=1)
    estimate, below, above = gaussian_filter(truth, 1.5), real_slice, np.roll(real_slice, 6, axis=1)
    as_tensor = lambda x: torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None]
    no_gap_flow = torch.zeros(1, 2, *truth.shape)  # the neighbours are where the new slice samples them already
    error = lambda x: float(np.abs(x - truth)[8:-8, 8:-8].mean())
    for carried in motion.carried_onto(as_tensor(estimate), as_tensor(below), as_tensor(above), no_gap_flow,
                                       torch.tensor([0.5])):  # resampled twice, once
        assert error(carried[0, 0].numpy()) < 0.25 * min(error(estimate), error((below + above) / 2))


def test_one_resampling_along_composed_displacements_keeps_the_detail_two_resamplings_blur(real_slice):
    """Half-pixel shifts that add up to one whole pixel: two bilinear resamplings average neighbouring pixels twice;
    one resampling along the composed displacement is the image shifted by exactly one pixel, no detail lost."""
    image = torch.from_numpy(np.ascontiguousarray(real_slice, np.float32))[None, None]
    shape = (1, 2, *real_slice.shape)
    field = lambda dy, dx: torch.tensor([dy, dx], dtype=torch.float32).reshape(1, 2, 1, 1).expand(shape)
    first, then = field(0.5, -0.5), field(-0.5, 1.5)
    twice, once = warp(warp(image, then), first), warp(image, motion.composed(first, then))
    inner = (0, 0, slice(8, -8), slice(8, -8))
    np.testing.assert_allclose(once[inner], image[0, 0, 8:-8, 9:-7], atol=0.01)
    detail = lambda x: float(np.abs(np.diff(x[inner].numpy(), axis=1)).mean())
    assert detail(once) > 1.1 * detail(twice)


def test_the_aligned_mix_blends_the_estimate_with_the_neighbours_carried_onto_it(motion_model_dir, small_image):
    stack = sitk.GetArrayFromImage(small_image).astype(np.float32) / 500 - 1
    model, _ = load_model(motion_model_dir)
    model.set_last_step(LastStep(0.0))
    estimate = generate_missing(model, stack, 3, 1)
    model.set_last_step(LastStep(1.0, "aligned"))
    aligned = generate_missing(model, stack, 3, 1)
    model.set_last_step(LastStep(0.5, "aligned"))
    assert CaLID(model.config).last_step.space == "aligned"
    np.testing.assert_allclose(generate_missing(model, stack, 3, 1), (estimate + aligned) / 2, atol=1e-4)
    model.set_last_step(LastStep(1.0, "pixel"))
    morph = generate_missing(model, stack, 3, 1)
    assert not np.allclose(aligned, estimate, atol=1e-3) and not np.allclose(aligned, morph, atol=1e-3)


def test_flow_smoothing_and_shape_mix_change_the_slices_and_travel_in_the_card(motion_model_dir, small_image):
    stack = sitk.GetArrayFromImage(small_image).astype(np.float32) / 500 - 1
    model, _ = load_model(motion_model_dir)
    model.set_last_step(LastStep(0.5))
    plain = generate_missing(model, stack, 3, 1)
    model.set_motion(replace(model.motion, smooth=0.15))
    smoothed = generate_missing(model, stack, 3, 1)
    model.set_last_step(LastStep(0.5, "shape"))
    both = generate_missing(model, stack, 3, 1)
    assert not np.allclose(smoothed, plain, atol=1e-4) and not np.allclose(both, smoothed, atol=1e-4)
    rebuilt = CaLID(model.config)
    assert rebuilt.motion.smooth == 0.15 and rebuilt.last_step == LastStep(0.5, "shape")
    model.set_motion(replace(model.motion, smooth=0.0))
    model.set_last_step(LastStep(0.5, "pixel"))
    assert "smooth" not in model.config["motion"] and "morph_mix_space" not in model.config  # the old cards' form
    np.testing.assert_array_equal(generate_missing(model, stack, 3, 1), plain)
    with pytest.raises(ValueError, match="pixel"):
        LastStep(0.5, "latent")


@pytest.mark.parametrize("change", [{"morph_mix": 0.5}, {"flow_views": 2}, {"flow_smooth": 0.2},
                                    {"morph_mix": 0.5, "morph_mix_space": "shape"},
                                    {"morph_mix": 0.5, "morph_mix_space": "aligned"},
                                    {"gap_mix": "10:0.8:0.2,20:0.5:0"}, {"motion": "dis-fine"}])
def test_a_new_morph_mix_or_flow_recalibrates_an_error_head_it_does_not_retrain(dataset, tmp_path, error_head_model_dir,
                                                                                change):
    from calid.training.config import TrainConfig
    from calid.training.trainer import train

    model_dir = train(TrainConfig(data=[str(dataset)], output=str(tmp_path / "mix"), init=str(error_head_model_dir),
                                  denoiser_steps=0, val_fraction=0.25, device="cpu", **change), "none")
    mixed, card = load_model(model_dir)
    base, base_card = load_model(error_head_model_dir)
    if "morph_mix" in change:
        assert card["config"]["morph_mix"] == 0.5 and mixed.last_step.morph_mix == 0.5
        assert mixed.last_step.space == change.get("morph_mix_space", "pixel")
    elif "gap_mix" in change:
        assert card["config"]["gap_mix"] == {"gaps_mm": [10.0, 20.0], "morph": [0.8, 0.5], "linear": [0.2, 0.0]}
        assert mixed.last_step.at(15.0) == pytest.approx((0.65, 0.1))
    elif "motion" in change:
        assert card["config"]["motion"]["flow"] == "dis-fine" == mixed.motion.flow
        assert mixed.motion.views == base.motion.views  # the other flow settings are kept
    elif "flow_smooth" in change:
        assert card["config"]["motion"]["smooth"] == 0.2 and mixed.motion.smooth == 0.2
    else:
        assert card["config"]["motion"]["views"] == 2 and mixed.motion.views == 2
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in mixed.state_dict().items())  # no weight changed
    assert card["config"]["error_head"]["calibration"] != base_card["config"]["error_head"].get("calibration")


def test_fine_tuning_the_denoiser_recalibrates_the_error_head_it_carries(dataset, tmp_path, error_head_model_dir,
                                                                         capsys):
    """A site fine-tune (``--init M --denoiser-steps N``) changes the slices the map describes: the head is kept,
    its calibration refitted on the tuned model's output, and that refit (minutes) is shown as progress: the bar
    stood at 100 % with 0 s left through it."""
    from calid.training.config import TrainConfig
    from calid.training.trainer import train

    model_dir = train(TrainConfig(data=[str(dataset)], output=str(tmp_path / "tuned"), init=str(error_head_model_dir),
                                  denoiser_steps=2, val_fraction=0.25, device="cpu"), "json")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    refit = [e for e in progress if e["stage"].startswith("recalibrating the error head")]
    assert len(refit) == 3 and refit[-1]["fraction"] == 1.0  # one per training stack, the last of the run
    assert all(e["fraction"] < 1.0 for e in progress[:-1])
    tuned, card = load_model(model_dir)
    base, base_card = load_model(error_head_model_dir)
    assert not all(torch.equal(v, base.interpolator.state_dict()[k]) for k, v in tuned.interpolator.state_dict().items())
    assert all(torch.equal(v, base.error_head.state_dict()[k]) for k, v in tuned.error_head.state_dict().items())
    assert card["config"]["error_head"]["calibration"] != base_card["config"]["error_head"].get("calibration")
    assert "3 training stacks" in card["training"]["calibration_refitted_on"]  # how much the refit saw


@pytest.mark.parametrize("shape", [(8, 8), (5, 40), (1, 13)])
def test_slices_smaller_than_dis_patches_get_a_flow(shape):
    """OpenCV's DIS refuses images under 12 pixels a side; `--method morph` on such a crop was an internal error."""
    below = np.random.default_rng(0).random(shape).astype(np.float32)
    flow = pair_flow(below, np.roll(below, 1, axis=1), "dis-fine", views=8)
    assert flow.shape == (2, *shape) and np.isfinite(flow).all()
