"""The in-domain classifier: trains, predicts, and serves as the "vartk-emoji" feature extractor."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vartk.classifier import ImageClassifier, accuracy, load_folder, train_classifier
from vartk.emoji_extractor import EMOJI_CLASSIFIER, register_emoji_extractor
from vartk.metrics import compute_metrics, frechet_distance


def write_colour_folder(root, per_class: int, seed: int):
    """Two classes, red-ish and blue-ish squares with noise, 16 px."""
    rng = np.random.default_rng(seed)
    for name, channel in (("blue", 2), ("red", 0)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 90, (16, 16, 3), dtype=np.uint8)
            image[..., channel] = rng.integers(160, 256, (16, 16))
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    train, test = write_colour_folder(root / "train", 12, 0), write_colour_folder(root / "test", 6, 1)
    model = train_classifier(str(train), str(root / "model"), steps=40, batch_size=16, lr=3e-3, width=8, image_size=16)
    return model, root


def test_classifier_learns_and_round_trips(trained):
    model, root = trained
    images, labels, names = load_folder(root / "test", 16)
    assert names == ["blue", "red"]
    assert accuracy(model, images, labels) == 1.0
    shutil.rmtree(root / "test_red", ignore_errors=True)
    shutil.copytree(root / "test" / "red", root / "test_red" / "red")  # a held-out tree without "blue"
    red_images, red_labels, red_names = load_folder(root / "test_red", 16, class_names=names)
    assert red_labels.tolist() == [1] * len(red_labels) and red_names == names
    assert accuracy(model, red_images, red_labels) == 1.0  # by name: "red" is class 1 of the model, not 0
    with pytest.raises(ValueError, match=r"class folders \['red'\] .* not among the classes \['blue'\]"):
        load_folder(root / "test_red", 16, class_names=["blue"])
    again = ImageClassifier.from_pretrained(root / "model", low_cpu_mem_usage=False)
    assert again.config.class_names == ["blue", "red"]
    assert torch.allclose(again(images), model(images), atol=1e-6)


def test_classifier_as_feature_extractor(trained):
    model, root = trained
    register_emoji_extractor()
    images, _, _ = load_folder(root / "test", 16)
    generated = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    kwargs = dict(feature_extractor=EMOJI_CLASSIFIER, feature_extractor_weights=str(root / "model"), device="cpu",
                  cache=False, isc_splits=1)
    same = compute_metrics(generated, generated, ["fid", "is"], **kwargs)
    assert abs(same["fid"]) < 1e-3
    with torch.no_grad():
        features = model.features(images).double().numpy()
        probs = model(images).softmax(-1).double().numpy()
    half = len(generated) // 2
    split = compute_metrics(generated[:half], generated[half:], ["fid"], **kwargs)
    expected = frechet_distance(features[:half].mean(0), np.cov(features[:half], rowvar=False),
                                features[half:].mean(0), np.cov(features[half:], rowvar=False))
    assert split["fid"] == pytest.approx(expected, rel=1e-3)
    marginal = probs.mean(0)
    expected_is = np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(marginal)), axis=1)))
    assert same["is"] == pytest.approx(expected_is, rel=1e-3)


def test_the_emoji_extractor_is_registered_by_the_fid_command_not_by_imports():
    code = ("from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY as known; import vartk.metrics, "
            "vartk.evaluation as fid; before = 'vartk-emoji' in known\n"
            "try: fid.main(['--feature-extractor', 'vartk-emoji'])\n"
            "except SystemExit as stop: print(before, 'vartk-emoji' in known, stop)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert result.strip() == "False True vartk fid: --out is required: the run folder for samples and results"
