"""Official model names (var-d16 ... var-d36, llamagen-b ... llamagen-3b), their files on the Hugging Face hub, and
finding those files locally or downloading them; offline, an error says which file to fetch and where to put it.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    """An official checkpoint set: which files, on which hub repository."""

    family: str  # "var" or "llamagen"
    hub_repo: str
    files: dict[str, str]  # component name -> file name
    options: dict


KNOWN_MODELS: dict[str, KnownModel] = {
    **{
        f"var-d{depth}": KnownModel(
            "var", "FoundationVision/var", {"vae": "vae_ch160v4096z32.pth", "var": f"var_d{depth}.pth"}, {}
        )
        for depth in (16, 20, 24, 30, 36)
    },
    **{
        f"llamagen-{size.lower()}": KnownModel(
            "llamagen",
            "FoundationVision/LlamaGen",
            {"vq": "vq_ds16_c2i.pt", "gpt": f"c2i_{size}_{res}.pt"},
            {"model": f"GPT-{size}", "image_size": res},
        )
        for size, res in (("B", 256), ("L", 256), ("XL", 384), ("XXL", 384), ("3B", 384))
    },
}


def official_url(file_name: str) -> str | None:
    """The hub address of an official checkpoint file, or None for a file no known model uses."""
    from huggingface_hub import constants

    for known in KNOWN_MODELS.values():
        if file_name in known.files.values():
            return f"{constants.ENDPOINT}/{known.hub_repo}/resolve/main/{file_name}"
    return None


def default_cache_dir() -> Path:
    """Folder searched first for official files: $VARTK_HOME or ~/.cache/vartk."""
    return Path(os.environ.get("VARTK_HOME") or Path.home() / ".cache" / "vartk").expanduser()


def find_local_file(repo: str, file_name: str, search_dirs: list[Path] | None = None) -> Path | None:
    """`file_name` in `search_dirs`, $VARTK_HOME (~/.cache/vartk) or the Hugging Face cache; None if absent."""
    for folder in [*(search_dirs or []), default_cache_dir()]:
        candidate = Path(folder) / file_name
        if candidate.is_file():
            return candidate
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, file_name, local_files_only=True))
    except Exception:
        return None


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached (offline mode, or no TCP connection to its host within `timeout_s`), or
    None. Lets an offline machine fail at once instead of after the hub client's retries (~30 s)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows the way
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{endpoint.hostname}:{port} is unreachable: {err}"
    return None


def resolve_official_files(name: str, search_dirs: list[Path] | None = None) -> dict[str, Path]:
    """{role: path} of every file of known model `name`: found locally (`find_local_file`), else downloaded
    from the hub. When the hub is unreachable or a download fails, one FileNotFoundError lists every missing
    file, its URL and the folder to put it in."""
    known = KNOWN_MODELS[name]
    paths = {role: find_local_file(known.hub_repo, file, search_dirs) for role, file in known.files.items()}
    missing = [role for role, path in paths.items() if path is None]
    if missing:
        from huggingface_hub import hf_hub_download

        reason = hub_unreachable()
        for role in missing if reason is None else ():
            try:
                paths[role] = Path(hf_hub_download(known.hub_repo, known.files[role]))
            except Exception as err:
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
                break
        if reason is not None:
            absent = [known.files[r] for r in missing if paths[r] is None]
            urls = " ".join(official_url(f) for f in absent)
            raise FileNotFoundError(
                f"{', '.join(absent)} for {name!r} {'is' if len(absent) == 1 else 'are'} not available locally and "
                f"could not be downloaded ({reason}). Download {urls} and put "
                f"{'it' if len(absent) == 1 else 'them'} in {default_cache_dir()} (or set VARTK_HOME to the folder "
                "that holds them)."
            )
    return paths


def check_official_files_exist(**files) -> None:
    """Raise one FileNotFoundError naming every missing file among `files` {argument: path or state dict}, so a
    user fetching two files learns of both at once."""
    absent = {name: Path(path) for name, path in files.items()
              if isinstance(path, (str, os.PathLike)) and not Path(path).is_file()}
    if absent:
        listed = ", ".join(f"{name}={str(path)!r}" for name, path in absent.items())
        urls = [url for url in (official_url(path.name) for path in absent.values()) if url]
        if urls:
            listed += f"; download {' '.join(urls)} (vartk.load with the model's name finds or downloads them)"
        raise FileNotFoundError(f"checkpoint file(s) missing: {listed}")
