"""VQModel (LlamaGen VQ-16 / VQ-8): official key layout, strict loading, L2-normalised lookup, round trips."""
import pytest
import torch
import torch.nn.functional as F
from fixture_utils import load_fixture, state_dict_from_fixture

from vartk.checkpoints import CheckpointError
from vartk.tokenizers import VQModel
from vartk.tokenizers.vq import VQ_8

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, codebook_size=64, codebook_embed_dim=4)
TINY.update(norm_groups=8, usage_queue_size=256)


def tiny_vq(seed=0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(**TINY).eval()


def tiny_images(batch: int = 2, size: int = 8) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))  # [B, 3, H, W]


@pytest.mark.parametrize(
    "fixture, preset, ch_mult, num_keys",
    [("vq_ds16_c2i.json", {}, (1, 1, 2, 2, 4), 344), ("vq_ds8_c2i.json", VQ_8, (1, 2, 2, 4), 300)],
)
def test_official_layout_and_strict_load(fixture, preset, ch_mult, num_keys):
    official = {name: shape for name, (shape, _) in load_fixture(fixture).items()}
    assert len(official) == num_keys
    with torch.device("meta"):
        preset_model = VQModel(**preset)
    assert {name: tuple(t.shape) for name, t in preset_model.state_dict().items()} == official
    state_dict = state_dict_from_fixture(fixture)
    model = VQModel.from_official({"model": state_dict})
    assert tuple(model.config.ch_mult) == ch_mult and model.vocab_size == 16384 and model.latent_channels == 8
    assert model.downsample_factor == 2 ** (len(ch_mult) - 1)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state_dict.items())


def test_from_official_file_with_model_container(tmp_path):
    model = tiny_vq()
    path = tmp_path / "vq_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    loaded = VQModel.from_official(path, norm_groups=8, usage_queue_size=256)
    images = tiny_images()
    assert torch.equal(model.encode(images), loaded.encode(images))


def test_renamed_key_is_named_in_the_error():
    state_dict = tiny_vq().state_dict()
    key = "decoder.conv_blocks.1.res.0.norm1.weight"
    state_dict[key + "_x"] = state_dict.pop(key)
    with pytest.raises(CheckpointError, match=r"decoder\.conv_blocks\.1\.res\.0\.norm1\.weight"):
        VQModel.from_official(state_dict, norm_groups=8, usage_queue_size=256)


def test_the_other_familys_tokenizer_file_is_named_as_such():
    from vartk.tokenizers.msvq import MultiScaleVQVAE

    vae = MultiScaleVQVAE(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32, patch_nums=(1, 2, 4),
                          norm_groups=8).state_dict()  # VAR's layout
    with pytest.raises(CheckpointError, match=r"not a LlamaGen VQ file: it has no \['encoder.conv_blocks.0.res"):
        VQModel.from_official(vae)
    with pytest.raises(CheckpointError, match=r"not a VAR VAE file: it has no \['encoder.down.0.block"):
        MultiScaleVQVAE.from_official(tiny_vq().state_dict())


def test_wrong_shape_names_key_and_both_shapes():
    state_dict = tiny_vq().state_dict()
    state_dict["post_quant_conv.bias"] = torch.zeros(17)
    with pytest.raises(CheckpointError) as err:
        VQModel.from_official(state_dict, norm_groups=8, usage_queue_size=256)
    assert "post_quant_conv.bias" in str(err.value) and "(17,)" in str(err.value) and "(16,)" in str(err.value)


def test_encode_picks_nearest_normalised_code():
    model = tiny_vq()
    images = tiny_images()
    with torch.no_grad():
        tokens = model.encode(images)
        z = model.encode_latent(images)  # [B, D, h, w]
    z_flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    codes = F.normalize(model.quantize.embedding.weight, dim=-1)
    assert tokens.shape == (2, 4, 4) and tokens.dtype == torch.long
    assert torch.equal(tokens.flatten(), torch.cdist(z_flat, codes).argmin(1))


def test_decode_uses_l2_normalised_codes():
    model = tiny_vq()
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(5.0)  # rows far from unit norm: the lookup must normalise them
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))  # [B, h*w]
        rows = model.quantize.embedding.weight / model.quantize.embedding.weight.norm(dim=1, keepdim=True)
        codes = rows[tokens].reshape(2, 4, 4, 4).permute(0, 3, 1, 2)  # [B, D, h, w]
        expected = (model.decoder(model.post_quant_conv(codes)).clamp(-1, 1) + 1) / 2
        decoded = model.decode(tokens)
    assert decoded.shape == (2, 3, 8, 8)
    assert torch.allclose(decoded, expected, atol=1e-6)
    assert torch.equal(decoded, model.decode(tokens.view(2, 4, 4)))
    with pytest.raises(ValueError, match="square"):
        model.decode(tokens[:, :15])


def test_training_forward_losses_and_straight_through():
    model = tiny_vq().train()
    images = tiny_images()
    recon, vq_loss, stats = model(images)
    z = F.normalize(model.encode_latent(images), dim=1).detach()
    codes = model.embed_tokens(model.encode(images)).detach()
    assert torch.allclose(vq_loss, 1.25 * F.mse_loss(codes, z), rtol=1e-5)
    recon.mean().backward(retain_graph=True)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    vq_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert 0 < stats["codebook_usage"] <= 1
    assert torch.allclose(recon.clamp(0, 1), model.decode(model.encode(images)), atol=1e-5)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny_vq()
    model.save_pretrained(tmp_path)
    loaded = VQModel.from_pretrained(tmp_path)
    images = tiny_images()
    tokens = model.encode(images)
    assert torch.equal(tokens, loaded.encode(images))
    assert torch.equal(model.decode(tokens), loaded.decode(tokens))


def test_decode_takes_a_one_map_list_as_a_single_scale_multiscale_tokenizer_gives():
    model = tiny_vq()
    tokens = model.encode(tiny_images())
    assert torch.equal(model.decode([tokens]), model.decode(tokens))
    with pytest.raises(ValueError, match="a VQModel has one scale; got a list of 2 token maps"):
        model.decode([tokens, tokens])


def test_vq_loss_gradients_commitment_to_encoder_and_codebook_term_to_codes():
    """LlamaGen's rule: vq_loss = MSE(codes, z.detach()) + beta * MSE(codes.detach(), z), beta = 0.25, so the
    encoder latent gets beta * d MSE(codes.detach(), z) / dz and the codebook gets d MSE(codes, z.detach())."""
    model = tiny_vq().train()
    images = tiny_images()
    with torch.no_grad():
        latent0 = model.encode_latent(images).float()  # [B, D, h, w]
    latent = latent0.clone().requires_grad_(True)
    model.encode_latent = lambda _images: latent
    _, vq_loss, _ = model(images)
    weight = model.quantize.embedding.weight  # [V, D]
    grad_latent, grad_weight = torch.autograd.grad(vq_loss, [latent, weight])

    beta = model.config.beta
    assert beta == 0.25
    latent_ref = latent0.clone().requires_grad_(True)
    z = F.normalize(latent_ref, dim=1)  # [B, D, h, w]
    codebook = F.normalize(weight, dim=1)  # [V, D]
    z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    tokens = torch.cdist(z_flat, codebook.detach()).argmin(1)  # [B*h*w]
    codes = codebook[tokens].view(z.shape[0], *z.shape[2:], -1).permute(0, 3, 1, 2)  # [B, D, h, w]
    (expected_grad_latent,) = torch.autograd.grad(beta * F.mse_loss(codes.detach(), z), [latent_ref])
    (expected_grad_weight,) = torch.autograd.grad(F.mse_loss(codes, z.detach()), [weight])
    assert expected_grad_latent.abs().sum() > 0 and expected_grad_weight.abs().sum() > 0
    assert torch.allclose(grad_latent, expected_grad_latent, rtol=1e-4, atol=1e-9)
    assert torch.allclose(grad_weight, expected_grad_weight, rtol=1e-4, atol=1e-9)


def test_usage_queue_is_a_fifo_of_the_most_recent_training_tokens():
    model = tiny_vq()
    queue = model.quantize.codebook_used
    start = torch.arange(256.0) % 50  # codes 0..49
    queue.copy_(start)
    usage = model.quantize.record_usage(torch.tensor([[[60, 61], [62, 60]]]))
    assert torch.equal(queue, torch.cat([start[4:], torch.tensor([60.0, 61, 62, 60])]))  # oldest 4 dropped
    assert usage == 53 / 64
    many = torch.arange(300).view(1, 15, 20) % 64
    assert model.quantize.record_usage(many) == 1.0
    assert torch.equal(queue, many.flatten()[-256:].float())  # more than fit: the last 256, in order
    images = tiny_images()
    queue.zero_()
    _, _, stats = model.eval()(images)
    assert stats["codebook_usage"] is None and not queue.any()  # evaluation leaves the queue alone
    tokens = model.encode(images).flatten().float()  # [32]
    _, _, stats = model.train()(images)
    assert torch.equal(queue[-32:], tokens) and not queue[:-32].any()
    assert stats["codebook_usage"] == (tokens.unique().numel() + (0 not in tokens)) / 64


# ------------------------------------------------------------------ lookups, entropy loss, k-means
def normalised_latent_vectors(model: VQModel, images: torch.Tensor) -> torch.Tensor:
    """Every position's L2-normalised latent, raster order image by image: [B*h*w, D]."""
    z = model.quant_conv(model.encoder(images * 2 - 1))  # [B, D, h, w]
    return F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1)


def test_quantizer_lookups_are_the_normalised_latents_and_their_nearest_codes():
    model = tiny_vq()
    images = tiny_images(batch=3)
    with torch.no_grad():
        vectors, tokens = model.quantizer_lookups(model.encode_latent(images))
        expected = normalised_latent_vectors(model, images)
    assert torch.allclose(vectors, expected, atol=1e-6)
    assert torch.equal(tokens, torch.cdist(expected, F.normalize(model.quantize.embedding.weight, dim=1)).argmin(1))
    assert torch.equal(tokens, model.encode(images).flatten())


def test_entropy_stat_is_llamagens_entropy_loss():
    """LlamaGen's compute_entropy_loss(-d) at temperature T: p = softmax(-d / T) per position,
    mean H(p) - H(mean p) (with log(mean p + 1e-5)); it reaches the codebook and the encoder."""
    model = tiny_vq().train()
    images = tiny_images(batch=3)
    _, _, stats = model(images, entropy_temperature=0.1)
    stats["entropy"].backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0 and model.encoder.conv_in.weight.grad.abs().sum() > 0
    with torch.no_grad():
        d = torch.cdist(normalised_latent_vectors(model, images), F.normalize(model.quantize.embedding.weight, dim=1))
        p = torch.exp(-d**2 / 0.1)
        p = p / p.sum(1, keepdim=True)  # [N, V]
        mean_p = p.mean(0)
        expected = -(p * p.log()).sum(1).mean() + (mean_p * (mean_p + 1e-5).log()).sum()
    assert stats["entropy"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert "entropy" not in model(images)[2]


def test_kmeans_codebook_matches_a_plain_lloyd_loop_on_the_normalised_latents():
    from vartk.tokenizers.codebook import kmeans_codebook

    model = tiny_vq()
    images = tiny_images(batch=8)  # 128 vectors for 64 codes
    with torch.no_grad():
        latents = model.encode_latent(images)
        vectors = normalised_latent_vectors(model, images)  # [128, D]
        kmeans_codebook(model, latents, 0, torch.Generator().manual_seed(5), chunk_size=3)
        codes = model.quantize.embedding.weight.clone()  # the start: 64 of the vectors, each once
        rows = [int(torch.isclose(vectors, code, atol=1e-6).all(1).nonzero()[0]) for code in codes]
        assert len(set(rows)) == 64
        start = codes.clone()
        for _ in range(3):  # Lloyd on unit vectors, the lookup normalising the codes
            unit = codes / codes.norm(dim=1, keepdim=True)
            picks = [min(range(64), key=lambda c: (vector - unit[c]).square().sum().item()) for vector in vectors]
            for c in set(picks):
                codes[c] = torch.stack([v for v, pick in zip(vectors, picks) if pick == c]).mean(0)
        kmeans_codebook(model, latents, 3, torch.Generator().manual_seed(5), chunk_size=3)
    assert not torch.allclose(codes, start, atol=1e-3)
    assert torch.allclose(model.quantize.embedding.weight, codes, atol=1e-5)
