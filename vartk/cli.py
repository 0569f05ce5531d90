"""The `vartk` command: sample | convert | inpaint | train | fid | bench | demo."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .samplers import KV_CACHE_SPEC_HELP, SAMPLER_SPEC_HELP


def _save_images(images: torch.Tensor, out: Path) -> None:
    """Write [B, 3, H, W] images in [0, 1] as one PNG grid (`out` ends in .png) or a folder of PNGs."""
    from PIL import Image
    from torchvision.utils import make_grid

    from .files import write_file_atomic
    from .pipelines import images_to_uint8

    def write_png(tensor, path: Path):
        write_file_atomic(path, lambda tmp: Image.fromarray(images_to_uint8(tensor[None])[0]).save(tmp, format="PNG"))

    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        write_png(make_grid(images, nrow=math.ceil(math.sqrt(images.shape[0])), padding=2, pad_value=1.0), out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            write_png(image, out / f"{i:05d}.png")


def _resolve_classes(pipe, classes: list[str]) -> list[int]:
    """Class ids given as integers or, when the model ships class names, as names."""
    names = getattr(pipe, "class_names", None) or []
    ids = []
    for c in classes:
        if c.lstrip("-").isdigit():
            ids.append(int(c))
        elif c in names:
            ids.append(names.index(c))
        else:
            allowed = f"one of {names}" if names else f"an integer in [0, {pipe.num_classes})"
            raise SystemExit(f"vartk: unknown class {c!r}; use {allowed}")
    return ids


def _parse_object(spec: str | None, kind: str):
    """A `--sampler` / `--kv-cache` spec -> an object from vartk.samplers (None stays None)."""
    from .samplers import from_spec

    try:
        return None if spec is None else from_spec(spec)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"vartk: bad --{kind} {spec!r}: {err}")


def cmd_sample(args) -> None:
    from .pipelines import load

    pipe = load(args.model, device=args.device)
    labels = _resolve_classes(pipe, args.classes)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    try:
        out = pipe(
            class_labels=labels, num_images_per_label=args.n, generator=generator, output_type="pt",
            sampler=_parse_object(args.sampler, "sampler"), kv_cache=_parse_object(args.kv_cache, "kv-cache"),
            guidance_scale=args.cfg, top_k=args.top_k, top_p=args.top_p,
        )
    except ValueError as err:
        raise SystemExit(f"vartk sample: {err}")
    _save_images(out.images, Path(args.out))
    print(f"wrote {out.images.shape[0]} images to {args.out}")


def cmd_convert(args) -> None:
    from .pipelines import GPTPipeline, VARPipeline

    if args.var and args.vae:
        pipe = VARPipeline.from_official(vae=args.vae, var=args.var)
    elif args.gpt and args.vq:
        pipe = GPTPipeline.from_official(vq=args.vq, gpt=args.gpt, model=args.gpt_model, image_size=args.image_size)
    else:
        raise SystemExit("vartk convert: give --vae and --var (VAR) or --vq and --gpt (LlamaGen)")
    pipe.save_pretrained(args.out)
    print(f"wrote {type(pipe).__name__} to {args.out}")


def cmd_inpaint(args) -> None:
    from .images import open_rgb
    from .pipelines import load

    pipe = load(args.model, device=args.device)
    size = pipe.tokenizer.latent_size
    y0, x0, y1, x1 = (float(v) for v in args.box.split(","))
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise SystemExit(f"vartk inpaint: --box {args.box!r} must be y0,x0,y1,x1 fractions with 0 <= y0 < y1 <= 1")
    box = torch.zeros(size, size)  # [h, w], 1 inside the box
    box[round(y0 * size) : round(y1 * size), round(x0 * size) : round(x1 * size)] = 1
    keep = box if args.outpaint else 1 - box
    label = _resolve_classes(pipe, [args.class_label])[0] if args.class_label is not None else None
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    try:
        out = pipe.inpaint(open_rgb(args.image), keep, class_label=label, generator=generator, output_type="pt")
    except ValueError as err:
        raise SystemExit(f"vartk inpaint: {err}")
    _save_images(out.images, Path(args.out))
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vartk", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser("sample", help="sample class-conditional images to a PNG grid or folder")
    sample.add_argument("--model", default="default", help="built-in name, official name (var-d16, llamagen-b) or folder")
    sample.add_argument("--class", dest="classes", nargs="+", default=["0"], help="class ids (or names)")
    sample.add_argument("--n", type=int, default=4, help="images per class")
    recipe = "(default: the model's saved setting, else the family's official one)"
    sample.add_argument("--cfg", type=float, default=None, help=f"guidance scale {recipe}")
    sample.add_argument("--top-k", type=int, default=None, help=f"0 = off {recipe}")
    sample.add_argument("--top-p", type=float, default=None, help=f"1 = off {recipe}")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--sampler", default=None, help=SAMPLER_SPEC_HELP)
    sample.add_argument("--kv-cache", default=None, help=KV_CACHE_SPEC_HELP)
    sample.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sample.add_argument("--out", default="samples.png", help="a .png path for a grid, else a folder")
    sample.set_defaults(func=cmd_sample)

    convert = sub.add_parser("convert", help="official checkpoint files -> a vartk folder (safetensors + JSON)")
    convert.add_argument("--vae", help="vae_ch160v4096z32.pth")
    convert.add_argument("--var", help="var_d16.pth ... var_d36.pth")
    convert.add_argument("--vq", help="vq_ds16_c2i.pt")
    convert.add_argument("--gpt", help="c2i_B_256.pt ...")
    convert.add_argument("--gpt-model", default="GPT-B", help="GPT-B, GPT-L, GPT-XL, GPT-XXL or GPT-3B")
    convert.add_argument("--image-size", type=int, default=256, help="256 or 384, as in the c2i file name")
    convert.add_argument("--out", required=True)
    convert.set_defaults(func=cmd_convert)

    inpaint = sub.add_parser("inpaint", help="zero-shot in/out-painting or class-conditional editing (VAR)")
    inpaint.add_argument("--model", default="default")
    inpaint.add_argument("--image", required=True)
    inpaint.add_argument("--box", required=True, help="region y0,x0,y1,x1 as fractions of the image")
    inpaint.add_argument("--outpaint", action="store_true", help="keep the box, regenerate the rest")
    inpaint.add_argument("--class", dest="class_label", default=None, help="class for editing; none = in/out-paint")
    inpaint.add_argument("--seed", type=int, default=0)
    inpaint.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    inpaint.add_argument("--out", default="inpaint.png")
    inpaint.set_defaults(func=cmd_inpaint)

    for name, help_text in (
        ("train", "train a tokenizer | var | gpt on an image folder, or export a checkpoint (`vartk train JOB -h`)"),
        ("fid", "sample with the standard protocol and score FID / IS (see `vartk fid --help`)"),
        ("bench", "sampling throughput and memory table (see `vartk bench --help`)"),
        ("demo", "launch the Gradio demo"),
    ):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def run_train(argv: list[str]) -> None:
    from .train import train_main

    if not argv or argv[0].startswith("-"):
        raise SystemExit("vartk train: give a job first: tokenizer, var, gpt or export (then --help for its flags)")
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
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:  # these parse their own flags
        PASSTHROUGH[argv[0]](argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
