"""Score the shipped emoji models on the held-out split and write the README's results table.

    python tools/eval_default_models.py --data /path/to/emoji --per-class 50 --out runs/default-eval

Measures: tokenizer reconstruction PSNR on held-out images, and the classifier's accuracy on those
reconstructions (what a generator that drew the held-out emoji's own tokens would score: the tokenizer's
ceiling); the in-domain classifier's accuracy on real held-out images; for each generator (50 samples
per class), the classifier's accuracy on the requested class, and in-domain FID (vs the held-out images) and IS on the classifier's features / logits
(`vartk-emoji`; not comparable with ImageNet FID). Writes results.json, results.md and a sample grid.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from vartk.classifier import SHIPPED_WEIGHTS, ImageClassifier, accuracy, load_folder
from vartk.metrics import EMOJI_CLASSIFIER, compute_metrics, psnr
from vartk.pipelines import images_to_uint8, load



@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """decode(encode(images)): [N, 3, H, W] in [0, 1]."""
    return torch.cat([tokenizer.decode(tokenizer.encode(chunk)).float() for chunk in images.split(batch_size)])


def reconstruction_psnr(recon: torch.Tensor, images: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) between uint8 images and their uint8 reconstructions."""
    return float(np.mean([psnr(a, b) for a, b in zip(images_to_uint8(recon), images_to_uint8(images))]))


@torch.no_grad()
def codes_used(tokenizer, images: torch.Tensor, batch_size: int = 64) -> int:
    """How many distinct codebook entries the tokenizer picks on these images, over all scales."""
    hits = torch.zeros(tokenizer.config.vocab_size, dtype=torch.bool)  # [V]
    for chunk in images.split(batch_size):
        for index_map in tokenizer.encode(chunk):
            hits[index_map.flatten()] = True
    return int(hits.sum())


@torch.no_grad()
def generate(pipe, per_class: int, seed: int, settings: dict, batch_size: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class images of every class: images [N, 3, H, W], labels [N]; batch b uses seed + b."""
    labels = torch.arange(pipe.num_classes).repeat_interleave(per_class)
    images = [
        pipe(class_labels=chunk.tolist(), generator=torch.Generator().manual_seed(seed + b), output_type="pt",
             progress=False, **settings).images
        for b, chunk in enumerate(labels.split(batch_size))
    ]
    return torch.cat(images), labels


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the emoji dataset root (with test/)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/default-eval")
    parser.add_argument("--models", default="default,default-gpt", help="comma-separated model names or folders")
    parser.add_argument("--sampling", type=json.loads, default={},
                        help='JSON overriding the models\' own sampling settings, e.g. {"guidance_scale": 4, "top_k": 50}')
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test_images, test_labels, _ = load_folder(Path(args.data) / "test", 64)
    classifier = ImageClassifier.from_pretrained(SHIPPED_WEIGHTS, low_cpu_mem_usage=False).eval()
    results = {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
               "held_out_images": len(test_labels),
               "classifier_accuracy_real_held_out": accuracy(classifier, test_images, test_labels), "models": {}}
    train_images, _, _ = load_folder(Path(args.data) / "train", 64)
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))[: 9 * args.per_class]
    real = compute_metrics(images_to_uint8(train_images[pick]), images_to_uint8(test_images), ("fid", "is"),
                           feature_extractor=EMOJI_CLASSIFIER, device="cpu", cache=False, isc_splits=1)
    results["real_train_vs_held_out"] = {"images": len(pick), "fid_in_domain": real["fid"], "is_in_domain": real["is"]}
    for name in args.models.split(","):
        pipe = load(name)
        settings = pipe.sampling_options(**args.sampling)
        start = time.perf_counter()
        images, labels = generate(pipe, args.per_class, args.seed, settings)
        seconds = time.perf_counter() - start
        scores = compute_metrics(images_to_uint8(images), images_to_uint8(test_images), ("fid", "is"),
                                 feature_extractor=EMOJI_CLASSIFIER, device="cpu", cache=False, isc_splits=1)
        recon = reconstruct(pipe.tokenizer, test_images)
        results["models"][name] = {
            "family": pipe.family, "sampling": settings, "images": len(labels),
            "vocab_size": pipe.tokenizer.config.vocab_size,
            "sampling_seconds_per_image": seconds / len(labels),
            "tokenizer_psnr_held_out": reconstruction_psnr(recon, test_images),
            "classifier_accuracy_reconstructed_held_out": accuracy(classifier, recon, test_labels),
            "tokenizer_codes_used_held_out": codes_used(pipe.tokenizer, test_images),
            "classifier_accuracy_generated": accuracy(classifier, images, labels),
            "fid_in_domain": scores["fid"], "is_in_domain": scores["is"],
        }
        grid = torch.cat([images[labels == c][:8] for c in range(pipe.num_classes)])
        save_image(grid, out / f"{name.strip('/').replace('/', '_')}-grid.png", nrow=8, padding=2, pad_value=1.0)
        print(name, json.dumps(results["models"][name]), flush=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown_table(results))
    print(markdown_table(results))
    return results


def markdown_table(results: dict) -> str:
    rows = ["| model | sampling (cfg / top-k / top-p) | tokenizer PSNR (held-out) | codes used (held-out) | "
            "class accuracy of reconstructions (held-out) | class accuracy of samples | in-domain FID | in-domain IS | "
            "CPU s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        sampling = r["sampling"]
        rows.append(f"| `{name}` ({r['family']}) | {sampling['guidance_scale']:g} / {sampling['top_k']} / "
                    f"{sampling['top_p']:g} | {r['tokenizer_psnr_held_out']:.2f} dB | "
                    f"{r['tokenizer_codes_used_held_out']} / {r['vocab_size']} | "
                    f"{r['classifier_accuracy_reconstructed_held_out']:.3f} | "
                    f"{r['classifier_accuracy_generated']:.3f} | {r['fid_in_domain']:.2f} | {r['is_in_domain']:.2f} | "
                    f"{r['sampling_seconds_per_image']:.3f} |")
    real = results["real_train_vs_held_out"]
    rows.append(f"| real images: {real['images']} train vs the {results['held_out_images']} held-out | - | - | - | - | "
                f"{results['classifier_accuracy_real_held_out']:.3f} (held-out) | {real['fid_in_domain']:.2f} | "
                f"{real['is_in_domain']:.2f} | - |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
