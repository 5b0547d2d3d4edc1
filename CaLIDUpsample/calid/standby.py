"""``calid standby``: a ``calid`` process that pays start-up and imports first, then waits for its command line.

Starting Python and importing PyTorch and MONAI takes seconds (4.5-4.7 s on this project's 2-core CPU machine,
17 s on a GPU machine measured earlier): about half of a CPU run on an ACDC stack, most of a GPU run. The Slicer
modules start one standby worker ahead of time (when the panel opens, and again after each run), so a click only
hands over its command line. One process serves one run and exits with that run's exit code, exactly as a cold
``calid`` process would: cancel, errors and outputs behave the same, and nothing is carried from one run to the
next.

The command line arrives as a file, not on stdin: Slicer starts Python through a launcher (``PythonSlicer``)
whose forwarding of stdin cannot be relied on everywhere. The caller writes the file under another name and
renames it (``hand_over``), so it is read whole. A standby worker nobody uses ends by itself: when its folder is
removed (the caller gave up on it) or after ``idle_minutes`` (the caller may have died).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import CalidError

READY_EVENT = {"event": "ready"}
USAGE = 'a calid standby command file holds a JSON list of calid arguments, e.g. ["upsample", "in.nrrd", "out.nrrd"]'
POLL_SECONDS = 0.05


def preload() -> None:
    """Import what every run needs (PyTorch, MONAI, SimpleITK, the engine and segmentation) before it is known,
    and start CUDA when there is a GPU (4.3 s on an H100 machine; it then holds a CUDA context while waiting)."""
    import torch

    from . import engine  # noqa: F401
    from .segmentation import inference  # noqa: F401

    if torch.cuda.is_available():
        try:  # a first convolution starts CUDA and cuDNN; a broken setup is reported by the run itself
            torch.nn.functional.conv2d(torch.zeros(1, 1, 8, 8, device="cuda"), torch.zeros(1, 1, 3, 3, device="cuda"))
            torch.cuda.synchronize()
        except RuntimeError:
            pass


def parse_command(text: str) -> list[str]:
    """The arguments (without the leading ``calid``) in a command file; a one-line error for anything else."""
    try:
        argv = json.loads(text)
    except json.JSONDecodeError:
        raise CalidError(USAGE) from None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)) or argv[0] == "standby":
        raise CalidError(USAGE)
    return argv


def hand_over(path: Path, text: str) -> None:
    """Write a command file whole: under another name first, then renamed, so ``wait_for_command`` never reads half."""
    partial = path.with_name(path.name + ".part")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def wait_for_command(path: Path, idle_minutes: float) -> list[str] | None:
    """The arguments written to ``path`` (the file is removed once read), or None when its folder is removed or
    ``idle_minutes`` pass first."""
    deadline = time.monotonic() + idle_minutes * 60
    while time.monotonic() < deadline:
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            path.unlink()
            return parse_command(text)
        if not path.parent.is_dir():
            return None
        time.sleep(POLL_SECONDS)
    return None
