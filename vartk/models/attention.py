"""Attention backends and KV caches shared by the next-scale and next-token transformers.

Attention runs through `torch.nn.functional.scaled_dot_product_attention` by default. xformers'
memory-efficient kernel is used on CUDA when it is installed *and* a tiny real call succeeds
(the published wheels are often built for another torch and fail to load their kernels).

A KV cache is one object per layer, owned by the sampler and passed into the model, so a
compression policy (e.g. ScaleKV, in vartk.samplers) can replace the plain cache without touching the
model. The model knows only the `KVCache` contract below.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CacheSpec:
    """What one sampling call's KV caches must hold; a KV-cache policy makes one cache per layer from it.

    rows counts the classifier-free-guidance rows too ([cond; uncond] is 2B rows). A next-scale model gives
    `scale_lengths` (tokens of each scale, in sampling order); a next-token model gives `max_len` (the
    positions a static cache indexes).
    """

    num_layers: int
    rows: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    scale_lengths: tuple[int, ...] = ()
    max_len: int = 0

    def __post_init__(self):
        for name in ("num_layers", "rows", "num_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"CacheSpec.{name} must be >= 1, got {getattr(self, name)}")
        if bool(self.scale_lengths) == bool(self.max_len):
            raise ValueError("a CacheSpec has either scale_lengths (next-scale) or max_len (next-token), "
                             f"got scale_lengths={self.scale_lengths} and max_len={self.max_len}")

    @property
    def token_nbytes(self) -> int:
        """Bytes that one cached token (its key and its value, every row and head) takes in one layer."""
        return 2 * self.rows * self.num_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def cached_len(self) -> int:
        """Tokens a full cache holds at most: every scale but the last (nothing attends to the last one
        afterwards), or `max_len` positions."""
        return sum(self.scale_lengths[:-1]) if self.scale_lengths else self.max_len


@dataclass
class AttentionView:
    """What a layer's attention saw, handed to `KVCache.observe` when the cache asks for it.

    q: the queries as attention used them [R, H, T, D]; k: the keys attended [R, H, S, D] (what `update`
    returned); scale: the softmax scale (scores = scale * q k^T); q_proj: the raw query projection [R, H, T, D]
    (no bias, normalisation or temperature); weights: softmax attention [R, H, T, S], only for a cache whose
    `wants_attention` is True (attention then runs unfused)."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    q_proj: torch.Tensor
    weights: torch.Tensor | None = None


class ByteCounter:
    """Bytes held now and at most by a group of caches together (the layers of one call share one)."""

    def __init__(self):
        self.held: dict[int, int] = {}
        self.peak = 0

    def record(self, cache: KVCache, nbytes: int) -> None:
        self.held[id(cache)] = nbytes
        self.peak = max(self.peak, sum(self.held.values()))


class KVCache(ABC):
    """One layer's key/value cache, owned by the sampler and passed into the model.

    The sampler calls `begin(step)` when a scale (next-scale) or decode step (next-token) begins; the model
    calls `update` with the step's keys and values and attends over what it returns, then, if `observes`,
    `observe(view)` after attention (with the attention weights if `wants_attention`), so a compressing cache
    can decide what to keep. `nbytes()` / `peak_nbytes()`: bytes its tensors hold now / held at most so far.
    """

    observes: bool = False
    wants_attention: bool = False

    def __init__(self, counter: ByteCounter | None = None):
        self._peak_nbytes = 0
        self.counter = counter or ByteCounter()

    def begin(self, step: int) -> None:
        """A scale or decode step begins; a plain cache needs no notice."""

    @abstractmethod
    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None):
        """Store this step's k, v [R, H, T, D] (at `positions` [R, T] for a position-indexed cache); return the
        keys and values to attend over, each [R, H, S, D]."""

    def observe(self, view: AttentionView) -> None:
        """Hook after attention, called only when `observes` is True."""

    @abstractmethod
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the cache holds now."""

    def nbytes(self) -> int:
        """Bytes held now: the sum of `tensors()`' sizes."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def peak_nbytes(self) -> int:
        """The most bytes held at any point so far (updated by `track_peak`)."""
        return max(self._peak_nbytes, self.nbytes())

    def track_peak(self) -> None:
        """Record what the cache holds now towards `peak_nbytes` (and its counter); call after every change of its
        tensors."""
        self._peak_nbytes = max(self._peak_nbytes, self.nbytes())
        self.counter.record(self, self.nbytes())


class ContiguousKVCache(KVCache):
    """Append-only cache of a next-scale call: each scale's keys/values are written after the earlier scales'.

    It allocates the tokens of every scale but the last: the last scale attends over the cache and its own
    keys (concatenated, not written), since nothing attends to it afterwards."""

    def __init__(self, spec: CacheSpec):
        super().__init__()
        self.total_len = sum(spec.scale_lengths)
        shape = (spec.rows, spec.num_heads, spec.cached_len, spec.head_dim)
        self.k = torch.empty(shape, dtype=spec.dtype, device=spec.device)  # [R, H, S, D]
        self.v = torch.empty_like(self.k)  # [R, H, S, D]
        self.length = 0
        self.track_peak()

    def update(self, k, v, positions=None):
        capacity, end = self.k.shape[2], self.length + k.shape[2]
        if end <= capacity:
            self.k[:, :, self.length : end] = k
            self.v[:, :, self.length : end] = v
            self.length = end
            return self.k[:, :, :end], self.v[:, :, :end]
        if self.length == capacity and end == self.total_len:  # the last scale
            return torch.cat([self.k, k.to(self.k.dtype)], dim=2), torch.cat([self.v, v.to(self.v.dtype)], dim=2)
        raise RuntimeError(f"KV cache overflow: {end} tokens, the schedule has {self.total_len} ({capacity} cached)")

    def tensors(self):
        return self.k, self.v


class StaticKVCache(KVCache):
    """Preallocated cache indexed by absolute position, with a write position per row.

    `update(k, v, positions)` writes row r's T new entries at `positions[r]` ([R, T] int64) and returns the
    whole buffers; attention masks keys by position (see `position_mask`). Rows may hold different lengths
    (ragged), as speculative samplers need."""

    def __init__(self, spec: CacheSpec):
        super().__init__()
        shape = (spec.rows, spec.num_heads, spec.max_len, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.dtype, device=spec.device)  # [R, H, S, D]
        self.v = torch.zeros_like(self.k)  # [R, H, S, D]
        self.track_peak()

    def update(self, k, v, positions=None):
        if positions is None:
            raise ValueError("a StaticKVCache writes at absolute positions: pass positions [rows, T]")
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # [R, H, T, D]
        self.k.scatter_(2, index, k.to(self.k.dtype))
        self.v.scatter_(2, index, v.to(self.v.dtype))
        return self.k, self.v

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def tensors(self):
        return self.k, self.v


def position_mask(positions: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean attention mask [R, 1, T, S]: query at absolute position p sees keys 0..p."""
    key_pos = torch.arange(max_len, device=positions.device)  # [S]
    return (key_pos[None, None, :] <= positions[:, :, None])[:, None]


def caches_nbytes(caches: list[KVCache], peak: bool = False) -> int:
    """Bytes the caches hold now, or the most they held at once (caches that share a `ByteCounter` count their
    simultaneous peak; others their own peaks, summed)."""
    if not peak:
        return sum(c.nbytes() for c in caches)
    counters = {id(c.counter): c.counter for c in caches}
    return sum(counter.peak for counter in counters.values())
