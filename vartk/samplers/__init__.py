"""Decoding algorithms and KV-cache policies, passed to pipelines as objects."""
import importlib

_EXPORTS = {
    "FullKVCache": "..models.attention",
    "NextScaleSampler": ".next_scale",
    "NextTokenSampler": ".next_token",
    "edit_next_scale": ".next_scale",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vartk.samplers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
