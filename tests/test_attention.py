import math

import torch

from vartk.models.attention import ContiguousKVCache, StaticKVCache, attention, position_mask


def naive_attention(q, k, v, allowed):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def test_contiguous_cache_appends_and_attends_like_full_sequence():
    torch.manual_seed(0)
    k, v, q = (torch.randn(2, 3, 7, 8) for _ in range(3))
    cache = ContiguousKVCache(2, 3, 7, 8, torch.float32, "cpu")
    k_all, v_all = cache.update(k[:, :, :4], v[:, :, :4])
    assert cache.length == 4 and torch.equal(k_all, k[:, :, :4])
    k_all, v_all = cache.update(k[:, :, 4:], v[:, :, 4:])
    out = attention(q[:, :, 4:], k_all, v_all)
    expected = naive_attention(q[:, :, 4:], k, v, torch.ones(3, 7, dtype=torch.bool))
    assert torch.allclose(out, expected, atol=1e-6)


def test_static_cache_ragged_rows_match_causal_attention():
    torch.manual_seed(0)
    B, H, S, D = 2, 2, 8, 4
    k, v, q = (torch.randn(B, H, S, D) for _ in range(3))
    cache = StaticKVCache(B, H, S, D, torch.float32, "cpu")
    # row 0 writes positions 0..4, row 1 only 0..2 (ragged), then each row one more token
    cache.update(k[:1, :, :5].expand(B, -1, -1, -1).clone(), v[:1, :, :5].expand(B, -1, -1, -1).clone(),
                 torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]))
    positions = torch.tensor([[5], [3]])
    new_k = torch.stack([k[0, :, 5:6], k[0, :, 3:4]])
    new_v = torch.stack([v[0, :, 5:6], v[0, :, 3:4]])
    k_all, v_all = cache.update(new_k, new_v, positions)
    out = attention(q[:, :, :1], k_all, v_all, attn_mask=position_mask(positions, S))
    for row, pos in enumerate([5, 3]):
        expected = naive_attention(q[row : row + 1, :, :1], k[:1, :, : pos + 1], v[:1, :, : pos + 1],
                                   torch.ones(1, pos + 1, dtype=torch.bool))
        assert torch.allclose(out[row : row + 1], expected, atol=1e-6)


def test_forced_xformers_backend_masks_like_sdpa(monkeypatch):
    """A boolean mask (True = attend) reaches xformers as an additive bias of 0 / -inf. The stand-in follows
    xformers' documented contract ([B, L, H, D] inputs, attn_bias added to the scores); xformers itself does
    not load with our torch."""
    import sys
    import types

    def memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        scores = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5) + attn_bias
        return (scores.softmax(-1) @ v).transpose(1, 2)

    ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()
    out = attention(q, k, v, attn_mask=allowed, backend="xformers")
    assert torch.allclose(out, naive_attention(q, k, v, allowed), atol=1e-6)


def test_position_mask():
    mask = position_mask(torch.tensor([[0, 2]]), 4)
    assert mask.shape == (1, 1, 2, 4)
    assert mask[0, 0].tolist() == [[True, False, False, False], [True, True, True, False]]
