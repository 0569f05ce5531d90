"""A small image classifier used as an in-domain evaluator (FID / IS / class accuracy without Inception).

    python -m vartk.classifier --data emoji/train --test emoji/test --out runs/classifier

The shipped one (vartk/assets/emoji-classifier) is trained on the emoji categories of the default
models; `vartk.emoji_extractor.register_emoji_extractor()` registers it as the torch-fidelity feature
extractor "vartk-emoji": FID / KID / precision-recall on its pooled features, IS on its logits. These numbers
describe emoji images only and are not comparable with ImageNet (Inception) FID.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from tqdm.auto import tqdm

from .files import write_folder_atomic

SHIPPED_WEIGHTS = Path(__file__).parent / "assets" / "emoji-classifier"


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, GroupNorm, GELU, then a stride-2 3x3 conv halving the resolution."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.GELU(),
    )


class ImageClassifier(ModelMixin, ConfigMixin):
    """Four conv stages (x16 downsampling), global average pooling, a linear head."""

    @register_to_config
    def __init__(self, num_classes: int = 9, width: int = 32, image_size: int = 64, class_names=None):
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 8 * width]
        self.stages = nn.Sequential(*(conv_block(a, b) for a, b in zip(channels[:-1], channels[1:])))
        self.head = nn.Linear(channels[-1], num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] (resized to the training size) -> pooled features [B, D]."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.stages(images * 2 - 1).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.features(images))


@torch.no_grad()
def predict(model: ImageClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class ids [N] of images [N, 3, H, W] in [0, 1]."""
    model.eval()
    return torch.cat([model(chunk).argmax(-1) for chunk in images.split(batch_size)])


def accuracy(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict(model, images) == labels).float().mean().item()


def load_folder(root: str | os.PathLike, image_size: int, class_names: list[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images [N, 3, S, S] in [0, 1], labels [N], class names) of an ImageFolder tree. With `class_names` (e.g. a
    model's), the labels index that list by folder name, so a held-out tree may lack some classes."""
    from .train.data import ImageFolder

    dataset = ImageFolder(root, image_size, cache=True)
    labels, names = dataset.labels, list(dataset.class_names)
    if class_names is not None:
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise ValueError(f"class folders {unknown} of {root} are not among the classes {class_names}")
        labels, names = torch.tensor([class_names.index(names[i]) for i in labels.tolist()]), list(class_names)
    return dataset.images.float() / 255, labels, names


def train_classifier(data: str, out: str, test: str | None = None, steps: int = 1500, batch_size: int = 64,
                     lr: float = 2e-3, width: int = 32, image_size: int = 64, seed: int = 0) -> ImageClassifier:
    """Train on an ImageFolder tree with class-balanced sampling and flips/shifts; write `out` atomically."""
    torch.manual_seed(seed)
    images, labels, names = load_folder(data, image_size)
    model = ImageClassifier(num_classes=len(names), width=width, image_size=image_size, class_names=names)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    class_weight = 1.0 / torch.bincount(labels).float()
    draw = torch.distributions.Categorical(probs=class_weight[labels] / class_weight[labels].sum())
    model.train()
    for _ in (bar := tqdm(range(steps), desc="classifier")):
        index = draw.sample((batch_size,))
        batch = images[index]
        flip = torch.rand(batch_size) < 0.5
        batch[flip] = batch[flip].flip(-1)
        shift = torch.randint(-4, 5, (2,)).tolist()
        batch = torch.roll(batch, shifts=shift, dims=(-2, -1))
        loss = F.cross_entropy(model(batch), labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    write_folder_atomic(out, model.save_pretrained)
    if test:
        test_images, test_labels, _ = load_folder(test, image_size, class_names=names)
        print(f"held-out accuracy: {accuracy(model, test_images, test_labels):.4f} on {len(test_labels)} images")
    return model


def main(argv: list[str] | None = None) -> ImageClassifier:
    parser = argparse.ArgumentParser(prog="python -m vartk.classifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ImageFolder tree (class subfolders)")
    parser.add_argument("--test", default=None, help="held-out ImageFolder tree: prints accuracy")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return train_classifier(args.data, args.out, args.test, args.steps, args.batch_size, args.lr, args.width,
                            args.image_size, args.seed)


if __name__ == "__main__":
    main()
