"""One registry of samplers and KV-cache policies, read by the pipelines, the CLI, the bench and the demo.

A sampler or policy is a dataclass (its fields are its settings) registered under a short name:

    @register_sampler("sjd", family=NEXT_TOKEN)
    @dataclass
    class SJDSampler: ...

It is then reachable as a spec string (`--sampler sjd:window=16`, `from_spec`), saved with a pipeline as
a config dict (`to_config` / `from_config`, strict: an unknown name or setting is an error naming it), listed
in the CLI help and the demo's choices, timed by `vartk bench`, and run by the contract test suite.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

NEXT_SCALE, NEXT_TOKEN = "next-scale", "next-token"
FAMILIES = (NEXT_SCALE, NEXT_TOKEN)
SAMPLER, KV_CACHE = "sampler", "kv-cache"
KINDS = (SAMPLER, KV_CACHE)
KIND_WORDS = {SAMPLER: "sampler", KV_CACHE: "KV-cache policy"}
SPEC_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class Entry:
    """A registered class: its name (and aliases), kind (sampler / kv-cache) and model family."""

    name: str
    cls: type
    kind: str
    family: str
    aliases: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """The first line of the class's docstring."""
        return (self.cls.__doc__ or "").strip().splitlines()[0] if self.cls.__doc__ else ""

    def settings(self) -> list[dataclasses.Field]:
        """The fields a user sets (init fields not starting with '_')."""
        return [f for f in dataclasses.fields(self.cls) if f.init and not f.name.startswith("_")]


REGISTRY: dict[str, Entry] = {}


def register(name: str, kind: str, family: str, aliases: tuple[str, ...] = ()):
    """Class decorator: register a dataclass sampler / KV-cache policy under `name` (lower case). It gets the
    class attributes `family` and `registry_name`."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is unknown; use one of {KINDS}")
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is unknown; use one of {FAMILIES}")

    def decorate(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass (its fields are its saved settings)")
        for key in (name, *aliases):
            if key != key.lower() or not key.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"registry name {key!r} must be lower case letters, digits, '-' or '_'")
            taken = lookup_entry(key)
            if taken is not None and taken.cls is not cls:
                raise ValueError(f"{key!r} is already registered for {taken.cls.__name__}")
        cls.family, cls.registry_name = family, name
        REGISTRY[name] = Entry(name, cls, kind, family, tuple(aliases))
        return cls

    return decorate


def register_sampler(name: str, family: str, aliases: tuple[str, ...] = ()):
    """Register a sampler class for models of `family` (NEXT_SCALE or NEXT_TOKEN)."""
    return register(name, SAMPLER, family, aliases)


def register_kv_cache(name: str, family: str = NEXT_SCALE, aliases: tuple[str, ...] = ()):
    """Register a KV-cache policy class (a `KVCachePolicy`)."""
    return register(name, KV_CACHE, family, aliases)


def unregister(name: str) -> None:
    """Remove a registration (e.g. a throwaway one in a test)."""
    REGISTRY.pop(name, None)


def lookup_entry(name: str) -> Entry | None:
    """The entry registered as `name` or with `name` as an alias (any case), else None."""
    key = name.lower()
    return REGISTRY.get(key) or next((e for e in REGISTRY.values() if key in e.aliases), None)


def entries(kind: str | None = None, family: str | None = None) -> list[Entry]:
    """Registered entries of a kind and family (None: any), in registration order."""
    return [e for e in REGISTRY.values() if kind in (None, e.kind) and family in (None, e.family)]


def entry_of(obj) -> Entry:
    """The entry of a registered sampler / policy object; a ValueError for an unregistered one."""
    entry = lookup_entry(getattr(type(obj), "registry_name", ""))
    if entry is None or entry.cls is not type(obj):
        raise ValueError(f"{type(obj).__name__} is not registered; decorate it with register_sampler / "
                         "register_kv_cache to save it with a pipeline or name it in a spec")
    return entry


def find(name: str, kind: str | None = None, family: str | None = None) -> Entry:
    """The entry named `name` of that kind / family; else one ValueError listing what is available."""
    entry = lookup_entry(name)
    if entry is None or kind not in (None, entry.kind) or family not in (None, entry.family):
        what = f"{family + ' ' if family else ''}{KIND_WORDS.get(kind, 'sampler or KV-cache policy')}"
        raise ValueError(f"unknown {what} {name!r}; available: {[e.name for e in entries(kind, family)]}")
    return entry


def check_family(obj, kind: str, family: str) -> None:
    """Raise ValueError unless `obj` is a `kind` object for `family` models (its `family` attribute)."""
    if obj is None:
        return
    if not callable(getattr(obj, "new_caches" if kind == KV_CACHE else "__call__", None)):
        raise ValueError(f"{KIND_WORDS[kind]} {obj!r} is not a {KIND_WORDS[kind]} (see vartk.samplers)")
    theirs = getattr(obj, "family", None)
    if theirs != family:
        available = [e.name for e in entries(kind, family)]
        raise ValueError(f"{KIND_WORDS[kind]} {type(obj).__name__} is for {theirs or 'unknown'} models, this is a "
                         f"{family} model; its {KIND_WORDS[kind]}s: {available}")


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


def spec_example(entry: Entry) -> str:
    """A spec of `entry` setting its first setting to its default, e.g. "nextscale:more_smooth=false"."""
    first = next(iter(entry.settings()), None)
    if first is None:
        return entry.name
    default = str(first.default).lower() if isinstance(first.default, bool) else first.default
    return f"{entry.name}:{first.name}={default}"


def build(entry: Entry, settings: dict, source: str):
    """`entry.cls(**settings)`, refusing a setting the class does not have (named, with the allowed ones)."""
    allowed = [f.name for f in entry.settings()]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"{source}: {entry.name} has no setting {unknown[0]!r}; its settings: {allowed or 'none'}")
    return entry.cls(**settings)


def from_spec(spec: str, kind: str | None = None, family: str | None = None):
    """'name:key=value,key=value' -> an instance of the registered class `name` (any case), e.g.
    "nextscale:more_smooth=true" (values parsed by `spec_value`); `kind` / `family` allow only those."""
    name, _, arg_text = spec.partition(":")
    entry = find(name, kind, family)
    settings = {}
    for item in filter(None, arg_text.split(",")):
        key, _, value = item.partition("=")
        if not key or not value:
            raise ValueError(f"{item!r} in {spec!r} is not key=value; write e.g. {spec_example(entry)}")
        settings[key] = spec_value(value)
    return build(entry, settings, f"spec {spec!r}")


def settings_of(obj) -> dict:
    """The settings of a registered object: {field: value} of its user-set fields."""
    return {f.name: getattr(obj, f.name) for f in entry_of(obj).settings()}


def to_spec(obj) -> str:
    """The spec string of `obj`, naming the settings that differ from their defaults."""
    entry = entry_of(obj)
    changed = [f"{f.name}={_spec_text(getattr(obj, f.name))}" for f in entry.settings()
               if getattr(obj, f.name) != _default(f)]
    return entry.name + (":" + ",".join(changed) if changed else "")


def to_config(obj) -> dict:
    """{"name": ..., "settings": {...}}: what a pipeline saves in model_index.json (JSON values only)."""
    config = {"name": entry_of(obj).name, "settings": settings_of(obj)}
    try:
        json.dumps(config)
    except TypeError as err:
        raise ValueError(f"{type(obj).__name__}'s settings must be JSON values to be saved: {err}") from None
    return config


def from_config(config, kind: str, family: str | None = None, source: str = "config"):
    """The object a `to_config` dict describes; a ValueError naming an unknown name, key or setting."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: a {KIND_WORDS[kind]} is saved as {{'name': ..., 'settings': {{...}}}}, "
                         f"got {config!r}")
    unknown = sorted(set(config) - {"name", "settings"})
    if unknown or not isinstance(config.get("name"), str) or not isinstance(config.get("settings", {}), dict):
        raise ValueError(f"{source}: unexpected {unknown[0] if unknown else 'content'!r} in {config!r}; a "
                         f"{KIND_WORDS[kind]} is saved as {{'name': ..., 'settings': {{...}}}}")
    return build(find(config["name"], kind, family), config.get("settings", {}), source)


def spec_help(kind: str, family: str | None = None) -> str:
    """One help line listing the registered names of `kind`, e.g. for `--sampler`."""
    listed = "; ".join(f"{e.name} ({e.family}{', lossy' if getattr(e.cls, 'lossy', False) else ''})"
                       for e in entries(kind, family))
    first = next(iter(entries(kind, family)), None)
    example = f", e.g. {spec_example(first)}" if first else ""
    return f"NAME:key=value,... of a registered {KIND_WORDS[kind]}{example}. Available: {listed}"


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _spec_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
