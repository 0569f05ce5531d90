"""Sample with the standard protocol and score FID / IS / KID / precision-recall (`vartk fid`, eval/fid.py); resumable.

    python eval/fid.py --model var-d16 --reference VIRTUAL_imagenet256_labeled.npz --out runs/var-d16
    torchrun --nproc_per_node=8 eval/fid.py --model llamagen-xl --reference ref.npz --out runs/llamagen-xl
    python eval/fid.py --model var-d16 --sampler nextscalesampler:more_smooth=true --reference ... --out runs/var-d16-smooth
    python eval/fid.py --compare runs/var-d16 runs/var-d16-smooth --out runs/smooth-vs-plain.json

Protocol (defaults; every flag overrides; a pipeline saved with `sampling_defaults`, like vartk's own
models, is scored with those instead):
- VAR: cfg 1.5, top-k 900, top-p 0.96 (the VAR README's FID settings).
- LlamaGen: top-k 0, top-p 1, and the cfg of each released checkpoint's FID in the LlamaGen README:
  B 2.0 (2.25 at 384 px), L 1.75 (2.0 at 384 px), XL / XXL 1.75, 3B 1.65 (LLAMAGEN_CFG);
  384-px models are resized to 256 (bicubic) before writing, as the official FID script does.
- 50 images per class. Labels: VAR class-balanced (image i has class i % num_classes), LlamaGen drawn
  uniformly per batch, as each family's FID script does (`--labels balanced | random` overrides);
  `--labels reference` gives the classes in the proportions of the reference folder's class subfolders (for
  in-domain FID against an unbalanced held-out set, where a balanced sample set would be judged on its class
  mix more than on its images).
- Batch b draws from its own seed, SeedSequence([seed, b]), so the images do not depend on the number
  of GPUs or on restarts. Images are written as PNG, uint8 = round(255 x) (ADM's truncation not used).

Layout of --out: samples/batch_000123/00006150.png (file name = global image index) plus meta.json
(labels, seed, rank); a batch is written into a hidden temporary folder and renamed into place when
complete, so a killed run leaves only whole batches, and a rerun of the same command redoes only the
missing ones. settings.json pins the sampling settings and a fingerprint of the weights (a rerun with other
settings or another model's weights is refused) and
results.json holds metrics, settings, software versions and wall times.

Under torchrun each rank samples the batches b with b % world_size == rank; rank 0 scores after a
barrier (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from vartk.arguments import int_in_range
from vartk.emoji_extractor import EMOJI_CLASSIFIER, register_emoji_extractor
from vartk.files import check_writable, write_text_atomic
from vartk.images import images_to_uint8
from vartk.metrics import INCEPTION, check_scoring, compute_metrics, list_images, npz_keys, paired_psnr
from vartk.samplers import KV_CACHE, SAMPLER, spec_help

VAR_PROTOCOL = {"guidance_scale": 1.5, "top_k": 900, "top_p": 0.96}
# (preset, grid size) -> the cfg of the LlamaGen README's FID for that released checkpoint (the paper's appendix
# tables); GETTING_STARTED uses 2.0 for B and L alike. Other grids take the preset's 384-px value.
LLAMAGEN_CFG = {
    ("GPT-B", 16): 2.0, ("GPT-B", 24): 2.25, ("GPT-L", 16): 1.75, ("GPT-L", 24): 2.0,
    ("GPT-XL", 24): 1.75, ("GPT-XXL", 24): 1.75, ("GPT-3B", 24): 1.65,
}
LLAMAGEN_EVAL_SIZE = 256  # the official script resizes 384-px samples to this before scoring
IMAGES_PER_CLASS = 50
LABEL_MODES = ("balanced", "random", "reference")
PROTOCOL_LABELS = {"var": "balanced", "llamagen": "random"}  # what each family's official FID script draws
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STOP_AFTER_ENV = "VARTK_FID_STOP_AFTER"  # test hook: die inside the batch after this many finished batches


# ----------------------------------------------------------------------------------------------------
# Protocol


def _llamagen_preset(pipe, model: str) -> str | None:
    """'GPT-B' ... 'GPT-3B' from an official model name or the transformer config, else None."""
    from vartk.hub import KNOWN_MODELS
    from vartk.models.gpt import GPT_CONFIGS

    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model].options["model"]
    config = pipe.transformer.config
    for name, preset in GPT_CONFIGS.items():
        if all(config.get(key) == value for key, value in preset.items()):
            return name
    return None


def published_settings(pipe, model: str) -> dict:
    """The published FID sampling settings of the pipeline's family and size: guidance_scale, top_k, top_p."""
    if pipe.family == "var":
        return dict(VAR_PROTOCOL)
    preset = _llamagen_preset(pipe, model)
    grid = pipe.transformer.config.grid_size
    cfg = LLAMAGEN_CFG.get((preset, grid), LLAMAGEN_CFG.get((preset, 24), LLAMAGEN_CFG[("GPT-B", 16)]))
    return {"guidance_scale": cfg, "top_k": 0, "top_p": 1.0}


def protocol_settings(pipe, model: str) -> dict:
    """The sampling settings scored when no flag is given: the ones saved with the pipeline
    (`sampling_defaults`, e.g. vartk's own models), else the published ones."""
    saved = getattr(pipe.config, "sampling_defaults", None) or {}
    return {**published_settings(pipe, model), **saved}


def weights_fingerprint(pipe) -> str:
    """sha256 (16 hex digits) of the names and bytes of the tokenizer's and transformer's weights, pinned in
    settings.json: a resumed run must sample the model the first batches came from."""
    digest = hashlib.sha256()
    for component in (pipe.tokenizer, pipe.transformer):
        for name, tensor in component.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def native_image_size(pipe) -> int:
    if pipe.family == "var":
        return pipe.tokenizer.latent_size * pipe.tokenizer.downsample_factor
    return pipe.transformer.config.grid_size * pipe.tokenizer.downsample_factor


def resolve_eval_size(pipe, image_size_eval: int | str | None) -> int | None:
    """'auto': 256 for LlamaGen models sampled above 256 px (official protocol), else native (None)."""
    if image_size_eval != "auto":
        return None if image_size_eval is None else int(image_size_eval)
    native = native_image_size(pipe)
    return LLAMAGEN_EVAL_SIZE if pipe.family == "llamagen" and native > LLAMAGEN_EVAL_SIZE else None


@dataclass(frozen=True)
class SamplingPlan:
    """Which images exist, in which batch, with which label and seed."""

    num_images: int
    batch_size: int
    num_classes: int
    seed: int = 0
    labels: str = "balanced"
    class_counts: tuple[int, ...] | None = None  # labels="reference": images per class in the reference

    def __post_init__(self):
        if self.num_images < 1 or self.batch_size < 1:
            raise ValueError(f"num_images and batch_size must be >= 1, got {self.num_images}, {self.batch_size}")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels {self.labels!r} is unknown; use one of {LABEL_MODES}")
        if (self.labels == "reference") != (self.class_counts is not None):
            raise ValueError("class_counts go with labels='reference', and only with it")
        if self.class_counts is not None and (len(self.class_counts) != self.num_classes or sum(self.class_counts) < 1):
            raise ValueError(f"class_counts {self.class_counts} must give {self.num_classes} counts, not all 0")

    @functools.cached_property
    def reference_labels(self) -> np.ndarray:
        """labels="reference": every image's label; class c gets its share of num_images (largest remainders),
        in an order shuffled by the seed. [num_images]"""
        counts = np.asarray(self.class_counts, dtype=np.float64)
        quota = counts / counts.sum() * self.num_images  # [C]
        per_class = np.floor(quota).astype(np.int64)
        leftover = np.argsort(-(quota - per_class), kind="stable")[: self.num_images - per_class.sum()]
        per_class[leftover] += 1
        labels = np.repeat(np.arange(self.num_classes), per_class)
        return np.random.default_rng([self.seed, 2]).permutation(labels)

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.batch_size)

    def indices(self, batch: int) -> range:
        return range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.num_images))

    def seed_of(self, batch: int) -> int:
        return int(np.random.SeedSequence([self.seed, batch]).generate_state(1)[0])

    def labels_of(self, batch: int) -> list[int]:
        if self.labels == "balanced":
            return [i % self.num_classes for i in self.indices(batch)]
        if self.labels == "reference":
            span = self.indices(batch)
            return self.reference_labels[span.start : span.stop].tolist()
        rng = np.random.default_rng([self.seed, batch, 1])
        return rng.integers(0, self.num_classes, len(self.indices(batch))).tolist()


def reference_class_counts(reference, class_names: list[str] | None, num_classes: int) -> tuple[int, ...]:
    """Images per class in a reference folder of class subfolders, in the model's class order: subfolders named
    after the pipeline's class names, else `num_classes` subfolders in sorted order (ImageFolder)."""
    folder = Path(reference) if reference is not None else None
    if folder is None or not folder.is_dir():
        raise ValueError("--labels reference needs --reference DIR, a folder of class subfolders"
                         + (f"; {reference} is not a folder" if reference is not None else ""))
    counts = {d.name: len(list_images(d)) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    names = class_names or sorted(counts)
    if sorted(counts) != sorted(names) or len(names) != num_classes:
        raise ValueError(f"--labels reference: {folder} has class folders {sorted(counts)}; the model's "
                         f"{num_classes} classes are {class_names or 'unnamed (give one folder per class)'}")
    return tuple(counts[name] for name in names)


# ----------------------------------------------------------------------------------------------------
# Shards on disk


def batch_folder(samples: Path, batch: int) -> Path:
    return samples / f"batch_{batch:06d}"


def is_complete(samples: Path, batch: int) -> bool:
    return (batch_folder(samples, batch) / "meta.json").is_file()


def remove_unfinished(samples: Path) -> None:
    """Delete temporary batch folders that a killed run left behind."""
    for leftover in samples.glob(".batch_*"):
        shutil.rmtree(leftover)


def _stop_after() -> int | None:
    value = os.environ.get(STOP_AFTER_ENV)
    return int(value) if value else None


def write_batch(samples: Path, batch: int, images: np.ndarray, meta: dict, batches_done: int) -> None:
    """Write uint8 [B, H, W, 3] images into a temporary folder, then rename it into place."""
    tmp = samples / f".batch_{batch:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def save(index: int, image: np.ndarray) -> None:
        Image.fromarray(image).save(tmp / f"{index:08d}.png", compress_level=1)  # lossless; fast to write

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # zlib releases the GIL
        list(pool.map(save, meta["indices"], images))
    if _stop_after() == batches_done:
        raise RuntimeError(f"{STOP_AFTER_ENV}={batches_done}: stopping inside batch {batch} (test hook)")
    (tmp / "meta.json").write_text(json.dumps(meta))
    os.rename(tmp, batch_folder(samples, batch))


def sample_batches(pipe, plan: SamplingPlan, samples: Path, batches: list[int], options: dict, eval_size, rank=0,
                   progress=True):
    """Sample and write `batches`; a tqdm bar on rank 0 when `progress`."""
    device = pipe.device
    total = sum(len(plan.indices(b)) for b in batches)
    with tqdm(total=total, unit="img", disable=rank != 0 or not progress, desc="sampling") as bar:
        for done, batch in enumerate(batches):
            labels = plan.labels_of(batch)
            generator = torch.Generator(device).manual_seed(plan.seed_of(batch))
            out = pipe(class_labels=labels, generator=generator, output_type="pt", output_size=eval_size,
                       progress=False, **options)  # [B, 3, S, S]: resized before the clamp, as LlamaGen's script
            meta = {
                "batch": batch, "seed": plan.seed_of(batch), "indices": list(plan.indices(batch)), "labels": labels,
                "rank": rank,
            }
            write_batch(samples, batch, images_to_uint8(out.images), meta, done)
            bar.update(len(labels))


def collect_samples(samples: Path, plan: SamplingPlan) -> list[Path]:
    """The plan's image files, checking that every batch is complete and no image is missing or extra."""
    missing = [b for b in range(plan.num_batches) if not is_complete(samples, b)]
    if missing:
        raise ValueError(f"{len(missing)} batches are not written yet (first: {missing[:5]}); rerun the command")
    files = [f for b in range(plan.num_batches) for f in list_images(batch_folder(samples, b))]
    expected = {f"{i:08d}.png" for i in range(plan.num_images)}
    if sorted(f.name for f in files) != sorted(expected):
        raise ValueError(f"{samples} holds {len(files)} images, not the {plan.num_images} planned; use a new --out")
    return files


# ----------------------------------------------------------------------------------------------------
# Runs


def _atomic_write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def read_settings(path: Path) -> dict:
    """A run's settings.json; one that is not a JSON object raises one ValueError naming it."""
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is not the JSON object of sampling settings this command writes; restore it (a "
                         "scored run's results.json holds a copy under 'settings') or use a new --out")
    return settings


def pin_settings(out: Path, settings: dict, write: bool) -> None:
    """Refuse to resume a run sampled with other settings; record them on the first run."""
    path = out / "settings.json"
    if path.is_file():
        saved = read_settings(path)
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
        if changed:
            raise ValueError(
                f"{out} was sampled with other settings ({', '.join(changed)}); "
                "use a new --out or the original settings"
            )
    elif write:
        _atomic_write_json(path, settings)


def software_versions() -> dict:
    import scipy
    import torch_fidelity

    import vartk

    versions = {
        "vartk": vartk.__version__, "torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__,
        "numpy": np.__version__, "scipy": scipy.__version__, "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


def check_sampling(pipe, options: dict) -> None:
    """What the pipeline checks when called, checked before --out is written: a bad option would otherwise fail the
    first batch after settings.json pinned it, and the corrected rerun would be refused."""
    pipe.sampling_options(options["guidance_scale"], options["top_k"], options["top_p"])
    pipe.check_sampler(options["sampler"], options["kv_cache"])


def check_out(out: Path, reference) -> None:
    """Refuse an --out that cannot hold the run (a file, a folder we may not write to), or that is, or lies inside or
    around, a reference folder: the samples would be read as reference images."""
    check_writable(out.absolute(), f"--out {out}")
    if reference is None or not Path(reference).is_dir():
        return
    run, folder = out.resolve(), Path(reference).resolve()
    if run.is_relative_to(folder) or folder.is_relative_to(run):
        raise ValueError(f"--out {out} and --reference {reference} lie inside one another, so samples would mix with "
                         "the reference images; give an --out outside the reference folder")


def check_json_path(path: Path) -> None:
    """Refuse, before sampling, a results file that could not be written after scoring."""
    if path.is_dir():
        raise ValueError(f"results file {path} is a folder; give a file name such as {path / 'results.json'}")
    check_writable(path.absolute().parent, f"results file {path}")


def _init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts a process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # a resumed run can leave one rank with far fewer batches than another: wait long at the barrier
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=24))
    return (dist.get_rank() if world_size > 1 else 0), world_size, device


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _default_metrics(reference) -> tuple[str, ...]:
    """fid, is, prc against a reference with images; fid, is against statistics only; is without one."""
    if reference is None:
        return ("is",)
    path = Path(reference)
    if path.suffix == ".npz" and path.is_file() and not {"arr_0", "features"} & npz_keys(path):
        return ("fid", "is")
    return ("fid", "is", "prc")


def summary_line(name: str, metrics: dict, times: dict, where: Path) -> str:
    labels = {"fid": "FID", "is": "IS", "kid": "KID", "precision": "P", "recall": "R", "psnr_mean": "PSNR"}
    scores = " ".join(f"{label} {metrics[key]:.4g}" for key, label in labels.items() if metrics.get(key) is not None)
    timing = " ".join(f"{key} {value:.0f}s" for key, value in times.items())
    return f"{name}: {scores} | {metrics.get('num_generated', metrics.get('num_pairs'))} images | {timing} | {where}"


def print_summary(name: str, results: dict, where) -> None:
    """The results' warnings, a line each, then their summary line."""
    for warning in results["warnings"]:
        print(f"warning: {warning}")
    print(summary_line(name, results["metrics"], results["time_s"], where))


def evaluate(
    model="default",
    out: str | os.PathLike = "fid_run",
    reference=None,
    *,
    num_images: int | None = None,
    labels: str | None = None,
    batch_size: int = 50,
    seed: int = 0,
    guidance_scale: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    sampler=None,
    kv_cache=None,
    dtype: str = "float32",
    image_size_eval: int | str | None = "auto",
    metrics=None,
    feature_extractor: str = INCEPTION,
    feature_extractor_weights=None,
    feature_layer: str | None = None,
    score_batch_size: int = 64,
    cache_reference: bool = True,
    sample_only: bool = False,
    json_path=None,
    progress: bool = True,
) -> dict | None:
    """Sample `model` (a name, folder or pipeline) into `out`/samples, resuming, and score it on rank 0.

    Returns the results dict on rank 0 (also written to `json_path`, default `out`/results.json) and
    None on other ranks. sampler / kv_cache: objects or 'name:key=value' specs from vartk.samplers.
    guidance_scale, top_k, top_p, labels: None = the protocol's values (see the module docstring).
    Everything that can be checked is checked before anything is sampled or written: the settings, the image
    counts of both sets against the metrics, the reference, the extractor, --out and the results file."""
    import vartk

    rank, world_size, device = _init_distributed()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; use one of {list(DTYPES)}")
    model_name = model if isinstance(model, str) else type(model).__name__
    pipe = vartk.load(model, device=device, torch_dtype=DTYPES[dtype]) if isinstance(model, str) else model.to(device)
    labels = labels or PROTOCOL_LABELS[pipe.family]
    class_counts = (reference_class_counts(reference, pipe.class_names, pipe.num_classes)
                    if labels == "reference" else None)
    plan = SamplingPlan(IMAGES_PER_CLASS * pipe.num_classes if num_images is None else num_images, batch_size,
                        pipe.num_classes, seed, labels, class_counts)
    metrics = metrics or _default_metrics(reference)
    if not sample_only:  # everything scoring needs, before the first sample
        check_scoring(reference, metrics, feature_extractor, feature_extractor_weights, feature_layer, str(device),
                      score_batch_size, verbose=progress, num_generated=plan.num_images)
        if json_path:
            check_json_path(Path(json_path))
    given = {"guidance_scale": guidance_scale, "top_k": top_k, "top_p": top_p}
    options = {**protocol_settings(pipe, model_name), **{k: v for k, v in given.items() if v is not None}}
    eval_size = resolve_eval_size(pipe, image_size_eval)
    settings = {  # what a resumed run must share with the first; the model's name is recorded, its weights pinned
        "weights": weights_fingerprint(pipe), "generator": device.type, "family": pipe.family,
        "num_classes": plan.num_classes, "num_images": plan.num_images,
        "batch_size": batch_size, "seed": seed, "labels": labels,
        "class_counts": list(class_counts) if class_counts else None, **options,
        "sampler": sampler if isinstance(sampler, str) or sampler is None else repr(sampler),
        "kv_cache": kv_cache if isinstance(kv_cache, str) or kv_cache is None else repr(kv_cache),
        "dtype": dtype, "image_size_eval": eval_size, "png": "uint8 = round(255 x)",
    }
    options.update(sampler=sampler, kv_cache=kv_cache)
    check_sampling(pipe, options)
    options.update(sampler=pipe.resolve(sampler, SAMPLER), kv_cache=pipe.policy_for_call(kv_cache))  # one object,
    # kept for every batch (a CUDA graph is captured once)
    out = Path(out)
    check_out(out, reference)
    pin_settings(out, settings, write=rank == 0)  # refuses other settings before anything is written
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        remove_unfinished(samples)
    resumed = sum(is_complete(samples, b) for b in range(plan.num_batches))
    if rank == 0 and resumed:
        print(f"resuming: {resumed} of {plan.num_batches} batches done")
    _barrier(world_size)

    start = time.perf_counter()
    todo = [b for b in range(rank, plan.num_batches, world_size) if not is_complete(samples, b)]
    sample_batches(pipe, plan, samples, todo, options, eval_size, rank, progress)
    _barrier(world_size)
    times = {"sampling": time.perf_counter() - start}
    if world_size > 1:
        dist.destroy_process_group()
    if rank != 0:
        return None

    files = collect_samples(samples, plan)
    results = {"model": model_name, "settings": settings, "resumed_batches": resumed}
    if sample_only:
        print(f"{model_name}: {len(files)} images in {samples} | sampling {times['sampling']:.0f}s")
        return {**results, "metrics": {}, "time_s": times}
    start = time.perf_counter()
    scores = compute_metrics(
        files, reference, metrics, feature_extractor=feature_extractor,
        feature_extractor_weights=feature_extractor_weights, feature_layer=feature_layer, device=str(device),
        batch_size=score_batch_size, cache=cache_reference, verbose=progress,
    )
    times["scoring"] = time.perf_counter() - start
    results.update(
        metrics=scores, warnings=scores.pop("warnings"), time_s=times, versions=software_versions(),
        world_size=world_size,
        scoring={
            "reference": str(reference) if reference is not None else None, "feature_extractor": feature_extractor,
            "feature_extractor_weights": str(feature_extractor_weights) if feature_extractor_weights else None,
            "feature_layer": feature_layer,
        },
    )
    json_path = Path(json_path) if json_path else out / "results.json"
    _atomic_write_json(json_path, results)
    print_summary(model_name, results, json_path)
    return results


PAIRING_SETTINGS = ("seed", "batch_size", "labels", "class_counts", "num_images", "num_classes")


def run_settings(folder: Path) -> dict | None:
    """The settings.json of a run folder given as itself or as its samples/ folder, or None."""
    for run in (folder, folder.parent if folder.name == "samples" else None):
        if run is not None and (run / "settings.json").is_file():
            return read_settings(run / "settings.json")
    return None


def check_pairable(a: Path, b: Path) -> None:
    """Refuse to pair two runs whose image i was drawn from different seeds or labels."""
    settings = [run_settings(a), run_settings(b)]
    if None in settings:
        return
    differ = [f"{k} {settings[0].get(k)!r} vs {settings[1].get(k)!r}" for k in PAIRING_SETTINGS
              if settings[0].get(k) != settings[1].get(k)]
    if differ:
        raise ValueError(f"{a} and {b} drew image i from different seeds or labels ({'; '.join(differ)}); sample "
                         "both with the same --seed, --batch-size, --labels and --num-images to compare them")


def compare(
    a, b, *, json_path=None, metrics=("fid", "kid"), feature_extractor: str = INCEPTION,
    feature_extractor_weights=None, feature_layer: str | None = None, device: str | None = None,
    score_batch_size: int = 64,
) -> dict:
    """FID / KID between two generated sets and per-image PSNR between images of the same file name. Two run
    folders of this script (their samples/ are compared) must share what makes image i's seed and label: the
    same seed, batch size, label mode and image count; two plain folders are paired by file name as they are."""
    check_pairable(Path(a), Path(b))
    if json_path is not None:
        check_json_path(Path(json_path))
    a, b = (Path(p) / "samples" if (Path(p) / "samples").is_dir() else Path(p) for p in (a, b))
    start = time.perf_counter()
    scores = compute_metrics(
        a, b, metrics, feature_extractor=feature_extractor, feature_extractor_weights=feature_extractor_weights,
        feature_layer=feature_layer, device=device, batch_size=score_batch_size, cache=False,
    )
    warnings = scores.pop("warnings")
    scores.update(paired_psnr(a, b))
    results = {
        "compare": [str(a), str(b)], "metrics": scores, "warnings": warnings,
        "time_s": {"scoring": time.perf_counter() - start}, "versions": software_versions(),
    }
    if json_path is not None:
        _atomic_write_json(Path(json_path), results)
    print_summary(f"{a} vs {b}", results, json_path or "-")
    return results


def eval_size(text: str) -> int | str | None:
    """--image-size-eval: auto (the protocol's), native (no resize) or a size in pixels."""
    if text in ("auto", "native"):
        return None if text == "native" else text
    try:
        return int_in_range(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, native or a size in pixels >= 1, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vartk fid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="built-in, official (var-d16, llamagen-xl) or folder")
    parser.add_argument("--out", help="run folder (samples/, settings.json, results.json); a .json file with --compare")
    parser.add_argument("--reference", help="image folder, ADM .npz (arr_0 and/or mu, sigma) or our statistics .npz")
    parser.add_argument("--num-images", type=int_in_range(1), default=None, help="default: 50 per class")
    parser.add_argument("--labels", choices=LABEL_MODES, default=None,
                        help="balanced (i %% classes), random (per batch), or reference (the class mix of the "
                             "--reference folder); default: the family's protocol, VAR balanced, LlamaGen random")
    parser.add_argument("--batch-size", type=int_in_range(1), default=50, help="images per batch (= per shard folder)")
    parser.add_argument("--seed", type=int_in_range(0), default=0,
                        help="base seed; batch b uses SeedSequence([seed, b])")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the protocol's)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--sampler", default=None, help=spec_help(SAMPLER))
    parser.add_argument("--kv-cache", default=None, help=spec_help(KV_CACHE))
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--image-size-eval", type=eval_size, default="auto",
                        help="resize samples to this size; auto = the protocol's, native = no resize")
    parser.add_argument("--metrics", default=None, help="fid,is,kid,prc (default: what the reference allows)")
    parser.add_argument("--feature-extractor", default=INCEPTION,
                        help=f"a torch-fidelity registered extractor, or {EMOJI_CLASSIFIER} (the emoji classifier)")
    parser.add_argument(
        "--inception-weights", "--feature-extractor-weights", dest="weights", default=None, metavar="FILE",
        help="weights file for the extractor (default: torch-fidelity's cache, $TORCH_HOME/hub/checkpoints/)",
    )
    parser.add_argument("--feature-layer", default=None, help="layer for FID / KID / PRC (default: the extractor's)")
    parser.add_argument("--score-batch-size", type=int_in_range(1), default=64)
    parser.add_argument("--no-reference-cache", action="store_true", help="do not cache reference statistics")
    parser.add_argument("--sample-only", action="store_true", help="sample (resuming) without scoring")
    parser.add_argument("--json", default=None, help="results file (default: OUT/results.json)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars of sampling and scoring (the summary line is printed either way)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="score two sample folders against each other")
    return parser


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.feature_extractor == EMOJI_CLASSIFIER:
        register_emoji_extractor()
    scoring = dict(
        feature_extractor=args.feature_extractor, feature_extractor_weights=args.weights,
        feature_layer=args.feature_layer, score_batch_size=args.score_batch_size,
    )
    try:
        if args.compare:
            return compare(*args.compare, json_path=args.out or args.json, metrics=args.metrics or ("fid", "kid"),
                           **scoring)
        if args.out is None:
            raise ValueError("--out is required: the run folder for samples and results")
        return evaluate(
            args.model, args.out, args.reference, num_images=args.num_images, labels=args.labels,
            batch_size=args.batch_size, seed=args.seed, guidance_scale=args.cfg, top_k=args.top_k, top_p=args.top_p,
            sampler=args.sampler, kv_cache=args.kv_cache, dtype=args.dtype,
            image_size_eval=args.image_size_eval, metrics=args.metrics,
            cache_reference=not args.no_reference_cache, sample_only=args.sample_only, json_path=args.json,
            progress=args.progress, **scoring,
        )
    except (ValueError, OSError) as err:
        if os.environ.get("VARTK_DEBUG"):
            raise
        raise SystemExit(f"vartk fid: {err}")


if __name__ == "__main__":
    main()
