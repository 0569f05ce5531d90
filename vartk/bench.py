"""Sampling throughput, transformer forwards and memory per sampler and KV-cache policy, side by side with the
official samplers' numbers.

    vartk bench                                       # full-size random models on a GPU (bf16)
    vartk bench --model default-gpt --device cpu --sampler nexttoken --sampler sjd:window=16 --batches 1 16
    vartk bench --model default --kv-cache full --kv-cache scalekv:budget=0.1
    vartk bench --tiny --device cpu                   # a seconds-long smoke run of the same code

Models: the full-size random-weight VAR-d16 / d30 and GPT-B / L (the official numbers describe them), `--tiny`
random models, or `--model` any pipeline `vartk.load` opens (the shipped models run on a CPU). Every `--sampler`
of the model's family runs with every `--kv-cache` (next-scale models) at every batch size. Next-scale rows time
the whole call including the decode to pixels (as the official anchor does); next-token rows time token
generation. Each figure is the best of `--repeats` timed calls after one warm-up call ("first call": its time,
CUDA-graph capture included). KV MiB: the most the KV caches held at once; peak MiB: the device's peak (CUDA).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch

from .models.gpt import GPT_CONFIGS, GPTTransformer
from .models.var import PATCH_NUMS_512, VARTransformer
from .samplers import KV_CACHE, NEXT_SCALE, NEXT_TOKEN, SAMPLER, registry, spec_help
from .tokenizers.msvq import MultiScaleVQVAE

# Official samplers on one H100 (random weights, 2026-11-22): (model, batch) -> (s / call, img/s, peak MiB).
OFFICIAL = {
    ("VAR-d16", 1): (0.199, 5.0, 1808), ("VAR-d16", 16): (0.251, 63.8, 4299), ("VAR-d16", 64): (0.532, 120.3, 12277),
    ("VAR-d30", 1): (0.322, 3.1, 6187), ("VAR-d30", 16): (0.456, 35.1, 13409), ("VAR-d30", 64): (1.212, 52.8, 36532),
    ("GPT-B", 1): (3.701, 0.27, 284), ("GPT-B", 16): (3.739, 4.3, 829), ("GPT-B", 64): (3.533, 18.1, 2583),
    ("GPT-L", 1): (6.383, 0.16, 793), ("GPT-L", 16): (5.041, 3.2, 1805), ("GPT-L", 64): (5.748, 11.1, 5053),
}
# The official LlamaGen with its --compile path (torch.compile reduce-overhead): (s / call, img/s, first call s).
OFFICIAL_COMPILED = {("GPT-B", 1): (0.299, 3.3, 36.5), ("GPT-B", 64): (0.322, 198.6, 23.7),
                     ("GPT-L", 1): (0.341, 2.9, 49.6), ("GPT-L", 64): (0.706, 90.7, 52.6)}
OFFICIAL_SAMPLING = {NEXT_SCALE: dict(guidance_scale=1.5, top_k=900, top_p=0.96),
                     NEXT_TOKEN: dict(guidance_scale=2.0, top_k=0, top_p=1.0)}
PLAIN = {NEXT_SCALE: "nextscale", NEXT_TOKEN: "nexttoken"}


@dataclass
class BenchModel:
    """A transformer (and its tokenizer: next-scale rows decode to pixels, next-token samplers may read its
    codebook) with the sampling settings it is timed with."""

    name: str
    family: str
    transformer: torch.nn.Module
    tokenizer: torch.nn.Module | None
    sampling: dict


@dataclass
class Row:
    model: str
    sampler: str
    kv_cache: str
    batch: int
    seconds: float
    first_call: float
    peak_mib: float
    forwards_per_image: float = float("nan")
    tokens_per_forward: float = float("nan")
    kv_mib: float = float("nan")

    @property
    def images_per_second(self) -> float:
        return self.batch / self.seconds


def time_call(fn, repeats: int, device: torch.device):
    """(best seconds, first-call seconds, peak MiB, the last call's result) of `fn()`."""

    def timed():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, result = timed()
    best = float("inf")
    for _ in range(repeats):
        seconds, result = timed()
        best = min(best, seconds)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return best, first, peak, result


def sample_once(model: BenchModel, sampler, kv_cache, batch: int, device: torch.device):
    """One sampling call of `batch` images (labels 0, 1, ... mod the classes, seed 0) -> the sampler's stats."""
    labels = torch.arange(batch, device=device) % model.transformer.config.num_classes
    generator = torch.Generator(device).manual_seed(0)
    with torch.inference_mode():
        if model.family == NEXT_SCALE:
            out = sampler(model.transformer, model.tokenizer, labels, **model.sampling, generator=generator,
                          kv_cache=kv_cache, progress=False)
            model.tokenizer.decode_latent(out.latent)
        else:
            out = sampler(model.transformer, labels, **model.sampling, generator=generator, progress=False,
                          tokenizer=model.tokenizer)
    return out.stats


def of_family(sampler_specs: list[str], family: str) -> list[str]:
    """The sampler specs whose sampler is for `family` models."""
    return [spec for spec in sampler_specs if registry.find(spec.partition(":")[0], SAMPLER).family == family]


def policies_of(model: BenchModel, kv_cache_specs: list[str]) -> list[str]:
    """The KV-cache policies a model runs: the given ones for a next-scale model, "-" (its static cache) otherwise."""
    return kv_cache_specs if model.family == NEXT_SCALE else ["-"]


def bench_model(model: BenchModel, samplers: list[str], kv_caches: list[str], batches: list[int], repeats: int,
                device: torch.device) -> list[Row]:
    """Rows of every sampler (of the model's family) x KV-cache policy (next-scale) x batch size."""
    rows = []
    for sampler_spec in of_family(samplers, model.family):
        sampler = registry.from_spec(sampler_spec, SAMPLER, model.family)
        for policy_spec in policies_of(model, kv_caches):
            policy = None if policy_spec == "-" else registry.from_spec(policy_spec, KV_CACHE, model.family)
            for batch in batches:
                seconds, first, peak, stats = time_call(
                    lambda: sample_once(model, sampler, policy, batch, device), repeats, device)
                rows.append(Row(model.name, sampler_spec, policy_spec, batch, seconds, first, peak,
                                forwards_per_image=float(stats.row_forwards.double().mean()),
                                tokens_per_forward=float(stats.tokens_per_forward.mean()),
                                kv_mib=stats.kv_bytes / 2**20))
                print(format_row(rows[-1]), flush=True)
    return rows


def largest_batch(fits, start: int, cap: int, resolution: float = 0.125) -> int:
    """The largest batch in [1, cap] that `fits(batch)` (a batch that does not fit runs out of memory), found by
    doubling from `start`, then bisecting until the bracket is narrower than `resolution` of its lower end; 0 when
    not even a batch of 1 fits. `fits` is monotone: a batch that fits means every smaller one fits."""
    low, high = 0, None  # the largest batch known to fit, the smallest known not to
    batch = max(1, min(start, cap))
    while high is None:
        if fits(batch):
            low = batch
            if batch == cap:
                return cap
            batch = min(batch * 2, cap)
        else:
            high = batch
            batch = batch // 2 if low == 0 else (low + high) // 2
            if batch == 0 or batch <= low:
                return low
    while high - low > max(1, resolution * low):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def out_of_memory(error: BaseException) -> bool:
    """Whether a sampling call failed for lack of device memory (CUDA or CPU allocator)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(error)


@dataclass
class MaxBatchRow:
    model: str
    sampler: str
    kv_cache: str
    batch: int
    seconds: float
    kv_gib: float
    peak_gib: float

    @property
    def images_per_second(self) -> float:
        return self.batch / self.seconds if self.batch else 0.0


def max_batch(model: BenchModel, sampler_spec: str, policy_spec: str, start: int, cap: int, device: torch.device
              ) -> MaxBatchRow:
    """The largest batch that samples without running out of memory on `device` (each try after emptying the
    allocator), its KV cache and peak memory, and the time of a call at that batch."""
    sampler = registry.from_spec(sampler_spec, SAMPLER, model.family)
    policy = None if policy_spec == "-" else registry.from_spec(policy_spec, KV_CACHE, model.family)
    measured = {}

    def fits(batch: int) -> bool:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            start_time = time.perf_counter()
            stats = sample_once(model, sampler, policy, batch, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not out_of_memory(err):
                raise
            return False
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        measured[batch] = (time.perf_counter() - start_time, stats.kv_bytes / 2**30, peak)
        return True

    batch = largest_batch(fits, start, cap)
    seconds, kv_gib, peak_gib = measured.get(batch, (float("nan"),) * 3)
    return MaxBatchRow(model.name, sampler_spec, policy_spec, batch, seconds, kv_gib, peak_gib)


def format_max_batch(row: MaxBatchRow) -> str:
    return (f"| {row.model} | {row.sampler} | {row.kv_cache} | {row.batch} | {row.kv_gib:.2f} | {row.peak_gib:.2f} | "
            f"{row.images_per_second:.1f} |")


MAX_BATCH_HEADER = ("| model | sampler | KV cache | largest batch | KV GiB | peak GiB | img/s at that batch |\n"
                    "|---|---|---|---|---|---|---|")


def format_row(row: Row) -> str:
    plain = row.sampler.partition(":")[0] in PLAIN.values() and row.kv_cache in ("-", "full")
    official = OFFICIAL.get((row.model, row.batch)) if plain else None
    compiled = OFFICIAL_COMPILED.get((row.model, row.batch)) if plain else None
    ratio = f"{row.images_per_second / official[1]:.2f}x" if official else "-"
    ratio_compiled = f"{row.images_per_second / compiled[1]:.2f}x" if compiled else "-"
    seconds, images_per_second, peak_mib = official or ("-", "-", "-")
    return (f"| {row.model} | {row.sampler} | {row.kv_cache} | {row.batch} | {row.seconds:.3f} | "
            f"{row.images_per_second:.1f} | {row.seconds / row.batch:.4f} | {row.forwards_per_image:.1f} | "
            f"{row.tokens_per_forward:.2f} | {row.kv_mib:.2f} | {row.peak_mib:.0f} | {row.first_call:.2f} | {seconds} | "
            f"{images_per_second} | {peak_mib} | {ratio} | {ratio_compiled} |")


HEADER = ("| model | sampler | KV cache | batch | s / call | img/s | s / image | forwards / image | tokens / forward | "
          "KV MiB | peak MiB | first call s | official s | official img/s | official peak MiB | "
          "vs official eager | vs official compiled |\n|" + "---|" * 17)


def tiny_models() -> dict:
    """{name: (family, build)} of tiny random models, for a smoke run of the code path."""
    def var():  # the official 256 px schedule on 32 px images: KV-cache policies work at their default budgets
        tokenizer = MultiScaleVQVAE(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=64,
                                    norm_groups=8)
        return VARTransformer(depth=2, width=64, num_heads=2, vocab_size=64, latent_channels=8), tokenizer

    def gpt():
        tokenizer = MultiScaleVQVAE(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=64,
                                    patch_nums=(4,), norm_groups=8)
        return GPTTransformer(dim=64, n_layer=2, n_head=2, vocab_size=64, grid_size=4), tokenizer

    return {"VAR-tiny": (NEXT_SCALE, var), "GPT-tiny": (NEXT_TOKEN, gpt)}


def full_models() -> dict:
    """{name: (family, build)} of the models the official numbers describe, with random weights (GPTs without a
    tokenizer: their rows time token generation only)."""
    models = {f"VAR-d{d}": (NEXT_SCALE, lambda d=d: (VARTransformer(depth=d), MultiScaleVQVAE())) for d in (16, 30)}
    models["VAR-d36"] = (NEXT_SCALE, lambda: (VARTransformer(depth=36, shared_aln=True, patch_nums=PATCH_NUMS_512),
                                              MultiScaleVQVAE(patch_nums=PATCH_NUMS_512)))  # 512 px
    models.update({name: (NEXT_TOKEN, lambda name=name: (GPTTransformer(**GPT_CONFIGS[name]), None))
                   for name in ("GPT-B", "GPT-L")})
    return models


def build_random(name: str, family: str, builder, dtype: torch.dtype, device: torch.device) -> BenchModel:
    """A random-weight model (transformer in `dtype`, tokenizer in float32) on `device`, in eval mode."""
    with torch.device(device):  # initialising VAR-d30's 2B parameters on a CPU would take minutes
        transformer, tokenizer = builder()  # VAR: the official init already ran in __init__
    if family == NEXT_TOKEN:
        transformer.init_weights(randomize_output=True)
    tokenizer = tokenizer.to(device).eval() if tokenizer is not None else None
    return BenchModel(name, family, transformer.to(device, dtype).eval(), tokenizer, OFFICIAL_SAMPLING[family])


def load_model(name: str, dtype: torch.dtype, device: torch.device) -> BenchModel:
    """A pipeline `vartk.load` opens, timed with its own sampling settings."""
    from .loading import load

    pipe = load(name, device=device, torch_dtype=dtype)
    return BenchModel(name, pipe.sampling_family, pipe.transformer.eval(), pipe.tokenizer.eval(),
                      pipe.sampling_options())


def build_parser() -> argparse.ArgumentParser:
    from .arguments import DEFAULT_DEVICE, int_in_range, parse_device

    parser = argparse.ArgumentParser(prog="vartk bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None,
                        help="a model vartk.load opens (built-in name, folder, official name), repeatable "
                             "(default: the full-size random models)")
    parser.add_argument("--sampler", action="append", default=None,
                        help=f"repeatable; each model runs those of its family (default: the plain sampler; on "
                             f"CUDA also its eager twin). {spec_help(SAMPLER)}")
    parser.add_argument("--kv-cache", action="append", default=None,
                        help=f"repeatable, next-scale models (default: full). {spec_help(KV_CACHE)}")
    parser.add_argument("--device", type=parse_device, default=DEFAULT_DEVICE, help=f"(default: {DEFAULT_DEVICE})")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="the transformer's dtype (default: bfloat16 on CUDA, float32 on a CPU)")
    parser.add_argument("--batches", type=int_in_range(1), nargs="+", default=[1, 16, 64], help="(default: 1 16 64)")
    parser.add_argument("--repeats", type=int_in_range(1), default=3, help="timed calls per row (default: 3)")
    parser.add_argument("--only", nargs="+", default=None, help="random model names to run, e.g. VAR-d16 GPT-B")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a smoke run of the code path")
    parser.add_argument("--force", action="store_true", help="run the full-size models on a CPU anyway (hours)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--max-batch", action="store_true",
                        help="instead of timing --batches, find the largest batch that runs on the device for each "
                             "model, sampler and KV-cache policy (doubling from the first --batches value, then "
                             "bisection; the allocator is emptied before each try), with its KV GiB, peak GiB, img/s")
    parser.add_argument("--max-batch-cap", type=int_in_range(1), default=4096,
                        help="the largest batch --max-batch tries (default: 4096)")
    return parser


def default_samplers(device: torch.device) -> list[str]:
    """The plain samplers; on CUDA the next-token one both eager and replaying its CUDA graph."""
    eager = ["nexttoken:cuda_graph=false"] if device.type == "cuda" else []
    return [PLAIN[NEXT_SCALE], *eager, PLAIN[NEXT_TOKEN]]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    samplers, kv_caches = args.sampler or default_samplers(device), args.kv_cache or ["full"]
    for spec, kind in [(s, SAMPLER) for s in samplers] + [(s, KV_CACHE) for s in kv_caches]:
        try:
            registry.from_spec(spec, kind)
        except (ValueError, TypeError) as err:
            parser.error(f"--{kind} {spec!r}: {err}")
    random = {} if args.model else (tiny_models() if args.tiny else full_models())
    unknown = sorted(set(args.only or []) - set(random))
    if unknown:
        parser.error(f"--only {unknown} unknown; the {'tiny' if args.tiny else 'full'} models are {sorted(random)}")
    if device.type == "cpu" and random and not (args.tiny or args.force):
        parser.error("the full-size models take hours per row on a CPU; run on a GPU, pass --model for a "
                     "loaded model, or --tiny for a smoke run (--force to time them on the CPU anyway)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, dtype {str(dtype).removeprefix('torch.')}; peak MiB: weights "
          "included, one model on the device at a time")
    print(MAX_BATCH_HEADER if args.max_batch else HEADER)
    builders = [lambda name=name: load_model(name, dtype, device) for name in args.model or []]
    builders += [lambda name=name, spec=spec: build_random(name, *spec, dtype, device)
                 for name, spec in random.items() if not args.only or name in args.only]
    rows = []
    for build in builders:
        model = build()
        if args.max_batch:
            for sampler in of_family(samplers, model.family):
                for policy in policies_of(model, kv_caches):
                    rows.append(max_batch(model, sampler, policy, args.batches[0], args.max_batch_cap, device))
                    print(format_max_batch(rows[-1]), flush=True)
        else:
            rows += bench_model(model, samplers, kv_caches, args.batches, args.repeats, device)
        del model  # the next model's peak memory counts its own weights only
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        from .files import write_text_atomic

        write_text_atomic(args.json, json.dumps([asdict(row) for row in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
