"""The Slicer versions CaLID supports, checked before anything that needs them is imported.

CaLID supports 3D Slicer 5.10 and later. 5.10 is the first release with Python 3.12 (5.8 ships Python 3.9,
older than the engine's 3.10, whose syntax it uses), and with ``vtkSegment.SetTerminology``. The test suite
runs the engine and the logic on Python 3.11, so an older Slicer is refused at module load with one line
rather than failing somewhere in a run. This file is kept parseable by any Python 3, since it runs first.
"""

from __future__ import annotations

import sys

MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 10)


def unsupported_reason(slicer_version=None, python_version=None):
    """One line saying why this Slicer (``(major, minor)``, None when unknown) or Python cannot run CaLID, or None."""
    python_version = tuple(python_version or sys.version_info[:2])
    needed = "CaLID needs 3D Slicer {}.{} or later".format(*MINIMUM_SLICER)
    if slicer_version is not None and tuple(slicer_version)[:2] < MINIMUM_SLICER:
        return "{}: this is Slicer {}.{}. Install a newer Slicer from download.slicer.org.".format(needed, *slicer_version)
    if python_version < MINIMUM_PYTHON:
        return "{} (Python {}.{}+): this Slicer's Python is {}.{}.".format(needed, *MINIMUM_PYTHON, *python_version)
    return None


def require_supported(slicer_version=None) -> None:
    """Raise ImportError with ``unsupported_reason`` as its one-line message."""
    reason = unsupported_reason(slicer_version)
    if reason:
        raise ImportError(reason)
