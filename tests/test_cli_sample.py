"""`vartk sample` splits the images into batches: one generator runs through them, a folder is written batch by batch,
the images held at once do not grow with --n, and a grid too large to hold is refused before anything is sampled."""
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import vartk.loading
from vartk.cli import main as cli_main
from vartk.pipelines import VARPipeline


class RecordingPipeline(VARPipeline):
    """A tiny VARPipeline that records the labels of every call, how many of the images its calls returned are alive
    at once (at most), and how many PNGs the folder `watch` holds when each call begins."""

    def __init__(self, tokenizer, transformer, watch=None):
        super().__init__(tokenizer=tokenizer, transformer=transformer)
        self.watch, self.calls, self.files_written, self.alive, self.peak_alive = watch, [], [], 0, 0

    def __call__(self, class_labels, **kwargs):
        self.calls.append(list(class_labels))
        self.files_written.append(len(list(self.watch.glob("*.png"))) if self.watch and self.watch.is_dir() else 0)
        out = super().__call__(class_labels, **kwargs)
        self.alive += len(class_labels)
        self.peak_alive = max(self.peak_alive, self.alive)
        weakref.finalize(out.images, self.release, len(class_labels))
        return out

    def release(self, count: int) -> None:
        self.alive -= count


@pytest.fixture
def recording(var_models, monkeypatch):
    """A function that makes a RecordingPipeline (optionally watching a folder) and has `vartk sample` load it."""
    transformer, tokenizer = var_models

    def make(watch=None):
        pipe = RecordingPipeline(tokenizer, transformer, watch)
        monkeypatch.setattr(vartk.loading, "load", lambda name, device: pipe)
        return pipe
    return make


def read_folder(folder, count):
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(count)]
    return np.stack([np.asarray(Image.open(folder / f"{i:05d}.png")) for i in range(count)])  # [N, H, W, 3]


def test_batches_share_one_generator_and_the_statistics_cover_them_all(recording, tmp_path, capsys):
    pipe = recording()
    cli_main(["sample", "--class", "1", "2", "--n", "5", "--batch-size", "4", "--seed", "3", "-v", "--device", "cpu",
              "--out", str(tmp_path / "samples")])
    batches = [[1, 1, 1, 1], [1, 2, 2, 2], [2, 2]]
    assert pipe.calls == batches
    printed = capsys.readouterr()
    assert "10 images, 9 transformer forwards (3.0 per image)" in printed.out  # 3 calls of 3 scales
    assert "10/10" in printed.err  # one progress bar over all the images
    generator = torch.Generator().manual_seed(3)
    expected = np.concatenate([pipe(class_labels=labels, generator=generator, output_type="np", progress=False).images
                               for labels in batches])
    np.testing.assert_array_equal(read_folder(tmp_path / "samples", 10), expected)


def test_one_batch_is_the_single_pipeline_call(recording, tmp_path):
    pipe = recording()
    cli_main(["sample", "--class", "1", "2", "--n", "5", "--batch-size", "10", "--seed", "3", "--device", "cpu",
              "--out", str(tmp_path / "samples")])
    assert pipe.calls == [[1] * 5 + [2] * 5]
    expected = pipe(class_labels=[1, 2], num_images_per_label=5, generator=torch.Generator().manual_seed(3),
                    output_type="np", progress=False).images
    np.testing.assert_array_equal(read_folder(tmp_path / "samples", 10), expected)


def test_the_default_batch_size_on_a_cpu_is_16(recording, tmp_path):
    pipe = recording()
    cli_main(["sample", "--n", "17", "--device", "cpu", "--out", str(tmp_path / "samples")])
    assert [len(labels) for labels in pipe.calls] == [16, 1]


def test_a_folder_is_written_batch_by_batch_and_the_images_held_do_not_grow_with_n(recording, tmp_path):
    peaks = {}
    for n in (4, 10):
        out = tmp_path / f"n{n}"
        pipe = recording(watch=out.with_name(out.name + ".tmp"))  # write_folder_atomic's temporary folder
        cli_main(["sample", "--n", str(n), "--batch-size", "2", "--device", "cpu", "--out", str(out)])
        assert [len(labels) for labels in pipe.calls] == [2] * (n // 2)
        assert pipe.files_written == list(range(0, n, 2))  # each batch's PNGs are on disk before the next is sampled
        assert read_folder(out, n).shape[0] == n
        peaks[n] = pipe.peak_alive
    assert peaks[10] == peaks[4] <= 2 * 2  # the batch being sampled and, at most, the one before it


def test_a_grid_too_large_to_hold_is_refused_before_sampling(recording, tmp_path):
    pipe = recording()
    with pytest.raises(SystemExit, match=r"vartk sample: --out \S*grid.png: a grid of 100000 images is too many \(at "
                                         r"most 256\); give a folder name, e.g. --out \S*/grid, to write one PNG per "
                                         r"image"):
        cli_main(["sample", "--n", "100000", "--device", "cpu", "--out", str(tmp_path / "grid.png")])
    with pytest.raises(SystemExit, match="a grid of 258 images"):
        cli_main(["sample", "--class", "1", "2", "--n", "129", "--device", "cpu", "--out", str(tmp_path / "grid.png")])
    assert pipe.calls == [] and not (tmp_path / "grid.png").exists()
    cli_main(["sample", "--class", "1", "2", "--n", "128", "--batch-size", "256", "--device", "cpu",
              "--out", str(tmp_path / "grid.png")])
    assert [len(labels) for labels in pipe.calls] == [256] and (tmp_path / "grid.png").is_file()


def test_a_bad_class_in_a_later_batch_is_refused_before_the_first_is_sampled(recording, tmp_path):
    pipe = recording()
    with pytest.raises(SystemExit, match=r"class id 10 is outside \[0, 10\)"):
        cli_main(["sample", "--class", "1", "10", "--n", "4", "--batch-size", "4", "--device", "cpu",
                  "--out", str(tmp_path / "samples")])
    assert pipe.calls == [] and not list(tmp_path.iterdir())
