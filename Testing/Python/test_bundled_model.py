"""The bundled models: present, verified, small, honest about their data; the default usable as it is.

``calid-acdc`` is trained on ACDC alone and carries the patient split; the default, ``calid-acdc-scd``, is it
fine-tuned on the Sunnybrook cines.

Its image quality is measured by ``calid evaluate`` on the validation patients (README), not here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from calid.devices import for_inference
from calid.engine import UpsampleOptions, upsample_image
from calid.modelindex import ACDC_MODEL, BUNDLED_DIR, CARD_FILE, DEFAULT_MODEL, WEIGHTS_FILE, list_models
from calid.modelstore import load_model, save_model
from calid.pipeline_settings import PRODUCT_MORPH
from conftest import is_channels_last

ACDC = BUNDLED_DIR / ACDC_MODEL


def test_bundled_model_is_the_default_and_is_listed():
    model, card = load_model(None)  # verifies the SHA256 of the weights against the card
    assert card["name"] == DEFAULT_MODEL
    assert any(m["name"] == DEFAULT_MODEL and m["source"] == "bundled" for m in list_models())
    assert model.diffusion_target == "residual" and 0.05 < float(model.residual_scale) < 5


@pytest.mark.parametrize("name", [ACDC_MODEL, DEFAULT_MODEL])
def test_bundled_weights_are_small_fp16_safetensors(name):
    folder = BUNDLED_DIR / name
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 50 * 2**20
    card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    assert card["weights_dtype"] == "float16"
    header_length = int.from_bytes((folder / WEIGHTS_FILE).read_bytes()[:8], "little")
    assert header_length < 10**6  # a safetensors header length, not a pickle or zip signature


@pytest.mark.parametrize("name", [ACDC_MODEL, DEFAULT_MODEL])
def test_bundled_models_build_on_the_morph_the_user_can_compare_with(name):
    card = json.loads((BUNDLED_DIR / name / CARD_FILE).read_text(encoding="utf-8"))
    assert card["config"]["motion"] == PRODUCT_MORPH.to_config()  # ``--method morph``: the morph it starts from
    assert card["config"]["error_head"]["calibration"], "an error head recalibrated on this flow's output"


def test_model_card_states_acdc_provenance_terms_and_split():
    card = json.loads((ACDC / CARD_FILE).read_text(encoding="utf-8"))
    training = card["training"]
    assert "non-commercial" in training["terms"]
    assert "Bernard" in training["citation"] and "2018" in training["citation"]
    split = training["split"]
    assert len(split["validation"]) >= 15 and not set(split["validation"]) & set(split["train"])
    thin = {"patient035", "patient075", "patient081", "patient082", "patient084", "patient085", "patient088",
            "patient092", "patient094", "patient095", "patient096", "patient099"}
    assert len(thin & set(split["validation"])) >= 3
    assert card["metrics"], "the card carries its validation figures"


def test_bundled_model_upsamples_the_sample_keeping_acquired_slices(sample_image):
    torch.set_num_threads(2)
    image = sample_image[40:104, 40:104, :]
    result = upsample_image(image, UpsampleOptions(factor=2, device="cpu"))
    dense = sitk.GetArrayFromImage(result.image)
    assert np.array_equal(dense[::2], sitk.GetArrayFromImage(image))
    new = dense[1::2].astype(np.float64)
    low, high = np.percentile(sitk.GetArrayFromImage(image), [1, 99])
    assert low - 1 <= new.mean() <= high + 1 and new.std() > 0


def test_a_model_made_ready_for_the_cpu_gives_the_same_slices_and_saves_the_same_weights(tmp_path):
    model, card = load_model(DEFAULT_MODEL, "cpu")
    slices = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32))
    with torch.no_grad():
        before = model.decode(model.encode(slices))
        ready = for_inference(model, torch.device("cpu"))
        assert is_channels_last(ready)
        torch.testing.assert_close(ready.decode(ready.encode(slices)), before, atol=1e-4, rtol=0)
    saved = save_model(ready, tmp_path / "again", card)
    assert json.loads((saved / CARD_FILE).read_text())["sha256"] == card["sha256"]


def test_bundled_segmentation_model_shares_the_split_and_states_its_terms():
    from calid.modelindex import DEFAULT_SEGMENTATION_MODEL

    segmentation = json.loads((BUNDLED_DIR / DEFAULT_SEGMENTATION_MODEL / CARD_FILE).read_text(encoding="utf-8"))
    interpolation = json.loads((ACDC / CARD_FILE).read_text(encoding="utf-8"))
    assert segmentation["training"]["split"] == interpolation["training"]["split"]  # no validation patient trained on
    assert "non-commercial" in segmentation["training"]["terms"] and "Bernard" in segmentation["training"]["citation"]
    assert segmentation["weights_dtype"] == "float16" and segmentation["metrics"]
    everything = sum(p.stat().st_size for p in BUNDLED_DIR.rglob("*") if p.is_file())
    assert everything < 50 * 2**20


def test_default_model_states_both_datasets_its_base_and_both_validations():
    """``calid-acdc-scd``: ``calid-acdc`` fine-tuned on the 5 Sunnybrook cines. Its quality on unseen cines is the
    leave-one-patient-out figure of the same recipe; on ACDC it is scored on its base's validation patients (which
    neither model trained on). Both are stored in its card."""
    _, card = load_model(DEFAULT_MODEL)  # verifies its weights' SHA256
    assert DEFAULT_MODEL == "calid-acdc-scd"
    base = json.loads((ACDC / CARD_FILE).read_text(encoding="utf-8"))
    training = card["training"]
    assert training["base_model"] == ACDC_MODEL and training["base_model_sha256"] == base["sha256"]
    assert "CC0" in training["terms"] and "non-commercial" in training["terms"]
    assert "Radau" in training["citation"] and "Bernard" in training["citation"]
    assert sorted(training["split"]["train"]) == [f"SCD0000{i}01" for i in range(1, 6)]
    def network(config: dict) -> dict:  # the error head's calibration is fitted on each model's own output
        return {**config, "error_head": {k: v for k, v in config["error_head"].items() if k != "calibration"}}

    assert card["weights_dtype"] == "float16" and network(card["config"]) == network(base["config"])  # one step
    assert card["config"]["error_head"]["calibration"] != base["config"]["error_head"]["calibration"]
    held_out = card["metrics"]["leave_one_patient_out"]
    assert held_out["calid_psnr"] > held_out["linear_psnr"]
    acdc = {(r["factor"], r["gap_mm"]): r for r in card["metrics"]["acdc_validation"]["default_steps_1"]}
    base_acdc = {(r["factor"], r["gap_mm"]): r for r in base["metrics"]["calid_evaluate"]["default_steps_1"]}
    assert acdc.keys() == base_acdc.keys() and all(r["calid_psnr"] > r["linear_psnr"] for r in acdc.values())
