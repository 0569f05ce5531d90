"""Single-scale VQ tokenizer, compatible with LlamaGen's `vq_ds16_c2i.pt` (VQ-16) and `vq_ds8_c2i.pt` (VQ-8).

Encoder -> 1x1 quant_conv to a small code dimension -> nearest code among L2-normalised codebook
rows (the encoder output is L2-normalised too) -> 1x1 post_quant_conv -> decoder. Tokens are the
code indices in raster order (row-major over the h x w latent grid).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from ..checkpoints import load_state_dict_strict, read_official_file
from .codebook import codebook_loss, entropy_loss
from .convnet import (
    LLAMAGEN_LAYOUT, Decoder, Encoder, check_image_values, check_token_ids, infer_encoder_config,
)

VQ_16 = dict(ch_mult=(1, 1, 2, 2, 4))
VQ_8 = dict(ch_mult=(1, 2, 2, 4))


class VectorQuantizer(nn.Module):
    """Codebook (`embedding`) and the training-time usage queue (`codebook_used`), official key names."""

    def __init__(self, codebook_size: int, embed_dim: int, l2_norm: bool, usage_queue_size: int):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.register_buffer("codebook_used", torch.zeros(usage_queue_size))  # last indices seen in training

    def codebook(self) -> torch.Tensor:
        """Codebook rows as used for lookup: [V, D], L2-normalised when configured."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def normalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output [B, D, h, w], L2-normalised over D when configured."""
        return F.normalize(z, dim=1) if self.l2_norm else z

    def lookup_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """What the codebook is compared with at every position of z [B, D, h, w]: [B*h*w, D] (float32)."""
        return rearrange(self.normalize_latent(z.float()), "b d h w -> (b h w) d")

    @staticmethod
    def distances(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances [N, V] between lookup vectors [N, D] and codes [V, D], as LlamaGen computes them."""
        return vectors.square().sum(1, keepdim=True) + codes.square().sum(1) - 2 * vectors @ codes.T

    def nearest_code(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row (squared L2, fp32) for every position of z [B, D, h, w] -> [B, h, w]."""
        dist = self.distances(self.lookup_vectors(z), self.codebook().detach().float())  # [B*h*w, V]
        return dist.argmin(dim=1).view(z.shape[0], *z.shape[2:])

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token map [B, h, w] -> codes [B, D, h, w]."""
        return rearrange(self.codebook()[tokens], "b h w d -> b d h w")

    @torch.no_grad()
    def record_usage(self, tokens: torch.Tensor) -> torch.Tensor:
        """Push `tokens` into the usage queue; returns the fraction of the codebook seen in the queue."""
        recent = tokens.flatten()[-self.codebook_used.numel() :].to(self.codebook_used.dtype)
        self.codebook_used.copy_(torch.cat([self.codebook_used[recent.numel() :], recent]))
        return self.codebook_used.unique().numel() / self.embedding.num_embeddings


class VQModel(ModelMixin, ConfigMixin):
    """LlamaGen's VQ tokenizer; images in [0, 1] at the API, [-1, 1] inside."""

    token_modules = ("encoder", "quant_conv", "quantize")  # what decides an image's tokens

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        codebook_size: int = 16384,
        codebook_embed_dim: int = 8,
        codebook_l2_norm: bool = True,
        beta: float = 0.25,
        dropout: float = 0.0,
        norm_groups: int = 32,
        usage_queue_size: int = 65536,
    ):
        super().__init__()
        net = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels)
        net.update(dropout=dropout, norm_groups=norm_groups)
        self.encoder = Encoder(LLAMAGEN_LAYOUT, in_channels=in_channels, **net)
        self.decoder = Decoder(LLAMAGEN_LAYOUT, out_channels=in_channels, **net)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, codebook_l2_norm, usage_queue_size)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, kernel_size=1)

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def latent_channels(self) -> int:
        return self.config.codebook_embed_dim

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] -> pre-quantisation latent [B, D, H/f, W/f] (after quant_conv)."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}")
        return self.quant_conv(self.encoder(images.to(self.quant_conv.weight.dtype) * 2 - 1))

    def decode_latent(self, codes: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Codes [B, D, h, w] -> images [B, C, f*h, f*w] in [0, 1] (clamp=False: the decoder's output on the same
        scale, not clamped)."""
        x = self.decoder(self.post_quant_conv(codes.to(self.post_quant_conv.weight.dtype)))
        return ((x.clamp(-1, 1) if clamp else x) + 1) / 2  # clamp=False: a resize may follow

    def code_vectors(self) -> torch.Tensor:
        """The vector the decoder receives for each token id, float32 [V, D] (L2-normalised when configured)."""
        return self.quantize.codebook().detach().float()

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token map [B, h, w] or square [B, h*w] -> (normalised) codes [B, D, h, w]."""
        if tokens.ndim == 2:
            side = round(tokens.shape[1] ** 0.5)
            if side * side != tokens.shape[1]:
                raise ValueError(f"flat tokens [B, N] need a square N, got N={tokens.shape[1]}; pass [B, h, w] instead")
            tokens = tokens.reshape(tokens.shape[0], side, side)
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be [B, h, w] or [B, h*w], got {tuple(tokens.shape)}")
        return self.quantize.lookup(tokens)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] -> token map LongTensor [B, H/f, W/f]."""
        check_image_values(images)
        return self.quantize.nearest_code(self.encode_latent(images))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | list[torch.Tensor], clamp: bool = True) -> torch.Tensor:
        """Token map [B, h, w] or [B, h*w] (square) -> images [B, C, f*h, f*w] in [0, 1] (clamp: see
        `decode_latent`). A one-map list, as a single-scale MultiScaleVQVAE encodes, is taken too."""
        if isinstance(tokens, (list, tuple)):
            if len(tokens) != 1:
                raise ValueError(f"a VQModel has one scale; got a list of {len(tokens)} token maps")
            tokens = tokens[0]
        check_token_ids(tokens, self.vocab_size)
        return self.decode_latent(self.embed_tokens(tokens), clamp)

    def forward(self, images: torch.Tensor, entropy_temperature: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Training forward: images in [0, 1] -> (reconstruction in ~[0, 1] (not clamped), vq_loss, stats).

        vq_loss = MSE(codes, z.detach()) + beta * MSE(codes.detach(), z) on the normalised vectors;
        the decoder reads the codes through a straight-through estimator. With `entropy_temperature` > 0,
        stats["entropy"] is LlamaGen's entropy loss of the lookups (`codebook.entropy_loss`).
        """
        z = self.quantize.normalize_latent(self.encode_latent(images).float())  # [B, D, h, w]
        tokens = self.quantize.nearest_code(z)  # [B, h, w]
        codes = self.quantize.lookup(tokens).float()  # [B, D, h, w]
        vq_loss = codebook_loss(codes, z, self.config.beta)
        codes_straight_through = z + (codes - z).detach()
        stats = {"codebook_usage": self.quantize.record_usage(tokens) if self.training else None,
                 "code_hits": torch.bincount(tokens.flatten(), minlength=self.vocab_size).float()}  # [V]
        if entropy_temperature > 0:
            distances = self.quantize.distances(self.quantize.lookup_vectors(z), self.quantize.codebook().float())
            stats["entropy"] = entropy_loss(distances, entropy_temperature)
        features = self.post_quant_conv(codes_straight_through.to(self.post_quant_conv.weight.dtype))
        recon = (self.decoder(features) + 1) / 2
        return recon, vq_loss, stats

    @torch.no_grad()
    def quantizer_lookups(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the quantiser compares with the codebook for the latent z [B, D, h, w] (after quant_conv), and the
        codes it picks: (vectors [B*h*w, D] float32, tokens [B*h*w])."""
        return self.quantize.lookup_vectors(z), self.quantize.nearest_code(z).flatten()

    @classmethod
    def from_official(cls, path_or_state_dict, **overrides) -> "VQModel":
        """Load LlamaGen's `vq_ds16_c2i.pt` / `vq_ds8_c2i.pt` (`{"model": sd}` or a bare state dict).

        VQ-16 vs VQ-8 (ch_mult) and the codebook size are read off the tensors.
        """
        if isinstance(path_or_state_dict, dict):
            state_dict = path_or_state_dict.get("model", path_or_state_dict)
        else:
            state_dict = read_official_file(path_or_state_dict, containers=("model",))
        config = infer_encoder_config(state_dict, LLAMAGEN_LAYOUT)
        if "quantize.embedding.weight" in state_dict:
            config["codebook_size"], config["codebook_embed_dim"] = state_dict["quantize.embedding.weight"].shape
        config.update(overrides)
        model = cls(**config)
        source = "state dict" if isinstance(path_or_state_dict, dict) else str(path_or_state_dict)
        load_state_dict_strict(model, state_dict, source=source, ignore=("quantize.codebook_used",))
        return model.eval()
