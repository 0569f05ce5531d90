import numpy as np
import pytest
import torch

from references import reference_filter, reference_probs
from scipy import stats

from vartk.samplers.sampling import (
    cfg_next_scale, cfg_next_token, check_sampling_args, filter_logits, probs_from_logits, sample_from_logits,
    var_guidance_ramp,
)


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


SETTINGS = [  # top_k, top_p, temperature
    (0, 1.0, 1.0), (5, 1.0, 1.0), (0, 0.5, 1.0), (7, 0.8, 0.7), (0, 0.9, 2.0), (1, 1.0, 1.0), (0, 1.0, 0.0),
    (3, 0.999, 1e-7),
]


@pytest.mark.parametrize("rule", ["var", "llamagen"])
@pytest.mark.parametrize("top_k, top_p, temperature", SETTINGS)
def test_probs_from_logits_matches_an_independent_computation(top_k, top_p, temperature, rule):
    logits = torch.randn(12, 40, generator=torch.Generator().manual_seed(top_k + int(10 * top_p)), dtype=torch.float64)
    probs = probs_from_logits(logits, top_k, top_p, temperature, rule)
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    expected = np.stack([reference_probs(row, top_k, top_p, temperature, rule) for row in logits.numpy()])
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("probs, top_p, kept_var, kept_llamagen", [
    ([0.5, 0.25, 0.1875, 0.0625], 0.75, 2, 3), ([0.5, 0.3125, 0.1875], 0.5, 1, 2), ([0.5, 0.25, 0.25], 0.5, 1, 2),
])
def test_probs_from_logits_follows_each_top_p_rule_at_the_boundary(probs, top_p, kept_var, kept_llamagen):
    """At the exact boundary the two official rules keep different sets, and the distribution renormalises
    over exactly the kept set (binary-exact probabilities, no ties)."""
    logits = torch.tensor([probs], dtype=torch.float64).log()
    for rule, kept in (("var", kept_var), ("llamagen", kept_llamagen)):
        out = probs_from_logits(logits, top_p=top_p, top_p_rule=rule)[0]
        assert (out > 0).sum() == kept
        np.testing.assert_allclose(out.numpy(), reference_probs(logits[0].numpy(), 0, top_p, 1.0, rule), atol=1e-7)


@pytest.mark.parametrize("top_k, top_p, temperature, rule", [
    (0, 1.0, 1.0, "var"), (6, 0.9, 0.8, "llamagen"), (0, 0.7, 1.5, "var"), (4, 1.0, 2.0, "llamagen"),
])
def test_sample_from_logits_draws_from_exactly_probs_from_logits(top_k, top_p, temperature, rule):
    """Chi-square goodness of fit of 40000 draws against `probs_from_logits` (p > 0.001), and the test has power:
    the same draws are far from the unfiltered softmax whenever filtering removed mass."""
    logits = torch.randn(10, generator=torch.Generator().manual_seed(top_k)) * 1.5  # [V]
    probs = probs_from_logits(logits, top_k, top_p, temperature, rule).double()
    draws = sample_from_logits(logits.expand(40000, -1), top_k, top_p, temperature,
                               torch.Generator().manual_seed(1), top_p_rule=rule)
    counts = torch.bincount(draws, minlength=10).double()
    assert counts[probs == 0].sum() == 0  # nothing outside the support
    support = probs > 0
    expected = probs[support] / probs[support].sum() * 40000
    assert stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue > 0.001
    unfiltered = torch.softmax(logits.double() / temperature, 0)
    if not torch.allclose(unfiltered, probs, atol=1e-3):
        assert stats.chisquare(counts.numpy(), (unfiltered / unfiltered.sum() * 40000).numpy()).pvalue < 1e-6


def test_greedy_probs_are_a_point_mass_and_greedy_draws_take_it():
    logits = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    for kwargs in (dict(temperature=0.0), dict(top_k=1)):
        probs = probs_from_logits(logits, **kwargs)
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 9).float())
        assert torch.equal(sample_from_logits(logits, **kwargs), logits.argmax(-1))


def test_classifier_free_guidance_of_both_families():
    """LlamaGen mixes u + s (c - u); VAR (1 + t) c - t u with t ramping from 0 to the scale over the scales."""
    cond, uncond = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    both = torch.stack([cond, uncond]).view(6, 5)  # [cond rows; uncond rows]
    torch.testing.assert_close(cfg_next_token(both, 2.5), uncond + 2.5 * (cond - uncond))
    torch.testing.assert_close(cfg_next_token(both, 1.0), cond)
    torch.testing.assert_close(cfg_next_scale(both, 0.75), 1.75 * cond - 0.75 * uncond)
    torch.testing.assert_close(cfg_next_scale(both, 0.0), cond)
    assert [var_guidance_ramp(1.5, k, 4) for k in range(4)] == [0.0, 0.5, 1.0, 1.5]
    assert var_guidance_ramp(2.0, 0, 1) == 0.0
