"""Next-scale (VAR) sampling: one transformer step per scale, 1x1 up to the full token map.

At scale k the transformer sees the class token and the running latent of scales < k (through
its KV cache), returns logits for all pn_k x pn_k tokens at once, and the sampled tokens are
folded into the running latent by the tokenizer. Classifier-free guidance runs the batch as
[cond; null] and ramps linearly over the scales: at scale k (of K),

    t = guidance_scale * k / (K - 1),    logits = (1 + t) * cond - t * uncond

so the first scale is purely conditional and the last is guided by 1 + guidance_scale. With
`guidance_schedule="constant"`, t = guidance_scale at every scale.

Zero-shot editing (in/out-painting, class-conditional editing) is the same loop with the tokens
of a known image forced wherever a mask says "keep", at every scale (`edit_next_scale`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from ..models.attention import caches_nbytes
from .contract import NextScaleOutput, uniform_stats
from .kv_cache import FullKVCache, KVCachePolicy
from .next_token import cuda_peak_memory, reset_cuda_peak_memory
from .registry import KV_CACHE, NEXT_SCALE, SAMPLER, check_family, register_sampler
from .sampling import (
    cfg_next_scale, check_class_labels, check_generator, check_non_negative, check_sampling_args, filter_logits,
    GUIDANCE_SCHEDULES, on_generator_device, sample_from_logits,
)


@register_sampler("nextscale", family=NEXT_SCALE, aliases=("nextscalesampler",))
@dataclass
class NextScaleSampler:
    """The official VAR sampler, one forward per scale. `more_smooth` replaces each scale's code vectors by a
    Gumbel-softmax mixture of codes (sharper visuals, not used for FID). `guidance_schedule` "linear" (official)
    ramps the guidance from none at the first scale to guidance_scale at the last; "constant" guides every scale
    by guidance_scale."""

    more_smooth: bool = False
    guidance_schedule: str = "linear"

    def __post_init__(self):
        if not isinstance(self.more_smooth, bool):
            raise ValueError(f"more_smooth must be True or False, got {self.more_smooth!r}")
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {tuple(GUIDANCE_SCHEDULES)}, got "
                             f"{self.guidance_schedule!r}")

    @torch.no_grad()
    def __call__(
        self,
        transformer,
        tokenizer,
        class_labels,
        guidance_scale: float = 1.5,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        kv_cache: KVCachePolicy | None = None,
        progress: bool = True,
        known_tokens: list[torch.Tensor] | None = None,
        keep_mask: torch.Tensor | None = None,
    ) -> NextScaleOutput:
        """Sample token maps for `class_labels` [B] -> NextScaleOutput(token maps [B, pn, pn] per scale, the running
        latent f_hat [B, Cz, h, w] the sampled code vectors built, stats).

        `known_tokens` (per-scale maps of a known image) and `keep_mask` (1 = keep the known token, at the final
        token resolution) turn sampling into editing; see `edit_next_scale`. `kv_cache` is a KV-cache policy
        (default: `FullKVCache`).
        """
        check_sampling_args(top_k, top_p)
        check_generator(generator)
        check_non_negative("guidance_scale", guidance_scale, "0 = no guidance")
        check_same_schedule(transformer, tokenizer)
        check_family(kv_cache, KV_CACHE, NEXT_SCALE)
        device = transformer.device
        labels = check_class_labels(class_labels, transformer.null_class, device, allow_null=known_tokens is not None)
        if (known_tokens is None) != (keep_mask is None):
            raise ValueError("known_tokens and keep_mask go together: pass both (editing) or neither (sampling)")
        if known_tokens is not None:
            known_tokens, keep_mask = check_edit_inputs(tokenizer, known_tokens, keep_mask, len(labels), device)

        start = time.perf_counter()
        reset_cuda_peak_memory(device)
        B, patch_nums = len(labels), tokenizer.patch_nums
        use_cfg = guidance_scale > 0
        if use_cfg:
            labels = torch.cat([labels, torch.full_like(labels, transformer.null_class)])  # [2B]: cond; null
        caches = (kv_cache or FullKVCache()).new_caches(transformer.cache_spec(len(labels)))
        f_hat = torch.zeros(B, tokenizer.latent_channels, tokenizer.latent_size, tokenizer.latent_size, device=device)
        x_next, token_maps = None, []
        for scale_index in tqdm(range(len(patch_nums)), desc="scales", disable=not progress):
            pn, ratio = patch_nums[scale_index], scale_index / max(len(patch_nums) - 1, 1)
            for cache in caches:
                cache.begin(scale_index)
            logits = transformer.forward_scale(x_next, labels, scale_index, caches)  # [B or 2B, pn^2, V]
            if use_cfg:
                t = GUIDANCE_SCHEDULES[self.guidance_schedule](guidance_scale, scale_index, len(patch_nums))
                logits = cfg_next_scale(logits, t)
            tokens, codes = self.draw(logits, tokenizer, ratio, top_k, top_p, generator)
            codes = rearrange(codes, "b (h w) c -> b c h w", h=pn)  # [B, Cz, pn, pn]
            tokens = tokens.view(B, pn, pn)
            if known_tokens is not None:
                keep = keep_mask_at(keep_mask, pn)  # [B, 1, pn, pn]
                known = known_tokens[scale_index].view(B, pn, pn)
                tokens = torch.where(keep[:, 0], known, tokens)
                codes = torch.where(keep, tokenizer.embed_tokens(known).to(codes.dtype), codes)
            token_maps.append(tokens)
            f_hat = tokenizer.fold_scale(f_hat, scale_index, codes)
            if scale_index < len(patch_nums) - 1:
                x_next = tokenizer.next_scale_input(f_hat, scale_index)  # [B, pn_next^2, Cz]
                x_next = x_next.repeat(2, 1, 1) if use_cfg else x_next
        stats = uniform_stats(B, forwards=len(patch_nums), tokens=sum(pn * pn for pn in patch_nums),
                              seconds=time.perf_counter() - start, kv_bytes=caches_nbytes(caches, peak=True),
                              peak_memory=cuda_peak_memory(device))
        return NextScaleOutput(token_maps=token_maps, latent=f_hat, stats=stats)

    def draw(self, logits, tokenizer, ratio, top_k, top_p, generator):
        """Tokens [B, l] from top-k/top-p filtered logits [B, l, V], and the code vectors the
        running latent receives [B, l, Cz] (a Gumbel-softmax mixture when `more_smooth`)."""
        filtered = filter_logits(logits, top_k, top_p)
        tokens = sample_from_logits(filtered, generator=generator)  # [B, l]
        if not self.more_smooth:
            return tokens, rearrange(tokenizer.embed_tokens(tokens), "b c h w -> b (h w) c")
        tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
        gumbel = -on_generator_device(
            lambda x: torch.empty_like(x).exponential_(generator=generator), filtered, generator).log()  # [B, l, V]
        weights = ((filtered * (1 + ratio) + gumbel) / tau).softmax(dim=-1)
        codebook = tokenizer.quantize.embedding.weight.float()  # [V, Cz]
        return tokens, weights @ codebook


def check_same_schedule(transformer, tokenizer) -> None:
    """The transformer must predict the tokenizer's codes, scale by scale, and read its latents."""
    sizes = {"patch_nums": (tuple(transformer.patch_nums), tuple(tokenizer.patch_nums)),
             "vocab_size": (transformer.config.vocab_size, tokenizer.vocab_size),
             "latent_channels": (transformer.config.latent_channels, tokenizer.latent_channels)}
    for name, (theirs, ours) in sizes.items():
        if theirs != ours:
            raise ValueError(f"transformer {name} {theirs} differs from tokenizer {name} {ours}; use the tokenizer "
                             "the transformer was trained with")


def check_edit_inputs(tokenizer, known_tokens, keep_mask, batch_size, device):
    """Validate the known image's token maps and the keep mask; returns (tokens, mask [B, 1, h, w]) on `device`."""
    patch_nums = tokenizer.patch_nums
    if len(known_tokens) != len(patch_nums):
        raise ValueError(f"known_tokens has {len(known_tokens)} scales, the tokenizer has {len(patch_nums)}")
    for pn, tokens in zip(patch_nums, known_tokens):
        if tokens.shape[0] != batch_size or tokens[0].numel() != pn * pn:
            raise ValueError(
                f"known token map of shape {tuple(tokens.shape)} does not match batch {batch_size} x {pn}x{pn}"
            )
    size = patch_nums[-1]
    mask = keep_mask.float()
    odd = mask[(mask != 0) & (mask != 1)]
    if odd.numel():
        raise ValueError(f"mask values must be 1 (keep the image's token) or 0 (generate), or a bool mask; got "
                         f"{odd[0].item():.3g}")
    mask = mask[None, None] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask  # [B or 1, 1, h, w]
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (size, size):
        raise ValueError(
            f"mask of shape {tuple(keep_mask.shape)} does not match the final token map {size}x{size}; "
            f"give it as [{size}, {size}], [B, {size}, {size}] or [B, 1, {size}, {size}]"
        )
    if mask.shape[0] not in (1, batch_size):
        raise ValueError(f"mask batch {mask.shape[0]} does not match the {batch_size} images")
    return [t.to(device) for t in known_tokens], mask.to(device).expand(batch_size, -1, -1, -1)


def keep_mask_at(mask: torch.Tensor, pn: int) -> torch.Tensor:
    """Keep mask [B, 1, h, w] resized (bilinear, > 0.5) to one scale, [B, 1, pn, pn] bool.
    The 1x1 scale always keeps the known token."""
    if pn == 1:
        return torch.ones(mask.shape[0], 1, 1, 1, dtype=torch.bool, device=mask.device)
    return F.interpolate(mask, size=(pn, pn), mode="bilinear", align_corners=False) > 0.5


@torch.no_grad()
def edit_next_scale(
    transformer,
    tokenizer,
    images: torch.Tensor,
    mask: torch.Tensor,
    class_labels=None,
    sampler=None,
    **sample_kwargs,
) -> NextScaleOutput:
    """Zero-shot in/out-painting or class-conditional editing of `images` [B, 3, H, W] in [0, 1].

    `mask` is at the final token resolution ([h, w], [B, h, w] or [B, 1, h, w]; 1 = keep the
    image's token, 0 = generate). `class_labels` None means the null class (pure in/out-painting);
    one class id or B of them make it class-conditional editing. `sampler` (any next-scale sampler) defaults to the
    official editing demo's `NextScaleSampler(more_smooth=True)`, whose effect lives in the running latent: decode
    the output's `latent` with `tokenizer.decode_latent`. `sample_kwargs` go to the sampler (guidance_scale, top_k,
    top_p, generator, kv_cache, ...; that demo uses guidance 3, top_k 900, top_p 0.95). Returns the sampler's
    NextScaleOutput.
    """
    expected = tokenizer.latent_size * tokenizer.downsample_factor
    if images.ndim != 4 or images.shape[-2:] != (expected, expected):
        raise ValueError(
            f"images of shape {tuple(images.shape)} do not match the tokenizer's {expected}x{expected} images "
            f"(final token map {tokenizer.latent_size}x{tokenizer.latent_size})"
        )
    batch_size = images.shape[0]
    labels = check_class_labels(transformer.null_class if class_labels is None else class_labels,
                                transformer.null_class, allow_null=True)  # [1 or B]
    if len(labels) not in (1, batch_size):
        raise ValueError(f"{len(labels)} class labels for {batch_size} images; give one label or one per image")
    try:
        mask = torch.as_tensor(mask, dtype=torch.float32, device=tokenizer.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"mask must be a tensor or array of 1 (keep) and 0 (generate) at the final token map, got a "
                        f"{type(mask).__name__}") from None
    check_family(sampler, SAMPLER, NEXT_SCALE)
    known_tokens = tokenizer.encode(images.to(tokenizer.device))
    sampler = sampler or NextScaleSampler(more_smooth=True)  # the official editing demo's
    return sampler(transformer, tokenizer, labels.expand(batch_size), known_tokens=known_tokens, keep_mask=mask,
                   **sample_kwargs)
