"""Reading checkpoint files strictly: official .pth / .pt files safely, and the safetensors + JSON folders that
`save_pretrained` writes (official model names and downloads are in vartk.hub).

Official files are read with `torch.load(..., weights_only=True)`; the only non-tensor object
allowed is `argparse.Namespace` (some LlamaGen training files keep their "args" in it).
Loading is strict: every key must be consumed and every shape must match, and an error names
the offending keys with both shapes.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """An official or vartk checkpoint does not match the model it is loaded into."""


def read_official_file(path: str | os.PathLike, containers: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt file without executing pickled code and return its flat state dict.

    `containers` lists keys to look inside, in order (e.g. ("model",) for LlamaGen DDP files; a dotted
    path such as "trainer.var_wo_ddp" descends several levels); a file that is already a flat
    name -> tensor dict is returned as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or pickled with disallowed objects
        raise CheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint: a file written by torch.save "
                              "holding only tensors (it is corrupt, truncated, or pickles other Python objects, "
                              "which vartk does not unpickle)") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict of tensors")
    return unwrap_state_dict(obj, containers, f"checkpoint {str(path)!r}")


def unwrap_state_dict(obj: dict, containers: tuple[str, ...] = (), source: str = "state dict") -> dict:
    """The flat name -> tensor dict of a loaded checkpoint: under the first of `containers` present (dotted
    paths descend), else at the top level."""
    for path_in_file in containers:
        inner = obj
        for name in path_in_file.split("."):
            inner = inner.get(name) if isinstance(inner, dict) else None
        if isinstance(inner, dict):
            obj = inner
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(
            f"{source} holds no tensors at the top level"
            + (f" nor under {list(containers)}" if containers else "")
            + f"; its keys are {sorted(obj)[:10]}"
        )
    return state


def load_state_dict_strict(
    module: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str = "checkpoint",
    ignore: tuple[str, ...] = (),
) -> None:
    """Copy `state_dict` into `module`, requiring the same keys and shapes.

    Keys ending with one of `ignore` (buffers the model recomputes, e.g. masks) may be present in
    the file or not; a present one must still have the expected shape unless the model has no
    such key. Raises CheckpointError naming every missing, unexpected and mis-shaped key.
    """
    expected = module.state_dict()
    ignorable = lambda key: any(key.endswith(suffix) for suffix in ignore)  # noqa: E731
    missing = [k for k in expected if k not in state_dict and not ignorable(k)]
    unexpected = [k for k in state_dict if k not in expected and not ignorable(k)]
    mis_shaped = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and not ignorable(k) and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}" + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:8]}" + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
            )
        if mis_shaped:
            parts.append("shape mismatch " + "; ".join(mis_shaped[:8]))
        raise CheckpointError(f"{source} does not match {type(module).__name__}: " + "; ".join(parts))
    to_load = {k: v for k, v in state_dict.items() if k in expected and not (ignorable(k) and v.shape != expected[k].shape)}
    module.load_state_dict(to_load, strict=False)


SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"  # what save_pretrained writes into a component's folder
SAFETENSORS_INDEX = SAFETENSORS_FILE + ".index.json"  # ... or, for a large model, this list of shards


def read_json_object(path: Path) -> dict:
    """The JSON object {...} in `path`; one CheckpointError naming the file if it is missing, not JSON or not an
    object."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not a readable JSON file: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}; expected an object {{...}}")
    return value


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict save_pretrained wrote into `folder`: its safetensors file, or all the shards its index lists."""
    from safetensors.torch import load_file

    index = folder / SAFETENSORS_INDEX
    shards = read_json_object(index).get("weight_map", {}).values() if index.is_file() else [SAFETENSORS_FILE]
    state = {}
    for name in sorted(set(shards)):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        try:
            state.update(load_file(path))
        except Exception as err:  # safetensors raises its own error type for a corrupt or truncated file
            raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    return state


CONFIG_TYPES = {bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
                str: ((str,), "a string"), tuple: ((list,), "a list"), list: ((list,), "a list")}


def config_arguments(config: dict, cls: type, source: str) -> dict:
    """The `cls.__init__` arguments in a saved config.json: every parameter present (keys starting with "_" are
    diffusers' notes) but those in `cls.optional_config_fields` (added later; their default is what folders
    written before them meant), no other, each of its default's JSON type (a None default takes anything). Raises
    one CheckpointError naming `source` and every bad field."""
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}
    arguments = {key: value for key, value in config.items() if not key.startswith("_")}
    optional = getattr(cls, "optional_config_fields", ())
    problems = [f"lacks {name!r}" for name in defaults if name not in arguments and name not in optional]
    unknown = [name for name in arguments if name not in defaults]
    if unknown:
        problems.append(f"has unknown fields {unknown} ({cls.__name__} takes {list(defaults)})")
    for name, value in arguments.items():
        types, wanted = CONFIG_TYPES.get(type(defaults.get(name)), (None, None))
        if types and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            problems.append(f"has {name}={value!r}, which must be {wanted}")
    if problems:
        raise CheckpointError(f"{source} {'; '.join(problems)}")
    return arguments


def load_saved_model(folder: Path, classes: tuple[type, ...]) -> torch.nn.Module:
    """The model save_pretrained wrote into `folder` (config.json + safetensors), one of `classes`, loaded strictly:
    every config field and every weight present, of the right type and shape."""
    config_file = folder / "config.json"
    config = read_json_object(config_file)
    cls = {c.__name__: c for c in classes}.get(config.get("_class_name"))
    if cls is None:
        raise CheckpointError(f"{config_file} describes a {config.get('_class_name')!r}; expected a "
                              f"{' or '.join(c.__name__ for c in classes)}")
    arguments = config_arguments(config, cls, str(config_file))
    try:
        with torch.device("meta"):  # every tensor comes from the file: no initialisation, no random draws
            model = cls(**arguments)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    model.to_empty(device="cpu")
    load_state_dict_strict(model, read_safetensors_folder(folder), source=str(folder))
    return model.eval()
