import argparse
import time
from pathlib import Path

import pytest
import torch

from vartk.checkpoints import (
    KNOWN_MODELS, CheckpointError, default_cache_dir, find_local_file, load_state_dict_strict, read_official_file,
    resolve_official_files,
)


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
    with pytest.raises(CheckpointError, match="cannot read"):
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
