"""ScaleKV and the budget baselines: exact at full budget, the selection rule against a plain-Python version,
memory bounds, calibration, settings."""
import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_var_transformer

from vartk.models.attention import AttentionView, CacheSpec
from vartk.samplers import CoarseRecentKVCache, NextScaleSampler, ScaleKVCache, SlidingWindowKVCache
from vartk.samplers.scalekv import (
    calibrated_caps, centroid_positions, select_by_centroid_attention, uniform_tokens,
)
from vartk.tokenizers.msvq import MultiScaleVQVAE

PATCH_NUMS = (1, 2, 3, 4, 5, 6)  # 91 tokens, 55 of them cached; scales 4 x 4 and larger can be pruned
POLICIES = [ScaleKVCache, SlidingWindowKVCache, CoarseRecentKVCache]


@pytest.fixture(scope="module")
def models():
    transformer = tiny_var_transformer(patch_nums=PATCH_NUMS)
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
                                patch_nums=PATCH_NUMS, norm_groups=8, share_quant_resi=2).eval()
    return transformer, tokenizer


def sample(models, kv_cache=None, labels=(1, 4, 7), seed=0):
    return NextScaleSampler()(*models, list(labels), guidance_scale=2.0, top_k=0, progress=False, kv_cache=kv_cache,
                              generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", POLICIES)
def test_the_full_budget_samples_exactly_as_the_full_cache(models, policy):
    full, pruned = sample(models), sample(models, policy(budget=1.0))
    assert all(torch.equal(a, b) for a, b in zip(full.token_maps, pruned.token_maps))
    assert torch.equal(full.latent, pruned.latent) and pruned.stats.kv_bytes == full.stats.kv_bytes


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_peak_bytes_stay_within_the_budget_plus_one_layers_scale(models, policy, budget):
    """Peak of all layers together <= b x the full cache + one layer's keys and values of the largest scale
    that is pruned after (the scale a layer holds in full until its attention has run)."""
    transformer, _ = models
    full = sample(models).stats.kv_bytes
    spec = transformer.cache_spec(6)
    out = sample(models, policy(budget=budget))
    largest_stored = max(spec.scale_lengths[:-1])
    assert out.stats.kv_bytes <= budget * full + largest_stored * spec.token_nbytes
    assert out.stats.kv_bytes < full


def reference_selection(q, k, scale, cap, side, pool_kernel=5, coarse=0):
    """Plain-Python ScaleKV choice for one (row, head): q [T, D] of the current map, k [S, D]; the first `coarse`
    keys are kept too (as far as the budget beside the 16 centroids allows)."""
    keys = len(k)
    cell = side // 4
    centre = [i * cell + (cell - 1) // 2 for i in range(4)]
    window = [keys - side * side + r * side + c for r in centre for c in centre]
    window = list(range(min(coarse, cap - 16))) + window
    scores = np.zeros(keys)
    for position in [r * side + c for r in centre for c in centre]:
        logits = (q[position] @ k.T) * scale
        weights = np.exp(logits - logits.max())
        scores += weights / weights.sum()
    scores[window] = -np.inf
    half = pool_kernel // 2
    pooled = np.array([scores[max(0, j - half) : j + half + 1].max() for j in range(keys)])
    pooled[window] = -np.inf
    order = sorted(range(keys), key=lambda j: (-pooled[j], j))  # highest first; ties: earlier position
    return sorted(order[: cap - len(window)] + window)


def test_the_selection_matches_a_plain_python_version():
    generator = torch.Generator().manual_seed(0)
    side, history, cap = 5, 30, 24
    k = torch.randn(2, 3, history + side * side, 8, generator=generator)  # [R, H, S, D]
    k[0, 0, 3] = k[0, 0, 4]  # equal keys: equal scores, a tie the rule must break by position
    q = torch.randn(2, 3, side * side, 8, generator=generator)
    view = AttentionView(q=q, k=k, scale=0.7, q_proj=q)
    kept = select_by_centroid_attention(view, cap, side * side, pool_kernel=5, scoring="paper")
    assert kept.shape == (2, 3, cap)
    for row in range(2):
        for head in range(3):
            expected = reference_selection(q[row, head].double().numpy(), k[row, head].double().numpy(), 0.7, cap, side)
            assert kept[row, head].tolist() == expected
    assert not torch.equal(kept[0], kept[1])  # rows (cond and uncond alike) choose independently


def test_released_scoring_sums_raw_logits_of_the_projection():
    generator = torch.Generator().manual_seed(1)
    k = torch.randn(1, 1, 41, 4, generator=generator)
    q_proj = torch.randn(1, 1, 25, 4, generator=generator)
    view = AttentionView(q=torch.zeros_like(q_proj), k=k, scale=1.0, q_proj=q_proj)
    kept = select_by_centroid_attention(view, 20, 25, pool_kernel=1, scoring="released")[0, 0]
    centroids = centroid_positions(5)
    scores = (q_proj[0, 0, centroids] @ k[0, 0].T / 2).sum(0)  # / sqrt(4)
    window = 16 + centroids
    scores[window] = -torch.inf
    expected = sorted(scores.argsort(descending=True, stable=True)[:4].tolist() + window.tolist())
    assert kept.tolist() == expected


def test_cond_and_uncond_rows_keep_different_tokens(models):
    transformer, _ = models
    caches = []

    class Keeping(ScaleKVCache):
        def new_caches(self, spec):
            caches.extend(super().new_caches(spec))
            return caches

    sample(models, Keeping(budget=0.4, calibration="uniform"), labels=(2, 5))
    kept = caches[0].k  # [4 rows: cond 2, cond 5, uncond, uncond; H, cap, D]
    assert kept.shape[2] == uniform_tokens(transformer.cache_spec(4), 0.4)
    assert not torch.equal(kept[0], kept[2])  # a cond row and its uncond row


def test_calibrated_budgets_follow_the_drafter_split():
    spec = CacheSpec(num_layers=4, rows=2, num_heads=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
                     scale_lengths=(1, 4, 9, 16, 25, 36))
    drafters = [[False] * 5 for _ in range(4)]
    drafters[1][3] = drafters[1][4] = drafters[2][4] = True
    calibration = {"num_layers": 4, "scale_lengths": list(spec.scale_lengths), "drafters": drafters}
    cap = 20  # held after each scale: 1, 5, 14, 30, 55 -> scales 3 and 4 are pruned
    caps = calibrated_caps(calibration, spec, cap, window=16)
    assert [caps[layer][:3] for layer in range(4)] == [[1, 5, 14]] * 4  # nothing to prune yet
    # scale 3 (30 held): one drafter keeps min(30, 80 - 3 * 16) = 30, refiners share 50: 16 each
    assert [caps[layer][3] for layer in range(4)] == [16, 30, 16, 16]
    # scale 4 (55 held): two drafters keep min(55, (80 - 2 * 16) / 2) = 24, refiners (80 - 48) / 2 = 16
    assert [caps[layer][4] for layer in range(4)] == [16, 24, 24, 16]
    for k in (3, 4):
        assert sum(caps[layer][k] for layer in range(4)) <= cap * 4


def test_calibration_runs_and_its_budgets_apply(models, tmp_path):
    from vartk.pipelines import VARPipeline
    from vartk.samplers.scalekv import calibrate, plot_calibration

    pipe = VARPipeline(tokenizer=models[1], transformer=models[0])
    calibration = calibrate(pipe, budget=0.4, samples=4, batch_size=2, progress=False)
    asi = torch.tensor(calibration["asi"])  # [L, K - 1]
    assert asi.shape == (2, 5) and ((asi > 0) & (asi <= 1 + 1e-6)).all()
    assert sum(map(sum, calibration["drafters"])) == max(1, round(0.1 * 2 * 3))  # 3 prunable scales
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration))
    policy = ScaleKVCache(budget=0.4, calibration=str(path))
    assert policy.calibration == calibration
    assert not all(torch.equal(a, b) for a, b in zip(sample(models, policy).token_maps, sample(models).token_maps))
    plot_calibration(calibration, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 1000


@pytest.mark.parametrize("settings, message", [
    (dict(budget=0), r"budget must be in \(0, 1\] .*got 0"),
    (dict(budget=1.5), r"budget must be in \(0, 1\].*got 1.5"),
    (dict(scoring="mean"), r"scoring must be one of \('paper', 'released'\), got 'mean'"),
    (dict(pool_kernel=4), "pool_kernel must be an odd integer >= 1, got 4"),
    (dict(window=9), "window must be 16"),
    (dict(calibration="nowhere.json"), "calibration file 'nowhere.json' does not exist"),
])
def test_bad_settings_fail_when_made(settings, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ScaleKVCache(**settings)


def test_bad_settings_for_the_model_fail_before_sampling(models):
    transformer, _ = models
    spec = transformer.cache_spec(2)
    with pytest.raises(ValueError, match=r"budget 0.1 keeps 5 tokens per layer, fewer than the window of 16"):
        ScaleKVCache(budget=0.1).new_caches(spec)
    odd = CacheSpec(num_layers=2, rows=2, num_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
                    scale_lengths=(1, 16, 9, 25))  # 18 kept at 0.7: the 3 x 3 scale (26 held) is pruned
    with pytest.raises(ValueError, match=r"the window of 16 tokens is larger than the smallest pruned scale \(9 "):
        ScaleKVCache(budget=0.7).new_caches(odd)
    other = {"format": "vartk-scalekv-calibration", "num_layers": 3, "scale_lengths": list(spec.scale_lengths),
             "drafters": [[False] * 5] * 3}
    with pytest.raises(ValueError, match=r"calibration is for a model with num_layers 3, this model has 2"):
        ScaleKVCache(budget=0.5, calibration=other).new_caches(spec)
    other.update(num_layers=2, scale_lengths=[1, 4, 9, 16])
    with pytest.raises(ValueError, match=r"scale_lengths \[1, 4, 9, 16\], this model has \[1, 4, 9, 16, 25, 36\]"):
        ScaleKVCache(budget=0.5, calibration=other).new_caches(spec)


def test_calibrate_kv_writes_the_json_the_policy_reads_and_a_heat_map(tiny_pipelines, tmp_path, capsys):
    from vartk.cli import main as cli_main
    from vartk.loading import load

    _, var_pipe = tiny_pipelines
    var_pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "calibration.json"
    cli_main(["calibrate-kv", "--model", str(tmp_path / "model"), "--budget", "0.1", "--samples", "4",
              "--drafter-share", "0.5", "--batch-size", "2", "--device", "cpu", "--out", str(out)])
    assert "use it with --kv-cache scalekv:budget=0.1,calibration=" in capsys.readouterr().out
    calibration = json.loads(out.read_text())
    assert calibration["scale_lengths"] == [pn * pn for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    assert out.with_suffix(".png").stat().st_size > 1000
    pipe = load(str(tmp_path / "model"))
    uniform = pipe([1, 2], kv_cache="scalekv:calibration=uniform", output_type="pt", progress=False,
                   generator=torch.Generator().manual_seed(0)).images
    pipe.kv_calibration = calibration  # saved with the model: calibration="model" (the default) uses it
    pipe.save_pretrained(tmp_path / "calibrated")
    again = load(str(tmp_path / "calibrated"))
    assert again.kv_calibration == calibration
    by_model = again([1, 2], kv_cache="scalekv", output_type="pt", progress=False,
                     generator=torch.Generator().manual_seed(0)).images
    by_file = again([1, 2], kv_cache=f"scalekv:calibration={out}", output_type="pt", progress=False,
                    generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(by_model, by_file) and not torch.equal(by_model, uniform)
    with pytest.raises(SystemExit, match="the calibration is a .json file"):
        cli_main(["calibrate-kv", "--out", str(tmp_path / "c.png")])
    with pytest.raises(ValueError, match="calibration is for a model with num_layers 3"):
        again.kv_calibration = {**calibration, "num_layers": 3}


def test_the_coarsest_scales_can_be_kept_beside_the_centroid_choice():
    """coarse=5 (scales 1x1 and 2x2) protects the first 5 keys; the rest is the same rule on the remaining budget."""
    generator = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 30 + 25, 8, generator=generator)
    q = torch.randn(1, 2, 25, 8, generator=generator)
    view = AttentionView(q=q, k=k, scale=0.5, q_proj=q)
    kept = select_by_centroid_attention(view, 26, 25, pool_kernel=3, scoring="paper", coarse=5)
    plain = select_by_centroid_attention(view, 26, 25, pool_kernel=3, scoring="paper")
    for head in range(2):
        row = kept[0, head].tolist()
        assert row[:5] == [0, 1, 2, 3, 4] and len(set(row)) == 26
        assert row == reference_selection(q[0, head].double().numpy(), k[0, head].double().numpy(), 0.5, 26, 5,
                                          pool_kernel=3, coarse=5)
    assert not torch.equal(kept, plain)
    # at a budget no larger than the window there is no room: the centroids only
    assert torch.equal(select_by_centroid_attention(view, 16, 25, 3, "paper", coarse=5),
                       select_by_centroid_attention(view, 16, 25, 3, "paper"))


def test_a_refiner_share_leaves_refiners_part_of_the_budget():
    spec = CacheSpec(num_layers=4, rows=2, num_heads=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
                     scale_lengths=(1, 4, 9, 16, 25, 36))
    drafters = [[False] * 5 for _ in range(4)]
    drafters[1][4] = True
    calibration = {"num_layers": 4, "scale_lengths": list(spec.scale_lengths), "drafters": drafters}
    # 40 kept on average, 160 together after scale 4 (55 held): refiners keep at least 0.9 x 40 = 36 each, so the
    # drafter keeps 160 - 3 x 36 = 52 of its 55; the refiners share the rest, 108 / 3 = 36
    assert [c[4] for c in calibrated_caps(calibration, spec, 40, 16, refiner_share=0.9)] == [36, 52, 36, 36]
    assert [c[4] for c in calibrated_caps(calibration, spec, 40, 16)] == [35, 55, 35, 35]  # 160 - 55 over three
    assert [c[4] for c in calibrated_caps(calibration, spec, 40, 16, refiner_share=1.0)] == [40] * 4  # uniform
