"""The contract every registered sampler and KV-cache policy keeps, checked on tiny models: seeded
determinism, greedy sampling equal to a reference loop of full forwards, the guidance rows, acceptance by the
pipelines, a save / load round trip, and statistics that add up. A new registration is picked up here without
editing this file (`contract_cases` reads the registry)."""
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from references import greedy_next_scale_reference, reference_loop

from vartk.loading import load
from vartk.samplers import KV_CACHE, NEXT_SCALE, NEXT_TOKEN, SAMPLER, NextTokenSampler, registry
from vartk.samplers.kv_cache import FullKVCache

LABELS = [1, 4, 7]


def contract_cases() -> list:
    """(kind, registered name) of every sampler and KV-cache policy."""
    return [pytest.param(entry.kind, entry.name, id=f"{entry.kind}-{entry.name}") for entry in registry.entries()]


def pipeline_for(entry, tiny_pipelines):
    gpt_pipe, var_pipe = tiny_pipelines
    return gpt_pipe if entry.family == NEXT_TOKEN else var_pipe


def call(pipe, entry, obj, seed=0, **kwargs):
    """Sample LABELS with `obj` in its role (sampler or KV-cache policy), output as tensors."""
    role = {"sampler" if entry.kind == SAMPLER else "kv_cache": obj}
    return pipe(LABELS, generator=torch.Generator().manual_seed(seed), output_type="pt", progress=False,
                **role, **kwargs)


def check_determinism(pipe, entry, obj):
    first, again, other = (call(pipe, entry, obj, seed=s).images for s in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def check_greedy_equals_reference(pipe, entry, obj):
    """top-k 1 makes every distribution a point mass: the tokens must be those of a loop of full forwards."""
    labels = torch.tensor(LABELS)
    if entry.family == NEXT_TOKEN:
        sampler = obj if entry.kind == SAMPLER else NextTokenSampler()
        out = sampler(pipe.transformer, labels, guidance_scale=2.0, top_k=1, progress=False, tokenizer=pipe.tokenizer)
        assert torch.equal(out.tokens, reference_loop(pipe.transformer, labels, 2.0))
        return
    if getattr(obj, "lossy", False):  # a lossy policy's greedy tokens may differ from the full model's
        return
    sampler, policy = (obj, None) if entry.kind == SAMPLER else (pipe.sampler, obj)
    out = sampler(pipe.transformer, pipe.tokenizer, labels, guidance_scale=1.5, top_k=1, progress=False,
                  kv_cache=policy)
    expected = greedy_next_scale_reference(pipe.transformer, pipe.tokenizer, labels, 1.5)
    assert all(torch.equal(a, b) for a, b in zip(out.token_maps, expected))


def check_guidance_rows(pipe, entry, obj):
    """Guided calls run [cond; null] rows (2B), unguided ones the B conditional rows."""
    seen = []
    method = "forward_cached" if entry.family == NEXT_TOKEN else "forward_scale"
    real = getattr(pipe.transformer, method)

    def spy(*args):
        labels = args[1] if entry.family == NEXT_TOKEN else args[1]
        if labels is not None:
            seen.append(labels.tolist())
        return real(*args)

    null = pipe.transformer.null_class
    for guidance, expected in ((3.0, LABELS + [null] * 3), (0.0, LABELS)):
        seen.clear()
        with mock.patch.object(pipe.transformer, method, side_effect=spy):
            call(pipe, entry, obj, guidance_scale=guidance)
        assert seen and all(rows == expected for rows in seen)


def check_round_trip(pipe, entry, obj, tmp_path):
    """A pipeline holding the object saves it and loads it back, equal, and samples as it did."""
    attribute = "sampler" if entry.kind == SAMPLER else "kv_cache"
    expected = call(pipe, entry, obj).images
    setattr(pipe, attribute, obj)
    try:
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        setattr(pipe, attribute, None)
    loaded = load(str(tmp_path / "saved"))
    assert getattr(loaded, attribute) == obj and type(getattr(loaded, attribute)) is type(obj)
    role = {attribute: None}
    assert torch.equal(loaded(LABELS, generator=torch.Generator().manual_seed(0), output_type="pt", progress=False,
                              **role).images, expected)


def check_statistics(pipe, entry, obj):
    stats = call(pipe, entry, obj).stats
    tokens = (pipe.transformer.num_tokens if entry.family == NEXT_TOKEN else pipe.transformer.seq_len)
    assert stats.row_tokens.tolist() == [tokens] * len(LABELS)
    assert stats.forwards >= int(stats.row_forwards.max()) >= 1
    torch.testing.assert_close(stats.tokens_per_forward * stats.row_forwards, stats.row_tokens.double())
    assert stats.seconds > 0 and stats.kv_bytes > 0
    if entry.kind == KV_CACHE:
        full = call(pipe, entry, FullKVCache()).stats.kv_bytes
        assert stats.kv_bytes <= full


def run_contract(entry, obj, tiny_pipelines, tmp_path):
    pipe = pipeline_for(entry, tiny_pipelines)
    check_determinism(pipe, entry, obj)
    check_guidance_rows(pipe, entry, obj)
    check_statistics(pipe, entry, obj)
    check_round_trip(pipe, entry, obj, tmp_path)
    check_greedy_equals_reference(pipe, entry, obj)


@pytest.mark.parametrize("kind, name", contract_cases())
def test_the_contract(kind, name, tiny_pipelines, tmp_path):
    entry = registry.find(name, kind)
    run_contract(entry, entry.cls(), tiny_pipelines, tmp_path)


@registry.register_sampler("throwaway", family=NEXT_TOKEN)
@dataclass
class _Throwaway(NextTokenSampler):
    """A throwaway sampler: plain sampling under another name."""


@registry.register_kv_cache("throwaway-cache", family=NEXT_SCALE)
@dataclass
class _ThrowawayCache(FullKVCache):
    """A throwaway KV-cache policy: the full cache under another name."""


registry.unregister("throwaway")  # registered again inside the test, so the suite above does not collect them
registry.unregister("throwaway-cache")


def test_one_registration_reaches_the_cli_the_bench_the_demo_and_this_suite(tiny_pipelines, tmp_path, capsys):
    from vartk.bench import build_parser as bench_parser
    from vartk.cli import build_parser
    from vartk.demo import DemoBackend

    registry.register_sampler("throwaway", family=NEXT_TOKEN)(_Throwaway)
    registry.register_kv_cache("throwaway-cache", family=NEXT_SCALE)(_ThrowawayCache)
    try:
        sample_help = build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
        bench_help = bench_parser().format_help()
        for name in ("throwaway", "throwaway-cache"):
            assert name in " ".join(sample_help.split()) and name in " ".join(bench_help.split())
        gpt_pipe, var_pipe = tiny_pipelines
        backend = DemoBackend.__new__(DemoBackend)
        backend.pipes = {"gpt": gpt_pipe, "var": var_pipe}
        assert "throwaway" in backend.sampler_choices("gpt") and "throwaway" not in backend.sampler_choices("var")
        assert "throwaway-cache" in backend.kv_cache_choices("var")
        cases = [case.values for case in contract_cases()]
        assert (SAMPLER, "throwaway") in cases and (KV_CACHE, "throwaway-cache") in cases
        for name, kind in (("throwaway", SAMPLER), ("throwaway-cache", KV_CACHE)):
            entry = registry.find(name, kind)
            run_contract(entry, entry.cls(), tiny_pipelines, tmp_path / name)
    finally:
        registry.unregister("throwaway")
        registry.unregister("throwaway-cache")
