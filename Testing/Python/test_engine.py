"""Engine behaviour: determinism, sample averaging, batching, CaLID+, intensity mapping (uncertainty: test_uncertainty)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from calid import CalidError, UpsampleOptions, upsample_image
from calid.intensity import IntensityMap
from calid.modelstore import save_model
from calid.networks import TINY_CONFIG, CaLID
from calid.sampling import max_sampling_steps


def run(image, model, **kw):
    return upsample_image(image, UpsampleOptions(**{"factor": 2, "steps": 2, "model": str(model), "device": "cpu", **kw}))


def array(img):
    return sitk.GetArrayFromImage(img)


def test_same_seed_same_output_other_seed_other_output(small_image, tiny_model_dir):
    a = array(run(small_image, tiny_model_dir, seed=3).image)
    b = array(run(small_image, tiny_model_dir, seed=3).image)
    c = array(run(small_image, tiny_model_dir, seed=4).image)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[1::2], c[1::2])
    assert np.array_equal(a[::2], c[::2])  # acquired slices never depend on the seed


def test_batch_size_does_not_change_the_result(small_image, tiny_model_dir):
    a = array(run(small_image, tiny_model_dir, batch_size=1).image).astype(float)
    b = array(run(small_image, tiny_model_dir, batch_size=16).image).astype(float)
    assert np.abs(a - b).max() <= 1  # int16 rounding of float noise at most


def test_mean_of_samples_is_what_is_written(small_image, tiny_model_dir):
    one = array(run(small_image, tiny_model_dir, samples=1).image).astype(float)
    three = array(run(small_image, tiny_model_dir, samples=3).image).astype(float)
    assert not np.array_equal(one[1::2], three[1::2])


@pytest.fixture(scope="module")
def latent_target_model_dir(tmp_path_factory):
    """CaLID+ works on models that diffuse the latent itself (the paper's formulation)."""
    torch.manual_seed(0)
    model = CaLID({**TINY_CONFIG, "diffusion_target": "latent"})
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny-latent", {"name": "tiny-latent"})


def test_calid_plus_runs_and_is_deterministic(small_image, latent_target_model_dir):
    a = array(run(small_image, latent_target_model_dir, plus=True).image)
    b = array(run(small_image, latent_target_model_dir, plus=True, seed=9).image)
    assert np.array_equal(a, b)  # starts from inverted latents: no noise involved


def test_plus_is_refused_for_residual_models(small_image, tiny_model_dir):
    with pytest.raises(CalidError, match="--plus"):
        run(small_image, tiny_model_dir, plus=True)


def test_plus_with_several_samples_is_refused(small_image, tiny_model_dir):
    with pytest.raises(CalidError, match="--plus"):
        run(small_image, tiny_model_dir, plus=True, samples=2)


def test_float_input_keeps_float_type_and_scale(small_image, tiny_model_dir):
    scaled = sitk.Cast(small_image, sitk.sitkFloat32) * 0.001
    out = run(scaled, tiny_model_dir).image
    assert out.GetPixelID() == sitk.sitkFloat32
    values = array(out)
    assert abs(np.percentile(values, 99) - np.percentile(array(scaled), 99)) < 0.5


def test_intensity_map_inverts():
    values = np.random.default_rng(0).gamma(2.0, 100.0, size=(4, 16, 16))
    m = IntensityMap.fit(values)
    np.testing.assert_allclose(m.from_network(m.to_network(values)), values, rtol=1e-5, atol=1e-3)
    assert -1.05 < np.percentile(m.to_network(values), 0.5) < -0.95


def test_residual_target_is_relative_to_latent_linear_interpolation():
    torch.manual_seed(0)
    model = CaLID(TINY_CONFIG)
    model.residual_scale.fill_(0.5)
    below, above = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    alpha = torch.tensor([0.25, 0.5, 0.75])
    linear = model.linear_latent(below, above, alpha)
    assert torch.allclose(linear[1], (below[1] + above[1]) / 2)
    assert torch.allclose(model.to_diffusion(linear, below, above, alpha), torch.zeros_like(linear))
    target = torch.randn(3, 4, 8, 8)
    assert torch.allclose(model.from_diffusion(model.to_diffusion(target, below, above, alpha), below, above, alpha), target,
                          atol=1e-6)


def test_sampling_steps_stay_on_the_trained_timesteps():
    diffusion = {"num_train_timesteps": 1000}
    assert max_sampling_steps(diffusion) == 1000
    assert max_sampling_steps({**diffusion, "min_timestep": 750}) == 1
    assert max_sampling_steps({**diffusion, "min_timestep": 499}) == 2  # grid 999, 499
    assert max_sampling_steps({**diffusion, "min_timestep": 200}) == 4  # grid 999, 749, 499, 249


def test_saved_model_folder_follows_the_umask_not_private(tiny_model_dir):
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(tiny_model_dir.stat().st_mode) == 0o777 & ~umask
    for path in tiny_model_dir.iterdir():  # safetensors alone writes 0600: unreadable from a shared models folder
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
