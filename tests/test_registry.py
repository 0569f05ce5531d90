from dataclasses import dataclass

import pytest

from vartk.samplers import FullKVCache, NextScaleSampler, NextTokenSampler
from vartk.samplers import registry
from vartk.samplers.registry import (
    KV_CACHE, NEXT_SCALE, NEXT_TOKEN, SAMPLER, check_family, from_config, from_spec, to_config, to_spec,
)


def test_specs_build_the_named_class_with_typed_values():
    sampler = from_spec("NextToken:temperature=0.5,cfg_interval=3,cuda_graph=false")
    assert sampler == NextTokenSampler(temperature=0.5, cfg_interval=3, cuda_graph=False)
    assert sampler.cuda_graph is False and isinstance(sampler.cfg_interval, int)
    assert from_spec("nexttokensampler:cuda_graph=auto").cuda_graph == "auto"  # the class name is an alias
    assert from_spec("nextscale:more_smooth=TRUE") == NextScaleSampler(more_smooth=True)
    assert from_spec("nextscalesampler:more_smooth=no") == NextScaleSampler(more_smooth=False)
    assert from_spec("nextscale:more_smooth=On") == NextScaleSampler(more_smooth=True)
    assert isinstance(from_spec("full"), FullKVCache) and isinstance(from_spec("fullkvcache"), FullKVCache)


@pytest.mark.parametrize("spec, kind, message", [
    ("nexttoken:temperature", None, r"'temperature' in 'nexttoken:temperature' is not key=value; write e.g. "
                                    r"nexttoken:temperature=1.0"),
    ("nextscale:smooth=true", None, r"nextscale has no setting 'smooth'; its settings: \['more_smooth', 'guidance_schedule'\]"),
    ("nextscale:more_smooth=maybe", None, "more_smooth must be True or False, got 'maybe'"),
    ("nosuch:window=16", None, r"unknown sampler or KV-cache policy 'nosuch'; available: \[.*'full'"),
    ("nextscale", KV_CACHE, r"unknown KV-cache policy 'nextscale'; available: \['full'"),
    ("full", SAMPLER, r"unknown sampler 'full'; available: \['nexttoken'"),
])
def test_bad_specs_name_the_problem(spec, kind, message):
    with pytest.raises(ValueError, match=message):
        from_spec(spec, kind)


def test_family_filters_the_choices():
    with pytest.raises(ValueError, match=r"unknown next-scale sampler 'nexttoken'; available: \['nextscale'"):
        from_spec("nexttoken", SAMPLER, NEXT_SCALE)
    assert [e.name for e in registry.entries(SAMPLER, NEXT_TOKEN)][0] == "nexttoken"
    check_family(NextTokenSampler(), SAMPLER, NEXT_TOKEN)
    with pytest.raises(ValueError, match="sampler NextTokenSampler is for next-token models, this is a next-scale "
                                         r"model; its samplers: \['nextscale'"):
        check_family(NextTokenSampler(), SAMPLER, NEXT_SCALE)
    with pytest.raises(ValueError, match="KV-cache policy 'full' is not a KV-cache policy"):
        check_family("full", KV_CACHE, NEXT_SCALE)


def test_config_round_trip_is_strict():
    sampler = NextTokenSampler(temperature=0.7, cfg_interval=5)
    config = to_config(sampler)
    assert config == {"name": "nexttoken", "settings": {"temperature": 0.7, "cfg_interval": 5, "cuda_graph": "auto"}}
    assert from_config(config, SAMPLER, NEXT_TOKEN) == sampler
    assert to_spec(sampler) == "nexttoken:temperature=0.7,cfg_interval=5" and to_spec(FullKVCache()) == "full"
    saved_before_a_setting_existed = {"name": "nextscale", "settings": {"more_smooth": True}}
    assert from_config(saved_before_a_setting_existed, SAMPLER) == NextScaleSampler(more_smooth=True,
                                                                                   guidance_schedule="linear")
    with pytest.raises(ValueError, match=r"model_index.json: nexttoken has no setting 'window'"):
        from_config({"name": "nexttoken", "settings": {"window": 3}}, SAMPLER, source="model_index.json")
    with pytest.raises(ValueError, match="unexpected 'extra'"):
        from_config({"name": "nexttoken", "settings": {}, "extra": 1}, SAMPLER)
    with pytest.raises(ValueError, match="unknown sampler 'sjd2'"):
        from_config({"name": "sjd2"}, SAMPLER)
    with pytest.raises(ValueError, match="saved as"):
        from_config("nexttoken", SAMPLER)


def test_a_registered_class_must_be_a_dataclass_with_a_free_name():
    class NotADataclass:
        pass

    with pytest.raises(TypeError, match="NotADataclass must be a dataclass"):
        registry.register_sampler("plain", NEXT_TOKEN)(NotADataclass)

    @dataclass
    class Other:
        pass

    with pytest.raises(ValueError, match="'nexttoken' is already registered for NextTokenSampler"):
        registry.register_sampler("nexttoken", NEXT_TOKEN)(Other)
    with pytest.raises(ValueError, match="must be lower case"):
        registry.register_sampler("Other", NEXT_TOKEN)(Other)
    with pytest.raises(ValueError, match="Other is not registered"):
        to_config(Other())
