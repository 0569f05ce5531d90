"""Decoding algorithms and KV-cache policies, passed to pipelines as objects."""
import importlib
import inspect

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


SAMPLER_SPEC_HELP = "NAME:key=value,... of a sampler class in vartk.samplers, e.g. nexttokensampler:temperature=0.9"
KV_CACHE_SPEC_HELP = "NAME:key=value,... of a KV-cache policy class in vartk.samplers, e.g. fullkvcache"


SPEC_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def spec_value(text: str):
    """A spec's value: true / yes / on and false / no / off (any case) -> bool, else int, else float, else the
    string itself."""
    if text.lower() in SPEC_BOOLS:
        return SPEC_BOOLS[text.lower()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def spec_example(name: str, cls) -> str:
    """A spec of class `cls` (written as `name`) setting its first field to its default, e.g.
    "nextscalesampler:more_smooth=false"; just `name` for a class without fields."""
    first = next(iter(inspect.signature(cls).parameters.values()), None)
    if first is None:
        return name
    default = str(first.default).lower() if isinstance(first.default, bool) else first.default
    return f"{name}:{first.name}={default}"


SPEC_KINDS = {"sampler": ("NextScaleSampler", "NextTokenSampler"), "kv-cache": ("FullKVCache",)}


def from_spec(spec: str, kind: str | None = None):
    """'name:key=value,key=value' -> an instance of the sampler / KV-cache class `name` (case-insensitive),
    e.g. "nextscalesampler:more_smooth=true" (values parsed by `spec_value`); `kind` ("sampler" or "kv-cache")
    allows only that kind's classes."""
    names = SPEC_KINDS[kind] if kind else [n for n in __all__ if n[0].isupper()]
    classes = {n.lower(): n for n in names}
    name, _, arg_text = spec.partition(":")
    if name.lower() not in classes:
        what = {"sampler": "sampler", "kv-cache": "KV-cache policy"}.get(kind, "sampler or KV-cache policy")
        raise ValueError(f"unknown {what} {name!r}; available: {sorted(classes)}")
    cls = __getattr__(classes[name.lower()])
    kwargs = {}
    for item in filter(None, arg_text.split(",")):
        key, _, value = item.partition("=")
        if not key or not value:
            raise ValueError(f"{item!r} in {spec!r} is not key=value; write e.g. {spec_example(name, cls)}")
        kwargs[key] = spec_value(value)
    allowed = [p.name for p in inspect.signature(cls).parameters.values()]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting {unknown[0]!r}; its settings: {allowed or 'none'}")
    return cls(**kwargs)
