"""Model directories: ``model.safetensors`` (weights) + ``model.json`` (the model card).

Weights are read only through safetensors (never pickle); where models live is ``modelindex``. The card carries the architecture config,
the normalisation, the training data and its terms, validation metrics and the SHA256 of the weights,
which is checked before loading. Models are looked up by path, then among the bundled models shipped in
``calid/models/``, then in the user models folder (``$CALID_MODELS_DIR`` or ``~/.calid/models``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CalidError
from .modelindex import (BUNDLED_DIR, CARD_FILE, DEFAULT_MODEL, INTERPOLATION_FORMAT, WEIGHTS_FILE, list_models,
                         share_like_other_files, sha256_of, user_models_dir)
from .generation import default_steps
from .networks import CONFIG_KEYS, CaLID
from .sampling import make_scheduler, max_sampling_steps
from .staging import staging_folder

CARD_FORMAT = INTERPOLATION_FORMAT


def resolve_model_dir(name_or_dir: str | os.PathLike | None, default: str = DEFAULT_MODEL,
                      card_format: str = CARD_FORMAT) -> Path:
    name = str(name_or_dir or default)
    candidate = Path(name).expanduser()
    # A path (with a separator, or . / ~) is that folder; a bare name is a model's before it is a folder of the
    # working directory, so that a folder there named like a bundled model cannot stand in for it.
    if ("/" in name or os.sep in name or name.startswith((".", "~"))) and candidate.is_dir():
        return candidate
    for root in (BUNDLED_DIR, user_models_dir()):
        if (root / name).is_dir():
            return root / name
    if candidate.is_dir():
        return candidate
    known = ", ".join(m["name"] for m in list_models(card_format)) or "none"
    raise CalidError(f"model not found: {name} (available: {known})")


def read_card_of(model_dir: Path, card_format: str) -> dict[str, Any]:
    """The JSON card of a model folder, checked to be of the expected kind."""
    try:
        card = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalidError(f"model {model_dir} has no {CARD_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalidError(f"model card {model_dir / CARD_FILE} is not valid JSON: {exc}") from None
    if not isinstance(card, dict) or card.get("format") != card_format:
        raise CalidError(f"model card {model_dir / CARD_FILE} is not a {card_format} card")
    if not isinstance(card.get("config"), dict):
        raise CalidError(f"model card {model_dir / CARD_FILE} has no config object")
    return card


def read_weights(model_dir: Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a model folder as float32 tensors, after checking their SHA256 against the card."""
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CalidError(f"model {model_dir} has no {WEIGHTS_FILE}")
    if sha256_of(weights) != card.get("sha256"):
        raise CalidError(f"checksum mismatch for {weights}: the weights do not match the model card")
    try:
        return {k: v.float() for k, v in load_file(str(weights)).items()}
    except (SafetensorError, OSError) as exc:
        raise CalidError(f"corrupt weights file {weights}: {exc}") from None


def build_checked(build: Callable[[dict[str, Any]], torch.nn.Module], config: dict[str, Any],
                  state: dict[str, torch.Tensor], model_dir: Path) -> torch.nn.Module:
    """The networks a card's ``config`` describes, built for real only once a shapeless copy (PyTorch's ``meta``
    device) has the weights' names and shapes: a card claiming 4096-channel layers was refused after allocating
    10 GB, and a config no network can be built from is one line, whatever the builder raised."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build(config).state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - any way a config fails to build is a bad card, named as such
        raise CalidError(f"model card {model_dir / CARD_FILE} has an invalid config: {_reason(exc)}") from None
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        differ = [k for k in sorted(expected.keys() & found.keys()) if expected[k] != found[k]]
        first = (f"{differ[0]} is {found[differ[0]]} in the weights, {expected[differ[0]]} in the config" if differ
                 else f"{missing[0]} is missing from the weights" if missing else f"{extra[0]} is not in the config")
        raise CalidError(f"weights in {model_dir} do not fit the config in its card ({first})")
    return build(config)


def check_sampling(model: CaLID, model_dir: Path) -> None:
    """The card's diffusion settings make a scheduler with at least one step on the timesteps the model was
    trained on, and its ``default_steps`` (where it names them) are among those steps: found here, not as an
    internal error after the slices are read."""
    diffusion = model.config.get("diffusion")
    try:
        make_scheduler(diffusion)
        most = max_sampling_steps(diffusion)
        steps = default_steps(model)  # a whole number already (or a ValueError)
        if not 1 <= steps <= most:
            raise ValueError(f"default_steps must be a whole number from 1 to {most}, not {steps!r}")
    except Exception as exc:  # noqa: BLE001 - as build_checked: a bad card, named as such
        raise CalidError(f"model card {model_dir / CARD_FILE} has invalid diffusion settings: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else repr(exc)}"


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], model_dir: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        summary = str(exc).splitlines()[0]
        raise CalidError(f"weights in {model_dir} do not fit the config in its card ({summary})") from None


def read_card(model_dir: Path) -> dict[str, Any]:
    card = read_card_of(model_dir, CARD_FORMAT)
    missing = [k for k in CONFIG_KEYS if k not in card.get("config", {})]
    if missing:
        raise CalidError(f"model card {model_dir / CARD_FILE} lacks config entries: {', '.join(missing)}")
    return card


def load_model(name_or_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[CaLID, dict]:
    """Load, verify (checksum, architecture) and return ``(model in eval mode on device, card)``."""
    model_dir = resolve_model_dir(name_or_dir)
    card = read_card(model_dir)
    state = read_weights(model_dir, card)
    model = build_checked(CaLID, card["config"], state, model_dir)
    load_state_checked(model, state, model_dir)
    check_sampling(model, model_dir)
    return model.to(device).eval(), card


def save_model(model: CaLID, model_dir: str | os.PathLike, card: dict[str, Any], half: bool = True) -> Path:
    """Write weights (fp16 by default) and the card with their SHA256, atomically as a whole directory."""
    return write_model_dir(model, model_dir, {**card, "format": CARD_FORMAT, "config": model.config}, half)


def inherited_provenance(terms: str, citation: str, base_card: dict[str, Any]) -> tuple[str, str]:
    """(terms, citation) for the card of a model trained from ``base_card``'s model (``{}`` for a new model).

    A fine-tuned model still carries what its base learnt from the base's data, so the base's terms and citation
    come with it after the new data's own (a model tuned from ``calid-acdc`` stays non-commercial and keeps the
    ACDC citation). Both trainers, interpolation and segmentation, write their cards through here.
    """
    base = base_card.get("training", {})
    if base.get("terms") and base["terms"].startswith(terms):  # the same data again: the base's terms say it all
        terms = base["terms"]
    elif base.get("terms"):
        terms = f"{terms}; base model {base_card.get('name')}: {base['terms']}"
    if base.get("citation") and citation in base["citation"]:
        citation = base["citation"]
    elif base.get("citation") and base["citation"] not in citation:
        citation = "; ".join(c for c in (citation, base["citation"]) if c)
    return terms, citation


def write_model_dir(module: torch.nn.Module, model_dir: str | os.PathLike, card: dict[str, Any],
                    half: bool = True) -> Path:
    """Write any model folder: weights (fp16 by default), then the card with their dtype and SHA256."""
    model_dir = Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(model_dir.parent, "model")
    try:
        dtype = torch.float16 if half else torch.float32
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
        card = {**card, "weights_dtype": str(dtype).replace("torch.", ""), "sha256": sha256_of(staging / WEIGHTS_FILE)}
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        share_like_other_files(staging)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir
