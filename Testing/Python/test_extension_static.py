"""Static checks of the Slicer extension: packaging lists, .ui, catalog entry, images."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "CaLIDUpsample"  # holds the calid engine and CaLIDLib, shared by both modules
MODULES = ["CaLIDUpsample", "CaLIDTraining"]
PACKAGED_SUFFIXES = {".py", ".ui", ".png", ".json", ".safetensors", ".nrrd", ".txt"}


def cmake_listed(cmake: Path) -> set[str]:
    text = cmake.read_text(encoding="utf-8")
    return set(re.findall(r"^\s+([\w./-]+\.\w+)\s*$", text, flags=re.MULTILINE))


def module_files(folder: Path) -> set[str]:
    """Every file Slicer must package: under the module folder, except its CMake/testing files."""
    files = set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        build_artefact = "__pycache__" in rel.parts or rel.parts[0].endswith(".egg-info")
        if (path.is_file() and path.suffix in PACKAGED_SUFFIXES and rel.parts[0] != "Testing"
                and rel.name != "CMakeLists.txt" and not build_artefact):
            files.add(rel.as_posix())
    return files


@pytest.mark.parametrize("name", MODULES)
def test_every_module_file_is_listed_in_cmake(name):
    folder = REPO / name
    listed = cmake_listed(folder / "CMakeLists.txt")
    missing = module_files(folder) - listed
    assert not missing, f"not listed in {name}/CMakeLists.txt (would not be packaged): {sorted(missing)}"
    stale = {f for f in listed if not (folder / f).is_file()}
    assert not stale, f"listed but missing: {sorted(stale)}"


@pytest.mark.parametrize("name", MODULES)
def test_ui_parses_and_has_every_widget_the_code_uses(name):
    tree = ET.parse(REPO / name / "Resources" / "UI" / f"{name}.ui")
    names = {w.get("name") for w in tree.iter("widget")}
    code = (REPO / name / f"{name}.py").read_text(encoding="utf-8")
    panel_base = (MODULE / "CaLIDUpsample.py").read_text(encoding="utf-8").split("class CaLIDPanel(")[1]
    used = set(re.findall(r"self\.ui\.(\w+)", code + panel_base.split("\nclass ")[0]))  # both extend CaLIDPanel
    assert used <= names, f"widgets used in code but absent from the .ui: {sorted(used - names)}"
    bound = {p.find("string").text for p in tree.iter("property") if p.get("name") == "SlicerParameterName"}
    parameter_class = code.split(f"class {name}ParameterNode")[1].split("class ")[0]
    fields = set(re.findall(r"^    (\w+): ", parameter_class, flags=re.M))
    assert bound <= fields, f"SlicerParameterName without a parameter: {sorted(bound - fields)}"


BINDABLE = {"qMRMLNodeComboBox": {"vtkMRML"}, "QSpinBox": {"int"}, "QDoubleSpinBox": {"float"},
            "ctkDoubleSpinBox": {"float"}, "QCheckBox": {"bool"}, "QLineEdit": {"str"}, "ctkPathLineEdit": {"Path"},
            "QComboBox": {"str", "int", "float", "bool"}}
"""The value types Slicer's parameter node wrapper binds to each widget class these panels use (its GUI connectors,
Slicer 5.10); a combo box of values also needs a ``Choice`` annotation, else ``connectGui`` raises for it and no
widget of the panel is bound at all."""


def parameter_annotations(name: str) -> dict[str, tuple[str, str]]:
    """Each field of the module's parameter node class: (value type, annotation source after the type)."""
    source = (REPO / name / f"{name}.py").read_text(encoding="utf-8")
    node_class = next(n for n in ast.parse(source).body
                      if isinstance(n, ast.ClassDef) and n.name == f"{name}ParameterNode")
    fields = {}
    for field in (n for n in node_class.body if isinstance(n, ast.AnnAssign)):
        annotation = field.annotation
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
            first, *rest = annotation.slice.elts
            fields[field.target.id] = (ast.unparse(first), " ".join(ast.unparse(r) for r in rest))
        else:
            fields[field.target.id] = (ast.unparse(annotation), "")
    return fields


@pytest.mark.parametrize("name", MODULES)
def test_every_bound_widget_can_represent_its_parameter(name):
    """The Method combo box bound to a plain ``str`` made ``setParameterNode`` raise in Slicer: the panel showed
    its widgets but none was bound, and Upsample ran with the defaults whatever the panel said."""
    fields = parameter_annotations(name)
    tree = ET.parse(REPO / name / "Resources" / "UI" / f"{name}.ui")
    for widget in tree.iter("widget"):
        for bound in (p.find("string").text for p in widget.findall("property")
                      if p.get("name") == "SlicerParameterName"):
            value_type, extra = fields[bound]
            kinds = BINDABLE[widget.get("class")]
            assert any(value_type.split(".")[-1].startswith(kind) for kind in kinds), (bound, widget.get("class"))
            if widget.get("class") == "QComboBox":
                assert extra.startswith("Choice("), f"{bound}: a combo box of values needs a Choice annotation"


@pytest.mark.parametrize("name", MODULES)
def test_module_file_defines_the_scripted_module_classes(name):
    tree = ast.parse((REPO / name / f"{name}.py").read_text(encoding="utf-8"))
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {name, f"{name}Widget", f"{name}Logic", f"{name}Test"} <= classes


def test_catalog_entry_agrees_with_cmake():
    entry = json.loads((REPO / "CaLID.json").read_text(encoding="utf-8"))
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\((\w+)\)", cmake, flags=re.M).group(1) == "CaLID" == (REPO / "CaLID.json").stem
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', cmake).group(1).split()
    assert entry["build_dependencies"] == depends
    assert entry["category"] == "Cardiac" == re.search(r'set\(EXTENSION_CATEGORY "([^"]*)"\)', cmake).group(1)
    for key in ("$schema", "category", "scm_url"):
        assert key in entry
    assert entry["scm_url"].startswith("https://") and "/SlicerCaLID" in entry["scm_url"]
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
                          "scm_url", "tier", "enabled", "dicom_support_rule"}
    for sub in re.findall(r"^add_subdirectory\((\w+)\)", cmake, flags=re.M):
        assert (REPO / sub / "CMakeLists.txt").is_file()


@pytest.mark.parametrize("url_var", ["EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_icon_and_screenshots_are_real_images_in_the_repository(url_var):
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for url in re.search(rf'set\({url_var} "([^"]*)"\)', cmake).group(1).split():
        local = REPO / url.split("/main/", 1)[1]
        with Image.open(local) as image:
            assert image.format in ("PNG", "JPEG")
            if url_var == "EXTENSION_ICONURL":
                assert image.size == (128, 128)


@pytest.mark.parametrize("name", MODULES)
def test_module_icon_is_a_png(name):
    with Image.open(REPO / name / "Resources" / "Icons" / f"{name}.png") as image:
        assert image.format == "PNG" and image.size == (128, 128)


def test_engine_and_logic_import_no_qt():
    for folder in (MODULE / "calid", MODULE / "CaLIDLib"):
        for path in folder.rglob("*.py"):
            imports = {n.names[0].name.split(".")[0] if isinstance(n, ast.Import) else (n.module or "").split(".")[0]
                       for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, (ast.Import, ast.ImportFrom))}
            assert not imports & {"qt", "ctk", "PythonQt", "slicer" if folder.name == "calid" else "qt"}, path


def load_support():
    """``CaLIDLib/support.py`` alone, as the first thing Slicer runs of CaLID."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("calid_support", MODULE / "CaLIDLib" / "support.py")
    support = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(support)
    return support


@pytest.mark.parametrize("slicer_version, python_version, refused", [
    ((5, 8), (3, 9), "CaLID needs 3D Slicer 5.10 or later: this is Slicer 5.8."),
    ((5, 9), (3, 12), "CaLID needs 3D Slicer 5.10 or later: this is Slicer 5.9."),
    (None, (3, 9), "CaLID needs 3D Slicer 5.10 or later (Python 3.10+): this Slicer's Python is 3.9."),
    ((5, 10), (3, 12), None),
    ((6, 0), (3, 13), None),
])
def test_older_slicers_are_refused_in_one_line(slicer_version, python_version, refused):
    reason = load_support().unsupported_reason(slicer_version, python_version)
    assert reason == refused or (refused and reason.startswith(refused) and "\n" not in reason)


def test_the_version_check_runs_first_and_parses_on_slicer_58s_python():
    """Slicer 5.8 must reach the check: the module files, CaLIDLib's __init__ and support.py parse as Python 3.9,
    the check comes before CaLIDLib's other imports, and both module files check the Slicer version before
    defining anything."""
    for path in (MODULE / "CaLIDLib" / "__init__.py", MODULE / "CaLIDLib" / "support.py",
                 *(REPO / name / f"{name}.py" for name in MODULES)):  # parsed whole before the check runs
        ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))
    init = (MODULE / "CaLIDLib" / "__init__.py").read_text(encoding="utf-8")
    assert init.index("require_supported()") < init.index("from .background")
    for name in MODULES:
        code = (REPO / name / f"{name}.py").read_text(encoding="utf-8")
        check = code.index("require_supported((slicer.app.majorVersion, slicer.app.minorVersion))")
        assert check < code.index("from CaLIDLib import") and check < code.index("\nclass ")
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]*)"\)', (REPO / "CMakeLists.txt").read_text()).group(1)
    assert "Slicer 5.10 or later" in description
