"""Shared pieces of the metric and FID-run tests: a random torch-fidelity Inception, tiny extractors, image sets,
a tiny VAR pipeline and a finished sampling run (the fixtures a test module imports to use)."""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from vartk import evaluation as fid  # the module behind eval/fid.py and `vartk fid`
from vartk.models.var import VARTransformer
from vartk.pipelines import VARPipeline
from vartk.tokenizers.msvq import MultiScaleVQVAE

REPO = Path(__file__).resolve().parent.parent
FAST = dict(feature_layer="64", device="cpu", batch_size=16)  # layer "64" stops Inception after its stem
STUB_META = {"feature_extractor": "stub-classifier", "feature_layer": "colour", "weights": "default"}
RUN = dict(num_images=10, batch_size=2, sample_only=True)  # an FID run of 5 batches of 2 tiny 8x8 images


def build_random_inception(path: Path) -> Path:
    """torch-fidelity's Inception with random weights whose BatchNorm statistics are recalibrated on
    random images (with PyTorch's default init the features collapse to ~1e-8 and every metric is 0)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    if path.is_file():
        return path
    torch.manual_seed(0)
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), mock.patch.object(
        inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None
    ):
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    net.eval()
    torch.save(net.state_dict(), path)
    return path


class ClassifierStub(FeatureExtractorBase):
    """Features = mean colour [B, 3]; logits = 50 * one-hot(class) with class from the red channel
    (0..3), or all zeros when `uniform`: predictions with a known Inception score."""

    uniform = False

    def __init__(self, name, features_list, **kwargs):  # torch-fidelity passes its options as kwargs
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("colour", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "colour"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        colour = x.float().mean(dim=(2, 3))  # [B, 3]
        classes = (x[:, 0, 0, 0].long() // 64).clamp(max=3)  # [B]
        logits = torch.zeros(len(x), 4) if self.uniform else 50.0 * torch.nn.functional.one_hot(classes, 4).float()
        return tuple({"colour": colour, "logits": logits}[name] for name in self.features_list)


class UniformStub(ClassifierStub):
    uniform = True


def register_stubs() -> None:
    for name, cls in (("stub-classifier", ClassifierStub), ("stub-uniform", UniformStub)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls)


def random_images(n: int, seed: int, size: int = 16) -> np.ndarray:
    """uint8 [n, size, size, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


def independent_fid(features_1, features_2) -> float:
    """Frechet distance via eigenvalues: tr sqrtm(S1 S2) = sum sqrt(eig(S1 S2)) (no scipy sqrtm)."""
    f1, f2 = (np.asarray(f, dtype=np.float64) for f in (features_1, features_2))
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum())


def independent_kid(features_1, features_2) -> float:
    """Unbiased MMD^2 with KID's kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al.) over all features of
    two sets of equal size: what KID is when its one subset is the whole set."""
    x, y = (np.asarray(f, dtype=np.float64) for f in (features_1, features_2))
    m, d = x.shape
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    within = sum(kernel(f, f).sum() - np.trace(kernel(f, f)) for f in (x, y)) / (m * (m - 1))
    return float(within - 2 * kernel(x, y).mean())


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(
        ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32, patch_nums=(1, 2, 4), norm_groups=8
    )
    transformer = VARTransformer(
        depth=2, width=64, num_heads=2, vocab_size=32, latent_channels=8, num_classes=10, patch_nums=(1, 2, 4)
    )
    transformer.init_weights(init_adaln_gamma=0.5, init_head=1.0)  # samples depend on seed and label
    folder = tmp_path_factory.mktemp("pipe") / "tiny-var"
    VARPipeline(tokenizer=tokenizer, transformer=transformer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "plain"
    fid.evaluate(str(tiny_pipeline), out, **RUN)
    return out


@pytest.fixture(scope="session")
def inception(tmp_path_factory):
    return build_random_inception(tmp_path_factory.getbasetemp() / "inception-random.pth")


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    a, b = random_images(12, seed=0), random_images(12, seed=1) // 2  # b: darker, another distribution
    return {"a": write_folder(root / "a", a), "b": write_folder(root / "b", b), "a_array": a, "b_array": b}
