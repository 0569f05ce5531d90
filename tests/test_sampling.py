import numpy as np
import pytest
import torch

from vartk.samplers.sampling import check_sampling_args, filter_logits, sample_from_logits


def reference_filter(row: np.ndarray, top_k: int, top_p: float, rule: str = "var") -> np.ndarray:
    """Plain-Python top-k then top-p over one row of logits: the set of kept indices. A token is kept while
    the mass ranked above it is below top_p (VAR) or at most top_p (LlamaGen)."""
    keep = np.ones_like(row, dtype=bool)
    if 0 < top_k < len(row):
        kth = np.sort(row)[::-1][top_k - 1]
        keep &= row >= kth
    if top_p < 1.0:
        masked = np.where(keep, row, -np.inf)
        probs = np.exp(masked - masked.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        mass_above = 0.0
        for idx in order:
            if mass_above > top_p or (rule == "var" and mass_above == top_p):
                keep[idx] = False
            mass_above += probs[idx]
    return keep


@pytest.mark.parametrize("rule", ["var", "llamagen"])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (7, 0.8), (1, 0.3), (0, 0.999)])
def test_filter_matches_reference(top_k, top_p, rule):
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(top_k))
    kept = torch.isfinite(filter_logits(logits, top_k, top_p, top_p_rule=rule)).numpy()
    for row, kept_row in zip(logits.double().numpy(), kept):
        np.testing.assert_array_equal(kept_row, reference_filter(row, top_k, top_p, rule))


@pytest.mark.parametrize("probs, top_p, kept_var, kept_llamagen", [
    ([0.5, 0.25, 0.25], 0.75, 2, 3),  # the third token has exactly 0.75 ranked above it
    ([0.25] * 4, 0.5, 2, 3),
    ([0.5, 0.5], 0.5, 1, 2),
    ([0.75, 0.125, 0.125], 0.5, 1, 1),
])
def test_the_two_official_top_p_rules_differ_at_the_boundary(probs, top_p, kept_var, kept_llamagen):
    """VAR keeps a token while less than top_p is ranked above it, LlamaGen while at most top_p is (values
    exact in binary, so the boundary is hit exactly)."""
    logits = torch.tensor([probs]).log()
    assert torch.isfinite(filter_logits(logits, top_p=top_p, top_p_rule="var")).sum() == kept_var
    assert torch.isfinite(filter_logits(logits, top_p=top_p, top_p_rule="llamagen")).sum() == kept_llamagen
    with pytest.raises(ValueError, match="top_p_rule 'hf' is unknown"):
        filter_logits(logits, top_p=top_p, top_p_rule="hf")


def test_top_k_keeps_ties_and_top_p_keeps_argmax():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, True, False]]
    peaked = torch.tensor([[10.0, 0.0, 0.0]])
    assert torch.isfinite(filter_logits(peaked, top_p=1e-6)).tolist() == [[True, False, False]]
    flat = torch.zeros(1, 3)  # in float32 1 - 1e-8 == 1: every cumulative mass is "below", yet the argmax stays
    assert torch.isfinite(filter_logits(flat, top_p=1e-8)).sum() == 1


def test_sampling_follows_generator_and_greedy():
    logits = torch.randn(4, 3, 20)
    a = sample_from_logits(logits, generator=torch.Generator().manual_seed(1))
    b = sample_from_logits(logits, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 3) and torch.equal(a, b)
    assert torch.equal(sample_from_logits(logits, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_from_logits(logits, temperature=0), logits.argmax(-1))


def draw_frequencies(row, **kwargs) -> torch.Tensor:
    """How often each token of one row of logits is drawn, over 20000 draws."""
    draws = sample_from_logits(torch.tensor([row]).expand(20000, len(row)), generator=torch.Generator().manual_seed(0),
                               **kwargs)
    return torch.bincount(draws, minlength=len(row)).float() / draws.numel()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_distribution_matches_softmax(temperature):
    freq = draw_frequencies([0.0, 1.0, 2.0], temperature=temperature)
    assert torch.allclose(freq, torch.softmax(torch.tensor([0.0, 1.0, 2.0]) / temperature, 0), atol=0.02)


def test_temperature_is_applied_before_top_p():
    row, temperature, top_p = np.array([0.0, 1.0, 2.0]), 2.0, 0.6
    keep = reference_filter(row / temperature, 0, top_p)
    assert keep.sum() > reference_filter(row, 0, top_p).sum()  # T = 2 lets a token through that T = 1 filters
    probs = np.where(keep, np.exp(row / temperature), 0.0)
    freq = draw_frequencies(row.tolist(), top_p=top_p, temperature=temperature)
    assert torch.allclose(freq, torch.tensor(probs / probs.sum(), dtype=torch.float32), atol=0.02)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=-1, top_p=1.0), "top_k"), (dict(top_k=1.5, top_p=1.0), "top_k"),
    (dict(top_k=0, top_p=0.0), "top_p"), (dict(top_k=0, top_p=1.2), "top_p"),
    (dict(top_k=0, top_p=1.0, temperature=-1), "temperature"),
    (dict(top_k=0, top_p=float("nan")), "top_p"),
    (dict(top_k=0, top_p="0.9"), r"top_p must be in \(0, 1\] \(1 = no top-p filtering\), got '0.9'"),
    (dict(top_k=0, top_p=1.0, temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
])
def test_bad_sampling_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_sampling_args(**kwargs)


def test_numpy_integers_are_integers():
    check_sampling_args(top_k=np.int64(5), top_p=np.float32(0.9), temperature=np.float64(1.0))


def test_sampler_specs_build_the_named_class_with_typed_values():
    from vartk.samplers import FullKVCache, NextScaleSampler, NextTokenSampler, from_spec

    sampler = from_spec("NextTokenSampler:temperature=0.5,cfg_interval=3,cuda_graph=false")
    assert sampler == NextTokenSampler(temperature=0.5, cfg_interval=3, cuda_graph=False)
    assert sampler.cuda_graph is False and isinstance(sampler.cfg_interval, int)
    assert from_spec("nexttokensampler:cuda_graph=auto").cuda_graph == "auto"
    assert from_spec("nextscalesampler:more_smooth=TRUE") == NextScaleSampler(more_smooth=True)
    assert from_spec("nextscalesampler:more_smooth=no") == NextScaleSampler(more_smooth=False)
    assert from_spec("nextscalesampler:more_smooth=On") == NextScaleSampler(more_smooth=True)
    with pytest.raises(ValueError, match=r"'temperature' in 'nexttokensampler:temperature' is not key=value"):
        from_spec("nexttokensampler:temperature")
    assert isinstance(from_spec("fullkvcache"), FullKVCache)
    with pytest.raises(ValueError, match=r"NextScaleSampler has no setting 'smooth'; its settings: \['more_smooth'\]"):
        from_spec("nextscalesampler:smooth=true")
    with pytest.raises(ValueError, match="more_smooth must be True or False, got 'maybe'"):
        from_spec("nextscalesampler:more_smooth=maybe")
    with pytest.raises(ValueError, match=r"'gsd'.*available: \['fullkvcache', 'nextscalesampler', 'nexttokensampler'\]"):
        from_spec("gsd:window=16")
    with pytest.raises(ValueError, match=r"unknown KV-cache policy 'nextscalesampler'; available: \['fullkvcache'\]"):
        from_spec("nextscalesampler", kind="kv-cache")
    with pytest.raises(ValueError, match=r"unknown sampler 'fullkvcache'; available: \['nextscalesampler', "):
        from_spec("fullkvcache", kind="sampler")


def test_fp16_logits_with_a_tiny_temperature_draw_the_argmax():
    """70 / 1e-3 overflows float16 (max 65504): the logits are divided in float32."""
    logits = torch.tensor([[69.0, 70.0, 0.0], [0.0, -1.0, 68.0]], dtype=torch.float16).repeat(50, 1)
    tokens = sample_from_logits(logits, temperature=1e-3, generator=torch.Generator().manual_seed(0))
    assert tokens.tolist() == [1, 2] * 50


def test_var_top_p_drops_a_token_whose_cumulative_mass_equals_one_minus_top_p():
    """VAR's rule: ascending cumulative masses 0.25, 0.5, 1.0; the first two are <= 1 - 0.5, so only token 0
    stays (probabilities and sums exact in binary)."""
    from vartk.samplers.sampling import top_p_drop_var

    logits = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()
    assert top_p_drop_var(logits, 0.5).tolist() == [[False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5, top_p_rule="var")).tolist() == [[True, False, False]]
