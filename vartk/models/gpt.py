"""LlamaGen's class-conditional next-token transformer (c2i GPT-B ... GPT-3B), official key layout.

A pre-norm Llama decoder over the sequence [class token, image token 0, ..., image token N-2]:

    h   = x + Attention(RMSNorm(x))      # packed wqkv, 2-D rotary embedding on q and k
    out = h + SwiGLU(RMSNorm(h))         # w2(silu(w1 x) * w3 x)
    logits = output(RMSNorm(out))        # float32, position i predicts image token i

Sequence position p < cls_token_num is the class prefix; image token t sits at position
cls_token_num + t and lies on grid cell (t // grid_size, t % grid_size) (raster order). The
rotary angles of a cell are row * f_k on the first head_dim/4 channel pairs and col * f_k on the
last head_dim/4, f_k = rope_base^(-2k / (head_dim/2)), pairs interleaved (channels 2j, 2j+1).
Prefix positions get cos = sin = 0, so the class token's queries and keys are exactly zero.

The grid size is not visible in the weights (a 24x24 checkpoint loads into a 16x16 model and
samples garbage); it comes from the config, or from `image_size` in `from_official`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from ..checkpoints import load_state_dict_strict, read_official_file
from .attention import CacheSpec, StaticKVCache, attention, position_mask

GPT_CONFIGS = {
    "GPT-B": dict(dim=768, n_layer=12, n_head=12),
    "GPT-L": dict(dim=1024, n_layer=24, n_head=16),
    "GPT-XL": dict(dim=1280, n_layer=36, n_head=20),
    "GPT-XXL": dict(dim=1536, n_layer=48, n_head=24),
    "GPT-3B": dict(dim=3200, n_layer=24, n_head=32),
}
TOKENIZER_DOWNSAMPLE = 16  # every released c2i GPT was trained on VQ-16 tokens
OFFICIAL_CONTAINERS = ("model", "module", "state_dict")  # DDP, deepspeed and older training files; FSDP files are bare
RECOMPUTED_KEYS = ("freqs_cis", "kv_cache.k_cache", "kv_cache.v_cache", "causal_mask")


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


def rope_2d(positions: torch.Tensor, grid_size: int, head_dim: int, base: float, prefix_len: int):
    """cos and sin [B, T, 1, head_dim // 2] (float32) of the 2-D rotary embedding at `positions` [B, T]."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=positions.device).float() / half))  # [head_dim/4]
    cell = (positions - prefix_len).clamp(min=0)  # [B, T]
    row = (cell // grid_size)[..., None] * inv_freq  # [B, T, head_dim/4]
    col = (cell % grid_size)[..., None] * inv_freq  # [B, T, head_dim/4]
    angles = torch.cat([row, col], dim=-1)[:, :, None]  # [B, T, 1, head_dim/2]
    is_image = (positions >= prefix_len)[:, :, None, None]  # [B, T, 1, 1]
    return torch.where(is_image, angles.cos(), 0.0), torch.where(is_image, angles.sin(), 0.0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved channel pairs of x [B, T, H, D] in float32; returns x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)  # [B, T, H, D/2, 2]
    return rotated.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the input dtype, then scale (the official order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, resid_dropout_p: float):
        super().__init__()
        self.n_head = n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout_p)

    def forward(self, x, cos, sin, mask, positions, cache: StaticKVCache | None):
        q, k, v = rearrange(self.wqkv(x), "b t (three h d) -> three b t h d", three=3, h=self.n_head)  # [B, T, H, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (rearrange(t, "b t h d -> b h t d") for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v, positions)  # [B, H, S, D]
        y = rearrange(attention(q, k, v, attn_mask=mask), "b h t d -> b t (h d)")
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, ffn_dropout_p: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim, n_head, ffn_hidden, norm_eps, resid_dropout_p, ffn_dropout_p):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_head, resid_dropout_p)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, ffn_hidden, ffn_dropout_p)

    def forward(self, x, cos, sin, mask, positions, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, positions, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class ClassEmbedding(nn.Module):
    """Class table with one extra row, the null class (= num_classes) used for CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, class_labels):
        return self.embedding_table(class_labels)[:, None]  # [B, 1, C]


class GPTTransformer(ModelMixin, ConfigMixin):
    """LlamaGen c2i GPT. Defaults are GPT-B on the 16x16 grid (256 px); presets in GPT_CONFIGS.

    forward(class_labels [B], tokens [B, N-1]) -> logits [B, N, V]: teacher forcing, position i
    predicts image token i. forward_cached(...) runs prefill / decode / draft windows on static
    KV caches made by new_kv_caches(...). Dropouts (official 0.1) act only in train mode.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        vocab_size: int = 16384,
        num_classes: int = 1000,
        grid_size: int = 16,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        cls_token_num: int = 1,
        token_dropout_p: float = 0.1,
        resid_dropout_p: float = 0.1,
        ffn_dropout_p: float = 0.1,
    ):
        super().__init__()
        if dim % n_head or (dim // n_head) % 4:
            raise ValueError(
                f"dim={dim} must split into n_head={n_head} heads whose size is a multiple of 4 (2-D rotary pairs)"
            )
        if cls_token_num != 1:
            raise ValueError(f"cls_token_num={cls_token_num}: class-conditional models use exactly 1 class token")
        self.cls_embedding = ClassEmbedding(num_classes, dim)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.tok_dropout = nn.Dropout(token_dropout_p)
        hidden = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, n_head, hidden, norm_eps, resid_dropout_p, ffn_dropout_p) for _ in range(n_layer)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02, randomize_output: bool = False) -> None:
        """Official init: N(0, std) for every Linear and Embedding, RMSNorm weights 1, output head zero.

        `randomize_output=True` keeps the head random too (a zero head emits uniform logits, which
        makes random-weight tests and timings meaningless)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if not randomize_output:
            nn.init.zeros_(self.output.weight)

    @property
    def head_dim(self) -> int:
        return self.config.dim // self.config.n_head

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def num_tokens(self) -> int:
        """Image tokens per sample (grid_size ** 2)."""
        return self.config.grid_size ** 2

    def embed(self, class_labels: torch.Tensor | None, tokens: torch.Tensor | None) -> torch.Tensor:
        """[class embedding (if labels given), token embeddings (if tokens given)] -> [B, T, C]."""
        parts = []
        if class_labels is not None:
            parts.append(self.cls_embedding(class_labels))  # [B, 1, C]
        if tokens is not None:
            parts.append(self.tok_embeddings(tokens))  # [B, T, C]
        if not parts:
            raise ValueError("give class_labels, tokens or both")
        return self.tok_dropout(torch.cat(parts, dim=1))

    def run_layers(self, x, positions, caches=None) -> torch.Tensor:
        """Blocks, final norm and head over x [B, T, C] at absolute `positions` [B or 1, T] -> float32 [B, T, V]."""
        cfg = self.config
        cos, sin = rope_2d(positions, cfg.grid_size, self.head_dim, cfg.rope_base, cfg.cls_token_num)
        mask = position_mask(positions, caches[0].max_len if caches else x.shape[1])  # [B, 1, T, S]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, positions, caches[i] if caches else None)
        return self.output(self.norm(x)).float()

    def forward(self, class_labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: labels [B], tokens [B, N-1] -> logits [B, N, V]; position i predicts token i."""
        x = self.embed(class_labels, tokens)  # [B, N, C]
        positions = torch.arange(x.shape[1], device=x.device)[None]  # [1, N]
        return self.run_layers(x, positions)

    def cache_spec(self, rows: int, dtype: torch.dtype | None = None, device=None, extra_positions: int = 0
                   ) -> CacheSpec:
        """The static caches of a call with `rows` rows (CFG rows included): room for the whole sequence (class
        prefix + image tokens) plus `extra_positions` (a draft window may run past the last token), rounded up to
        a multiple of 8 like the official cache."""
        max_len = -(-(self.config.cls_token_num + self.num_tokens + extra_positions) // 8) * 8
        return CacheSpec(num_layers=self.config.n_layer, rows=rows, num_heads=self.config.n_head,
                         head_dim=self.head_dim, dtype=dtype or self.dtype, device=torch.device(device or self.device),
                         max_len=max_len)

    def new_kv_caches(self, rows: int, dtype: torch.dtype | None = None, device=None, extra_positions: int = 0
                      ) -> list[StaticKVCache]:
        """One static cache per layer (see `cache_spec`)."""
        spec = self.cache_spec(rows, dtype, device, extra_positions)
        return [StaticKVCache(spec) for _ in range(spec.num_layers)]

    def forward_cached(
        self,
        tokens: torch.Tensor | None,
        class_labels: torch.Tensor | None,
        positions: torch.Tensor,
        caches: list[StaticKVCache],
    ) -> torch.Tensor:
        """Run new sequence entries against the caches -> logits [B, T, V] (float32).

        Prefill: class_labels [B], tokens None, positions zeros [B, 1]. Decode / draft windows:
        tokens [B, T] at absolute positions [B, T] (>= 1; rows may be at different positions).
        Each entry's keys/values are written at its position; it attends to positions <= its own.
        No data-dependent checks here, so a decode step can be captured in a CUDA graph.
        """
        x = self.embed(class_labels, tokens)  # [B, T, C]
        if positions.shape != x.shape[:2]:
            raise ValueError(
                f"positions has shape {tuple(positions.shape)}, expected {tuple(x.shape[:2])} (rows, entries)"
            )
        if len(caches) != self.config.n_layer:
            raise ValueError(f"got {len(caches)} KV caches, the model has {self.config.n_layer} layers")
        return self.run_layers(x, positions, caches)

    @classmethod
    def from_official(
        cls, path_or_state_dict, model: str = "GPT-B", image_size: int = 256, **overrides
    ) -> "GPTTransformer":
        """Load an official LlamaGen c2i checkpoint (e.g. c2i_B_256.pt, c2i_XXL_384.pt) in eval mode.

        `model` names the preset (the head count is not visible in the weights) and `image_size` the
        grid (image_size // 16 tokens a side). A file name carrying _256/_384/_512 must agree with
        `image_size`. DDP files (weights under "model", "module" or "state_dict") and bare FSDP
        state dicts both load; a stale `freqs_cis` or KV-cache buffer is ignored. `overrides` are
        config fields to change (e.g. dropout probabilities for fine-tuning).
        """
        if model not in GPT_CONFIGS:
            raise ValueError(f"unknown LlamaGen model {model!r}; choose one of {sorted(GPT_CONFIGS)}")
        if image_size <= 0 or image_size % TOKENIZER_DOWNSAMPLE:
            raise ValueError(
                f"image_size={image_size} must be a positive multiple of {TOKENIZER_DOWNSAMPLE} (256 or 384)"
            )
        state_dict, source = official_state_dict(path_or_state_dict, image_size)
        config = {**GPT_CONFIGS[model], "grid_size": image_size // TOKENIZER_DOWNSAMPLE, **overrides}
        with torch.device("meta"):
            transformer = cls(**config)
        transformer.to_empty(device="cpu")
        load_state_dict_strict(transformer, state_dict, source=source, ignore=RECOMPUTED_KEYS)
        return transformer.eval()


def check_file_resolution(file_name: str, image_size: int) -> None:
    """Raise ValueError when a file name such as c2i_B_384.pt names another resolution than `image_size`."""
    match = re.search(r"_(256|384|512)(?![0-9])", file_name)
    if match and int(match.group(1)) != image_size:
        named = int(match.group(1))
        raise ValueError(
            f"{file_name} is a {named} px checkpoint ({named // TOKENIZER_DOWNSAMPLE}x{named // TOKENIZER_DOWNSAMPLE} "
            f"tokens) but image_size={image_size}; pass image_size={named} (vartk convert: --image-size {named})"
        )


def official_state_dict(path_or_state_dict, image_size: int) -> tuple[dict[str, torch.Tensor], str]:
    """The flat state dict of an official file or in-memory dict (unwrapping a training container)
    and a description of where it came from for error messages."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        check_file_resolution(path.name, image_size)
        return read_official_file(path, containers=OFFICIAL_CONTAINERS), f"checkpoint {str(path)!r}"
    for name in OFFICIAL_CONTAINERS:
        if isinstance(path_or_state_dict.get(name), dict):
            return path_or_state_dict[name], f"state dict[{name!r}]"
    return path_or_state_dict, "state dict"
