"""Where models live and which exist, without importing torch (the Slicer panel lists models with it).

A model is a folder holding ``model.json`` (the card) and ``model.safetensors``. Bundled models ship in
``calid/models/``; user models (fine-tuned, imported) live in ``$CALID_MODELS_DIR`` or ``~/.calid/models``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .staging import current_umask, staging_folder

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
# calid-acdc fine-tuned on the Sunnybrook cines: as good as calid-acdc on the ACDC validation patients (K=2 within
# 0.04 dB) and better on cines from a second vendor (README: "The default model").
DEFAULT_MODEL = "calid-acdc-scd"
# The ACDC-only model: the base of calid-acdc-scd, and the one to score on Sunnybrook (the default has seen it).
ACDC_MODEL = "calid-acdc"
DEFAULT_SEGMENTATION_MODEL = "calid-seg-acdc"
INTERPOLATION_FORMAT = "calid-model/1"
SEGMENTATION_FORMAT = "calid-segmentation/1"
BUNDLED_DIR = Path(__file__).resolve().parent / "models"


def user_models_dir() -> Path:
    return Path(os.environ.get("CALID_MODELS_DIR", Path.home() / ".calid" / "models"))


def _model_cards() -> Iterator[tuple[str, Path, dict[str, Any] | str]]:
    """(source, folder, card) of every model folder, bundled first; the card is the reason it cannot be used when
    its ``model.json`` is not a JSON object naming one of the two model formats, when it has no weights, or when a
    user folder has a bundled model's name (``--model NAME`` always finds the bundled one first)."""
    bundled = {p.name for p in BUNDLED_DIR.iterdir()} if BUNDLED_DIR.is_dir() else set()
    for source, root in (("bundled", BUNDLED_DIR), ("user", user_models_dir())):
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if (p / CARD_FILE).is_file()):
            card = _card_or_reason(folder)
            if isinstance(card, dict) and source == "user" and folder.name in bundled:
                card = f"a bundled model is named {folder.name} too, and --model {folder.name} selects it: rename it"
            elif isinstance(card, dict) and not (folder / WEIGHTS_FILE).is_file():
                card = f"it has no {WEIGHTS_FILE}"
            yield source, folder, card


def _card_or_reason(folder: Path) -> dict[str, Any] | str:
    """A model folder's card, or why it is none: not JSON, not an object, or naming neither model format (which
    loading refuses)."""
    try:
        card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its {CARD_FILE} cannot be read ({exc})"
    if not isinstance(card, dict):
        return f"its {CARD_FILE} is not a JSON object"
    if card.get("format") not in (INTERPOLATION_FORMAT, SEGMENTATION_FORMAT):
        return f"its {CARD_FILE} names no CaLID model format ({card.get('format')!r})"
    return card


def list_models(card_format: str = INTERPOLATION_FORMAT) -> list[dict[str, Any]]:
    """Every usable model folder of one kind (interpolation or segmentation), bundled first: name, source, path,
    description and metrics from its card. A folder whose card cannot be read is no model of either kind
    (``unreadable_models`` names them)."""
    return [{"name": folder.name, "source": source, "path": str(folder), "description": card.get("description", ""),
             "metrics": card.get("metrics", {})}
            for source, folder, card in _model_cards()
            if isinstance(card, dict) and card["format"] == card_format]


def unreadable_models() -> list[dict[str, str]]:
    """The model folders whose card cannot be read: name, source, path and why (``calid models`` says so)."""
    return [{"name": folder.name, "source": source, "path": str(folder), "reason": card}
            for source, folder, card in _model_cards() if isinstance(card, str)]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def share_like_other_files(folder: Path) -> None:
    """Give a finished model folder the permissions the user's umask gives any new file.

    ``mkdtemp`` makes the staging folder private (0700) and safetensors writes its file 0600: left so, a model
    saved into a shared models folder (``$CALID_MODELS_DIR`` on a team drive) is unreadable to everyone else.
    """
    umask = current_umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def import_model(source: str | os.PathLike, name: str | None = None) -> Path:
    """Copy a model folder (or the folder of a given ``model.json``) into the user models folder as ``name``
    (default: the folder's name), and return where.

    Only the card and the weights are copied (a folder from elsewhere may hold anything else, pickles included),
    after checking that the card is a CaLID card whose checksum the weights match, into a folder that appears whole
    or not at all. The name is one folder name, and not a bundled model's: the bundled one would always be found
    first. Raises FileNotFoundError, FileExistsError or ValueError with a one-line reason.
    """
    source = Path(source)
    folder = source.parent if source.is_file() else source
    if not (folder / CARD_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a CaLID model folder (needs {CARD_FILE} and {WEIGHTS_FILE})")
    name = name or folder.resolve().name
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"a model's name is one folder name, not {name!r}")
    if (BUNDLED_DIR / name).is_dir():
        raise FileExistsError(f"{name} is a bundled model's name: import the model under another name")
    _check_importable(folder)
    target = user_models_dir() / name
    if target.exists():
        raise FileExistsError(f"a user model named {target.name} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target.parent, "import")
    try:
        for file in (CARD_FILE, WEIGHTS_FILE):
            shutil.copyfile(folder / file, staging / file)
        share_like_other_files(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_importable(folder: Path) -> None:
    """A CaLID card (a JSON object of either kind, as ``calid models`` lists them) whose weights match its
    checksum."""
    card = _card_or_reason(folder)
    if isinstance(card, str):
        raise ValueError(f"{folder / CARD_FILE} is not a CaLID model card: {card}")
    if sha256_of(folder / WEIGHTS_FILE) != card.get("sha256"):
        raise ValueError(f"the weights in {folder} do not match the checksum in its card")
