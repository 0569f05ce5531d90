import argparse
import time

import pytest
import torch

from vartk.checkpoints import (
    KNOWN_MODELS, CheckpointError, load_state_dict_strict, read_official_file, resolve_official_file,
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


def test_offline_resolution_says_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("VARTK_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"var_d16.pth.*huggingface.co/FoundationVision/var.*" + str(tmp_path)):
        resolve_official_file("var-d16", "var_d16.pth")
    (tmp_path / "var_d16.pth").write_bytes(b"x")
    assert resolve_official_file("var-d16", "var_d16.pth") == tmp_path / "var_d16.pth"


def test_known_model_names():
    assert {f"var-d{d}" for d in (16, 20, 24, 30, 36)} <= set(KNOWN_MODELS)
    assert KNOWN_MODELS["llamagen-xl"].files["gpt"] == "c2i_XL_384.pt"
    assert KNOWN_MODELS["llamagen-b"].options == {"model": "GPT-B", "image_size": 256}
