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
