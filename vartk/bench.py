"""Sampling throughput and peak memory, side by side with the official samplers' numbers.

    python eval/bench.py                       # full table on a GPU (random weights, bf16)
    python eval/bench.py --tiny --device cpu   # a seconds-long smoke run of the same code

VAR rows time the whole call including the VQVAE decode to pixels (as the official anchor does);
GPT rows time token generation only. Each figure is the best of `--repeats` timed calls after one
warm-up call; "first call" is the warm-up's time (CUDA-graph capture happens there).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from .models.gpt import GPT_CONFIGS, GPTTransformer
from .models.var import VARTransformer
from .samplers.next_scale import NextScaleSampler
from .samplers.next_token import NextTokenSampler
from .tokenizers.msvq import MultiScaleVQVAE

# Official samplers on one H100 (the project reference notes, anchor_baseline.md): (model, batch) -> (s / call, img/s, peak MiB).
OFFICIAL = {
    ("VAR-d16", 1): (0.199, 5.0, 1808), ("VAR-d16", 16): (0.251, 63.8, 4299), ("VAR-d16", 64): (0.532, 120.3, 12277),
    ("VAR-d30", 1): (0.322, 3.1, 6187), ("VAR-d30", 16): (0.456, 35.1, 13409), ("VAR-d30", 64): (1.212, 52.8, 36532),
    ("GPT-B", 1): (3.701, 0.27, 284), ("GPT-B", 16): (3.739, 4.3, 829), ("GPT-B", 64): (3.533, 18.1, 2583),
    ("GPT-L", 1): (6.383, 0.16, 793), ("GPT-L", 16): (5.041, 3.2, 1805), ("GPT-L", 64): (5.748, 11.1, 5053),
}
# The official LlamaGen with its --compile path (torch.compile reduce-overhead): (s / call, img/s, first call s).
OFFICIAL_COMPILED = {("GPT-B", 1): (0.299, 3.3, 36.5), ("GPT-B", 64): (0.322, 198.6, 23.7),
                     ("GPT-L", 1): (0.341, 2.9, 49.6), ("GPT-L", 64): (0.706, 90.7, 52.6)}


@dataclass
class Row:
    model: str
    mode: str
    batch: int
    seconds: float
    first_call: float
    peak_mib: float

    @property
    def images_per_second(self) -> float:
        return self.batch / self.seconds


def _time_calls(fn, repeats: int, device: torch.device) -> tuple[float, float, float]:
    """(best seconds, first-call seconds, peak MiB) of `fn()`."""

    def timed():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = timed()
    best = min(timed() for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return best, first, peak


def bench_var(name: str, transformer, tokenizer, batches, repeats, device) -> list[Row]:
    sampler = NextScaleSampler()
    rows = []
    for batch in batches:
        labels = torch.arange(batch, device=device) % transformer.config.num_classes

        def run():
            with torch.inference_mode():
                tokens = sampler(transformer, tokenizer, labels, guidance_scale=1.5, top_k=900, top_p=0.96,
                                 generator=torch.Generator(device).manual_seed(0), progress=False)
                tokenizer.decode(tokens)

        rows.append(Row(name, "eager", batch, *_time_calls(run, repeats, device)))
        print(format_row(rows[-1]), flush=True)
    return rows


def bench_gpt(name: str, transformer, batches, repeats, device, modes) -> list[Row]:
    rows = []
    for mode in modes:
        sampler = NextTokenSampler(cuda_graph=(mode == "cuda-graph"))
        for batch in batches:
            labels = torch.arange(batch, device=device) % transformer.config.num_classes

            def run():
                with torch.inference_mode():
                    sampler(transformer, labels, guidance_scale=2.0, top_k=0, top_p=1.0,
                            generator=torch.Generator(device).manual_seed(0), progress=False)

            rows.append(Row(name, mode, batch, *_time_calls(run, repeats, device)))
            print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: Row) -> str:
    official = OFFICIAL.get((row.model, row.batch))
    compiled = OFFICIAL_COMPILED.get((row.model, row.batch))
    ratio = f"{row.images_per_second / official[1]:.2f}x" if official else "-"
    ratio_compiled = f"{row.images_per_second / compiled[1]:.2f}x" if compiled else "-"
    seconds, images_per_second, peak_mib = official or ("-", "-", "-")
    return (f"| {row.model} | {row.mode} | {row.batch} | {row.seconds:.3f} | {row.images_per_second:.1f} | "
            f"{row.peak_mib:.0f} | {row.first_call:.2f} | {seconds} | {images_per_second} | {peak_mib} | {ratio} | "
            f"{ratio_compiled} |")


HEADER = ("| model | mode | batch | s / call | img/s | peak MiB | first call s | official s | official img/s | "
          "official peak MiB | speed-up vs official eager | vs official compiled |\n|" + "---|" * 12)


def tiny_models() -> dict:
    """{name: (kind, build)} of tiny random models, for a smoke run of the code path."""
    tokenizer = lambda: MultiScaleVQVAE(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8,  # noqa: E731
                                        vocab_size=64, patch_nums=(1, 2, 4), norm_groups=8)
    return {
        "VAR-tiny": ("var", lambda: (VARTransformer(depth=2, width=64, num_heads=2, vocab_size=64, latent_channels=8,
                                                    patch_nums=(1, 2, 4)), tokenizer())),
        "GPT-tiny": ("gpt", lambda: (GPTTransformer(dim=64, n_layer=2, n_head=2, vocab_size=64, grid_size=4), None)),
    }


def full_models() -> dict:
    """{name: (kind, build)} of the models the official numbers describe, with random weights."""
    models = {f"VAR-d{d}": ("var", lambda d=d: (VARTransformer(depth=d), MultiScaleVQVAE())) for d in (16, 30)}
    models.update({name: ("gpt", lambda name=name: (GPTTransformer(**GPT_CONFIGS[name]), None))
                   for name in ("GPT-B", "GPT-L")})
    return models


def build(kind: str, builder, dtype: torch.dtype, device: torch.device):
    """(transformer in `dtype`, tokenizer in float32 or None) on `device`, randomly initialised, in eval mode."""
    with torch.device(device):  # initialising VAR-d30's 2B parameters on a CPU would take minutes
        transformer, tokenizer = builder()  # VAR: the official init already ran in __init__
    if kind == "gpt":
        transformer.init_weights(randomize_output=True)
    return transformer.to(device, dtype).eval(), tokenizer.to(device).eval() if tokenizer is not None else None


def main(argv: list[str] | None = None) -> list[Row]:
    from .arguments import DEFAULT_DEVICE, int_in_range, parse_device

    parser = argparse.ArgumentParser(prog="vartk bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=parse_device, default=DEFAULT_DEVICE)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batches", type=int_in_range(1), nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int_in_range(1), default=3)
    parser.add_argument("--only", nargs="+", default=None, help="model names to run, e.g. VAR-d16 GPT-B")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a smoke run of the code path")
    parser.add_argument("--force", action="store_true", help="run the full-size models on a CPU anyway (hours)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    models = tiny_models() if args.tiny else full_models()
    unknown = sorted(set(args.only or []) - set(models))
    if unknown:
        parser.error(f"--only {unknown} unknown; the {'tiny' if args.tiny else 'full'} models are {sorted(models)}")
    if device.type == "cpu" and not (args.tiny or args.force):
        parser.error("the full-size models take hours per row on a CPU; run on a GPU, or pass --tiny for a smoke "
                     "run (--force to time them on the CPU anyway)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"dtype {args.dtype}; peak MiB: weights included, one model on the device at a time")
    print(HEADER)
    gpt_modes = ["eager", "cuda-graph"] if device.type == "cuda" else ["eager"]
    rows = []
    for name, (kind, builder) in models.items():
        if args.only and name not in args.only:
            continue
        transformer, tokenizer = build(kind, builder, getattr(torch, args.dtype), device)
        if kind == "var":
            rows += bench_var(name, transformer, tokenizer, args.batches, args.repeats, device)
        else:
            rows += bench_gpt(name, transformer, args.batches, args.repeats, device, gpt_modes)
        del transformer, tokenizer  # the next model's peak memory counts its own weights only
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
