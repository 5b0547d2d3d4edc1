"""Installing what the worker needs into Slicer's Python: on first use, after one confirmation saying what and how big.

PyTorch comes from the PyTorch extension (``PyTorchUtils`` picks the build that matches the GPU driver: CUDA, or
CPU without an NVIDIA GPU); the rest from ``Resources/requirements.txt`` with ``slicer.packaging.pip_ensure``
(Slicer >= 5.12) or ``slicer.util.pip_install``. Never called at module load: only when the user clicks Upsample
or Start. ``install_summary`` is what the panels show before the first run.

``PyTorchUtilsLogic.installTorch`` imports torch into Slicer's process once it has installed it (it returns the
module): that is the only time torch enters Slicer. CaLID itself never imports it there (devices are listed by
a ``calid devices`` worker), so a later PyTorch reinstall is not blocked by files Slicer holds open.

Every failure (no PyTorch extension, pip failing offline or behind a proxy, a full disk) becomes an
``InstallError`` whose message is one line for the panel; pip's own output stays in the Python console.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
import tempfile
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.1"
IMPORT_NAMES = {"scikit-image": "skimage", "opencv-python-headless": "cv2"}
"""Distribution name -> import name, where they differ."""
DISK_MB = {"monai": 16, "einops": 1, "safetensors": 2, "scikit-image": 32, "scipy": 113, "tqdm": 1,
           "matplotlib": 35, "psutil": 1, "opencv-python-headless": 153}
"""Size on disk once installed, MB: measured in the project's Linux environment (Python 3.11; downloads are about
a third of it). ``Testing/Python/test_dependencies.py`` checks that every requirement has one."""
TORCH_SIZE = ("a CUDA build with an NVIDIA GPU (about 3 GB to download, 5-7 GB on disk), else the CPU build "
              "(about 0.2 GB, 0.8 GB on disk)")
"""The CPU figures measured (torch 2.13 on Linux); the CUDA ones estimated from the sizes of its wheels."""
OFFLINE_HINT = "Offline or behind a proxy: see Troubleshooting in the CaLID README."
KEPT_AS_INSTALLED = ("torch", "numpy", "SimpleITK", "pillow")
"""Pinned at their installed versions while the requirements install: the build of torch the PyTorch extension
chose (CUDA or CPU), and Slicer's own numpy, SimpleITK and Pillow. Unpinned, pip could replace any of them while
resolving a requirement: with an older torch (an older NVIDIA driver, an Intel Mac) the MONAI that fits needs
numpy < 2, below Slicer 5.10's 2.0.2. Pinned, such an install fails in one line instead."""


class InstallError(RuntimeError):
    """What CaLID needs could not be installed; the message is one line for the user."""


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].strip()


def requirement_lines() -> list[str]:
    lines = REQUIREMENTS.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def missing_requirements() -> list[str]:
    """Requirements not met, checked without importing them: a distribution installed at a version the line does
    not allow (an older MONAI another extension installed), or none installed and its module not found either (a
    module another distribution provides, such as ``cv2`` from ``opencv-python``, counts as there)."""
    return [line for line in requirement_lines() if not _requirement_met(line)]


def _requirement_met(line: str) -> bool:
    """Its distribution installed at an allowed version, or, with none installed, its module found."""
    name = requirement_name(line)
    try:
        return _version_allowed(line, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(IMPORT_NAMES.get(name, name).replace("-", "_")) is not None


def _version_allowed(line: str, version: str) -> bool:
    """Whether ``version`` meets the requirement ``line``; True where ``packaging`` (bundled with Slicer) cannot say."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.version import InvalidVersion

        return Requirement(line).specifier.contains(version, prereleases=True)
    except (ImportError, InvalidRequirement, InvalidVersion):
        return True


def torch_missing() -> bool:
    """No torch, or one older than ``TORCH_REQUIREMENT`` (the PyTorch extension then installs a newer one)."""
    return not _requirement_met(f"torch{TORCH_REQUIREMENT}")


def install_summary() -> str | None:
    """What the first run will install and how big it is, or None when everything is there."""
    parts = []
    if torch_missing():
        parts.append(f"PyTorch: {TORCH_SIZE}")
    missing = [requirement_name(line) for line in missing_requirements()]
    if missing:
        parts.append(f"{', '.join(missing)} (about {sum(DISK_MB.get(name, 0) for name in missing)} MB on disk)")
    if not parts:
        return None
    return f"The first run installs {'; '.join(parts)}. It needs internet access and takes minutes. {OFFLINE_HINT}"


def self_test_skip_reason() -> str | None:
    """Why the modules' self-tests cannot run here, or None. They run the engine (PyTorch, MONAI); the extension
    build machines, where ``slicer_add_python_unittest`` registers them as ctests, have neither and must not
    install anything, so there the tests are skipped with this reason (a skip counts as a pass)."""
    if install_summary() is None:
        return None
    return ("CaLID self-test skipped: PyTorch and CaLID's Python packages are not installed here (CaLID installs "
            "them on first use; extension build machines have none).")


def _failure(what: str, exc: Exception) -> InstallError:
    if isinstance(exc, subprocess.CalledProcessError):
        reason = f"pip exit code {exc.returncode}; pip's messages are in the Python console"
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return InstallError(f"Installing {what} failed ({reason}). {OFFLINE_HINT}")


def _install_torch() -> bool:
    try:
        import PyTorchUtils
    except ImportError:
        raise InstallError("CaLID needs the PyTorch extension: install it from the Extension Manager, restart "
                           "Slicer and try again.") from None
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=TORCH_REQUIREMENT)
    except Exception as exc:
        raise _failure("PyTorch", exc) from exc
    return torch is not None


def _slicer_installer():
    """Slicer's requirement installer module (``pip_ensure``): ``slicer.packaging`` (Slicer >= 5.12),
    ``slicer.pydeps`` (its name in 5.11), or None before them (``slicer.util.pip_install``). ``slicer`` does not
    import either by itself, and some versions' ``slicer.packaging`` is another module without ``pip_ensure``."""
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module
    return None


def _constraints(folder: Path) -> Path | None:
    """A pip constraints file pinning ``KEPT_AS_INSTALLED`` at their installed versions (those installed), or None.
    pip then resolves every requirement against them: it picks a MONAI that fits the installed torch and numpy, or
    fails, and replaces none of them."""
    pins = []
    for name in KEPT_AS_INSTALLED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    if not pins:
        return None
    path = folder / "calid-constraints.txt"
    path.write_text("".join(f"{pin}\n" for pin in pins), encoding="utf-8")
    return path


def _install_requirements(missing: list[str]) -> None:
    """Only the ``missing`` lines, with the constraints, in one resolution by pip (Slicer >= 5.12 with its
    ``pip_ensure``; its ``skip_packages`` is not used: it installs each package without its dependencies, so MONAI
    was never resolved against the installed torch, and a failed sub-dependency went unnoticed)."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            constraint = _constraints(Path(folder))
            installer = _slicer_installer()
            if installer is None:
                import slicer.util

                slicer.util.pip_install(missing + (["-c", str(constraint)] if constraint else []))
            else:
                from packaging.requirements import Requirement

                installer.pip_ensure([Requirement(line) for line in missing], constraints=constraint,
                                     prompt_install=False, requester="CaLID")
    except Exception as exc:
        raise _failure(", ".join(requirement_name(line) for line in missing), exc) from exc


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """True when torch and the requirements are importable, installing them if needed (after one confirmation
    listing them and their sizes); False when the user declines. Raises ``InstallError`` (one line) on failure."""
    summary = install_summary()
    if summary is None:
        return True
    if askConfirmation:
        import slicer.util

        if not slicer.util.confirmOkCancelDisplay(summary + "\n\nInstall now?", "CaLID"):
            return False
    if torch_missing() and not _install_torch():
        return False
    missing = missing_requirements()
    if missing:
        _install_requirements(missing)
    still = [requirement_name(line) for line in missing_requirements()] + (["torch"] if torch_missing() else [])
    if still:
        raise InstallError(f"{', '.join(still)} cannot be found after installing: restart Slicer and try again.")
    return True
