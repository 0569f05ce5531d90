"""Speculative samplers: exactness against the model's exact token distribution, greedy equality, row
independence, statistics and settings."""
import itertools

import numpy as np
import pytest
import torch
from references import reference_loop, reference_probs
from scipy import stats
from tiny_models import NUM_CLASSES, tiny_gpt

from vartk.models.gpt import GPTTransformer
from vartk.samplers import NextTokenSampler, SJDSampler
from vartk.samplers.speculative import GSDSampler
from vartk.tokenizers.msvq import MultiScaleVQVAE

VOCAB, GRID, SAMPLES = 4, 2, 10000  # samples per class; two classes
SETTINGS = dict(guidance_scale=2.0, top_k=3)  # CFG and a top-k that removes a token at most positions
LABELS = (3, 8)


@pytest.fixture(scope="module")
def toy():
    """A GPT over 4 codes on a 2x2 grid (256 possible images), weights large enough for uneven distributions,
    and the exact distribution of each test class."""
    torch.manual_seed(0)
    model = GPTTransformer(dim=32, n_layer=1, n_head=2, vocab_size=VOCAB, num_classes=NUM_CLASSES, grid_size=GRID)
    model.init_weights(std=0.5, randomize_output=True)
    model.eval()
    return model, {label: exact_joint(model, label) for label in LABELS}


def exact_joint(model, label) -> np.ndarray:
    """The probability of each of the V^N images under CFG + top-k, from teacher-forced forwards of every
    sequence and the reference filter: float64 [V^N], indexed by the base-V number of the image."""
    sequences = torch.tensor(list(itertools.product(range(VOCAB), repeat=GRID * GRID)))  # [V^N, N]
    with torch.no_grad():
        cond = model(torch.full((len(sequences),), label), sequences[:, :-1])  # [V^N, N, V]
        uncond = model(torch.full((len(sequences),), NUM_CLASSES), sequences[:, :-1])
    guided = (uncond + SETTINGS["guidance_scale"] * (cond - uncond)).double().numpy()
    probs = np.array([[reference_probs(row, SETTINGS["top_k"], 1.0, 1.0, "llamagen") for row in seq] for seq in guided])
    return np.prod(np.take_along_axis(probs, sequences.numpy()[..., None], axis=-1)[..., 0], axis=1)


def image_index(tokens: torch.Tensor) -> np.ndarray:
    """Tokens [B, N] -> the base-V number of each image [B]."""
    return (tokens.numpy() * VOCAB ** np.arange(GRID * GRID)[::-1]).sum(axis=1)


def sample(sampler, model, seed=0):
    labels = torch.tensor(LABELS).repeat(SAMPLES)  # [2 * SAMPLES], rows of both classes interleaved
    return sampler(model, labels, **SETTINGS, generator=torch.Generator().manual_seed(seed), progress=False)


def fit_p_values(tokens: torch.Tensor, joints: dict) -> list[float]:
    """Chi-square goodness of fit of the samples of each class against its exact distribution: the joint of all
    four positions (cells with expected count < 5 pooled) and each position's marginal."""
    p_values = []
    for offset, label in enumerate(LABELS):
        joint = joints[label]  # [V^N]
        counts = np.bincount(image_index(tokens[offset::2]), minlength=len(joint))
        expected = joint * SAMPLES
        small = expected < 5
        observed = np.append(counts[~small], counts[small].sum())
        p_values.append(stats.chisquare(observed, np.append(expected[~small], expected[small].sum())).pvalue)
        per_position = joint.reshape((VOCAB,) * (GRID * GRID))
        for position in range(GRID * GRID):
            marginal = per_position.sum(axis=tuple(a for a in range(GRID * GRID) if a != position))
            seen = np.bincount(tokens[offset::2, position].numpy(), minlength=VOCAB)
            support = marginal > 0
            assert seen[~support].sum() == 0  # nothing outside the top-k support
            p_values.append(stats.chisquare(seen[support], marginal[support] * SAMPLES).pvalue)
    return p_values


class AcceptsEverything(SJDSampler):
    """A broken SJD that accepts every draft it tests."""

    def acceptance_ratio(self, p, q, drafts):
        return torch.ones_like(drafts, dtype=torch.float32)


class ProposalIsTheTarget(SJDSampler):
    """A broken SJD that tests a recycled draft against the current p where the p it was drawn from belongs
    (so every recycled draft passes)."""

    def acceptance_ratio(self, p, q, drafts):
        recycled = q.amax(dim=-1, keepdim=True) < 1  # [B, J, 1]: not a point mass
        return super().acceptance_ratio(p, torch.where(recycled, p, q), drafts)


@pytest.mark.parametrize("sampler", [
    NextTokenSampler(), SJDSampler(window=3), SJDSampler(window=4, coupled=True), SJDSampler(window=3, init="left"),
    GSDSampler(window=3, group=1, embedding="transformer"),
], ids=["ar", "sjd", "sjd-coupled", "sjd-left", "gsd-group-1"])
def test_lossless_samplers_follow_the_exact_distribution(toy, sampler):
    model, joints = toy
    out = sample(sampler, model)
    assert min(fit_p_values(out.tokens, joints)) > 0.01
    if not isinstance(sampler, NextTokenSampler):  # the test ran with several tokens per forward, rows ragged
        per_forward = out.stats.tokens_per_forward
        assert per_forward.mean() > 1.2 and per_forward.min() < per_forward.max()


@pytest.mark.parametrize("sampler", [
    AcceptsEverything(window=3), ProposalIsTheTarget(window=4),
    GSDSampler(window=4, embedding="transformer"),
], ids=["accepts-everything", "proposal-is-the-target", "gsd-default-group"])
def test_the_exactness_test_has_power(toy, sampler):
    """Samplers that do not follow the model (two broken SJDs, and GSD, lossy by design) fail the same test."""
    model, joints = toy
    assert min(fit_p_values(sample(sampler, model).tokens, joints)) < 1e-4


@pytest.mark.parametrize("init", ["random", "left", "above"])
@pytest.mark.parametrize("coupled", [False, True])
def test_greedy_speculative_tokens_equal_plain_greedy(gpt_model, init, coupled):
    labels = torch.tensor([1, 4, 7])
    expected = reference_loop(gpt_model, labels, 2.0)
    out = SJDSampler(window=5, init=init, coupled=coupled, temperature=0)(gpt_model, labels, guidance_scale=2.0,
                                                                         progress=False)
    assert torch.equal(out.tokens, expected)
    plain = NextTokenSampler(temperature=0)(gpt_model, labels, guidance_scale=2.0, progress=False)
    assert torch.equal(out.tokens, plain.tokens)


def test_a_rows_tokens_do_not_depend_on_the_other_rows(gpt_model):
    """Row 0 keeps its tokens when row 1 changes class (and so accepts differently)."""
    sampler = SJDSampler(window=6)
    runs = [sampler(gpt_model, [2, other], guidance_scale=2.0, generator=torch.Generator().manual_seed(9),
                    progress=False) for other in (5, 8)]
    assert torch.equal(runs[0].tokens[0], runs[1].tokens[0])
    assert not torch.equal(runs[0].tokens[1], runs[1].tokens[1])


def test_statistics_add_up(gpt_model):
    labels = torch.tensor([0, 3, 3, 9])
    out = SJDSampler(window=5)(gpt_model, labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(1),
                               progress=False)
    stats_ = out.stats
    assert stats_.row_tokens.tolist() == [16] * 4
    assert stats_.forwards == int(stats_.row_forwards.max())  # the batch runs until its slowest row is done
    verify_steps = stats_.row_forwards - 1  # every forward after the prefill verifies a window per active row
    assert stats_.accepted_lengths.sum() == verify_steps.sum()
    # each verify step commits its accepted drafts + 1 token; the prefill commits one
    accepted_total = (stats_.accepted_lengths * torch.arange(5)).sum()
    assert accepted_total + verify_steps.sum() + len(labels) == stats_.row_tokens.sum()
    assert stats_.drafts_accepted.sum() == accepted_total
    assert (stats_.drafts_accepted <= stats_.drafts_tested).all()


def test_the_window_is_clamped_to_the_image(gpt_model):
    out = SJDSampler(window=100, temperature=0)(gpt_model, [1], guidance_scale=2.0, progress=False)
    assert torch.equal(out.tokens, reference_loop(gpt_model, torch.tensor([1]), 2.0))
    assert len(out.stats.accepted_lengths) == 16


@pytest.mark.parametrize("sampler, settings, message", [
    (SJDSampler, dict(window=0), "window must be an integer >= 1 .*got 0"),
    (SJDSampler, dict(window=2.5), "window must be an integer >= 1"),
    (SJDSampler, dict(init="diagonal"), r"init must be one of \('random', 'left', 'above'\), got 'diagonal'"),
    (SJDSampler, dict(coupled="yes"), "coupled must be True or False"),
    (SJDSampler, dict(temperature=-1), "temperature must be a finite number >= 0"),
    (GSDSampler, dict(window=0), "window must be an integer >= 1 .*got 0"),
    (GSDSampler, dict(group=0), "group must be an integer >= 1"),
    (GSDSampler, dict(prob_delta=-0.1), "prob_delta must be a finite number >= 0"),
    (GSDSampler, dict(max_distance=-1.0), "max_distance must be a number >= 0 .*got -1.0"),
    (GSDSampler, dict(embedding="pixels"), r"embedding must be one of \('codebook', 'transformer'\), got 'pixels'"),
    (GSDSampler, dict(group_split="left"), "group_split must be one of"),
])
def test_bad_settings_fail_when_made(sampler, settings, message):
    with pytest.raises(ValueError, match=message):
        sampler(**settings)


def test_gsd_default_distance_is_the_codebooks_median_and_no_filter_for_the_transformer(gpt_model):
    """The default thresholds against a plain pairwise computation of the codebook's squared distances."""
    tokenizer = MultiScaleVQVAE(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8,
                                vocab_size=gpt_model.config.vocab_size, patch_nums=(4,), norm_groups=8)
    codes = tokenizer.code_vectors().double().numpy()  # [V, D]
    pairs = [((a - b) ** 2).sum() for i, a in enumerate(codes) for j, b in enumerate(codes) if i != j]
    codebook = GSDSampler()
    codebook.prepare(gpt_model, tokenizer)
    assert codebook._threshold == pytest.approx(np.median(pairs), rel=1e-4)
    transformer = GSDSampler(embedding="transformer")
    transformer.prepare(gpt_model, None)
    assert transformer._threshold == float("inf")
    chosen = GSDSampler(embedding="transformer", max_distance=0.25)
    chosen.prepare(gpt_model, None)
    assert chosen._threshold == 0.25


def test_a_gsd_embedding_the_model_does_not_have_is_refused(gpt_model):
    with pytest.raises(ValueError, match="GSD's embedding 'codebook' needs the tokenizer's codebook: pass tokenizer="):
        GSDSampler()(gpt_model, [1], progress=False)
    small = MultiScaleVQVAE(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32, patch_nums=(4,),
                            norm_groups=8)
    with pytest.raises(ValueError, match="the codebook embedding has 32 rows, the model 64 tokens"):
        GSDSampler()(gpt_model, [1], progress=False, tokenizer=small)


def test_gsd_groups_follow_the_rank_window_and_the_filters():
    """The grouped ratio against a hand computation: ranks by the filtered p, the group's split, the filters."""
    gsd = GSDSampler(group=3, prob_delta=0.25, max_distance=1.5, embedding="transformer")
    gsd._table = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])  # token t sits at position t (one dimension)
    gsd._threshold = 1.5  # squared distance < 1.5: neighbours at distance 1 only
    p = torch.tensor([[[0.05, 0.30, 0.40, 0.25, 0.0]]])  # ranks: 2, 1, 3, 0, 4
    q = torch.tensor([[[0.0, 0.0, 0.0, 1.0, 0.0]]])  # the draft 3 was a point mass
    # group of 3 around token 3 (rank 2), symmetric split: one more probable (token 1, rank 1) and one less probable
    # (token 0, rank 3); token 1 is too far (distance 4), token 0 farther still: only the draft counts
    assert torch.allclose(gsd.acceptance_ratio(p, q, torch.tensor([[3]])), torch.tensor([[0.25]]))
    gsd._threshold = 10.0  # now token 1 (|0.30 - 0.25| < 0.25) joins; token 0 has |0.05 - 0.25| < 0.25 too
    assert torch.allclose(gsd.acceptance_ratio(p, q, torch.tensor([[3]])), torch.tensor([[0.25 + 0.30 + 0.05]]))
    assert gsd.acceptance_ratio(p, q, torch.tensor([[4]])).item() == 0  # p(x) = 0: never accepted
