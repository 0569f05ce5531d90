"""tools/make_emoji_dataset.py on a tiny fake emoji-datasource package tree (no network)."""
import csv
import hashlib
import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_emoji_dataset.py"
spec = importlib.util.spec_from_file_location("make_emoji_dataset", TOOL)
tool = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
spec.loader.exec_module(tool)

TONES = ("1F3FB", "1F3FF")


def entry(code: str, category: str, tones=(), vendors=("google", "twitter")) -> dict:
    flags = {f"has_img_{v}": v in vendors for v in ("apple", "google", "twitter", "facebook")}
    item = {"unified": code, "image": f"{code.lower()}.png", "category": category, **flags}
    if tones:
        item["skin_variations"] = {t: {"unified": f"{code}-{t}", "image": f"{code.lower()}-{t.lower()}.png", **flags}
                                   for t in tones}
    return item


TABLE = [
    entry("1F600", "Smileys & Emotion"),
    entry("1F385", "People & Body", tones=TONES),
    entry("1F44B", "People & Body", tones=TONES, vendors=("twitter",)),
    entry("1F1EA-1F1EC", "Flags"),
    entry("1F34E", "Food & Drink"),
    entry("1F3FB", "Component"),
] + [entry(f"1F{0x680 + i:03X}", "Travel & Places") for i in range(12)]


def fake_package(root: Path, vendor: str) -> Path:
    """package/emoji.json + img/<vendor>/64/*.png: half-transparent red squares."""
    package = root / vendor / "package"
    images = package / "img" / vendor / "64"
    images.mkdir(parents=True)
    (package / "emoji.json").write_text(json.dumps(TABLE))
    (package / "LICENSE").write_text(f"{vendor} licence")
    pixels = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    pixels.paste((255, 0, 0, 255), (16, 16, 48, 48))
    for item in TABLE:
        for variant in [item, *item.get("skin_variations", {}).values()]:
            if variant[f"has_img_{vendor}"]:
                pixels.save(images / variant["image"])
    return package


@pytest.fixture
def dataset(tmp_path):
    packages = {vendor: fake_package(tmp_path / "npm", vendor) for vendor in ("google", "twitter")}
    rows = tool.build_dataset(packages, tmp_path / "out", val_fraction=0.2, test_fraction=0.2)
    return tmp_path / "out", rows


def read_csv(out: Path) -> list[dict]:
    with open(out / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_one_emoji_never_in_both_splits(dataset):
    out, _ = dataset
    rows = read_csv(out)
    splits_of = {}
    for row in rows:
        splits_of.setdefault(row["base_code"], set()).add(row["split"])
        assert row["code"].startswith(row["base_code"])
    assert all(len(splits) == 1 for splits in splits_of.values()), splits_of
    assert {s for splits in splits_of.values() for s in splits} == {"train", "val", "test"}  # all used here
    for row in rows:
        assert row["split"] == tool.split_of(row["base_code"], 0.2, 0.2)


def test_metadata_rows_cover_every_image_and_variant(dataset):
    out, _ = dataset
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "split", "vendor", "category", "code", "base_code", "skin_tone"]
    # 15 plain emoji x 2 vendors + santa (base + 2 tones) x 2 vendors + wave (base + 2 tones) on twitter only
    assert len(rows) == 15 * 2 + 3 * 2 + 3
    assert not [r for r in rows if r["category"] == "component"]  # the skin-tone swatches are dropped
    wave = sorted((r["vendor"], r["skin_tone"]) for r in rows if r["base_code"] == "1F44B")
    assert wave == [("twitter", ""), ("twitter", "1F3FB"), ("twitter", "1F3FF")]
    paths = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert paths == sorted(r["path"] for r in rows)
    for row in rows:
        assert row["path"] == f"{row['split']}/{row['category']}/{row['vendor']}_{row['code'].lower()}.png"


def test_classes_are_sorted_category_folders_and_images_are_rgb_on_white(dataset):
    out, _ = dataset
    classes = json.loads((out / "classes.json").read_text())
    assert [c["folder"] for c in classes] == ["flags", "food_drink", "people_body", "smileys_emotion", "travel_places"]
    assert [c["index"] for c in classes] == list(range(5))
    assert classes[2]["name"] == "People & Body"
    image = Image.open(next(out.rglob("*.png")))
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((32, 32)) == (255, 0, 0)


def sha256_fraction(code: str) -> float:
    """The split's hash, computed here independently: sha256 of the upper-case code, first 4 bytes."""
    return int(hashlib.sha256(code.upper().encode()).hexdigest()[:8], 16) / 2**32


def test_hash_split_is_deterministic_and_near_the_fractions():
    codes = [f"{0x1F000 + i:X}" for i in range(4000)]
    splits = [tool.split_of(c, 0.05, 0.05) for c in codes]
    assert splits == [tool.split_of(c, 0.05, 0.05) for c in codes]
    assert 0.035 < splits.count("val") / len(codes) < 0.065 and 0.035 < splits.count("test") / len(codes) < 0.065
    assert tool.split_of("1f600", 0.05, 0.05) == tool.split_of("1F600", 0.05, 0.05)
    for code, split in zip(codes, splits):
        h = sha256_fraction(code)
        assert split == ("val" if h < 0.05 else "test" if h < 0.1 else "train")


def test_the_training_split_is_the_one_of_a_single_ten_percent_held_out_split():
    """The shipped models were trained on the codes with h >= 0.1; val + test must not take any of them."""
    codes = [f"{0x1F000 + i:X}" for i in range(4000)]
    assert [tool.split_of(c, 0.05, 0.05) == "train" for c in codes] == [sha256_fraction(c) >= 0.1 for c in codes]


def test_the_attribution_travels_with_the_images(dataset):
    out, _ = dataset
    assert "CC-BY 4.0" in (out / "NOTICE").read_text()
    assert (out / "LICENSE-emoji-datasource-twitter").read_text() == "twitter licence"


def test_a_killed_unpack_is_redone(tmp_path, monkeypatch):
    """A package whose unpacking was killed after emoji.json is not taken for a complete one."""
    source = fake_package(tmp_path / "src", "google").parent  # holds package/
    version, cache = tool.DEFAULT_VERSION, tmp_path / "npm"
    cache.mkdir()
    with tarfile.open(cache / f"emoji-datasource-google-{version}.tgz", "w:gz") as archive:
        archive.add(source / "package" / "emoji.json", arcname="package/emoji.json")  # first, as in the real one
        archive.add(source / "package" / "img", arcname="package/img")
    extract = tarfile.TarFile.extractall

    def killed(self, path, **kwargs):
        self.extract(self.getmember("package/emoji.json"), path, filter="data")
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", killed)
    with pytest.raises(KeyboardInterrupt):
        tool.fetch_package("google", version, cache)
    monkeypatch.setattr(tarfile.TarFile, "extractall", extract)
    package = tool.fetch_package("google", version, cache)
    assert len(list((package / "img" / "google" / "64").iterdir())) == len(list(
        (source / "package" / "img" / "google" / "64").iterdir()))


def test_non_open_vendors_are_refused(tmp_path):
    for vendor in ("apple", "facebook"):
        with pytest.raises(SystemExit, match="not allowed"):
            tool.fetch_package(vendor, tool.DEFAULT_VERSION, tmp_path)
