"""Against codebook collapse: the entropy loss and the Lloyd update written out, code restarts on factorized and
LlamaGen codes, and the tokenizer job's --codebook-l2-norm, --kmeans-iters, --entropy-weight (checks, step-0
seeding, the loss, resume, torchrun); with all of them off a run builds VAR's layout and logs no entropy."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from _train_helpers import (  # noqa: F401  (images, one_thread: fixtures)
    FAST, SIZE, TOKENIZER, TOKENIZER_ARGS, images, kill_after, one_thread, read_log,
)
from vartk.checkpoints import load_saved_model
from vartk.tokenizers import MultiScaleVQVAE, VQModel
from vartk.tokenizers.codebook import entropy_loss, kmeans_codebook, move_codes_to_means
from vartk.train import train_main
from vartk.train.data import Batch, ImageFolder
from vartk.train.loop import parse_config
from vartk.train.resume import latest_checkpoint
from vartk.train.tokenizer import TokenizerJob, TokenizerTrainConfig, build_tokenizer, restart_unused_codes

ALL_OPTIONS = ["--codebook-l2-norm", "--codebook-dim", "3", "--kmeans-iters", "2", "--kmeans-images", "4",
               "--restart-codes-every", "3", "--entropy-weight", "0.1", "--entropy-temperature", "0.1"]


def config(*flags: str) -> TokenizerTrainConfig:
    return parse_config(TokenizerTrainConfig, ["--data", "x", *FAST, *TOKENIZER_ARGS, *flags], "test")


def job_with(images, *flags: str) -> TokenizerJob:
    """The job a run on `images` with these flags starts from (same seed, same initial weights), on CPU."""
    cfg = parse_config(TokenizerTrainConfig, ["--data", str(images), *FAST, *TOKENIZER_ARGS, *flags], "test")
    torch.manual_seed(cfg.seed)
    return TokenizerJob(cfg, ImageFolder(images, SIZE, cache=True), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- the formulas
def test_entropy_loss_is_mean_sample_entropy_minus_the_entropy_of_the_mean_distribution():
    distances = torch.rand(5, 4, generator=torch.Generator().manual_seed(0)) * 3  # [N, V]
    temperature = 0.7
    rows = []
    for row in distances.tolist():
        weights = [math.exp(-d / temperature) for d in row]
        rows.append([w / sum(weights) for w in weights])
    sample_entropy = sum(-sum(p * math.log(p) for p in row) for row in rows) / len(rows)
    mean = [sum(row[v] for row in rows) / len(rows) for v in range(4)]
    batch_entropy = -sum(p * math.log(p + 1e-5) for p in mean)
    assert entropy_loss(distances, temperature).item() == pytest.approx(sample_entropy - batch_entropy, abs=1e-6)
    spread = torch.tensor([[0.0, 9, 9, 9], [9, 0, 9, 9], [9, 9, 0, 9], [9, 9, 9, 0]])  # each row its own code
    collapsed = torch.tensor([[0.0, 9, 9, 9]] * 4)  # every row the same code
    assert entropy_loss(spread, 1.0) < entropy_loss(collapsed, 1.0) - 1  # even use scores lower (by about ln 4)


def test_move_codes_to_means_moves_picked_codes_only():
    codebook = torch.arange(8.0).view(4, 2)  # [V, D]
    vectors = torch.tensor([[1.0, 1.0], [3.0, 5.0], [10.0, 0.0], [2.0, 2.0]])
    tokens = torch.tensor([0, 0, 2, 0])
    move_codes_to_means(codebook, vectors, tokens)
    assert torch.equal(codebook, torch.tensor([[2.0, 8 / 3], [2.0, 3.0], [10.0, 0.0], [6.0, 7.0]]))


# ---------------------------------------------------------------------------------------------- code restarts
def restart_and_check(model, images: torch.Tensor, expected_vectors: torch.Tensor) -> None:
    """Codes 1, 4, 5 unused: exactly they move, each onto one of `expected_vectors` [N, D] (the vectors the
    quantiser looks up for `images`, computed by the caller); the others stay."""
    codebook = model.quantize.embedding.weight
    before = codebook.detach().clone()
    hits = torch.ones(len(codebook))
    hits[[1, 4, 5]] = 0
    torch.manual_seed(0)
    assert restart_unused_codes(model, hits, images) == 3
    after = codebook.detach()
    moved = (after != before).any(1).nonzero().flatten().tolist()
    assert moved == [1, 4, 5]
    assert all(torch.isclose(expected_vectors, after[code], atol=1e-6).all(1).any() for code in moved)


def test_restarts_move_unused_factorized_codes_onto_projected_unit_residuals():
    torch.manual_seed(0)
    model = MultiScaleVQVAE(**TOKENIZER, patch_nums=(1, 2, 4), share_quant_resi=3, codebook_dim=3).train()
    images = torch.rand(2, 3, SIZE, SIZE)
    quantize = model.quantize
    with torch.no_grad():  # the residual each scale looks up, from the tokens the quantiser picked
        f = model.encode_latent(images)
        f_hat, vectors = torch.zeros_like(f), []
        for scale_index, (pn, tokens) in enumerate(zip(model.patch_nums, model.encode(images))):
            rest = F.adaptive_avg_pool2d(f - f_hat, pn).permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # [B*pn*pn, C]
            vectors.append(F.normalize(rest @ quantize.in_proj.weight.T + quantize.in_proj.bias, dim=1))
            f_hat = model.fold_scale(f_hat, scale_index, model.embed_tokens(tokens))
    vectors = torch.cat(vectors)  # [2 * 21, 3]
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)))
    restart_and_check(model, images, vectors)


def test_restarts_move_unused_llamagen_codes_onto_normalised_latents():
    torch.manual_seed(0)
    model = VQModel(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, codebook_size=16, codebook_embed_dim=3,
                    norm_groups=4, usage_queue_size=64).train()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(images * 2 - 1))  # [2, 3, 4, 4]
    restart_and_check(model, images, F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 3), dim=1))


# ---------------------------------------------------------------------------------------------- the job's flags
@pytest.mark.parametrize("flags, message", [
    (["--quantizer", "llamagen", "--codebook-l2-norm"], "--codebook-l2-norm factorizes the multiscale quantiser"),
    (["--entropy-temperature", "0"], "--entropy-temperature must be > 0, got 0.0"),
    (["--entropy-weight", "-1"], "--entropy-weight must be >= 0, got -1.0"),
    (["--kmeans-iters", "-1"], "--kmeans-iters must be >= 0, got -1"),
    (["--kmeans-iters", "2", "--kmeans-images", "0"], "--kmeans-images must be >= 1, got 0"),
    (["--kmeans-iters", "2", "--kmeans-images", "1", "--vocab-size", "32"],
     r"--kmeans-images 1 give 21 vectors \(21 per image\) for --vocab-size 32 codes; .* give --kmeans-images 2 or"),
    (["--train-decoder-only", "--init-from", "", "--kmeans-iters", "2", "--entropy-weight", "0.5"],
     "--train-decoder-only keeps the codebook fixed; it cannot be combined with --kmeans-iters 2, --entropy-weight "
     "0.5"),
])
def test_codebook_flags_are_checked(flags, message):
    with pytest.raises(SystemExit, match=message):
        config(*flags)


def test_with_every_option_off_the_job_builds_vars_layout_and_logs_no_entropy(images, tmp_path):
    with torch.device("meta"):
        built = build_tokenizer(config())
        official = MultiScaleVQVAE(**TOKENIZER, patch_nums=(1, 2, 4))
    assert built.config.codebook_dim == 0
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}
    train_main("tokenizer", ["--data", str(images), "--out", str(tmp_path / "run"), "--batch-size", "4",
                             "--max-steps", "1", "--save-every", "1", *FAST, *TOKENIZER_ARGS])
    assert "entropy" not in read_log(tmp_path / "run")[0]


def test_codebook_l2_norm_trains_a_factorized_tokenizer_whose_folder_reloads_strictly(images, tmp_path):
    out = tmp_path / "run"
    train_main("tokenizer", ["--data", str(images), "--out", str(out), "--batch-size", "4", "--max-steps", "2",
                             "--save-every", "2", *FAST, *TOKENIZER_ARGS, "--codebook-l2-norm", "--codebook-dim", "3"])
    model = load_saved_model(out / "tokenizer", (MultiScaleVQVAE,))
    assert model.config.codebook_dim == 3 and model.quantize.embedding.weight.shape == (TOKENIZER["vocab_size"], 3)
    assert {"quantize.in_proj.weight", "quantize.out_proj.weight"} <= set(model.state_dict())


@pytest.mark.parametrize("quantizer", [["--codebook-l2-norm", "--codebook-dim", "3"], ["--quantizer", "llamagen"]])
def test_kmeans_seeds_the_codebook_at_step_0_on_distinct_training_images(quantizer, images, tmp_path):
    """With --lr 0 the exported codebook is the seeding's: k-means from the initial weights on the job's
    --kmeans-images images (distinct training images, centre crops)."""
    flags = [*quantizer, "--kmeans-iters", "3", "--kmeans-images", "5"]
    job = job_with(images, *flags)
    dataset = ImageFolder(images, SIZE, cache=True)
    assert job.kmeans_images.shape == (5, 3, SIZE, SIZE) and job.kmeans_images.dtype == torch.uint8
    positions = [[torch.equal(image, other) for other in dataset.images].index(True) for image in job.kmeans_images]
    assert len(set(positions)) == 5
    with torch.no_grad():
        latents = job.model.encode_latent(job.kmeans_images.float() / 255)
        kmeans_codebook(job.model, latents, 3, torch.Generator().manual_seed(0), chunk_size=4)  # --batch-size 4
    expected = job.model.quantize.embedding.weight.detach()
    out = tmp_path / "run"
    train_main("tokenizer", ["--data", str(images), "--out", str(out), "--batch-size", "4", "--max-steps", "1",
                             "--save-every", "1", "--lr", "0", *FAST, *TOKENIZER_ARGS, *flags])
    trained = load_saved_model(out / "tokenizer", (type(job.model),)).quantize.embedding.weight
    assert torch.allclose(trained, expected, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(job_with(images, *quantizer).model.quantize.embedding.weight, expected, atol=1e-3)


@pytest.mark.parametrize("quantizer", [[], ["--quantizer", "llamagen"]])
def test_entropy_weight_adds_the_weighted_entropy_loss(quantizer, images):
    weight, temperature = 0.3, 0.2
    plain = job_with(images, *quantizer)
    job = job_with(images, *quantizer, "--entropy-weight", str(weight), "--entropy-temperature", str(temperature))
    pixels = job.preview  # [8, 3, 8, 8]
    batch = Batch(None, pixels, torch.zeros(len(pixels), dtype=torch.long))
    with torch.no_grad():
        metrics, without = job.validation_metrics(batch), plain.validation_metrics(batch)
        entropy = job.model.eval()(pixels, entropy_temperature=temperature)[2]["entropy"]
    assert "entropy" not in without and metrics["entropy"].item() == pytest.approx(entropy.item(), rel=1e-6)
    assert metrics["loss"].item() == pytest.approx(without["loss"].item() + weight * entropy.item(), rel=1e-5)


def test_resume_with_every_option_gives_the_uninterrupted_losses(images, tmp_path):
    """k-means only seeds a fresh run's step 0; a run killed after step 3 resumes onto the same losses."""
    common = ["--batch-size", "4", "--max-steps", "6", "--log-every", "1", "--save-every", "3",
              "--keep-checkpoints", "5", *FAST, *TOKENIZER_ARGS, *ALL_OPTIONS]
    full, killed = tmp_path / "full", tmp_path / "killed"
    train_main("tokenizer", ["--data", str(images), "--out", str(full), *common])
    kill_after(full, 3, killed)
    train_main("tokenizer", ["--data", str(images), "--out", str(killed), "--resume", *common])
    uninterrupted, resumed = read_log(full), read_log(killed)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 5]
    for a, b in zip(uninterrupted[3:], resumed[3:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["entropy"] - b["entropy"]) <= 1e-6, (a, b)


def test_torchrun_two_processes_with_every_option(images, tmp_path):
    """Both processes seed and restart the same codebook (process 0's), so their weights stay equal."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vartk.cli",
               "train", "tokenizer", "--data", str(images), "--out", str(out), "--batch-size", "2", "--max-steps", "3",
               "--log-every", "1", "--save-every", "3", "--device", "cpu", *FAST, *TOKENIZER_ARGS, *ALL_OPTIONS]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_log(out) if "loss" in r] == [0, 1, 2]
    assert latest_checkpoint(out).name == "step_0000003"
    assert load_saved_model(out / "tokenizer", (MultiScaleVQVAE,)).config.codebook_dim == 3
