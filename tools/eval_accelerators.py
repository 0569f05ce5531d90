"""Score samplers (next-token) or KV-cache policies (next-scale) against plain sampling on a shipped emoji model,
the default models' protocol: same classes and seeds for every setting, in-domain FID / KID (class-matched,
`vartk-emoji` features) against a held-out split, class accuracy, and what each setting cost.

    python tools/eval_accelerators.py --data data/emoji --model default-gpt --out runs/accel-gpt \
        --setting nexttoken --setting sjd --setting sjd:coupled=true --setting gsd
    python tools/eval_accelerators.py --data data/emoji --model default --out runs/accel-var \
        --setting full --setting scalekv:budget=0.1 --setting sliding:budget=0.1 --setting coarse-recent:budget=0.1

The first --setting is the baseline: it runs with every --seeds seed, so its seed-to-seed spread of FID / KID is
the noise band the others are read against (they run with the first seed). Each setting's images are paired with
the baseline's of the same seed (PSNR: identical images score inf). Writes results.json, results.md, a grid of
the same labels and seeds under each setting (grid.png) and, for speculative samplers, the histogram of accepted
lengths per verify step (accepted.png).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from eval_default_models import MATCHED_SEED_OFFSET
from torchvision.utils import make_grid

from vartk.classifier import SHIPPED_WEIGHTS, ImageClassifier, accuracy, load_folder
from vartk.emoji_extractor import EMOJI_CLASSIFIER, register_emoji_extractor
from vartk.files import write_text_atomic
from vartk.images import images_to_uint8
from vartk.loading import load
from vartk.metrics import compute_metrics, psnr
from vartk.samplers import KV_CACHE, SAMPLER, SamplerStats


@torch.no_grad()
def generate(pipe, labels: torch.Tensor, seed: int, role: dict, batch_size: int) -> tuple[torch.Tensor, SamplerStats]:
    """One image per label -> (images [N, 3, H, W], the calls' statistics); batch b samples with seed + b."""
    images, stats = [], []
    for b, chunk in enumerate(labels.split(batch_size)):
        out = pipe(class_labels=chunk.tolist(), generator=torch.Generator().manual_seed(seed + b), output_type="pt",
                   progress=False, **role)
        images.append(out.images)
        stats.append(out.stats)
    return torch.cat(images), SamplerStats.concat(stats)


def score(images: torch.Tensor, labels: torch.Tensor, held_out: torch.Tensor, classifier) -> dict:
    """In-domain FID / KID against the held-out images and the classifier's accuracy on the samples."""
    metrics = compute_metrics(images_to_uint8(images), images_to_uint8(held_out), ("fid", "kid"),
                              feature_extractor=EMOJI_CLASSIFIER, device="cpu", cache=False)
    return {"fid": metrics["fid"], "kid": metrics["kid"], "accuracy": accuracy(classifier, images, labels)}


def psnr_to_baseline(images: torch.Tensor, baseline: torch.Tensor) -> dict:
    """Mean PSNR over the pairs that differ, and how many pairs are identical."""
    values = [psnr(a, b) for a, b in zip(images_to_uint8(images), images_to_uint8(baseline))]
    finite = [v for v in values if math.isfinite(v)]
    return {"psnr": float(np.mean(finite)) if finite else float("inf"), "identical": len(values) - len(finite)}


def cost(stats: SamplerStats) -> dict:
    summary = {"forwards_per_image": float(stats.row_forwards.double().mean()),
               "tokens_per_forward": float(stats.tokens_per_forward.mean()), "kv_bytes": stats.kv_bytes,
               "sampling_seconds_per_image": stats.seconds / len(stats.row_tokens)}
    if stats.accepted_lengths is not None:
        summary["accepted_lengths"] = stats.accepted_lengths.tolist()
        summary["acceptance_by_position"] = [None if r != r else r for r in stats.acceptance_by_position.tolist()]
    return summary


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid_label(spec: str) -> str:
    """The spec as a row label: a setting that names a file (a path) shows only the file's name."""
    name, _, settings = spec.partition(":")
    if not settings:
        return spec
    shown = [f"{key}={Path(value).name}" if "/" in value else f"{key}={value}"
             for key, _, value in (item.partition("=") for item in settings.split(","))]
    return f"{name}:{','.join(shown)}"


def save_labelled_grid(rows: list[torch.Tensor], names: list[str], path: Path) -> None:
    """One row of images per setting (each [N, 3, H, W] in [0, 1]), the setting's spec written to its left."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(len(rows[0]) * 0.75 + 3, len(rows) * 0.8), squeeze=False)
    for ax, images, name in zip(axes[:, 0], rows, names):
        strip = make_grid(images, nrow=len(images), padding=2, pad_value=1.0)  # [3, H + 4, N * (W + 2) + 2]
        ax.imshow(strip.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_frame_on(False)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(h_pad=0.1)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_accepted_lengths(runs: list[dict], path: Path) -> None:
    """Bars of the share of verify steps that accepted j drafts, one group per speculative setting."""
    plt = pyplot()
    speculative = [r for r in runs if "accepted_lengths" in r]
    if not speculative:
        return
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(speculative)
    for i, run in enumerate(speculative):
        counts = np.array(run["accepted_lengths"], dtype=float)
        ax.bar(np.arange(len(counts)) + i * width, counts / counts.sum(), width,
               label=f"{run['setting']} ({run['tokens_per_forward']:.2f} tokens / forward)")
    ax.set_xlabel("drafts accepted in a verify step")
    ax.set_ylabel("share of verify steps")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(results: dict) -> str:
    band = results["baseline_spread"]
    rows = [f"| setting | forwards / image | tokens / forward | KV cache | FID | KID | class accuracy | PSNR vs "
            f"{results['runs'][0]['setting']} (same seed) | CPU s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        rows.append(f"| `{r['setting']}` (seed {r['seed']}) | {r['forwards_per_image']:.1f} | {r['tokens_per_forward']:.2f} "
                    f"| {r['kv_bytes'] / 2**20:.2f} MiB | {r['fid']:.3f} | {r['kid']:.4f} | {r['accuracy']:.3f} | "
                    f"{r['psnr']:.2f} dB | {r['sampling_seconds_per_image']:.3f} |")
    rows.append(f"\nBaseline spread over seeds {results['seeds']}: FID {band['fid_min']:.3f} - {band['fid_max']:.3f}, "
                f"KID {band['kid_min']:.4f} - {band['kid_max']:.4f}.")
    return "\n".join(rows) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the emoji dataset root (with train/, val/, test/)")
    parser.add_argument("--split", choices=("val", "test"), default="test",
                        help="held-out split: val to choose settings, test to report (default: test)")
    parser.add_argument("--model", default="default-gpt", help="a model vartk.load opens (default: default-gpt)")
    parser.add_argument("--setting", action="append", required=True,
                        help="a sampler (next-token model) or KV-cache policy (next-scale) spec; repeatable; the "
                             "first is the baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="the baseline's seeds; the others "
                        "use the first (default: 1 2 3)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--grid-per-class", type=int, default=2, help="images of each class in the grid")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    register_emoji_extractor()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load(args.model)
    kind = KV_CACHE if pipe.family == "var" else SAMPLER
    roles = [{("kv_cache" if kind == KV_CACHE else "sampler"): pipe.resolve(spec, kind)} for spec in args.setting]
    classifier = ImageClassifier.from_pretrained(SHIPPED_WEIGHTS, low_cpu_mem_usage=False).eval()
    held_out, labels, _ = load_folder(Path(args.data) / args.split, 64, classifier.config.class_names)
    seed_base = [s + MATCHED_SEED_OFFSET for s in args.seeds]
    results = {"model": args.model, "split": args.split, "held_out_images": len(labels), "seeds": args.seeds,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": []}
    baseline = {}
    for index, (spec, role) in enumerate(zip(args.setting, roles)):
        for seed, base in zip(args.seeds, seed_base) if index == 0 else [(args.seeds[0], seed_base[0])]:
            images, stats = generate(pipe, labels, base, role, args.batch_size)
            baseline.setdefault(seed, images)
            run = {"setting": spec, "seed": seed, **cost(stats), **score(images, labels, held_out, classifier),
                   **psnr_to_baseline(images, baseline[seed])}
            results["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k not in ("accepted_lengths", "acceptance_by_position")}),
                  flush=True)
            if seed == args.seeds[0]:
                picks = torch.cat([torch.nonzero(labels == c)[: args.grid_per_class, 0] for c in range(int(labels.max()) + 1)])
                results.setdefault("_grid", []).append(images[picks])
    base_runs = [r for r in results["runs"] if r["setting"] == args.setting[0]]
    results["baseline_spread"] = {f"{m}_{f.__name__}": f(r[m] for r in base_runs) for m in ("fid", "kid")
                                  for f in (min, max)}
    save_labelled_grid(results.pop("_grid"), [grid_label(spec) for spec in args.setting], out / "grid.png")
    plot_accepted_lengths([r for r in results["runs"] if r["seed"] == args.seeds[0]], out / "accepted.png")
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
