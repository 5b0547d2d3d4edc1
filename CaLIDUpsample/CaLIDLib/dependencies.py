"""Installing what the worker needs into Slicer's Python, on first use and with confirmation.

PyTorch comes from the PyTorch extension (``PyTorchUtils`` picks the build that matches the GPU driver);
the rest from ``Resources/requirements.txt`` with ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or
``slicer.util.pip_install``. Never called at module load: only when the user clicks Upsample.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.1"
IMPORT_NAMES = {"scikit-image": "skimage"}
"""Distribution name -> import name, where they differ."""


def requirement_lines() -> list[str]:
    return [line.strip() for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]


def missing_requirements() -> list[str]:
    """Requirements whose package cannot be found, checked without importing anything."""
    missing = []
    for line in requirement_lines():
        name = line.split(">")[0].split("=")[0].split("<")[0].strip()
        if importlib.util.find_spec(IMPORT_NAMES.get(name, name).replace("-", "_")) is None:
            missing.append(line)
    return missing


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """True when torch and the requirements are importable (installing them if the user agrees)."""
    import slicer

    if importlib.util.find_spec("torch") is None:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay("CaLID needs the PyTorch extension: install it from the Extension Manager and restart.")
            return False
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                               torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            return False
    missing = missing_requirements()
    if not missing:
        return True
    if hasattr(slicer, "packaging"):
        slicer.packaging.pip_ensure(slicer.packaging.load_requirements(str(REQUIREMENTS)), skip_packages=["torch", "SimpleITK"],
                                    requester="CaLID")
    else:
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                "CaLID will install these Python packages: " + ", ".join(missing)):
            return False
        slicer.util.pip_install(missing)
    return not missing_requirements()
