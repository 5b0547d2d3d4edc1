"""Shared fixtures: the real bundled sample (Sunnybrook crop, oblique geometry) and a tiny random model.

The tiny model is a real CaLID model directory (safetensors + card) with random weights: tests check the
pipeline's behaviour (geometry, determinism, errors), not image quality, which ``calid evaluate`` measures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CaLIDUpsample"))  # the calid engine and CaLIDLib

from calid.imageio import write_image  # noqa: E402
from calid.modelstore import save_model  # noqa: E402
from calid.networks import TINY_CONFIG, CaLID  # noqa: E402
from calid.pipeline_settings import MotionSettings  # noqa: E402

SAMPLE = REPO / "CaLIDUpsample" / "Resources" / "SampleData" / "CaLIDSample_SCD0000101_phase07.nrrd"
SAMPLE_LABELS = REPO / "Testing" / "Data" / "CaLIDSample_SCD0000101_phase07_contours.nrrd"
"""The Sunnybrook experts' contours of the sample, in their convention (1: LV blood pool; calid's 3), so test data
only: the extension does not ship it, where a user would read its 1 as calid's right ventricle."""


def is_channels_last(module: torch.nn.Module) -> bool:
    """Whether a model's convolution weights are in channels-last layout, judged on its first convolution whose
    two layouts differ (several input channels, a kernel wider than 1 x 1)."""
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1
                and m.kernel_size != (1, 1))
    return conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CaLID(TINY_CONFIG)
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny", {"name": "tiny", "description": "random test model"})


@pytest.fixture(scope="session")
def error_head_model_dir(tmp_path_factory) -> Path:
    """A tiny random motion-aware model with an (untrained) error head: the calibrated uncertainty map's plumbing."""
    torch.manual_seed(0)
    model = CaLID(TINY_CONFIG)
    model.set_motion(MotionSettings("dis"))
    model.add_error_head()
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny-error-head", {"name": "tiny-error-head"})


@pytest.fixture(scope="session")
def sample_image() -> sitk.Image:
    return sitk.ReadImage(str(SAMPLE))


@pytest.fixture
def small_image(sample_image) -> sitk.Image:
    """The real sample cut to 64x64 in-plane and 6 slices (fast), keeping its oblique geometry."""
    return sample_image[32:96, 24:88, 3:9]


@pytest.fixture(autouse=True)
def _isolated_user_models(tmp_path, monkeypatch):
    monkeypatch.setenv("CALID_MODELS_DIR", str(tmp_path / "user-models"))
    monkeypatch.setenv("PYTHONPATH", str(REPO / "CaLIDUpsample") + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def dataset(tmp_path, sample_image) -> Path:
    """Four 'patients' made from the real sample (flips, slice subsets), ACDC-like folders with labels."""
    root = tmp_path / "data"
    variants = [sample_image, sitk.Flip(sample_image, [True, False, False]),
                sitk.Flip(sample_image, [False, True, False]), sample_image[:, :, 1:]]
    for i, image in enumerate(variants):
        folder = root / f"patient{i:03d}"
        folder.mkdir(parents=True)
        write_image(image[16:112, 16:112, :], folder / f"patient{i:03d}_frame01.nii.gz")
        write_image(sitk.Cast(image[16:112, 16:112, :] > 300, sitk.sitkUInt8), folder / f"patient{i:03d}_frame01_gt.nii.gz")
    return root


@pytest.fixture
def python_launcher(tmp_path) -> str:
    """An executable ``PythonSlicer`` that runs ``launcher_standin.py`` (a stand-in for CTKAppLauncher) in its own
    process, so the worker is a launcher with the real Python below it, as in Slicer."""
    if os.name == "nt":
        pytest.skip("the launcher stand-in is a POSIX script; kill_tree's test covers the Windows way")
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).with_name("launcher_standin.py")}" "$@"\n')
    launcher.chmod(0o755)
    return str(launcher)
