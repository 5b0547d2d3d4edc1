"""Training checkpoints as one safetensors file, written atomically (temporary file, then rename).

Tensors: model weights, EMA weights, optimizer moments, the sampler's RNG state. Everything else (step,
stage, optimizer hyper-parameters, LR schedule position) is JSON in the file's metadata, so a checkpoint is
never unpickled and is always self-consistent.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from ..errors import CalidError

CHECKPOINT = "checkpoint.safetensors"
"""A training run's checkpoint in its output folder, for both trainers (the Slicer module names it too, without
importing torch: ``CaLIDLib.training_logic``)."""


@contextmanager
def run_folder(out: Path, resume: bool):
    """The output folder of a run whose data may still be refused, and its checkpoint path.

    Checked against ``--resume`` before anything is written (a refused run had already replaced the folder's
    ``split.json``, so a later ``--resume`` trained on another split), made when missing, and removed again when
    this call made it and what runs inside fails (a refused run left an empty folder or a lone ``split.json``).
    """
    checkpoint = out / CHECKPOINT
    if resume and not checkpoint.is_file():
        raise CalidError(f"--resume given but no checkpoint in {out}")
    if not resume and checkpoint.is_file():
        raise CalidError(f"{out} already holds a training run: use --resume or another output folder")
    if out.exists() and not out.is_dir():
        raise CalidError(f"output {out} is a file, not a folder")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CalidError(f"cannot make the output folder {out}: {error.strerror or error}") from None
    try:
        yield checkpoint
    except BaseException:  # refused, failed or cancelled before training: no folder of this call's is left
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, info: dict[str, Any]) -> None:
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors.update(_random_state(generator))
    _save_atomically(path, tensors, {"info": json.dumps(info), "optimizer": json.dumps(optim_meta)})


def _random_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The batch sampler's random state, and torch's (MONAI's VAE draws its reparameterisation noise there)."""
    return {"rng.sampler": generator.get_state(), "rng.torch": torch.get_rng_state()}


def _restore_random_state(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    generator.set_state(tensors["rng.sampler"])
    torch.set_rng_state(tensors["rng.torch"])


def _save_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def rank_random_state_path(path: Path, rank: int) -> Path:
    """Where a process other than rank 0 keeps its own random state beside the checkpoint rank 0 writes."""
    return path.with_name(f"{path.stem}.rank{rank}.rng{path.suffix}")


def save_rank_random_state(path: Path, rank: int, generator: torch.Generator, step: int) -> None:
    """A process's batch and noise random state at a checkpoint's ``step``: each process draws its own batches
    (its generator is seeded by its rank), so a resumed run must give each its own state back, not rank 0's to all."""
    _save_atomically(rank_random_state_path(path, rank), _random_state(generator), {"step": str(step)})


def load_rank_random_state(path: Path, rank: int, generator: torch.Generator, step: int) -> None:
    """Restore what ``save_rank_random_state`` kept for the checkpoint's ``step`` (rank 0's state stays where there
    is none: a checkpoint written before they existed, or a run stopped between rank 0's save and this one's)."""
    source = rank_random_state_path(path, rank)
    if not source.is_file():
        return
    with safe_open(str(source), framework="pt") as f:
        if f.metadata().get("step") != str(step):
            return
    _restore_random_state(load_file(str(source)), generator)


def read_checkpoint_info(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["info"])


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
                    generator: torch.Generator) -> dict[str, Any]:
    """Restore modules, optimizer and sampler RNG in place; returns the JSON info saved with them."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    for name, module in modules.items():
        prefix = f"{name}."
        try:
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        except RuntimeError:  # another network than the one this run builds (another --init, --denoiser-channels)
            raise CalidError(f"the checkpoint in {path.parent} holds another model than these options build: resume "
                             "with the options the run was started with") from None
    if optimizer is not None:
        optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        optimizer.load_state_dict(_unflatten_optimizer(optim, json.loads(metadata["optimizer"])))
    _restore_random_state(tensors, generator)
    return json.loads(metadata["info"])
