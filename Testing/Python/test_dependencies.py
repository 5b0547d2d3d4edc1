"""First-run installation (``CaLIDLib.dependencies``): what it says before, which Slicer API it uses, and that a
failed install (offline) ends in one clear line, not a pip traceback.

``slicer.packaging``, ``PyTorchUtils`` and Slicer's pip runner cannot exist here (slicer-core has no
``packaging``): where a test needs them, it writes a stand-in named as such. pip itself is real.
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from CaLIDLib import dependencies
from CaLIDLib.dependencies import DISK_MB, InstallError, ensureDependencies, install_summary, requirement_name

MISSING = "calid-test-not-installed>=1"


@pytest.fixture
def requirements(tmp_path, monkeypatch):
    """A requirements file with one package that is not installed (besides one that is)."""
    path = tmp_path / "requirements.txt"
    path.write_text(f"# comment\nnumpy>=1\n{MISSING}\n", encoding="utf-8")
    monkeypatch.setattr(dependencies, "REQUIREMENTS", path)
    monkeypatch.setitem(DISK_MB, "calid-test-not-installed", 7)
    return path


def test_every_requirement_has_a_size_and_opencv_is_installed_on_first_run():
    names = [requirement_name(line) for line in dependencies.requirement_lines()]
    assert "opencv-python-headless" in names and "monai" in names
    assert set(names) <= set(DISK_MB), "a requirement without its size in DISK_MB"


def test_summary_names_what_is_missing_with_sizes_and_what_to_do_offline(requirements, monkeypatch):
    monkeypatch.setattr(dependencies, "torch_missing", lambda: True)
    text = install_summary()
    assert "PyTorch: a CUDA build with an NVIDIA GPU" in text and "CPU build" in text
    assert "calid-test-not-installed (about 7 MB on disk)" in text and "numpy" not in text
    assert "internet" in text and "Troubleshooting" in text
    requirements.write_text("numpy>=1\n", encoding="utf-8")
    monkeypatch.setattr(dependencies, "torch_missing", lambda: False)
    assert install_summary() is None


def test_an_installed_version_the_requirement_does_not_allow_counts_as_missing(tmp_path, monkeypatch):
    """Only the module was looked for: an older MONAI another extension installed passed, and the worker failed
    inside its run. A module another distribution provides (``cv2`` from ``opencv-python``) still counts."""
    path = tmp_path / "requirements.txt"
    path.write_text("numpy>=1\nnumpy>=999\nprovided-elsewhere>=1\n", encoding="utf-8")
    monkeypatch.setattr(dependencies, "REQUIREMENTS", path)
    monkeypatch.setitem(dependencies.IMPORT_NAMES, "provided-elsewhere", "json")
    assert dependencies.missing_requirements() == ["numpy>=999"]
    assert not dependencies.torch_missing()
    monkeypatch.setattr(dependencies, "TORCH_REQUIREMENT", ">=999")  # the PyTorch extension installs a newer one
    assert dependencies.torch_missing()


@pytest.fixture
def own_slicer_modules():
    """Put back the ``slicer`` modules of the session (or none) after a test that imports stand-ins."""
    saved = {name: module for name, module in sys.modules.items() if name == "slicer" or name.startswith("slicer.")}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [n for n in sys.modules if n == "slicer" or n.startswith("slicer.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def slicer_stand_in(tmp_path, monkeypatch, installer: str, other: str | None = None) -> None:
    """A stand-in ``slicer`` package whose module ``installer`` records its ``pip_ensure`` calls and installs by
    writing the missing module, beside an ``other`` module without ``pip_ensure``."""
    package = tmp_path / "stand-in" / "slicer"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Stand-in for a freshly imported slicer package."""\n')
    if other:
        (package / f"{other}.py").write_text(f'"""Stand-in for a slicer.{other} without pip_ensure."""\n')
    (package / f"{installer}.py").write_text(
        f'"""Stand-in for slicer.{installer}: records the call, installs by writing the module."""\n'
        "import pathlib\ncalls = []\n"
        "def load_requirements(path):\n    return pathlib.Path(path).read_text().split()\n"
        "def pip_ensure(requirements, **options):\n"
        "    pinned = pathlib.Path(options['constraints']).read_text() if options.get('constraints') else ''\n"
        "    calls.append(([str(r) for r in requirements], options, pinned))\n"
        f"    pathlib.Path({str(tmp_path / 'site')!r}, 'calid_test_not_installed.py').write_text('')\n")
    (tmp_path / "site").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(package.parent))


def test_a_fresh_slicer_module_still_uses_slicer_packaging(requirements, tmp_path, monkeypatch, own_slicer_modules):
    """``slicer/__init__.py`` does not import ``slicer.packaging`` (Slicer >= 5.12): the attribute appears only once
    imported."""
    slicer_stand_in(tmp_path, monkeypatch, "packaging")
    import slicer

    assert not hasattr(slicer, "packaging")
    assert ensureDependencies(askConfirmation=False)
    (requested, options, pinned), = sys.modules["slicer.packaging"].calls
    assert requested == [MISSING] and "skip_packages" not in options  # one resolution, of what is missing only
    assert options["prompt_install"] is False  # CaLID's own confirmation, with the sizes, came first
    assert pinned == installed_pins()


def test_slicer_5_11_installer_is_found_under_its_first_name(requirements, tmp_path, monkeypatch,
                                                               own_slicer_modules):
    """Slicer 5.11 named the module ``slicer.pydeps``; a ``slicer.packaging`` without ``pip_ensure`` (another
    module of that name in some versions) is not it."""
    slicer_stand_in(tmp_path, monkeypatch, "pydeps", other="packaging")
    assert ensureDependencies(askConfirmation=False)
    (requested, options, pinned), = sys.modules["slicer.pydeps"].calls
    assert requested == [MISSING] and "skip_packages" not in options and pinned == installed_pins()


def installed_pins() -> str:
    """The constraints every install passes: torch and Slicer's own numpy, SimpleITK and Pillow as installed."""
    import importlib.metadata

    pins = []
    for name in ("torch", "numpy", "SimpleITK", "pillow"):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}\n")
        except importlib.metadata.PackageNotFoundError:
            pass
    return "".join(pins)


def test_an_older_slicer_installs_with_torch_and_slicers_packages_pinned(requirements, monkeypatch):
    """Unpinned, pip would upgrade the PyTorch extension's torch for the newest MONAI, or, with an older torch,
    downgrade Slicer's numpy for the MONAI that fits it."""
    util = pytest.importorskip("slicer.util", reason="slicer-core is not installed")
    import importlib.metadata

    seen = []

    def record(arguments, **options):
        """Stand-in for Slicer's ``slicer.util.pip_install``: reads the constraints file it is given."""
        constraint = arguments[arguments.index("-c") + 1]
        seen.append((arguments, open(constraint, encoding="utf-8").read()))

    monkeypatch.setattr(dependencies, "_slicer_installer", lambda: None)
    monkeypatch.setattr(util, "pip_install", record, raising=False)
    with pytest.raises(InstallError, match="cannot be found after installing"):  # the stand-in installs nothing
        ensureDependencies(askConfirmation=False)
    (arguments, constraint), = seen
    assert MISSING in arguments and constraint == installed_pins()
    assert constraint.startswith(f"torch=={importlib.metadata.version('torch')}\nnumpy==")


def offline_pip(requirements, **options):
    """Stand-in for Slicer's ``slicer.util.pip_install`` (slicer-core cannot run it): real pip, with no index
    to reach, as offline; a failure raises CalledProcessError, as Slicer's does."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", "--quiet",
                    *requirements], check=True, capture_output=True)


def test_offline_install_ends_in_one_clear_line(requirements, monkeypatch):
    util = pytest.importorskip("slicer.util", reason="slicer-core is not installed")
    monkeypatch.setattr(util, "pip_install", offline_pip, raising=False)
    with pytest.raises(InstallError) as error:
        ensureDependencies(askConfirmation=False)
    message = str(error.value)
    assert message.startswith("Installing calid-test-not-installed failed (pip exit code 1")
    assert "Troubleshooting" in message and "\n" not in message
    assert install_summary() is not None  # still missing: the next click offers it again


def test_missing_pytorch_extension_and_failing_pytorch_install_are_one_line(requirements, monkeypatch):
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    monkeypatch.setattr(dependencies, "torch_missing", lambda: True)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the PyTorch extension is not installed
    with pytest.raises(InstallError, match="needs the PyTorch extension: install it from the Extension Manager"):
        ensureDependencies(askConfirmation=False)

    class PyTorchUtilsLogic:
        """Stand-in for the PyTorch extension's logic: its installer fails as pip does offline."""

        def installTorch(self, **options):
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "light_the_torch", "install", "torch"])

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    with pytest.raises(InstallError, match=r"^Installing PyTorch failed \(pip exit code 1; .*Troubleshooting"):
        ensureDependencies(askConfirmation=False)


def test_declining_installs_nothing(requirements, monkeypatch):
    util = pytest.importorskip("slicer.util", reason="slicer-core is not installed")
    asked, installed = [], []
    monkeypatch.setattr(util, "confirmOkCancelDisplay", lambda text, *a, **k: asked.append(text) or False)
    monkeypatch.setattr(util, "pip_install", installed.append, raising=False)
    assert ensureDependencies(askConfirmation=True) is False
    assert installed == [] and "calid-test-not-installed (about 7 MB" in asked[0]


def test_self_tests_are_skipped_with_their_reason_where_pytorch_is_missing(monkeypatch):
    """As ``slicer.testing.runUnitTest`` runs them for ctest: a skip is a success, and it says why."""
    import unittest

    from CaLIDLib.dependencies import self_test_skip_reason

    class SelfTest(unittest.TestCase):
        def runTest(self):
            reason = self_test_skip_reason()  # what CaLIDUpsample.skipWithoutEngine does
            if reason:
                self.skipTest(reason)
            raise AssertionError("the engine would run here")

    monkeypatch.setattr(dependencies, "torch_missing", lambda: True)
    result = unittest.TestResult()
    SelfTest().run(result)
    assert result.wasSuccessful() and "extension build machines have none" in result.skipped[0][1]
    monkeypatch.setattr(dependencies, "torch_missing", lambda: False)
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: [])
    assert self_test_skip_reason() is None
