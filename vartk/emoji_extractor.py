"""The emoji classifier (vartk.classifier) as the torch-fidelity feature extractor "vartk-emoji": FID / KID /
precision-recall on its pooled features, IS on its logits. Registered on request, not on import:

    from vartk.emoji_extractor import EMOJI_CLASSIFIER, register_emoji_extractor
    register_emoji_extractor()
    compute_metrics(samples, held_out, ["fid", "is"], feature_extractor=EMOJI_CLASSIFIER)

These numbers describe emoji images only and are not comparable with ImageNet (Inception) FID.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from . import classifier
from .checkpoints import load_saved_model

EMOJI_CLASSIFIER = "vartk-emoji"


class ClassifierExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around a `vartk.classifier.ImageClassifier`: uint8 [B, 3, H, W] ->
    "features" (pooled, for FID / KID / PRC) and "logits" (for IS). `feature_extractor_weights_path`
    is a folder written by `save_pretrained`; default: the emoji classifier shipped in the package."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        folder = Path(feature_extractor_weights_path or self.default_weights())
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"classifier folder {folder} has no config.json; train one with `python -m vartk.classifier` "
                "or reinstall vartk for the shipped emoji classifier"
            )
        self.net = load_saved_model(folder, (classifier.ImageClassifier,))  # strict, float32, eval mode

    @staticmethod
    def default_weights() -> Path:
        """The weights used when none are given: the shipped emoji classifier (replaced by a new release)."""
        return classifier.SHIPPED_WEIGHTS

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

    def forward(self, x):
        with torch.no_grad():
            features = self.net.features(x.float() / 255)
            outputs = {"features": features, "logits": self.net.head(features)}
        return tuple(outputs[name] for name in self.features_list)


def register_emoji_extractor() -> None:
    """Register `ClassifierExtractor` with torch-fidelity as EMOJI_CLASSIFIER ("vartk-emoji"); a second call does
    nothing."""
    if EMOJI_CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EMOJI_CLASSIFIER, ClassifierExtractor)
