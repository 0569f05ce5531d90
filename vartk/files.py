"""Writing results so that a crash never leaves a half-written file or folder in their place."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` to a hidden temporary file next to `path` (unique per process), then rename it over `path`.
    The file gets the ordinary permissions of the umask (a tempfile module file would be private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as written:  # on disk before the rename, so a power loss leaves the old file or this
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_file_atomic(path, lambda tmp: tmp.write_text(text))


def write_folder_atomic(destination: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` into `<destination>.tmp`, then swap it in by renames (the old folder is moved aside
    first and deleted last), so `destination` is never half-written and a crash keeps one complete copy."""
    destination = Path(destination)
    tmp = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    give_umask_permissions(tmp)
    if destination.exists():
        old = destination.with_name(destination.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(destination, old)
        os.replace(tmp, destination)
        shutil.rmtree(old)
    else:
        os.replace(tmp, destination)
    return destination


def give_umask_permissions(folder: Path) -> None:
    """Give every file under `folder` the umask's ordinary permissions: safetensors writes its files private (0600),
    unlike the JSON beside them, which breaks a model folder shared between users."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def refuse_foreign_folder(destination: str | os.PathLike, marker: str, flag: str = "--out") -> None:
    """Raise ValueError if `destination` is a file, or a non-empty folder without `marker` (the file every earlier
    copy of this output has, e.g. model_index.json): replacing it would delete what is not ours to delete."""
    destination = Path(destination)
    if destination.is_file():
        raise ValueError(f"{flag} {destination} is a file; give a folder")
    if destination.is_dir() and any(destination.iterdir()) and not (destination / marker).is_file():
        raise ValueError(f"{flag} {destination} holds other files (no {marker}); give a new or empty folder, or "
                         "an earlier output of this command to replace")


def check_writable(folder: Path, what: str) -> None:
    """Raise one ValueError unless files can be created in `folder`, or in the nearest existing folder above it
    when it is yet to be made: a probe file is made and removed (permission bits say nothing for root or
    read-only mounts). `what` names the path in the message, e.g. "--out runs/x"."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise ValueError(f"{what}: cannot write into {existing} ({err.strerror})") from None
