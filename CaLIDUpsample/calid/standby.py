"""``calid standby``: a ``calid`` process that pays start-up and imports first, then waits for its command line.

Starting Python and importing PyTorch and MONAI takes seconds (4.1-4.4 s on this project's 2-core CPU machine,
17 s on a GPU machine measured earlier): about half of a CPU run on an ACDC stack, most of a GPU run. The Slicer modules start one standby worker
ahead of time (when the panel opens, and again after each run), so a click only sends its command line. One
process serves one run and exits with that run's exit code, exactly as a cold ``calid`` process would: cancel,
errors and outputs behave the same, and nothing is carried from one run to the next.
"""

from __future__ import annotations

import json
from typing import TextIO

from .errors import CalidError

READY_EVENT = {"event": "ready"}
USAGE = 'calid standby reads one line: a JSON list of calid arguments, e.g. ["upsample", "in.nrrd", "out.nrrd"]'


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


def read_command(stream: TextIO) -> list[str] | None:
    """The arguments of the run (without the leading ``calid``), or None when the caller closed the stream first."""
    line = stream.readline()
    if not line.strip():
        return None
    try:
        argv = json.loads(line)
    except json.JSONDecodeError:
        raise CalidError(USAGE) from None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)) or argv[0] == "standby":
        raise CalidError(USAGE)
    return argv
