"""Key/shape fixtures of official checkpoints: read them, build random state dicts from them, write them.

A fixture is JSON {"source": "...", "keys": {name: {"shape": [...], "dtype": "float32"}, ...}} produced
by instantiating the official model class; tests load random tensors of exactly that layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name) for every key of the fixture at `path` (relative paths: tests/fixtures/)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = FIXTURES / path
    keys = json.loads(path.read_text())["keys"]
    return {name: (tuple(entry["shape"]), entry["dtype"]) for name, entry in keys.items()}


def state_dict_from_fixture(path: str | Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the fixture's names, shapes and dtypes: floats ~ N(0, 0.02^2), integers zero."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, (shape, dtype_name) in load_fixture(path).items():
        dtype = getattr(torch, dtype_name)
        if dtype.is_floating_point:
            state_dict[name] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        else:
            state_dict[name] = torch.zeros(shape, dtype=dtype)
    return state_dict


def write_fixture(path: str | Path, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Write the names, shapes and dtypes of `state_dict` as a fixture (one key per line)."""
    lines = []
    for name, tensor in state_dict.items():
        entry = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        lines.append(f"  {json.dumps(name)}: {json.dumps(entry)}")
    Path(path).write_text('{"source": ' + json.dumps(source) + ', "keys": {\n' + ",\n".join(lines) + "\n}}\n")
