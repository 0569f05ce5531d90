import numpy as np
import pytest
import torch
import torch.nn.functional as F
from references import greedy_next_scale_reference, reference_filter
from tiny_models import NUM_CLASSES, PATCH_NUMS

import vartk.samplers.next_scale as next_scale
from vartk.samplers.kv_cache import FullKVCache
from vartk.samplers.next_scale import NextScaleSampler, edit_next_scale
from vartk.tokenizers.msvq import MultiScaleVQVAE


@pytest.fixture
def models(var_models):
    return var_models


def sample(models, labels=(1, 7), seed=0, sampler=None, **kwargs):
    transformer, tokenizer = models
    generator = torch.Generator().manual_seed(seed)
    kwargs.setdefault("progress", False)
    return (sampler or NextScaleSampler())(transformer, tokenizer, torch.as_tensor(labels), generator=generator,
                                           **kwargs).token_maps


def test_returns_one_token_map_per_scale(models):
    token_maps = sample(models)
    assert [tuple(t.shape) for t in token_maps] == [(2, pn, pn) for pn in PATCH_NUMS]
    assert all(t.dtype == torch.long and 0 <= t.min() and t.max() < 32 for t in token_maps)


def test_same_generator_same_tokens(models):
    first, again = sample(models, seed=3, top_k=8, top_p=0.9), sample(models, seed=3, top_k=8, top_p=0.9)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    draws = [torch.cat([t.flatten() for t in sample(models, seed=s)]) for s in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


@pytest.mark.parametrize("cfg", [0.0, 1.5, 4.0])
def test_top_k_1_is_the_official_greedy_cfg_ramp(models, cfg):
    labels = torch.tensor([1, 7, 9])
    expected = greedy_next_scale_reference(*models, labels, cfg)
    got = sample(models, labels=labels, guidance_scale=cfg, top_k=1)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))


@pytest.mark.parametrize("schedule, guidance_at", [
    ("linear", lambda si: 2.0 * si / (len(PATCH_NUMS) - 1)),  # VAR's ramp: none at the first scale
    ("constant", lambda si: 2.0),
])
def test_guidance_follows_its_schedule_over_scales(models, monkeypatch, schedule, guidance_at):
    transformer, tokenizer = models
    raw, guided = [], []
    real_forward_scale, real_filter = transformer.forward_scale, next_scale.filter_logits
    monkeypatch.setattr(transformer, "forward_scale", lambda *a: raw.append(real_forward_scale(*a)) or raw[-1])
    monkeypatch.setattr(next_scale, "filter_logits", lambda x, *a: guided.append(x) or real_filter(x, *a))
    sample(models, guidance_scale=2.0, sampler=NextScaleSampler(guidance_schedule=schedule))
    assert len(guided) == len(PATCH_NUMS)
    for si, (both, mixed) in enumerate(zip(raw, guided)):
        t = guidance_at(si)
        assert both.shape[0] == 4
        torch.testing.assert_close(mixed, (1 + t) * both[:2] - t * both[2:])
    raw.clear()
    sample(models, guidance_scale=0.0)
    assert all(both.shape[0] == 2 for both in raw)  # no guidance: no unconditional half


def test_kv_cache_policy_is_used(models):
    made = []

    class Recording(FullKVCache):
        def new_caches(self, spec):
            made.extend(super().new_caches(spec))
            return made

    sample(models, kv_cache=Recording())
    assert len(made) == 2 and all(cache.length == 1 + 4 for cache in made)  # the last scale (9) is never written


def test_more_smooth_is_reproducible_and_changes_the_latent(models):
    transformer, tokenizer = models
    runs = []
    for more_smooth in (True, True, False):
        generator = torch.Generator().manual_seed(5)
        out = NextScaleSampler(more_smooth=more_smooth)(transformer, tokenizer, torch.tensor([2]), generator=generator,
                                                        progress=False)
        runs.append((out.token_maps, out.latent))
    (tokens_a, latent_a), (tokens_b, latent_b), (_, latent_hard) = runs
    assert all(torch.equal(a, b) for a, b in zip(tokens_a, tokens_b)) and torch.equal(latent_a, latent_b)
    assert latent_a.shape == (1, 8, 3, 3) and not torch.allclose(latent_a, latent_hard)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_more_smooth_codes_are_the_official_gumbel_softmax_mixture(models, ratio):
    _, tokenizer = models
    logits = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1)) * 2
    tokens, codes = NextScaleSampler(more_smooth=True).draw(logits, tokenizer, ratio, 8, 0.9,
                                                             torch.Generator().manual_seed(0))
    keep = torch.from_numpy(np.stack([reference_filter(row, 8, 0.9) for row in logits.double().view(-1, 32).numpy()]))
    filtered = logits.masked_fill(~keep.view(2, 4, 32), float("-inf"))
    twin = torch.Generator().manual_seed(0)  # replays the draws: the hard token first, then the Gumbel noise
    assert torch.equal(tokens, torch.multinomial(filtered.softmax(-1).view(-1, 32), 1, generator=twin).view(2, 4))
    gumbel = -torch.empty(2, 4, 32).exponential_(generator=twin).log()
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    weights = ((filtered * (1 + ratio) + gumbel) / tau).softmax(-1)  # [B, l, V]
    torch.testing.assert_close(codes, weights @ tokenizer.quantize.embedding.weight)


def test_all_ones_mask_keeps_the_image(models):
    transformer, tokenizer = models
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    known = tokenizer.encode(images)
    edited = edit_next_scale(transformer, tokenizer, images, torch.ones(3, 3), top_k=4, progress=False).token_maps
    assert all(torch.equal(k, e) for k, e in zip(known, edited))


def test_partial_mask_keeps_tokens_where_resized_mask_is_set(models):
    transformer, tokenizer = models
    images = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    known = tokenizer.encode(images)
    mask = torch.zeros(3, 3)
    mask[:, :2] = 1  # keep the left two columns, generate the right one
    edited = edit_next_scale(transformer, tokenizer, images, mask, class_labels=[4], progress=False,
                             generator=torch.Generator().manual_seed(0)).token_maps
    for pn, k, e in zip(PATCH_NUMS, known, edited):
        keep = torch.ones(1, pn, pn, dtype=torch.bool) if pn == 1 else (
            F.interpolate(mask[None, None], size=(pn, pn), mode="bilinear") > 0.5)[0]
        assert torch.equal(e[keep], k[keep])
    assert torch.equal(edited[-1][0, :, :2], known[-1][0, :, :2])


def test_inpainting_without_a_class_uses_the_null_class(models):
    transformer, tokenizer = models
    images = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, 3)
    mask[:, 0] = 1
    edit = lambda labels: edit_next_scale(transformer, tokenizer, images, mask, class_labels=labels,  # noqa: E731
                                          progress=False, generator=torch.Generator().manual_seed(0)).token_maps
    no_class = edit(None)
    assert all(torch.equal(a, b) for a, b in zip(no_class, edit([NUM_CLASSES])))
    assert not all(torch.equal(a, b) for a, b in zip(no_class, edit([0])))


def test_invalid_arguments(models):
    transformer, tokenizer = models
    with pytest.raises(ValueError, match=r"class id 10 is outside \[0, 10\)"):
        sample(models, labels=(1, NUM_CLASSES))
    with pytest.raises(ValueError, match="class id -1 is outside"):
        sample(models, labels=(-1,))
    with pytest.raises(ValueError, match="guidance_scale.*-0.5"):
        sample(models, guidance_scale=-0.5)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0.*got nan"):
        sample(models, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="top_k"):
        sample(models, top_k=-3)
    with pytest.raises(ValueError, match="top_p"):
        sample(models, top_p=0.0)
    with pytest.raises(ValueError, match=r"guidance_schedule must be one of \('linear', 'constant'\), got 'cosine'"):
        NextScaleSampler(guidance_schedule="cosine")
    images = torch.rand(1, 3, 6, 6)
    with pytest.raises(ValueError, match=r"\(4, 4\).*3x3"):
        edit_next_scale(transformer, tokenizer, images, torch.ones(4, 4), progress=False)
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\).*6x6"):
        edit_next_scale(transformer, tokenizer, torch.rand(1, 3, 8, 8), torch.ones(3, 3), progress=False)
    with pytest.raises(ValueError, match=r"class id 11 is outside \[0, 10\]"):
        edit_next_scale(transformer, tokenizer, images, torch.ones(3, 3), class_labels=[11], progress=False)
    with pytest.raises(ValueError, match="2 class labels for 3 images; give one label or one per image"):
        edit_next_scale(transformer, tokenizer, torch.rand(3, 3, 6, 6), torch.ones(3, 3), class_labels=[1, 2],
                        progress=False)


def test_one_class_label_edits_every_image_and_the_mask_may_be_an_array(models):
    transformer, tokenizer = models
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    mask = np.zeros((3, 3), dtype=np.float32)
    mask[0] = 1
    edited = [edit_next_scale(transformer, tokenizer, images, m, class_labels=labels, progress=False,
                              generator=torch.Generator().manual_seed(0)).token_maps
              for m, labels in ((mask, 4), (torch.from_numpy(mask), [4, 4]))]
    assert all(torch.equal(a, b) for a, b in zip(*edited))


def test_a_tokenizer_with_other_codes_is_refused(models):
    transformer, _ = models
    other = MultiScaleVQVAE(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=64,
                            patch_nums=PATCH_NUMS, norm_groups=8)
    with pytest.raises(ValueError, match=r"transformer vocab_size 32 differs from tokenizer vocab_size 64"):
        NextScaleSampler()(transformer, other, [1], progress=False)


def test_the_1x1_scale_keeps_the_known_token_even_when_the_resized_mask_is_unset(models):
    mask = torch.zeros(1, 1, 3, 3)
    mask[..., 0] = 1  # keep only the first column: the 1x1 bilinear resize reads the centre, 0
    assert F.interpolate(mask, size=(1, 1), mode="bilinear", align_corners=False).item() == 0
    assert next_scale.keep_mask_at(mask, 1).tolist() == [[[[True]]]]
    transformer, tokenizer = models
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    known = tokenizer.encode(images)
    for seed in range(3):
        edited = edit_next_scale(transformer, tokenizer, images, mask[0, 0], class_labels=[2, 6], top_k=0,
                                 progress=False, generator=torch.Generator().manual_seed(seed)).token_maps
        assert torch.equal(edited[0], known[0])


def test_a_resized_mask_value_of_exactly_one_half_generates():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :, 0] = 1  # 4x4 -> 2x2 averages pairs of columns: the left cells are exactly 0.5
    mask[1, :, :2, :2] = 1  # the top-left cell is 1, nothing is 0.5
    resized = F.interpolate(mask, size=(2, 2), mode="bilinear", align_corners=False)
    assert resized[0, 0, :, 0].tolist() == [0.5, 0.5]
    assert torch.equal(next_scale.keep_mask_at(mask, 2), resized > 0.5)
    assert next_scale.keep_mask_at(mask, 2)[:, 0].tolist() == [[[False, False], [False, False]],
                                                               [[True, False], [False, False]]]


def test_a_per_image_mask_is_applied_to_each_image(models):
    transformer, tokenizer = models
    masks = torch.zeros(2, 3, 3)
    masks[0, :, :2] = 1  # image 0 keeps its left two columns
    masks[1, 1:, :] = 1  # image 1 keeps its bottom two rows
    known = [torch.zeros(2, pn, pn, dtype=torch.long) for pn in PATCH_NUMS]
    _, checked = next_scale.check_edit_inputs(tokenizer, known, masks, 2, torch.device("cpu"))
    assert torch.equal(checked, masks[:, None])
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    known = tokenizer.encode(images)
    edited = edit_next_scale(transformer, tokenizer, images, masks, class_labels=[1, 3], progress=False,
                             generator=torch.Generator().manual_seed(0)).token_maps
    for i in range(2):
        keep = masks[i].bool()
        assert torch.equal(edited[-1][i][keep], known[-1][i][keep])
        for pn, k, e in zip(PATCH_NUMS[1:], known[1:], edited[1:]):
            keep_pn = (F.interpolate(masks[i][None, None], size=(pn, pn), mode="bilinear") > 0.5)[0, 0]
            assert torch.equal(e[i][keep_pn], k[i][keep_pn])
