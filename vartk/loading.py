"""Loading a pipeline by name: a model shipped in the package, a folder `save_pretrained` wrote, or an official
model name (its files found locally or downloaded, `vartk.hub`).

    pipe = vartk.load("default")                     # offline, on the CPU
    pipe = vartk.load("var-d16", device="cuda", torch_dtype=torch.bfloat16)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .hub import KNOWN_MODELS, resolve_official_files
from .pipelines import PIPELINE_INDEX, GPTPipeline, VARPipeline, load_folder, with_transformer_dtype

ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODELS = {"default": ASSETS / "default", "default-gpt": ASSETS / "default-gpt"}


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that exists here; else one ValueError saying what is allowed."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{device!r} is not a torch device; use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ValueError(f"there is no CUDA device {str(device)!r} here ({count} found); use 'cpu'"
                         + (f" or 'cuda:0' ... 'cuda:{count - 1}'" if count else ""))
    return device


def load(name: str = "default", device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None):
    """Load a pipeline by name or folder.

    - "default" / "default-gpt": the small emoji models shipped in the package (offline);
    - a folder written by `save_pretrained` (also one named like an official model, e.g. the output of
      `vartk convert --out var-d16`: an existing folder comes first);
    - an official model name ("var-d16" ... "var-d36", "llamagen-b" ... "llamagen-3b"), resolved
      from $VARTK_HOME / the Hugging Face cache or downloaded.
    torch_dtype: the transformer's weights (e.g. torch.bfloat16); the tokenizer stays in float32.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"the model to load is a name or a folder path, got {name!r}; e.g. 'default', 'default-gpt', "
                        "'var-d16' or a folder written by save_pretrained")
    device = check_device(device)
    folder = BUILTIN_MODELS.get(name, Path(name))
    if (folder / PIPELINE_INDEX).is_file():
        pipe = load_folder(folder)
    elif name in KNOWN_MODELS:
        known = KNOWN_MODELS[name]
        files = resolve_official_files(name)
        if known.family == "var":
            pipe = VARPipeline.from_official(vae=files["vae"], var=files["var"])
        else:
            pipe = GPTPipeline.from_official(vq=files["vq"], gpt=files["gpt"], **known.options)
    elif name in BUILTIN_MODELS:
        raise FileNotFoundError(f"the built-in model {name!r} is missing from {folder}; reinstall vartk")
    else:
        raise FileNotFoundError(
            f"{name!r} is neither a folder written by save_pretrained (no model_index.json there), a built-in model "
            f"({sorted(BUILTIN_MODELS)}) nor an official model name ({sorted(KNOWN_MODELS)})"
        )
    return with_transformer_dtype(pipe.to(device), torch_dtype)
