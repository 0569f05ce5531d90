"""Shared pieces of the training tests: tiny tokenizer settings and flags, image folders, run logs, killed runs,
and the fixtures a test module imports to use (`one_thread` is autouse there)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vartk.tokenizers.msvq import MultiScaleVQVAE

SIZE = 8  # px; the tiny tokenizers downsample by 2 -> 4x4 latents
TOKENIZER = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, vocab_size=16, norm_groups=4)
TOKENIZER_ARGS = ["--ch", "8", "--ch-mult", "1,2", "--num-res-blocks", "1", "--z-channels", "4", "--vocab-size", "16",
                  "--norm-groups", "4", "--patch-nums", "1,2,4"]
FAST = ["--image-size", str(SIZE), "--no-progress", "--warmup-steps", "2", "--sample-every", "0", "--num-samples", "4"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs are fastest on one thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_images(folder: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    """Class folders of smooth random RGB PNGs (a colour gradient per image)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 12)[:, None, None]  # 12 px, so loading also resizes
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            low, high = rng.random(3), rng.random(3)
            pixels = ((low + (high - low) * ramp * ramp.transpose(1, 0, 2)) * 255).astype(np.uint8)  # [12, 12, 3]
            Image.fromarray(pixels).save(folder / f"class_{c}" / f"{i}.png")
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    return write_images(tmp_path / "images", classes=2, per_class=4)


def save_tokenizer(folder: Path, patch_nums) -> str:
    torch.manual_seed(0)
    MultiScaleVQVAE(**TOKENIZER, patch_nums=patch_nums, share_quant_resi=min(4, len(patch_nums))).save_pretrained(folder)
    return str(folder)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def job_args(job: str, images: Path, tmp_path: Path) -> list[str]:
    if job == "tokenizer":
        return TOKENIZER_ARGS
    if job == "var":
        return ["--tokenizer", save_tokenizer(tmp_path / "msvq", (1, 2, 4)), "--depth", "2", "--width", "32",
                "--num-heads", "2"]
    return ["--tokenizer", save_tokenizer(tmp_path / "vq1", (4,)), "--dim", "32", "--n-layer", "2", "--n-head", "2",
            "--multiple-of", "16"]


def kill_after(run: Path, step: int, into: Path) -> None:
    """A run killed one step and a half after checkpoint `step`: a fresh --out holding only that checkpoint and
    the log up to then, its last line cut short."""
    name = f"step_{step:07d}"
    (into / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / name, into / "checkpoints" / name)
    (into / "checkpoints" / "latest").write_text(name + "\n")
    lines = [line for line in (run / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step + 1]
    (into / "log.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:10])
