"""What a sampler of each family is called with and returns, and the statistics every sampler reports.

A next-token sampler draws the raster-order tokens of a GPT; a next-scale sampler draws the scale-by-scale
token maps of a VAR transformer (and folds them into the tokenizer's running latent). Pipelines accept any
object of their family (`family` attribute, set by the registry) that follows the protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Protocol, runtime_checkable

import torch


@dataclass
class SamplerStats:
    """What one sampling call cost.

    forwards: transformer forward calls of the whole batch (the prefill included); row_forwards [B]: the
    forwards each row took part in until it was finished; row_tokens [B]: tokens each row produced, so
    row_tokens / row_forwards is its tokens per forward. seconds: wall time of the call. kv_bytes: the most
    bytes the KV caches held at once. peak_memory: torch.cuda.max_memory_allocated over the call (CUDA only).
    Speculative samplers also fill accepted_lengths [W] (verify steps, per row, that accepted j drafts) and
    drafts_tested / drafts_accepted [W - 1] (per window position: drafts tested, and accepted)."""

    forwards: int
    row_forwards: torch.Tensor
    row_tokens: torch.Tensor
    seconds: float = 0.0
    kv_bytes: int = 0
    peak_memory: int | None = None
    accepted_lengths: torch.Tensor | None = None
    drafts_tested: torch.Tensor | None = None
    drafts_accepted: torch.Tensor | None = None

    @property
    def tokens_per_forward(self) -> torch.Tensor:
        """[B] float: tokens each row produced per forward it took part in."""
        return self.row_tokens.double() / self.row_forwards.clamp(min=1).double()

    @property
    def acceptance_by_position(self) -> torch.Tensor | None:
        """[W - 1] float: the share of tested drafts accepted at each window position (NaN where none was tested)."""
        if self.drafts_tested is None:
            return None
        return self.drafts_accepted.double() / self.drafts_tested.double()

    @classmethod
    def concat(cls, parts: list[SamplerStats]) -> SamplerStats:
        """The statistics of several calls (batches) as one: rows concatenated, forwards / seconds / counts
        summed, memory at its largest."""
        def joined(name, combine):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else combine(values)

        def pad_sum(tensors):
            width = max(t.numel() for t in tensors)
            return sum(torch.nn.functional.pad(t, (0, width - t.numel())) for t in tensors)

        return cls(
            forwards=sum(p.forwards for p in parts),
            row_forwards=torch.cat([p.row_forwards for p in parts]),
            row_tokens=torch.cat([p.row_tokens for p in parts]),
            seconds=sum(p.seconds for p in parts),
            kv_bytes=max(p.kv_bytes for p in parts),
            peak_memory=joined("peak_memory", max),
            accepted_lengths=joined("accepted_lengths", pad_sum),
            drafts_tested=joined("drafts_tested", pad_sum),
            drafts_accepted=joined("drafts_accepted", pad_sum),
        )

    def summary(self) -> str:
        """A few human-readable lines (what `vartk sample -v` prints)."""
        rows = len(self.row_tokens)
        per_forward = self.tokens_per_forward
        lines = [f"{rows} images, {self.forwards} transformer forwards ({self.row_forwards.double().mean():.1f} per "
                 f"image), {per_forward.mean():.2f} tokens per forward (rows {per_forward.min():.2f}-"
                 f"{per_forward.max():.2f}), {self.seconds:.2f} s, KV cache peak {format_bytes(self.kv_bytes)}"
                 + (f", CUDA peak {format_bytes(self.peak_memory)}" if self.peak_memory is not None else "")]
        if self.accepted_lengths is not None:
            counts = self.accepted_lengths.tolist()
            total = max(sum(counts), 1)
            lines.append("accepted drafts per verify step: "
                         + " ".join(f"{j}:{c / total:.0%}" for j, c in enumerate(counts) if c))
            rate = self.acceptance_by_position
            lines.append("acceptance by window position: "
                         + " ".join("-" if r != r else f"{r:.2f}" for r in rate.tolist()))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready values (tensors as lists)."""
        return {f.name: (v.tolist() if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                for f in fields(self)}


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def uniform_stats(rows: int, forwards: int, tokens: int, **extra) -> SamplerStats:
    """Statistics of a call in which every row took part in every forward and produced `tokens` tokens."""
    return SamplerStats(forwards=forwards, row_forwards=torch.full((rows,), forwards),
                        row_tokens=torch.full((rows,), tokens), **extra)


@dataclass
class NextTokenOutput:
    """tokens: int64 [B, N] in raster order; stats: what the call cost."""

    tokens: torch.Tensor
    stats: SamplerStats


@dataclass
class NextScaleOutput:
    """token_maps: one int64 [B, pn, pn] per scale; latent: the running latent f_hat [B, Cz, h, w] that the sampled
    code vectors built (the tokenizer decodes it; with Gumbel smoothing it differs from decoding the tokens);
    stats: what the call cost."""

    token_maps: list[torch.Tensor]
    latent: torch.Tensor
    stats: SamplerStats = field(repr=False)


@runtime_checkable
class NextTokenSampling(Protocol):
    """A next-token sampler: prefill the class token, then produce grid_size^2 tokens per label."""

    family: ClassVar[str]

    def __call__(self, transformer, class_labels, guidance_scale: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, progress: bool = True, tokenizer=None
                 ) -> NextTokenOutput: ...


@runtime_checkable
class NextScaleSampling(Protocol):
    """A next-scale sampler: one transformer step per scale, optionally forcing known tokens (editing)."""

    family: ClassVar[str]

    def __call__(self, transformer, tokenizer, class_labels, guidance_scale: float = 1.5, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None, kv_cache=None, progress: bool = True,
                 known_tokens: list[torch.Tensor] | None = None, keep_mask: torch.Tensor | None = None
                 ) -> NextScaleOutput: ...
