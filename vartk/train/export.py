"""Export a pipeline from any checkpoint of a transformer run, e.g. one stopped before --max-steps:

    vartk train export --run runs/var                      # newest checkpoint -> runs/var/pipeline-step_0002700
    vartk train export --run runs/var --step 1500 --out my-pipeline
    vartk train export --run runs/var --best               # the lowest held-out loss (a --val-data run)

The checkpoint's `model/` folder holds the transformer and its trainer_state.json the class names; the tokenizer
comes from the run's saved config (--tokenizer), so the result is what the run would have exported at that step.
A tokenizer run needs no export: its checkpoints' `model/` folders are tokenizer folders already.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..models.gpt import GPTTransformer
from ..models.var import VARTransformer
from .checkpoint import best_checkpoint, checkpoint_dir, latest_checkpoint, read_trainer_state
from .conditional import load_tokenizer
from .data import find_images
from .gpt import GPTJob
from .var import VARJob

JOBS = {"VARTransformer": (VARTransformer, VARJob), "GPTTransformer": (GPTTransformer, GPTJob)}


def find_checkpoint(run: Path, step: int | None, best: bool = False) -> Path:
    if best:
        if step is not None:
            raise SystemExit(f"vartk train export: give --step {step} or --best, not both")
        folder = best_checkpoint(run)
        if folder is None:
            raise SystemExit(f"vartk train export --best: no checkpoint in {checkpoint_dir(run)} was validated; "
                             "train with --val-data DIR to measure the held-out loss at every checkpoint")
        return folder
    folder = latest_checkpoint(run) if step is None else checkpoint_dir(run) / f"step_{step:07d}"
    if folder is None or not folder.is_dir():
        saved = sorted(p.name for p in checkpoint_dir(run).glob("step_*")) if checkpoint_dir(run).is_dir() else []
        raise SystemExit(f"vartk train export: no checkpoint{'' if step is None else f' step {step}'} in "
                         f"{checkpoint_dir(run)}; saved: {saved or 'none'}")
    return folder


def export_checkpoint(run: str | Path, step: int | None = None, out: str | Path | None = None,
                      best: bool = False) -> Path:
    """Write a save_pretrained pipeline of checkpoint `step` (default: the newest; `best`: the lowest held-out
    loss) of `run`; returns its folder."""
    folder = find_checkpoint(Path(run), step, best)
    state = read_trainer_state(folder)
    config = state["config"]
    class_name = json.loads((folder / "model" / "config.json").read_text()).get("_class_name")
    if class_name not in JOBS:
        raise SystemExit(f"vartk train export: {folder / 'model'} holds a {class_name}; only transformer runs "
                         f"({sorted(JOBS)}) export a pipeline")
    model_cls, job_cls = JOBS[class_name]
    return job_cls.save_pipeline(
        load_tokenizer(config["tokenizer"], job_cls.official_tokenizer_cls),
        model_cls.from_pretrained(folder / "model"),
        state.get("class_names") or find_images(config["data"])[2],  # runs before class names were saved
        Path(out) if out else Path(run) / f"pipeline-{folder.name}",
    )


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="vartk train export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the --out folder of a `vartk train var|gpt` run")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--best", action="store_true",
                        help="the checkpoint with the lowest held-out loss (runs trained with --val-data)")
    parser.add_argument("--out", default=None, help="pipeline folder to write (default: RUN/pipeline-step_N)")
    args = parser.parse_args(argv)
    destination = export_checkpoint(args.run, args.step, args.out, args.best)
    print(f"wrote {destination}")
    return destination
