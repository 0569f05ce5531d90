"""The `vartk` command: sample | convert | inpaint | calibrate-kv | train | fid | bench | demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .arguments import (
    DEFAULT_DEVICE, MAX_GRID_IMAGES, box_mask, check_grid_size, check_not_input, check_output, class_arguments,
    int_in_range, parse_box, parse_device, parse_seed, parse_spec_flag,
)
from .samplers import KV_CACHE, SAMPLER, spec_help
from .samplers.sampling import check_class_labels


CPU_BATCH_SIZE, CUDA_BATCH_SIZE = 16, 32  # images per pipeline call when --batch-size is not given


def default_batch_size(device: str) -> int:
    return CUDA_BATCH_SIZE if torch.device(device).type == "cuda" else CPU_BATCH_SIZE


def check_sampling_call(pipe, labels: list, sampler, kv_cache, guidance_scale, top_k, top_p) -> None:
    """Raise ValueError for what a pipeline call would refuse in any batch, before the first one is sampled: the
    labels, the settings, the sampler and KV-cache policy."""
    check_class_labels(pipe.class_ids(labels), pipe.num_classes)
    pipe.sampling_options(guidance_scale, top_k, top_p)
    pipe.check_sampler(sampler, kv_cache)


def sample_batches(pipe, labels: list, n: int, batch_size: int, stats: list, **call):
    """Sample `n` images of each label, in label order, `batch_size` per pipeline call, with a progress bar over all
    of them: yields each batch's images [B, 3, H, W] on the CPU and appends its statistics to `stats`. One generator
    (call["generator"]) runs through the batches, so a run of one batch is the call `pipe(labels,
    num_images_per_label=n)`."""
    from tqdm import tqdm

    total = len(labels) * n
    with tqdm(total=total, unit="img", desc="sampling") as bar:
        for start in range(0, total, batch_size):
            batch = [labels[i // n] for i in range(start, min(start + batch_size, total))]
            out = pipe(class_labels=batch, output_type="pt", progress=False, **call)
            stats.append(out.stats)
            bar.update(len(batch))
            yield out.images.cpu()


def cmd_sample(args) -> None:
    from .images import save_image_batches
    from .loading import load
    from .samplers.contract import SamplerStats

    classes = args.classes or ["0"]
    out = check_output(Path(args.out))
    check_grid_size(out, len(classes) * args.n)
    pipe = load(args.model, device=args.device)
    labels = class_arguments(classes, pipe.class_names)
    settings = dict(sampler=parse_spec_flag(args.sampler, SAMPLER, pipe),
                    kv_cache=parse_spec_flag(args.kv_cache, KV_CACHE, pipe), guidance_scale=args.cfg,
                    top_k=args.top_k, top_p=args.top_p)
    check_sampling_call(pipe, labels, **settings)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    batch_size = args.batch_size or default_batch_size(args.device)
    stats = []
    save_image_batches(sample_batches(pipe, labels, args.n, batch_size, stats, generator=generator, **settings), out)
    if args.verbose:
        print(SamplerStats.concat(stats).summary())
    print(f"wrote {len(labels) * args.n} images to {out}")


def cmd_convert(args) -> None:
    from .files import refuse_foreign_folder, write_folder_atomic
    from .pipelines import PIPELINE_INDEX, GPTPipeline, VARPipeline

    refuse_foreign_folder(args.out, PIPELINE_INDEX)
    llamagen_flags = [flag for flag, given in (("--vq", args.vq), ("--gpt", args.gpt), ("--gpt-model", args.gpt_model),
                                               ("--image-size", args.image_size)) if given is not None]
    if (args.var or args.vae) and llamagen_flags:
        raise SystemExit(f"vartk convert: {llamagen_flags} are LlamaGen flags, but --vae / --var convert a VAR model; "
                         "convert one family at a time")
    if args.var and args.vae:
        pipe = VARPipeline.from_official(vae=args.vae, var=args.var)
    elif args.gpt and args.vq:
        pipe = GPTPipeline.from_official(vq=args.vq, gpt=args.gpt, model=args.gpt_model or "GPT-B",
                                         image_size=args.image_size or 256)
    else:
        raise SystemExit("vartk convert: give --vae and --var (VAR) or --vq and --gpt (LlamaGen)")
    write_folder_atomic(Path(args.out), pipe.save_pretrained)
    print(f"wrote {type(pipe).__name__} to {args.out}")


def cmd_inpaint(args) -> None:
    from .images import open_rgb, save_image_batches
    from .loading import load
    from .pipelines import VARPipeline

    out = check_output(Path(args.out))
    check_not_input(out, Path(args.image))
    image = open_rgb(args.image)
    pipe = load(args.model, device=args.device)
    if not isinstance(pipe, VARPipeline):
        raise SystemExit(f"vartk inpaint: {args.model} is a {type(pipe).__name__}; in/out-painting needs a "
                         "next-scale (VAR) model, e.g. --model default")
    box = box_mask(args.box, pipe.tokenizer.latent_size)
    keep = box if args.outpaint else 1 - box
    label = class_arguments([args.class_label], pipe.class_names)[0] if args.class_label is not None else None
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    images = pipe.inpaint(image, keep, class_label=label, generator=generator, output_type="pt",
                          guidance_scale=args.cfg, top_k=args.top_k, top_p=args.top_p).images
    save_image_batches([images], out)
    print(f"wrote {out}")


def cmd_calibrate_kv(args) -> None:
    from .files import check_writable, write_text_atomic
    from .loading import load
    from .pipelines import VARPipeline
    from .samplers.scalekv import calibrate, plot_calibration

    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise SystemExit(f"--out {out}: the calibration is a .json file; the heat map goes beside it as .png")
    check_writable(out.absolute().parent, f"--out {out}")
    pipe = load(args.model, device=args.device)
    if not isinstance(pipe, VARPipeline):
        raise SystemExit(f"{args.model} is a {type(pipe).__name__}; KV-cache calibration is for next-scale (VAR) "
                         "models, e.g. --model default")
    calibration = calibrate(pipe, budget=args.budget, samples=args.samples, drafter_share=args.drafter_share,
                            seed=args.seed, batch_size=args.batch_size)
    write_text_atomic(out, json.dumps(calibration, indent=1))
    plot_calibration(calibration, out.with_suffix(".png"))
    drafters = sum(map(sum, calibration["drafters"]))
    print(f"wrote {out} ({drafters} drafter (layer, scale) pairs of {len(calibration['asi'])} layers) and its heat "
          f"map {out.with_suffix('.png')}; use it with --kv-cache scalekv:budget={args.budget},calibration={out}")


def add_sampling_flags(parser: argparse.ArgumentParser, fallback: str) -> None:
    recipe = f"(default: the model's saved setting, else {fallback})"
    parser.add_argument("--cfg", type=float, default=None, help=f"guidance scale {recipe}")
    parser.add_argument("--top-k", type=int, default=None, help=f"keep the k most likely tokens, 0 = off {recipe}")
    parser.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling, 1 = off {recipe}")


def add_seed_and_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=parse_seed, default=0, help="random seed, 0 ... 2^64 - 1 (default: 0)")
    parser.add_argument("--device", type=parse_device, default=DEFAULT_DEVICE,
                        help="a torch device that exists here, e.g. cpu, cuda, cuda:1 (default: cuda when available, "
                             "else cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vartk", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser("sample", help="sample class-conditional images to a PNG grid or folder")
    sample.add_argument("--model", default="default",
                        help="built-in name, official name (var-d16, llamagen-b) or folder (default: default)")
    sample.add_argument("--class", dest="classes", nargs="+", action="extend", default=None,
                        help="class ids or names, repeatable (default: 0)")
    sample.add_argument("--n", type=int_in_range(1), default=4, help="images per class (default: 4)")
    sample.add_argument("--batch-size", type=int_in_range(1), default=None,
                        help=f"images per pipeline call; one generator runs through the batches, so the images "
                             f"depend on it (default: {CPU_BATCH_SIZE} on CPU, {CUDA_BATCH_SIZE} on CUDA)")
    add_sampling_flags(sample, "the family's official one")
    sample.add_argument("--sampler", default=None, help=f"{spec_help(SAMPLER)} (default: the model's own)")
    sample.add_argument("--kv-cache", default=None, help=f"{spec_help(KV_CACHE)} (default: the model's own)")
    sample.add_argument("-v", "--verbose", action="store_true",
                        help="print what sampling cost over all batches: transformer forwards, tokens per forward, "
                             "seconds, KV bytes")
    add_seed_and_device(sample)
    sample.add_argument("--out", default="samples.png",
                        help=f"a .png path: one grid of at most {MAX_GRID_IMAGES} images; else a folder of 00000.png, "
                             "... written batch by batch, that replaces an earlier run's samples (default: "
                             "samples.png)")
    sample.set_defaults(func=cmd_sample)

    convert = sub.add_parser("convert", help="official checkpoint files -> a vartk folder (safetensors + JSON)")
    convert.add_argument("--vae", help="the VAR tokenizer file, vae_ch160v4096z32.pth (with --var)")
    convert.add_argument("--var", help="the VAR transformer file, var_d16.pth ... var_d36.pth (with --vae)")
    convert.add_argument("--vq", help="the LlamaGen tokenizer file, vq_ds16_c2i.pt (with --gpt)")
    convert.add_argument("--gpt", help="the LlamaGen transformer file, c2i_B_256.pt ... c2i_3B_384.pt (with --vq)")
    convert.add_argument("--gpt-model", help="the LlamaGen size: GPT-B, GPT-L, GPT-XL, GPT-XXL or GPT-3B "
                                             "(default: GPT-B)")
    convert.add_argument("--image-size", type=int, help="LlamaGen's image size, 256 or 384, as in the c2i file name "
                                                        "(default: 256)")
    convert.add_argument("--out", required=True,
                         help="the folder to write; it replaces an earlier output there, a folder of other files is "
                              "refused")
    convert.set_defaults(func=cmd_convert)

    inpaint = sub.add_parser("inpaint", help="zero-shot in/out-painting or class-conditional editing (VAR)")
    inpaint.add_argument("--model", default="default",
                         help="a next-scale model: built-in name, official name (var-d16) or folder (default: "
                              "default)")
    inpaint.add_argument("--image", required=True, help="the image to edit, at the model's resolution")
    inpaint.add_argument("--box", type=parse_box, required=True,
                         help="region y0,x0,y1,x1 as fractions of the image (tokens it touches are regenerated)")
    inpaint.add_argument("--outpaint", action="store_true", help="keep the box, regenerate the rest")
    inpaint.add_argument("--class", dest="class_label", default=None,
                         help="class id or name for class-conditional editing (default: none, in/out-painting)")
    add_sampling_flags(inpaint, "VAR's editing demo's: cfg 3, top-k 900, top-p 0.95")
    add_seed_and_device(inpaint)
    inpaint.add_argument("--out", default="inpaint.png",
                         help="a .png path, or a folder, for the result; never the input image (default: "
                              "inpaint.png)")
    inpaint.set_defaults(func=cmd_inpaint)

    calibrate_kv = sub.add_parser(
        "calibrate-kv", help="measure which layers of a next-scale model need a large KV cache (ScaleKV calibration)",
        description="Sample a few images with the full cache, measure each (layer, scale)'s attention selectivity, "
                    "mark the least selective layers drafters (they keep their cache) and write the calibration "
                    "JSON that --kv-cache scalekv:calibration=FILE reads, with a PNG heat map beside it.")
    calibrate_kv.add_argument("--model", default="default", help="a next-scale model (default: default)")
    calibrate_kv.add_argument("--budget", type=float, default=0.1,
                              help="the share of the KV cache the history term assumes kept (default: 0.1)")
    calibrate_kv.add_argument("--samples", type=int_in_range(1), default=16, help="images sampled (default: 16)")
    calibrate_kv.add_argument("--drafter-share", type=float, default=0.1,
                              help="the share of (layer, scale) pairs marked drafters (default: 0.1)")
    calibrate_kv.add_argument("--batch-size", type=int_in_range(1), default=8,
                              help="images per sampling call (default: 8)")
    add_seed_and_device(calibrate_kv)
    calibrate_kv.add_argument("--out", required=True, help="the calibration .json (the heat map: same name, .png)")
    calibrate_kv.set_defaults(func=cmd_calibrate_kv)

    for name, help_text in (
        ("train", "train a tokenizer | var | gpt on an image folder, or export a checkpoint (`vartk train JOB -h`)"),
        ("fid", "sample with the standard protocol and score FID / IS (see `vartk fid --help`)"),
        ("bench", "sampling throughput and memory table (see `vartk bench --help`)"),
        ("demo", "launch the Gradio workbench: sample, edit, compare"),
    ):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def run_train(argv: list[str]) -> None:
    from .train import train_main

    usage = "vartk train JOB [flags]: JOB is tokenizer, var, gpt or export (`vartk train JOB --help` lists its flags)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return
    if not argv or argv[0].startswith("-"):
        raise SystemExit(usage)
    train_main(argv[0], argv[1:])


def run_fid(argv: list[str]) -> None:
    from .evaluation import main as fid_main

    fid_main(argv)


def run_bench(argv: list[str]) -> None:
    from .bench import main as bench_main

    bench_main(argv)


def run_demo(argv: list[str]) -> None:
    from .demo import main as demo_main

    demo_main(argv)


PASSTHROUGH = {"train": run_train, "fid": run_fid, "bench": run_bench, "demo": run_demo}


def main(argv: list[str] | None = None) -> None:
    """Bad input (ValueError, a missing or unreadable file, a failed check) ends with one line naming it, prefixed
    "vartk <command>:"; VARTK_DEBUG=1 shows the traceback of the first two instead."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in PASSTHROUGH:  # these parse their own flags
            PASSTHROUGH[argv[0]](argv[1:])
            return
        args = build_parser().parse_args(argv)
        args.func(args)
    except (ValueError, OSError) as err:
        if os.environ.get("VARTK_DEBUG"):
            raise
        raise SystemExit(f"vartk {argv[0] if argv else ''}: {err}")
    except SystemExit as stop:  # a message from a check: one "vartk <command>:" prefix for every command
        if isinstance(stop.code, str) and not stop.code.startswith("vartk"):
            raise SystemExit(f"vartk {argv[0]}: {stop.code}") from None
        raise


if __name__ == "__main__":
    main()
