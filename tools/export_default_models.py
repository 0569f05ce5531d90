"""Copy trained emoji models into the package (vartk/assets) as half-precision safetensors.

    python tools/export_default_models.py --var runs/var/pipeline --gpt runs/gpt/pipeline --classifier runs/classifier \
        --var-sampling '{"guidance_scale": 3.0}' --gpt-sampling '{"guidance_scale": 3.0}' \
        --var-sampler nextscale:guidance_schedule=constant \
        --var-kv-calibration runs/var-scalekv.json   # from: vartk calibrate-kv --model runs/var/pipeline --out ...

    python tools/export_default_models.py --var runs/var/pipeline   # the other shipped assets stay as they are

Every model given is loaded and checked (family, tokenizer, sampling settings) and written next to its destination
before any asset is replaced; then each is renamed over its destination. Fails, replacing nothing, if the models
(those given and the shipped ones kept) do not share their classes or would exceed --max-mb together.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from vartk.classifier import SHIPPED_WEIGHTS, ImageClassifier
from vartk.files import write_folder_atomic
from vartk.loading import BUILTIN_MODELS, load
from vartk.samplers.scalekv import read_calibration
from vartk.train.conditional import require_same_encoding


def name_as_asset(model, name: str) -> None:
    """Record the asset's name instead of the training run's local path as `_name_or_path` in the saved configs."""
    model.register_to_config(_name_or_path=name)
    for component in ("tokenizer", "transformer"):
        if hasattr(model, component):
            getattr(model, component).register_to_config(_name_or_path=f"{name}/{component}")


def with_tokenizer(pipe, folder: str):
    """`pipe` with the tokenizer at `folder`, a `--train-decoder-only` fine-tune of its own: refused when any
    parameter that decides the tokens differs, since the transformer was trained on the old tokens."""
    tuned = type(pipe.tokenizer).from_pretrained(folder).to(pipe.tokenizer.dtype)
    require_same_encoding(pipe.tokenizer, tuned, folder, "the pipeline's tokenizer")
    pipe.register_modules(tokenizer=tuned)
    return pipe


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def prepare(args) -> list[tuple[object, Path]]:
    """Load and check every model given before anything is written: [(half-precision model, asset folder)]."""
    models, classes = [], {}
    for name, family, source, sampling, sampler, tokenizer in (
            ("default", "var", args.var, args.var_sampling, args.var_sampler, args.var_tokenizer),
            ("default-gpt", "llamagen", args.gpt, args.gpt_sampling, args.gpt_sampler, args.gpt_tokenizer)):
        if source is None:
            classes[f"{name} (shipped, kept)"] = load(str(BUILTIN_MODELS[name])).class_names
            continue
        pipe = load(source).to(torch.float16)
        if pipe.family != family:
            raise SystemExit(f"{source} is a {type(pipe).__name__}; {name!r} must be a {family} pipeline")
        if tokenizer is not None:
            pipe = with_tokenizer(pipe, tokenizer)
        if sampling is not None:
            unknown = sorted(set(sampling) - set(pipe.official_sampling))
            if unknown:
                raise SystemExit(f"{name} sampling {unknown} unknown; allowed: {sorted(pipe.official_sampling)}")
            pipe.register_to_config(sampling_defaults=sampling)
            try:
                pipe.sampling_options()  # checks the values
            except ValueError as err:
                raise SystemExit(f"{name} sampling {sampling}: {err}")
        if sampler is not None:
            try:
                pipe.sampler = sampler
            except ValueError as err:
                raise SystemExit(f"{name} sampler {sampler!r}: {err}")
        if family == "var" and args.var_kv_calibration is not None:
            try:
                pipe.kv_calibration = read_calibration(args.var_kv_calibration)
            except (OSError, TypeError, ValueError) as err:
                raise SystemExit(f"--var-kv-calibration {args.var_kv_calibration}: {err}")
        name_as_asset(pipe, name)
        models.append((pipe, BUILTIN_MODELS[name]))
        classes[source] = pipe.class_names
    if args.classifier is None:
        classifier = ImageClassifier.from_pretrained(SHIPPED_WEIGHTS, low_cpu_mem_usage=False)
        classes["emoji-classifier (shipped, kept)"] = classifier.config.class_names
    else:
        classifier = ImageClassifier.from_pretrained(args.classifier, low_cpu_mem_usage=False).to(torch.float16)
        name_as_asset(classifier, SHIPPED_WEIGHTS.name)
        models.append((classifier, SHIPPED_WEIGHTS))
        classes[args.classifier] = classifier.config.class_names
    if len({tuple(names or []) for names in classes.values()}) != 1:
        raise SystemExit(f"the models must share their classes (the classifier scores the others by id): {classes}")
    return models


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--var", help="pipeline folder of the next-scale model (vartk train var); "
                                      "default: keep the shipped `default`")
    parser.add_argument("--gpt", help="pipeline folder of the next-token model (vartk train gpt); "
                                      "default: keep the shipped `default-gpt`")
    parser.add_argument("--classifier", help="folder written by python -m vartk.classifier; "
                                             "default: keep the shipped `emoji-classifier`")
    for family in ("var", "gpt"):
        parser.add_argument(f"--{family}-sampling", type=json.loads, default=None,
                            help='JSON of the settings the model samples with by default, e.g. {"guidance_scale": 3.0}')
        parser.add_argument(f"--{family}-sampler", default=None,
                            help="the sampler the model samples with by default, as a registry spec, e.g. "
                                 "nextscale:guidance_schedule=constant (default: the family's plain sampler)")
        parser.add_argument(f"--{family}-tokenizer", default=None,
                            help="replace the pipeline's tokenizer by this --train-decoder-only fine-tune of it")
    parser.add_argument("--var-kv-calibration", default=None,
                        help="a `vartk calibrate-kv` JSON of the next-scale model, saved with it for scalekv's "
                             "calibration=model (default: the pipeline's own, if any)")
    parser.add_argument("--max-mb", type=float, default=40.0)
    args = parser.parse_args(argv)
    if args.var is None and args.gpt is None and args.classifier is None:
        parser.error("nothing to export: give --var, --gpt or --classifier (or several)")
    for family in ("var", "gpt"):
        options = ("sampling", "sampler", "tokenizer", "kv_calibration")  # gpt has no kv_calibration: None
        orphans = [f"--{family}-{option.replace('_', '-')}" for option in options
                   if getattr(args, f"{family}_{option}", None) is not None and getattr(args, family) is None]
        if orphans:
            parser.error(f"{', '.join(orphans)} set without --{family}: give the model they belong to")
    staged = []
    for model, destination in prepare(args):
        stage = destination.with_name(destination.name + ".staged")
        shutil.rmtree(stage, ignore_errors=True)
        model.save_pretrained(stage)
        staged.append((stage, destination))
    sizes = {destination.name: folder_mb(destination) for destination in (*BUILTIN_MODELS.values(), SHIPPED_WEIGHTS)}
    sizes.update({destination.name: folder_mb(stage) for stage, destination in staged})
    print(", ".join(f"{name} {mb:.1f} MB" for name, mb in sizes.items()) + f"; total {sum(sizes.values()):.1f} MB")
    if sum(sizes.values()) > args.max_mb:
        for stage, _ in staged:
            shutil.rmtree(stage)
        raise SystemExit(f"the assets would take {sum(sizes.values()):.1f} MB, more than --max-mb {args.max_mb}; "
                         "nothing was replaced")
    for stage, destination in staged:
        write_folder_atomic(destination, lambda tmp, stage=stage: os.replace(stage, tmp))


if __name__ == "__main__":
    main()
