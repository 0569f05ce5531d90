"""Speculative sampling for next-token models: many tokens per transformer forward.

Speculative Jacobi decoding (SJD) feeds each row a window of W tokens per forward: the last committed token
(the anchor, whose keys are not cached yet) and W - 1 draft tokens for the next positions. One forward gives the
target distribution p of every position; draft j is accepted with probability min(1, p(x) / q(x)), where q is the
exact distribution the draft was drawn from, until the first rejection, whose position is drawn from
norm(max(0, p - q)); when every tested draft passes, a bonus token is drawn from p. That is speculative
sampling, so the tokens follow the model's distribution exactly (lossless). The drafts of the next forward are the
samples this forward drew from p at the later positions (q = that p), or fresh initial drafts (q a point mass).
With `coupled=True` the next drafts are drawn through a maximal coupling with the previous drafts (the same
accept / residual step at every later position), so they change less between iterations and more are accepted.

Every row keeps its own committed length on the static cache: a window writes its keys at the row's own
positions, and a query only attends to positions <= its own, all written before they are read, so nothing is
copied or rolled back. Rows never wait for each other, and a row's tokens do not depend on the other rows.

Grouped speculative decoding (GSD) replaces the acceptance test by a grouped one: the draft and its neighbours
in the ranking of p (filtered by probability and embedding distance) are accepted together with
min(1, sum p / sum q). It accepts more drafts and is lossy: the tokens no longer follow p exactly.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.attention import caches_nbytes
from .contract import NextTokenOutput, SamplerStats
from .next_token import (
    DecodeSteps, TokenDistribution, TokenGuidance, check_token_call, checked_decode_steps, cuda_peak_memory, prefill,
    reset_cuda_peak_memory,
)
from .registry import NEXT_TOKEN, register_sampler
from .sampling import check_non_negative, on_generator_device

INITS = ("random", "left", "above")
GROUP_SPLITS = ("symmetric", "released")
EMBEDDINGS = ("codebook", "transformer")


@register_sampler("sjd", family=NEXT_TOKEN)
@dataclass
class SJDSampler:
    """Speculative Jacobi decoding, lossless: the tokens follow the model's distribution exactly.

    window: tokens per row per forward (the anchor and window - 1 drafts); clamped to the image's length.
    init: the initial draft of a new position: "random" (uniform over the codebook), "left" (repeat the token to
        the left; random in the first column) or "above" (the token one row above; random in the first row).
    coupled: draw the next drafts through a maximal coupling with the previous ones (still lossless).
    temperature, cfg_interval, cuda_graph: as `NextTokenSampler` (cfg_interval counts token positions).
    """

    window: int = 16
    init: str = "random"
    coupled: bool = False
    temperature: float = 1.0
    cfg_interval: int = -1
    cuda_graph: bool | str = "auto"
    _steps: DecodeSteps = field(init=False, repr=False, compare=False)
    lossy: ClassVar[bool] = False

    def __post_init__(self):
        if not isinstance(self.window, numbers.Integral) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1 (tokens per forward), got {self.window!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.coupled, bool):
            raise ValueError(f"coupled must be True or False, got {self.coupled!r}")
        self._steps = checked_decode_steps(self.temperature, self.cfg_interval, self.cuda_graph)

    @torch.no_grad()
    def __call__(
        self,
        transformer,
        class_labels,
        guidance_scale: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
        tokenizer=None,
    ) -> NextTokenOutput:
        """Sample image tokens for `class_labels` [B] -> NextTokenOutput(tokens int64 [B, grid_size^2], stats).
        Guidance, top-k / top-p and the draws are those of `NextTokenSampler`."""
        labels = check_token_call(transformer, class_labels, guidance_scale, top_k, top_p, self.temperature, generator)
        self.prepare(transformer, tokenizer)
        start = time.perf_counter()
        reset_cuda_peak_memory(labels.device)
        run = JacobiRun(self, transformer, labels, TokenGuidance(guidance_scale, self.cfg_interval),
                        TokenDistribution(top_k, top_p, self.temperature), generator)
        tokens = run.decode(progress)
        run.stats.seconds = time.perf_counter() - start
        run.stats.peak_memory = cuda_peak_memory(labels.device)
        return NextTokenOutput(tokens=tokens, stats=run.stats)

    def prepare(self, transformer, tokenizer) -> None:
        """Per-call setup that needs the model (GSD: the embedding table)."""

    def acceptance_ratio(self, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """min(1, p(x) / q(x)) of every draft x: p, q [B, J, V], drafts [B, J] -> [B, J]. q(x) > 0 always (x
        was drawn from q)."""
        p_x, q_x = p.gather(-1, drafts[..., None])[..., 0], q.gather(-1, drafts[..., None])[..., 0]
        return (p_x / q_x).clamp(max=1.0)

    def recycle(self, p, q, drafts, passed, residual_tokens, samples):
        """The next forward's drafts at every output position i of this one, and the distributions they were
        drawn from: tokens [B, W], proposals [B, W, V]. Plain: the samples drawn from p (q = p). Coupled: at
        positions that hold a draft, keep it where it passed its test, else take the residual draw (a maximal
        coupling of q and p, so the result is distributed as p: q = p)."""
        if self.coupled:
            coupled = torch.where(passed, drafts, residual_tokens)  # [B, W - 1]
            samples = torch.cat([coupled, samples[:, -1:]], dim=1)  # [B, W]
        return samples, p


class JacobiRun:
    """The state of one SJD / GSD call: committed tokens, per-row lengths, drafts and their proposals."""

    def __init__(self, sampler: SJDSampler, transformer, labels, guidance, distribution, generator):
        self.sampler, self.transformer, self.guidance = sampler, transformer, guidance
        self.distribution, self.generator = distribution, generator
        self.num_tokens, self.grid = transformer.num_tokens, transformer.config.grid_size
        self.vocab = transformer.config.vocab_size
        self.window = min(sampler.window, self.num_tokens)
        self.device = labels.device
        B, W = len(labels), self.window
        self.rows = guidance.rows(labels, transformer.null_class)  # [R]
        self.step = sampler._steps.step(transformer, len(self.rows), window=W, extra_positions=W - 1)
        self.out = torch.zeros(B, self.num_tokens + W, dtype=torch.long, device=self.device)  # [B, N + W], padded
        self.length = torch.ones(B, dtype=torch.long, device=self.device)  # [B] committed tokens
        self.offsets = torch.arange(W, device=self.device)  # [W]
        self.stats = SamplerStats(
            forwards=1, row_forwards=torch.ones(B, dtype=torch.long), row_tokens=torch.full((B,), self.num_tokens),
            accepted_lengths=torch.zeros(W, dtype=torch.long), drafts_tested=torch.zeros(W - 1, dtype=torch.long),
            drafts_accepted=torch.zeros(W - 1, dtype=torch.long),
        )

    def decode(self, progress: bool) -> torch.Tensor:
        """Prefill, then verify windows until every row has all its tokens -> int64 [B, N]."""
        B, W = self.out.shape[0], self.window
        logits = prefill(self.transformer, self.rows, self.step.caches)  # [R, 1, V]
        self.out[:, 0] = self.distribution.sample(self.guidance.combine(logits, 0)[:, -1], self.generator)
        nothing = torch.zeros(B, W - 1, dtype=torch.long, device=self.device)  # [B, W - 1]
        drafts = self.initial_drafts(nothing, nothing.bool())  # [B, W - 1] every slot new
        proposals = F.one_hot(drafts, self.vocab).float()  # [B, W - 1, V]
        row_forwards = torch.ones(B, dtype=torch.long, device=self.device)  # [B]
        done = 1
        with tqdm(total=self.num_tokens, initial=done, disable=not progress, desc="tokens") as bar:
            while done < self.num_tokens:
                active = self.length < self.num_tokens  # [B]
                drafts, proposals = self.iterate(drafts, proposals, active)
                row_forwards += active
                self.stats.forwards += 1
                finished = int(self.length.min().clamp(max=self.num_tokens))  # the iteration's one host sync
                bar.update(finished - done)
                done = finished
        self.stats.row_forwards = row_forwards.cpu()
        self.stats.kv_bytes = caches_nbytes(self.step.caches, peak=True)
        return self.out[:, : self.num_tokens]

    def iterate(self, drafts: torch.Tensor, proposals: torch.Tensor, active: torch.Tensor):
        """One forward: verify every row's drafts, commit what passes plus one token, make the next drafts."""
        B, W, n = self.out.shape[0], self.window, self.length
        anchor = self.out.gather(1, (n - 1)[:, None])  # [B, 1]
        inputs = torch.cat([anchor, drafts], dim=1)  # [B, W]
        positions = self.transformer.config.cls_token_num + (n - 1)[:, None] + self.offsets  # [B, W]
        logits = self.step(self.guidance.repeat(inputs), self.guidance.repeat(positions))  # [R, W, V]
        p = self.distribution.probs(self.guidance.combine(logits, n[:, None] + self.offsets))  # [B, W, V]
        usable = (self.num_tokens - n).clamp(max=W)  # [B] tokens this forward may still produce
        testable = self.offsets[None, : W - 1] < (usable - 1)[:, None]  # [B, W - 1]
        uniforms = self.uniform((B, W - 1))  # [B, W - 1]
        passed = uniforms < self.sampler.acceptance_ratio(p[:, : W - 1], proposals, drafts)  # [B, W - 1]
        accepted = (passed & testable).long().cumprod(dim=1).sum(dim=1)  # [B] leading drafts accepted
        residual_tokens = self.distribution.draw(residual(p[:, : W - 1], proposals), self.generator)  # [B, W - 1]
        samples = self.distribution.draw(p, self.generator)  # [B, W]
        rejected = accepted < usable - 1  # [B] a draft was tested and failed: draw from the residual there
        residual_or_sample = torch.cat([residual_tokens, samples[:, -1:]], dim=1)  # [B, W]
        new_token = torch.where(rejected, residual_or_sample.gather(1, accepted[:, None])[:, 0],
                                samples.gather(1, accepted[:, None])[:, 0])  # [B]
        self.commit(drafts, accepted, new_token, active)
        self.count(accepted, testable, active)
        tokens, dists = self.sampler.recycle(p, proposals, drafts, passed, residual_tokens, samples)
        return self.next_drafts(tokens, dists, accepted)

    def commit(self, drafts, accepted, new_token, active) -> None:
        """Write the accepted drafts and the new token of every active row after its committed tokens."""
        B, W = self.out.shape[0], self.window
        committed = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)  # [B, W]: slot j = image n + j
        committed.scatter_(1, accepted[:, None], new_token[:, None])
        write = (self.offsets[None] <= accepted[:, None]) & active[:, None]  # [B, W]
        index = self.length[:, None] + self.offsets  # [B, W]
        self.out.scatter_(1, index, torch.where(write, committed, self.out.gather(1, index)))
        self.length += (accepted + 1) * active

    def count(self, accepted, testable, active) -> None:
        """Add this forward's accepted lengths and per-position test outcomes to the statistics."""
        W = self.window
        hist = torch.zeros(W, dtype=torch.long, device=self.device).scatter_add_(0, accepted, active.long())
        tested = (self.offsets[None, : W - 1] <= accepted[:, None]) & testable & active[:, None]  # [B, W - 1]
        passed = (self.offsets[None, : W - 1] < accepted[:, None]) & active[:, None]  # [B, W - 1]
        self.stats.accepted_lengths += hist.cpu()
        self.stats.drafts_tested += tested.sum(0).cpu()
        self.stats.drafts_accepted += passed.sum(0).cpu()

    def next_drafts(self, tokens, dists, accepted):
        """Drafts for image positions n .. n + W - 2 of the next forward (n the new lengths): the recycled tokens
        of this forward's later outputs, then fresh initial drafts with point-mass proposals."""
        W = self.window
        source = (accepted + 1)[:, None] + self.offsets[None, : W - 1]  # [B, W - 1] output index of each draft
        recycled = source <= W - 1  # [B, W - 1]
        source = source.clamp(max=W - 1)
        drafts = self.initial_drafts(tokens.gather(1, source), recycled)  # [B, W - 1]
        picked = dists.gather(1, source[..., None].expand(-1, -1, self.vocab))  # [B, W - 1, V]
        proposals = torch.where(recycled[..., None], picked, F.one_hot(drafts, self.vocab).to(picked.dtype))
        return drafts, proposals

    def initial_drafts(self, drafts: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """`drafts` [B, J] with the slots not `kept` filled by the sampler's init rule (J = W - 1; slot j holds
        image position n + j)."""
        B, J = kept.shape
        image_index = self.length[:, None] + self.offsets[None, :J]  # [B, J]
        random = self.randint((B, J))  # [B, J]
        init = self.sampler.init
        if init == "random":
            return torch.where(kept, drafts, random)
        if init == "left":  # copy from the nearest slot to the left that holds a token of its own
            last_token = self.out.gather(1, (self.length - 1)[:, None])  # [B, 1] the slot before slot 0
            values = torch.cat([last_token, torch.where(kept, drafts, random)], dim=1)  # [B, 1 + J]
            own = torch.cat([torch.ones_like(kept[:, :1]), kept | (image_index % self.grid == 0)], dim=1)
            index = torch.where(own, torch.arange(J + 1, device=self.device), 0).cummax(dim=1).values  # [B, 1 + J]
            return values.gather(1, index)[:, 1:]
        above = image_index - self.grid  # [B, J] image position one row above
        committed = self.out.gather(1, above.clamp(min=0))  # [B, J]
        drafts = torch.where(kept, drafts, torch.where(above >= 0, committed, random))
        for _ in range(math.ceil(J / self.grid)):  # a position above inside the window: the draft there
            in_window = ~kept & (above >= self.length[:, None])
            slot = (self.offsets[None, :J] - self.grid).clamp(min=0)
            drafts = torch.where(in_window, drafts.gather(1, slot), drafts)
        return drafts

    def uniform(self, shape) -> torch.Tensor:
        """U[0, 1) draws of `shape` from the call's generator, on the model's device."""
        empty = torch.empty(shape, device=self.device)
        return on_generator_device(lambda t: torch.rand(t.shape, generator=self.generator, device=t.device), empty,
                                   self.generator)

    def randint(self, shape) -> torch.Tensor:
        """Uniform token ids of `shape` from the call's generator, on the model's device."""
        empty = torch.empty(shape, device=self.device)
        return on_generator_device(
            lambda t: torch.randint(0, self.vocab, t.shape, generator=self.generator, device=t.device), empty,
            self.generator)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim in float32; where p - q has no positive mass (q == p), p itself."""
    rest = (p.float() - q.float()).clamp(min=0)
    mass = rest.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, rest / mass.clamp(min=torch.finfo(torch.float32).tiny), p.float())


# The default distance threshold of GSD's embedding filter: this quantile of the squared distances between
# pairs of distinct rows of the embedding table (the released code's 0.5 is an absolute value for Chameleon's
# embeddings, meaningless for another table); None: no distance filter. The codebook's median keeps the published
# filter; at the transformer embedding's median fewer groups survive, so that embedding filters nothing. Measured
# on default-gpt's val split in docs/accelerators.md.
DEFAULT_DISTANCE_QUANTILE = {"codebook": 0.5, "transformer": None}
DISTANCE_SAMPLE = 1024  # rows of a large table used to estimate that quantile


@register_sampler("gsd", family=NEXT_TOKEN)
@dataclass
class GSDSampler(SJDSampler):
    """Grouped speculative decoding, LOSSY: accepts more drafts than SJD, and its tokens no longer follow the
    model's distribution exactly (measure FID against plain sampling at the same settings).

    A draft x is accepted with min(1, sum p / sum q) over its group: x and its neighbours in the ranking of the
    filtered target p (`group` tokens in all, x included; split "symmetric" = the extra one on the more probable
    side, or "released" = the released code's 6 more / 7 less probable for 14) that are close to x in probability
    (|p(g) - p(x)| < prob_delta) and in the embedding (squared L2 distance < max_distance, between rows of the
    tokenizer's `codebook` or the transformer's token `embedding` = "transformer"). On a rejection the residual is
    token-level, as in SJD. A draft outside the filtered support (p(x) = 0) is never accepted. max_distance None:
    the embedding's `DEFAULT_DISTANCE_QUANTILE` of the table's pairwise squared distances (the codebook's median;
    no filter for the transformer's embedding). A group of 1 is SJD.
    Other settings as `SJDSampler`.
    """

    group: int = 14
    prob_delta: float = 0.15
    max_distance: float | None = None
    embedding: str = "codebook"
    group_split: str = "symmetric"
    _table: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _threshold: float = field(default=0.0, init=False, repr=False, compare=False)
    lossy: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.group, numbers.Integral) or isinstance(self.group, bool) or self.group < 1:
            raise ValueError(f"group must be an integer >= 1 (tokens in a group, the draft included), got "
                             f"{self.group!r}")
        check_non_negative("prob_delta", self.prob_delta)
        if self.max_distance is not None and (not isinstance(self.max_distance, numbers.Real)
                                              or math.isnan(self.max_distance) or self.max_distance < 0):
            raise ValueError(f"max_distance must be a number >= 0 (squared L2) or None (the default quantile), got "
                             f"{self.max_distance!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.group_split not in GROUP_SPLITS:
            raise ValueError(f"group_split must be one of {GROUP_SPLITS}, got {self.group_split!r}")

    def prepare(self, transformer, tokenizer) -> None:
        """Read the embedding table the distance filter uses and its threshold."""
        if self.embedding == "transformer":
            table = transformer.tok_embeddings.weight.detach().float()
        elif tokenizer is None or not hasattr(tokenizer, "code_vectors"):
            raise ValueError("GSD's embedding 'codebook' needs the tokenizer's codebook: pass tokenizer= (pipelines "
                             "do), or use embedding='transformer'")
        else:
            table = tokenizer.code_vectors().to(transformer.device)
        if len(table) != transformer.config.vocab_size:
            raise ValueError(f"the {self.embedding} embedding has {len(table)} rows, the model "
                             f"{transformer.config.vocab_size} tokens")
        self._table = table  # [V, D]
        self._threshold = self.max_distance if self.max_distance is not None else self.default_threshold(table)

    def default_threshold(self, table: torch.Tensor) -> float:
        quantile = DEFAULT_DISTANCE_QUANTILE[self.embedding]
        return math.inf if quantile is None else distance_quantile(table, quantile)

    def group_offsets(self, device) -> torch.Tensor:
        """Rank offsets of a group around the draft (negative = more probable), [G]."""
        more = (self.group - 1) - (self.group - 1) // 2 if self.group_split == "symmetric" else (self.group - 1) // 2
        return torch.arange(-more, self.group - more, device=device)

    def acceptance_ratio(self, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """min(1, sum_g p(g) / sum_g q(g)) over each draft's filtered group: p, q [B, J, V], drafts [B, J] -> [B, J]."""
        vocab = p.shape[-1]
        order = p.argsort(dim=-1, descending=True, stable=True)  # [B, J, V] rank -> token
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(vocab, device=p.device).expand_as(order))
        offsets = self.group_offsets(p.device)  # [G]
        ranks = rank.gather(-1, drafts[..., None]) + offsets  # [B, J, G]
        members = order.gather(-1, ranks.clamp(0, vocab - 1))  # [B, J, G]
        p_group, q_group = p.gather(-1, members), q.gather(-1, members)  # [B, J, G]
        p_draft = p.gather(-1, drafts[..., None])  # [B, J, 1]
        distance = (self._table[members] - self._table[drafts][..., None, :]).pow(2).sum(-1)  # [B, J, G]
        keep = (ranks >= 0) & (ranks < vocab) & ((p_group - p_draft).abs() < self.prob_delta)
        keep = (keep & (distance < self._threshold)) | (offsets == 0)  # the draft itself always counts
        ratio = (p_group * keep).sum(-1) / (q_group * keep).sum(-1)  # q(x) > 0: x was drawn from q
        return torch.where(p_draft[..., 0] > 0, ratio.clamp(max=1.0), 0.0)


def distance_quantile(table: torch.Tensor, quantile: float) -> float:
    """The `quantile` of the squared L2 distances between distinct rows of `table` [V, D] (evenly spaced rows of a
    large table)."""
    rows = table[torch.linspace(0, len(table) - 1, min(len(table), DISTANCE_SAMPLE), device=table.device).long()]
    distances = torch.cdist(rows, rows).pow(2)  # [S, S]
    off_diagonal = ~torch.eye(len(rows), dtype=torch.bool, device=table.device)
    return float(distances[off_diagonal].quantile(quantile))
