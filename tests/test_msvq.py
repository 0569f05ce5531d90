"""MultiScaleVQVAE: official key layout, strict loading, residual quantisation and the running-latent helpers."""
import pytest
import torch
import torch.nn.functional as F
from fixture_utils import load_fixture, state_dict_from_fixture

from vartk.checkpoints import CheckpointError
from vartk.tokenizers import MultiScaleVQVAE
from vartk.tokenizers.msvq import phi_indices

VAE_FIXTURE = "vae_ch160v4096z32.json"
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=64, norm_groups=8)
PATCH_NUMS = (1, 2, 3, 4)  # share_quant_resi=2 -> phi index per scale [0, 0, 1, 1]


def tiny_vae(patch_nums=PATCH_NUMS, share_quant_resi=2, seed=0, codebook_dim=0) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    model = MultiScaleVQVAE(**TINY, patch_nums=patch_nums, share_quant_resi=share_quant_resi,
                            codebook_dim=codebook_dim).eval()
    with torch.no_grad():  # codes on the scale of the latents so several codes get used
        model.quantize.embedding.weight.normal_(0, 0.3)
    return model


def tiny_images(model: MultiScaleVQVAE, batch: int = 2) -> torch.Tensor:
    size = model.latent_size * model.downsample_factor
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))  # [B, 3, H, W]


def reference_residual_quantize(model, f, phi_of_scale):
    """The official algorithm written out with plain torch ops, with the factorized lookup when the model has a
    codebook_dim: (token maps, f_hat after the last scale, the vectors each scale compared with the codes)."""
    quantize = model.quantize
    codebook = quantize.embedding.weight  # [V, C] (VAR) or [V, D] (factorized)
    keys, values, project = codebook, codebook, lambda v: v
    if model.config.codebook_dim:  # compare unit vectors in D dims, add the projected unit code
        keys = codebook / codebook.norm(dim=1, keepdim=True)  # [V, D]
        values = keys @ quantize.out_proj.weight.T + quantize.out_proj.bias  # [V, C]
        project = lambda v: F.normalize(v @ quantize.in_proj.weight.T + quantize.in_proj.bias, dim=1)  # noqa: E731
    ratio = model.config.quant_resi
    size = f.shape[-1]
    f_rest, f_hat, tokens, lookups = f.clone(), torch.zeros_like(f), [], []
    for si, pn in enumerate(model.patch_nums):
        last = si == len(model.patch_nums) - 1
        z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
        lookup = project(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))  # [B*pn*pn, C or D]
        idx = torch.cdist(lookup, keys).argmin(1).view(-1, pn, pn)
        h = values[idx].permute(0, 3, 1, 2)  # [B, C, pn, pn]
        if not last:
            h = F.interpolate(h, size=(size, size), mode="bicubic", align_corners=False)
        conv = quantize.quant_resi.qresi_ls[phi_of_scale[si]]
        h = (1 - ratio) * h + ratio * F.conv2d(h, conv.weight, conv.bias, padding=1)
        f_hat, f_rest = f_hat + h, f_rest - h
        tokens.append(idx)
        lookups.append(lookup)
    return tokens, f_hat, lookups


# ------------------------------------------------------------------ official layout and strict loading
@pytest.fixture(scope="module")
def official_state_dict():
    return state_dict_from_fixture(VAE_FIXTURE)


def test_default_config_has_official_keys_and_shapes():
    with torch.device("meta"):
        model = MultiScaleVQVAE()
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    official = {name: shape for name, (shape, _) in load_fixture(VAE_FIXTURE).items()}
    assert len(official) == 324
    assert ours == official


def test_from_official_loads_every_tensor(official_state_dict):
    model = MultiScaleVQVAE.from_official(official_state_dict)
    assert model.config.ch == 160 and tuple(model.config.ch_mult) == (1, 1, 2, 2, 4)
    assert model.vocab_size == 4096 and model.latent_channels == 32 and model.config.share_quant_resi == 4
    assert model.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and model.downsample_factor == 16
    loaded = model.state_dict()
    for name, tensor in official_state_dict.items():
        assert torch.equal(loaded[name], tensor), name


def test_usage_buffer_with_other_first_dim_is_tolerated():
    model = tiny_vae()
    state_dict = model.state_dict()
    state_dict["quantize.ema_vocab_hit_SV"] = torch.ones(7, TINY["vocab_size"])
    loaded = MultiScaleVQVAE.from_official(state_dict, patch_nums=PATCH_NUMS, norm_groups=8)
    assert loaded.quantize.ema_vocab_hit_SV.shape == (len(PATCH_NUMS), TINY["vocab_size"])


def test_renamed_key_is_named_in_the_error():
    state_dict = tiny_vae().state_dict()
    state_dict["decoder.up.0.block.0.conv1.bias_renamed"] = state_dict.pop("decoder.up.0.block.0.conv1.bias")
    with pytest.raises(CheckpointError, match=r"decoder\.up\.0\.block\.0\.conv1\.bias"):
        MultiScaleVQVAE.from_official(state_dict, patch_nums=PATCH_NUMS, norm_groups=8)


def test_wrong_shape_names_key_and_both_shapes():
    state_dict = tiny_vae().state_dict()
    state_dict["quantize.quant_resi.qresi_ls.1.bias"] = torch.zeros(9)
    with pytest.raises(CheckpointError) as err:
        MultiScaleVQVAE.from_official(state_dict, patch_nums=PATCH_NUMS, norm_groups=8)
    assert "quantize.quant_resi.qresi_ls.1.bias" in str(err.value)
    assert "(9,)" in str(err.value) and "(8,)" in str(err.value)


# ------------------------------------------------------------------ quantisation
def test_phi_index_ticks_rule():
    assert phi_indices(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_indices(4, 2) == [0, 0, 1, 1]
    assert phi_indices(1, 4) == [0]


def test_nearest_code_matches_brute_force():
    model = tiny_vae()
    z = torch.randn(3, TINY["z_channels"], 5, 5) * 0.3  # [B, C, h, w]
    ours = model.quantize.nearest_code(z)
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, TINY["z_channels"])
    brute = torch.cdist(z_flat, model.quantize.embedding.weight).argmin(1).view(3, 5, 5)
    assert torch.equal(ours, brute)


def test_encode_matches_reference_algorithm():
    model = tiny_vae()
    images = tiny_images(model)
    with torch.no_grad():
        tokens = model.encode(images)
        ref_tokens, ref_f_hat, _ = reference_residual_quantize(model, model.encode_latent(images), [0, 0, 1, 1])
        f_hat = model.tokens_to_latent(tokens)
    assert [tuple(t.shape) for t in tokens] == [(2, pn, pn) for pn in PATCH_NUMS]
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert len(torch.cat([t.flatten() for t in tokens]).unique()) > 3
    assert (f_hat - ref_f_hat).abs().max() <= 1e-5


def test_tokens_to_latent_equals_running_latent_of_encoding():
    model = tiny_vae()
    with torch.no_grad():
        f = model.encode_latent(tiny_images(model))
        steps = list(model.iter_residual_quantize(f))
        tokens = [scale_tokens for scale_tokens, _ in steps]
        f_hat = model.new_running_latent(f.shape[0])
        for si, scale_tokens in enumerate(tokens):
            f_hat = model.fold_scale(f_hat, si, model.embed_tokens(scale_tokens))
    assert (model.tokens_to_latent(tokens) - steps[-1][1]).abs().max() <= 1e-5
    assert (f_hat - steps[-1][1]).abs().max() <= 1e-5


def test_decode_accepts_flat_and_grid_tokens():
    model = tiny_vae()
    with torch.no_grad():
        tokens = model.encode(tiny_images(model))
        images = model.decode(tokens)
        flat = model.decode([t.flatten(1) for t in tokens])
        direct = model.decode_latent(model.tokens_to_latent(tokens))
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, flat) and torch.equal(images, direct)
    with pytest.raises(ValueError, match="expected 4 token maps"):
        model.decode(tokens[:-1])
    with pytest.raises(ValueError, match="single-scale"):
        model.decode(tokens[-1])


# ------------------------------------------------------------------ transformer inputs
def test_teacher_forcing_input_equals_step_by_step_inputs():
    model = tiny_vae()
    with torch.no_grad():
        tokens = model.encode(tiny_images(model))
        teacher = model.teacher_forcing_input(tokens)
        f_hat = model.new_running_latent(2)
        steps = []
        for si in range(len(PATCH_NUMS) - 1):
            f_hat = model.fold_scale(f_hat, si, model.embed_tokens(tokens[si]))
            steps.append(model.next_scale_input(f_hat, si))
    assert teacher.shape == (2, sum(pn * pn for pn in PATCH_NUMS) - 1, TINY["z_channels"])
    assert torch.equal(teacher, torch.cat(steps, dim=1))
    first_scale = model.fold_scale(model.new_running_latent(2), 0, model.embed_tokens(tokens[0]))  # [B, C, 4, 4]
    first_input = F.interpolate(first_scale, size=2, mode="area").flatten(2).transpose(1, 2)  # [B, 4, C]
    assert torch.allclose(teacher[:, :4], first_input)
    with pytest.raises(ValueError, match="last"):
        model.next_scale_input(f_hat, len(PATCH_NUMS) - 1)


# ------------------------------------------------------------------ single scale, training forward, save/load
def test_single_scale_is_a_plain_vqvae():
    model = tiny_vae(patch_nums=(4,), share_quant_resi=4)
    images = tiny_images(model)
    with torch.no_grad():
        (tokens,) = model.encode(images)
        ref_tokens, ref_f_hat, _ = reference_residual_quantize(model, model.encode_latent(images), [0])
        decoded = model.decode(tokens)
    assert tokens.shape == (2, 4, 4) and torch.equal(tokens, ref_tokens[0])
    assert torch.equal(decoded, model.decode(tokens.flatten(1))) and torch.equal(decoded, model.decode([tokens]))
    assert torch.allclose(decoded, model.decode_latent(ref_f_hat), atol=1e-5)
    assert model.teacher_forcing_input([tokens]).shape == (2, 0, TINY["z_channels"])


def test_training_forward_straight_through_and_loss():
    model = tiny_vae().train()
    images = tiny_images(model)
    recon, vq_loss, stats = model(images)
    recon.mean().backward(retain_graph=True)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert model.quantize.embedding.weight.grad is None  # ... and the decoder path skips the codebook
    vq_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0  # the codebook learns from the vq loss
    assert 0 < stats["codebook_usage"] <= 1
    model.eval()
    with torch.no_grad():
        f = model.encode_latent(images)
        f_hats = [f_hat for _, f_hat in model.iter_residual_quantize(f)]
        expected = sum(0.25 * F.mse_loss(fh, f) + F.mse_loss(fh, f) for fh in f_hats) / len(f_hats)
        assert torch.allclose(vq_loss, expected, rtol=1e-5)
        assert torch.allclose(recon.clamp(0, 1), model.decode(model.encode(images)), atol=1e-5)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny_vae()
    images = tiny_images(model)
    model.save_pretrained(tmp_path)
    loaded = MultiScaleVQVAE.from_pretrained(tmp_path)
    assert loaded.patch_nums == PATCH_NUMS
    with torch.no_grad():
        tokens = model.encode(images)
        assert all(torch.equal(a, b) for a, b in zip(tokens, loaded.encode(images)))
        assert torch.equal(model.decode(tokens), loaded.decode(tokens))


def test_next_scale_input_is_the_area_average_over_overlapping_windows():
    """4x4 -> 3x3 (the ratio is not whole, unlike 4 -> 2, where bilinear gives the same): output cell i averages input
    rows floor(4i/3) .. ceil(4(i+1)/3) - 1, the windows of torch's / the official 'area' resize."""
    model = tiny_vae(patch_nums=(1, 3, 4))
    f_hat = torch.randn(2, model.latent_channels, 4, 4)  # [B, Cz, 4, 4]
    bounds = [(4 * i // 3, -(-4 * (i + 1) // 3)) for i in range(3)]  # [(0, 2), (1, 3), (2, 4)]
    expected = torch.stack([torch.stack([f_hat[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for c0, c1 in bounds], -1)
                            for r0, r1 in bounds], -2)  # [B, Cz, 3, 3]
    got = model.next_scale_input(f_hat, 0)  # after scale 0, the input of scale 1 (3x3): [B, 9, Cz]
    torch.testing.assert_close(got, expected.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)


def test_vq_loss_gradients_commitment_to_encoder_and_codebook_term_to_codes():
    """d vq_loss / d f = beta * d mean_k MSE(f_hat_k.detach(), f) / d f (the commitment term alone reaches the
    encoder latent); d vq_loss / d codebook = d mean_k MSE(f_hat_k, f.detach()) / d codebook (no beta, and the
    commitment term leaves the codebook alone)."""
    model = tiny_vae().train()
    images = tiny_images(model)
    with torch.no_grad():
        f0 = model.encode_latent(images)
    f = f0.clone().requires_grad_(True)
    model.encode_latent = lambda _images: f  # the forward's latent is our leaf
    _, vq_loss, _ = model(images)
    codebook = model.quantize.embedding.weight
    grad_f, grad_codebook = torch.autograd.grad(vq_loss, [f, codebook])

    beta = model.config.beta
    assert beta == 0.25
    f_ref = f0.clone().requires_grad_(True)
    f_hats = [f_hat for _, f_hat in model.iter_residual_quantize(f0)]  # carry gradients to the codebook
    commitment = sum(F.mse_loss(fh.detach(), f_ref) for fh in f_hats) / len(f_hats)
    (expected_grad_f,) = torch.autograd.grad(beta * commitment, [f_ref])
    codebook_term = sum(F.mse_loss(fh, f0) for fh in f_hats) / len(f_hats)
    (expected_grad_codebook,) = torch.autograd.grad(codebook_term, [codebook])
    assert expected_grad_f.abs().sum() > 0 and expected_grad_codebook.abs().sum() > 0
    assert torch.allclose(grad_f, expected_grad_f, rtol=1e-4, atol=1e-9)
    assert torch.allclose(grad_codebook, expected_grad_codebook, rtol=1e-4, atol=1e-9)


def test_residual_vectors_are_each_scales_area_downsampled_residual():
    """Rows of scale k = area_downsample(f - f_hat before scale k) to pn_k x pn_k, f_hat from the quantiser."""
    model = tiny_vae()
    images = tiny_images(model)
    with torch.no_grad():
        f = model.encode_latent(images).float()
        f_hats_before = [torch.zeros_like(f)] + [fh for _, fh in model.iter_residual_quantize(f)][:-1]
        expected = []
        for pn, f_hat in zip(model.patch_nums, f_hats_before):
            rest = f - f_hat  # [B, Cz, h, w]
            # area downsampling = adaptive average pooling (overlapping windows where pn does not divide h)
            windows = F.adaptive_avg_pool2d(rest, pn)  # [B, Cz, pn, pn]
            expected.append(windows.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        expected = torch.cat(expected)
    got = model.residual_vectors(images)
    assert got.shape == (images.shape[0] * sum(pn * pn for pn in model.patch_nums), f.shape[1])
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, torch.cat([  # scales after the first see a residual, not the plain latent
        F.adaptive_avg_pool2d(f, pn).permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for pn in model.patch_nums]))


def test_usage_counts_codes_hit_at_least_once_and_the_hit_ema_decays_by_0_99():
    model = tiny_vae()
    images = tiny_images(model)
    with torch.no_grad():
        tokens = model.encode(images)  # per-scale maps
    hits = torch.stack([t.flatten().bincount(minlength=64).float() for t in tokens])  # [S, V]
    ema = model.quantize.ema_vocab_hit_SV
    ema.fill_(2.0)
    _, _, stats = model.eval()(images)
    assert (ema == 2.0).all()  # evaluation leaves the hit average alone
    _, _, stats = model.train()(images)
    assert torch.allclose(ema, 0.99 * 2.0 + 0.01 * hits, rtol=1e-6)
    assert torch.equal(stats["code_hits"], hits.sum(0))
    assert stats["codebook_usage"].item() == pytest.approx((hits.sum(0) > 0).sum().item() / 64)
    assert hits.sum(0).max() > 1  # some code is hit more than once, so a count-based usage would differ


# ------------------------------------------------------------------ factorized codes, lookups, entropy, k-means
FACTORIZED = 3  # codebook_dim of the factorized tiny models


def test_factorized_lookup_picks_the_code_of_highest_cosine_in_the_projected_space():
    model = tiny_vae(codebook_dim=FACTORIZED)
    quantize = model.quantize
    z = torch.randn(3, TINY["z_channels"], 5, 5) * 0.3  # [B, C, h, w]
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, TINY["z_channels"])  # [75, C]
    projected = z_flat @ quantize.in_proj.weight.T + quantize.in_proj.bias  # [75, D]
    cosine = F.cosine_similarity(projected[:, None], quantize.embedding.weight[None], dim=-1)  # [75, V]
    ours = quantize.nearest_code(z)
    assert torch.equal(ours.flatten(), cosine.argmax(1))
    assert len(ours.unique()) > 10


@pytest.mark.parametrize("codebook_dim", [0, FACTORIZED])
def test_encode_decode_and_lookups_match_the_reference(codebook_dim):
    model = tiny_vae(codebook_dim=codebook_dim)
    images = tiny_images(model, batch=3)
    with torch.no_grad():
        f = model.encode_latent(images)
        ref_tokens, ref_f_hat, ref_lookups = reference_residual_quantize(model, f, [0, 0, 1, 1])
        tokens = model.encode(images)
        vectors, picks = model.quantizer_lookups(f)
        decoded = model.decode(tokens)
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert len(torch.cat([t.flatten() for t in tokens]).unique()) > 3
    assert (model.tokens_to_latent(tokens) - ref_f_hat).abs().max() <= 1e-5
    assert torch.allclose(decoded, model.decode_latent(ref_f_hat), atol=1e-5)
    assert vectors.shape == (3 * sum(pn * pn for pn in PATCH_NUMS), codebook_dim or TINY["z_channels"])
    assert torch.allclose(vectors, torch.cat(ref_lookups), atol=1e-6)
    assert torch.equal(picks, torch.cat([t.flatten() for t in ref_tokens]))


def test_factorized_codes_add_only_the_two_projections_and_validate_their_size():
    default, factorized = tiny_vae().state_dict(), tiny_vae(codebook_dim=FACTORIZED).state_dict()
    V, C = TINY["vocab_size"], TINY["z_channels"]
    added = {name: tuple(t.shape) for name, t in factorized.items() if name not in default}
    assert added == {"quantize.in_proj.weight": (FACTORIZED, C), "quantize.in_proj.bias": (FACTORIZED,),
                     "quantize.out_proj.weight": (C, FACTORIZED), "quantize.out_proj.bias": (C,)}
    assert set(default) <= set(factorized) and factorized["quantize.embedding.weight"].shape == (V, FACTORIZED)
    assert all(factorized[name].shape == t.shape for name, t in default.items() if "embedding" not in name)
    with pytest.raises(ValueError, match="codebook_dim is the size of factorized codes .* got -1"):
        MultiScaleVQVAE(**TINY, patch_nums=PATCH_NUMS, codebook_dim=-1)


def test_factorized_folder_reloads_strictly_and_not_as_vars_codes(tmp_path):
    import json

    from vartk.checkpoints import load_saved_model

    model = tiny_vae(codebook_dim=FACTORIZED)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["codebook_dim"] == FACTORIZED
    loaded = load_saved_model(tmp_path, (MultiScaleVQVAE,))
    images = tiny_images(model)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.encode(images), loaded.encode(images)))
    (tmp_path / "config.json").write_text(json.dumps({**config, "codebook_dim": 0}))
    with pytest.raises(CheckpointError, match=r"quantize\.in_proj\.weight"):
        load_saved_model(tmp_path, (MultiScaleVQVAE,))


def test_folders_saved_before_codebook_dim_existed_load_as_vars_codes(tmp_path):
    """A config.json without codebook_dim (the shipped tokenizers) is VAR's layout; other fields stay required."""
    import json

    from vartk.checkpoints import load_saved_model

    model = tiny_vae()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["codebook_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_saved_model(tmp_path, (MultiScaleVQVAE,))
    assert loaded.config.codebook_dim == 0
    images = tiny_images(model)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.encode(images), loaded.encode(images)))
    del config["beta"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lacks 'beta'"):
        load_saved_model(tmp_path, (MultiScaleVQVAE,))


def test_factorized_training_loss_adds_llamagens_loss_in_the_lookup_space():
    """vq_loss = mean over scales of [beta MSE(f_hat, f) + MSE(f_hat, f)] + [MSE(code, v) + beta MSE(code, v)] (the
    values; v = the projected, normalised residual, code = the unit code it picked); in_proj learns from it."""
    model = tiny_vae(codebook_dim=FACTORIZED).train()
    images = tiny_images(model)
    _, vq_loss, _ = model(images)
    vq_loss.backward()
    assert model.quantize.in_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        f = model.encode_latent(images)
        tokens, _, lookups = reference_residual_quantize(model, f, [0, 0, 1, 1])
        f_hats = [f_hat for _, f_hat in model.iter_residual_quantize(f)]
        unit_codes = F.normalize(model.quantize.embedding.weight, dim=1)  # [V, D]
        expected = sum(1.25 * F.mse_loss(f_hat, f) + 1.25 * F.mse_loss(unit_codes[t.flatten()], v)
                       for f_hat, t, v in zip(f_hats, tokens, lookups)) / len(PATCH_NUMS)
    assert vq_loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("codebook_dim", [0, FACTORIZED])
def test_entropy_stat_is_the_entropy_loss_of_every_scales_lookups(codebook_dim):
    """With p = softmax(-|v - code|^2 / T) over the codes for each looked-up vector v of every scale:
    mean_v H(p_v) - H(mean_v p_v); it reaches the codes and the encoder."""
    model = tiny_vae(codebook_dim=codebook_dim).train()
    images = tiny_images(model)
    _, _, stats = model(images, entropy_temperature=0.05)
    stats["entropy"].backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0 and model.encoder.conv_in.weight.grad.abs().sum() > 0
    with torch.no_grad():
        _, _, lookups = reference_residual_quantize(model, model.encode_latent(images), [0, 0, 1, 1])
        codes = model.quantize.embedding.weight
        codes = F.normalize(codes, dim=1) if codebook_dim else codes
        p = torch.exp(-torch.cdist(torch.cat(lookups), codes) ** 2 / 0.05)
        p = p / p.sum(1, keepdim=True)  # [N, V]
        mean_p = p.mean(0)
        expected = -(p * p.clamp_min(1e-30).log()).sum(1).mean() + (mean_p * (mean_p + 1e-5).log()).sum()
    assert stats["entropy"].item() == pytest.approx(expected.item(), abs=1e-4)
    assert "entropy" not in model(images)[2]


@pytest.mark.parametrize("codebook_dim", [0, FACTORIZED])
def test_kmeans_codebook_is_lloyd_on_the_residuals_each_scale_quantises(codebook_dim):
    """From its start, each iteration quantises the latents with the current codes (the reference algorithm) and
    moves every picked code to the mean of the vectors that picked it, scale by scale residuals included."""
    from vartk.tokenizers.codebook import kmeans_codebook

    model = tiny_vae(codebook_dim=codebook_dim)
    codebook = model.quantize.embedding.weight
    with torch.no_grad():
        latents = model.encode_latent(tiny_images(model, batch=5))  # [5, C, 4, 4]
        kmeans_codebook(model, latents, 0, torch.Generator().manual_seed(3), chunk_size=2)
        start = codebook.clone()
        assert len(start.unique(dim=0)) == TINY["vocab_size"]
        expected = start.clone()
        for _ in range(2):
            codebook.copy_(expected)
            tokens, _, lookups = reference_residual_quantize(model, latents, [0, 0, 1, 1])
            vectors, picks = torch.cat(lookups), torch.cat([t.flatten() for t in tokens])
            for code in picks.unique():
                expected[code] = vectors[picks == code].mean(0)
        kmeans_codebook(model, latents, 2, torch.Generator().manual_seed(3), chunk_size=2)  # the same start
    assert not torch.allclose(expected, start, atol=1e-3)  # the iterations move codes
    assert torch.allclose(codebook, expected, atol=1e-5)
    with pytest.raises(ValueError, match="1 latents give 30 vectors for 64 codes"):
        kmeans_codebook(model, latents[:1], 1, torch.Generator())
