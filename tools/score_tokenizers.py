"""Score tokenizer folders on a split of the emoji dataset: codebook use, reconstruction PSNR and the emoji
classifier's accuracy on the reconstructions (the ceiling of a generator that draws those images' own tokens).

    python tools/score_tokenizers.py --data data/emoji --split val runs/tok_ms/tokenizer runs/tok_ss/tokenizer

A folder is a tokenizer run's `tokenizer/`, a checkpoint's `model/` or a pipeline's `tokenizer/`. One markdown row
per folder on stdout (and results.json with --out): codes used over all scales, the perplexity of the code
distribution (exp of its entropy: how many equally used codes would give the same entropy), PSNR, and the
classifier's accuracy on the reconstructions; the accuracy on the real images comes first, for reference.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from eval_default_models import code_counts, reconstruct, reconstruction_psnr

from vartk.checkpoints import load_saved_model
from vartk.classifier import SHIPPED_WEIGHTS, ImageClassifier, accuracy, load_folder
from vartk.files import write_text_atomic
from vartk.tokenizers import MultiScaleVQVAE, VQModel


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code distribution `counts` [V]."""
    p = counts[counts > 0] / counts.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def score(folder: Path, images: torch.Tensor, labels: torch.Tensor, classifier: ImageClassifier) -> dict:
    tokenizer = load_saved_model(folder, (MultiScaleVQVAE, VQModel)).float()
    counts = code_counts(tokenizer, images)
    recon = reconstruct(tokenizer, images)
    return {"tokenizer": str(folder), "codes_used": int((counts > 0).sum()), "vocab_size": tokenizer.vocab_size,
            "perplexity": perplexity(counts), "psnr": reconstruction_psnr(recon, images),
            "accuracy_of_reconstructions": accuracy(classifier, recon, labels)}


def markdown_row(result: dict) -> str:
    return (f"| {result['tokenizer']} | {result['codes_used']} / {result['vocab_size']} | {result['perplexity']:.1f} "
            f"| {result['psnr']:.2f} dB | {result['accuracy_of_reconstructions']:.3f} |")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="tokenizer folders (save_pretrained)")
    parser.add_argument("--data", required=True, help="the emoji dataset root (with train/, val/, test/)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val",
                        help="the images to score on: val for choosing, test for reporting")
    parser.add_argument("--out", type=Path, help="also write the results to this folder's results.json")
    args = parser.parse_args(argv)
    classifier = ImageClassifier.from_pretrained(SHIPPED_WEIGHTS, low_cpu_mem_usage=False).eval()
    images, labels, _ = load_folder(Path(args.data) / args.split, 64, classifier.config.class_names)
    print(f"{args.split}: {len(labels)} images, classifier accuracy on them {accuracy(classifier, images, labels):.3f}")
    print("| tokenizer | codes used | perplexity | PSNR | accuracy of reconstructions |\n|---|---|---|---|---|")
    results = []
    for folder in args.folders:
        results.append(score(folder, images, labels, classifier))
        print(markdown_row(results[-1]), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
