"""KV-cache policies: a policy makes the per-layer caches of one sampling call from a `CacheSpec`.

The caches follow the `vartk.models.attention.KVCache` contract: the sampler calls `begin(scale)`, the model
calls `update` and attends over what it returns, and `observe` after attention when the cache asks for it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from ..models.attention import CacheSpec, ContiguousKVCache, KVCache
from .registry import NEXT_SCALE, register_kv_cache


class KVCachePolicy(ABC):
    """Makes the per-layer caches of a sampling call. Subclass it (as a dataclass whose fields are its
    settings) and register it with `register_kv_cache` to compress the cache."""

    family = NEXT_SCALE
    lossy: ClassVar[bool] = False  # True: the samples may differ from the full cache's

    @abstractmethod
    def new_caches(self, spec: CacheSpec) -> list[KVCache]:
        """One cache per layer (`spec.num_layers`) for a call of `spec.rows` rows."""


@register_kv_cache("full", aliases=("fullkvcache",))
@dataclass
class FullKVCache(KVCachePolicy):
    """Keep every key and value (the official behaviour)."""

    def new_caches(self, spec: CacheSpec) -> list[KVCache]:
        return [ContiguousKVCache(spec) for _ in range(spec.num_layers)]
