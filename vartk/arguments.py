"""argparse types and checks that the `vartk` subcommands share (sample, inpaint, fid, bench, demo)."""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import torch

from .files import check_writable

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SAMPLE_FILE = re.compile(r"\d{5,}\.png")  # the names of the PNGs a folder --out receives: 00000.png, ...
MAX_GRID_IMAGES = 256  # the most images a .png --out (one grid, held in memory whole) takes; a folder takes any number


def check_output(out: Path) -> Path:
    """Refuse, before any sampling, an --out that could not be written: another image type than .png, a .png path
    that is a folder or under a file, a folder that is a file or holds anything but earlier samples (which a new
    run replaces), a place we may not write to."""
    from PIL import Image

    suffix = out.suffix.lower()
    if suffix != ".png" and suffix in Image.registered_extensions():
        raise SystemExit(f"--out {out}: grids are written as PNG; give a .png path, or a folder name")
    if suffix == ".png":
        if out.is_dir():
            raise SystemExit(f"--out {out} is a folder; give a .png file for a grid, or a folder name")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise SystemExit(f"--out {out}: {out.parent} is not a folder")
    elif out.is_file():
        raise SystemExit(f"--out {out} is a file; give a .png path for a grid, or a folder")
    elif out.is_dir():
        others = sorted(p.name for p in out.iterdir() if not SAMPLE_FILE.fullmatch(p.name))
        if others:
            raise SystemExit(f"--out {out} holds other files ({others[:3]}); give a new or empty folder")
    check_writable(out.absolute().parent, f"--out {out}")
    return out


def check_grid_size(out: Path, count: int) -> None:
    """Refuse, before any sampling, a grid (a .png --out) of more than MAX_GRID_IMAGES images: a grid is held in
    memory whole and too large to look at, where a folder is written one batch at a time."""
    if out.suffix.lower() == ".png" and count > MAX_GRID_IMAGES:
        raise SystemExit(f"--out {out}: a grid of {count} images is too many (at most {MAX_GRID_IMAGES}); give a "
                         f"folder name, e.g. --out {out.with_suffix('')}, to write one PNG per image")


def check_not_input(out: Path, image: Path) -> None:
    """Refuse an --out that would replace the input --image: the same file by any path (./a.png, a symlink, a hard
    link) or a folder holding it (a folder --out is replaced as a whole)."""
    if not image.exists():
        return  # reading it fails with its own message
    if (out.exists() and os.path.samefile(out, image)) or out.resolve() in image.resolve().parents:
        raise SystemExit(f"--out {out} would overwrite the input --image {image}; give another path")


def class_arguments(classes: list[str], class_names: list[str] | None) -> list[int | str]:
    """--class values: a name of the model's classes as that name (folders may be named 0, 1, 10, 2), other
    integers as ids, anything else as a name (the pipeline checks both)."""
    return [c if c in (class_names or ()) or not c.lstrip("-").isdigit() else int(c) for c in classes]


def int_in_range(minimum: int, maximum: int | None = None):
    """argparse type: an integer in [minimum, maximum] (no maximum: >= minimum)."""
    allowed = f">= {minimum}" if maximum is None else f"in {minimum}-{maximum}"

    def parse(text: str) -> int:
        digits = text.isascii() and text.isdigit()  # no sign, no unicode digits
        if not digits or int(text) < minimum or (maximum is not None and int(text) > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {allowed}, got {text!r}")
        return int(text)
    return parse


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 ... 2^64 - 1 (negative ones wrap around)
parse_seed = int_in_range(0, MAX_SEED)


def parse_device(text: str) -> str:
    """argparse type of --device: a torch device that exists here."""
    from .loading import check_device

    try:
        check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))
    return text


def parse_box(text: str) -> tuple[float, float, float, float]:
    """argparse type of --box: y0,x0,y1,x1 fractions of the image with 0 <= y0 < y1 <= 1, 0 <= x0 < x1 <= 1."""
    try:
        y0, x0, y1, x1 = (float(v) for v in text.split(","))
        valid = 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
    except ValueError:  # not four numbers
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{text!r} must be four fractions y0,x0,y1,x1 with 0 <= y0 < y1 <= 1 and "
                                         "0 <= x0 < x1 <= 1, e.g. 0.25,0.25,0.75,0.75")
    return y0, x0, y1, x1


def box_mask(box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """1 on the tokens a box touches (rounded outward, so a thin box still covers a row), else 0: [size, size]."""
    y0, x0, y1, x1 = box
    mask = torch.zeros(size, size)  # [h, w]
    mask[math.floor(y0 * size) : math.ceil(y1 * size), math.floor(x0 * size) : math.ceil(x1 * size)] = 1
    return mask


def parse_spec_flag(spec: str | None, kind: str, pipe):
    """A `--sampler` / `--kv-cache` spec (`kind`: "sampler" / "kv-cache") -> a registered object of `pipe`'s family
    (None stays None); a bad spec ends the command with one line naming it and what is available."""
    try:
        return None if spec is None else pipe.resolve(spec, kind)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"bad --{kind} {spec!r}: {err}")
