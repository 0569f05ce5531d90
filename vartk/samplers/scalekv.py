"""Scale-aware KV-cache compression for next-scale models (ScaleKV), and two baselines at the same budget.

A next-scale model attends, at every scale, to the keys of all coarser scales. A pruned cache keeps, after each
scale's attention, at most `cap` tokens per (row, head) of each layer; the next scale attends to those plus its
own. The budget b is the share of the full cache kept: on average b x (the tokens before the last scale) per
layer. The last scale is never cached (nothing attends to it afterwards).

ScaleKV picks the tokens with the attention of 16 "centroid" queries of the current map (a 4 x 4 grid),
max-pooled along the key axis, plus those 16 tokens; and spreads the budget over the layers by a calibration:
"drafter" layers, whose queries attend broadly over the history, keep (nearly) everything, "refiner" layers,
which attend to their own map or to a few history tokens, keep little (`calibrate` measures which is which).
"""
from __future__ import annotations

import functools
import json
from abc import abstractmethod
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.attention import AttentionView, ByteCounter, CacheSpec, ContiguousKVCache, KVCache
from .kv_cache import KVCachePolicy
from .registry import register_kv_cache

SCORINGS = ("paper", "released")
CALIBRATION_FORMAT = "vartk-scalekv-calibration"
GRID = 4  # the centroid queries: one per cell of a GRID x GRID partition of the current map


class PrunedKVCache(KVCache):
    """One layer's next-scale cache that keeps at most `caps[k]` tokens per (row, head) after scale k.

    It holds only what it keeps: each scale's keys are appended (the scale attends to them all), then `select`
    picks the ones to keep after attention, which are gathered into new, smaller tensors."""

    observes = True

    def __init__(self, spec: CacheSpec, caps: list[int], select, counter: ByteCounter | None = None):
        super().__init__(counter)
        self.scale_lengths, self.caps, self.select = spec.scale_lengths, caps, select
        empty = (spec.rows, spec.num_heads, 0, spec.head_dim)
        self.k = torch.empty(empty, dtype=spec.dtype, device=spec.device)  # [R, H, 0, D]
        self.v = torch.empty_like(self.k)
        self.scale = 0
        self.track_peak()

    def begin(self, step: int) -> None:
        self.scale = step

    def update(self, k, v, positions=None):
        k_all = torch.cat([self.k, k.to(self.k.dtype)], dim=2)  # [R, H, S, D]
        v_all = torch.cat([self.v, v.to(self.v.dtype)], dim=2)
        if self.scale < len(self.scale_lengths) - 1:  # the last scale is attended, never stored
            self.k, self.v = k_all, v_all
            self.track_peak()
        return k_all, v_all

    def observe(self, view: AttentionView) -> None:
        cap = self.caps[self.scale] if self.scale < len(self.caps) else None
        if cap is None or self.k.shape[2] <= cap:
            return
        keep = self.select(view, cap, self.scale_lengths[self.scale])  # [R, H, cap], ascending positions
        index = keep[..., None].expand(-1, -1, -1, self.k.shape[3])  # [R, H, cap, D]
        self.k, self.v = self.k.gather(2, index), self.v.gather(2, index)
        self.track_peak()

    def tensors(self):
        return self.k, self.v


def centroid_positions(side: int, device=None) -> torch.Tensor:
    """The 16 centroid tokens of a side x side map (row-major), [16]: the middle of each cell of a 4 x 4 grid."""
    cell = side // GRID
    centre = torch.arange(GRID, device=device) * cell + (cell - 1) // 2  # [4] rows (and columns)
    return (centre[:, None] * side + centre[None, :]).flatten()


def select_by_centroid_attention(view: AttentionView, cap: int, current_len: int, pool_kernel: int,
                                 scoring: str, coarse: int = 0) -> torch.Tensor:
    """ScaleKV's choice: the keys that the current map's centroid queries attend to most (scores max-pooled along
    the keys), plus the 16 centroid tokens and the first `coarse` keys (the coarsest scales; at most what the
    budget leaves beside the centroids), `cap` per (row, head), in position order -> [R, H, cap].

    scoring "paper": summed softmax attention of the model's own queries (scale as the model's); "released":
    summed raw logits q_proj k^T / sqrt(head_dim) of the un-normalised query projections, as the released code."""
    rows, heads, keys, head_dim = view.k.shape
    side = math.isqrt(current_len)
    centroids = centroid_positions(side, view.k.device)  # [16] in the current map
    window = keys - current_len + centroids  # [16] their key positions
    window = torch.cat([torch.arange(min(coarse, cap - len(window)), device=view.k.device), window])  # always kept
    if scoring == "paper":
        logits = view.q[:, :, centroids].float() @ view.k.float().transpose(-1, -2) * view.scale  # [R, H, 16, S]
        scores = logits.softmax(dim=-1).sum(dim=2)  # [R, H, S]
    else:
        logits = view.q_proj[:, :, centroids].float() @ view.k.float().transpose(-1, -2) / math.sqrt(head_dim)
        scores = logits.sum(dim=2)  # [R, H, S]
    scores = scores.index_fill(-1, window, float("-inf"))
    pooled = F.max_pool1d(scores.view(rows * heads, 1, keys), pool_kernel, stride=1, padding=pool_kernel // 2)
    pooled = pooled.view(rows, heads, keys).index_fill(-1, window, float("-inf"))
    ranked = pooled.argsort(dim=-1, descending=True, stable=True)  # [R, H, S]: of equal scores, the earlier first
    top = ranked[..., : cap - len(window)]  # [R, H, cap - kept]
    return torch.cat([top, window.expand(rows, heads, -1)], dim=-1).sort(dim=-1).values


def select_recent(view: AttentionView, cap: int, current_len: int, coarse: int = 0) -> torch.Tensor:
    """The first `coarse` keys and the most recent cap - coarse, the same for every row and head -> [R, H, cap]."""
    rows, heads, keys, _ = view.k.shape
    positions = torch.cat([torch.arange(coarse), torch.arange(keys - (cap - coarse), keys)]).to(view.k.device)
    return positions.expand(rows, heads, -1)


def coarse_tokens(spec: CacheSpec, budget: float, share: float) -> int:
    """Tokens of the coarsest scales that fit, whole, in `share` of the uniform budget."""
    held = torch.tensor(spec.scale_lengths).cumsum(0).tolist()
    return max([n for n in held if n <= share * uniform_tokens(spec, budget)], default=0)


def check_coarse_share(share) -> None:
    if not isinstance(share, numbers.Real) or isinstance(share, bool) or not 0 <= share < 1:
        raise ValueError(f"coarse_share must be in [0, 1) (the share of the budget kept for the coarsest scales), "
                         f"got {share!r}")


def uniform_tokens(spec: CacheSpec, budget: float) -> int:
    """Tokens kept per (layer, row, head) at budget b: b x the tokens of every scale but the last, rounded down."""
    return max(1, math.floor(budget * spec.cached_len + 1e-9))


def check_budget(budget) -> None:
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool) or not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1] (the share of the full KV cache kept), got {budget!r}")


def prunable_scales(spec: CacheSpec, cap: int) -> list[int]:
    """Scales after which more than `cap` tokens are held (so the cache prunes), the last scale excluded."""
    held = torch.tensor(spec.scale_lengths).cumsum(0).tolist()
    return [k for k in range(len(spec.scale_lengths) - 1) if held[k] > cap]


@dataclass
class _BudgetedPolicy(KVCachePolicy):
    """What the pruned policies share: a budget, caps per (layer, scale) and one byte counter per call."""

    budget: float = 0.1
    lossy: ClassVar[bool] = True

    def __post_init__(self):
        check_budget(self.budget)

    def layer_caps(self, spec: CacheSpec) -> list[list[int]]:
        """Tokens kept after each scale, per layer: [layers][scales - 1] (uniform here)."""
        return [[uniform_tokens(spec, self.budget)] * (len(spec.scale_lengths) - 1)] * spec.num_layers

    @abstractmethod
    def selector(self, spec: CacheSpec):
        """select(view, cap, current_len) -> kept key positions [R, H, cap]."""

    def new_caches(self, spec: CacheSpec) -> list[KVCache]:
        if not spec.scale_lengths:
            raise ValueError(f"{type(self).__name__} prunes a next-scale cache; this model has no scale schedule")
        counter, select = ByteCounter(), self.selector(spec)
        return [PrunedKVCache(spec, caps, select, counter) for caps in self.layer_caps(spec)]


@register_kv_cache("sliding")
@dataclass
class SlidingWindowKVCache(_BudgetedPolicy):
    """Baseline: keep the most recent tokens (a sliding window over the finest scales so far) at the budget."""

    def selector(self, spec: CacheSpec):
        return select_recent


@register_kv_cache("coarse-recent")
@dataclass
class CoarseRecentKVCache(_BudgetedPolicy):
    """Baseline: keep the coarsest scales whole (those that fit in `coarse_share` of the budget) and the most
    recent tokens (the StreamingLLM / AMS-KV idea)."""

    coarse_share: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_coarse_share(self.coarse_share)

    def selector(self, spec: CacheSpec):
        return functools.partial(select_recent, coarse=coarse_tokens(spec, self.budget, self.coarse_share))


@register_kv_cache("scalekv")
@dataclass
class ScaleKVCache(_BudgetedPolicy):
    """ScaleKV: per (row, head), keep the keys the current map's 16 centroid queries attend to most (max-pooled
    scores) plus those 16 tokens; budgets per (layer, scale) from a calibration, else uniform.

    budget: the share of the full cache kept, in (0, 1]. calibration: "model" (the calibration saved with the
    pipeline, uniform budgets if it has none), "uniform", the path of a `vartk calibrate-kv` JSON, or its dict.
    window: centroid tokens always kept (16, a 4 x 4 grid). pool_kernel: max-pool width along the keys (odd).
    scoring: "paper" (softmax attention of the model's queries) or "released" (raw logits of the un-normalised
    query projections, as the released code). coarse_share: keep the coarsest scales that fit whole in this share
    of the budget as well (0 = the paper's choice). refiner_share: with a calibration, the least share of the
    budget a refiner keeps (0: the window; drafters take the rest, as the released budgets)."""

    calibration: str | dict | None = "model"
    window: int = GRID * GRID
    pool_kernel: int = 5
    scoring: str = "paper"
    coarse_share: float = 0.0
    refiner_share: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_coarse_share(self.coarse_share)
        if not isinstance(self.refiner_share, numbers.Real) or not 0 <= self.refiner_share <= 1:
            raise ValueError(f"refiner_share must be in [0, 1] (the least share of the budget a refiner keeps), got "
                             f"{self.refiner_share!r}")
        if self.window != GRID * GRID:
            raise ValueError(f"window must be {GRID * GRID} (the centroids of a {GRID} x {GRID} grid), got "
                             f"{self.window!r}")
        if not isinstance(self.pool_kernel, int) or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be an odd integer >= 1, got {self.pool_kernel!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if isinstance(self.calibration, str) and self.calibration not in ("model", "uniform"):
            self.calibration = read_calibration(self.calibration)
        elif self.calibration is not None and not isinstance(self.calibration, (str, dict)):
            raise ValueError(f"calibration must be 'model', 'uniform', a JSON path or a dict, got {self.calibration!r}")

    def layer_caps(self, spec: CacheSpec) -> list[list[int]]:
        cap = uniform_tokens(spec, self.budget)
        if cap < self.window:
            raise ValueError(f"budget {self.budget} keeps {cap} tokens per layer, fewer than the window of "
                             f"{self.window}; give a budget >= {math.ceil(self.window / spec.cached_len * 100) / 100}")
        smallest = min((spec.scale_lengths[k] for k in prunable_scales(spec, cap)), default=self.window)
        if smallest < self.window:
            raise ValueError(f"the window of {self.window} tokens is larger than the smallest pruned scale "
                             f"({smallest} tokens) at budget {self.budget}; give a larger budget")
        if isinstance(self.calibration, dict):
            return calibrated_caps(self.calibration, spec, cap, self.window, self.refiner_share)
        return super().layer_caps(spec)

    def selector(self, spec: CacheSpec):
        return functools.partial(select_by_centroid_attention, pool_kernel=self.pool_kernel, scoring=self.scoring,
                                 coarse=coarse_tokens(spec, self.budget, self.coarse_share))


def calibrated_caps(calibration: dict, spec: CacheSpec, cap: int, window: int, refiner_share: float = 0.0
                    ) -> list[list[int]]:
    """Tokens kept after each scale per layer from a calibration's drafter / refiner split: at every pruned scale
    the layers keep `cap` x layers tokens together; drafters keep as much as they hold, down to what leaves each
    refiner max(window, refiner_share x cap); refiners share the rest evenly. [layers][scales - 1]."""
    check_calibration(calibration, spec)
    drafters = calibration["drafters"]  # [layers][scales - 1]
    held = torch.tensor(spec.scale_lengths).cumsum(0).tolist()
    caps = [[held[k] for k in range(len(held) - 1)] for _ in range(spec.num_layers)]
    for k in prunable_scales(spec, cap):
        total, count = cap * spec.num_layers, sum(layer[k] for layer in drafters)
        if count in (0, spec.num_layers):
            drafter_cap = refiner_cap = cap
        else:
            refiners = spec.num_layers - count
            floor = max(window, math.floor(refiner_share * cap))
            drafter_cap = min(held[k], (total - refiners * floor) // count)
            refiner_cap = min(held[k], (total - count * drafter_cap) // refiners)
        for layer in range(spec.num_layers):
            caps[layer][k] = drafter_cap if drafters[layer][k] else refiner_cap
    return caps


def read_calibration(path: str | Path) -> dict:
    """A calibration JSON written by `vartk calibrate-kv`; one ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist; write one with vartk calibrate-kv")
    try:
        calibration = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"calibration file {str(path)!r} is not JSON: {err}") from None
    if not isinstance(calibration, dict) or calibration.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{str(path)!r} is not a ScaleKV calibration (no \"format\": \"{CALIBRATION_FORMAT}\")")
    return calibration


def check_calibration(calibration: dict, spec: CacheSpec) -> None:
    """Raise ValueError unless the calibration was made for a model of this depth and scale schedule."""
    for key, ours in (("num_layers", spec.num_layers), ("scale_lengths", list(spec.scale_lengths))):
        theirs = calibration.get(key)
        if theirs != ours:
            raise ValueError(f"the ScaleKV calibration is for a model with {key} {theirs}, this model has {ours}; "
                             "calibrate this model with vartk calibrate-kv")
    drafters = calibration.get("drafters")
    if (not isinstance(drafters, list) or len(drafters) != spec.num_layers
            or any(len(layer) != len(spec.scale_lengths) - 1 for layer in drafters)):
        raise ValueError("the ScaleKV calibration's drafters must be a [layers][scales - 1] table of booleans")


class SelectivityProbe(KVCachePolicy):
    """Full caches that read each layer's attention weights and accumulate its attention selectivity index per
    scale (what `calibrate` measures): the share of attention a cache of `key_budget` history tokens would keep,
    the current map's share plus the top-`key_budget` history keys' share, averaged over rows, heads, queries."""

    def __init__(self, num_layers: int, num_scales: int, key_budget: int):
        self.key_budget = key_budget
        self.sums = torch.zeros(num_layers, num_scales, dtype=torch.float64)  # [L, K]
        self.counts = torch.zeros(num_layers, num_scales, dtype=torch.float64)

    def new_caches(self, spec: CacheSpec) -> list[KVCache]:
        return [_ProbeCache(spec, self, layer) for layer in range(spec.num_layers)]

    def index(self) -> torch.Tensor:
        """ASI per (layer, scale) [L, K]; NaN at scale 0, which has no history."""
        return self.sums / self.counts


class _ProbeCache(ContiguousKVCache):
    observes = wants_attention = True

    def __init__(self, spec: CacheSpec, probe: SelectivityProbe, layer: int):
        super().__init__(spec)
        self.probe, self.layer, self.scale = probe, layer, 0
        self.scale_lengths = spec.scale_lengths

    def begin(self, step: int) -> None:
        self.scale = step

    def observe(self, view: AttentionView) -> None:
        current_len = self.scale_lengths[self.scale]
        history_len = view.weights.shape[-1] - current_len
        if history_len == 0:
            return
        weights = view.weights  # [R, H, T, S]
        current = weights[..., history_len:].sum(-1)  # [R, H, T]
        kept = weights[..., :history_len].topk(min(self.probe.key_budget, history_len), dim=-1).values.sum(-1)
        self.probe.sums[self.layer, self.scale] += float((current + kept).double().mean())
        self.probe.counts[self.layer, self.scale] += 1


@torch.no_grad()
def calibrate(pipe, budget: float = 0.1, samples: int = 16, drafter_share: float = 0.1, seed: int = 0,
              batch_size: int = 8, progress: bool = True) -> dict:
    """Measure the attention selectivity index (ASI) of every (layer, scale) of a next-scale pipeline's transformer
    on `samples` sampled images (classes spread evenly, the pipeline's sampling settings), Z-score it per scale,
    and mark the `drafter_share` of (layer, scale) pairs with the lowest Z as drafters. The ASI of scale k + 1
    decides the budget after scale k (the cache scale k + 1 reads). Returns the calibration dict (JSON-ready)."""
    check_budget(budget)
    transformer = pipe.transformer
    spec = transformer.cache_spec(1)
    num_scales = len(spec.scale_lengths)
    probe = SelectivityProbe(transformer.num_layers, num_scales, uniform_tokens(spec, budget))
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    labels = [i * pipe.num_classes // samples for i in range(samples)]
    for start in tqdm(range(0, samples, batch_size), desc="calibrating", disable=not progress):
        pipe(class_labels=labels[start : start + batch_size], generator=generator, output_type="pt", progress=False,
             kv_cache=probe)
    asi = probe.index()[:, 1:]  # [L, K - 1]: column k is the cache after scale k
    zscore = (asi - asi.mean(dim=0)) / asi.std(dim=0).clamp(min=1e-12)
    prunable = torch.tensor([k in prunable_scales(spec, GRID * GRID) for k in range(num_scales - 1)])  # [K - 1]
    count = max(1, round(drafter_share * transformer.num_layers * int(prunable.sum())))
    ranked = torch.where(prunable[None], zscore, torch.inf).flatten().argsort()[:count]
    drafters = torch.zeros(asi.numel(), dtype=torch.bool)
    drafters[ranked] = True
    return {
        "format": CALIBRATION_FORMAT, "version": 1, "num_layers": spec.num_layers,
        "scale_lengths": list(spec.scale_lengths), "budget": budget, "samples": samples, "seed": seed,
        "key_budget": probe.key_budget, "drafter_share": drafter_share,
        "asi": asi.tolist(), "zscore": zscore.tolist(), "drafters": drafters.view_as(asi).tolist(),
    }


def plot_calibration(calibration: dict, path: str | Path) -> None:
    """A PNG heat map of the ASI (layers x scales) with the drafters marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    asi = torch.tensor(calibration["asi"])  # [L, K - 1]
    drafters = torch.tensor(calibration["drafters"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * asi.shape[1], 1.2 + 0.35 * asi.shape[0]))
    image = ax.imshow(asi.numpy(), cmap="viridis", aspect="auto")
    rows, cols = drafters.nonzero(as_tuple=True)
    ax.scatter(cols.numpy(), rows.numpy(), marker="x", color="red", s=60, label="drafter")
    ax.set_xlabel("cache after scale")
    ax.set_ylabel("layer")
    ax.set_xticks(range(asi.shape[1]))
    ax.set_title(f"attention selectivity index (budget {calibration['budget']})")
    fig.colorbar(image, ax=ax)
    if len(rows):
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.25), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
