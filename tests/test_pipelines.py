"""Pipelines and the CLI on tiny random-weight models written in the official file layout."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vartk.checkpoints import CheckpointError
from vartk.cli import main as cli_main
from vartk.hub import KNOWN_MODELS, KnownModel
from vartk.loading import load
from vartk.models.gpt import GPT_CONFIGS, GPTTransformer
from vartk.models.var import VARTransformer
from vartk.samplers import NextScaleSampler
from vartk.pipelines import GPTPipeline, VARPipeline
from vartk.tokenizers.msvq import MultiScaleVQVAE

IMAGE_SIZE = 32  # tiny VAE: one downsampling, 16x16 latent, the official 1..16 scale schedule


def tiny_vae():
    return MultiScaleVQVAE(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, vocab_size=64)


def tiny_var():
    torch.manual_seed(0)
    model = VARTransformer(depth=2, width=64, num_heads=2, vocab_size=64, latent_channels=8, num_classes=10)
    model.init_weights(init_adaln_gamma=0.5, init_head=1.0)  # large gates/head: samples depend on the weights
    return model


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    torch.save(tiny_vae().state_dict(), folder / "vae_tiny.pth")
    torch.save(tiny_var().state_dict(), folder / "var_tiny.pth")
    return folder


@pytest.fixture(scope="module")
def converted(official_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny-var"
    cli_main(["convert", "--vae", str(official_files / "vae_tiny.pth"), "--var", str(official_files / "var_tiny.pth"),
              "--out", str(out)])
    return out


def sample(pipe, seed=0, **kwargs):
    args = dict(class_labels=[1, 3], guidance_scale=1.5, top_k=10, top_p=0.9, output_type="pt", progress=False)
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(seed), **args).images


def test_from_official_loads_the_files_weights(official_files):
    pipe = VARPipeline.from_official(vae=official_files / "vae_tiny.pth", var=official_files / "var_tiny.pth")
    file_sd = torch.load(official_files / "var_tiny.pth", weights_only=True)
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, file_sd[key]), key
    assert pipe.transformer.config.depth == 2 and pipe.num_classes == 10


def test_convert_then_cli_sample_writes_a_2x2_grid(converted, tmp_path):
    grid = tmp_path / "grid.png"
    cli_main(["sample", "--model", str(converted), "--class", "1", "--n", "4", "--out", str(grid), "--device", "cpu"])
    image = Image.open(grid)
    pad = 2  # torchvision make_grid default padding
    assert image.size == (2 * (IMAGE_SIZE + pad) + pad,) * 2
    cells = np.asarray(image)
    first, second = cells[pad : pad + IMAGE_SIZE, pad : pad + IMAGE_SIZE], cells[pad : pad + IMAGE_SIZE, -pad - IMAGE_SIZE : -pad]
    assert not np.array_equal(first, second), "the four samples of one class should differ"


def test_save_pretrained_round_trip_gives_identical_images(converted, tmp_path):
    pipe = load(str(converted))
    pipe.save_pretrained(tmp_path / "again")
    again = VARPipeline.from_pretrained(tmp_path / "again", low_cpu_mem_usage=False)
    assert torch.equal(sample(pipe), sample(again))
    assert not torch.equal(sample(pipe, seed=0), sample(pipe, seed=1))


def test_more_smooth_decodes_the_soft_latent(converted):
    pipe = load(str(converted))
    hard = sample(pipe)
    smooth = sample(pipe, sampler=NextScaleSampler(more_smooth=True))
    assert smooth.shape == hard.shape and not torch.allclose(smooth, hard)
    assert torch.equal(smooth, sample(pipe, sampler=NextScaleSampler(more_smooth=True)))


def test_output_types_and_num_images_per_label(converted):
    pipe = load(str(converted))
    pil = sample(pipe, class_labels=[2], num_images_per_label=3, output_type="pil")
    assert len(pil) == 3 and pil[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    array = pipe(class_labels=[2], output_type="np", progress=False, generator=torch.Generator().manual_seed(0)).images
    assert array.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and array.dtype == np.uint8
    tensor = sample(pipe, class_labels=[2], num_images_per_label=3)
    expected = (tensor[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(expected, np.asarray(pil[0]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_labels=[10]), r"class id 10 is outside \[0, 10\)"),
    (dict(class_labels=[-1]), r"class id -1"),
    (dict(guidance_scale=-0.5), "guidance_scale must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=-3), "top_k must be an integer >= 0"),
    (dict(output_type="jpeg"), "output_type 'jpeg'"),
    (dict(num_images_per_label=0), "num_images_per_label"),
])
def test_bad_pipeline_arguments(converted, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(load(str(converted)), **kwargs)


def test_inpainting_keeps_known_region_and_rejects_wrong_size(converted):
    pipe = load(str(converted))
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    keep_all = torch.ones(16, 16)
    edited = pipe.inpaint(image, keep_all, output_type="pt", progress=False,
                          generator=torch.Generator().manual_seed(0)).images
    reconstruction = pipe.tokenizer.decode(pipe.tokenizer.encode(image))
    assert torch.allclose(edited, reconstruction, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        pipe.inpaint(torch.rand(1, 3, 48, 48), keep_all, progress=False)
    with pytest.raises(ValueError, match="class id 11"):
        pipe.inpaint(image, keep_all, class_label=11, progress=False)


def test_cli_inpaint(converted, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 200, dtype=np.uint8)).save(src)
    out = tmp_path / "out.png"
    cli_main(["inpaint", "--model", str(converted), "--image", str(src), "--box", "0.25,0.25,0.75,0.75",
              "--out", str(out), "--device", "cpu"])
    assert Image.open(out).size == (IMAGE_SIZE, IMAGE_SIZE)  # one image: no grid padding
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(big)
    with pytest.raises(SystemExit, match="do not match"):
        cli_main(["inpaint", "--model", str(converted), "--image", str(big), "--box", "0,0,0.5,0.5", "--out", str(out)])


@pytest.mark.parametrize("flags,keep_box,label", [([], False, None), (["--outpaint", "--class", "3"], True, 3)])
def test_cli_inpaint_is_the_pipeline_with_the_box_mask(converted, tmp_path, flags, keep_box, label):
    pixels = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    cli_main(["inpaint", "--model", str(converted), "--image", str(tmp_path / "in.png"), "--box", "0.25,0.25,0.75,0.75",
              "--seed", "2", "--out", str(tmp_path / "out.png"), "--device", "cpu", *flags])
    box = torch.zeros(16, 16)
    box[4:12, 4:12] = 1  # the tokens of that box on the 16x16 token map
    expected = load(str(converted)).inpaint(pixels, box if keep_box else 1 - box, class_label=label, output_type="np",
                                            generator=torch.Generator().manual_seed(2), progress=False).images
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), expected[0])


def test_inpaint_defaults_are_the_official_demo_settings(converted):
    pipe = load(str(converted))
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    # class-conditional editing: with the null class alone, guidance changes nothing
    edit = lambda **settings: pipe.inpaint(  # noqa: E731
        image, mask, class_label=3, output_type="pt", progress=False, generator=torch.Generator().manual_seed(0),
        **settings).images
    default = edit()
    assert torch.equal(default, edit(guidance_scale=3.0, top_k=900, top_p=0.95))
    assert not torch.equal(default, edit(guidance_scale=1.5, top_k=900, top_p=0.96))  # the sampling defaults
    assert torch.equal(default, edit(sampler=NextScaleSampler(more_smooth=True)))  # the demo's Gumbel smoothing
    assert not torch.equal(default, edit(sampler=NextScaleSampler()))


def test_inpaint_default_top_k_is_900():
    """1024 codes and flat logits: top-p 0.95 keeps about 970 tokens, so top-k 900 cuts some."""
    patch_nums = (1, 2, 4, 8)
    torch.manual_seed(0)
    transformer = VARTransformer(depth=2, width=64, num_heads=2, vocab_size=1024, latent_channels=8, num_classes=10,
                                 patch_nums=patch_nums)
    tokenizer = MultiScaleVQVAE(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, vocab_size=1024,
                                patch_nums=patch_nums)
    pipe = VARPipeline(tokenizer=tokenizer.eval(), transformer=transformer.eval())
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1
    edit = lambda **settings: pipe.inpaint(  # noqa: E731
        image, mask, output_type="pt", progress=False, generator=torch.Generator().manual_seed(0), **settings).images
    default = edit()
    assert torch.equal(default, edit(guidance_scale=3.0, top_k=900, top_p=0.95))
    assert not torch.equal(default, edit(guidance_scale=3.0, top_k=0, top_p=0.95))


def test_cli_sample_seed_gives_the_pipelines_images(converted, tmp_path):
    cli_main(["sample", "--model", str(converted), "--class", "1", "--class", "3", "--n", "1", "--seed", "1",
              "--out", str(tmp_path / "samples"), "--device", "cpu"])
    expected = load(str(converted))(class_labels=[1, 3], generator=torch.Generator().manual_seed(1), output_type="np",
                                    progress=False).images
    written = np.stack([np.asarray(Image.open(tmp_path / "samples" / f"{i:05d}.png")) for i in range(2)])
    np.testing.assert_array_equal(written, expected)


@pytest.mark.parametrize("argv,match", [
    (["inpaint", "--image", "in.png", "--box", "0.5,0.5,0.2,0.9"], r"--box: '0.5,0.5,0.2,0.9' must be four fractions"),
    (["inpaint", "--image", "in.png", "--box", "0.25,0.25"], r"--box: '0.25,0.25' must be four fractions"),
    (["sample", "--device", "bogus"], r"--device: 'bogus' is not a torch device"),
])
def test_cli_usage_errors_name_the_flag(argv, match, capsys):
    with pytest.raises(SystemExit):
        cli_main(argv)
    assert re.search(match, capsys.readouterr().err)


def test_a_box_covers_every_token_it_touches():
    from vartk.arguments import box_mask

    assert box_mask((0.25, 0.25, 0.75, 0.75), 16).nonzero().amin(0).tolist() == [4, 4]
    assert box_mask((0.25, 0.25, 0.75, 0.75), 16).sum() == 8 * 8
    thin = box_mask((0.25, 0.25, 0.27, 0.75), 16)  # 0.32 of a token row: rounded outward, not to nothing
    assert thin.sum(1).nonzero().flatten().tolist() == [4]


def test_cli_output_is_checked_before_sampling_and_a_folder_holds_one_run(converted, tmp_path):
    run = ["sample", "--model", str(converted), "--device", "cpu"]
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("")
    for out, match in ((tmp_path / "dir.png", "dir.png is a folder"), (tmp_path / "file" / "y.png", "is not a folder"),
                       (tmp_path / "file", "file is a file")):
        with pytest.raises(SystemExit, match=match):  # before loading: the model that does not exist is not reached
            cli_main(["sample", "--model", "no-such-model", "--out", str(out)])
    folder = tmp_path / "samples"
    cli_main([*run, "--class", "1", "--class", "3", "--n", "2", "--out", str(folder)])  # --class repeats
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    cli_main([*run, "--class", "2", "--n", "1", "--out", str(folder)])
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png"]  # the earlier run's files are gone
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"holds other files \(\['notes.txt'\]\)"):
        cli_main([*run, "--out", str(folder)])
    with pytest.raises(SystemExit, match="vartk sample: 'no-such-model' is neither a folder"):
        cli_main(["sample", "--model", "no-such-model", "--out", str(tmp_path / "a.png")])


def test_a_sampler_of_the_other_family_is_refused(converted):
    from vartk.samplers import NextTokenSampler

    with pytest.raises(ValueError, match=r"sampler NextTokenSampler is for next-token models, this is a next-scale "
                                         r"model; its samplers: \['nextscale'"):
        sample(load(str(converted)), sampler=NextTokenSampler())
    with pytest.raises(ValueError, match=r"unknown next-scale KV-cache policy 'nexttoken'; available: \['full'"):
        sample(load(str(converted)), kv_cache="nexttoken")
    with pytest.raises(ValueError, match="KV-cache policy 3 is not a KV-cache policy"):
        sample(load(str(converted)), kv_cache=3)


def test_a_local_folder_named_like_an_official_model_is_loaded(converted, tmp_path, monkeypatch):
    shutil.copytree(converted, tmp_path / "var-d16")
    monkeypatch.chdir(tmp_path)
    assert torch.equal(sample(load("var-d16")), sample(load(str(converted))))


def test_inpaint_takes_arrays_and_refuses_unscaled_tensors(converted):
    pipe = load(str(converted))
    array = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    run = dict(mask=torch.ones(16, 16), output_type="pt", progress=False)
    from_array = pipe.inpaint(array, generator=torch.Generator().manual_seed(0), **run).images
    from_pil = pipe.inpaint(Image.fromarray(array), generator=torch.Generator().manual_seed(0), **run).images
    assert torch.equal(from_array, from_pil)
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got \[0, 255\]"):
        pipe.inpaint(torch.from_numpy(array).permute(2, 0, 1).float(), **run)
    with pytest.raises(ValueError, match="float tensor"):
        pipe.inpaint(torch.from_numpy(array).permute(2, 0, 1), **run)


@pytest.mark.parametrize("argv,match", [
    (["--class", "12"], r"class id 12 is outside"),
    (["--cfg", "-1"], "guidance_scale must be a finite number >= 0"),
    (["--top-p", "0"], "top_p must be in"),
    (["--top-k", "-1"], "top_k must be"),
    (["--class", "cat"], "unknown class 'cat'"),
    (["--sampler", "nope"], "bad --sampler 'nope': unknown next-scale sampler 'nope'; available: \\['nextscale'\\]"),
])
def test_bad_cli_arguments(converted, tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        cli_main(["sample", "--model", str(converted), "--out", str(tmp_path / "x.png"), "--device", "cpu"] + argv)


def test_missing_and_corrupt_files(official_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        VARPipeline.from_official(vae=official_files / "vae_tiny.pth", var=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=r"missing: vq='no_vq.pt', gpt='no_gpt.pt'$"):  # both at once
        GPTPipeline.from_official(vq="no_vq.pt", gpt="no_gpt.pt")
    names = r"vae='vae_ch160v4096z32.pth', var='var_d16.pth'"
    official = r"\S*/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth \S*/var_d16.pth"
    with pytest.raises(FileNotFoundError, match=rf"missing: {names}; download {official}"):
        VARPipeline.from_official(vae="vae_ch160v4096z32.pth", var="var_d16.pth")  # official names: where to get them
    corrupt = tmp_path / "var_corrupt.pth"
    corrupt.write_bytes((official_files / "var_tiny.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="var_corrupt.pth"):
        VARPipeline.from_official(vae=official_files / "vae_tiny.pth", var=corrupt)
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        load(str(tmp_path / "no-such-model"))
    with pytest.raises(SystemExit, match="vartk convert"):
        cli_main(["convert", "--var", str(official_files / "var_tiny.pth"), "--out", str(tmp_path / "o")])


def test_wrong_file_names_the_key(official_files, tmp_path):
    state = torch.load(official_files / "var_tiny.pth", weights_only=True)
    state["head.bias"] = torch.zeros(65)
    torch.save(state, tmp_path / "var_bad.pth")
    with pytest.raises(CheckpointError, match=r"head.bias: file \(65,\) vs model \(64,\)"):
        VARPipeline.from_official(vae=official_files / "vae_tiny.pth", var=tmp_path / "var_bad.pth")


TINY_GPT = dict(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=10)


@pytest.fixture
def tiny_llamagen(tmp_path, monkeypatch):
    """Official-layout files of a tiny LlamaGen in VARTK_HOME, known as "llamagen-t": preset "GPT-T" at 64 px,
    a 4x4 grid of VQ-16 tokens."""
    from vartk.tokenizers.vq import VQModel

    torch.manual_seed(0)
    vq = VQModel(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, codebook_size=64,
                 usage_queue_size=256)
    gpt = GPTTransformer(**TINY_GPT, grid_size=4)
    gpt.init_weights(randomize_output=True)
    torch.save({"model": vq.state_dict()}, tmp_path / "vq_tiny.pt")
    torch.save({"model": gpt.state_dict()}, tmp_path / "c2i_T_64.pt")
    monkeypatch.setitem(GPT_CONFIGS, "GPT-T", TINY_GPT)
    monkeypatch.setitem(KNOWN_MODELS, "llamagen-t", KnownModel(
        "llamagen", "FoundationVision/LlamaGen", {"vq": "vq_tiny.pt", "gpt": "c2i_T_64.pt"},
        {"model": "GPT-T", "image_size": 64}))
    monkeypatch.setenv("VARTK_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_an_official_llamagen_name_loads_its_files_at_its_image_size(tiny_llamagen):
    pipe = load("llamagen-t")
    assert isinstance(pipe, GPTPipeline) and pipe.transformer.config.grid_size == 64 // 16
    file_sd = torch.load(tiny_llamagen / "c2i_T_64.pt", weights_only=True)["model"]
    assert pipe.transformer.state_dict().keys() == file_sd.keys()
    assert all(torch.equal(value, file_sd[key]) for key, value in pipe.transformer.state_dict().items())
    vq_sd = torch.load(tiny_llamagen / "vq_tiny.pt", weights_only=True)["model"]
    assert torch.equal(pipe.tokenizer.quantize.embedding.weight, vq_sd["quantize.embedding.weight"])


def test_convert_llamagen_files_then_load_samples_as_from_official(tiny_llamagen):
    files = dict(vq=tiny_llamagen / "vq_tiny.pt", gpt=tiny_llamagen / "c2i_T_64.pt")
    cli_main(["convert", "--vq", str(files["vq"]), "--gpt", str(files["gpt"]), "--gpt-model", "GPT-T",
              "--image-size", "64", "--out", str(tiny_llamagen / "tiny-gpt")])
    greedy = dict(class_labels=[1, 7], top_k=1, output_type="pt", progress=False)
    converted = load(str(tiny_llamagen / "tiny-gpt"))(**greedy).images
    official = GPTPipeline.from_official(**files, model="GPT-T", image_size=64)(**greedy).images
    assert converted.shape == (2, 3, 64, 64) and torch.equal(converted, official)


def test_gpt_pipeline_round_trip_and_class_names(tmp_path):
    from vartk.tokenizers.vq import VQModel

    torch.manual_seed(0)
    tokenizer = VQModel(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=16, codebook_size=64, codebook_embed_dim=8)
    transformer = GPTTransformer(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=3, grid_size=4)
    transformer.init_weights(randomize_output=True)
    names = ["cat", "dog", "fox"]
    pipe = GPTPipeline(tokenizer=tokenizer, transformer=transformer, class_names=names)
    images = sample(pipe, class_labels=[0, 2], guidance_scale=2.0, top_k=0, top_p=1.0)
    assert images.shape == (2, 3, 8, 8)
    pipe.save_pretrained(tmp_path / "gpt")
    assert json.loads((tmp_path / "gpt" / "model_index.json").read_text())["_class_name"] == ["vartk_pipeline",
                                                                                           "GPTPipeline"]
    again = load(str(tmp_path / "gpt"))
    assert again.class_names == names
    assert torch.equal(images, sample(again, class_labels=[0, 2], guidance_scale=2.0, top_k=0, top_p=1.0))
    grid = tmp_path / "fox.png"
    cli_main(["sample", "--model", str(tmp_path / "gpt"), "--class", "fox", "--n", "2", "--out", str(grid), "--device", "cpu"])
    assert grid.is_file()
    by_name = sample(again, class_labels=["cat", "fox"], guidance_scale=2.0, top_k=0, top_p=1.0)
    assert torch.equal(by_name, images)
    assert sample(again, class_labels="dog", num_images_per_label=np.int64(2)).shape[0] == 2
    with pytest.raises(ValueError, match=r"unknown class 'wolf'; use one of \['cat', 'dog', 'fox'\]"):
        sample(again, class_labels=["cat", "wolf"])
    with pytest.raises(SystemExit, match="GPTPipeline; in/out-painting needs a next-scale"):
        cli_main(["inpaint", "--model", str(tmp_path / "gpt"), "--image", str(grid), "--box", "0,0,0.5,0.5",
                  "--out", str(tmp_path / "in.png")])
    with pytest.raises(ValueError, match="1 class names given for a model with 3 classes"):
        GPTPipeline(tokenizer=tokenizer, transformer=transformer, class_names=["a"])


def test_a_tokenizer_that_does_not_fit_the_transformer_is_refused_when_the_pipeline_is_made():
    from vartk.tokenizers.vq import VQModel

    gpt = GPTTransformer(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=3, grid_size=4)
    small_codebook = VQModel(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=16, codebook_size=32,
                             codebook_embed_dim=8)
    with pytest.raises(ValueError, match="transformer vocab_size 64 differs from tokenizer vocab_size 32"):
        GPTPipeline(tokenizer=small_codebook, transformer=gpt)
    with pytest.raises(ValueError, match=r"token maps are \(1, 2, 4\) a side, the transformer's grid is 4"):
        GPTPipeline(tokenizer=MultiScaleVQVAE(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, vocab_size=64,
                                              patch_nums=(1, 2, 4)), transformer=gpt)
    ds2 = VQModel(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=16, codebook_size=64, codebook_embed_dim=8)
    with pytest.raises(ValueError, match="the VQ downsamples by 2; the c2i GPTs were trained on VQ-16 tokens"):
        GPTPipeline.from_official(vq=ds2.state_dict(), gpt=gpt.state_dict())
    with pytest.raises(ValueError, match="transformer vocab_size 64 differs from tokenizer vocab_size 32"):
        VARPipeline(tokenizer=MultiScaleVQVAE(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, vocab_size=32),
                    transformer=tiny_var())


def test_saved_sampling_defaults_apply_when_no_setting_is_given(tmp_path):
    from vartk.tokenizers.vq import VQModel

    torch.manual_seed(0)
    tokenizer = VQModel(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=16, codebook_size=64, codebook_embed_dim=8)
    transformer = GPTTransformer(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=3, grid_size=4)
    transformer.init_weights(randomize_output=True)
    pipe = GPTPipeline(tokenizer=tokenizer, transformer=transformer, sampling_defaults={"guidance_scale": 4.0, "top_k": 3})
    pipe.save_pretrained(tmp_path / "gpt")
    again = load(str(tmp_path / "gpt"))
    assert again.sampling_options() == dict(guidance_scale=4.0, top_k=3, top_p=1.0)  # top_p: the official 1.0
    assert again.sampling_options(top_k=0) == dict(guidance_scale=4.0, top_k=0, top_p=1.0)
    bare = dict(class_labels=[0, 1, 2], output_type="pt", progress=False)
    saved = again(generator=torch.Generator().manual_seed(0), **bare).images
    explicit = again(generator=torch.Generator().manual_seed(0), guidance_scale=4.0, top_k=3, top_p=1.0, **bare).images
    official = again(generator=torch.Generator().manual_seed(0), guidance_scale=2.0, top_k=0, top_p=1.0, **bare).images
    assert torch.equal(saved, explicit) and not torch.equal(saved, official)
    plain = GPTPipeline(tokenizer=tokenizer, transformer=transformer)
    assert plain.sampling_options() == dict(guidance_scale=2.0, top_k=0, top_p=1.0)
    with pytest.raises(ValueError, match=r"sampling_defaults \['temperature'\] unknown"):
        GPTPipeline(tokenizer=tokenizer, transformer=transformer, sampling_defaults={"temperature": 0.9})


def test_a_pipeline_saves_its_sampler_and_kv_cache_with_every_setting(converted, tmp_path):
    from vartk.samplers import ScaleKVCache

    pipe = load(str(converted))
    pipe.sampler = "nextscale:more_smooth=true,guidance_schedule=constant"
    pipe.kv_cache = ScaleKVCache(budget=0.3, scoring="released")
    expected = sample(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["sampler"] == {"name": "nextscale", "settings": {"more_smooth": True, "guidance_schedule": "constant"}}
    assert index["kv_cache"]["name"] == "scalekv" and index["kv_cache"]["settings"]["scoring"] == "released"
    again = load(str(tmp_path / "saved"))
    assert again.sampler == NextScaleSampler(more_smooth=True, guidance_schedule="constant")
    assert again.kv_cache == ScaleKVCache(budget=0.3, scoring="released")
    assert torch.equal(sample(again), expected)
    assert not torch.equal(sample(again, sampler="nextscale", kv_cache="full"), expected)


@pytest.mark.parametrize("key, saved, message", [
    ("sampler", {"name": "nextscale", "settings": {"smooth": True}}, "nextscale has no setting 'smooth'"),
    ("sampler", {"name": "sjd", "settings": {}}, r"unknown next-scale sampler 'sjd'; available: \['nextscale'\]"),
    ("kv_cache", {"name": "scalekv", "settings": {"budget": 3}}, r"budget must be in \(0, 1\]"),
    ("kv_cache", {"name": "full", "settings": {}, "budget": 1}, "unexpected 'budget'"),
])
def test_saved_settings_load_strictly(converted, tmp_path, key, saved, message):
    folder = tmp_path / "edited"
    shutil.copytree(converted, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, key: saved}))
    with pytest.raises(CheckpointError, match=message):
        load(str(folder))


def test_a_folder_without_saved_samplers_loads_with_the_plain_ones(tmp_path):
    """Folders written before pipelines saved samplers (no sampler / kv_cache / kv_calibration in model_index.json,
    the class named as a plain string) load with the plain sampler and the full cache."""
    from vartk.loading import BUILTIN_MODELS
    from vartk.samplers import NextTokenSampler

    for name, plain in (("default", NextScaleSampler()), ("default-gpt", NextTokenSampler())):
        folder = shutil.copytree(BUILTIN_MODELS[name], tmp_path / name)
        index = json.loads((folder / "model_index.json").read_text())
        old_index = {key: value for key, value in index.items() if key not in ("sampler", "kv_cache", "kv_calibration")}
        old_index["_class_name"] = index["_class_name"][1]
        (folder / "model_index.json").write_text(json.dumps(old_index))
        (folder / "vartk_pipeline.py").unlink()
        pipe = load(str(folder))
        assert pipe.sampler == plain and pipe.kv_cache is None and pipe.kv_calibration is None


def test_sample_verbose_prints_what_sampling_cost(converted, tmp_path, capsys):
    cli_main(["sample", "--model", str(converted), "--n", "2", "--out", str(tmp_path / "g.png"), "--device", "cpu",
              "-v", "--kv-cache", "sliding:budget=0.5"])
    printed = capsys.readouterr().out
    tokens = sum(pn * pn for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))  # the official 256 px schedule
    assert re.search(rf"2 images, 10 transformer forwards \(10\.0 per image\), {tokens / 10:.2f} tokens per forward "
                     r"\(rows .*\), [0-9.]+ s, KV cache peak [0-9.]+ [KM]iB", printed)


def test_diffusers_loads_a_saved_folder_as_vartk_load_does(converted, tmp_path, monkeypatch):
    """diffusers' own entry point finds the class through the module file the folder holds and loads the components
    as strictly as vartk.load, with every saved setting."""
    import sys

    from diffusers import DiffusionPipeline
    from diffusers.utils import dynamic_modules_utils
    from safetensors.torch import load_file, save_file

    from vartk.loading import BUILTIN_MODELS
    from vartk.samplers import ScaleKVCache
    from vartk.samplers.scalekv import calibrate

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # diffusers copies the
    monkeypatch.setattr(sys, "path", list(sys.path))  # module file there and adds it to sys.path
    base = load(str(converted))
    pipe = VARPipeline(tokenizer=base.tokenizer, transformer=base.transformer, class_names=list("abcdefghij"),
                       sampling_defaults={"top_k": 5}, sampler="nextscale:more_smooth=true",
                       kv_cache=ScaleKVCache(budget=0.5))
    pipe.kv_calibration = calibrate(pipe, samples=2, batch_size=2, progress=False)
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == ["vartk_pipeline",
                                                                                             "VARPipeline"]
    ours = load(str(tmp_path / "saved"))
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(theirs) is VARPipeline
    settings = lambda p: {k: v for k, v in p.config.items() if k != "_name_or_path"}  # noqa: E731
    assert settings(theirs) == settings(ours) and theirs.kv_calibration == pipe.kv_calibration
    assert (theirs.sampler, theirs.kv_cache) == (NextScaleSampler(more_smooth=True), ScaleKVCache(budget=0.5))
    for name in ("tokenizer", "transformer"):
        mine, other = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine), name
    assert torch.equal(sample(theirs, class_labels=["b", "d"]), sample(ours, class_labels=["b", "d"]))

    cast = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True, dtype=torch.bfloat16)
    assert cast.transformer.dtype == torch.bfloat16 and cast.tokenizer.dtype == torch.float32  # as vartk.load
    weights = tmp_path / "saved" / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if k != "head.bias"}, weights)
    with pytest.raises(CheckpointError, match=r"saved/transformer does not match VARTransformer: missing keys "
                                              r"\['head.bias'\]"):  # ModelMixin.from_pretrained would draw it at random
        DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    shipped = DiffusionPipeline.from_pretrained(BUILTIN_MODELS["default"], trust_remote_code=True)
    assert type(shipped) is VARPipeline and shipped.kv_calibration == load("default").kv_calibration
