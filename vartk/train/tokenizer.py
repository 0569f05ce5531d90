"""Train a tokenizer: VAR's multi-scale VQ-VAE (MultiScaleVQVAE; single-scale with --patch-nums 16), or LlamaGen's
VQ (VQModel, --quantizer llamagen).

    vartk train tokenizer --data DIR --out runs/tokenizer --patch-nums 1,2,3,4,5,6,8,10,13,16
    vartk train tokenizer --data DIR --out runs/vq --quantizer llamagen --codebook-dim 8

--restart-codes-every N fights codebook collapse: codes unused for N steps move onto residual vectors.

Loss = vq_weight * quantiser loss (from the model's forward) + l2_weight * MSE + l1_weight * L1
     [+ gan_weight * hinge generator loss against a PatchGAN, from --gan-start on]
with MSE and L1 between images in [-1, 1], as in the official training code (weights copied from it mean the same).
The discriminator is trained in a second phase of the same step (hinge loss). A perceptual (LPIPS)
loss needs pretrained VGG weights, which vartk cannot fetch offline: --lpips-weights is refused.
Export: <out>/tokenizer (save_pretrained).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from ..files import write_folder_atomic
from ..tokenizers.msvq import MultiScaleVQVAE
from ..tokenizers.vq import VQModel
from .data import Batch, center_crop
from .loop import Job, TrainConfig, arg, check_architecture, check_at_least, parse_config, run_training

QUANTIZERS = ("multiscale", "llamagen")


@dataclass
class TokenizerTrainConfig(TrainConfig):
    """Train a multi-scale residual VQ-VAE (VAR tokenizer; one scale, --patch-nums 16, gives a single-scale
    tokenizer for next-token models) or LlamaGen's VQ (--quantizer llamagen)."""

    out: str = arg("runs/tokenizer", "output folder")
    lr: float = arg(2e-4, "peak learning rate")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup_steps: int = arg(200, "linear warm-up steps")
    grad_clip: float = arg(1.0, "clip the gradient norm to this value (0: no clipping)")
    ch: int = arg(64, "base channels of the encoder / decoder")
    ch_mult: tuple[int, ...] = arg((1, 2, 2), "channel multipliers; downsampling = 2 ** (len - 1)")
    num_res_blocks: int = arg(1, "ResNet blocks per resolution")
    z_channels: int = arg(32, "latent (codebook vector) channels")
    vocab_size: int = arg(1024, "codebook size")
    quantizer: str = arg("multiscale", f"one of {QUANTIZERS}: VAR's residual quantiser over --patch-nums, or "
                                       "LlamaGen's VQ (one scale, L2-normalised --codebook-dim codes, 1x1 quant convs)")
    codebook_dim: int = arg(8, "code vector size of the llamagen quantiser (LlamaGen: 8)")
    patch_nums: tuple[int, ...] = arg((1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                                      "token-map sides, small to large; the last = image_size / downsampling")
    beta: float = arg(0.25, "commitment loss weight")
    quant_resi: float = arg(0.5, "phi conv ratio")
    share_quant_resi: int = arg(4, "number of shared phi convs")
    norm_groups: int = arg(32, "GroupNorm groups (must divide the channels)")
    vq_weight: float = arg(1.0, "weight of the quantiser loss")
    l2_weight: float = arg(1.0, "weight of the pixel MSE (images in [-1, 1])")
    l1_weight: float = arg(0.0, "weight of the pixel L1 (images in [-1, 1])")
    lpips_weights: str = arg("", "refused: vartk has no perceptual (LPIPS) loss (its VGG weights cannot be "
                                 "fetched offline)")
    gan_weight: float = arg(0.0, "weight of the PatchGAN hinge generator loss (0: no GAN)")
    gan_start: int = arg(0, "step at which the GAN losses start")
    disc_channels: int = arg(64, "PatchGAN base channels")
    disc_layers: int = arg(3, "PatchGAN stride-2 layers")
    restart_codes_every: int = arg(0, "every N steps, move the codes that no scale picked in those N steps onto "
                                      "random residual vectors of the current batch (0: never)")
    train_decoder_only: bool = arg(False, "freeze the encoder, quant_conv and the quantiser (codebook, phi convs) "
                                          "and train post_quant_conv + decoder: tokens stay exactly the same, so "
                                          "transformers trained on this tokenizer keep working (use with --init-from)")

    def check(self) -> None:
        super().check()
        if self.lpips_weights:
            raise SystemExit(
                f"--lpips-weights {self.lpips_weights}: the perceptual loss is not available in vartk (it needs "
                "pretrained VGG weights that cannot be fetched offline); train with --l2-weight/--l1-weight and --gan-weight"
            )
        if self.quantizer not in QUANTIZERS:
            raise SystemExit(f"--quantizer {self.quantizer!r} is unknown; use one of {QUANTIZERS}")
        check_at_least(self, 1, ("ch", "num_res_blocks", "z_channels", "norm_groups", "disc_channels",
                                 "disc_layers", "codebook_dim"))
        check_at_least(self, 0, ("beta", "vq_weight", "l2_weight", "l1_weight", "gan_weight"))  # loss weights
        if self.vocab_size < 2 or not self.ch_mult or min(self.ch_mult) < 1 or not self.patch_nums \
                or min(self.patch_nums) < 1:
            raise SystemExit(f"--vocab-size must be >= 2 (got {self.vocab_size}), --ch-mult and --patch-nums "
                             f"positive integers (got {self.ch_mult}, {self.patch_nums})")
        check_architecture(lambda: build_tokenizer(self))
        latent = self.image_size // 2 ** (len(self.ch_mult) - 1)
        if self.quantizer == "multiscale" and self.patch_nums[-1] != latent:
            raise SystemExit(
                f"--patch-nums ends at {self.patch_nums[-1]} but --image-size {self.image_size} with --ch-mult "
                f"{','.join(map(str, self.ch_mult))} gives a {latent}x{latent} latent; make them agree"
            )
        if self.gan_weight > 0 and not 0 <= self.gan_start < self.max_steps:
            raise SystemExit(f"--gan-start {self.gan_start} must be in [0, --max-steps {self.max_steps}) when "
                             f"--gan-weight is {self.gan_weight}")
        every = self.restart_codes_every
        if every < 0 or (every and (self.save_every % every or self.max_steps % every)):
            raise SystemExit(
                f"--restart-codes-every {every} must be >= 0 and divide --save-every {self.save_every} and "
                f"--max-steps {self.max_steps} (every checkpoint falls between restart windows, so --resume stays "
                "exact)"
            )
        if self.quantizer == "llamagen" and self.restart_codes_every:
            raise SystemExit(f"--restart-codes-every {self.restart_codes_every} works on the multiscale quantiser's "
                             "residuals; LlamaGen's L2-normalised codebook has no such restarts")
        if self.train_decoder_only and self.restart_codes_every:
            raise SystemExit("--train-decoder-only keeps the codebook fixed; it cannot be combined with "
                             f"--restart-codes-every {self.restart_codes_every}")
        if self.train_decoder_only and not self.init_from:
            raise SystemExit("--train-decoder-only fine-tunes the decoder of a trained tokenizer: give it with "
                             "--init-from <tokenizer run>/tokenizer")


def build_tokenizer(cfg: TokenizerTrainConfig) -> MultiScaleVQVAE | VQModel:
    if cfg.quantizer == "llamagen":
        return VQModel(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
                       codebook_size=cfg.vocab_size, codebook_embed_dim=cfg.codebook_dim, beta=cfg.beta,
                       norm_groups=cfg.norm_groups)
    return MultiScaleVQVAE(
        ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
        vocab_size=cfg.vocab_size, patch_nums=cfg.patch_nums, beta=cfg.beta, quant_resi=cfg.quant_resi,
        share_quant_resi=cfg.share_quant_resi, norm_groups=cfg.norm_groups,
    )


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): 4x4 convs (stride 2, then 1) -> a map of real/fake logits [B, 1, h, w], initialised as
    pix2pix and LlamaGen do (conv weights N(0, 0.02), norm scales N(1, 0.02), norm shifts 0).
    GroupNorm instead of BatchNorm keeps it independent of the batch split across processes."""

    def __init__(self, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            layers += [nn.Conv2d(width, out, 4, stride=2 if i < num_layers else 1, padding=1, bias=False),
                       nn.GroupNorm(min(32, out), out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for module in self.net:
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


@contextmanager
def frozen(module: nn.Module):
    """Run `module` without parameter gradients (the generator phase reads the discriminator)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@torch.no_grad()
def restart_unused_codes(model: MultiScaleVQVAE, code_hits: torch.Tensor, images: torch.Tensor) -> int:
    """Move every code with no hits (summed over processes) onto a random residual vector of `images`,
    so that a collapsed codebook comes back into use; returns how many codes moved. Process 0 draws the
    vectors and every process receives its codebook."""
    distributed = torch_dist.is_available() and torch_dist.is_initialized()
    if distributed:
        torch_dist.all_reduce(code_hits)
    unused = (code_hits == 0).nonzero().flatten()  # [U]
    codebook = model.quantize.embedding.weight  # [V, Cz]
    if len(unused):
        vectors = model.residual_vectors(images)  # [N, Cz]
        picks = torch.randint(len(vectors), (len(unused),), device=vectors.device)  # [U]
        codebook[unused] = vectors[picks].to(codebook.dtype)
    if distributed:
        torch_dist.broadcast(codebook, src=0)
    return len(unused)


class TokenizerJob(Job):
    find_unused_parameters = True  # phi convs that no scale picks stay unused

    def __init__(self, cfg: TokenizerTrainConfig, dataset, device: torch.device):
        self.cfg = cfg
        self.model = build_tokenizer(cfg).to(device)
        if cfg.train_decoder_only:
            for name in type(self.model).token_modules:
                getattr(self.model, name).requires_grad_(False)
        self.discriminator = None
        if cfg.gan_weight > 0:
            self.discriminator = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).to(device)
        preview = torch.linspace(0, len(dataset) - 1, min(cfg.num_samples, len(dataset))).round().long().tolist()
        preview_images = center_crop(torch.stack([dataset[i][0] for i in preview]), cfg.image_size)
        self.preview = preview_images.to(device).float() / 255  # [N, 3, H, W]
        self.reconstruction = None  # the generator phase's output, read by the discriminator phase
        self.code_hits = torch.zeros(cfg.vocab_size, device=device)  # [V] hits since the last code restart

    def trainees(self):
        parts = {"model": (self.model, ())}
        if self.discriminator is not None:
            parts["discriminator"] = (self.discriminator, ())
        return parts

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.gan_start

    def phases(self, step: int) -> list[str]:
        return ["model", "discriminator"] if self.gan_active(step) else ["model"]

    def first_step(self, name: str) -> int:
        return self.cfg.gan_start if name == "discriminator" else 0

    def loss(self, name: str, wrapped: dict[str, nn.Module], batch: Batch, step: int):
        if name == "discriminator":
            return self.discriminator_loss(wrapped[name], batch.images)
        loss, metrics, recon, stats = self.reconstruction_loss(wrapped["model"], batch.images)
        self.code_hits += stats.pop("code_hits")
        metrics.update(stats)
        if self.gan_active(step):
            with frozen(self.discriminator):
                generator_loss = -self.discriminator(recon).float().mean()
            loss = loss + self.cfg.gan_weight * generator_loss
            metrics["gan_g"] = generator_loss.detach()
        self.reconstruction = recon.detach()
        return loss, metrics

    def reconstruction_loss(self, model: nn.Module, images: torch.Tensor):
        """(weighted quantiser + pixel loss, {l2, l1, vq}, reconstructions [B, 3, H, W], the model's stats)."""
        cfg = self.cfg
        recon, vq_loss, stats = model(images)  # [B, 3, H, W]
        recon = recon.float()
        signed_recon, signed_images = 2 * recon - 1, 2 * images - 1  # the official losses compare [-1, 1] images
        l2, l1 = F.mse_loss(signed_recon, signed_images), F.l1_loss(signed_recon, signed_images)
        loss = cfg.vq_weight * vq_loss + cfg.l2_weight * l2 + cfg.l1_weight * l1
        return loss, {"l2": l2.detach(), "l1": l1.detach(), "vq": vq_loss.detach()}, recon, stats

    def validation_metrics(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The training loss without the GAN term and its parts (on the unclamped decoder output, as in
        training), and the mean per-image PSNR (dB) of the reconstructions clamped to [0, 1]."""
        loss, metrics, recon, _ = self.reconstruction_loss(self.model, batch.images)
        image_mse = (recon.clamp(0, 1) - batch.images).pow(2).mean((1, 2, 3))  # [B]
        return {"loss": loss, **metrics, "psnr": (-10 * torch.log10(image_mse.clamp_min(1e-10))).mean()}

    def after_step(self, step: int, batch: Batch) -> None:
        if self.cfg.restart_codes_every and (step + 1) % self.cfg.restart_codes_every == 0:
            restart_unused_codes(self.model, self.code_hits, batch.images)
            self.code_hits.zero_()

    def discriminator_loss(self, discriminator: nn.Module, real: torch.Tensor):
        """gan_weight x the hinge loss on real images and the generator phase's reconstructions (LlamaGen weighs the
        discriminator's loss as the generator's adversarial term; it matters to gradient clipping)."""
        logits_real = discriminator(real).float()
        logits_fake = discriminator(self.reconstruction).float()
        hinge = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
        return self.cfg.gan_weight * hinge, {"hinge": hinge.detach(), "real_logit": logits_real.mean().detach(),
                                             "fake_logit": logits_fake.mean().detach()}

    def samples(self) -> tuple[torch.Tensor, int]:
        """A row of originals above a row of their reconstructions."""
        recon = self.model.decode(self.model.encode(self.preview))
        return torch.cat([self.preview, recon.float()]), len(self.preview)

    def export(self, out: Path, class_names: list[str]) -> list[Path]:
        return [write_folder_atomic(out / "tokenizer", self.model.save_pretrained)]


def main(argv: list[str]) -> Path:
    return run_training(parse_config(TokenizerTrainConfig, argv, "vartk train tokenizer"), TokenizerJob)
