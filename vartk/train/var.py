"""Train a next-scale (VAR) transformer on the tokens of a frozen multi-scale tokenizer.

    vartk train var --data DIR --tokenizer runs/tokenizer/tokenizer --out runs/var --depth 6

Loss: cross-entropy over all L = sum(pn^2) tokens of the pyramid (token mean), teacher-forced with
`tokenizer.teacher_forcing_input`; labels are dropped to the null class with --label-dropout.
AdamW skips weight decay on 1-D parameters, the position / level embeddings, the attention temperatures
(`scale_mul_1H11`) and shared-AdaLN offsets (`ada_gss`), as the official recipe does.
Export: <out>/transformer, <out>/pipeline (VARPipeline).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.var import VARTransformer
from ..tokenizers.msvq import MultiScaleVQVAE
from ..samplers.next_scale import NextScaleSampler
from .conditional import ConditionalJob, ConditionalTrainConfig
from .loop import arg, check_architecture, check_at_least, parse_config, run_training


@dataclass
class VARTrainConfig(ConditionalTrainConfig):
    """Train a next-scale (VAR) transformer on a frozen multi-scale tokenizer's tokens."""

    out: str = arg("runs/var", "output folder")
    depth: int = arg(6, "transformer blocks")
    width: int = arg(0, "model width (0: 64 * depth)")
    num_heads: int = arg(0, "attention heads (0: depth)")
    mlp_ratio: float = arg(4.0, "MLP hidden size / width")
    drop_path_rate: float = arg(-1.0, "stochastic depth rate of the last block (-1: the official 0.1 * depth / 24)")
    init_adaln_gamma: float = arg(1e-3, "initial scale of the AdaLN residual gates (official: 1e-3 for d16/d20)")

    def check(self) -> None:
        super().check()
        check_at_least(self, 1, ("depth",))
        check_at_least(self, 0, ("width", "num_heads"))  # 0: the default
        if not self.mlp_ratio > 0:
            raise SystemExit(f"--mlp-ratio must be > 0, got {self.mlp_ratio}")
        if not (0 <= self.drop_path_rate < 1 or self.drop_path_rate == -1):
            raise SystemExit(f"--drop-path-rate must be in [0, 1) or -1 (the official 0.1 * depth / 24), got "
                             f"{self.drop_path_rate}")
        check_architecture(lambda: build_var(self, vocab_size=2, latent_channels=1, num_classes=1, patch_nums=(1,)))


def build_var(cfg: VARTrainConfig, vocab_size: int, latent_channels: int, num_classes: int,
              patch_nums: tuple[int, ...]) -> VARTransformer:
    return VARTransformer(
        depth=cfg.depth, width=cfg.width or None, num_heads=cfg.num_heads or None, mlp_ratio=cfg.mlp_ratio,
        vocab_size=vocab_size, latent_channels=latent_channels, num_classes=num_classes, patch_nums=patch_nums,
        drop_path_rate=0.1 * cfg.depth / 24 if cfg.drop_path_rate == -1 else cfg.drop_path_rate,
    )


class VARJob(ConditionalJob):
    official_tokenizer_cls = MultiScaleVQVAE
    pipeline_name = "VARPipeline"
    no_weight_decay = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "ada_gss")

    def __init__(self, cfg: VARTrainConfig, dataset, device: torch.device):
        super().__init__(cfg, dataset, device)
        if not isinstance(self.tokenizer, MultiScaleVQVAE) or len(self.tokenizer.patch_nums) < 2:
            raise SystemExit(f"--tokenizer {cfg.tokenizer} is a {type(self.tokenizer).__name__} with one scale; "
                             "next-scale training needs a multi-scale MultiScaleVQVAE (e.g. --patch-nums 1,2,...,16)")
        self.patch_nums = self.tokenizer.patch_nums
        self.model = build_var(cfg, self.tokenizer.vocab_size, self.tokenizer.latent_channels, dataset.num_classes,
                               self.patch_nums).to(device)
        self.model.init_weights(init_adaln_gamma=cfg.init_adaln_gamma)

    @torch.no_grad()
    def teacher_forcing_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Flat pyramid tokens [B, L] -> transformer input [B, L - 1, Cz] (float32, no autocast)."""
        sizes = [pn * pn for pn in self.patch_nums]
        maps = [t.view(-1, pn, pn) for t, pn in zip(tokens.split(sizes, dim=1), self.patch_nums)]
        with torch.autocast(tokens.device.type, enabled=False):
            return self.tokenizer.teacher_forcing_input(maps)

    def token_loss(self, model: nn.Module, labels: torch.Tensor, tokens: torch.Tensor):
        logits = model(labels, self.teacher_forcing_input(tokens))  # [B, L, V]
        token_losses = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view_as(tokens)
        last = self.patch_nums[-1] ** 2
        accuracy = (logits.argmax(-1) == tokens).float()  # [B, L]
        metrics = {"acc": accuracy.mean(), "tail_loss": token_losses[:, -last:].mean().detach(),
                   "tail_acc": accuracy[:, -last:].mean()}
        return token_losses.mean(), metrics

    def generate(self, class_labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        maps = NextScaleSampler()(self.model, self.tokenizer, class_labels, guidance_scale=self.cfg.guidance_scale,
                                  top_k=self.cfg.top_k, top_p=self.cfg.top_p, generator=generator,
                                  progress=False).token_maps
        return self.tokenizer.decode(maps)


def main(argv: list[str]) -> Path:
    return run_training(parse_config(VARTrainConfig, argv, "vartk train var"), VARJob)
