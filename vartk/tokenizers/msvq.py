"""Multi-scale residual VQ-VAE, compatible with VAR's `vae_ch160v4096z32.pth`.

An image is encoded to a latent f [B, Cz, h, w] (h = w = patch_nums[-1]) and described by K token
maps of growing size pn_1 < ... < pn_K = h. Scale k quantises the area-downsampled residual that
the previous scales left, and adds its contribution phi(bicubic_up(codes)) to the running latent
f_hat; decoding sums the same contributions. phi(x) = (1 - r) x + r conv3x3(x) and the K scales
share a few phi convs (the "ticks" rule picks which one, `phi_indices`).

The next-scale transformer reads the running latent area-downsampled to the next scale; the
helpers `fold_scale`, `next_scale_input` and `teacher_forcing_input` build exactly that.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from ..checkpoints import load_state_dict_strict, read_official_file
from .codebook import codebook_loss, entropy_loss
from .convnet import (
    VAR_LAYOUT, Decoder, Encoder, check_image_values, check_token_ids, infer_encoder_config,
)

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
VAE_256 = dict(  # vae_ch160v4096z32.pth with the 256 px schedule (= the defaults)
    ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32, vocab_size=4096, patch_nums=PATCH_NUMS_256
)


def phi_indices(num_scales: int, num_phis: int) -> list[int]:
    """Which of `num_phis` shared phi convs each of `num_scales` scales uses (the official "ticks" rule).

    Scale s sits at t = s / (K - 1) in [0, 1] and takes the phi whose tick is nearest; the ticks are
    evenly spaced with a margin of 1/(3n) for n == 4 phis and 1/(2n) otherwise. A single scale sits at t = 0.
    """
    margin = 1 / 3 / num_phis if num_phis == 4 else 1 / 2 / num_phis
    ticks = np.linspace(margin, 1 - margin, num_phis)
    positions = [s / (num_scales - 1) if num_scales > 1 else 0.0 for s in range(num_scales)]
    return [int(np.argmin(np.abs(ticks - t))) for t in positions]


class Phi(nn.Conv2d):
    """phi(x) = (1 - r) x + r conv3x3(x)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = super().forward(x.to(self.weight.dtype)).to(x.dtype)
        return x * (1 - self.ratio) + conv * self.ratio


class PhiBank(nn.Module):
    """The shared phi convs (`qresi_ls`), indexed by scale."""

    def __init__(self, channels: int, ratio: float, num_phis: int, num_scales: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(num_phis))
        self.index_of_scale = phi_indices(num_scales, num_phis)

    def forward(self, x: torch.Tensor, scale_index: int) -> torch.Tensor:
        return self.qresi_ls[self.index_of_scale[scale_index]](x)


class MultiScaleQuantizer(nn.Module):
    """Codebook, phi convs and the codebook-usage buffer (official key names under `quantize.`).

    With `codebook_dim` D > 0 the codes are factorized (LlamaGen's VQ, ViT-VQGAN): `in_proj` maps a residual to D
    dims, where it is L2-normalised and matched to the nearest L2-normalised code (cosine); `out_proj` maps the
    code back to the latent's channels. D = 0 is VAR's lookup: full-width codes, plain L2.
    """

    def __init__(self, vocab_size: int, channels: int, num_scales: int, quant_resi: float, share_quant_resi: int,
                 codebook_dim: int = 0):
        super().__init__()
        self.factorized = codebook_dim > 0
        self.embedding = nn.Embedding(vocab_size, codebook_dim or channels)
        self.quant_resi = PhiBank(channels, quant_resi, share_quant_resi, num_scales)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(num_scales, vocab_size))  # [S, V] usage statistics
        if self.factorized:
            self.in_proj = nn.Linear(channels, codebook_dim)  # residual -> lookup space
            self.out_proj = nn.Linear(codebook_dim, channels)  # code -> latent

    def lookup_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """What the codebook is compared with at every position of z [B, C, h, w]: [B*h*w, D] (float32)."""
        z_flat = rearrange(z, "b c h w -> (b h w) c").float()  # [B*h*w, C]
        if not self.factorized:
            return z_flat
        return F.normalize(F.linear(z_flat, self.in_proj.weight.float(), self.in_proj.bias.float()), dim=1)

    def codebook(self) -> torch.Tensor:
        """Codebook rows as looked up, float32 [V, D] (L2-normalised when factorized)."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=1) if self.factorized else weight

    def code_vectors(self) -> torch.Tensor:
        """What each token id adds to the latent before phi, float32 [V, C] (carries gradients)."""
        codes = self.codebook()  # [V, D]
        if not self.factorized:
            return codes
        return F.linear(codes, self.out_proj.weight.float(), self.out_proj.bias.float())

    @staticmethod
    def distances(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances [N, V] between lookup vectors [N, D] and codes [V, D], as VAR computes them."""
        dist = vectors.square().sum(1, keepdim=True) + codes.square().sum(1)  # [N, V]
        return torch.addmm(dist, vectors, codes.T, beta=1, alpha=-2)

    def nearest_code(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (fp32) for every position of z [B, C, h, w] -> [B, h, w]."""
        dist = self.distances(self.lookup_vectors(z), self.codebook().detach())
        return dist.argmin(dim=1).view(z.shape[0], *z.shape[2:])


class MultiScaleVQVAE(ModelMixin, ConfigMixin):
    """VAR's multi-scale residual VQ-VAE; images in [0, 1] at the API, [-1, 1] inside.

    `codebook_dim` > 0 (not in VAR) factorizes the codes: L2-normalised, of that size (see MultiScaleQuantizer).
    """

    # The submodules that decide an image's tokens (and the transformer's input latents); the rest decodes.
    token_modules = ("encoder", "quant_conv", "quantize")
    optional_config_fields = ("codebook_dim",)  # folders saved before it existed hold VAR's codes

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 32,
        vocab_size: int = 4096,
        patch_nums: tuple[int, ...] = PATCH_NUMS_256,
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        dropout: float = 0.0,
        norm_groups: int = 32,
        codebook_dim: int = 0,
    ):
        super().__init__()
        patch_nums = tuple(int(pn) for pn in patch_nums)
        if not patch_nums or list(patch_nums) != sorted(set(patch_nums)) or patch_nums[0] < 1:
            raise ValueError(f"patch_nums must be positive and strictly increasing, got {patch_nums}")
        if not 0 < quant_resi <= 1:
            raise ValueError(f"quant_resi is the phi conv ratio r in (0, 1], got {quant_resi}")
        if share_quant_resi < 1:
            raise ValueError(f"share_quant_resi is the number of shared phi convs (>= 1), got {share_quant_resi}")
        if codebook_dim < 0:
            raise ValueError(f"codebook_dim is the size of factorized codes (> 0) or 0 for VAR's full-width codes, "
                             f"got {codebook_dim}")
        self._patch_nums = patch_nums
        net = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels)
        net.update(dropout=dropout, norm_groups=norm_groups)
        self.encoder = Encoder(VAR_LAYOUT, in_channels=in_channels, **net)
        self.decoder = Decoder(VAR_LAYOUT, out_channels=in_channels, **net)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, len(patch_nums), quant_resi, share_quant_resi,
                                            codebook_dim)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, kernel_size=3, padding=1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, kernel_size=3, padding=1)

    # ---------------------------------------------------------------- properties
    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self._patch_nums

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    @property
    def latent_size(self) -> int:
        return self._patch_nums[-1]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def num_scales(self) -> int:
        return len(self._patch_nums)

    # ---------------------------------------------------------------- image <-> latent
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] -> latent f [B, Cz, H/f, W/f] (f = downsample_factor, after quant_conv)."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}")
        x = images.to(self.quant_conv.weight.dtype) * 2 - 1
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, f_hat: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Running latent f_hat [B, Cz, h, w] -> images [B, C, h * downsample_factor, w * downsample_factor] in [0, 1]
        (clamp=False: the decoder's output on the same scale, not clamped)."""
        x = self.decoder(self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype)))
        return ((x.clamp(-1, 1) if clamp else x) + 1) / 2  # clamp=False: a resize may follow

    # ---------------------------------------------------------------- running latent
    def code_vectors(self) -> torch.Tensor:
        """The vector each token id adds to the latent (before phi), float32 [V, Cz]."""
        return self.quantize.code_vectors().detach()

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token map [B, pn, pn] or [B, pn*pn] -> code vectors [B, Cz, pn, pn] (float32)."""
        B, pn = tokens.shape[0], _side(tokens)
        codes = self.quantize.code_vectors()[tokens.reshape(B, pn, pn)]  # [B, pn, pn, Cz]
        return rearrange(codes, "b h w c -> b c h w")

    def scale_contribution(self, scale_index: int, h: torch.Tensor) -> torch.Tensor:
        """What scale `scale_index` adds to the running latent: phi(bicubic_up(h)), no upsampling at the last scale."""
        self._check_scale_index(scale_index)
        if scale_index < self.num_scales - 1:
            h = F.interpolate(h, size=(self.latent_size, self.latent_size), mode="bicubic")
        return self.quantize.quant_resi(h, scale_index)

    def fold_scale(self, f_hat: torch.Tensor, scale_index: int, h: torch.Tensor) -> torch.Tensor:
        """Add scale `scale_index`'s codes h [B, Cz, pn, pn] to f_hat [B, Cz, H, W]; returns a new tensor."""
        return f_hat + self.scale_contribution(scale_index, h)

    def next_scale_input(self, f_hat: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Running latent after scale `scale_index`, area-downsampled to the next scale: [B, pn_next^2, Cz]."""
        self._check_scale_index(scale_index)
        if scale_index == self.num_scales - 1:
            raise ValueError(f"scale {scale_index} is the last of {self.num_scales} scales; there is no next scale")
        pn = self._patch_nums[scale_index + 1]
        return rearrange(F.interpolate(f_hat, size=(pn, pn), mode="area"), "b c h w -> b (h w) c")

    def new_running_latent(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """An empty running latent f_hat: zeros [B, Cz, h, w] float32."""
        size = self.latent_size
        return torch.zeros(batch_size, self.latent_channels, size, size, device=device or self.device)

    def tokens_to_latent(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale token maps -> running latent f_hat [B, Cz, h, w] after all scales."""
        tokens = self._check_tokens(tokens)
        f_hat = self.new_running_latent(tokens[0].shape[0], tokens[0].device)
        for scale_index, scale_tokens in enumerate(tokens):
            f_hat = self.fold_scale(f_hat, scale_index, self.embed_tokens(scale_tokens))
        return f_hat

    def teacher_forcing_input(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """The transformer's input for scales 2..K given all token maps: [B, L - pn_1^2, Cz] (L = sum pn^2)."""
        tokens = self._check_tokens(tokens)
        f_hat = self.new_running_latent(tokens[0].shape[0], tokens[0].device)
        inputs = []
        for scale_index, scale_tokens in enumerate(tokens[:-1]):
            f_hat = self.fold_scale(f_hat, scale_index, self.embed_tokens(scale_tokens))
            inputs.append(self.next_scale_input(f_hat, scale_index))
        if not inputs:
            return f_hat.new_zeros(f_hat.shape[0], 0, self.latent_channels)
        return torch.cat(inputs, dim=1)

    # ---------------------------------------------------------------- quantisation
    def iter_residual_lookups(self, f: torch.Tensor):
        """Residual multi-scale quantisation of f [B, Cz, h, w], one scale at a time (small to large).

        Yields (the residual z [B, Cz, pn, pn] that scale looks up, its token map [B, pn, pn], the running latent
        f_hat [B, Cz, h, w] after it), in float32; z carries gradients to f, f_hat to the codebook and phi convs.
        Callers disable autocast around it.
        """
        if f.shape[-2:] != (self.latent_size, self.latent_size):
            raise ValueError(
                f"latent is {tuple(f.shape[-2:])} but patch_nums {self._patch_nums} ends at {self.latent_size}; "
                f"use images of {self.latent_size * self.downsample_factor} px or another patch_nums"
            )
        f_rest = f.float()
        f_hat = torch.zeros_like(f_rest)
        for scale_index, pn in enumerate(self._patch_nums):
            last = scale_index == self.num_scales - 1
            z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")  # [B, Cz, pn, pn]
            scale_tokens = self.quantize.nearest_code(z)  # [B, pn, pn]
            contribution = self.scale_contribution(scale_index, self.embed_tokens(scale_tokens))
            f_hat = f_hat + contribution
            f_rest = f_rest - contribution.detach()
            yield z, scale_tokens, f_hat

    def iter_residual_quantize(self, f: torch.Tensor):
        """`iter_residual_lookups` without the residuals: yields (token map, running latent f_hat) per scale."""
        for _, scale_tokens, f_hat in self.iter_residual_lookups(f):
            yield scale_tokens, f_hat

    def quantize_latent(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Latent f [B, Cz, h, w] -> token maps, one LongTensor [B, pn, pn] per scale."""
        with torch.autocast(f.device.type, enabled=False):
            return [scale_tokens for scale_tokens, _ in self.iter_residual_quantize(f)]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images [B, C, H, W] in [0, 1] -> token maps, one LongTensor [B, pn, pn] per scale (small to large)."""
        check_image_values(images)
        return self.quantize_latent(self.encode_latent(images))

    @torch.no_grad()
    def decode(self, tokens: list[torch.Tensor] | torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Token maps (one per scale, [B, pn, pn] or [B, pn*pn]) -> images [B, C, H, W] in [0, 1] (clamp: see
        `decode_latent`).

        With a single-scale config a bare tensor [B, h, w] or [B, h*w] is accepted too.
        """
        if isinstance(tokens, torch.Tensor):
            if self.num_scales != 1:
                raise ValueError(
                    f"a bare token tensor only decodes with a single-scale config; this one has patch_nums "
                    f"{self._patch_nums}: pass a list of {self.num_scales} token maps"
                )
            tokens = [tokens]
        check_token_ids(torch.cat([t.flatten() for t in self._check_tokens(tokens)]), self.vocab_size)
        return self.decode_latent(self.tokens_to_latent(tokens), clamp)

    # ---------------------------------------------------------------- training
    def forward(self, images: torch.Tensor, entropy_temperature: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Training forward: images in [0, 1] -> (reconstruction in ~[0, 1] (not clamped), vq_loss, stats).

        vq_loss = mean over scales of beta * MSE(f_hat.detach(), f) + MSE(f_hat, f.detach()), where f_hat
        is the running latent after each scale; the decoder reads f through a straight-through estimator.
        Factorized codes add, per scale, LlamaGen's loss in the lookup space (`lookup_loss`). With
        `entropy_temperature` > 0, stats["entropy"] is the entropy loss (`codebook.entropy_loss`) of all scales'
        lookups together.
        """
        f = self.encode_latent(images)
        with torch.autocast(f.device.type, enabled=False):
            f32 = f.float()
            vq_loss = f32.new_zeros(())
            hits, distances = [], []
            for z, scale_tokens, f_hat in self.iter_residual_lookups(f32):
                commitment = F.mse_loss(f_hat.detach(), f32)
                vq_loss = vq_loss + self.config.beta * commitment + F.mse_loss(f_hat, f32.detach())
                if self.quantize.factorized:
                    vq_loss = vq_loss + self.lookup_loss(z, scale_tokens)
                if entropy_temperature > 0:
                    vectors = self.quantize.lookup_vectors(z)  # [B*pn*pn, D]
                    distances.append(self.quantize.distances(vectors, self.quantize.codebook()))
                hits.append(scale_tokens.flatten().bincount(minlength=self.vocab_size).float())  # [V]
            vq_loss = vq_loss / self.num_scales
            f_straight_through = f32 + (f_hat - f32).detach()
        hits = torch.stack(hits)  # [S, V]
        if self.training:
            self._update_usage(hits)
        recon = (self.decoder(self.post_quant_conv(f_straight_through.to(f.dtype))) + 1) / 2
        stats = {"codebook_usage": (hits.sum(0) > 0).float().mean().detach(), "code_hits": hits.sum(0)}
        if distances:
            stats["entropy"] = entropy_loss(torch.cat(distances), entropy_temperature)
        return recon, vq_loss, stats

    def lookup_loss(self, z: torch.Tensor, scale_tokens: torch.Tensor) -> torch.Tensor:
        """LlamaGen's quantiser loss between the lookup vectors of residual z [B, Cz, pn, pn] and the codes they
        picked [B, pn, pn]: it trains `in_proj` (and, through z, the encoder) and the codes' directions."""
        codes = self.quantize.codebook()[scale_tokens.flatten()]  # [B*pn*pn, D]
        return codebook_loss(codes, self.quantize.lookup_vectors(z), self.config.beta)

    @torch.no_grad()
    def quantizer_lookups(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the quantiser compares with the codebook for latent f [B, Cz, h, w], and the codes it picks: every
        scale's residual (area-downsampled to pn x pn) in the lookup space, scale by scale -> (vectors
        [B * sum(pn^2), D] float32, tokens [B * sum(pn^2)])."""
        with torch.autocast(f.device.type, enabled=False):
            steps = [(self.quantize.lookup_vectors(z), scale_tokens.flatten())
                     for z, scale_tokens, _ in self.iter_residual_lookups(f)]
        return torch.cat([vectors for vectors, _ in steps]), torch.cat([tokens for _, tokens in steps])

    @torch.no_grad()
    def residual_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """The vectors the quantiser looks up for these images (`quantizer_lookups` of their latent) -> [N, D]."""
        with torch.autocast(images.device.type, enabled=False):
            return self.quantizer_lookups(self.encode_latent(images))[0]

    @torch.no_grad()
    def _update_usage(self, hits: torch.Tensor) -> None:
        """Exponential moving average of per-scale code hits [S, V] (the `ema_vocab_hit_SV` buffer)."""
        self.quantize.ema_vocab_hit_SV.mul_(0.99).add_(hits, alpha=0.01)

    # ---------------------------------------------------------------- checks
    def _check_scale_index(self, scale_index: int) -> None:
        if not 0 <= scale_index < self.num_scales:
            raise IndexError(f"scale_index {scale_index} out of range for {self.num_scales} scales {self._patch_nums}")

    def _check_tokens(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(tokens) != self.num_scales:
            raise ValueError(
                f"expected {self.num_scales} token maps for patch_nums {self._patch_nums}, got {len(tokens)}"
            )
        for scale_index, (scale_tokens, pn) in enumerate(zip(tokens, self._patch_nums)):
            if scale_tokens[0].numel() != pn * pn:
                raise ValueError(
                    f"token map {scale_index} has shape {tuple(scale_tokens.shape)}; "
                    f"expected [B, {pn}, {pn}] or [B, {pn * pn}]"
                )
        return list(tokens)

    # ---------------------------------------------------------------- official checkpoints
    @classmethod
    def from_official(
        cls, path_or_state_dict, patch_nums: tuple[int, ...] | None = None, **overrides
    ) -> "MultiScaleVQVAE":
        """Load VAR's `vae_ch160v4096z32.pth` (or its state dict); the network size is read off the tensors.

        `patch_nums` defaults to the 256 px schedule; pass `PATCH_NUMS_512` for VAR-d36 (same weights).
        """
        state_dict = (
            read_official_file(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else path_or_state_dict
        )
        config = infer_encoder_config(state_dict, VAR_LAYOUT)
        if "quantize.embedding.weight" in state_dict:
            config["vocab_size"] = state_dict["quantize.embedding.weight"].shape[0]
        phi_prefix = "quantize.quant_resi.qresi_ls."
        phi_names = {k[len(phi_prefix) :].split(".")[0] for k in state_dict if k.startswith(phi_prefix)}
        config["share_quant_resi"] = len(phi_names)
        config["patch_nums"] = tuple(patch_nums or PATCH_NUMS_256)
        config.update(overrides)
        model = cls(**config)
        source = "state dict" if isinstance(path_or_state_dict, dict) else str(path_or_state_dict)
        load_state_dict_strict(model, state_dict, source=source, ignore=("quantize.ema_vocab_hit_SV",))
        return model.eval()


def _side(tokens: torch.Tensor) -> int:
    """Side pn of a square token map given as [B, pn, pn] or [B, pn*pn]."""
    if tokens.ndim == 3 and tokens.shape[1] == tokens.shape[2]:
        return tokens.shape[1]
    if tokens.ndim == 2:
        side = round(tokens.shape[1] ** 0.5)
        if side * side == tokens.shape[1]:
            return side
    raise ValueError(f"token map must be [B, pn, pn] or [B, pn*pn] (square), got {tuple(tokens.shape)}")
