"""Training on an image folder: tokenizer (MultiScaleVQVAE), next-scale (VAR) and next-token (GPT)
transformers; single process or `torchrun --nproc_per_node=K` (DDP). See vartk/train/loop.py.

    train_main("tokenizer", ["--data", "images/", "--out", "runs/tok"])   # = vartk train tokenizer ...
    train_main("export", ["--run", "runs/var"])   # a pipeline from the newest checkpoint (vartk/train/export.py)
"""
from __future__ import annotations

import importlib
from pathlib import Path

JOBS = {"tokenizer": ".tokenizer", "var": ".var", "gpt": ".gpt", "export": ".export"}


def train_main(job: str, argv: list[str]) -> Path:
    """Run `vartk train <job> <argv...>`; returns the output folder."""
    if job not in JOBS:
        raise SystemExit(f"vartk train: unknown job {job!r}; use one of {sorted(JOBS)}")
    return importlib.import_module(JOBS[job], __name__).main(argv)


__all__ = ["JOBS", "train_main"]
