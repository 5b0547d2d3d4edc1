"""What the benchmark scripts' command lines share: their data and model, found or refused in one line.

A benchmark given a wrong ``--data`` or ``--model`` ends with its parser's one-line error and exit status 2, as the
``calid`` commands do, not with a traceback from deep in a run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from calid.errors import CalidError
from calid.modelstore import load_model


def sunnybrook_cines(parser: argparse.ArgumentParser, folder: Path) -> list[Path]:
    """The Sunnybrook cines in ``folder`` (the Sunnybrook benchmarks' ``--data``), or the command's error when there
    are none."""
    cases = sorted(folder.glob("SCD*_sa_cine.nii.gz"))
    if not cases:
        parser.error(f"no SCD*_sa_cine.nii.gz in {folder}")
    return cases


def model_or_error(parser: argparse.ArgumentParser, name: str | Path) -> tuple[torch.nn.Module, dict]:
    """The model ``name`` on the CPU and its card, or the command's error when it cannot be loaded."""
    try:
        return load_model(name, torch.device("cpu"))
    except CalidError as error:
        parser.error(str(error))
