import math

import pytest
import torch
import torch.nn.functional as F
from fixture_utils import load_fixture, state_dict_from_fixture
from tiny_models import NUM_CLASSES, PATCH_NUMS, random_token_maps, tiny_var_tokenizer, tiny_var_transformer

from vartk.checkpoints import CheckpointError
from vartk.models.attention import ContiguousKVCache
from vartk.samplers.kv_cache import FullKVCache
from vartk.models.var import PATCH_NUMS_512, VARTransformer, infer_official_config
from vartk.tokenizers.msvq import MultiScaleVQVAE

@pytest.mark.parametrize("shared_aln", [False, True])
@torch.no_grad()
def test_teacher_forcing_equals_cached_scale_by_scale(shared_aln):
    model, tokenizer = tiny_var_transformer(shared_aln), tiny_var_tokenizer()
    labels = torch.tensor([3, NUM_CLASSES])
    tokens = random_token_maps(2)
    teacher_forced = model(labels, tokenizer.teacher_forcing_input(tokens))  # [B, L, V]
    assert teacher_forced.shape == (2, 14, 32) and teacher_forced.dtype == torch.float32

    caches = FullKVCache().new_caches(model.cache_spec(2))
    f_hat, x_next, cached = torch.zeros(2, 8, 3, 3), None, []
    for scale_index, scale_tokens in enumerate(tokens):
        cached.append(model.forward_scale(x_next, labels, scale_index, caches))
        f_hat = tokenizer.fold_scale(f_hat, scale_index, tokenizer.embed_tokens(scale_tokens))
        if scale_index < len(tokens) - 1:
            x_next = tokenizer.next_scale_input(f_hat, scale_index)
    cached = torch.cat(cached, dim=1)
    assert caches[0].length == 5  # the last scale attends to the cache but is never written into it
    assert (teacher_forced - cached).abs().max() <= 1e-5
    assert teacher_forced.std() > 0.1  # random weights give logits far from constant


def test_block_causal_mask_matches_a_loop():
    model = tiny_var_transformer()
    level = [0] + [1] * 4 + [2] * 9
    expected = torch.zeros(14, 14)
    for query in range(14):
        for key in range(14):
            if level[key] > level[query]:
                expected[query, key] = float("-inf")
    assert torch.equal(model.attn_bias_for_masking[0, 0], expected)
    assert model.lvl_1L.tolist() == [level]


@torch.no_grad()
def test_future_scales_do_not_change_earlier_logits():
    model, tokenizer = tiny_var_transformer(), tiny_var_tokenizer()
    labels = torch.tensor([1])
    tokens = random_token_maps(1)
    changed = tokens[:2] + [torch.randint(0, 32, (1, 3, 3), generator=torch.Generator().manual_seed(9))]
    base = model(labels, tokenizer.teacher_forcing_input(tokens))
    other = model(labels, tokenizer.teacher_forcing_input(changed))
    assert torch.equal(base[:, :5], other[:, :5])  # scale 3's tokens only enter the (absent) scale-4 input


def test_official_d16_layout_loads_strictly():
    state_dict = state_dict_from_fixture("var_d16.json")
    model = VARTransformer.from_official(state_dict)
    assert (model.num_layers, model.num_heads, model.head_dim, model.seq_len) == (16, 16, 64, 680)
    assert model.config.shared_aln is False and model.config.attn_l2_norm is True
    assert sum(p.numel() for p in model.parameters()) == 310_283_520
    ours = model.state_dict()
    assert {k: (tuple(v.shape), str(v.dtype)[6:]) for k, v in ours.items()} == load_fixture("var_d16.json")
    assert torch.equal(ours["blocks.7.attn.mat_qkv.weight"], state_dict["blocks.7.attn.mat_qkv.weight"])
    assert torch.equal(ours["lvl_1L"][0, -256:], torch.full((256,), 9))  # recomputed, not the fixture's zeros


def test_official_d36_layout_is_inferred():
    meta = {name: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for name, (shape, dtype) in load_fixture("var_d36.json").items()}
    config = infer_official_config(meta)
    assert config["depth"] == 36 and config["width"] == 2304 and config["num_heads"] == 36
    assert config["shared_aln"] is True and config["patch_nums"] == PATCH_NUMS_512
    with torch.device("meta"):
        model = VARTransformer(**config)
    layout = {k: (tuple(v.shape), str(v.dtype)[6:]) for k, v in model.state_dict().items()}
    assert layout == load_fixture("var_d36.json")
    assert sum(p.numel() for p in model.parameters()) == 2_353_893_904


def test_from_official_file_round_trip(tmp_path):
    model = tiny_var_transformer(shared_aln=True)
    path = tmp_path / "var_tiny.pth"
    torch.save(model.state_dict(), path)
    loaded = VARTransformer.from_official(path, patch_nums=PATCH_NUMS)
    assert loaded.config.shared_aln is True and loaded.config.num_classes == NUM_CLASSES
    labels, x = torch.tensor([0, 4]), torch.randn(2, 13, 8)
    assert torch.equal(loaded(labels, x), model(labels, x))
    assert not loaded.training  # ready to sample, as the other from_official loaders
    in_memory = VARTransformer.from_official({"trainer": {"var_wo_ddp": model.state_dict()}}, patch_nums=PATCH_NUMS)
    assert torch.equal(in_memory(labels, x), model(labels, x))  # a training checkpoint's layout, not from a file


def test_from_official_errors_name_keys_and_shapes():
    state_dict = tiny_var_transformer().state_dict()
    with pytest.raises(CheckpointError, match=r"14 positions.*patch_nums"):
        VARTransformer.from_official(state_dict)
    renamed = dict(state_dict)
    renamed["blocks.1.ffn.fc9.weight"] = renamed.pop("blocks.1.ffn.fc2.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.1.ffn.fc2.weight'\].*blocks.1.ffn.fc9.weight"):
        VARTransformer.from_official(renamed, patch_nums=PATCH_NUMS)
    reshaped = dict(state_dict, **{"head.bias": torch.zeros(31)})
    with pytest.raises(CheckpointError, match=r"head.bias: file \(31,\) vs model \(32,\)"):
        VARTransformer.from_official(reshaped, patch_nums=PATCH_NUMS)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_var_transformer()
    model.save_pretrained(tmp_path)
    loaded = VARTransformer.from_pretrained(tmp_path).eval()
    assert loaded.patch_nums == PATCH_NUMS
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    labels, x = torch.tensor([2]), torch.randn(1, 13, 8)
    torch.testing.assert_close(loaded(labels, x), model(labels, x), rtol=0, atol=1e-5)  # weights are not aligned alike


def test_init_weights_follows_the_official_recipe():
    torch.manual_seed(0)
    model = VARTransformer(depth=4, vocab_size=32, latent_channels=8, num_classes=NUM_CLASSES, patch_nums=PATCH_NUMS)
    std = (1 / (3 * 256)) ** 0.5
    assert abs(model.class_emb.weight.std().item() - std) < 0.1 * std
    assert abs(model.head.weight.std().item() - 0.02 * std) < 0.1 * 0.02 * std
    ada = model.blocks[0].ada_lin[-1].weight  # rows: gamma1, gamma2, scale1, scale2, shift1, shift2
    assert ada[: 2 * 256].abs().max() < 1e-4 and abs(ada[2 * 256 :].std().item() - 0.5 * std) < 0.1 * std
    fc2 = model.blocks[0].ffn.fc2.weight
    assert abs(fc2.std().item() - std / 8 ** 0.5) < 0.1 * std
    assert model.head.bias.abs().max() == 0 and model.blocks[0].attn.q_bias.abs().max() == 0
    shared = VARTransformer(depth=2, vocab_size=32, latent_channels=8, num_classes=NUM_CLASSES, patch_nums=PATCH_NUMS,
                            shared_aln=True)
    shared.init_weights(init_adaln_gamma=1e-3)  # a second call re-draws, it does not compound
    gss = shared.blocks[1].ada_gss[0, 0]  # [6, C]
    assert abs(gss[:2].std().item() - 1e-3 / 128 ** 0.5) < 0.15e-3 / 128 ** 0.5


def test_drop_path_only_in_training():
    model = tiny_var_transformer(drop_path_rate=0.9)
    labels, x = torch.tensor([1, 2, 3, 4]), torch.randn(4, 13, 8)
    assert torch.equal(model(labels, x), model(labels, x))
    torch.manual_seed(0)
    assert not torch.equal(model.train()(labels, x), model.eval()(labels, x))


def test_forward_scale_checks_its_inputs():
    model = tiny_var_transformer()
    caches = FullKVCache().new_caches(model.cache_spec(1))
    with pytest.raises(ValueError, match="scale_index=1"):
        model.forward_scale(None, torch.tensor([0]), 1, caches)
    with pytest.raises(ValueError, match="one KV cache per block"):
        model.forward_scale(None, torch.tensor([0]), 0, caches[:1])


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: the documented VAR formulas (docs: shared/reference/var_scalekv.md §2.2-2.3) in plain
# torch ops, reading the module's own parameter tensors. Random weights (0.2 * randn) and a temperature of 100 give
# outputs ~50 whose fp32 rounding reaches 1e-4, so model and reference both run in float64 and must agree to 1e-5.

def reference_layer_norm(x, eps=1e-6):
    """LayerNorm over the last dim, no affine parameters."""
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt((x - mean).pow(2).mean(-1, keepdim=True) + eps)


def reference_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_levels():
    """Scale index of every position, [L]."""
    return torch.repeat_interleave(torch.arange(len(PATCH_NUMS)), torch.tensor(PATCH_NUMS) ** 2)


def reference_block_causal_mask():
    level = reference_levels()  # [L]
    return torch.zeros(len(level), len(level)).masked_fill(level[None, :] > level[:, None], float("-inf"))  # [L, L]


def reference_attention(attn, x, mask):
    """q, k, v from mat_qkv (+ q_bias, no k bias, + v_bias); L2 variant: unit q, k and q times the per-head
    exp(min(scale_mul, log 100)), softmax scale 1; otherwise scale 0.25 / sqrt(head_dim)."""
    B, L, C = x.shape
    H = attn.num_heads
    w_q, w_k, w_v = attn.mat_qkv.weight.chunk(3)  # each [C, C], rows head-major

    def heads(t):
        return t.view(B, L, H, C // H).transpose(1, 2)  # [B, H, L, D]

    q, k, v = heads(x @ w_q.T + attn.q_bias), heads(x @ w_k.T), heads(x @ w_v.T + attn.v_bias)
    if hasattr(attn, "scale_mul_1H11"):
        temperature = attn.scale_mul_1H11.clamp(max=math.log(100)).exp()  # [1, H, 1, 1]
        q = q / q.norm(dim=-1, keepdim=True) * temperature
        k = k / k.norm(dim=-1, keepdim=True)
        scale = 1.0
    else:
        scale = 0.25 / math.sqrt(C // H)
    weights = torch.softmax(q @ k.transpose(-1, -2) * scale + mask, dim=-1)  # [B, H, L, L]
    return (weights @ v).transpose(1, 2).reshape(B, L, C) @ attn.proj.weight.T + attn.proj.bias


def reference_block(block, x, modulation, mask):
    """AdaLN block; modulation [B, 6, C] in the order gamma1, gamma2, scale1, scale2, shift1, shift2."""
    gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation[:, None].unbind(2)  # each [B, 1, C]
    x = x + gamma1 * reference_attention(block.attn, reference_layer_norm(x) * (1 + scale1) + shift1, mask)
    h = reference_layer_norm(x) * (1 + scale2) + shift2
    ffn = block.ffn
    return x + gamma2 * (reference_gelu_tanh(h @ ffn.fc1.weight.T + ffn.fc1.bias) @ ffn.fc2.weight.T + ffn.fc2.bias)


def reference_modulation(model, block, cond):
    """The six modulation vectors [B, 6, C]: SiLU -> Linear of the block, or the shared one plus ada_gss."""
    linear = model.shared_ada_lin[1] if model.config.shared_aln else block.ada_lin[1]
    six = (F.silu(cond) @ linear.weight.T + linear.bias).view(len(cond), 6, -1)  # [B, 6, C]
    return six + block.ada_gss[0, 0] if model.config.shared_aln else six


def reference_forward(model, labels, latents):
    """Teacher-forced logits: [class emb + pos_start, word_embed(latents)] + lvl + pos, blocks, AdaLN head."""
    cond = model.class_emb.weight[labels]  # [B, C]
    x = torch.cat([cond[:, None] + model.pos_start, latents @ model.word_embed.weight.T + model.word_embed.bias], 1)
    x = x + model.lvl_embed.weight[reference_levels()] + model.pos_1LC  # [B, L, C]
    for block in model.blocks:
        x = reference_block(block, x, reference_modulation(model, block, cond), reference_block_causal_mask())
    head_lin = model.head_nm.ada_lin[1]
    scale, shift = (F.silu(cond) @ head_lin.weight.T + head_lin.bias).view(len(cond), 2, 1, -1).unbind(1)  # [B, 1, C]
    return (reference_layer_norm(x) * (1 + scale) + shift) @ model.head.weight.T + model.head.bias


def hot_temperature_model(**kwargs) -> VARTransformer:
    """tiny_transformer in float64 whose head-0 attention temperature exceeds the log(100) clamp in every block."""
    model = tiny_var_transformer(**kwargs)
    if model.config.attn_l2_norm:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.scale_mul_1H11.copy_(torch.tensor([math.log(100) + 1.0, 0.3]).view(1, 2, 1, 1))
    return model.double()


@pytest.mark.parametrize("l2_norm", [True, False])
@torch.no_grad()
def test_block_matches_reference_formulas(l2_norm):
    """AdaLN chunk order, clamped temperature / 0.25/sqrt(d) scale, no k bias, unit q and k, tanh GELU."""
    torch.manual_seed(0)
    model = hot_temperature_model(attn_l2_norm=l2_norm)
    block, mask = model.blocks[1], reference_block_causal_mask().double()
    x, cond = torch.randn(2, 14, 64).double(), torch.randn(2, 64).double()  # [B, L, C], class embeddings [B, C]
    ours = block(x, cond, attn_mask=mask[None, None])
    expected = reference_block(block, x, reference_modulation(model, block, cond), mask)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - x).abs().mean() > 0.1  # both residual branches are far from zero


@pytest.mark.parametrize("shared_aln", [False, True])
@torch.no_grad()
def test_forward_matches_reference_formulas(shared_aln):
    """pos_start on the class token, shared AdaLN = shared_ada_lin(cond) + ada_gss, head AdaLN (scale, shift)."""
    torch.manual_seed(0)
    model = hot_temperature_model(shared_aln=shared_aln)
    labels, latents = torch.tensor([3, NUM_CLASSES]), torch.randn(2, 13, 8).double()  # [B], [B, L - 1, Cz]
    expected = reference_forward(model, labels, latents).float()  # [B, L, V]; logits are cast to float32
    torch.testing.assert_close(model(labels, latents), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_aln", [False, True])
@torch.no_grad()
def test_autocast_forward_embeds_in_float32_and_runs_the_blocks_in_the_autocast_dtype(shared_aln):
    """As the official training forward: the embeddings are computed with autocast off, then the residual stream,
    the blocks' condition and the mask are cast to the autocast dtype (bfloat16) before the blocks."""
    model = tiny_var_transformer(shared_aln)
    labels, latents = torch.tensor([3, NUM_CLASSES]), torch.randn(2, 13, 8)  # [B], [B, L - 1, Cz]
    cond = model.class_emb.weight[labels]  # [B, C], float32
    x = torch.cat([cond[:, None] + model.pos_start, model.word_embed(latents)], 1)
    x = x + model.lvl_embed.weight[reference_levels()] + model.pos_1LC  # [B, L, C], float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block_cond = model.shared_ada_lin(cond) if shared_aln else cond
        x, block_cond = x.bfloat16(), block_cond.bfloat16()
        mask = reference_block_causal_mask().bfloat16()[None, None]
        for block in model.blocks:
            x = block(x, block_cond, attn_mask=mask)
        expected = model.logits(x, cond)
        ours = model(labels, latents)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@torch.no_grad()
def test_autocast_block_and_head_follow_the_official_dtypes():
    """Under autocast the official gates attention in place (the branch keeps attention's bfloat16 even when the
    shared-AdaLN gate is float32) and normalises before the head in float32 (get_logits: h.float())."""
    model = tiny_var_transformer(shared_aln=True)
    block, x = model.blocks[0], torch.randn(2, 14, 64).bfloat16()  # [B, L, C]
    class_emb = torch.randn(2, 64)  # [B, C]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond = model.shared_ada_lin(class_emb)  # [B, 1, 6, C]
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (block.ada_gss + cond).unbind(2)
        attended = x + block.attn(block.norm(x) * (1 + scale1) + shift1).mul_(gamma1)
        expected_block = attended + block.ffn(block.norm(attended) * (1 + scale2) + shift2) * gamma2
        scale, shift = model.head_nm.ada_lin(class_emb).view(2, 1, 2, 64).unbind(2)  # each [B, 1, C]
        normed = F.layer_norm(x.float(), (64,), eps=1e-6) * (1 + scale) + shift
        expected_logits = model.head(normed).float()
        block_out, logits = block(x, cond), model.logits(x, class_emb)
    assert torch.equal(block_out, expected_block) and torch.equal(logits, expected_logits)


@torch.no_grad()
def test_layer_norms_use_eps_1e_6_without_affine():
    """LayerNorm(eps=1e-6, elementwise_affine=False) in every block and before the head."""
    model = tiny_var_transformer()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * 3e-3  # [B, L, C]; variance ~1e-5, so eps shows
    for norm in (model.blocks[0].norm, model.blocks[1].norm, model.head_nm.norm):
        assert list(norm.parameters()) == []
        torch.testing.assert_close(norm(x), reference_layer_norm(x), rtol=1e-5, atol=1e-5)


class Watching(ContiguousKVCache):
    """A full cache that records what `observe` receives."""

    observes = True

    def __init__(self, spec, wants_attention):
        super().__init__(spec)
        self.wants_attention, self.views = wants_attention, []

    def observe(self, view):
        self.views.append(view)


@torch.no_grad()
def test_a_cache_that_asks_for_the_attention_weights_gets_them_and_the_same_outputs():
    """Weights only for a cache that asks (attention then runs unfused: same logits to 1e-5); they equal
    softmax(scale q k^T) recomputed from the view; q_proj is the raw projection x W_q^T without the bias."""
    model = tiny_var_transformer()
    tokens = random_token_maps(2)
    tokenizer = tiny_var_tokenizer()
    labels = torch.tensor([3, 6])
    runs = {}
    for wants in (False, True):
        caches = [Watching(model.cache_spec(2), wants) for _ in range(model.num_layers)]
        f_hat, x_next, logits = torch.zeros(2, 8, 3, 3), None, []
        for scale_index, scale_tokens in enumerate(tokens):
            logits.append(model.forward_scale(x_next, labels, scale_index, caches))
            f_hat = tokenizer.fold_scale(f_hat, scale_index, tokenizer.embed_tokens(scale_tokens))
            if scale_index < len(tokens) - 1:
                x_next = tokenizer.next_scale_input(f_hat, scale_index)
        runs[wants] = torch.cat(logits, dim=1), caches
    (fused, plain_caches), (unfused, watched) = runs[False], runs[True]
    assert (fused - unfused).abs().max() <= 1e-5
    assert all(view.weights is None for view in plain_caches[0].views)
    view = watched[0].views[-1]  # layer 0, last scale: 9 queries over 14 keys
    assert view.weights.shape == (2, 2, 9, 14)
    expected = (view.q @ view.k.transpose(-1, -2) * view.scale).softmax(-1)
    torch.testing.assert_close(view.weights, expected)
    attn = model.blocks[0].attn  # L2-normalised attention: q = unit(x W_q^T + q_bias) * exp(min(scale_mul, log 100))
    temperature = attn.scale_mul_1H11.clamp(max=math.log(100)).exp()  # [1, H, 1, 1]
    unit = torch.nn.functional.normalize(view.q_proj + attn.q_bias.view(2, 1, 32), dim=-1)
    torch.testing.assert_close(unit * temperature, view.q)
    assert not torch.allclose(torch.nn.functional.normalize(view.q_proj, dim=-1) * temperature, view.q)  # no bias
