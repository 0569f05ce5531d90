"""VAR: the next-scale transformer (Visual AutoRegressive modelling, FoundationVision layout).

The image is a pyramid of token maps, 1x1 up to 16x16. Scale k is predicted all at once from the
class token and the (downsampled, cumulative) latents of scales < k. One sequence holds every
scale, small to large; attention is block-causal: bidirectional inside a scale, causal across.

    x = [class token + pos_start, word_embed(latents of scales 2..K)] + lvl_embed + pos_1LC
    for each block:                       (AdaLN: the class embedding sets scale/shift/gate)
        x = x + gamma1 * attn(LN(x) * (1 + scale1) + shift1)
        x = x + gamma2 * ffn(LN(x) * (1 + scale2) + shift2)
    logits = head(LN(x) * (1 + scale) + shift)

Parameter names and shapes follow the official checkpoints (var_d16.pth ... var_d36.pth).
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from timm.layers import drop_path

from vartk.checkpoints import CheckpointError, load_state_dict_strict, read_official_file, unwrap_state_dict
from vartk.models.attention import AttentionView, CacheSpec, KVCache, attention

from vartk.tokenizers.msvq import PATCH_NUMS_256, PATCH_NUMS_512  # 680 tokens at 256 px, 2240 at 512 px

VAR_CONFIGS = {
    "var-d16": dict(depth=16),
    "var-d20": dict(depth=20),
    "var-d24": dict(depth=24),
    "var-d30": dict(depth=30),
    "var-d36": dict(depth=36, shared_aln=True, patch_nums=PATCH_NUMS_512),
}

MAX_LOG_ATTN_SCALE = math.log(100.0)  # clamp of the learned per-head temperature (L2-normalised attention)
RECOMPUTED_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")


class SelfAttention(nn.Module):
    """Multi-head attention; q and v have biases, k does not. With `l2_norm`, q and k are unit
    vectors and q is multiplied by a learned per-head temperature (softmax scale 1)."""

    def __init__(self, width: int, num_heads: int, l2_norm: bool):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads, self.l2_norm = num_heads, l2_norm
        self.scale = 1.0 if l2_norm else 0.25 / math.sqrt(width // num_heads)
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: KVCache | None = None):
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias)  # [B, L, 3C]
        q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=self.num_heads)  # each [B, H, L, D]
        q_proj = q
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(MAX_LOG_ATTN_SCALE).exp()
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.update(k, v)  # [B, H, S, D]: every scale so far
        weights = None
        if cache is not None and cache.wants_attention:  # unfused, so the cache can read the weights
            weights = (q.float() @ k.float().transpose(-1, -2) * self.scale).softmax(dim=-1)  # [B, H, L, S]
            out = (weights @ v.float()).to(v.dtype)  # [B, H, L, D]
        else:
            out = attention(q, k, v, attn_mask=attn_mask, scale=self.scale)  # [B, H, L, D]
        if cache is not None and cache.observes:
            q_proj = q_proj - rearrange(self.q_bias, "(h d) -> h 1 d", h=self.num_heads)  # the raw projection
            cache.observe(AttentionView(q=q, k=k, scale=self.scale, q_proj=q_proj, weights=weights))
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose norms and residual gates are set by the condition.

    Not shared: `ada_lin` maps the class embedding to the six modulation vectors. Shared (d36):
    the model computes them once (`shared_ada_lin`) and each block adds its own `ada_gss`."""

    def __init__(self, width, num_heads, mlp_ratio, l2_norm, shared_aln, norm_eps, drop_path_prob):
        super().__init__()
        self.width, self.drop_path_prob = width, drop_path_prob
        self.attn = SelfAttention(width, num_heads, l2_norm)
        self.ffn = FeedForward(width, round(width * mlp_ratio))
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / math.sqrt(width))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """gamma1, gamma2, scale1, scale2, shift1, shift2, each [B, 1, C]; `cond` is the class
        embedding [B, C], or the shared modulation [B, 1, 6, C] when AdaLN is shared."""
        if hasattr(self, "ada_gss"):
            return (self.ada_gss + cond).unbind(2)
        return self.ada_lin(cond).view(-1, 1, 6, self.width).unbind(2)

    def forward(self, x, cond, attn_mask=None, cache=None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond)
        h = self.attn(self.norm(x) * (1 + scale1) + shift1, attn_mask, cache)
        h = (h * gamma1).to(h.dtype)  # the official gates in place, so the branch keeps attention's dtype
        x = x + drop_path(h, self.drop_path_prob, self.training)
        h = self.ffn(self.norm(x) * (1 + scale2) + shift2) * gamma2
        return x + drop_path(h, self.drop_path_prob, self.training)


class AdaLNBeforeHead(nn.Module):
    """Final norm with condition-dependent scale and shift."""

    def __init__(self, width: int, norm_eps: float):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)  # each [B, 1, C]
        return self.norm(x) * (1 + scale) + shift


class SharedAdaLin(nn.Linear):
    """Condition -> the six modulation vectors of every block at once, [B, 1, 6, C]."""

    def forward(self, cond):
        return super().forward(cond).view(-1, 1, 6, self.out_features // 6)


def block_causal_bias(patch_nums) -> torch.Tensor:
    """Additive mask [1, 1, L, L]: 0 where the key's scale <= the query's scale, -inf elsewhere."""
    level = scale_levels(patch_nums)  # [L]
    allowed = level[None, :] <= level[:, None]  # [L, L] query rows, key columns
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]


def scale_levels(patch_nums) -> torch.Tensor:
    """Scale index of every position of the flattened pyramid, [L] int64."""
    return torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)])


class VARTransformer(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        depth: int = 16,
        width: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        vocab_size: int = 4096,
        latent_channels: int = 32,
        num_classes: int = 1000,
        patch_nums=PATCH_NUMS_256,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        width = width or 64 * depth
        num_heads = num_heads or depth
        self.patch_nums = tuple(patch_nums)
        self.scale_bounds = []  # (begin, end) of each scale in the flattened pyramid
        for pn in self.patch_nums:
            begin = self.scale_bounds[-1][1] if self.scale_bounds else 0
            self.scale_bounds.append((begin, begin + pn * pn))
        self.width, self._num_heads, self._num_classes = width, num_heads, num_classes
        seq_len, first_len = self.scale_bounds[-1][1], self.patch_nums[0] ** 2

        self.pos_start = nn.Parameter(torch.empty(1, first_len, width))
        self.pos_1LC = nn.Parameter(torch.empty(1, seq_len, width))
        self.register_buffer("lvl_1L", scale_levels(self.patch_nums)[None])  # [1, L]
        self.register_buffer("attn_bias_for_masking", block_causal_bias(self.patch_nums))  # [1, 1, L, L]
        self.word_embed = nn.Linear(latent_channels, width)
        self.class_emb = nn.Embedding(num_classes + 1, width)  # last row: the null class
        self.lvl_embed = nn.Embedding(len(self.patch_nums), width)
        if shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(width, 6 * width))
        drop_path_probs = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # 0 -> rate, linearly
        self.blocks = nn.ModuleList(
            AdaLNBlock(width, num_heads, mlp_ratio, attn_l2_norm, shared_aln, norm_eps, p) for p in drop_path_probs
        )
        self.head_nm = AdaLNBeforeHead(width, norm_eps)
        self.head = nn.Linear(width, vocab_size)
        self.init_weights()

    # ------------------------------------------------------------------ sizes used by samplers
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return self._num_heads

    @property
    def head_dim(self) -> int:
        return self.width // self._num_heads

    @property
    def null_class(self) -> int:
        return self._num_classes

    @property
    def seq_len(self) -> int:
        """Tokens in the whole pyramid (680 for the 256 px schedule)."""
        return self.scale_bounds[-1][1]

    def cache_spec(self, rows: int, dtype: torch.dtype | None = None, device=None) -> CacheSpec:
        """What the KV caches of a sampling call with `rows` rows (CFG rows included) hold: every block's keys
        and values, scale by scale; `dtype` defaults to what the blocks compute in (the autocast dtype if on)."""
        device = torch.device(device or self.device)
        return CacheSpec(num_layers=self.num_layers, rows=rows, num_heads=self.num_heads, head_dim=self.head_dim,
                         dtype=dtype or autocast_dtype(device.type, self.dtype), device=device,
                         scale_lengths=tuple(pn * pn for pn in self.patch_nums))

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1.0):
        """Initialise for training from scratch (the official recipe). `init_std < 0` means
        sqrt(1 / (3 * width)); residual gates start near zero (`init_adaln_gamma`)."""
        auto_std = math.sqrt(1 / (3 * self.width))
        std = auto_std if init_std < 0 else init_std
        for tensor in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(tensor, std=auto_std)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * len(self.blocks)))
            block.ffn.fc2.weight.div_(math.sqrt(2 * len(self.blocks)))
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            if block.attn.l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
            if hasattr(block, "ada_gss"):
                modulation = block.ada_gss.normal_(0, 1 / math.sqrt(self.width))[0, 0]  # [6, C]
            else:
                modulation = block.ada_lin[-1].weight.view(6, self.width, -1)  # [6, C, C]
            modulation[:2].mul_(init_adaln_gamma)  # the gates gamma1, gamma2
            modulation[2:].mul_(init_adaln)  # scales and shifts

    # ------------------------------------------------------------------ forward passes
    def condition(self, class_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class embedding [B, C] and what the blocks read from it (itself, or the shared
        modulation [B, 1, 6, C])."""
        cond = self.class_emb(class_labels)  # [B, C]
        block_cond = self.shared_ada_lin(cond) if hasattr(self, "shared_ada_lin") else cond
        return cond, block_cond

    def scale_embedding(self, begin: int, end: int) -> torch.Tensor:
        """Level + absolute position embedding of positions [begin, end), [1, end - begin, C]."""
        return self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]

    def first_scale_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """The class token that starts the sequence, [B, first_len, C]."""
        return cond[:, None] + self.pos_start

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The head's norm in float32 whatever the blocks ran in (as the official get_logits), [B, l, V] float32."""
        normed = self.head_nm(x.float(), cond)  # [B, l, C]
        return self.head(normed.to(self.head.weight.dtype)).float()

    def forward(self, class_labels: torch.Tensor, teacher_forcing_input: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for the whole pyramid.

        class_labels [B] (null class = `num_classes`; label dropout is the caller's job);
        teacher_forcing_input [B, L - 1, Cz] (tokenizer.teacher_forcing_input); returns [B, L, V] float32.
        """
        cond, block_cond = self.condition(class_labels)
        with torch.autocast(self.pos_1LC.device.type, enabled=False):  # the official embeds in the weights' dtype
            latents = teacher_forcing_input.to(self.word_embed.weight.dtype)
            x = torch.cat([self.first_scale_tokens(cond), self.word_embed(latents)], dim=1)  # [B, L, C]
            x = x + self.scale_embedding(0, self.seq_len)
        dtype = autocast_dtype(x.device.type, x.dtype)  # the blocks run in the autocast dtype, residual stream included
        x, block_cond, mask = x.to(dtype), block_cond.to(dtype), self.attn_bias_for_masking.to(dtype)
        for block in self.blocks:
            x = block(x, block_cond, attn_mask=mask)
        return self.logits(x, cond)

    def forward_scale(
        self,
        x_tokens: torch.Tensor | None,
        class_labels: torch.Tensor,
        scale_index: int,
        caches: list[KVCache],
    ) -> torch.Tensor:
        """One sampling step: logits [B, pn^2, V] of scale `scale_index` given the earlier scales
        held in `caches` (one per block, extended here).

        x_tokens: tokenizer.next_scale_input of the previous scale, [B, pn^2, Cz]; None at scale 0.
        """
        if (x_tokens is None) != (scale_index == 0):
            raise ValueError(
                f"x_tokens must be None exactly at scale 0; got scale_index={scale_index} with "
                f"x_tokens {'None' if x_tokens is None else tuple(x_tokens.shape)}"
            )
        if len(caches) != self.num_layers:
            raise ValueError(f"expected one KV cache per block ({self.num_layers}), got {len(caches)}")
        cond, block_cond = self.condition(class_labels)
        if x_tokens is None:
            x = self.first_scale_tokens(cond)  # [B, 1, C]
        else:
            x = self.word_embed(x_tokens.to(self.word_embed.weight.dtype))  # [B, pn^2, C]
        x = x + self.scale_embedding(*self.scale_bounds[scale_index])
        for block, cache in zip(self.blocks, caches):
            x = block(x, block_cond, cache=cache)
        return self.logits(x, cond)

    # ------------------------------------------------------------------ official checkpoints
    @classmethod
    def from_official(cls, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], **overrides):
        """Build from an official `var_d*.pth` file, a training checkpoint laid out like `ar-ckpt-*.pth`
        (weights under ["trainer"]["var_wo_ddp"]; only tensors and plain containers are unpickled) or a
        state dict, inferring the config.

        Depth, width, heads, shared AdaLN, L2-normalised attention and the patch schedule are
        read from the tensors; `overrides` replace inferred config values.
        """
        if isinstance(path_or_state_dict, Mapping):
            state_dict = unwrap_state_dict(dict(path_or_state_dict), ("trainer.var_wo_ddp",))
            source = "state dict"
        else:
            state_dict = read_official_file(path_or_state_dict, containers=("trainer.var_wo_ddp",))
            source = str(path_or_state_dict)
        config = {**infer_official_config(state_dict, source), **overrides}
        if config["patch_nums"] is None:
            raise CheckpointError(
                f"{source}: pos_1LC has {state_dict['pos_1LC'].shape[1]} positions, which matches neither "
                f"{PATCH_NUMS_256} (680) nor {PATCH_NUMS_512} (2240); pass patch_nums=..."
            )
        with torch.device("meta"):
            model = cls(**config)
        model.to_empty(device="cpu")
        model.reset_buffers()
        weights = {k: v for k, v in state_dict.items() if not k.endswith(RECOMPUTED_BUFFERS)}
        load_state_dict_strict(model, weights, source=source, ignore=RECOMPUTED_BUFFERS)
        return model.eval()

    def reset_buffers(self):
        """Recompute the constant buffers (after `to_empty`)."""
        self.lvl_1L.copy_(scale_levels(self.patch_nums)[None])
        self.attn_bias_for_masking.copy_(block_causal_bias(self.patch_nums))
        for block in self.blocks:
            block.attn.zero_k_bias.zero_()


def autocast_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype autocast computes in on `device_type`, or `default` when autocast is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def infer_official_config(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """VARTransformer config from the tensors of an official checkpoint (patch_nums None when
    the number of positions matches no known schedule)."""
    required = ("pos_1LC", "class_emb.weight", "word_embed.weight", "head.weight", "blocks.0.ffn.fc1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise CheckpointError(f"{source} is not a VAR transformer checkpoint: missing keys {missing}")
    seq_len, width = state_dict["pos_1LC"].shape[1:]
    schedules = {sum(pn * pn for pn in pns): pns for pns in (PATCH_NUMS_256, PATCH_NUMS_512)}
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    scale_mul = state_dict.get("blocks.0.attn.scale_mul_1H11")
    return dict(
        depth=depth,
        width=width,
        num_heads=scale_mul.shape[1] if scale_mul is not None else depth,
        mlp_ratio=state_dict["blocks.0.ffn.fc1.weight"].shape[0] / width,
        vocab_size=state_dict["head.weight"].shape[0],
        latent_channels=state_dict["word_embed.weight"].shape[1],
        num_classes=state_dict["class_emb.weight"].shape[0] - 1,
        patch_nums=schedules.get(seq_len),  # None: unknown schedule, the caller must give it
        shared_aln="shared_ada_lin.1.weight" in state_dict,
        attn_l2_norm=scale_mul is not None,
    )
