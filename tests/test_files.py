"""vartk.files: atomic writes leave the old file on failure and give new files the umask's permissions."""
import os

import pytest

import torch
from safetensors.torch import save_file

from vartk.files import write_file_atomic, write_folder_atomic, write_text_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "results.json", "old")

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_file_atomic(path, crash)
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_written_files_are_readable_as_the_umask_allows(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "stats.json", "{}")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # a tempfile.NamedTemporaryFile would have made it 0o600


def test_a_written_folder_of_safetensors_is_readable_as_the_umask_allows(tmp_path):
    def write(folder):
        folder.mkdir()
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")  # safetensors makes it 0o600

    umask = os.umask(0o022)
    try:
        folder = write_folder_atomic(tmp_path / "pipeline", write)
    finally:
        os.umask(umask)
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644
