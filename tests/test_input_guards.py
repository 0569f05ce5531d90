"""Bad input gets one clear error naming the bad value and what is allowed: broken model folders, inpainting
inputs, class labels and generators, tokens and images, demo values, CLI flags."""
import argparse
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vartk.checkpoints import CheckpointError
from vartk.cli import build_parser
from vartk.cli import main as cli_main
from vartk.models.gpt import GPTTransformer
from vartk.models.var import VARTransformer
from vartk.loading import load
from vartk.pipelines import GPTPipeline, VARPipeline
from vartk.tokenizers.msvq import MultiScaleVQVAE
from vartk.tokenizers.vq import VQModel

WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_msvq(patch_nums=(1, 2, 4)):
    return MultiScaleVQVAE(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
                           patch_nums=patch_nums, norm_groups=8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny VAR and a tiny GPT pipeline written by save_pretrained (8x8 images, 4x4 final token map)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("guards")
    var = VARTransformer(depth=1, width=32, num_heads=2, vocab_size=32, latent_channels=8, num_classes=3,
                         patch_nums=(1, 2, 4))
    VARPipeline(tokenizer=tiny_msvq(), transformer=var, class_names=["cat", "dog", "fox"]).save_pretrained(root / "var")
    gpt = GPTTransformer(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=3, grid_size=4, multiple_of=32)
    GPTPipeline(tokenizer=tiny_msvq((4,)), transformer=gpt).save_pretrained(root / "gpt")
    return root


@pytest.fixture
def broken(folders, tmp_path):
    """A copy of the tiny VAR folder to break."""
    return Path(shutil.copytree(folders / "var", tmp_path / "broken"))


@pytest.fixture(scope="module")
def var_pipe(folders):
    return load(folders / "var")


def edit_json(path: Path, edit) -> None:
    config = json.loads(path.read_text())
    path.write_text(json.dumps(edit(config)))


def edit_weights(folder: Path, edit) -> None:
    file = folder / WEIGHTS
    save_file(edit(load_file(file)), file)


def without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


# ---------------------------------------------------------------- model folders load strictly
@pytest.mark.parametrize("key", ["blocks.0.ffn.fc2.bias", "blocks.0.ffn.fc2.weight"])
def test_a_folder_missing_a_weight_is_refused_naming_the_key(broken, key):
    edit_weights(broken / "transformer", without(key))
    missing = rf"broken/transformer does not match VARTransformer: missing keys \['{key}'\]"
    with pytest.raises(CheckpointError, match=missing):
        load(broken)
    with pytest.raises(CheckpointError, match=missing):  # diffusers' entry point is as strict
        VARPipeline.from_pretrained(broken, torch_dtype=torch.float32)
    with pytest.raises(SystemExit, match=rf"vartk sample: .*missing keys \['{key}'\]"):
        cli_main(["sample", "--model", str(broken), "--out", str(broken.parent / "x.png"), "--device", "cpu"])


@pytest.mark.parametrize("family", ["var", "gpt"])
def test_a_bfloat16_load_casts_the_transformer_only_and_samples_without_autograd(folders, family):
    for pipe in (load(folders / family, torch_dtype=torch.bfloat16),
                 (VARPipeline if family == "var" else GPTPipeline).from_pretrained(folders / family,
                                                                                   torch_dtype=torch.bfloat16)):
        assert pipe.transformer.dtype == torch.bfloat16 and pipe.tokenizer.dtype == torch.float32
        images = pipe(class_labels=[0, 2], output_type="pt", progress=False,
                      generator=torch.Generator().manual_seed(0)).images  # [2, 3, 8, 8]
        assert images.dtype == torch.float32 and not images.requires_grad


def test_a_folder_with_an_extra_or_mis_shaped_weight_is_refused_naming_key_and_shapes(broken):
    edit_weights(broken / "transformer", lambda d: {**d, "extra.weight": torch.zeros(2),
                                                    "head.bias": torch.zeros(33)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra.weight'\].*head.bias: file \(33,\) vs "
                                              r"model \(32,\)"):
        load(broken)


def test_a_gpt_transformer_inside_a_var_folder_is_refused(folders, broken):
    shutil.rmtree(broken / "transformer")
    shutil.copytree(folders / "gpt" / "transformer", broken / "transformer")
    with pytest.raises(CheckpointError, match=r"transformer/config.json describes a 'GPTTransformer'; expected a "
                                              r"VARTransformer"):
        load(broken)


def test_a_gpt_folder_relabelled_var_is_refused(folders, tmp_path):
    relabelled = Path(shutil.copytree(folders / "gpt", tmp_path / "gpt"))
    edit_json(relabelled / "model_index.json", lambda c: {**c, "_class_name": "VARPipeline"})
    with pytest.raises(CheckpointError, match="describes a 'GPTTransformer'; expected a VARTransformer"):
        load(relabelled)


@pytest.mark.parametrize("file,edit,match", [
    ("transformer/config.json", without("width"), r"transformer/config.json lacks 'width'"),
    ("transformer/config.json", lambda c: {**c, "depth": "1"}, r"has depth='1', which must be an integer"),
    ("transformer/config.json", lambda c: {**c, "depht": 1}, r"has unknown fields \['depht'\]"),
    ("model_index.json", without("_class_name"), r"model_index.json has _class_name None; a vartk folder holds one of"),
    ("model_index.json", lambda c: [c], r"model_index.json holds a JSON list; expected an object"),
    ("model_index.json", lambda c: {**c, "class_names": ["cat"]}, r"1 class names given for a model with 3 classes"),
    ("model_index.json", lambda c: {**c, "sampling_defaults": {"top_p": 5.0}},
     r"broken does not make a VARPipeline: top_p"),
])
def test_a_broken_config_is_refused_naming_the_file_and_field(broken, file, edit, match):
    edit_json(broken / file, edit)
    with pytest.raises(CheckpointError, match=match):
        load(broken)


def test_unreadable_files_are_named(folders, broken):
    (broken / "model_index.json").write_text("{'not': json")
    with pytest.raises(CheckpointError, match=r"broken/model_index.json is not a readable JSON file"):
        load(broken)
    shutil.copy(folders / "var" / "model_index.json", broken)
    (broken / "transformer" / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=rf"broken/transformer/{WEIGHTS} is missing"):
        load(broken)
    (broken / "transformer" / WEIGHTS).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=rf"broken/transformer/{WEIGHTS} is not a readable safetensors file"):
        load(broken)


def test_a_pipeline_refuses_components_of_the_wrong_class(folders):
    gpt = load(folders / "gpt")
    with pytest.raises(TypeError, match="a VARPipeline's transformer is a VARTransformer, got a GPTTransformer"):
        VARPipeline(tokenizer=gpt.tokenizer, transformer=gpt.transformer)


# ---------------------------------------------------------------- load()
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(name=None), TypeError, "the model to load is a name or a folder path, got None"),
    (dict(name=3), TypeError, "got 3; e.g. 'default'"),
    (dict(device="gpu"), ValueError, "'gpu' is not a torch device; use e.g. 'cpu', 'cuda'"),
    (dict(device="cuda:99"), ValueError, r"there is no CUDA device 'cuda:99' here"),
])
def test_load_names_the_allowed_names_and_devices(kwargs, error, match):
    with pytest.raises(error, match=match):
        load(**{"name": "default", **kwargs})


# ---------------------------------------------------------------- inpainting inputs
IMAGE = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
KEEP = torch.ones(4, 4)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mask=KEEP * 0.5), ValueError, r"mask values must be 1 \(keep the image's token\) or 0 \(generate\).*got 0.5"),
    (dict(mask=KEEP * 255), ValueError, "mask values must be 1 .* got 255"),
    (dict(mask=KEEP - 2), ValueError, "mask values must be 1 .* got -1"),
    (dict(mask=KEEP * float("nan")), ValueError, "mask values must be 1 .* got nan"),
    (dict(mask=None), TypeError, "mask must be a tensor or array of 1 .*, got a NoneType"),
    (dict(mask=Image.new("L", (4, 4))), TypeError, "mask must be a tensor or array .*, got a Image"),
    (dict(image=torch.full((1, 3, 8, 8), float("nan"))), ValueError, r"finite values in \[0, 1\], got \[nan, nan\]"),
    (dict(image=[Image.new("RGB", (8, 8)), Image.new("RGB", (16, 16))]), ValueError,
     r"different sizes \[\(8, 8\), \(16, 16\)\]"),
    (dict(image=[]), ValueError, "the image list is empty"),
    (dict(image=[np.zeros((8, 8, 3), np.uint8)]), TypeError, "must hold PIL images only"),
    (dict(image=torch.rand(1, 8, 8, 3)), ValueError, r"must be \[3, H, W\] or \[B, 3, H, W\] \(channels first\), got "
                                                     r"shape \(1, 8, 8, 3\)"),
    (dict(class_label=[1]), TypeError, r"class_label must be one class id or name .*got \[1\]"),
])
def test_inpaint_refuses_meaningless_images_and_masks(var_pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        var_pipe.inpaint(**{"image": IMAGE, "mask": KEEP, "progress": False, **kwargs})


def test_inpaint_takes_a_bool_mask(var_pipe):
    run = dict(image=IMAGE, output_type="pt", progress=False)
    as_bool = var_pipe.inpaint(mask=KEEP.bool(), generator=torch.Generator().manual_seed(0), **run).images
    assert torch.equal(as_bool, var_pipe.inpaint(mask=KEEP, generator=torch.Generator().manual_seed(0), **run).images)


# ---------------------------------------------------------------- class labels and generators
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(class_labels=None), TypeError, "class_labels must be a class id or a list / tensor of them, got a NoneType"),
    (dict(class_labels={1, 2}), TypeError, "got a set"),
    (dict(class_labels={"a": 1}), TypeError, "got a dict"),
    (dict(class_labels=[[1], [2, 3]]), ValueError, r"class_labels must be integer class ids, got \[\[1\], \[2, 3\]\]"),
    (dict(class_labels=[]), ValueError, "class_labels is empty"),
    (dict(generator=[torch.Generator(), torch.Generator()]), TypeError, "generator must be one torch.Generator"),
    (dict(generator=0), TypeError, "generator must be one torch.Generator .* got 0"),
])
@pytest.mark.parametrize("family", ["var", "gpt"])
def test_bad_class_labels_and_generators_get_one_clear_error(folders, family, kwargs, error, match):
    with pytest.raises(error, match=match):
        load(folders / family)(**{"class_labels": [1], "progress": False, **kwargs})


# ---------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("tokenizer", [
    tiny_msvq(), VQModel(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, codebook_size=32, norm_groups=8),
], ids=["msvq", "vq"])
def test_tokenizers_check_token_ids_and_image_values(tokenizer):
    maps = lambda value: [torch.full((1, pn, pn), value) for pn in getattr(tokenizer, "patch_nums", (4,))]  # noqa: E731
    for value in (32, 5000, -1):
        with pytest.raises(ValueError, match=rf"token {value} is outside the vocabulary \[0, 32\)"):
            tokenizer.decode(maps(value))
    with pytest.raises(ValueError, match=r"images must hold finite values in \[0, 1\], got \[0, 255\]"):
        tokenizer.encode(torch.tensor([0.0, 255.0]).repeat(48).view(1, 3, 4, 8))
    with pytest.raises(ValueError, match=r"got \[nan, nan\]"):
        tokenizer.encode(torch.full((1, 3, 8, 8), float("nan")))
    tokenizer.decode(maps(31))  # the ends of the vocabulary are fine


# ---------------------------------------------------------------- the demo
@pytest.mark.parametrize("index,value,match", [
    (0, "nope", r"unknown model 'nope'; choose one of \["),
    (1, "flag", r"unknown class 'flag'; choose one of \['cat', 'dog', 'fox'\]"),
    (2, None, "images must be a whole number >= 1, got None"),
    (2, 2.7, "images must be a whole number >= 1, got 2.7"),
    (3, None, "guidance scale must be a number >= 0, got None"),
    (4, None, "top-k must be a whole number >= 0"),
    (4, 3.7, "top-k must be a whole number >= 0 .*got 3.7"),
    (5, None, "top-p must be a number in"),
    (6, float("inf"), "seed must be a whole number, got inf"),
    (6, "abc", "seed must be a whole number, got 'abc'"),
    (6, 1.5, "seed must be a whole number, got 1.5"),
])
def test_demo_generate_names_the_bad_field(folders, index, value, match):
    from vartk.demo import DemoBackend

    values = [str(folders / "var"), "dog", 1, 1.5, 10, 0.9, 0]
    values[index] = value
    with pytest.raises(ValueError, match=match):
        DemoBackend([values[0] if index else str(folders / "var")], "cpu").generate(*values)


# ---------------------------------------------------------------- the CLI
@pytest.mark.parametrize("argv,match", [
    (["--out", "x.jpg"], "--out x.jpg: grids are written as PNG"),
    (["--out", "x.WEBP"], "grids are written as PNG"),
    (["--out", "/proc/self/x.png"], "cannot write into /proc/self"),
    (["--out", "/proc/self/samples"], "cannot write into /proc/self"),
])
def test_cli_refuses_an_output_it_cannot_write_before_loading(argv, match):
    if not Path("/proc/self").is_dir() and "/proc" in argv[1]:
        pytest.skip("no /proc here")
    with pytest.raises(SystemExit, match=match):
        cli_main(["sample", "--model", "no-such-model", *argv])


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", "1.5"])
@pytest.mark.parametrize("command", [["sample"], ["inpaint", "--image", "a.png", "--box", "0,0,1,1"]])
def test_cli_seeds_are_integers_that_torch_takes(command, seed, capsys):
    with pytest.raises(SystemExit):
        cli_main([*command, "--seed", seed])
    assert f"--seed: expected an integer in 0-18446744073709551615, got '{seed}'" in capsys.readouterr().err


def test_cli_takes_the_largest_seed(folders, tmp_path):
    cli_main(["sample", "--model", str(folders / "var"), "--n", "1", "--seed", str(2**64 - 1), "--device", "cpu",
              "--out", str(tmp_path / "x.png")])
    assert (tmp_path / "x.png").is_file()


def test_convert_names_a_file_that_is_no_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as raised:
        cli_main(["convert", "--vae", str(junk), "--var", str(junk), "--out", str(tmp_path / "out")])
    message = str(raised.value)
    assert "junk.pth' is not a readable PyTorch checkpoint" in message
    assert "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("extra", [["--vq", "vq.pt"], ["--image-size", "384"], ["--gpt-model", "GPT-L"]])
def test_convert_refuses_llamagen_flags_with_a_var_model(tmp_path, extra):
    with pytest.raises(SystemExit, match=rf"\['{extra[0]}'\] are LlamaGen flags, but --vae / --var convert a VAR"):
        cli_main(["convert", "--vae", "vae.pth", "--var", "var.pth", *extra, "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("spec,example", [
    ("nextscalesampler:more_smooth", "nextscale:more_smooth=false"),
    ("NextTokenSampler:0.9", "nexttoken:temperature=1.0"),
    ("sjd:16", "sjd:window=16"),
])
def test_a_bad_sampler_spec_shows_an_example_of_that_class(spec, example):
    from vartk.samplers import from_spec

    with pytest.raises(ValueError, match=f"write e.g. {example}$"):
        from_spec(spec)


@pytest.mark.parametrize("argv,message", [
    (["train", "var", "--data", "images", "--out", "run"], "vartk train: --tokenizer is required"),
    (["sample", "--out", "grid.jpg"], "vartk sample: --out grid.jpg: grids are written as PNG"),
])
def test_every_command_prefixes_its_one_line_error(argv, message):
    with pytest.raises(SystemExit) as raised:
        cli_main(argv)
    assert str(raised.value).startswith(message)


def own_parsers() -> dict[str, argparse.ArgumentParser]:
    """The subcommands whose flags vartk/cli.py declares (train, fid, bench and demo parse their own)."""
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: parser for name, parser in subcommands.choices.items() if parser.add_help}


def test_the_walk_covers_every_command_of_cli_py():
    assert sorted(own_parsers()) == ["calibrate-kv", "convert", "inpaint", "sample"]


@pytest.mark.parametrize("command", sorted(own_parsers()))
def test_every_option_says_what_it_is_and_its_default(command):
    problems = []
    for action in own_parsers()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag, text = "/".join(action.option_strings), action.help or ""
        if not re.sub(r"\(default:[^)]*\)", "", text).strip():
            problems.append(f"{flag}: no help saying what it is")
        elif action.default is not None and action.nargs != 0 and not re.search(
                rf"\(default: [^)]*\b{re.escape(str(action.default))}\b", text):
            problems.append(f"{flag}: its default {action.default!r} is not stated")
    assert not problems, f"vartk {command}: {problems}"


def test_inpaint_refuses_an_output_that_is_its_input(folders, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(image)
    original = image.read_bytes()
    (tmp_path / "link.png").symlink_to(image)
    os.link(image, tmp_path / "hard.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "samples").mkdir()
    shutil.copy(image, tmp_path / "samples" / "00000.png")
    run = ["inpaint", "--model", str(folders / "var"), "--box", "0,0,0.5,0.5", "--device", "cpu"]
    for given, out in ((image, image), (image, tmp_path / "sub" / ".." / "in.png"), (tmp_path / "link.png", image),
                       (tmp_path / "hard.png", image), (tmp_path / "samples" / "00000.png", tmp_path / "samples")):
        with pytest.raises(SystemExit, match=rf"vartk inpaint: --out {re.escape(str(out))} would overwrite the input "
                                             rf"--image {re.escape(str(given))}; give another path"):
            cli_main([*run, "--image", str(given), "--out", str(out)])
    assert image.read_bytes() == original and (tmp_path / "samples" / "00000.png").read_bytes() == original
    cli_main([*run, "--image", str(image), "--out", str(tmp_path / "edited.png")])
    assert Image.open(tmp_path / "edited.png").size == (8, 8)
