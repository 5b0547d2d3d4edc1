"""Qt-free logic of the CaLIDUpsample module: importable with only ``slicer-core`` (no Slicer application).

The module file ``CaLIDUpsample.py`` keeps the Qt panel and re-exports ``CaLIDUpsampleLogic`` from here.
"""

from .logic import CaLIDUpsampleLogic, WorkerError
from .protocol import WorkerEvent, parse_line
from .worker import WorkerProcess

__all__ = ["CaLIDUpsampleLogic", "WorkerError", "WorkerEvent", "WorkerProcess", "parse_line"]
