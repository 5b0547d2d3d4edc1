"""Qt-free logic of the CaLID modules: importable with only ``slicer-core`` (no Slicer application).

``CaLIDUpsample.py`` and ``CaLIDTraining.py`` keep the Qt panels and re-export their logic from here; both
logics run ``calid`` in a background process through ``WorkerLogic``.

Importing it refuses a Python older than the engine's (Slicer before 5.10) in one line (``support``), before
the modules that would fail on it are imported.
"""

from .support import require_supported

require_supported()

from .background import WorkerError, WorkerLogic  # noqa: E402 (after the version check)
from .logic import CaLIDUpsampleLogic
from .protocol import WorkerEvent, parse_line
from .training_logic import CaLIDTrainingLogic
from .worker import WorkerProcess

__all__ = ["CaLIDTrainingLogic", "CaLIDUpsampleLogic", "WorkerError", "WorkerEvent", "WorkerLogic", "WorkerProcess",
           "parse_line"]
