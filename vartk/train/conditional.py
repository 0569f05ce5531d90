"""What the next-scale (var.py) and next-token (gpt.py) jobs share: a frozen tokenizer, the dataset's
tokens, label dropout for classifier-free guidance, class-conditional sample grids and the export.

Tokens are computed in float32 outside autocast (as the official VAR trainer does). Without
augmentation an image always gives the same tokens, so when the dataset is held in memory they are
encoded once at start-up (--precompute-tokens) instead of at every step.
"""
from __future__ import annotations

from abc import abstractmethod

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoints import CheckpointError, load_saved_model
from ..samplers.sampling import check_non_negative, check_sampling_args
from ..tokenizers.msvq import MultiScaleVQVAE
from ..tokenizers.vq import VQModel
from ..files import write_folder_atomic, write_text_atomic
from .data import Batch
from .loop import Job, TrainConfig, arg

TOKENIZER_CLASSES = {"MultiScaleVQVAE": MultiScaleVQVAE, "VQModel": VQModel}


@dataclass
class ConditionalTrainConfig(TrainConfig):
    tokenizer: str = arg("", "frozen tokenizer: a save_pretrained folder (e.g. <tokenizer run>/tokenizer) "
                             "or an official checkpoint file (required)")
    label_dropout: float = arg(0.1, "probability of replacing a label by the null class (trains the CFG branch)")
    precompute_tokens: bool = arg(True, "encode the dataset once at start-up when it is held in memory (not with "
                                        "--crop-scale > 1: each step encodes its crops)")
    guidance_scale: float = arg(1.5, "classifier-free guidance of the sample grids")
    top_k: int = arg(0, "top-k of the sample grids (0: off)")
    top_p: float = arg(1.0, "top-p of the sample grids (1: off)")

    required = ("data", "tokenizer")
    # the run keeps a copy of its tokenizer and refuses one that encodes differently, so the path may move
    may_change_on_resume = TrainConfig.may_change_on_resume + ("precompute_tokens", "guidance_scale", "top_k", "top_p",
                                                               "tokenizer")

    def check(self) -> None:
        super().check()
        if not 0 <= self.label_dropout < 1:
            raise SystemExit(f"--label-dropout must be in [0, 1), got {self.label_dropout}")
        try:  # the sample grids' settings, checked now rather than at the first grid
            check_non_negative("guidance_scale", self.guidance_scale)
            check_sampling_args(self.top_k, self.top_p)
        except ValueError as err:
            raise SystemExit(f"--{str(err).replace('_', '-')}") from None


def load_tokenizer(path: str, official_cls: type) -> nn.Module:
    """A save_pretrained folder of one of TOKENIZER_CLASSES, loaded strictly, or an official file
    (`official_cls.from_official`)."""
    location = Path(path)
    if location.is_dir():
        try:
            return load_saved_model(location, tuple(TOKENIZER_CLASSES.values()))
        except CheckpointError as err:
            inside = location / "tokenizer"  # where a pipeline or a training run keeps its tokenizer
            hint = f"; did you mean --tokenizer {inside}?" if inside.is_dir() else ""
            raise SystemExit(f"--tokenizer {path}: {err}{hint}") from None
    if location.is_file():
        return official_cls.from_official(location)
    raise SystemExit(f"--tokenizer {path} does not exist")


def require_same_encoding(reference: nn.Module, candidate: nn.Module, candidate_name: str, reference_name: str):
    """Refuse `candidate` unless every parameter that decides the tokens (`token_modules`) equals `reference`'s,
    as in a `--train-decoder-only` fine-tune: a transformer trained on `reference`'s tokens needs the same ones."""
    ours, theirs = dict(reference.named_parameters()), dict(candidate.named_parameters())
    changed = [name for name in ours if name.split(".")[0] in reference.token_modules
               and (name not in theirs or not torch.equal(ours[name], theirs[name].to(ours[name].dtype)))]
    if changed:
        raise SystemExit(f"{candidate_name} encodes differently from {reference_name} ({len(changed)} parameters "
                         f"differ, e.g. {changed[:3]}); give it or a --train-decoder-only fine-tune of it")


def flatten_tokens(encoded: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """tokenizer.encode output (a list of maps [B, pn, pn] or one map [B, h, w]) -> [B, L]: scales in
    order, each row-major."""
    maps = encoded if isinstance(encoded, list) else [encoded]
    return torch.cat([m.flatten(1) for m in maps], dim=1)


RUN_TOKENIZER = "tokenizer"  # the run folder's copy of --tokenizer


class ConditionalJob(Job):
    """Base of the transformer jobs; subclasses build `self.model` and define token_loss() and generate()."""

    official_tokenizer_cls: type = MultiScaleVQVAE
    pipeline_name = ""  # "VARPipeline" / "GPTPipeline" in vartk.pipelines
    no_weight_decay: tuple[str, ...] = ()  # parameter-name keywords AdamW does not decay

    def __init__(self, cfg: ConditionalTrainConfig, dataset, device: torch.device):
        self.cfg, self.device = cfg, device
        tokenizer = self.run_tokenizer(cfg)
        self.tokenizer = tokenizer.to(device).eval().requires_grad_(False)
        self.grid_side = self.token_grid_side()
        self.num_classes = dataset.num_classes
        self.token_table = self.mirrored_token_table = None  # [N, L] tokens of the dataset's images (mirrored)
        if cfg.precompute_tokens and dataset.images is not None and dataset.image_size == cfg.image_size:
            self.token_table = self.encode_all(dataset.images, mirrored=False)
            if cfg.hflip > 0:
                self.mirrored_token_table = self.encode_all(dataset.images, mirrored=True)

    @classmethod
    def run_tokenizer(cls, cfg: ConditionalTrainConfig) -> nn.Module:
        """--tokenizer; when resuming a run that kept a copy, the copy, which --tokenizer (if it still exists)
        must encode exactly like: the checkpoint's transformer learned those tokens."""
        copy = Path(cfg.out) / RUN_TOKENIZER
        if not (cfg.resume and copy.is_dir()):
            return load_tokenizer(cfg.tokenizer, cls.official_tokenizer_cls)
        kept = load_tokenizer(str(copy), cls.official_tokenizer_cls)
        if Path(cfg.tokenizer).exists():
            require_same_encoding(kept, load_tokenizer(cfg.tokenizer, cls.official_tokenizer_cls),
                                  f"--resume: --tokenizer {cfg.tokenizer}", f"the one the run was trained with ({copy})")
        return kept

    def save_inputs(self, out: Path) -> None:
        """<out>/tokenizer: the frozen tokenizer, kept with the run for `vartk train export`."""
        if not (out / RUN_TOKENIZER).is_dir():
            write_folder_atomic(out / RUN_TOKENIZER, self.tokenizer.save_pretrained)

    def token_grid_side(self) -> int:
        """Side of the (last) token map at --image-size."""
        side, tokenizer = self.cfg.image_size // self.tokenizer.downsample_factor, self.tokenizer
        if isinstance(tokenizer, MultiScaleVQVAE) and tokenizer.latent_size != side:
            size = tokenizer.latent_size * tokenizer.downsample_factor
            raise SystemExit(f"--tokenizer {self.cfg.tokenizer} encodes {size} px images "
                             f"(patch_nums {tokenizer.patch_nums}); set --image-size {size}")
        return side

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> tokens [B, L] (float32, no autocast)."""
        with torch.autocast(images.device.type, enabled=False):
            return flatten_tokens(self.tokenizer.encode(images))

    def encode_all(self, images: torch.Tensor, mirrored: bool) -> torch.Tensor:
        """uint8 images [N, 3, H, W] (flipped left-right first if `mirrored`) -> tokens [N, L], 256 at a time."""
        chunks = (images[i:i + 256].to(self.device).float() / 255 for i in range(0, len(images), 256))
        return torch.cat([self.encode(chunk.flip(-1) if mirrored else chunk) for chunk in chunks])

    def batch_tokens(self, batch: Batch) -> torch.Tensor:
        """Tokens [B, L] of the batch's images as given (mirrored ones included): from the tables or encoded."""
        if self.token_table is None or batch.indices is None:
            return self.encode(batch.images)
        indices = batch.indices.to(self.token_table.device)
        tokens = self.token_table[indices]
        if batch.mirrored is not None:
            tokens = torch.where(batch.mirrored[:, None], self.mirrored_token_table[indices], tokens)
        return tokens

    @abstractmethod
    def token_loss(self, model: nn.Module, labels: torch.Tensor, tokens: torch.Tensor):
        """(mean cross-entropy, {metric: tensor}) of `model` on tokens [B, L] given labels [B]."""

    def loss(self, name: str, wrapped: dict[str, nn.Module], batch: Batch, step: int):
        return self.token_loss(wrapped["model"], self.drop_labels(batch.labels), self.batch_tokens(batch))

    def validation_metrics(self, batch: Batch) -> dict[str, torch.Tensor]:
        loss, metrics = self.token_loss(self.model, batch.labels, self.batch_tokens(batch))
        return {"loss": loss, **metrics}

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null class (= num_classes) with probability label_dropout."""
        dropped = torch.rand(labels.shape, device=labels.device) < self.cfg.label_dropout
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    def trainees(self):
        return {"model": (self.model, self.no_weight_decay)}

    @abstractmethod
    def generate(self, class_labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sampled images [B, 3, H, W] in [0, 1] for class_labels [B]."""

    def samples(self):
        labels = torch.arange(self.cfg.num_samples, device=self.device) % self.num_classes  # [N]
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
        return self.generate(labels, generator), math.ceil(math.sqrt(len(labels)))

    def export(self, out: Path, class_names: list[str]) -> list[Path]:
        """<out>/transformer and <out>/pipeline (tokenizer, transformer and class names)."""
        transformer = write_folder_atomic(out / "transformer", self.model.save_pretrained)
        write_text_atomic(out / "class_names.json", json.dumps(class_names, indent=1) + "\n")
        return [transformer, self.save_pipeline(self.tokenizer, self.model, class_names, out / "pipeline")]

    @classmethod
    def save_pipeline(cls, tokenizer: nn.Module, transformer: nn.Module, class_names: list[str], folder: Path) -> Path:
        """Write the job's pipeline (`pipeline_name`) of these models to `folder`, atomically."""
        from .. import pipelines

        pipeline = getattr(pipelines, cls.pipeline_name)(tokenizer=tokenizer, transformer=transformer,
                                                          class_names=class_names)
        return write_folder_atomic(folder, pipeline.save_pretrained)
