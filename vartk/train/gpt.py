"""Train a next-token (LlamaGen GPT) transformer on the tokens of a frozen single-scale tokenizer.

    vartk train gpt --data DIR --tokenizer runs/tokenizer16/tokenizer --out runs/gpt --dim 256 --n-layer 6

The tokenizer is a MultiScaleVQVAE with one scale (--patch-nums 16) or a VQModel; its token map is
read row-major. Loss: cross-entropy of logits = model(labels, tokens[:, :-1]) against tokens
(position 0, the class token, predicts token 0); labels are dropped to the null class with
--label-dropout. Export: <out>/transformer, <out>/pipeline (GPTPipeline).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.gpt import GPTTransformer
from ..tokenizers.msvq import MultiScaleVQVAE
from ..tokenizers.vq import VQModel
from ..samplers.next_token import NextTokenSampler
from .conditional import ConditionalJob, ConditionalTrainConfig
from .loop import arg, check_architecture, check_at_least, parse_config, run_training


@dataclass
class GPTTrainConfig(ConditionalTrainConfig):
    """Train a next-token (LlamaGen-style) transformer on a frozen single-scale tokenizer's tokens."""

    out: str = arg("runs/gpt", "output folder")
    grad_clip: float = arg(1.0, "clip the gradient norm to this value (0: no clipping)")
    guidance_scale: float = arg(2.0, "classifier-free guidance of the sample grids")
    dim: int = arg(256, "model width")
    n_layer: int = arg(6, "transformer blocks")
    n_head: int = arg(8, "attention heads (head size a multiple of 4)")
    multiple_of: int = arg(256, "SwiGLU hidden size is rounded up to a multiple of this (official: 256)")
    token_dropout: float = arg(0.1, "dropout on the input embeddings")
    resid_dropout: float = arg(0.1, "dropout on attention outputs")
    ffn_dropout: float = arg(0.1, "dropout in the feed-forward blocks")
    temperature: float = arg(1.0, "sampling temperature of the sample grids")

    may_change_on_resume = ConditionalTrainConfig.may_change_on_resume + ("temperature",)

    def check(self) -> None:
        super().check()
        check_at_least(self, 1, ("dim", "n_layer", "n_head", "multiple_of"))
        for name in ("token_dropout", "resid_dropout", "ffn_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise SystemExit(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        check_architecture(lambda: build_gpt(self, vocab_size=2, num_classes=1, grid_size=1))


def build_gpt(cfg: GPTTrainConfig, vocab_size: int, num_classes: int, grid_size: int) -> GPTTransformer:
    return GPTTransformer(
        dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head, vocab_size=vocab_size, num_classes=num_classes,
        grid_size=grid_size, multiple_of=cfg.multiple_of, token_dropout_p=cfg.token_dropout,
        resid_dropout_p=cfg.resid_dropout, ffn_dropout_p=cfg.ffn_dropout,
    )


class GPTJob(ConditionalJob):
    official_tokenizer_cls = VQModel
    pipeline_name = "GPTPipeline"

    def __init__(self, cfg: GPTTrainConfig, dataset, device: torch.device):
        super().__init__(cfg, dataset, device)
        if isinstance(self.tokenizer, MultiScaleVQVAE) and len(self.tokenizer.patch_nums) != 1:
            raise SystemExit(f"--tokenizer {cfg.tokenizer} has patch_nums {self.tokenizer.patch_nums}; next-token "
                             "training needs a single-scale tokenizer (a MultiScaleVQVAE with one scale, or a VQModel)")
        self.model = build_gpt(cfg, self.tokenizer.vocab_size, dataset.num_classes, self.grid_side).to(device)

    def token_loss(self, model: nn.Module, labels: torch.Tensor, tokens: torch.Tensor):
        logits = model(labels, tokens[:, :-1])  # [B, N, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        return loss, {"acc": (logits.argmax(-1) == tokens).float().mean()}

    def generate(self, class_labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        tokens = NextTokenSampler(temperature=self.cfg.temperature)(
            self.model, class_labels, guidance_scale=self.cfg.guidance_scale, top_k=self.cfg.top_k,
            top_p=self.cfg.top_p, generator=generator, progress=False,
        ).tokens  # [B, N]
        return self.tokenizer.decode(tokens.view(-1, self.grid_side, self.grid_side))


def main(argv: list[str]) -> Path:
    return run_training(parse_config(GPTTrainConfig, argv, "vartk train gpt"), GPTJob)
