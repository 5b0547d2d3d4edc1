"""Choosing the torch device, and describing what this machine offers (for ``calid devices``, Slicer and the
benchmarks)."""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Iterator

import torch

from .errors import CalidError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA GPU, else the CPU (MPS is only used when asked for: experimental)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CalidError(f"CUDA was requested but is not available (PyTorch {torch.__version__}: "
                             f"{'no CUDA support in this build' if torch.version.cuda is None else 'no usable GPU/driver'})")
        try:
            device = torch.device(name if ":" in name else "cuda:0")
        except RuntimeError:
            raise CalidError(f"invalid device: {name}") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CalidError(f"{name} does not exist: {torch.cuda.device_count()} CUDA device(s) found")
        return device
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CalidError("MPS was requested but is not available on this machine")
        return torch.device("mps")
    raise CalidError(f"unknown device: {name} (use auto, cpu, cuda, cuda:N or mps)")


def describe_devices() -> dict[str, Any]:
    """Torch build and every usable device, with GPU names and memory."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"device": f"cuda:{i}", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda": gpus, "mps": mps,
            "cpu_threads": torch.get_num_threads(), "software": describe_software()}


TIMED_PACKAGES = ("torch", "monai", "opencv-python-headless", "opencv-python", "numpy", "SimpleITK", "scikit-image")
"""The packages whose releases move the engine's timings: the networks, the flows, the arrays, the I/O."""


def describe_software() -> dict[str, str]:
    """Python, the machine and the installed release of each of ``TIMED_PACKAGES``: what a timing depends on
    besides the code, so that two benchmark runs can be told apart (the same code ran 30 % slower on another day;
    README, Performance)."""
    found = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    for name in TIMED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def software_line() -> str:
    """``describe_software`` as one line ("python 3.11.9, machine x86_64, 2 cores, torch ..."), as the timing
    benchmarks print it beside their times."""
    return ", ".join(f"{name} {release}" for name, release in describe_software().items())


def for_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device`` in eval mode; on the CPU with its convolution weights in channels-last layout.

    Why: oneDNN's convolutions run faster on channels-last weights (the VAE's encoding and decoding of 16 slices of
    256 x 256 on 2 threads: 0.49 -> 0.31 s and 0.95 -> 0.62 s, outputs equal within 2e-5 of a range of 2.7), and
    they are most of an upsample's network time. Saving is unaffected (weights are written contiguous). On CUDA the
    layout is left as it is: not measured here.
    """
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


@contextmanager
def inference_layout(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """``for_inference``'s layout while the block runs, the usual one after it: for a trainer that makes the model's
    own output between training stages (the error head's examples and calibration) and then trains on."""
    if device.type != "cpu":
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def autocast(device: torch.device):
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op context elsewhere."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)
