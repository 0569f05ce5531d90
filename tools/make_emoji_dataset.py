"""Build the emoji image dataset that the small default models train on.

    python tools/make_emoji_dataset.py --out /data/emoji

Sources (fetched with `npm pack`, cached under --cache):
  - emoji-datasource-google  (Noto Emoji art, Apache-2.0, Google)
  - emoji-datasource-twitter (Twemoji art, CC-BY 4.0, Twitter/X)
Both packages (MIT, iamcal/emoji-data) carry the same emoji.json table and one 64x64 RGBA PNG per
emoji and skin-tone variant. Only these two art sets are open-licensed; the apple and facebook
packages are not, and this script refuses them.

Output (an ImageFolder tree; class index = position in the sorted folder names):
  {train,val,test}/<category>/<vendor>_<code>.png  (RGB, composited on white)
  metadata.csv   path, split, vendor, category, code, base_code, skin_tone
  classes.json   [{"index", "folder", "name"}] in class-index order
The categories (the "Component" skin-tone swatches are dropped) and their class indices:
  0 activities, 1 animals_nature, 2 flags, 3 food_drink, 4 objects, 5 people_body,
  6 smileys_emotion, 7 symbols, 8 travel_places
The split is chosen by a hash of the base emoji code, so an emoji, all its skin tones and both
vendors' drawings of it land in the same split. `val` is for choosing things (sampling settings, when
to stop), `test` only for reporting. With the defaults (0.05 + 0.05) the training split is the one the
shipped models were trained on, and val + test together are its former 10 % test split.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vartk.files import write_folder_atomic

VENDORS = ("google", "twitter")
REFUSED_VENDORS = ("apple", "facebook")
DEFAULT_VERSION = "16.0.0"
DROPPED_CATEGORIES = ("Component",)
IMAGE_SIZE = 64


@dataclass(frozen=True)
class EmojiImage:
    vendor: str
    category: str  # the display name, e.g. "Smileys & Emotion"
    code: str  # unified code of this image, e.g. "1F385-1F3FB"
    base_code: str  # unified code of the emoji it is a variant of, e.g. "1F385"
    skin_tone: str  # "" for the base emoji, else the skin_variations key, e.g. "1F3FB" or "1F3FB-1F3FF"
    image_file: str  # file name inside img/<vendor>/64/


def category_folder(name: str) -> str:
    """"Smileys & Emotion" -> "smileys_emotion"."""
    words = name.lower().replace("&", " ").split()
    return "_".join(words)


SPLITS = ("train", "val", "test")


def split_of(base_code: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split: h = the first 32 bits of sha256(code) / 2**32; val if h < val_fraction,
    test if h < val_fraction + test_fraction, else train."""
    digest = hashlib.sha256(base_code.upper().encode()).digest()
    h = int.from_bytes(digest[:4], "big") / 2**32
    return "val" if h < val_fraction else "test" if h < val_fraction + test_fraction else "train"


def emoji_images(table: list[dict], vendor: str) -> list[EmojiImage]:
    """Every image of `vendor` listed in an emoji.json table, skin-tone variants included."""
    has_image = f"has_img_{vendor}"
    images = []
    for entry in table:
        if entry["category"] in DROPPED_CATEGORIES:
            continue
        variants = [("", entry)] + sorted(entry.get("skin_variations", {}).items())
        for skin_tone, variant in variants:
            if variant.get(has_image):
                images.append(EmojiImage(vendor, entry["category"], variant["unified"], entry["unified"], skin_tone,
                                         variant["image"]))
    return images


def fetch_package(vendor: str, version: str, cache: Path) -> Path:
    """`npm pack` emoji-datasource-<vendor>@<version> into `cache` once and unpack it; returns the package folder."""
    if vendor in REFUSED_VENDORS or vendor not in VENDORS:
        raise SystemExit(f"vendor {vendor!r} is not allowed; use one of {VENDORS} (the others are not open-licensed)")
    name = f"emoji-datasource-{vendor}"
    unpacked = cache / f"{name}-{version}"
    if (unpacked / "package" / "emoji.json").is_file():
        return unpacked / "package"
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{name}-{version}.tgz"
    if not tarball.is_file():
        subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(cache)], check=True,
                       stdout=subprocess.DEVNULL)
    partial = unpacked.with_name(unpacked.name + ".tmp")  # renamed once complete: a killed unpack is redone
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(partial, filter="data")
    shutil.rmtree(unpacked, ignore_errors=True)
    os.replace(partial, unpacked)
    return unpacked / "package"


def composite_on_white(png: Path) -> Image.Image:
    """RGBA PNG -> RGB image on a white background, IMAGE_SIZE x IMAGE_SIZE."""
    rgba = Image.open(png).convert("RGBA")
    if rgba.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgba = rgba.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def build_dataset(packages: dict[str, Path], out: Path, val_fraction: float, test_fraction: float) -> list[dict]:
    """Write the ImageFolder tree, metadata.csv and classes.json from unpacked packages {vendor: folder}."""
    rows, names = [], {}
    for vendor, package in sorted(packages.items()):
        table = json.loads((package / "emoji.json").read_text())
        for image in emoji_images(table, vendor):
            source = package / "img" / vendor / "64" / image.image_file
            if not source.is_file():
                raise FileNotFoundError(f"{source} is listed in emoji.json ({image.code}) but missing from the package")
            split = split_of(image.base_code, val_fraction, test_fraction)
            path = Path(split) / category_folder(image.category) / f"{vendor}_{image.code.lower()}.png"
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            composite_on_white(source).save(out / path)
            rows.append({"path": path.as_posix(), "split": split, "vendor": vendor,
                         "category": category_folder(image.category), "code": image.code,
                         "base_code": image.base_code, "skin_tone": image.skin_tone})
            names[category_folder(image.category)] = image.category
    write_metadata(rows, names, out)
    write_credits(packages, out)
    return rows


def write_credits(packages: dict[str, Path], out: Path) -> None:
    """The attribution travels with the images: vartk's NOTICE and each package's LICENSE."""
    shutil.copy(Path(__file__).resolve().parents[1] / "NOTICE", out / "NOTICE")
    for vendor, package in sorted(packages.items()):
        if (package / "LICENSE").is_file():
            shutil.copy(package / "LICENSE", out / f"LICENSE-emoji-datasource-{vendor}")


def write_metadata(rows: list[dict], names: dict[str, str], out: Path) -> None:
    """metadata.csv (sorted by path) and classes.json ({folder: display name} in sorted-folder order)."""
    classes = [{"index": i, "folder": folder, "name": names[folder]} for i, folder in enumerate(sorted(names))]
    (out / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    columns = ["path", "split", "vendor", "category", "code", "base_code", "skin_tone"]
    with open(out / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["path"]))


def summary(rows: list[dict]) -> str:
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        counts[row["category"], row["split"]] = counts.get((row["category"], row["split"]), 0) + 1
    lines = [f"{'category':18s}" + "".join(f" {split:>6s}" for split in SPLITS)]
    for category in sorted({c for c, _ in counts}):
        lines.append(f"{category:18s}" + "".join(f" {counts.get((category, split), 0):6d}" for split in SPLITS))
    totals = [sum(n for (_, s), n in counts.items() if s == split) for split in SPLITS]
    lines.append(f"{'total':18s}" + "".join(f" {total:6d}" for total in totals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (train/, val/, test/, metadata.csv)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vartk" / "npm",
                        help="where the npm tarballs are kept")
    parser.add_argument("--vendors", nargs="+", default=list(VENDORS), help=f"any of {VENDORS}")
    parser.add_argument("--version", default=DEFAULT_VERSION, help="emoji-datasource-* package version")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of emoji codes for choosing settings")
    parser.add_argument("--test-fraction", type=float, default=0.05, help="fraction of emoji codes for reporting")
    args = parser.parse_args(argv)
    if not (0 <= args.val_fraction and 0 <= args.test_fraction and args.val_fraction + args.test_fraction < 1):
        raise SystemExit(f"--val-fraction and --test-fraction must be >= 0 with a sum below 1, got "
                         f"{args.val_fraction} and {args.test_fraction}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise SystemExit(f"--out {args.out} exists and is not an empty folder; give a new folder")
    packages = {vendor: fetch_package(vendor, args.version, args.cache) for vendor in args.vendors}
    rows = []
    write_folder_atomic(args.out, lambda tmp: rows.extend(build_dataset(packages, tmp, args.val_fraction,
                                                                        args.test_fraction)))
    print(summary(rows))


if __name__ == "__main__":
    main()
