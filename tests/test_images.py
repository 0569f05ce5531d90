"""vartk.images: one way to read image files, for training data, FID sets and uploads."""
import numpy as np
import pytest
from PIL import Image

from vartk.images import list_images, open_rgb


def test_transparency_goes_onto_white(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)  # [H, W, RGBA]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    alpha = rgba[..., 3:].astype(np.float64) / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)  # "over" a white background
    assert np.abs(np.asarray(open_rgb(tmp_path / "a.png")).astype(np.float64) - expected).max() <= 1


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint16)  # 8-bit values
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "g8.png")
    Image.fromarray(grey * 257).save(tmp_path / "g16.png")  # the same picture in 16 bits
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    expected = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
    for name in ("g8.png", "g16.png"):
        assert np.array_equal(np.asarray(open_rgb(tmp_path / name)), expected), name


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken.png is not a readable image"):
        open_rgb(tmp_path / "broken.png")


def test_hidden_files_and_folders_are_not_images(tmp_path):
    for name in ("a/1.png", "a/._1.png", ".ipynb_checkpoints/2.png", "b/c/3.JPG", "b/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a/1.png", "b/c/3.JPG"]
    with pytest.raises(FileNotFoundError, match=r"missing.png does not exist$"):
        open_rgb(tmp_path / "missing.png")
