"""Resuming a training run: its step checkpoints, written atomically and read back exactly.

    <out>/checkpoints/step_0001000/
        <name>/                 save_pretrained folder (safetensors + config.json) of each diffusers model
        <name>.safetensors      state of each plain nn.Module (e.g. the GAN discriminator)
        optimizer.pt            optimizer and LR-scheduler states (torch.load(weights_only=True) loads it)
        trainer_state.json      step, epoch, batch within the epoch, world size, class names, the job's config
                                (+ "validation": held-out metrics, with --val-data)
    <out>/checkpoints/latest    the name of the newest complete checkpoint folder

A checkpoint is written to e.g. `step_0000500.tmp` and renamed (os.replace) when complete; `latest`
is replaced the same way, so a run killed at any moment leaves the previous checkpoint usable.
Pruning keeps the newest `keep` checkpoints and, when they were validated, the one with the lowest
held-out loss (`best_checkpoint`).
RNG state needs no saving: every step reseeds from (seed, step, rank) (see loop.step_seed).
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from diffusers.models.modeling_utils import ModelMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import write_folder_atomic, write_text_atomic

LATEST = "latest"
# what a damaged checkpoint raises: truncated safetensors, pickle junk, cut-short or edited JSON, missing entries
UNREADABLE = (OSError, ValueError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError)


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def saved_checkpoints(out: Path) -> list[Path]:
    """The complete checkpoint folders, oldest first: one is written as `step_NNNNNNN.tmp` and gets its name only
    once complete."""
    return sorted(folder for folder in checkpoint_dir(out).glob("step_???????") if folder.is_dir())


def unreadable(folder: Path, err: Exception) -> SystemExit:
    """The error for a damaged checkpoint, with the way back to the one before it (see latest_checkpoint)."""
    others = [f.name for f in saved_checkpoints(folder.parent.parent) if f.name != folder.name]
    remedy = (f"delete it and {folder.parent / LATEST} to go on from the newest one left ({others[-1]})"
              if others else "no other checkpoint is saved; start a new run in another --out")
    # the error's type says which part broke; its text can be pages long (torch.load's)
    return SystemExit(f"checkpoint {folder} is unreadable ({type(err).__name__}); {remedy}")


def save_module(module: nn.Module, folder: Path, name: str) -> None:
    if isinstance(module, ModelMixin):
        module.save_pretrained(folder / name, safe_serialization=True)
    else:
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, folder / f"{name}.safetensors")


def load_module(module: nn.Module, folder: Path, name: str) -> None:
    if isinstance(module, ModelMixin):
        files = sorted((folder / name).glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"expected one .safetensors file in {folder / name}, found {[f.name for f in files]}")
        state_dict = load_file(files[0])
    else:
        state_dict = load_file(folder / f"{name}.safetensors")
    module.load_state_dict(state_dict, strict=True)


def save_checkpoint(out: Path, step: int, modules: dict[str, nn.Module], optimizers: dict, schedulers: dict,
                    state: dict, keep: int) -> Path:
    """Write checkpoint `step` (modules unwrapped from DDP), point `latest` at it, keep the newest `keep`."""
    root = checkpoint_dir(out)

    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        for name, module in modules.items():
            save_module(module, folder, name)
        torch.save({"optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                    "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()}},
                   folder / "optimizer.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1) + "\n")

    final = write_folder_atomic(root / f"step_{step:07d}", write)
    write_text_atomic(root / LATEST, final.name + "\n")
    best = best_checkpoint(out)
    for old in saved_checkpoints(out)[:-keep] if keep > 0 else []:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(folder: Path) -> dict:
    """A checkpoint's trainer_state.json: step, data position, config, held-out metrics."""
    try:
        return json.loads((folder / "trainer_state.json").read_text())
    except UNREADABLE as err:
        raise unreadable(folder, err) from None


def validation_loss(folder: Path) -> float | None:
    """The held-out loss a checkpoint was written with (None: not validated)."""
    validation = read_trainer_state(folder).get("validation") if (folder / "trainer_state.json").is_file() else None
    return validation["loss"] if validation else None


def validation_set(folder: Path) -> tuple:
    """(--val-data, --val-images) a checkpoint was validated on: losses on other sets do not compare."""
    config = read_trainer_state(folder).get("config", {})
    return config.get("val_data"), config.get("val_images")


def best_checkpoint(out: Path) -> Path | None:
    """The saved checkpoint with the lowest held-out loss (the earliest on a tie) among those validated on the
    newest validated checkpoint's held-out set (a resumed run may have changed --val-data), or None if none was
    validated."""
    scored = [(loss, folder) for folder in saved_checkpoints(out)
              if (loss := validation_loss(folder)) is not None]
    if not scored:
        return None
    held_out = validation_set(scored[-1][1])
    return min((pair for pair in scored if validation_set(pair[1]) == held_out), key=lambda pair: pair[0])[1]


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint `latest` names; without that file (deleted, or not copied with the run) the newest complete
    one; None when there is none."""
    pointer = checkpoint_dir(out) / LATEST
    if not pointer.is_file():
        saved = saved_checkpoints(out)
        return saved[-1] if saved else None
    folder = checkpoint_dir(out) / pointer.read_text().strip()
    if not folder.is_dir():
        saved = [f.name for f in saved_checkpoints(out)]
        remedy = (f"delete {pointer} to use the newest saved checkpoint ({saved[-1]})" if saved
                  else f"no checkpoint is saved; delete {pointer} to start from step 0")
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is missing; {remedy}")
    return folder


def load_checkpoint(folder: Path, modules: dict[str, nn.Module], optimizers: dict, schedulers: dict) -> None:
    """Restore modules, optimizers and schedulers in place."""
    try:
        for name, module in modules.items():
            load_module(module, folder, name)
        saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(saved["optimizers"][name])
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(saved["schedulers"][name])
    except UNREADABLE as err:
        raise unreadable(folder, err) from None
