import math

import pytest
import torch
from fixture_utils import load_fixture, state_dict_from_fixture

import vartk.models.gpt as gpt
from vartk.checkpoints import CheckpointError
from vartk.models.gpt import GPT_CONFIGS, GPTTransformer, apply_rope, rope_2d

TINY = dict(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, grid_size=4)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPTTransformer(**dict(TINY, **overrides))
    model.init_weights(randomize_output=True)
    return model.eval()


def test_teacher_forcing_shapes_and_output_is_zero_initialised():
    model = GPTTransformer(**TINY).eval()
    assert torch.count_nonzero(model.output.weight) == 0
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.1)
    logits = model(torch.tensor([1, 2]), torch.randint(0, 64, (2, 15)))
    assert logits.shape == (2, 16, 64) and logits.dtype == torch.float32


def test_cached_decode_matches_teacher_forcing():
    model = tiny_model()
    labels, tokens = torch.tensor([3, 7]), torch.randint(0, 64, (2, 15))
    with torch.no_grad():
        full = model(labels, tokens)  # [2, 16, V]
        caches = model.new_kv_caches(2)
        assert caches[0].k.shape == (2, 4, 24, 16)  # round_up(1 + 16, 8) slots
        steps = [model.forward_cached(None, labels, torch.zeros(2, 1, dtype=torch.long), caches)]
        for i in range(15):
            steps.append(model.forward_cached(tokens[:, i : i + 1], None, torch.full((2, 1), 1 + i), caches))
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_ragged_multi_token_windows_match_teacher_forcing():
    model = tiny_model(1)
    labels, tokens = torch.tensor([3, 7]), torch.randint(0, 64, (2, 15))
    drafts = torch.randint(0, 64, (2, 4))
    with torch.no_grad():
        full = model(labels, tokens)
        caches = model.new_kv_caches(2)
        model.forward_cached(None, labels, torch.zeros(2, 1, dtype=torch.long), caches)
        # window 1 at positions 1..4: row 0 gets its true tokens, row 1 the true first token then wrong drafts
        window = torch.stack([tokens[0, :4], torch.cat([tokens[1, :1], drafts[1, 1:]])])
        first = model.forward_cached(window, None, torch.arange(1, 5).expand(2, -1), caches)
        # window 2, ragged: row 0 goes on at 5, 6; row 1 rewrites 2, 3 (its stale draft at 4 must stay unseen)
        positions = torch.tensor([[5, 6], [2, 3]])
        window = torch.stack([tokens[0, 4:6], tokens[1, 1:3]])
        second = model.forward_cached(window, None, positions, caches)
    assert (first[0] - full[0, 1:5]).abs().max() <= 1e-5
    assert (first[1, 0] - full[1, 1]).abs().max() <= 1e-5
    assert (second[0] - full[0, 5:7]).abs().max() <= 1e-5
    assert (second[1] - full[1, 2:4]).abs().max() <= 1e-5


def reference_rope(x, positions, grid, base=10000.0):
    """Independent 2-D RoPE: complex rotation of interleaved pairs; row angles then column angles."""
    head_dim = x.shape[-1]
    freqs = base ** (-torch.arange(head_dim // 4, dtype=torch.float64) * 2 / (head_dim // 2))  # [D/4]
    out = torch.zeros_like(x, dtype=torch.float64)
    for t, pos in enumerate(positions.tolist()):
        if pos == 0:  # class token: zero rotation table
            continue
        row, col = divmod(pos - 1, grid)
        angles = torch.cat([row * freqs, col * freqs])  # [D/2]
        pairs = torch.view_as_complex(x[:, t].double().reshape(*x.shape[:1], x.shape[2], -1, 2).contiguous())
        out[:, t] = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    return out


@pytest.mark.parametrize("head_dim", [16, 100])
def test_rope_matches_independent_complex_rotation(head_dim):
    grid = 6
    positions = torch.tensor([0, 1, 2, 6, 7, 13, 36])  # class, (0,0), (0,1), (0,5), (1,0), (2,0), (5,5)
    x = torch.randn(2, len(positions), 3, head_dim)  # [B, T, H, D]
    cos, sin = rope_2d(positions[None].expand(2, -1), grid, head_dim, 10000.0, prefix_len=1)
    ours = apply_rope(x, cos, sin)
    assert torch.allclose(ours.double(), reference_rope(x, positions, grid), atol=1e-5)
    assert torch.count_nonzero(ours[:, 0]) == 0


def test_class_token_queries_and_keys_are_zero(monkeypatch):
    rotated = []

    def recording_apply_rope(x, cos, sin):
        rotated.append(apply_rope(x, cos, sin))
        return rotated[-1]

    monkeypatch.setattr(gpt, "apply_rope", recording_apply_rope)
    model = tiny_model()
    with torch.no_grad():
        model(torch.tensor([1, 2]), torch.randint(0, 64, (2, 5)))
    assert len(rotated) == 2 * model.config.n_layer  # q and k of every layer
    for q_or_k in rotated:
        assert torch.count_nonzero(q_or_k[:, 0]) == 0 and torch.count_nonzero(q_or_k[:, 1:]) > 0


def test_dropout_only_in_train_mode():
    model = tiny_model()
    labels, tokens = torch.tensor([1, 2]), torch.randint(0, 64, (2, 7))
    assert torch.equal(model(labels, tokens), model(labels, tokens))
    model.train()
    assert not torch.equal(model(labels, tokens), model(labels, tokens))
    no_dropout = tiny_model(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    assert torch.equal(no_dropout.train()(labels, tokens), no_dropout.eval()(labels, tokens))


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = GPTTransformer.from_pretrained(tmp_path).eval()
    labels, tokens = torch.tensor([4]), torch.randint(0, 64, (1, 9))
    assert loaded.config.grid_size == 4 and torch.equal(loaded(labels, tokens), model(labels, tokens))


@pytest.mark.parametrize("name, params", [
    ("GPT-B", 110_888_448), ("GPT-L", 342_910_976), ("GPT-XL", 774_699_520),
    ("GPT-XXL", 1_410_972_672), ("GPT-3B", 3_096_659_200),
])
def test_preset_param_counts_match_official_table(name, params):
    with torch.device("meta"):
        model = GPTTransformer(**GPT_CONFIGS[name])
    assert sum(p.numel() for p in model.parameters()) == params


def test_xxl_layout_matches_official_fixture():
    with torch.device("meta"):
        model = GPTTransformer(**GPT_CONFIGS["GPT-XXL"], grid_size=24)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert ours == {name: shape for name, (shape, _) in load_fixture("c2i_XXL_384.json").items()}
    assert len(ours) == 340


@pytest.fixture(scope="module")
def gpt_b_state_dict():
    return state_dict_from_fixture("c2i_B_256.json")


def test_official_gpt_b_model_container_loads(tmp_path, gpt_b_state_dict):
    path = tmp_path / "c2i_B_256.pt"
    torch.save({"model": gpt_b_state_dict}, path)
    model = GPTTransformer.from_official(path, model="GPT-B", image_size=256)
    assert not model.training and model.config.grid_size == 16
    assert torch.equal(model.output.weight, gpt_b_state_dict["output.weight"])
    assert torch.equal(model.layers[11].attention.wqkv.weight, gpt_b_state_dict["layers.11.attention.wqkv.weight"])


def test_official_bare_dict_with_stale_freqs_cis_loads(tmp_path, gpt_b_state_dict):
    path = tmp_path / "c2i_B_384.pt"
    torch.save(dict(gpt_b_state_dict, freqs_cis=torch.zeros(577, 32, 2)), path)
    model = GPTTransformer.from_official(path, model="GPT-B", image_size=384)
    assert model.config.grid_size == 24
    assert torch.equal(model.norm.weight, gpt_b_state_dict["norm.weight"])
    with pytest.raises(ValueError, match=r"c2i_B_384.pt is a 384 px checkpoint.*image_size=256.*image_size=384"):
        GPTTransformer.from_official(path, model="GPT-B", image_size=256)


def test_official_mismatches_name_the_key(gpt_b_state_dict):
    renamed = dict(gpt_b_state_dict)
    renamed["layers.3.attention.wqkv.weights"] = renamed.pop("layers.3.attention.wqkv.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \['layers.3.attention.wqkv.weight'\]"):
        GPTTransformer.from_official(renamed)
    reshaped = dict(gpt_b_state_dict, **{"norm.weight": torch.ones(767)})
    with pytest.raises(CheckpointError, match=r"norm.weight: file \(767,\) vs model \(768,\)"):
        GPTTransformer.from_official({"model": reshaped})
    with pytest.raises(CheckpointError, match="layers.12"):
        GPTTransformer.from_official(gpt_b_state_dict, model="GPT-L")


def test_from_official_rejects_unknown_model_and_bad_image_size(gpt_b_state_dict):
    with pytest.raises(ValueError, match=r"'GPT-S'.*GPT-3B.*GPT-B.*GPT-XXL"):
        GPTTransformer.from_official(gpt_b_state_dict, model="GPT-S")
    with pytest.raises(ValueError, match="image_size=250"):
        GPTTransformer.from_official(gpt_b_state_dict, image_size=250)


def test_bad_head_size_is_rejected():
    with pytest.raises(ValueError, match="dim=60.*n_head=4"):
        GPTTransformer(dim=60, n_layer=1, n_head=4)


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: the documented LlamaGen formulas (docs: shared/reference/llamagen.md §2.2-2.3) in plain
# torch ops, reading the module's own parameter tensors; reference_rope above supplies the rotation.

def random_weights_model(seed=0, std=0.15):
    """tiny_model with every parameter ~ N(0, std²), RMSNorm weights included, so attention is far from uniform."""
    model = tiny_model(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def reference_rms_norm(x, weight, eps=1e-5):
    """Normalise in float32, cast back to x's dtype, then multiply by the weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def reference_swiglu(ffn, x):
    """w2(silu(w1 x) * w3 x): w1 is the gate, w3 the up projection, w2 the down projection."""
    gate, up = x @ ffn.w1.weight.T.to(x.dtype), x @ ffn.w3.weight.T.to(x.dtype)
    return (gate * torch.sigmoid(gate) * up) @ ffn.w2.weight.T.to(x.dtype)


def reference_llama_block(layer, x, grid):
    """Pre-norm block in float64 over a whole sequence (class token at position 0, causal attention)."""
    B, T, C = x.shape
    H = layer.attention.n_head
    w_q, w_k, w_v = layer.attention.wqkv.weight.double().chunk(3)  # [q | k | v], each [C, C], rows head-major
    h = reference_rms_norm(x, layer.attention_norm.weight.double())
    q, k, v = ((h @ w.T).view(B, T, H, C // H) for w in (w_q, w_k, w_v))  # each [B, T, H, D]
    positions = torch.arange(T)
    q, k = reference_rope(q, positions, grid), reference_rope(k, positions, grid)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(C // H)  # [B, H, T, T]
    weights = logits.masked_fill(positions[None, :] > positions[:, None], float("-inf")).softmax(-1)
    x = x + torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, T, C) @ layer.attention.wo.weight.double().T
    return x + reference_swiglu(layer.feed_forward, reference_rms_norm(x, layer.ffn_norm.weight.double()))


def test_block_matches_reference_llama_block():
    """wqkv split [q | k | v] head-major, RMSNorm before attention and FFN, SwiGLU with w1 gate / w3 up."""
    model = random_weights_model()
    x = torch.randn(2, 9, 64)  # [B, T, C]: class token + 8 image tokens
    positions = torch.arange(9)[None]  # [1, T]
    cos, sin = rope_2d(positions, 4, 16, 10000.0, prefix_len=1)
    causal = (positions[0, None, :] <= positions[0, :, None])[None, None]  # [1, 1, T, T]
    with torch.no_grad():
        ours = model.layers[1](x, cos, sin, causal, positions)
    expected = reference_llama_block(model.layers[1], x.double(), grid=4)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def test_forward_matches_reference_llama():
    """[class, tokens] embeddings, blocks, final RMSNorm and untied head, logits float32."""
    model = random_weights_model(seed=1)
    labels, tokens = torch.tensor([3, 10]), torch.randint(0, 64, (2, 15))  # [B], [B, N - 1]
    x = torch.cat([model.cls_embedding.embedding_table.weight[labels][:, None], model.tok_embeddings.weight[tokens]], 1)
    x = x.detach().double()  # [B, N, C]
    for layer in model.layers:
        x = reference_llama_block(layer, x, grid=4)
    expected = reference_rms_norm(x, model.norm.weight.double()) @ model.output.weight.double().T  # [B, N, V]
    with torch.no_grad():
        torch.testing.assert_close(model(labels, tokens).double(), expected, rtol=1e-5, atol=1e-5)


def test_swiglu_gates_with_w1_and_scales_with_w3():
    """FeedForward = w2(silu(w1 x) * w3 x)."""
    ffn = random_weights_model().layers[0].feed_forward
    x = torch.randn(3, 5, 64)  # [B, T, C]
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), reference_swiglu(ffn, x), rtol=1e-5, atol=1e-5)


def test_rms_norms_use_eps_1e_5():
    """norm_eps 1e-5 in every RMSNorm (attention, FFN and final norms)."""
    model = random_weights_model()
    x = torch.randn(2, 5, 64) * 3e-3  # [B, T, C]; mean square ~1e-5, so eps shows
    norms = [m for m in model.modules() if isinstance(m, gpt.RMSNorm)]
    assert len(norms) == 2 * model.config.n_layer + 1
    with torch.no_grad():
        for norm in norms:
            torch.testing.assert_close(norm(x), reference_rms_norm(x, norm.weight), rtol=1e-5, atol=1e-5)


def test_rms_norm_normalises_in_fp32_then_scales_in_bf16():
    """bf16 RMSNorm: statistics in fp32, cast to bf16, then times the bf16 weight (bit-exact)."""
    norm = random_weights_model().norm.to(torch.bfloat16)
    x = (torch.randn(4, 7, 64) * torch.logspace(-1, 2, 64)).to(torch.bfloat16)  # [B, T, C], wide dynamic range
    with torch.no_grad():
        assert torch.equal(norm(x), reference_rms_norm(x, norm.weight))


def test_rope_rotates_bf16_inputs_in_fp32():
    """apply_rope on bf16: rotate the interleaved pairs in fp32 with fp32 cos/sin, cast back once (bit-exact)."""
    positions = torch.arange(17)[None]  # [1, T]: class token + a 4x4 grid
    cos, sin = rope_2d(positions, 4, 16, 10000.0, prefix_len=1)  # each [1, T, 1, D/2] float32
    x = torch.randn(2, 17, 3, 16).to(torch.bfloat16)  # [B, T, H, D]
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]  # [B, T, H, D/2]
    expected = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).to(torch.bfloat16)
    assert torch.equal(apply_rope(x, cos, sin), expected)


def test_bf16_model_returns_float32_logits():
    """Logits are cast with .float() in teacher forcing and in cached decoding."""
    model = random_weights_model()
    labels, tokens = torch.tensor([1, 2]), torch.randint(0, 64, (2, 7))  # [B], [B, N - 1]
    with torch.no_grad():
        full = model(labels, tokens)
        model.to(torch.bfloat16)
        half = model(labels, tokens)
        prefill = model.forward_cached(None, labels, torch.zeros(2, 1, dtype=torch.long), model.new_kv_caches(2))
    assert half.dtype == prefill.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=0.02)  # logits ~0.5; bf16 weights move them ~4e-3
