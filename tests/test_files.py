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


def _write_files(*names):
    def write(folder):
        folder.mkdir()
        for name in names:
            (folder / name).write_text(name)
    return write


def test_a_stale_temporary_folder_from_a_crash_is_cleared(tmp_path):
    destination = tmp_path / "pipeline"
    write_folder_atomic(destination, _write_files("old.json"))

    def crash(folder):
        _write_files("stale.json")(folder)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_folder_atomic(destination, crash)
    assert (tmp_path / "pipeline.tmp").is_dir()  # what a crash leaves behind
    write_folder_atomic(destination, _write_files("new.json"))
    assert sorted(p.name for p in destination.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_a_failed_swap_keeps_a_complete_old_folder(tmp_path, monkeypatch):
    destination = write_folder_atomic(tmp_path / "pipeline", _write_files("a.json", "b.json"))
    replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("disk full")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(destination, _write_files("new.json"))
    monkeypatch.undo()
    survivors = [p for p in tmp_path.iterdir() if p.name != "pipeline.tmp"]
    assert len(survivors) == 1  # the old copy, moved aside or in place
    assert sorted(p.name for p in survivors[0].iterdir()) == ["a.json", "b.json"]
    assert all(p.read_text() == p.name for p in survivors[0].iterdir())


def test_the_temporary_file_name_carries_the_process_id(tmp_path):
    seen = []
    write_file_atomic(tmp_path / "out.json", lambda tmp: (seen.append(tmp), tmp.write_text("{}")))
    assert seen == [tmp_path / f".out.json.{os.getpid()}.tmp"]
    assert (tmp_path / "out.json").read_text() == "{}" and not seen[0].exists()


def test_an_empty_existing_folder_is_accepted_and_a_foreign_one_refused(tmp_path):
    from vartk.files import refuse_foreign_folder

    empty = tmp_path / "empty"
    empty.mkdir()
    refuse_foreign_folder(empty, "model_index.json")  # an empty folder holds nothing to lose
    refuse_foreign_folder(tmp_path / "new", "model_index.json")
    write_folder_atomic(empty, lambda tmp: (tmp.mkdir(), (tmp / "model_index.json").write_text("{}")))
    assert [p.name for p in empty.iterdir()] == ["model_index.json"]
    refuse_foreign_folder(empty, "model_index.json")  # an earlier output of ours may be replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files"):
        refuse_foreign_folder(foreign, "model_index.json")
    with pytest.raises(ValueError, match="is a file"):
        refuse_foreign_folder(foreign / "notes.txt", "model_index.json")
