"""Train a tokenizer: VAR's multi-scale VQ-VAE (MultiScaleVQVAE; single-scale with --patch-nums 16), or LlamaGen's
VQ (VQModel, --quantizer llamagen).

    vartk train tokenizer --data DIR --out runs/tokenizer --patch-nums 1,2,3,4,5,6,8,10,13,16
    vartk train tokenizer --data DIR --out runs/vq --quantizer llamagen --codebook-dim 8

Against codebook collapse (all off by default): --codebook-l2-norm (multiscale: factorized, L2-normalised
--codebook-dim codes, as LlamaGen's), --kmeans-iters (k-means seeding of the codebook at step 0),
--restart-codes-every N (codes unused for N steps move onto looked-up vectors) and --entropy-weight (an entropy
loss that rewards even code use).

Loss = vq_weight * quantiser loss (from the model's forward) + l2_weight * MSE + l1_weight * L1
     [+ entropy_weight * codebook entropy loss] [+ gan_weight * hinge generator loss against a PatchGAN, from
     --gan-start on]
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
from ..tokenizers.codebook import kmeans_codebook
from ..tokenizers.msvq import MultiScaleVQVAE
from ..tokenizers.vq import VQModel
from .data import Batch, center_crop
from .loop import Job, TrainConfig, arg, check_architecture, check_at_least, flag, parse_config, run_training

QUANTIZERS = ("multiscale", "llamagen")
CODEBOOK_TRAINING = ("restart_codes_every", "kmeans_iters", "entropy_weight")  # what --train-decoder-only excludes


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
    codebook_dim: int = arg(8, "code vector size of the llamagen quantiser (LlamaGen: 8) and of the multiscale one "
                               "with --codebook-l2-norm")
    codebook_l2_norm: bool = arg(False, "multiscale: factorized codes, saved in the tokenizer's config: each residual "
                                        "is projected to --codebook-dim dims and L2-normalised, the nearest "
                                        "L2-normalised code (cosine) is projected back (LlamaGen's lookup); off: "
                                        "VAR's full-width codes, plain L2 (llamagen's codes are always L2-normalised)")
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
                                      "random looked-up vectors of the current batch (each scale's residuals for "
                                      "multiscale) (0: never)")
    kmeans_iters: int = arg(0, "seed the codebook at step 0 by this many k-means (Lloyd) iterations on the vectors "
                               "the quantiser looks up for --kmeans-images training images (for multiscale, the "
                               "residuals each scale quantises) (0: the random initialisation)")
    kmeans_images: int = arg(256, "how many training images (a random choice seeded by --seed) the k-means of "
                                  "--kmeans-iters runs on")
    entropy_weight: float = arg(0.0, "weight of the codebook entropy loss (MaskGIT / MAGVIT / LlamaGen): mean entropy "
                                     "of each lookup's code distribution minus the entropy of the batch's mean one, "
                                     "softmax over -squared distance / --entropy-temperature; lowering it spreads the "
                                     "batch over the codebook (0: off)")
    entropy_temperature: float = arg(0.01, "temperature of the entropy loss's softmax (LlamaGen: 0.01)")
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
                                 "disc_layers", "codebook_dim", "kmeans_images"))
        check_at_least(self, 0, ("beta", "vq_weight", "l2_weight", "l1_weight", "gan_weight", "entropy_weight",
                                 "kmeans_iters"))  # loss weights, iterations
        if not self.entropy_temperature > 0:
            raise SystemExit(f"--entropy-temperature must be > 0, got {self.entropy_temperature}")
        if self.quantizer == "llamagen" and self.codebook_l2_norm:
            raise SystemExit("--codebook-l2-norm factorizes the multiscale quantiser's codes; llamagen's codes are "
                             "always L2-normalised --codebook-dim codes: drop the flag")
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
        per_image = sum(pn * pn for pn in self.patch_nums) if self.quantizer == "multiscale" else latent * latent
        if self.kmeans_iters and self.kmeans_images * per_image < self.vocab_size:
            raise SystemExit(f"--kmeans-images {self.kmeans_images} give {self.kmeans_images * per_image} vectors "
                             f"({per_image} per image) for --vocab-size {self.vocab_size} codes; k-means needs at "
                             f"least one per code: give --kmeans-images {-(-self.vocab_size // per_image)} or more")
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
        codebook_training = [f"{flag(name)} {getattr(self, name)}" for name in CODEBOOK_TRAINING if getattr(self, name)]
        if self.train_decoder_only and codebook_training:
            raise SystemExit("--train-decoder-only keeps the codebook fixed; it cannot be combined with "
                             f"{', '.join(codebook_training)}")
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
        codebook_dim=cfg.codebook_dim if cfg.codebook_l2_norm else 0,
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


def distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


@torch.no_grad()
def restart_unused_codes(model: MultiScaleVQVAE | VQModel, code_hits: torch.Tensor, images: torch.Tensor) -> int:
    """Move every code with no hits (summed over processes) onto a random one of the vectors the quantiser looks
    up for `images` (every scale's residual for the multi-scale one; L2-normalised for LlamaGen's and factorized
    codes), so that a collapsed codebook comes back into use; returns how many codes moved. Process 0 draws the
    vectors and every process receives its codebook."""
    if distributed():
        torch_dist.all_reduce(code_hits)
    unused = (code_hits == 0).nonzero().flatten()  # [U]
    codebook = model.quantize.embedding.weight  # [V, D]
    if len(unused):
        vectors, _ = model.quantizer_lookups(model.encode_latent(images))  # [N, D]
        picks = torch.randint(len(vectors), (len(unused),), device=vectors.device)  # [U]
        codebook[unused] = vectors[picks].to(codebook.dtype)
    if distributed():
        torch_dist.broadcast(codebook, src=0)
    return len(unused)


@torch.no_grad()
def seed_codebook(model: MultiScaleVQVAE | VQModel, images: torch.Tensor, cfg: TokenizerTrainConfig) -> None:
    """--kmeans-iters: k-means on the vectors the quantiser looks up for `images` (uint8 [M, 3, H, W]), seeded by
    --seed; process 0's codebook goes to every process."""
    device = model.quant_conv.weight.device
    latents = torch.cat([model.encode_latent(chunk.to(device).float() / 255)
                         for chunk in images.split(cfg.batch_size)])  # [M, D, h, w]
    kmeans_codebook(model, latents, cfg.kmeans_iters, torch.Generator().manual_seed(cfg.seed), cfg.batch_size)
    if distributed():
        torch_dist.broadcast(model.quantize.embedding.weight, src=0)


def center_crops(dataset, indices: list[int], size: int) -> torch.Tensor:
    """The centre crops of these dataset images, uint8 [N, 3, size, size]."""
    return center_crop(torch.stack([dataset[i][0] for i in indices]), size)


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
        self.preview = center_crops(dataset, preview, cfg.image_size).to(device).float() / 255  # [N, 3, H, W]
        if cfg.kmeans_iters:  # the images k-means seeds the codebook on, before the first step
            picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
            self.kmeans_images = center_crops(dataset, picks[:cfg.kmeans_images].tolist(), cfg.image_size)
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

    def before_first_step(self) -> None:
        if self.cfg.kmeans_iters:
            seed_codebook(self.model, self.kmeans_images, self.cfg)

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
        """(weighted quantiser + pixel [+ entropy] loss, {l2, l1, vq[, entropy]}, reconstructions [B, 3, H, W], the
        model's other stats)."""
        cfg = self.cfg
        temperature = cfg.entropy_temperature if cfg.entropy_weight > 0 else 0.0
        recon, vq_loss, stats = model(images, entropy_temperature=temperature)  # [B, 3, H, W]
        recon = recon.float()
        signed_recon, signed_images = 2 * recon - 1, 2 * images - 1  # the official losses compare [-1, 1] images
        l2, l1 = F.mse_loss(signed_recon, signed_images), F.l1_loss(signed_recon, signed_images)
        loss = cfg.vq_weight * vq_loss + cfg.l2_weight * l2 + cfg.l1_weight * l1
        metrics = {"l2": l2.detach(), "l1": l1.detach(), "vq": vq_loss.detach()}
        if temperature:
            entropy = stats.pop("entropy")
            loss = loss + cfg.entropy_weight * entropy
            metrics["entropy"] = entropy.detach()
        return loss, metrics, recon, stats

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
