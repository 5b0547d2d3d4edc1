"""Qt-free logic of the CaLID modules: importable with only ``slicer-core`` (no Slicer application).

``CaLIDUpsample.py`` and ``CaLIDTraining.py`` keep the Qt panels and re-export their logic from here; both
logics run ``calid`` in a background process through ``WorkerLogic``.
"""

from .background import WorkerError, WorkerLogic
from .logic import CaLIDUpsampleLogic
from .protocol import WorkerEvent, parse_line
from .training_logic import CaLIDTrainingLogic
from .worker import WorkerProcess

__all__ = ["CaLIDTrainingLogic", "CaLIDUpsampleLogic", "WorkerError", "WorkerEvent", "WorkerLogic", "WorkerProcess",
           "parse_line"]
