"""Score the shipped emoji models on a held-out split and write the README's results table.

    python tools/eval_default_models.py --data /path/to/emoji --per-class 50 --out runs/default-eval
    python tools/eval_default_models.py --data /path/to/emoji --split val --models default-gpt \
        --sampling '{"guidance_scale": 3}' --sampling '{"guidance_scale": 4, "top_k": 50}'   # one row each

    python tools/eval_default_models.py --data /path/to/emoji --split test --seed 1 2 3   # mean ± spread over seeds
    python tools/eval_default_models.py --data /path/to/emoji --split val --models default \
        --sampler nextscale --sampler nextscale:guidance_schedule=constant   # rows per sampler x --sampling

Choose settings (sampling, which checkpoint) with `--split val`; report with `--split test` (the default), which
nothing was chosen on, and with other seeds than the one the choice saw. With several seeds every score is the
mean over the seeds, with its standard deviation (`*_std`) beside it; the grid shows the first seed. With several
--sampling settings (or --sampler specs: each applies to the models of its family, the others keep their own), each
model's `chosen` one is the most accurate (class accuracy of samples) of those whose in-domain FID is at most 10 %
above that model's best: recognisable first, without giving up much FID.

Measures, on the held-out split: tokenizer reconstruction PSNR and codebook use, and the classifier's accuracy
on the reconstructions (what a generator that drew the held-out emoji's own tokens would score: the tokenizer's
ceiling); the classifier's accuracy on the real images. For each generator and setting, on the emoji classifier
(`vartk-emoji`: pooled features for FID, logits for IS; not comparable with ImageNet FID):
- a class-balanced set (--per-class of every class): class accuracy of the samples (the classifier finds the
  asked category), overall and per category, IS, and the sample grid;
- a class-matched set (one sample per held-out image, of its class): FID against the held-out images. The
  held-out splits are mostly people_body; a class-balanced set differs from them in its class mix, and on the
  classifier's features that mix outweighs image quality (real class-balanced training images score worse
  than the models), so the balanced set's FID is only reported, as the earlier releases measured it.
The same three numbers for real training images (class-matched and balanced picks) are the floor / reference.
Writes results.json, results.md and a sample grid per run.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from vartk.classifier import SHIPPED_WEIGHTS, ImageClassifier, accuracy, load_folder, predict
from vartk.emoji_extractor import EMOJI_CLASSIFIER, register_emoji_extractor
from vartk.files import write_text_atomic
from vartk.metrics import compute_metrics, psnr
from vartk.images import images_to_uint8
from vartk.loading import load
from vartk.samplers import registry

MATCHED_SEED_OFFSET = 10_000  # the class-matched set's batches draw from other seeds than the balanced set's
SAMPLE_SCORES = ("classifier_accuracy_generated", "fid_in_domain", "fid_in_domain_balanced", "is_in_domain",
                 "sampling_seconds_per_image")  # what each seed measures; several seeds report mean and spread



@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """decode(encode(images)): [N, 3, H, W] in [0, 1]."""
    return torch.cat([tokenizer.decode(tokenizer.encode(chunk)).float() for chunk in images.split(batch_size)])


def reconstruction_psnr(recon: torch.Tensor, images: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) between uint8 images and their uint8 reconstructions."""
    return float(np.mean([psnr(a, b) for a, b in zip(images_to_uint8(recon), images_to_uint8(images))]))


@torch.no_grad()
def code_counts(tokenizer, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """How often the tokenizer picks each code on these images, over all scales: [V]."""
    counts = torch.zeros(tokenizer.vocab_size)
    for chunk in images.split(batch_size):
        tokens = tokenizer.encode(chunk)
        for index_map in tokens if isinstance(tokens, list) else [tokens]:
            counts += torch.bincount(index_map.flatten(), minlength=tokenizer.vocab_size)
    return counts


def codes_used(tokenizer, images: torch.Tensor) -> int:
    """How many distinct codebook entries the tokenizer picks on these images, over all scales."""
    return int((code_counts(tokenizer, images) > 0).sum())


def pick_with_labels(labels: torch.Tensor, wanted: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices of distinct random images whose labels are `wanted` (as a multiset): for every class c, as many
    images of class c as `wanted` holds, drawn without replacement."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))  # [N]
    counts = torch.bincount(wanted, minlength=int(labels.max()) + 1)  # [C]
    return torch.cat([order[labels[order] == c][:n] for c, n in enumerate(counts.tolist())])


@torch.no_grad()
def generate(pipe, labels: torch.Tensor, seed: int, settings: dict, batch_size: int = 50) -> torch.Tensor:
    """One image per label [N] -> [N, 3, H, W]; batch b samples with seed + b."""
    return torch.cat([
        pipe(class_labels=chunk.tolist(), generator=torch.Generator().manual_seed(seed + b), output_type="pt",
             progress=False, **settings).images
        for b, chunk in enumerate(labels.split(batch_size))
    ])


def accuracy_by_class(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """For each class c, the share of the images labelled c that were predicted c (nan for a class with none)."""
    return [(predicted[labels == c] == c).float().mean().item() for c in range(num_classes)]


def mean_and_spread(per_seed: list[dict]) -> dict:
    """The seeds' mean of every SAMPLE_SCORES entry and of the per-class accuracies, and the sample standard
    deviation over the seeds of the scores (`<score>_std`; 0 for one seed)."""
    summary = {}
    for key in SAMPLE_SCORES:
        values = np.array([run[key] for run in per_seed], dtype=float)
        summary[key] = float(values.mean())
        summary[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    by_class = np.array([run["classifier_accuracy_per_class"] for run in per_seed], dtype=float)  # [seeds, C]
    summary["classifier_accuracy_per_class"] = by_class.mean(axis=0).tolist()
    return summary


def in_domain_scores(balanced: torch.Tensor, matched: torch.Tensor, held_out: torch.Tensor) -> dict:
    """FID of the class-matched set and of the class-balanced set against the held-out images, IS of the balanced set."""
    def metrics(images, which):
        return compute_metrics(images_to_uint8(images), images_to_uint8(held_out), which,
                               feature_extractor=EMOJI_CLASSIFIER, device="cpu", cache=False, isc_splits=1)

    on_balanced = metrics(balanced, ("fid", "is"))
    return {"fid_in_domain": metrics(matched, ("fid",))["fid"], "fid_in_domain_balanced": on_balanced["fid"],
            "is_in_domain": on_balanced["is"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the emoji dataset root (with train/, val/, test/)")
    parser.add_argument("--split", choices=("val", "test"), default="test",
                        help="held-out split to score against: val for choosing settings, test for reporting")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="one seed, or several (e.g. 1 2 3) to report each score's mean and spread over them")
    parser.add_argument("--out", default="runs/default-eval")
    parser.add_argument("--models", default="default,default-gpt", help="comma-separated model names or folders")
    parser.add_argument("--sampling", type=json.loads, action="append",
                        help='JSON overriding the models\' own sampling settings, e.g. {"guidance_scale": 4, "top_k": 50}; '
                             'repeat it to score several settings (default: the models\' own)')
    parser.add_argument("--sampler", action="append",
                        help="a sampler as a registry spec, e.g. nextscale:guidance_schedule=constant, for the models "
                             "of its family; repeat it to score several (default: the models' own)")
    args = parser.parse_args(argv)
    register_emoji_extractor()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    classifier = ImageClassifier.from_pretrained(SHIPPED_WEIGHTS, low_cpu_mem_usage=False).eval()
    held_out_images, held_out_labels, _ = load_folder(Path(args.data) / args.split, 64, classifier.config.class_names)
    held_out_predicted = predict(classifier, held_out_images)  # [N]
    results = {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
               "split": args.split, "held_out_images": len(held_out_labels),
               "classifier_accuracy_real_held_out": (held_out_predicted == held_out_labels).float().mean().item(),
               "runs": []}
    balanced_labels = torch.arange(classifier.config.num_classes).repeat_interleave(args.per_class)  # [C * n]
    train_images, train_labels, _ = load_folder(Path(args.data) / "train", 64)
    first_seed = args.seed[0]
    train_balanced = pick_with_labels(train_labels, balanced_labels, first_seed)
    real = in_domain_scores(train_images[train_balanced],
                            train_images[pick_with_labels(train_labels, held_out_labels, first_seed)], held_out_images)
    results["real_accuracy_per_class"] = {  # the classifier's own, on real images: what samples are read against
        f"real {args.split} images": accuracy_by_class(held_out_predicted, held_out_labels,
                                                       classifier.config.num_classes),
        f"real training images ({args.per_class} per class)": accuracy_by_class(
            predict(classifier, train_images[train_balanced]), train_labels[train_balanced],
            classifier.config.num_classes)}
    results["real_train_vs_held_out"] = {"per_class": args.per_class, **real}
    pipes = {name: load(name) for name in args.models.split(",")}
    samplers = {name: samplers_for(pipe, args.sampler or []) for name, pipe in pipes.items()}
    unused = sorted(set(args.sampler or []) - {spec for specs in samplers.values() for spec in specs})
    if unused:
        raise SystemExit(f"--sampler {unused[0]} fits none of the models {sorted(pipes)}")
    for name, pipe in pipes.items():  # every --sampling is checked before hours of scoring start
        for overrides in args.sampling or [{}]:
            try:
                unknown = sorted(set(overrides) - set(pipe.official_sampling))
                if unknown:
                    raise ValueError(f"{unknown} unknown; allowed: {sorted(pipe.official_sampling)}")
                pipe.sampling_options(**overrides)
            except ValueError as err:
                raise SystemExit(f"--sampling {json.dumps(overrides)} for {name}: {err}")
    for name, pipe in pipes.items():
        recon = reconstruct(pipe.tokenizer, held_out_images)
        tokenizer_scores = {
            "vocab_size": pipe.tokenizer.vocab_size,
            "tokenizer_psnr_held_out": reconstruction_psnr(recon, held_out_images),
            "classifier_accuracy_reconstructed_held_out": accuracy(classifier, recon, held_out_labels),
            "tokenizer_codes_used_held_out": codes_used(pipe.tokenizer, held_out_images),
        }
        for sampler in samplers[name] or [pipe.sampler]:
            pipe.sampler = sampler
            for overrides in args.sampling or [{}]:
                settings = pipe.sampling_options(**overrides)
                grid_file = out / grid_name(name, settings, registry.to_spec(pipe.sampler))
                run = score_setting(pipe, classifier, settings, args.seed, balanced_labels, held_out_images,
                                    held_out_labels, grid_file)
                run = {"model": name, "family": pipe.family, **run, "images": len(balanced_labels),
                       **tokenizer_scores}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
    if args.split == "val":  # settings are chosen on val only; a test run reports
        results["chosen"] = {name: choose_settings([r for r in results["runs"] if r["model"] == name])
                             for name in pipes}
    results["class_names"] = classifier.config.class_names
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    print(markdown_table(results))
    if "chosen" in results and len(results["runs"]) > len(pipes):  # some model had settings to choose from
        print("chosen (most accurate within 10 % of the best FID):", json.dumps(results["chosen"]))
    return results


def samplers_for(pipe, specs: list[str]) -> list[str]:
    """The specs among `specs` of samplers of `pipe`'s family (each spec is checked: an unknown sampler or setting
    raises SystemExit)."""
    try:
        return [spec for spec in specs if registry.from_spec(spec, registry.SAMPLER).family == pipe.sampling_family]
    except ValueError as err:
        raise SystemExit(f"--sampler: {err}")


def score_setting(pipe, classifier, settings: dict, seeds: list[int], balanced_labels: torch.Tensor,
                  held_out_images: torch.Tensor, held_out_labels: torch.Tensor, grid_file: Path) -> dict:
    """The pipeline's samples with `settings` (and its sampler), scored at every seed: the settings, the sampler's
    spec, the seeds' mean and spread and the per-seed scores; the first seed's grid is saved to `grid_file`."""
    per_seed = []
    for seed in seeds:
        images, scores = score_samples(pipe, classifier, settings, seed, balanced_labels, held_out_images,
                                       held_out_labels)
        per_seed.append(scores)
        if seed == seeds[0]:
            grid = torch.cat([images[balanced_labels == c][:8] for c in range(pipe.num_classes)])
            save_image(grid, grid_file, nrow=8, padding=2, pad_value=1.0)
    return {"sampling": settings, "sampler": registry.to_spec(pipe.sampler), "seeds": seeds,
            **mean_and_spread(per_seed), "per_seed": per_seed}


def score_samples(pipe, classifier, settings: dict, seed: int, balanced_labels: torch.Tensor,
                  held_out_images: torch.Tensor, held_out_labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The class-balanced samples of one seed [N, 3, H, W] and their SAMPLE_SCORES (with the class-matched set's
    FID) and per-class accuracies."""
    start = time.perf_counter()
    images = generate(pipe, balanced_labels, seed, settings)
    seconds = time.perf_counter() - start
    matched = generate(pipe, held_out_labels, seed + MATCHED_SEED_OFFSET, settings)
    predicted = predict(classifier, images)  # [N]
    return images, {"seed": seed, "sampling_seconds_per_image": seconds / len(balanced_labels),
                    "classifier_accuracy_generated": (predicted == balanced_labels).float().mean().item(),
                    "classifier_accuracy_per_class": accuracy_by_class(predicted, balanced_labels, pipe.num_classes),
                    **in_domain_scores(images, matched, held_out_images)}


def choose_settings(runs: list[dict], fid_slack: float = 0.1) -> dict:
    """The most accurate run's settings (and its sampler's spec, where the run names one) among `runs` (of one model)
    whose FID is within `fid_slack` of the best FID (runs without a finite FID are left out; a best FID of about 0
    allows nothing above it but rounding)."""
    scored = [r for r in runs if math.isfinite(r["fid_in_domain"])]
    if not scored:
        raise ValueError(f"no run has a finite FID: {[r['fid_in_domain'] for r in runs]}")
    best_fid = min(r["fid_in_domain"] for r in scored)
    eligible = [r for r in scored if r["fid_in_domain"] <= best_fid + fid_slack * abs(best_fid)]
    chosen = max(eligible, key=lambda r: r["classifier_accuracy_generated"])
    return {**chosen["sampling"], **({"sampler": chosen["sampler"]} if "sampler" in chosen else {})}


def grid_name(model: str, settings: dict, sampler: str = "") -> str:
    """"runs/var/pipeline", cfg 4 / top-k 20 / top-p 0.9 -> "runs_var_pipeline-cfg4-k20-p0.9-grid.png"; a sampler
    spec with settings ("nextscale:guidance_schedule=constant") is added as "-nextscale-guidance_schedule-constant"."""
    model = model.strip("/").replace("/", "_")
    name = f"{model}-cfg{settings['guidance_scale']:g}-k{settings['top_k']}-p{settings['top_p']:g}"
    if ":" in sampler:
        name += "-" + sampler.replace(":", "-").replace("=", "-").replace(",", "-")
    return name + "-grid.png"


def with_spread(run: dict, key: str, digits: int) -> str:
    """A score as "0.781", or "0.781 ± 0.012" (mean ± standard deviation) when it was measured over several seeds."""
    text = f"{run[key]:.{digits}f}"
    return text + f" ± {run[key + '_std']:.{digits}f}" if len(run.get("seeds", [])) > 1 else text


def settings_text(sampling: dict, sampler: str | None = None) -> str:
    """cfg / top-k / top-p, and the sampler's spec where it has settings of its own."""
    text = f"{sampling['guidance_scale']:g} / {sampling['top_k']} / {sampling['top_p']:g}"
    return text + f" (`{sampler}`)" if sampler and ":" in sampler else text


def markdown_table(results: dict) -> str:
    """The results table (one row per model and setting, then real images) and the per-category accuracy table."""
    rows = ["| model | sampling (cfg / top-k / top-p) | tokenizer PSNR | codes used | class accuracy of reconstructions | "
            "class accuracy of samples | in-domain FID (class-matched) | in-domain FID (balanced samples) | "
            "in-domain IS | CPU s / image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        rows.append(f"| `{r['model']}` ({r['family']}) | {settings_text(r['sampling'], r.get('sampler'))} | "
                    f"{r['tokenizer_psnr_held_out']:.2f} dB | "
                    f"{r['tokenizer_codes_used_held_out']} / {r['vocab_size']} | "
                    f"{r['classifier_accuracy_reconstructed_held_out']:.3f} | "
                    f"{with_spread(r, 'classifier_accuracy_generated', 3)} | {with_spread(r, 'fid_in_domain', 2)} | "
                    f"{with_spread(r, 'fid_in_domain_balanced', 2)} | {with_spread(r, 'is_in_domain', 2)} | "
                    f"{r['sampling_seconds_per_image']:.3f} |")
    real = results["real_train_vs_held_out"]
    rows.append(f"| real training images (one per {results['split']} image of its class; {real['per_class']} per class) "
                f"| - | - | - | - | {results['classifier_accuracy_real_held_out']:.3f} (real {results['split']} images) | "
                f"{real['fid_in_domain']:.2f} | {real['fid_in_domain_balanced']:.2f} | {real['is_in_domain']:.2f} | - |")
    names = results.get("class_names") or [
        str(c) for c in range(len(results["runs"][0]["classifier_accuracy_per_class"]))]
    rows += ["", "| model | sampling | " + " | ".join(names) + " | lowest |", "|---|---|" + "---|" * (len(names) + 1)]
    by_class_rows = [(f"`{r['model']}`", settings_text(r["sampling"], r.get("sampler")),
                      r["classifier_accuracy_per_class"])
                     for r in results["runs"]]
    by_class_rows += [(name, "-", by_class) for name, by_class in results.get("real_accuracy_per_class", {}).items()]
    for name, sampling, by_class in by_class_rows:
        scored = [a for a in by_class if math.isfinite(a)]  # a class without images has no accuracy
        rows.append(f"| {name} | {sampling} | " + " | ".join(f"{a:.2f}" if math.isfinite(a) else "-" for a in by_class)
                    + f" | {min(scored):.2f} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
