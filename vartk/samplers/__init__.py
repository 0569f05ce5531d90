"""Decoding algorithms and KV-cache policies, passed to pipelines as objects.

Every sampler and policy is registered (`registry`) under a short name, so the CLI, the bench, the demo and
saved pipelines name it as a spec, e.g. "nexttoken:temperature=0.9" or "full". Importing this package imports
every built-in sampler module, which registers them.
"""
from .contract import NextScaleOutput, NextScaleSampling, NextTokenOutput, NextTokenSampling, SamplerStats
from .kv_cache import FullKVCache, KVCachePolicy
from .next_scale import NextScaleSampler, edit_next_scale
from .next_token import NextTokenSampler
from .speculative import GSDSampler, SJDSampler
from .scalekv import CoarseRecentKVCache, ScaleKVCache, SlidingWindowKVCache
from .registry import (
    KV_CACHE, NEXT_SCALE, NEXT_TOKEN, SAMPLER, entries, from_config, from_spec, register_kv_cache, register_sampler,
    spec_help, to_config, to_spec, unregister,
)

__all__ = [
    "CoarseRecentKVCache", "FullKVCache", "KVCachePolicy", "KV_CACHE", "NEXT_SCALE", "NEXT_TOKEN", "NextScaleOutput", "NextScaleSampler",
    "NextScaleSampling", "NextTokenOutput", "NextTokenSampler", "NextTokenSampling", "GSDSampler", "SAMPLER", "SJDSampler", "SamplerStats", "ScaleKVCache", "SlidingWindowKVCache",
    "edit_next_scale", "entries", "from_config", "from_spec", "register_kv_cache", "register_sampler", "spec_help",
    "to_config", "to_spec", "unregister",
]
