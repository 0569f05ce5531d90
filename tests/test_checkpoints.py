import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from vartk.checkpoints import CheckpointError, load_state_dict_strict, read_official_file
from vartk.hub import KNOWN_MODELS, default_cache_dir, find_local_file, resolve_official_files


def test_reads_container_with_namespace_args(tmp_path):
    path = tmp_path / "c2i.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1), "steps": 3}, path)
    assert list(read_official_file(path, containers=("model",))) == ["w"]


def test_reads_nested_training_checkpoint(tmp_path):
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save({"trainer": {"var_wo_ddp": {"w": torch.ones(2)}, "optim": {}}, "epoch": 3, "iter": 7}, path)
    assert list(read_official_file(path, containers=("trainer.var_wo_ddp",))) == ["w"]
    flat = tmp_path / "var.pth"
    torch.save({"w": torch.ones(2)}, flat)
    assert list(read_official_file(flat, containers=("trainer.var_wo_ddp",))) == ["w"]


def test_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "obj": time.struct_time((2000, 1, 1, 0, 0, 0, 0, 1, 0))}, path)
    with pytest.raises(CheckpointError, match="evil.pt' is not a readable PyTorch checkpoint.*pickles other Python"):
        read_official_file(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_official_file(tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        read_official_file(corrupt)


def test_strict_load_names_keys_and_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    good = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    load_state_dict_strict(model, good)
    assert torch.equal(model[0].weight, good["0.weight"])
    renamed = dict(good)
    renamed["0.wieght"] = renamed.pop("0.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \['0.weight'\].*unexpected keys \['0.wieght'\]"):
        load_state_dict_strict(model, renamed)
    reshaped = dict(good, **{"1.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"1.bias: file \(3,\) vs model \(2,\)"):
        load_state_dict_strict(model, reshaped)


def test_offline_resolution_says_which_files_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("VARTK_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    both = (r"vae_ch160v4096z32.pth, var_d16.pth for 'var-d16' are not available locally.*"
            r"https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth "
            r"https://huggingface.co/FoundationVision/var/resolve/main/var_d16.pth and put them in " + str(tmp_path))
    with pytest.raises(FileNotFoundError, match=both):
        resolve_official_files("var-d16")
    (tmp_path / "var_d16.pth").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"vae_ch160v4096z32.pth for 'var-d16' is not available locally"):
        resolve_official_files("var-d16")
    (tmp_path / "vae_ch160v4096z32.pth").write_bytes(b"x")
    assert resolve_official_files("var-d16") == {"vae": tmp_path / "vae_ch160v4096z32.pth",
                                                 "var": tmp_path / "var_d16.pth"}


class FakeHub(BaseHTTPRequestHandler):
    """The two routes hf_hub_download uses: HEAD (commit and etag headers) and GET of /{repo}/resolve/main/{file}."""

    files: dict[str, bytes] = {}

    def do_HEAD(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def do_GET(self):
        self.do_HEAD()
        if self.path in self.files:
            self.wfile.write(self.files[self.path])

    def log_message(self, *args):
        pass


def resolve_in_subprocess(endpoint: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """resolve_official_files("var-d16") online against `endpoint`, with empty caches under tmp_path."""
    env = {name: value for name, value in os.environ.items() if name not in ("HF_HUB_OFFLINE", "HTTPS_PROXY",
                                                                             "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), VARTK_HOME=str(tmp_path / "vartk"))
    code = ("import json; from vartk.hub import resolve_official_files; "
            "print(json.dumps({k: str(v) for k, v in resolve_official_files('var-d16').items()}))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_download_from_the_hub_lands_in_its_cache(tmp_path):
    served = {"vae_ch160v4096z32.pth": b"vae bytes", "var_d16.pth": b"var bytes"}
    FakeHub.files = {f"/FoundationVision/var/resolve/main/{name}": body for name, body in served.items()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = resolve_in_subprocess(f"http://127.0.0.1:{server.server_port}", tmp_path)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)
    assert {Path(paths[role]).read_bytes() for role in ("vae", "var")} == set(served.values())
    assert all(Path(path).is_relative_to(tmp_path / "hf") for path in paths.values())


def test_an_unreachable_hub_fails_at_once_with_the_urls(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = resolve_in_subprocess(f"http://127.0.0.1:{port}", tmp_path)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{port} is unreachable" in message
    assert f"http://127.0.0.1:{port}/FoundationVision/var/resolve/main/var_d16.pth" in message
    assert "Retrying" not in result.stderr  # no client retries before the error


def test_files_in_the_hugging_face_cache_are_found_offline(tmp_path, monkeypatch):
    hub = tmp_path / "hub" / "models--FoundationVision--var"
    (hub / "snapshots" / "abc").mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc")
    (hub / "snapshots" / "abc" / "var_d16.pth").write_bytes(b"x")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("VARTK_HOME", str(tmp_path / "empty"))
    assert find_local_file("FoundationVision/var", "var_d16.pth") == hub / "snapshots" / "abc" / "var_d16.pth"
    monkeypatch.setenv("VARTK_HOME", "~/nowhere")
    assert default_cache_dir() == Path.home() / "nowhere"


def test_known_model_names():
    assert {f"var-d{d}" for d in (16, 20, 24, 30, 36)} <= set(KNOWN_MODELS)
    assert KNOWN_MODELS["llamagen-xl"].files["gpt"] == "c2i_XL_384.pt"
    assert KNOWN_MODELS["llamagen-b"].options == {"model": "GPT-B", "image_size": 256}
