"""Convolutional encoder / decoder shared by the VAR and LlamaGen tokenizers.

Both official tokenizers use the same LDM/taming "VQGAN" network: per resolution level a few
ResnetBlocks (followed by spatial self-attention at the lowest resolution), a down- or
up-sampling conv between levels, and a [Resnet, Attention, Resnet] middle. They differ only
in the names of the modules (and so in state-dict keys) and in whether attention projects
q, k, v with one fused conv or three. `KeyLayout` records those differences, so one `Encoder`
and one `Decoder` produce either official layout exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints import CheckpointError


def check_image_values(images: torch.Tensor) -> None:
    """Raise one ValueError unless `images` are floats in [0, 1] (NaN fails too): one reduction, one sync."""
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got {images.dtype} (divide uint8 images by 255)")
    low, high = torch.aminmax(images.detach())
    if not 0 <= low <= high <= 1:
        raise ValueError(f"images must hold finite values in [0, 1], got [{low:.3g}, {high:.3g}] (divide uint8 "
                         "images by 255)")


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """Raise one ValueError unless `tokens` are integer ids in [0, vocab_size)."""
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer ids in [0, {vocab_size}), got {tokens.dtype}")
    low, high = torch.aminmax(tokens)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token {int(low if low < 0 else high)} is outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class KeyLayout:
    """Module names of one official tokenizer family."""

    encoder_levels: str  # attribute holding the encoder's resolution levels
    decoder_levels: str  # attribute holding the decoder's resolution levels
    blocks: str  # attribute holding the ResnetBlocks inside a level
    fused_qkv: bool  # attention projects q, k, v with one 3C conv (`qkv`) instead of `q`, `k`, `v`
    named_mid: bool  # middle is `mid.block_1/attn_1/block_2` instead of `mid.0/1/2`
    decoder_levels_ascending: bool  # decoder levels stored highest resolution first (run in reverse)


VAR_LAYOUT = KeyLayout("down", "up", "block", fused_qkv=True, named_mid=True, decoder_levels_ascending=True)
LLAMAGEN_LAYOUT = KeyLayout(
    "conv_blocks", "conv_blocks", "res", fused_qkv=False, named_mid=False, decoder_levels_ascending=False
)


def Normalize(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6 as in both official tokenizers."""
    if channels % num_groups:
        raise ValueError(f"norm_groups={num_groups} must divide every channel count; it does not divide {channels}")
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> dropout -> conv3x3, plus a (1x1 when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map, with a residual add."""

    def __init__(self, channels: int, fused_qkv: bool, norm_groups: int = 32):
        super().__init__()
        self.fused_qkv = fused_qkv
        self.norm = Normalize(channels, norm_groups)
        if fused_qkv:
            self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        else:
            self.q = nn.Conv2d(channels, channels, kernel_size=1)
            self.k = nn.Conv2d(channels, channels, kernel_size=1)
            self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = self.qkv(h).chunk(3, dim=1) if self.fused_qkv else (self.q(h), self.k(h), self.v(h))
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(2, 3) for t in (q, k, v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C], softmax scale C^-0.5
        out = out.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResnetBlocks (each followed by attention when `with_attn`), then an optional resample."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        with_attn: bool,
        resample: str | None,
        layout: KeyLayout,
        dropout: float,
        norm_groups: int,
    ):
        super().__init__()
        self.blocks_name = layout.blocks
        channels = [in_channels] + [out_channels] * num_blocks
        self.add_module(
            layout.blocks,
            nn.ModuleList(ResnetBlock(c_in, out_channels, dropout, norm_groups) for c_in in channels[:-1]),
        )
        self.attn = nn.ModuleList(
            AttnBlock(out_channels, layout.fused_qkv, norm_groups) for _ in range(num_blocks if with_attn else 0)
        )
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(getattr(self, self.blocks_name)):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


class NamedMid(nn.Module):
    """VAR's middle: `block_1`, `attn_1`, `block_2`."""

    def __init__(self, channels: int, layout: KeyLayout, dropout: float, norm_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, layout.fused_qkv, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def build_mid(channels: int, layout: KeyLayout, dropout: float, norm_groups: int) -> nn.Module:
    """[Resnet, Attention, Resnet] at the lowest resolution, named as `layout` wants."""
    if layout.named_mid:
        return NamedMid(channels, layout, dropout, norm_groups)
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout, norm_groups),
        AttnBlock(channels, layout.fused_qkv, norm_groups),
        ResnetBlock(channels, channels, dropout, norm_groups),
    )


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> features [B, z_channels, H/2^(n-1), W/2^(n-1)] for n = len(ch_mult)."""

    def __init__(
        self,
        layout: KeyLayout,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        channels = [ch] + [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        levels = nn.ModuleList(
            Level(
                channels[i],
                channels[i + 1],
                num_res_blocks,
                with_attn=i == last,
                resample=None if i == last else "down",
                layout=layout,
                dropout=dropout,
                norm_groups=norm_groups,
            )
            for i in range(len(ch_mult))
        )
        self.levels_name = layout.encoder_levels
        self.add_module(layout.encoder_levels, levels)
        self.mid = build_mid(channels[-1], layout, dropout, norm_groups)
        self.norm_out = Normalize(channels[-1], norm_groups)
        self.conv_out = nn.Conv2d(channels[-1], z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in getattr(self, self.levels_name):
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features [B, z_channels, h, w] -> image [B, out_channels, h*2^(n-1), w*2^(n-1)] (not clamped)."""

    def __init__(
        self,
        layout: KeyLayout,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        top_channels = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top_channels, kernel_size=3, padding=1)
        self.mid = build_mid(top_channels, layout, dropout, norm_groups)
        run_order = []  # lowest resolution first
        in_channels = top_channels
        for i in reversed(range(len(ch_mult))):
            run_order.append(
                Level(
                    in_channels,
                    ch * ch_mult[i],
                    num_res_blocks + 1,
                    with_attn=i == len(ch_mult) - 1,
                    resample="up" if i > 0 else None,
                    layout=layout,
                    dropout=dropout,
                    norm_groups=norm_groups,
                )
            )
            in_channels = ch * ch_mult[i]
        self.levels_name = layout.decoder_levels
        self.levels_ascending = layout.decoder_levels_ascending
        stored = run_order[::-1] if layout.decoder_levels_ascending else run_order
        self.add_module(layout.decoder_levels, nn.ModuleList(stored))
        self.norm_out = Normalize(in_channels, norm_groups)
        self.conv_out = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        levels = getattr(self, self.levels_name)
        for level in reversed(levels) if self.levels_ascending else levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def infer_encoder_config(state_dict: dict[str, torch.Tensor], layout: KeyLayout) -> dict:
    """Read `in_channels`, `ch`, `ch_mult`, `num_res_blocks`, `z_channels` off an official encoder's weights."""
    prefix = f"encoder.{layout.encoder_levels}."
    expected = ("encoder.conv_in.weight", f"{prefix}0.{layout.blocks}.0.conv1.weight", "encoder.conv_out.weight")
    absent = [key for key in expected if key not in state_dict]
    if absent:
        family = "LlamaGen VQ" if layout == LLAMAGEN_LAYOUT else "VAR VAE"
        raise CheckpointError(f"not a {family} file: it has no {absent} (a {family} has {list(expected)}); "
                              f"its first keys are {sorted(state_dict)[:5]}")
    ch, in_channels = state_dict["encoder.conv_in.weight"].shape[:2]
    num_levels = 1 + max(int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix))
    first_level = f"{prefix}0.{layout.blocks}."
    num_res_blocks = 1 + max(
        int(k[len(first_level) :].split(".")[0]) for k in state_dict if k.startswith(first_level)
    )
    ch_mult = tuple(
        state_dict[f"{prefix}{i}.{layout.blocks}.0.conv1.weight"].shape[0] // ch for i in range(num_levels)
    )
    z_channels = state_dict["encoder.conv_out.weight"].shape[0]
    return dict(
        in_channels=int(in_channels),
        ch=int(ch),
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        z_channels=int(z_channels),
    )
