import math

import pytest
import torch

from vartk.models.attention import (
    CacheSpec, ContiguousKVCache, StaticKVCache, attention, caches_nbytes, position_mask,
)


def naive_attention(q, k, v, allowed):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def spec(rows=2, heads=3, head_dim=8, dtype=torch.float32, **lengths) -> CacheSpec:
    return CacheSpec(num_layers=1, rows=rows, num_heads=heads, head_dim=head_dim, dtype=dtype,
                     device=torch.device("cpu"), **lengths)


def test_contiguous_cache_appends_and_attends_like_full_sequence():
    torch.manual_seed(0)
    k, v, q = (torch.randn(2, 3, 7, 8) for _ in range(3))
    cache = ContiguousKVCache(spec(scale_lengths=(1, 3, 3)))
    k_all, v_all = cache.update(k[:, :, :1], v[:, :, :1])
    assert cache.length == 1 and torch.equal(k_all, k[:, :, :1])
    k_all, v_all = cache.update(k[:, :, 1:4], v[:, :, 1:4])
    assert cache.length == 4 and torch.equal(v_all, v[:, :, :4])
    k_all, v_all = cache.update(k[:, :, 4:], v[:, :, 4:])  # the last scale: attended, not stored
    assert cache.length == 4 and cache.k.shape[2] == 4
    out = attention(q[:, :, 4:], k_all, v_all)
    expected = naive_attention(q[:, :, 4:], k, v, torch.ones(3, 7, dtype=torch.bool))
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(RuntimeError, match="KV cache overflow: 5 tokens"):
        cache.update(k[:, :, :1], v[:, :, :1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_is_the_sum_of_the_cache_tensors(dtype):
    """Counted independently: element count x bytes per element of every tensor the cache holds."""
    full = ContiguousKVCache(spec(rows=4, heads=2, head_dim=16, dtype=dtype, scale_lengths=(1, 4, 9)))
    item = 4 if dtype == torch.float32 else 2
    assert full.nbytes() == 2 * 4 * 2 * (1 + 4) * 16 * item == full.peak_nbytes()
    assert full.nbytes() == sum(t.numel() * t.element_size() for t in (full.k, full.v))
    static = StaticKVCache(spec(rows=2, heads=3, head_dim=4, dtype=dtype, max_len=24))
    assert static.nbytes() == 2 * 2 * 3 * 24 * 4 * item
    assert caches_nbytes([full, static]) == full.nbytes() + static.nbytes()
    assert spec(rows=4, heads=2, head_dim=16, dtype=dtype, scale_lengths=(1, 4, 9)).token_nbytes == 2 * 4 * 2 * 16 * item


def test_cache_spec_takes_a_schedule_or_a_length():
    assert spec(scale_lengths=(1, 4, 9)).cached_len == 5 and spec(max_len=24).cached_len == 24
    with pytest.raises(ValueError, match="either scale_lengths .* or max_len"):
        spec()
    with pytest.raises(ValueError, match="either scale_lengths"):
        spec(scale_lengths=(1, 4), max_len=8)
    with pytest.raises(ValueError, match="CacheSpec.rows must be >= 1, got 0"):
        spec(rows=0, max_len=8)


def test_static_cache_ragged_rows_match_causal_attention():
    torch.manual_seed(0)
    B, H, S, D = 2, 2, 8, 4
    k, v, q = (torch.randn(B, H, S, D) for _ in range(3))
    cache = StaticKVCache(spec(rows=B, heads=H, head_dim=D, max_len=S))
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
    with pytest.raises(ValueError, match="writes at absolute positions"):
        cache.update(new_k, new_v)


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
