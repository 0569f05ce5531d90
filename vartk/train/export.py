"""Export a pipeline from any checkpoint of a transformer run, e.g. one stopped before --max-steps:

    vartk train export --run runs/var                      # newest checkpoint -> runs/var/pipeline-step_0002700
    vartk train export --run runs/var --step 1500 --out my-pipeline
    vartk train export --run runs/var --best               # the lowest held-out loss (a --val-data run)

The checkpoint's `model/` folder holds the transformer and its trainer_state.json the class names; the tokenizer
is the run's copy (RUN/tokenizer), or for runs older than that copy the training --tokenizer, so the result is
what the run would have exported at that step. `--tokenizer DIR|FILE` replaces it by a decoder fine-tune of it
(`vartk train tokenizer --train-decoder-only`); one that encodes differently is refused.
A tokenizer run needs no export: its checkpoints' `model/` folders are tokenizer folders already.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch.nn as nn

from ..checkpoints import load_saved_model, read_json_object
from ..models.gpt import GPTTransformer
from ..files import refuse_foreign_folder
from ..models.var import VARTransformer
from ..pipelines import PIPELINE_INDEX
from .conditional import RUN_TOKENIZER, load_tokenizer, require_same_encoding
from .data import find_images
from .gpt import GPTJob
from .resume import best_checkpoint, checkpoint_dir, latest_checkpoint, read_trainer_state
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


def run_tokenizer(run: Path, config: dict, tokenizer: str | None, official_cls: type) -> nn.Module:
    """The tokenizer of an export: the run's copy, else the training --tokenizer (runs from before the copy),
    which must still exist. `tokenizer` (a folder or file) replaces it; with the run's copy at hand it must
    encode exactly as the copy does (a decoder fine-tune), since the transformer learned those tokens."""
    copy = run / RUN_TOKENIZER
    if tokenizer is None and not copy.is_dir() and not Path(config["tokenizer"]).exists():
        raise SystemExit(f"vartk train export: {run} has no {RUN_TOKENIZER}/ folder and its training tokenizer "
                         f"{config['tokenizer']} is gone; pass --tokenizer DIR|FILE (the one it was trained with)")
    chosen = load_tokenizer(tokenizer or (str(copy) if copy.is_dir() else config["tokenizer"]), official_cls)
    if tokenizer is not None and copy.is_dir():
        require_same_encoding(load_tokenizer(str(copy), official_cls), chosen,
                              f"vartk train export: --tokenizer {tokenizer}", f"the run's ({copy})")
    return chosen


def export_checkpoint(run: str | Path, step: int | None = None, out: str | Path | None = None,
                      best: bool = False, tokenizer: str | None = None) -> Path:
    """Write a save_pretrained pipeline of checkpoint `step` (default: the newest; `best`: the lowest held-out
    loss) of `run`; returns its folder. `tokenizer`: a folder or official file replacing the run's."""
    folder = find_checkpoint(Path(run), step, best)
    out = Path(out) if out else Path(run) / f"pipeline-{folder.name}"
    refuse_foreign_folder(out, PIPELINE_INDEX)
    state = read_trainer_state(folder)
    config = state["config"]
    class_name = read_json_object(folder / "model" / "config.json").get("_class_name")
    if class_name not in JOBS:
        raise SystemExit(f"vartk train export: {folder / 'model'} holds a {class_name}; only transformer runs "
                         f"({sorted(JOBS)}) export a pipeline")
    model_cls, job_cls = JOBS[class_name]
    return job_cls.save_pipeline(
        run_tokenizer(Path(run), config, tokenizer, job_cls.official_tokenizer_cls),
        load_saved_model(folder / "model", (model_cls,)),
        state.get("class_names") or find_images(config["data"])[2],  # runs before class names were saved
        out,
    )


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="vartk train export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the --out folder of a `vartk train var|gpt` run")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--best", action="store_true",
                        help="the checkpoint with the lowest held-out loss (runs trained with --val-data)")
    parser.add_argument("--out", default=None, help="pipeline folder to write (default: RUN/pipeline-step_N)")
    parser.add_argument("--tokenizer", default=None,
                        help="a --train-decoder-only fine-tune of the run's tokenizer (default: the run's copy, "
                             "RUN/tokenizer)")
    args = parser.parse_args(argv)
    destination = export_checkpoint(args.run, args.step, args.out, args.best, args.tokenizer)
    print(f"wrote {destination}")
    return destination
