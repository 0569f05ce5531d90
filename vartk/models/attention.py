"""Attention backends and KV caches shared by the next-scale and next-token transformers.

Attention runs through `torch.nn.functional.scaled_dot_product_attention` by default. xformers'
memory-efficient kernel is used on CUDA when it is installed *and* a tiny real call succeeds
(the published wheels are often built for another torch and fail to load their kernels).

A KV cache is one object per layer, owned by the sampler and passed into the model, so a
compression policy (e.g. ScaleKV) can replace the plain cache without touching the model.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def xformers_available(device_type: str = "cuda") -> bool:
    """True when xformers imports and its memory-efficient attention runs on `device_type`."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 4, 1, 8, device="cuda", dtype=torch.float16)  # [B, L, H, D]
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:
        return False


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention on [B, H, L, D] tensors; returns [B, H, Lq, D].

    `attn_mask` is either boolean (True = attend) or additive, broadcastable to [B, H, Lq, Lk].
    `backend` is "auto" (xformers when usable and the mask is additive or absent, else SDPA),
    "sdpa" or "xformers".
    """
    if backend not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"attention backend {backend!r} is unknown; use 'auto', 'sdpa' or 'xformers'")
    use_xformers = backend == "xformers" or (
        backend == "auto"
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and (attn_mask is None or attn_mask.dtype != torch.bool)
        and xformers_available("cuda")
    )
    if use_xformers:
        import xformers.ops as xops

        bias = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True = attend -> 0, False -> -inf
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                    ~attn_mask, float("-inf"))
            bias = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


class KVCache(ABC):
    """One layer's key/value cache. The model calls `update` with this step's keys and values
    and attends over what it returns; `observe` is called after attention with this step's
    queries so a compressing cache can decide what to keep."""

    @abstractmethod
    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, H, T, D]; return the keys and values to attend over."""

    def observe(self, q: torch.Tensor) -> None:
        """Hook after attention; a plain cache keeps everything."""

    @property
    @abstractmethod
    def length(self) -> int:
        """Sequence slots the cache holds (written so far, or its capacity for a static cache)."""


class ContiguousKVCache(KVCache):
    """Preallocated append-only cache: keys/values of step t are written after those of step t-1.
    Used by next-scale sampling, where every row has the same length."""

    def __init__(self, batch: int, num_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.empty(batch, num_heads, max_len, head_dim, dtype=dtype, device=device)  # [B, H, S, D]
        self.v = torch.empty_like(self.k)  # [B, H, S, D]
        self._length = 0

    def update(self, k, v):
        end = self._length + k.shape[2]
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.k.shape[2]}")
        self.k[:, :, self._length : end] = k
        self.v[:, :, self._length : end] = v
        self._length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    @property
    def length(self) -> int:
        return self._length


class StaticKVCache(KVCache):
    """Preallocated cache indexed by absolute position, with a write position per row.

    `update(k, v, positions)` writes row b's T new entries at `positions[b]` ([B, T] int64) and
    returns the whole buffers; attention masks keys by position (see `position_mask`). Rows may
    hold different lengths (ragged), which speculative samplers need."""

    def __init__(self, batch: int, num_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, num_heads, max_len, head_dim, dtype=dtype, device=device)  # [B, H, S, D]
        self.v = torch.zeros_like(self.k)  # [B, H, S, D]

    def update(self, k, v, positions: torch.Tensor):
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # [B, H, T, D]
        self.k.scatter_(2, index, k.to(self.k.dtype))
        self.v.scatter_(2, index, v.to(self.v.dtype))
        return self.k, self.v

    @property
    def length(self) -> int:
        return self.k.shape[2]


def position_mask(positions: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, S]: query at absolute position p sees keys 0..p."""
    key_pos = torch.arange(max_len, device=positions.device)  # [S]
    return (key_pos[None, None, :] <= positions[:, :, None])[:, None]


class KVCachePolicy(ABC):
    """Makes the per-layer caches for one sampling call. Subclass to compress the cache."""

    @abstractmethod
    def new_caches(self, num_layers, batch, num_heads, max_len, head_dim, dtype, device) -> list[KVCache]:
        """One cache per layer for a call sampling `batch` rows of at most `max_len` tokens."""


class FullKVCache(KVCachePolicy):
    """Keep every key and value (the official behaviour)."""

    def new_caches(self, num_layers, batch, num_heads, max_len, head_dim, dtype, device):
        return [ContiguousKVCache(batch, num_heads, max_len, head_dim, dtype, device) for _ in range(num_layers)]
