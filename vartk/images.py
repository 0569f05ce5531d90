"""Images in and out, the same way everywhere: reading files (training data, FID references, the demo's uploads),
converting what a tokenizer decodes to uint8 / PIL / tensors, writing PNG grids and folders."""
from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import write_file_atomic, write_folder_atomic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # PIL's modes for 16-bit (and 32-bit int) grey images


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparent pixels composited onto white (as emoji and icons are drawn), 16-bit grey scaled
    to 8 bits (PIL's own conversion clips it, which turns most such images white)."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) / 257.0  # [H, W], 0..65535 -> 0..255
        return Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file at `path` as 8-bit RGB (`to_rgb`), turned upright as its EXIF orientation says (phone
    photos); a file that is not an image raises one ValueError naming it."""
    try:
        with Image.open(path) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image ({err})") from err


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted; names starting with '.' (hidden folders such as
    unfinished sample shards or .ipynb_checkpoints, macOS ._ files) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    return sorted(files)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], rounding (what every PNG vartk writes holds)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def resize_and_clamp(decoded: torch.Tensor, output_size: int | None) -> torch.Tensor:
    """A tokenizer's unclamped output [B, 3, H, W] (about [0, 1]) -> float images [B, 3, S, S] in [0, 1], S =
    output_size (None: H). The bicubic resize comes before the clamp, as in LlamaGen's FID script (384 px samples
    scored at 256): clamping first would cut the overshoot the resize averages in."""
    decoded = decoded.float()
    if output_size is not None and decoded.shape[-2:] != (output_size, output_size):
        decoded = F.interpolate(decoded, size=(output_size, output_size), mode="bicubic", align_corners=False)
    return decoded.clamp(0, 1)


def images_to_output(images: torch.Tensor, output_type: str):
    """[B, 3, H, W] float in [0, 1] -> the requested output type."""
    if output_type == "pt":
        return images
    array = images_to_uint8(images)  # [B, H, W, 3]
    if output_type == "np":
        return array
    return [Image.fromarray(a) for a in array]


def pil_arrays(images: list) -> list[np.ndarray]:
    """A list of PIL images, all of one size -> their uint8 RGB arrays [H, W, 3]; else one TypeError / ValueError."""
    if not images:
        raise ValueError("the image list is empty; give at least one image")
    if not all(isinstance(im, Image.Image) for im in images):
        raise TypeError(f"a list of images must hold PIL images only, got "
                        f"{sorted({type(im).__name__ for im in images})}")
    sizes = sorted({im.size for im in images})
    if len(sizes) > 1:
        raise ValueError(f"the images have different sizes {sizes} (width, height); give images of one size")
    return [np.asarray(to_rgb(im)) for im in images]


def write_png(image: torch.Tensor, path: Path) -> None:
    """One [3, H, W] image in [0, 1] as an 8-bit RGB PNG file."""
    Image.fromarray(images_to_uint8(image[None])[0]).save(path, format="PNG")


def save_image_batches(batches: Iterable[torch.Tensor], out: Path) -> None:
    """Write batches of [B, 3, H, W] images in [0, 1] as one PNG grid (`out` ends in .png: the batches joined) or
    as a folder of PNGs 00000.png, ...: each batch is written as it comes, so a folder holds one batch in memory at a
    time, and the folder replaces its earlier samples as a whole once the last batch is written."""
    from torchvision.utils import make_grid

    if out.suffix.lower() == ".png":
        images = torch.cat([batch.cpu() for batch in batches])  # [B, 3, H, W]
        grid = make_grid(images, nrow=math.ceil(math.sqrt(images.shape[0])), padding=2, pad_value=1.0)
        write_file_atomic(out, lambda tmp: write_png(grid, tmp))
        return

    def write_folder(folder: Path):
        folder.mkdir(parents=True)
        for i, image in enumerate(itertools.chain.from_iterable(batches)):
            write_png(image, folder / f"{i:05d}.png")

    write_folder_atomic(out, write_folder)
