"""Training: data order, LR schedule, checkpoints, loss goes down, --resume is exact, torchrun DDP."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _train_helpers import (  # noqa: F401  (images, one_thread: fixtures)
    FAST, SIZE, TOKENIZER, TOKENIZER_ARGS, images, job_args, kill_after, one_thread, read_log, save_tokenizer,
    write_images,
)
from vartk.tokenizers.msvq import MultiScaleVQVAE
from vartk.train import train_main
from vartk.train.data import Batch, BatchOrder, ImageFolder, decode_size, find_images
from vartk.train.loop import TrainConfig, lr_factor, parse_config
from vartk.train.resume import latest_checkpoint


def tokenizer_job(images: Path, *flags: str):
    """The TokenizerJob a run with these flags starts from (same seed, so the same initial weights), on CPU."""
    from vartk.train.tokenizer import TokenizerJob, TokenizerTrainConfig

    cfg = parse_config(TokenizerTrainConfig, ["--data", str(images), "--image-size", str(SIZE), *TOKENIZER_ARGS,
                                              *flags], "test")
    torch.manual_seed(cfg.seed)
    dataset = ImageFolder(images, decode_size(SIZE, cfg.crop_scale), cache=True)  # as run_training decodes it
    return TokenizerJob(cfg, dataset, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- data
def test_find_images_class_folders_and_flat_folder(images, tmp_path):
    paths, labels, names = find_images(images)
    assert names == ["class_0", "class_1"] and labels == [0] * 4 + [1] * 4 and len(paths) == 8
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in paths[:3]:
        shutil.copy(p, flat / f"{p.parent.name}_{p.name}")
    assert find_images(flat)[1:] == ([0, 0, 0], ["flat"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        find_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        find_images(tmp_path / "missing")


def test_hidden_folders_are_not_classes_and_empty_class_folders_are_refused(images, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    shutil.copytree(images / "class_0", data / ".ipynb_checkpoints")
    shutil.copy(next((images / "class_1").iterdir()), data / "class_1" / "._macos.png")
    paths, labels, names = find_images(data)
    assert names == ["class_0", "class_1"] and labels == [0] * 4 + [1] * 4
    assert [p.relative_to(data) for p in paths] == [p.relative_to(images) for p in find_images(images)[0]]
    (data / "class_00").mkdir()  # sorts between class_0 and class_1: would shift class_1's id
    with pytest.raises(FileNotFoundError, match=r"class folders \['class_00'\] .* hold no images"):
        find_images(data)


def test_image_folder_resizes_and_caches(images):
    dataset = ImageFolder(images, SIZE, cache=True)
    image, label = dataset[5]
    assert dataset.images.shape == (8, 3, SIZE, SIZE) and dataset.images.dtype == torch.uint8 and label == 1
    assert torch.equal(image, ImageFolder(images, SIZE, cache=False)[5][0])


def test_non_square_images_are_resized_on_the_short_side_and_centre_cropped(tmp_path):
    """48x16 red | green | blue bands, wide and tall: the documented LANCZOS resize of the short side to 8 px and
    centre crop, done here with PIL, keeps the green middle band."""
    bands = np.zeros((16, 48, 3), np.uint8)  # [H, W, 3]: 16 px each
    bands[:, :16, 0], bands[:, 16:32, 1], bands[:, 32:, 2] = 255, 255, 255
    (tmp_path / "bands").mkdir()
    Image.fromarray(bands).save(tmp_path / "bands" / "wide.png")
    Image.fromarray(bands.transpose(1, 0, 2).copy()).save(tmp_path / "bands" / "tall.png")
    dataset = ImageFolder(tmp_path / "bands", SIZE, cache=False)
    for index, (size, crop) in enumerate([((SIZE, 24), (0, 8, SIZE, 16)), ((24, SIZE), (8, 0, 16, SIZE))]):
        image = dataset[index][0]  # tall.png sorts first
        expected = Image.open(dataset.paths[index]).resize(size, Image.Resampling.LANCZOS).crop(crop)
        assert torch.equal(image, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1))
        assert (image[1] > 200).all() and (image[[0, 2]] < 50).all()  # green, with a tinge of red / blue at its ends


def test_batch_order_is_a_seeded_partition_and_resumes_mid_epoch():
    orders = [BatchOrder(20, batch_size=3, seed=7, rank=r, world_size=2) for r in range(2)]
    assert orders[0].batches_per_epoch == 3  # 10 per rank, incomplete last batch dropped
    epoch = [sum(order.epoch(1), []) for order in orders]
    assert not set(epoch[0]) & set(epoch[1])  # ranks read disjoint images
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(7 + 1)).tolist()  # DistributedSampler rule
    assert epoch[0] == expected[0::2][:9] and epoch[1] == expected[1::2][:9]
    stream = orders[0].batches(0)
    uninterrupted = [next(stream) for _ in range(8)]
    resumed = orders[0].batches(4)
    assert [next(resumed) for _ in range(4)] == uninterrupted[4:]


def test_class_balanced_order_evens_out_classes_and_is_a_function_of_the_epoch():
    labels = torch.tensor([0] * 90 + [1] * 10)  # 90 % class 0
    def class_one_share(balance: float) -> float:
        order = BatchOrder(100, batch_size=10, seed=3, rank=0, world_size=1, labels=labels, class_balance=balance)
        drawn = torch.tensor([i for e in range(40) for batch in order.epoch(e) for i in batch])  # 4000 draws
        return (labels[drawn] == 1).float().mean().item()
    assert abs(class_one_share(1.0) - 0.5) < 0.04  # weight 1/n: both classes equally often
    assert abs(class_one_share(0.5) - 1 / (1 + 3)) < 0.04  # weight n^-1/2: shares 90^0.5 : 10^0.5 = 3 : 1
    assert abs(class_one_share(0.0) - 0.1) < 1e-6  # a plain shuffle keeps the dataset's shares
    ranks = [BatchOrder(100, 10, 3, r, 2, labels, 1.0) for r in range(2)]
    assert ranks[0].epoch(5) == ranks[0].epoch(5) and ranks[0].epoch(5) != ranks[1].epoch(5)
    assert ranks[0].batches_per_epoch == 5
    with pytest.raises(ValueError, match="class_balance"):
        BatchOrder(100, 10, 3, 0, 1, None, 0.5)


def resized_copy(folder: Path, into: Path, mirror: bool) -> Path:
    """The image folder at SIZE px (so loading it does not resample), each image flipped left-right by PIL if
    `mirror`."""
    for path in sorted(folder.rglob("*.png")):
        image = Image.open(path).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        (into / path.parent.name).mkdir(parents=True, exist_ok=True)
        (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else image).save(into / path.parent.name / path.name)
    return into


@pytest.mark.parametrize("job, tokens", [("tokenizer", []), ("var", ["--precompute-tokens"]),
                                         ("var", ["--no-precompute-tokens"]), ("gpt", ["--precompute-tokens"]),
                                         ("gpt", ["--no-precompute-tokens"])])
def test_hflip_1_trains_as_on_a_mirrored_folder(job, tokens, images, tmp_path):
    """--hflip 1 mirrors every image, so its losses equal a run's on a folder of PIL-mirrored copies."""
    common = ["--batch-size", "4", "--max-steps", "3", "--log-every", "1", *FAST, *job_args(job, images, tmp_path),
              *tokens]
    upright = resized_copy(images, tmp_path / "upright", mirror=False)
    mirrored = resized_copy(images, tmp_path / "mirrored", mirror=True)
    losses = {}
    for name, data, flip in [("flip", upright, "1"), ("mirrored", mirrored, "0"), ("upright", upright, "0")]:
        train_main(job, ["--data", str(data), "--out", str(tmp_path / "runs" / name), "--hflip", flip, *common])
        losses[name] = [r["loss"] for r in read_log(tmp_path / "runs" / name)]
    assert losses["flip"] == pytest.approx(losses["mirrored"], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(losses["upright"], losses["mirrored"])) > 1e-4  # the flips matter


def test_init_from_starts_from_the_given_weights(images, tmp_path):
    """--init-from with lr 0 exports exactly the weights it started from; a wrong folder names the keys."""
    args = ["--data", str(images), "--batch-size", "4", "--max-steps", "1", "--save-every", "1", *FAST,
            *job_args("gpt", images, tmp_path)]
    train_main("gpt", [*args, "--out", str(tmp_path / "first"), "--lr", "3e-3"])
    first = tmp_path / "first" / "transformer"
    train_main("gpt", [*args, "--out", str(tmp_path / "second"), "--lr", "0", "--seed", "5",
                       "--init-from", str(first)])
    from safetensors.torch import load_file
    weights_name = "diffusion_pytorch_model.safetensors"
    start, end = load_file(first / weights_name), load_file(tmp_path / "second" / "transformer" / weights_name)
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    from vartk.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="missing keys|unexpected keys|shape mismatch"):
        train_main("gpt", [*args, "--out", str(tmp_path / "third"), "--init-from", str(tmp_path / "vq1")])
    with pytest.raises(SystemExit, match="--init-from .*no diffusion_pytorch_model.safetensors"):
        train_main("gpt", [*args, "--out", str(tmp_path / "fourth"), "--init-from", str(tmp_path)])


# ---------------------------------------------------------------------------------------------- config / schedule
def test_config_flags_from_dataclass_fields():
    from vartk.train.tokenizer import TokenizerTrainConfig

    cfg = parse_config(TokenizerTrainConfig, ["--data", "x", "--patch-nums", "1,2,4", "--image-size", "8",
                                              "--ch-mult", "1,2", "--no-progress"], "test")
    assert cfg.patch_nums == (1, 2, 4) and cfg.ch_mult == (1, 2) and cfg.progress is False
    with pytest.raises(SystemExit, match="--data is required"):
        parse_config(TokenizerTrainConfig, [], "test")
    with pytest.raises(SystemExit, match="--patch-nums ends at 16"):
        parse_config(TokenizerTrainConfig, ["--data", "x", "--image-size", "8"], "test")
    with pytest.raises(SystemExit, match=r"--gan-start 50 must be in \[0, --max-steps 50\)"):
        parse_config(TokenizerTrainConfig, ["--data", "x", "--gan-weight", "0.1", "--gan-start", "50",
                                            "--max-steps", "50"], "test")
    with pytest.raises(SystemExit, match="perceptual loss is not available"):
        parse_config(TokenizerTrainConfig, ["--data", "x", "--lpips-weights", "vgg.pth"], "test")


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    cfg.schedule = "linear"
    assert lr_factor(35, cfg) == pytest.approx(1 - 0.9 * 0.25)


def test_trainee_step_returns_the_gradient_norm_and_clips_to_it():
    """loss = 10 * (w . x + b) with x = (3, 4): gradient (30, 40, 10), norm 10 * sqrt(26); clipped to norm 2, which
    SGD with lr 1 then subtracts; --grad-clip 0 leaves it whole."""
    from vartk.train.loop import Trainee

    x, gradient = torch.tensor([3.0, 4.0]), torch.tensor([30.0, 40.0, 10.0])
    for clip, expected_norm, applied in ((2.0, 10 * 26**0.5, gradient * 2 / (10 * 26**0.5)), (0.0, 0.0, gradient)):
        layer = torch.nn.Linear(2, 1)
        start = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])
        optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
        trainee = Trainee(layer, layer, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
        assert trainee.step(10 * layer(x).sum(), clip) == pytest.approx(expected_norm)
        assert torch.allclose(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]), applied)
        assert torch.allclose(torch.cat([layer.weight.detach().flatten(), layer.bias.detach()]), start - applied)


def test_discriminator_lr_warms_up_at_gan_start_and_decays_to_the_runs_end(images, tmp_path):
    out = tmp_path / "run"
    train_main("tokenizer", ["--data", str(images), "--out", str(out), "--batch-size", "4", "--max-steps", "10",
                             "--log-every", "1", "--save-every", "10", "--lr", "1e-3", "--min-lr-ratio", "0.1",
                             "--gan-weight", "0.1", "--gan-start", "4", "--disc-layers", "1", *FAST, *TOKENIZER_ARGS])
    log = read_log(out)
    assert [r["step"] for r in log if "discriminator_lr" in r] == list(range(4, 10))
    for record in log[4:]:  # the discriminator's own updates: warm-up 2, then the cosine over the 6 - 2 left
        update = record["step"] - 4
        factor = (update + 1) / 2 if update < 2 else 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (update - 2) / 4))
        assert record["discriminator_lr"] == pytest.approx(1e-3 * factor, rel=1e-6), record


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("job", ["tokenizer", "var", "gpt"])
def test_loss_decreases_on_a_fixed_batch(job, images, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", str(images), "--out", str(out), "--batch-size", "8", "--max-steps", "30", "--lr", "3e-3",
            "--log-every", "1", "--save-every", "30", *FAST, *job_args(job, images, tmp_path)]
    if job != "tokenizer":
        argv += ["--label-dropout", "0"]
    if job == "gpt":
        argv += ["--token-dropout", "0", "--resid-dropout", "0", "--ffn-dropout", "0"]
    train_main(job, argv)
    losses = [r["loss"] for r in read_log(out)]
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    exported = out / ("tokenizer" if job == "tokenizer" else "transformer")
    assert (exported / "config.json").is_file()


def test_label_dropout_replaces_a_share_p_of_the_labels_by_the_null_class():
    """The training loss reads labels of which a binomial share p became num_classes (10), the others unchanged;
    the held-out loss reads them all unchanged."""
    from vartk.train.conditional import ConditionalJob, ConditionalTrainConfig

    class LabelEcho(ConditionalJob):  # its loss is the labels it was given
        def __init__(self, p):
            self.cfg, self.num_classes, self.model = ConditionalTrainConfig(label_dropout=p), 10, None

        def batch_tokens(self, batch):
            return batch.images

        def token_loss(self, model, labels, tokens):
            return labels, {}

        generate = None  # never sampled

    n = 10_000
    labels = torch.arange(n) % 10
    batch = Batch(None, torch.zeros(n), labels)
    for p in (0.0, 0.1, 0.5, 1.0):
        torch.manual_seed(0)
        given = LabelEcho(p).loss("model", {"model": None}, batch, step=0)[0]
        dropped = given == 10
        assert torch.equal(given[~dropped], labels[~dropped])
        assert abs(dropped.sum().item() - n * p) <= 5 * (n * p * (1 - p)) ** 0.5, (p, dropped.sum())
        assert torch.equal(LabelEcho(p).validation_metrics(batch)["loss"], labels)


# what each resumed run exercises: the tokenizers with a GAN have two optimizers, the multi-scale one restarts codes,
# both train on random crops; the transformers have label dropout and flips, the VAR stochastic depth and random crops
# (encoded each step), the GPT dropout
RESUMED_RUNS = {
    "tokenizer": ["--gan-weight", "0.1", "--gan-start", "2", "--disc-layers", "1", "--restart-codes-every", "3",
                  "--crop-scale", "1.5"],
    "tokenizer-llamagen": ["--quantizer", "llamagen", "--codebook-dim", "4", "--gan-weight", "0.1", "--gan-start", "2",
                           "--disc-layers", "1", "--crop-scale", "1.5"],
    "var": ["--hflip", "0.5", "--drop-path-rate", "0.1", "--crop-scale", "1.5"],
    "gpt": ["--hflip", "0.5"],
}


@pytest.mark.parametrize("run", list(RESUMED_RUNS))
def test_resume_gives_the_uninterrupted_losses(run, images, tmp_path):
    """Kill after step 3 (keep only that checkpoint), resume in a fresh run: steps 3..5 match exactly."""
    job, extra = run.split("-")[0], RESUMED_RUNS[run]
    common = ["--batch-size", "4", "--max-steps", "6", "--log-every", "1", "--save-every", "3",
              "--keep-checkpoints", "5", *FAST, *job_args(job, images, tmp_path), *extra]
    full, killed = tmp_path / "full", tmp_path / "killed"
    train_main(job, ["--data", str(images), "--out", str(full), *common])
    kill_after(full, 3, killed)
    assert latest_checkpoint(killed).name == "step_0000003"
    train_main(job, ["--data", str(images), "--out", str(killed), "--resume", *common])
    uninterrupted, resumed = read_log(full), read_log(killed)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 5]  # the killed run's steps 3, 4 were logged once
    assert resumed[:3] == uninterrupted[:3]
    for a, b in zip(uninterrupted[3:], resumed[3:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
        if job == "tokenizer":
            assert abs(a["discriminator_loss"] - b["discriminator_loss"]) <= 1e-6


def test_architecture_defaults_are_the_official_ones():
    """GPT-L's official SwiGLU is 2816 wide (2/3 of 4 * 1024, rounded up to a multiple of 256); VAR's stochastic
    depth rises linearly to 0.1 * depth / 24 in the last block (d16: 0.0667)."""
    from vartk.train.gpt import GPTTrainConfig, build_gpt
    from vartk.train.var import VARTrainConfig, build_var

    with torch.device("meta"):
        gpt = build_gpt(GPTTrainConfig(dim=1024, n_layer=24, n_head=16), vocab_size=16384, num_classes=1000,
                        grid_size=16)
        var = build_var(VARTrainConfig(depth=16), vocab_size=4096, latent_channels=32, num_classes=1000,
                        patch_nums=(1, 2))
    assert gpt.layers[0].feed_forward.w1.weight.shape == (2816, 1024)
    assert var.blocks[0].drop_path_prob == 0 and var.blocks[-1].drop_path_prob == pytest.approx(0.1 * 16 / 24)


@pytest.mark.parametrize("shared_aln", [False, True])
def test_var_weight_decay_follows_the_official_rule(shared_aln):
    """No decay on 1-D parameters, biases and names containing pos_1LC / pos_start / lvl_embed / gamma / beta /
    ada_gss / scale_mul / cls_token (the official VAR trainer's rule), decay on the rest."""
    from vartk.models.var import VARTransformer
    from vartk.train.loop import TrainConfig, build_optimizer
    from vartk.train.var import VARJob

    model = VARTransformer(depth=2, width=32, num_heads=2, vocab_size=16, latent_channels=4, patch_nums=(1, 2),
                           shared_aln=shared_aln)
    optimizer, _ = build_optimizer(model, TrainConfig(weight_decay=0.05), VARJob.no_weight_decay, fused=False)
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    official_skip = ("pos_1LC", "pos_start", "lvl_embed", "gamma", "beta", "ada_gss", "scale_mul", "cls_token")
    for name, param in model.named_parameters():
        official = not (param.ndim < 2 or name.endswith("bias") or any(k in name for k in official_skip))
        assert (id(param) in decayed) == official, name


def test_resume_with_more_steps_recomputes_the_decay_over_the_new_total(images, tmp_path):
    common = ["--data", str(images), "--batch-size", "4", "--log-every", "1", "--save-every", "3", "--lr", "1e-3",
              "--min-lr-ratio", "0.1", *FAST, *TOKENIZER_ARGS]
    train_main("tokenizer", ["--out", str(tmp_path / "short"), "--max-steps", "6", *common])
    kill_after(tmp_path / "short", 3, tmp_path / "longer")  # mid-decay: the old and new curves differ at step 3
    train_main("tokenizer", ["--out", str(tmp_path / "longer"), "--max-steps", "12", "--resume", *common])
    logged = {r["step"]: r["lr"] for r in read_log(tmp_path / "longer") if r["step"] >= 3}
    assert sorted(logged) == list(range(3, 12))
    for step, lr in logged.items():  # warm-up 2, then the cosine over the 10 steps to the new end
        expected = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (step - 2) / 10)))
        assert lr == pytest.approx(expected, rel=1e-6), (step, lr, expected)


def test_stop_at_then_resume_gives_the_uninterrupted_run(images, tmp_path, capsys):
    """--stop-at 3 of 6 ends at checkpoint 3 on the 6-step schedule and exports nothing; --resume finishes onto the
    uninterrupted run's learning rates, losses and weights."""
    from safetensors.torch import load_file

    common = ["--data", str(images), "--batch-size", "4", "--max-steps", "6", "--log-every", "1", "--save-every", "3",
              "--lr", "1e-3", *FAST, *TOKENIZER_ARGS]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train_main("tokenizer", [*common, "--out", str(full)])
    capsys.readouterr()
    train_main("tokenizer", [*common, "--out", str(stopped), "--stop-at", "3"])
    assert f"stopped at step 3 of 6 ({stopped / 'checkpoints' / 'step_0000003'})" in capsys.readouterr().out
    assert latest_checkpoint(stopped).name == "step_0000003" and not (stopped / "tokenizer").exists()
    with pytest.raises(SystemExit, match="it is already at step 3, past --stop-at 2; give a later --stop-at"):
        train_main("tokenizer", [*common, "--out", str(stopped), "--resume", "--save-every", "1", "--stop-at", "2"])
    train_main("tokenizer", [*common, "--out", str(stopped), "--resume"])
    uninterrupted, resumed = read_log(full), read_log(stopped)
    assert [r["step"] for r in resumed] == list(range(6))
    for a, b in zip(uninterrupted, resumed):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9) and abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    weights = [load_file(run / "tokenizer" / "diffusion_pytorch_model.safetensors") for run in (full, stopped)]
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-6), name


def test_resume_refuses_settings_that_change_the_run(images, tmp_path):
    run = tmp_path / "run"
    common = ["--data", str(images), "--out", str(run), "--batch-size", "4", "--save-every", "2", *FAST,
              *TOKENIZER_ARGS]
    train_main("tokenizer", [*common, "--max-steps", "2"])
    resume = [*common, "--resume", "--max-steps", "4"]
    with pytest.raises(SystemExit, match=r"--lr 0\.0002 -> 0\.001; --seed 0 -> 1"):
        train_main("tokenizer", [*resume, "--lr", "1e-3", "--seed", "1"])
    with pytest.raises(SystemExit, match=r"--vocab-size 16 -> 32"):
        train_main("tokenizer", [*resume, "--vocab-size", "32"])
    with pytest.raises(SystemExit, match="already at step 2; give --max-steps 2 .to redo only the final export"):
        train_main("tokenizer", [*common, "--resume", "--max-steps", "1"])
    shutil.rmtree(run / "tokenizer")  # killed during the final export: resuming at the last step redoes it
    train_main("tokenizer", [*common, "--resume", "--max-steps", "2"])
    assert (run / "tokenizer" / "config.json").is_file()
    shutil.copy(images / "class_0" / "0.png", images / "class_0" / "copy.png")
    with pytest.raises(SystemExit, match="holds 9 images, the run was trained on 8"):
        train_main("tokenizer", resume)
    (images / "class_0" / "copy.png").unlink()
    renamed = tmp_path / "renamed"  # the same images, the second class under another name
    shutil.copytree(images / "class_0", renamed / "class_0")
    shutil.copytree(images / "class_1", renamed / "class_b")
    with pytest.raises(SystemExit, match=r"has the classes \['class_0', 'class_b'\], the run was trained on"):
        train_main("tokenizer", [*resume, "--data", str(renamed)])
    train_main("tokenizer", [*resume, "--log-every", "1", "--keep-checkpoints", "3"])  # logging may change
    assert latest_checkpoint(run).name == "step_0000004"


def test_checkpoint_layout_and_pruning(images, tmp_path):
    out = tmp_path / "run"
    train_main("tokenizer", ["--data", str(images), "--out", str(out), "--batch-size", "4", "--max-steps", "4",
                             "--save-every", "1", "--keep-checkpoints", "2", *FAST, *TOKENIZER_ARGS])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["latest", "step_0000003", "step_0000004"]
    folder = latest_checkpoint(out)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 2, 0)
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert optimizer["schedulers"]["model"]["last_epoch"] == 4
    reloaded = MultiScaleVQVAE.from_pretrained(folder / "model")
    exported = MultiScaleVQVAE.from_pretrained(out / "tokenizer")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), exported.state_dict().values()))


def held_out_metrics(job: str, out: Path, val: Path) -> dict[str, float]:
    """Recompute the held-out loss of a run's exported model by hand: every --val-data image in one batch."""
    import torch.nn.functional as F
    from vartk.pipelines import GPTPipeline, VARPipeline

    data = ImageFolder(val, SIZE, cache=True)
    images, labels = data.images.float() / 255, data.labels  # [N, 3, 8, 8], [N]
    with torch.no_grad():
        if job == "tokenizer":  # the loss reads the unclamped decoder output, PSNR the clamped images
            tokenizer = MultiScaleVQVAE.from_pretrained(out / "tokenizer")
            latent = tokenizer.tokens_to_latent(tokenizer.encode(images))  # [N, Cz, 4, 4]
            unclamped = tokenizer.decoder(tokenizer.post_quant_conv(latent))  # [N, 3, 8, 8] in about [-1, 1]
            image_mse = (tokenizer.decode(tokenizer.encode(images)) - images).pow(2).mean((1, 2, 3))  # [N]
            signed = images * 2 - 1  # the pixel losses compare [-1, 1] images, as the official ones
            return {"l2": F.mse_loss(unclamped, signed).item(), "l1": F.l1_loss(unclamped, signed).item(),
                    "psnr": (-10 * torch.log10(image_mse)).mean().item()}
        pipe = (VARPipeline if job == "var" else GPTPipeline).from_pretrained(out / "pipeline")
        maps = pipe.tokenizer.encode(images)  # per-scale [N, pn, pn]
        tokens = torch.cat([m.flatten(1) for m in maps], dim=1)  # [N, L]
        model = pipe.transformer.eval()
        logits = model(labels, pipe.tokenizer.teacher_forcing_input(maps) if job == "var" else tokens[:, :-1])
        return {"loss": F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).item(),
                "acc": (logits.argmax(-1) == tokens).float().mean().item()}


@pytest.mark.parametrize("job", ["tokenizer", "var", "gpt"])
def test_validation_loss_equals_a_direct_computation(job, images, tmp_path):
    """--val-data: at every checkpoint log.jsonl gets val_* metrics; at the last one they equal the exported
    model's loss on the held-out images computed by hand; the checkpoint records them."""
    val = write_images(tmp_path / "val", classes=2, per_class=3, seed=1)
    out = tmp_path / "run"
    train_main(job, ["--data", str(images), "--out", str(out), "--batch-size", "4", "--max-steps", "4",
                     "--save-every", "2", "--lr", "3e-3", "--val-data", str(val), *FAST,
                     *job_args(job, images, tmp_path)])
    records = [r for r in read_log(out) if "val_loss" in r]
    assert [r["step"] for r in records] == [1, 3]
    expected = held_out_metrics(job, out, val)
    for name, value in expected.items():
        assert abs(records[-1][f"val_{name}"] - value) <= 1e-5 * max(1.0, abs(value)), (name, records[-1], expected)
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["validation"]["loss"] == records[-1]["val_loss"]


def test_validation_data_must_have_the_training_classes(images, tmp_path):
    val = write_images(tmp_path / "val", classes=3, per_class=1)
    with pytest.raises(SystemExit, match=r"--val-data .* has classes \['class_2'\] that --data .* lacks"):
        train_main("tokenizer", ["--data", str(images), "--out", str(tmp_path / "run"), "--batch-size", "4",
                                 "--max-steps", "1", "--val-data", str(val), *FAST, *TOKENIZER_ARGS])


def test_tokenizer_validation_loss_is_the_weighted_sum_of_its_parts(images):
    """loss = vq_weight * vq + l2_weight * l2 + l1_weight * l1, the quantiser loss written out per scale (beta 0.25)
    and the pixel losses between the unclamped decoder output and the images, both in [-1, 1] (the official scale)."""
    import torch.nn.functional as F

    job = tokenizer_job(images, "--vq-weight", "0.5", "--l2-weight", "2", "--l1-weight", "3")
    model, pixels = job.model.eval(), job.preview  # [8, 3, 8, 8]
    with torch.no_grad():
        metrics = job.validation_metrics(Batch(None, pixels, torch.zeros(len(pixels), dtype=torch.long)))
        f = model.encode_latent(pixels)
        f_hats = [f_hat for _, f_hat in model.iter_residual_quantize(f)]
        vq = sum(0.25 * F.mse_loss(f_hat, f) + F.mse_loss(f_hat, f) for f_hat in f_hats) / len(f_hats)
        recon, signed = model.decoder(model.post_quant_conv(f_hats[-1])), pixels * 2 - 1  # both in [-1, 1]
        expected = 0.5 * vq + 2 * F.mse_loss(recon, signed) + 3 * F.l1_loss(recon, signed)
    assert metrics["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_patch_discriminator_is_initialised_as_pix2pix():
    """Conv weights N(0, 0.02), GroupNorm scales N(1, 0.02) and shifts 0 (pix2pix, LlamaGen's discriminator)."""
    from vartk.train.tokenizer import PatchDiscriminator

    torch.manual_seed(0)
    layers = list(PatchDiscriminator(channels=64, num_layers=3).net)
    conv_weights = torch.cat([m.weight.flatten() for m in layers if isinstance(m, torch.nn.Conv2d)])
    norms = [m for m in layers if isinstance(m, torch.nn.GroupNorm)]
    scales = torch.cat([m.weight for m in norms])
    assert abs(conv_weights.mean()) < 1e-3 and conv_weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert scales.mean().item() == pytest.approx(1.0, abs=3e-3) and scales.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)


class RedLogits(torch.nn.Module):
    """A discriminator whose logit per pixel is 8 * red - 2."""

    def forward(self, pixels):
        return 8 * pixels[:, :1] - 2  # [B, 1, H, W]


def red_logits_gan_job(images):
    """A tokenizer job with --gan-weight 0.5 from step 1 on against RedLogits, its preview images and their batch."""
    job = tokenizer_job(images, "--gan-weight", "0.5", "--gan-start", "1")
    job.discriminator = RedLogits()
    real = job.preview  # [8, 3, 8, 8]
    return job, real, Batch(None, real, torch.zeros(len(real), dtype=torch.long))


def test_patchgan_hinge_losses(images):
    """With a discriminator whose logits are 8 * red - 2 per pixel: from --gan-start on the generator loss adds
    -gan_weight * mean logit of the reconstructions; the discriminator's is gan_weight times the hinge
    0.5 * (mean relu(1 - real logits) + mean relu(1 + fake logits))."""
    import torch.nn.functional as F

    job, real, batch = red_logits_gan_job(images)
    for step in (0, 1):
        loss, metrics = job.loss("model", {"model": job.model}, batch, step)
        fake = job.reconstruction
        gan = -0.5 * (8 * fake[:, :1] - 2).mean() if step else 0.0
        assert loss.item() == pytest.approx((metrics["vq"] + metrics["l2"] + gan).item(), rel=1e-5)
    assert abs(gan) > 0.1
    hinge = 0.5 * (F.relu(1 - (8 * real[:, :1] - 2)).mean() + F.relu(1 + (8 * fake[:, :1] - 2)).mean())
    loss, metrics = job.discriminator_loss(job.discriminator, real)
    assert metrics["hinge"].item() == pytest.approx(hinge.item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * hinge.item(), rel=1e-6)  # weighted by --gan-weight, as LlamaGen's


def test_pruning_keeps_the_best_validated_checkpoint_and_export_picks_it(tmp_path):
    """Held-out losses 0.5, 0.2, 0.9, 0.8 at steps 1-4 with keep 1: steps 2 (best) and 4 (newest) stay."""
    from vartk.train.resume import best_checkpoint, save_checkpoint
    from vartk.train.export import find_checkpoint

    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step, loss in enumerate([0.5, 0.2, 0.9, 0.8], start=1):
        save_checkpoint(tmp_path, step, {"model": module}, {"model": optimizer}, {"model": scheduler},
                        {"validation": {"loss": loss}}, keep=1)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_0000002", "step_0000004"]
    assert best_checkpoint(tmp_path).name == find_checkpoint(tmp_path, None, best=True).name == "step_0000002"
    assert latest_checkpoint(tmp_path).name == "step_0000004"
    with pytest.raises(SystemExit, match="no checkpoint in .* was validated; train with --val-data"):
        find_checkpoint(tmp_path / "elsewhere", None, best=True)
    resumed = tmp_path / "resumed"  # --val-data changed on resume at step 3: losses of the two sets do not compare
    for step, loss, held_out in ((1, 0.1, "val_a"), (2, 0.5, "val_a"), (3, 0.4, "val_b"), (4, 0.3, "val_b")):
        save_checkpoint(resumed, step, {"model": module}, {"model": optimizer}, {"model": scheduler},
                        {"validation": {"loss": loss}, "config": {"val_data": held_out, "val_images": 8}}, keep=5)
    assert best_checkpoint(resumed).name == "step_0000004"


def test_torchrun_two_processes_gloo(images, tmp_path):
    out = tmp_path / "ddp"
    val = write_images(tmp_path / "val", classes=2, per_class=1, seed=1)
    shutil.copy(val / "class_0" / "0.png", val / "class_0" / "1.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vartk.cli",
               "train", "tokenizer", "--data", str(images), "--out", str(out), "--batch-size", "2", "--max-steps", "3",
               "--log-every", "1", "--save-every", "3", "--device", "cpu", "--gan-weight", "0.1", "--disc-layers", "1",
               "--val-data", str(val), *FAST, *TOKENIZER_ARGS]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [0, 1, 2]
    job = tokenizer_job(images, "--gan-weight", "0.1", "--disc-layers", "1")
    data = ImageFolder(images, SIZE, cache=True)
    first_batches = [BatchOrder(8, 2, seed=0, rank=rank, world_size=2).epoch(0)[0] for rank in range(2)]
    with torch.no_grad():  # step 0's loss on each process, from the run's initial weights
        losses = [job.loss("model", {"model": job.model}, Batch(None, data.images[i].float() / 255, data.labels[i]),
                           step=0)[0].item() for i in first_batches]
    assert log[0]["loss"] == pytest.approx(np.mean(losses), rel=1e-5) and abs(losses[0] - losses[1]) > 1e-3
    held_out = [r for r in log if "val_loss" in r]  # 3 images split over the 2 processes, image-weighted
    assert len(held_out) == 1 and abs(held_out[0]["val_l2"] - held_out_metrics("tokenizer", out, val)["l2"]) <= 1e-5
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert (out / "tokenizer" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- codebook restarts
def test_unused_codes_restart_on_residual_vectors():
    """A collapsed codebook (code 0 at the origin, every other code far away): the unused codes move onto residual
    vectors of the batch, the used code stays, and the same batch then uses most codes."""
    from vartk.train.tokenizer import restart_unused_codes

    torch.manual_seed(0)
    model = MultiScaleVQVAE(**TOKENIZER, patch_nums=(1, 2, 4), share_quant_resi=3).train()
    images = torch.rand(4, 3, SIZE, SIZE).round()  # [4, 3, 8, 8] black-and-white noise: varied latents
    with torch.no_grad():
        model.quantize.embedding.weight[0] = 0
        model.quantize.embedding.weight[1:] = 1e3
    f = model.encode_latent(images)  # [4, Cz, 4, 4]
    vectors = model.residual_vectors(images)  # [4 * (1 + 4 + 16), Cz]
    assert vectors.shape == (4 * 21, TOKENIZER["z_channels"])
    assert torch.allclose(vectors[:4], f.mean((2, 3)), atol=1e-6)  # the 1x1 scale looks up the mean latent
    used_code = model.quantize.embedding.weight[0].clone()
    _, _, stats = model(images)
    assert stats["codebook_usage"] == 1 / TOKENIZER["vocab_size"]
    moved = restart_unused_codes(model, stats["code_hits"], images)
    assert moved == TOKENIZER["vocab_size"] - 1
    codebook = model.quantize.embedding.weight.detach()
    assert torch.equal(codebook[0], used_code)
    assert all(torch.isclose(vectors, code, atol=1e-6).all(1).any() for code in codebook[1:])
    _, _, after = model(images)
    assert after["codebook_usage"] >= 0.5
    from vartk.train.tokenizer import TokenizerTrainConfig

    for save_every, max_steps in ((10, 30), (9, 10)):  # the final checkpoint at --max-steps must not cut a window
        with pytest.raises(SystemExit, match=f"--restart-codes-every 3 must be >= 0 and divide --save-every "
                                             f"{save_every} and --max-steps {max_steps}"):
            parse_config(TokenizerTrainConfig, ["--data", "x", "--image-size", "8", "--patch-nums", "1,2,4",
                                                "--ch-mult", "1,2", "--save-every", str(save_every), "--max-steps",
                                                str(max_steps), "--restart-codes-every", "3"], "test")


def test_train_decoder_only_keeps_the_tokens_and_changes_the_decoder(images, tmp_path):
    """--train-decoder-only from a tokenizer: encoder, quant_conv and quantiser parameters stay bit-identical (so
    the token maps do), post_quant_conv and the decoder move; combined with code restarts it is refused."""
    start = MultiScaleVQVAE.from_pretrained(save_tokenizer(tmp_path / "start", (1, 2, 4)))
    train_main("tokenizer", ["--data", str(images), "--out", str(tmp_path / "dec"), "--batch-size", "4",
                             "--max-steps", "3", "--save-every", "3", "--lr", "1e-2", *FAST, *TOKENIZER_ARGS,
                             "--share-quant-resi", "3", "--init-from", str(tmp_path / "start"), "--train-decoder-only"])
    tuned = MultiScaleVQVAE.from_pretrained(tmp_path / "dec" / "tokenizer")
    before, after = dict(start.named_parameters()), dict(tuned.named_parameters())  # (usage statistics are buffers)
    frozen = [k for k in before if k.split(".")[0] in ("encoder", "quant_conv", "quantize")]
    trained = [k for k in before if k.split(".")[0] in ("decoder", "post_quant_conv")]
    assert len(frozen) + len(trained) == len(before) and frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in trained) >= len(trained) // 2
    pixels = torch.rand(4, 3, SIZE, SIZE)
    assert all(torch.equal(a, b) for a, b in zip(start.encode(pixels), tuned.encode(pixels)))
    assert not torch.equal(start.decode(start.encode(pixels)), tuned.decode(tuned.encode(pixels)))
    from vartk.train.tokenizer import TokenizerTrainConfig
    with pytest.raises(SystemExit, match="--train-decoder-only keeps the codebook fixed"):
        parse_config(TokenizerTrainConfig, ["--data", "x", "--image-size", "8", "--patch-nums", "1,2,4", "--ch-mult",
                                            "1,2", "--train-decoder-only", "--restart-codes-every", "5"], "test")


def test_export_a_pipeline_from_any_checkpoint(images, tmp_path):
    """`vartk train export` of the last checkpoint equals the run's own export, also once the training folder
    and the tokenizer folder are gone (the class names are in the checkpoint, the tokenizer in the run); an
    earlier step gives that checkpoint's weights; `--tokenizer` takes a decoder fine-tune and refuses a tokenizer
    that encodes differently; a tokenizer run or a missing step is refused by name."""
    from safetensors.torch import load_file

    from vartk.pipelines import VARPipeline
    out, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(images, data)
    train_main("var", ["--data", str(data), "--out", str(out), "--batch-size", "4", "--max-steps", "3",
                       "--save-every", "1", "--keep-checkpoints", "3", *FAST, *job_args("var", images, tmp_path)])
    shutil.rmtree(data)
    shutil.rmtree(tmp_path / "msvq")
    final = VARPipeline.from_pretrained(out / "pipeline")
    last = VARPipeline.from_pretrained(train_main("export", ["--run", str(out)]))
    assert last.class_names == final.class_names == ["class_0", "class_1"]
    for a, b in ((last.transformer, final.transformer), (last.tokenizer, final.tokenizer)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    first = VARPipeline.from_pretrained(train_main("export", ["--run", str(out), "--step", "1"]))
    saved = load_file(out / "checkpoints" / "step_0000001" / "model" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(first.transformer.state_dict()[k], v) for k, v in saved.items())
    assert not all(torch.equal(first.transformer.state_dict()[k], final.transformer.state_dict()[k]) for k in saved)
    with pytest.raises(SystemExit, match="no checkpoint step 7 .* saved: \\['step_0000001'"):
        train_main("export", ["--run", str(out), "--step", "7"])
    tuned = MultiScaleVQVAE.from_pretrained(out / "tokenizer")  # a decoder fine-tune replaces the run's tokenizer
    with torch.no_grad():
        tuned.decoder.conv_out.bias.add_(0.5)
    tuned.save_pretrained(tmp_path / "tuned")
    replaced = VARPipeline.from_pretrained(train_main("export", ["--run", str(out), "--tokenizer", str(tmp_path / "tuned")]))
    assert torch.equal(replaced.transformer.head.weight, final.transformer.head.weight)
    assert torch.equal(replaced.tokenizer.decoder.conv_out.bias, final.tokenizer.decoder.conv_out.bias + 0.5)
    with torch.no_grad():
        tuned.quantize.embedding.weight.mul_(2)
    tuned.save_pretrained(tmp_path / "retrained")
    with pytest.raises(SystemExit, match=r"encodes differently .*quantize.embedding.weight"):
        train_main("export", ["--run", str(out), "--tokenizer", str(tmp_path / "retrained")])
    shutil.rmtree(out / "tokenizer")  # a run from before the copy, whose tokenizer is gone
    with pytest.raises(SystemExit, match=r"no tokenizer/ folder and its training tokenizer .*msvq is gone; pass"):
        train_main("export", ["--run", str(out)])
    train_main("tokenizer", ["--data", str(images), "--out", str(tmp_path / "tok"), "--batch-size", "4",
                             "--max-steps", "1", "--save-every", "1", *FAST, *TOKENIZER_ARGS])
    with pytest.raises(SystemExit, match="holds a MultiScaleVQVAE"):
        train_main("export", ["--run", str(tmp_path / "tok")])


def test_resume_uses_the_runs_tokenizer_and_refuses_one_that_encodes_differently(images, tmp_path):
    out = tmp_path / "run"
    common = ["--data", str(images), "--out", str(out), "--batch-size", "4", "--save-every", "1", *FAST,
              *job_args("var", images, tmp_path)]
    train_main("var", [*common, "--max-steps", "1"])
    torch.manual_seed(1)  # a tokenizer retrained into the same folder
    MultiScaleVQVAE(**TOKENIZER, patch_nums=(1, 2, 4), share_quant_resi=3).save_pretrained(tmp_path / "msvq")
    with pytest.raises(SystemExit, match=r"--tokenizer .*msvq encodes differently from the one the run was trained"):
        train_main("var", [*common, "--max-steps", "2", "--resume"])
    shutil.rmtree(tmp_path / "msvq")  # gone: the run's copy serves
    train_main("var", [*common, "--max-steps", "2", "--resume"])
    assert latest_checkpoint(out).name == "step_0000002"


def test_write_folder_atomic_replaces_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    from vartk.files import write_folder_atomic

    def write(text):
        def fill(folder):
            folder.mkdir()
            (folder / "a.txt").write_text(text)
            if text == "crash":
                raise RuntimeError("killed mid-write")
        return fill

    target = tmp_path / "model"
    write_folder_atomic(target, write("one"))
    (target / "stale.txt").write_text("from the first write")
    write_folder_atomic(target, write("two"))
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and (target / "a.txt").read_text() == "two"
    with pytest.raises(RuntimeError, match="killed"):
        write_folder_atomic(target, write("crash"))
    assert (target / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.tmp"]


def test_generator_gan_term_reaches_the_decoder(images):
    """From --gan-start on, the decoder's gradient is the reconstruction loss's plus that of
    -gan_weight * mean discriminator logit of the (not detached) reconstructions."""
    job, real, batch = red_logits_gan_job(images)
    decoder = list(job.model.decoder.parameters())
    grads = []
    for step in (0, 1):  # GAN off, on
        loss, _ = job.loss("model", {"model": job.model}, batch, step)
        grads.append(torch.autograd.grad(loss, decoder))
    recon = job.model(real)[0].float()
    gan_grads = torch.autograd.grad(-0.5 * (8 * recon[:, :1] - 2).mean(), decoder)
    assert sum(g.abs().sum() for g in gan_grads) > 0
    for without, with_gan, gan in zip(*grads, gan_grads):
        assert torch.allclose(with_gan - without, gan, rtol=1e-3, atol=1e-7)


def test_flips_and_label_dropout_draw_from_different_streams():
    """With --hflip 0.5 and --label-dropout 0.5, the flip mask and the dropped-label mask of each step (seeded as
    the training loop seeds it) are independent draws: they agree on about half the images, not on all."""
    from vartk.train.conditional import ConditionalJob, ConditionalTrainConfig
    from vartk.train.data import mirror_some
    from vartk.train.loop import step_seed

    class LabelEcho(ConditionalJob):  # its loss is the labels it was given
        def __init__(self):
            self.cfg, self.num_classes, self.model = ConditionalTrainConfig(label_dropout=0.5), 10, None

        def batch_tokens(self, batch):
            return batch.images

        def token_loss(self, model, labels, tokens):
            return labels, {}

        generate = None

    n, agree, total = 64, 0, 0
    for step in range(20):
        seed = step_seed(0, step, 0)
        torch.manual_seed(seed)  # as the loop does before each step
        batch = Batch(None, torch.zeros(n, 3, 2, 2), torch.arange(n) % 10)
        mirrored = mirror_some(batch, 0.5, seed).mirrored  # [n] bool
        dropped = LabelEcho().loss("model", {"model": None}, batch, step)[0] == 10  # [n] bool
        agree += (mirrored == dropped).sum().item()
        total += n
    assert 0.4 < agree / total < 0.6, agree / total  # binomial(1280, 0.5): sd 0.014


def test_step_seed_depends_on_the_rank():
    from vartk.train.loop import step_seed

    for seed, step in ((0, 0), (0, 5), (7, 3)):
        assert step_seed(seed, step, 0) == step_seed(seed, step, 0)
        assert len({step_seed(seed, step, rank) for rank in range(4)}) == 4
    assert step_seed(0, 1, 0) != step_seed(0, 0, 0) and step_seed(1, 0, 0) != step_seed(0, 0, 0)


def test_var_tail_loss_reads_the_last_scale_on_float32_logits():
    from types import SimpleNamespace

    from vartk.train.var import VARJob

    gen = torch.Generator().manual_seed(0)
    logits = (6 * torch.randn(2, 5, 7, generator=gen)).to(torch.bfloat16)  # patch_nums (1, 2): 1 + 4 tokens
    tokens = logits.argmax(-1)  # right everywhere but the 1x1 scale and one tail token:
    tokens[:, 0] = (tokens[:, 0] + 1) % 7  # tail accuracy 7/8, first-4-token accuracy 5/8
    tokens[0, 2] = (tokens[0, 2] + 1) % 7
    job = SimpleNamespace(patch_nums=(1, 2), teacher_forcing_input=lambda t: None)
    loss, metrics = VARJob.token_loss(job, lambda labels, x: logits, torch.zeros(2, dtype=torch.long), tokens)
    exact = -torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]  # [2, 5]
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(exact.mean().item(), rel=1e-5)
    assert metrics["tail_loss"].item() == pytest.approx(exact[:, 1:].mean().item(), rel=1e-5)
    hits = (logits.argmax(-1) == tokens).double()
    assert metrics["tail_acc"].item() == pytest.approx(hits[:, 1:].mean().item()) == 7 / 8
    assert metrics["acc"].item() == pytest.approx(hits.mean().item())


def test_code_hits_restart_from_zero_so_later_restarts_move_codes_unused_since_the_last():
    from types import SimpleNamespace

    from vartk.train.tokenizer import TokenizerJob

    torch.manual_seed(0)
    model = MultiScaleVQVAE(**TOKENIZER, patch_nums=(1, 2, 4), share_quant_resi=3).train()
    vocab = TOKENIZER["vocab_size"]
    batch = SimpleNamespace(images=torch.rand(2, 3, SIZE, SIZE))
    job = SimpleNamespace(cfg=SimpleNamespace(restart_codes_every=2), model=model, code_hits=torch.ones(vocab))
    job.code_hits[0] = 0  # code 0 unused in the first window
    codebook = model.quantize.embedding.weight

    def moved_after(step):
        before = codebook.detach().clone()
        TokenizerJob.after_step(job, step, batch)
        return (codebook.detach() != before).any(1).nonzero().flatten().tolist()

    assert moved_after(0) == [] and job.code_hits.sum() == vocab - 1  # not a restart step
    assert moved_after(1) == [0]
    assert not job.code_hits.any()  # the next window counts afresh
    window = torch.ones(vocab)
    window[5] = 0  # code 5, used in the first window, goes unused in the second
    job.code_hits += window
    assert moved_after(3) == [5]


def test_random_crops_are_crops_of_the_decoded_images_from_their_own_stream():
    """--crop-scale: each image of a step is one size x size window of its decoded (larger) image, at a position
    drawn uniformly from the crops' own generator: the same step seed gives the same crops, and the global RNG
    (label dropout, dropout) is left as it is."""
    from vartk.train.data import crop_some

    decoded = torch.arange(64 * 3 * 6 * 6, dtype=torch.float32).view(64, 3, 6, 6)  # every pixel value unique
    batch = Batch(torch.arange(64), decoded, torch.zeros(64, dtype=torch.long))
    rng_before = torch.get_rng_state()
    crops = crop_some(batch, 4, step_seed=7).images  # [64, 3, 4, 4]
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(crops, crop_some(batch, 4, step_seed=7).images)
    assert not torch.equal(crops, crop_some(batch, 4, step_seed=8).images)
    positions = []
    for image, crop in zip(decoded, crops):
        top, left = divmod(int(crop[0, 0, 0].item()) % 36, 6)  # where the window's first pixel sits
        assert torch.equal(crop, image[:, top : top + 4, left : left + 4])
        positions.append((top, left))
    assert set(positions) == {(t, l) for t in range(3) for l in range(3)}  # 64 draws reach all 9 positions


def test_crop_scale_decodes_larger_images_and_encodes_the_crops_each_step(images, tmp_path):
    """--crop-scale 1.5 at --image-size 8: the images are decoded at 12 px; the tokenizer previews their centre
    crops at 8 px; a transformer keeps no token table (each step encodes its crops; a table of the 12 px images would
    not even encode) and trains to the end."""
    from vartk.train.data import center_crop

    job = tokenizer_job(images, "--crop-scale", "1.5")
    centres = center_crop(ImageFolder(images, 12, cache=True).images, 8).float() / 255  # [8, 3, 8, 8]
    assert job.preview.shape[1:] == (3, 8, 8)
    assert all(any(torch.equal(shown, centre) for centre in centres) for shown in job.preview)
    out = tmp_path / "var"
    train_main("var", ["--data", str(images), "--out", str(out), "--batch-size", "4", "--max-steps", "2",
                       "--crop-scale", "1.5", *FAST, *job_args("var", images, tmp_path)])
    assert (out / "pipeline" / "model_index.json").is_file() and read_log(out)[-1]["step"] == 1


def test_llamagen_quantizer_trains_llamagens_vq_with_its_loss(images, tmp_path):
    """--quantizer llamagen: a VQModel with L2-normalised --codebook-dim codes; its loss is LlamaGen's
    mse(codes, z) + beta * mse(codes, z) (values; the two differ in what they send gradients to) plus the pixel
    loss; its export is a GPT's tokenizer."""
    import torch.nn.functional as F

    from vartk.pipelines import GPTPipeline
    from vartk.tokenizers.vq import VQModel

    job = tokenizer_job(images, "--quantizer", "llamagen", "--codebook-dim", "4")
    model, pixels = job.model.eval(), job.preview  # [8, 3, 8, 8]
    assert isinstance(model, VQModel) and model.quantize.embedding.weight.shape == (16, 4)
    with torch.no_grad():
        metrics = job.validation_metrics(Batch(None, pixels, torch.zeros(len(pixels), dtype=torch.long)))
        z = F.normalize(model.quant_conv(model.encoder(pixels * 2 - 1)), dim=1)  # [8, 4, 4, 4]
        codebook = F.normalize(model.quantize.embedding.weight, dim=1)  # [16, 4]
        flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
        codes = codebook[torch.cdist(flat, codebook).argmin(1)].view(8, 4, 4, 4).permute(0, 3, 1, 2)
        recon = model.decoder(model.post_quant_conv(codes))
        expected = 1.25 * F.mse_loss(codes, z) + F.mse_loss(recon, pixels * 2 - 1)
    assert metrics["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    tokenizer_run, gpt_run = tmp_path / "vq", tmp_path / "gpt"
    train_main("tokenizer", ["--data", str(images), "--out", str(tokenizer_run), "--batch-size", "4",
                             "--max-steps", "2", "--quantizer", "llamagen", "--codebook-dim", "4", *FAST,
                             *TOKENIZER_ARGS])
    train_main("gpt", ["--data", str(images), "--out", str(gpt_run), "--batch-size", "4", "--max-steps", "2",
                       "--tokenizer", str(tokenizer_run / "tokenizer"), "--dim", "32", "--n-layer", "2", "--n-head",
                       "2", *FAST])
    assert isinstance(GPTPipeline.from_pretrained(gpt_run / "pipeline").tokenizer, VQModel)


def test_the_readme_vq16_command_builds_llamagens_vq_ds16_layout(tmp_path):
    """`vartk train tokenizer --quantizer llamagen` with the README's flags makes exactly the keys and shapes of
    LlamaGen's vq_ds16_c2i.pt (the committed fixture of the official layout)."""
    from fixture_utils import load_fixture

    from vartk.train.tokenizer import TokenizerTrainConfig, build_tokenizer

    flags = ("--image-size 256 --ch 128 --ch-mult 1,1,2,2,4 --num-res-blocks 2 --z-channels 256 --vocab-size 16384 "
             "--quantizer llamagen --codebook-dim 8").split()
    cfg = parse_config(TokenizerTrainConfig, ["--data", str(tmp_path / "images"), "--out", str(tmp_path / "run"),
                                              *flags], "test")
    with torch.device("meta"):
        model = build_tokenizer(cfg)
    official = {name: shape for name, (shape, _) in load_fixture("vq_ds16_c2i.json").items()}
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == official
