"""The training loop every job shares: config -> CLI flags, DDP, optimiser and LR schedule,
deterministic steps, logging, sample grids, checkpoints and `--resume`.

A job (tokenizer.py, var.py, gpt.py) is a `Job` subclass: it builds its models from the config and
the dataset, names the modules it trains, and computes a loss per step. The loop does the rest:

    job.before_first_step()                                # a fresh run only (e.g. k-means of a codebook)
    for step in range(start, stop_at or max_steps):        # --stop-at: end early at a checkpoint, --resume later
        torch.manual_seed(step_seed(seed, step, rank))     # dropout / label dropout: same after --resume
        batch = next(batches)                              # same indices for the same step, see data.py
        for name in job.phases(step):                      # ["model"] (+ ["discriminator"] for a GAN)
            loss = job.loss(name, wrapped_modules, batch, step); backward, clip, AdamW, LR schedule
        log / sample grid every N steps
        every --save-every steps: held-out metrics (--val-data), checkpoint
    job.export(out)                                        # save_pretrained folders (not after --stop-at)
    print("N steps, final loss L; model written to ...")   # with or without the progress bar
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
import time
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME as WEIGHTS_NAME
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from ..checkpoints import load_state_dict_strict
from ..files import check_writable, write_file_atomic, write_text_atomic
from .data import (
    Batch, BatchOrder, ImageFolder, crop_some, decode_size, fits_in_memory, iterate_batches, load_subset, mirror_some,
    same_classes,
)
from .resume import latest_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")


def arg(default, help: str):
    """A config field that becomes the CLI flag --field-name with this help text."""
    return field(default=default, metadata={"help": help})


def flag(name: str) -> str:
    """The CLI flag of a config field: max_steps -> --max-steps."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Fields every job has. An empty-string default on a `required`-marked field means: must be given."""

    data: str = arg("", "image folder: class subfolders (ImageFolder layout) or a flat folder of images (required)")
    out: str = arg("runs/train", "output folder: checkpoints/, samples/, log.jsonl and the exported model")
    image_size: int = arg(64, "images are resized (shorter side) and center-cropped to this size")
    batch_size: int = arg(32, "batch size per process (global batch = this x number of processes)")
    max_steps: int = arg(1000, "optimizer steps in total")
    lr: float = arg(3e-4, "peak learning rate")
    weight_decay: float = arg(0.05, "AdamW weight decay (never on biases, norms, embeddings the job excludes)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    warmup_steps: int = arg(100, "linear warm-up steps")
    schedule: str = arg("cosine", f"decay after warm-up: one of {SCHEDULES}")
    min_lr_ratio: float = arg(0.1, "final learning rate as a fraction of --lr")
    grad_clip: float = arg(2.0, "clip the gradient norm to this value (0: no clipping)")
    seed: int = arg(0, "seed of the initialisation, the data order and every step's randomness")
    log_every: int = arg(10, "write averaged metrics to log.jsonl every N steps (and at each checkpoint)")
    sample_every: int = arg(500, "write a sample grid to samples/ every N steps (0: only at the end)")
    num_samples: int = arg(16, "images in a sample grid")
    save_every: int = arg(500, "write a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = arg(2, "how many recent checkpoints to keep (plus the best validated one)")
    val_data: str = arg("", "held-out image folder with the same class folders as --data: its loss is measured "
                            "at every checkpoint (log.jsonl val_*), and the best checkpoint is kept")
    val_images: int = arg(1024, "validate on at most this many --val-data images (evenly spaced over the folder)")
    resume: bool = arg(False, "continue from the latest checkpoint in --out")
    stop_at: int = arg(0, "stop after this step of the --max-steps schedule (a multiple of --save-every: its "
                          "checkpoint is written, nothing is exported); continue later with --resume. 0: run to "
                          "--max-steps")
    device: str = arg("auto", "auto (cuda when available), cuda or cpu")
    precision: str = arg("auto", f"one of {PRECISIONS}; auto = bf16 autocast on CUDA, fp32 on CPU")
    num_workers: int = arg(0, "DataLoader workers when the dataset is not cached in memory")
    cache_limit_gb: float = arg(4.0, "decode the whole dataset into memory (uint8) when the copies of all processes "
                                     "of a machine fit in this many GB")
    class_balance: float = arg(0.0, "draw images of a class with n images with weight n ** -a (0: plain shuffle, "
                                    "1: every class equally often)")
    hflip: float = arg(0.0, "flip each training image left-right with this probability (0: never)")
    crop_scale: float = arg(1.0, "decode training images at this multiple of --image-size and train on random "
                                 "--image-size crops of them (VAR's data: 1.125); 1: the center crop only")
    init_from: str = arg("", "start the model from these weights (a save_pretrained folder such as an earlier "
                             "run's transformer/ or tokenizer/) with a fresh optimizer and schedule")
    progress: bool = arg(True, "show a tqdm progress bar")

    required = ("data",)
    # what --resume may change: how the run is logged, saved, validated and where it runs, paths (the data is
    # checked by its image count), --stop-at, and --max-steps, whose LR decay is then recomputed over the new
    # total
    may_change_on_resume = ("data", "out", "max_steps", "log_every", "sample_every", "num_samples", "save_every",
                            "keep_checkpoints", "val_data", "val_images", "resume", "stop_at", "device", "precision",
                            "num_workers", "cache_limit_gb", "init_from", "progress")

    def check(self) -> None:
        for name in self.required:
            if getattr(self, name) in ("", None):
                raise SystemExit(f"{flag(name)} is required")
        check_finite(self)
        check_out(self)
        if self.schedule not in SCHEDULES:
            raise SystemExit(f"--schedule {self.schedule!r} is unknown; use one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise SystemExit(f"--precision {self.precision!r} is unknown; use one of {PRECISIONS}")
        if not 0 <= self.hflip <= 1:
            raise SystemExit(f"--hflip is a probability in [0, 1], got {self.hflip}")
        if not self.crop_scale >= 1:
            raise SystemExit(f"--crop-scale must be >= 1 (1: no random crops), got {self.crop_scale}")
        if self.init_from and not (Path(self.init_from) / WEIGHTS_NAME).is_file():
            raise SystemExit(f"--init-from {self.init_from}: no {WEIGHTS_NAME} there; give a save_pretrained "
                             "folder such as <run>/transformer")
        check_at_least(self, 1, ("batch_size", "max_steps", "log_every", "save_every", "image_size", "val_images",
                                 "num_samples", "keep_checkpoints"))
        check_at_least(self, 0, ("warmup_steps", "weight_decay", "grad_clip", "lr", "sample_every", "num_workers",
                                 "cache_limit_gb", "class_balance", "stop_at"))
        if self.stop_at and (self.stop_at > self.max_steps or self.stop_at % self.save_every):
            raise SystemExit(f"--stop-at {self.stop_at} must be a checkpoint step: a multiple of --save-every "
                             f"{self.save_every} and at most --max-steps {self.max_steps} (0: run to the end)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SystemExit(f"--min-lr-ratio is a fraction of --lr in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise SystemExit(f"--beta1 and --beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0 <= self.seed < 2**32:
            raise SystemExit(f"--seed must be in [0, 2**32), got {self.seed}")


def check_finite(cfg) -> None:
    """Refuse NaN and infinite float flags: training diverges on them, and a NaN never equals itself, so the run
    could not be resumed either."""
    for name, value in dataclasses.asdict(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"{flag(name)} must be a finite number, got {value}")


def check_out(cfg: TrainConfig) -> None:
    """Refuse an --out that cannot hold the run before any data is read: a file, a folder we may not write to, or
    one inside the images (its checkpoints/ and samples/ would become class folders of the next run)."""
    out = Path(cfg.out)
    for name in ("data", "val_data"):
        images = getattr(cfg, name)
        if images and out.resolve().is_relative_to(Path(images).resolve()):
            raise SystemExit(f"--out {cfg.out} is inside {flag(name)} {images}; give an output folder outside the "
                             "images")
    try:
        check_writable(out.absolute(), f"--out {cfg.out}")
    except ValueError as err:
        raise SystemExit(str(err)) from None


def check_at_least(cfg, minimum: int, names: tuple[str, ...]) -> None:
    """Refuse a flag below `minimum` (or NaN; TrainConfig.check has refused infinite ones already)."""
    for name in names:
        if not getattr(cfg, name) >= minimum:
            raise SystemExit(f"{flag(name)} must be >= {minimum}, got {getattr(cfg, name)}")


def check_architecture(build) -> None:
    """Build the model on the meta device (no memory, no time), so that flags that do not make a model fail before
    the data is read. `build()` passes the smallest valid values for what only the data decides (number of
    classes, vocabulary): the shape checks do not depend on them."""
    try:
        with torch.device("meta"):
            build()
    except ValueError as err:
        raise SystemExit(f"these flags do not make a model: {err}") from None


# ---------------------------------------------------------------------------------------------- CLI
def parse_int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}")


def build_parser(config_cls: type, prog: str) -> argparse.ArgumentParser:
    """One --flag per dataclass field (underscores -> dashes); tuples are comma-separated ints."""
    parser = argparse.ArgumentParser(prog=prog, description=config_cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        option, kind, help_text = flag(f.name), hints[f.name], f.metadata.get("help", "")
        default = argparse.SUPPRESS if f.name in config_cls.required else f.default  # no "(default: )" after "(required)"
        if kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(option, type=parse_int_tuple, default=default, help=help_text)
        else:
            parser.add_argument(option, type=kind, default=default, help=help_text)
    return parser


def parse_config(config_cls: type, argv: list[str], prog: str):
    config = config_cls(**vars(build_parser(config_cls, prog).parse_args(argv)))
    config.check()
    return config


# ---------------------------------------------------------------------------------------------- DDP
@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Distributed:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; nccl on GPUs, gloo on CPU."""
    if device not in ("auto", "cuda", "cpu"):
        raise SystemExit(f"--device {device!r} is unknown; use auto, cuda or cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no GPU")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def check_resume(cfg: TrainConfig, state: dict, num_images: int, class_names: list[str], world_size: int,
                 checkpoint: Path) -> None:
    """Refuse a --resume whose settings would not continue the checkpoint's run (data order, optimiser, model)."""
    if (state["world_size"], state["batch_size"]) != (world_size, cfg.batch_size):
        raise SystemExit(
            f"{checkpoint} was written by {state['world_size']} process(es) with --batch-size "
            f"{state['batch_size']}; resume with the same (now {world_size}, {cfg.batch_size}) to keep the data order"
        )
    saved, now = state.get("config", {}), json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists
    changed = [f"{flag(name)} {saved[name]!r} -> {now[name]!r}" for name in now
               if name in saved and name not in cfg.may_change_on_resume and saved[name] != now[name]]
    if changed:
        raise SystemExit(f"--resume from {checkpoint}: these settings differ from the run's ({'; '.join(changed)}); "
                         f"resume with the run's values, or start a new run with --init-from {checkpoint}/model. "
                         f"Only these may change: {' '.join(map(flag, cfg.may_change_on_resume))}")
    if state.get("num_images", num_images) != num_images:
        raise SystemExit(f"--resume from {checkpoint}: --data {cfg.data} holds {num_images} images, the run was "
                         f"trained on {state['num_images']}; the data order would differ")
    if not same_classes(state.get("class_names", class_names), class_names):
        raise SystemExit(f"--resume from {checkpoint}: --data {cfg.data} has the classes {class_names}, the run "
                         f"was trained on {state['class_names']}; the class ids would differ")
    if cfg.max_steps < state["step"]:
        raise SystemExit(f"--resume from {checkpoint}: it is already at step {state['step']}; give --max-steps "
                         f"{state['step']} (to redo only the final export) or more (now {cfg.max_steps})")
    if cfg.stop_at and cfg.stop_at < state["step"]:
        raise SystemExit(f"--resume from {checkpoint}: it is already at step {state['step']}, past --stop-at "
                         f"{cfg.stop_at}; give a later --stop-at, or 0 to run to --max-steps")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step on one rank: randomness depends on (seed, step, rank) only, so --resume is exact."""
    return (seed * 1_000_003 + step) * 1_009 + rank


# ---------------------------------------------------------------------------------------------- optimisation
def lr_factor(step: int, cfg: TrainConfig, first_step: int = 0) -> float:
    """Linear warm-up to 1, then cosine / linear decay to min_lr_ratio at max_steps (or constant). `step` counts
    the updates of a module that trains from global step `first_step` on, so its decay ends at max_steps too."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - first_step - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_optimizer(module: nn.Module, cfg: TrainConfig, no_decay_keywords: tuple[str, ...], fused: bool,
                    first_step: int = 0):
    """AdamW; no weight decay on 1-D parameters and on names containing one of `no_decay_keywords`; the LR
    schedule of a module first updated at global step `first_step`."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            skip = param.ndim < 2 or any(keyword in name for keyword in no_decay_keywords)
            (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, first_step))
    return optimizer, scheduler


def apply_current_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's rates from this run's schedule at the restored step: the checkpoint holds the rates of
    the schedule it was written under, which differs once --max-steps changes."""
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


@dataclass
class Trainee:
    """A trained module with its DDP wrapper, optimizer and LR schedule."""

    module: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def step(self, loss: torch.Tensor, grad_clip: float) -> float:
        """Backward, clip, update; returns the gradient norm before clipping (0 when not clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), grad_clip).item() if grad_clip > 0 else 0.0
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm


# ---------------------------------------------------------------------------------------------- jobs
class Job(ABC):
    """What a training job gives the loop; see tokenizer.py, var.py, gpt.py."""

    find_unused_parameters = False

    @abstractmethod
    def trainees(self) -> dict[str, tuple[nn.Module, tuple[str, ...]]]:
        """{name: (module, no-weight-decay name keywords)}; "model" is the one exported."""

    def phases(self, step: int) -> list[str]:
        """Names of the trainees updated at `step`, in order."""
        return ["model"]

    def first_step(self, name: str) -> int:
        """The global step at which trainee `name` is first updated (its warm-up starts there)."""
        return 0

    @abstractmethod
    def loss(self, name: str, wrapped: dict[str, nn.Module], batch: Batch, step: int):
        """(scalar loss, {metric: float tensor}) for trainee `name`; `wrapped` holds the DDP-wrapped modules."""

    @abstractmethod
    def validation_metrics(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Mean metrics of a held-out batch ("loss" among them) from the unwrapped modules, which are in eval
        mode; deterministic (no label dropout). `batch.indices` is None: the images are not training images."""

    def save_inputs(self, out: Path) -> None:
        """Copy into the run folder what the run needs besides its checkpoints (e.g. a frozen tokenizer), so that
        exporting a checkpoint later does not depend on files outside it."""

    def before_first_step(self) -> None:
        """Called once before step 0 of a run that starts fresh (not when it resumes), after --init-from (e.g. to
        seed a codebook)."""

    def after_step(self, step: int, batch: Batch) -> None:
        """Called once the optimizers of `step` have stepped (e.g. to restart unused codebook entries)."""

    def samples(self) -> tuple[torch.Tensor, int] | None:
        """(images [N, 3, H, W] in [0, 1], images per grid row) for the sample grid, or None."""
        return None

    @abstractmethod
    def export(self, out: Path, class_names: list[str]) -> list[Path]:
        """Write the trained model(s) as save_pretrained folders under `out`; returns the folders."""


def autocast_context(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def averaged(metrics: dict[str, list[float]], dist: Distributed) -> dict[str, float]:
    """Mean of each metric over the logging window and over processes."""
    names = sorted(metrics)
    values = torch.tensor([sum(metrics[n]) / len(metrics[n]) for n in names], dtype=torch.float64,
                          device=dist.device)  # [M] on the process group's device (nccl reduces no CPU tensors)
    if dist.world_size > 1:
        torch_dist.all_reduce(values)
        values /= dist.world_size
    return dict(zip(names, values.tolist()))


@contextmanager
def evaluating(trainees: dict[str, Trainee]):
    """Eval mode and no gradients inside; train mode again after."""
    for trainee in trainees.values():
        trainee.module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for trainee in trainees.values():
            trainee.module.train()


def save_sample_grid(job: Job, trainees: dict[str, Trainee], path: Path) -> None:
    from torchvision.utils import save_image

    with evaluating(trainees):
        grid = job.samples()
    if grid is not None:
        images, nrow = grid
        write_file_atomic(path, lambda tmp: save_image(images.float().clamp(0, 1), tmp, nrow=nrow, padding=2,
                                                       pad_value=1.0, format="PNG"))


def load_validation_set(cfg: TrainConfig, class_names: list[str], dist: Distributed) -> Batch | None:
    """This process's share of the --val-data images (uint8, on CPU), or None without --val-data."""
    if not cfg.val_data:
        return None
    val = ImageFolder(cfg.val_data, cfg.image_size, cache=False, flag="--val-data")
    if same_classes(val.class_names, class_names):
        training_ids = torch.arange(len(class_names))  # [C_val]
    else:
        unknown = sorted(set(val.class_names) - set(class_names))
        if unknown:
            raise SystemExit(f"--val-data {cfg.val_data} has classes {unknown} that --data {cfg.data} lacks (its "
                             f"classes: {class_names}); give a held-out folder with (some of) the same class folders")
        training_ids = torch.tensor([class_names.index(name) for name in val.class_names])  # [C_val]
    picked = torch.linspace(0, len(val) - 1, min(cfg.val_images, len(val))).round().long()  # [M]
    share = picked[dist.rank::dist.world_size]
    if len(share) == 0:
        raise SystemExit(f"--val-data {cfg.val_data}: {len(picked)} images for {dist.world_size} processes; "
                         "give at least one per process")
    images, labels = load_subset(val, share.tolist())
    return Batch(None, images, training_ids[labels])


def validate(job: Job, trainees: dict[str, Trainee], held_out: Batch, cfg: TrainConfig, dist: Distributed) -> dict:
    """Image-weighted mean of job.validation_metrics over the held-out images of every process."""
    totals: dict[str, float] = {}
    with evaluating(trainees):
        for images, labels in zip(held_out.images.split(cfg.batch_size), held_out.labels.split(cfg.batch_size)):
            batch = Batch(None, images.to(dist.device).float() / 255, labels.to(dist.device))
            with autocast_context(dist.device, cfg.precision):
                metrics = job.validation_metrics(batch)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value) * len(labels)
    names = sorted(totals)
    sums = torch.tensor([totals[n] for n in names] + [len(held_out.labels)], dtype=torch.float64,
                        device=dist.device)  # [M + 1]
    if dist.world_size > 1:
        torch_dist.all_reduce(sums)
    return {name: value / sums[-1].item() for name, value in zip(names, sums[:-1].tolist())}


def trim_log(path: Path, start_step: int) -> None:
    """Drop the log.jsonl records of steps >= start_step (and a line cut short by a kill): a resumed run redoes,
    and logs again, the steps a killed run took after its last checkpoint."""
    def before_start(line: str) -> bool:
        try:
            return json.loads(line)["step"] < start_step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False

    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if before_start(line)]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def log_validation(out: Path, step: int, validation: dict, progress) -> None:
    """One log.jsonl record {"step", "val_<metric>", ...} and one printed line."""
    record = {"step": step, **{f"val_{name}": value for name, value in validation.items()}}
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    scores = ", ".join(f"{name} {value:.4f}" for name, value in record.items() if name != "step")
    line = f"held-out at step {step + 1}: {scores}"
    (progress.write if progress is not None else print)(line)


def refuse_earlier_run(out: Path) -> None:
    """A fresh run must not write into another run's folder: its log, checkpoints and copied inputs would mix."""
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    if checkpoints or (out / "config.json").is_file():
        found = checkpoints[-1].name if checkpoints else "config.json"
        raise SystemExit(f"--out {out} holds an earlier run ({found}); continue it with --resume, "
                         "or give another --out (or delete that folder)")


# each process keeps its own buffers between steps (e.g. a tokenizer's code-usage counts); torch 2.14 renamed the flag
NO_BUFFER_SYNC_PER_FORWARD = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})


def build_trainees(job: Job, cfg: TrainConfig, dist: Distributed) -> dict[str, Trainee]:
    """Each module the job trains, in train mode, DDP-wrapped when there are several processes, with its
    optimizer and LR schedule."""
    trainees = {}
    for name, (module, no_decay) in job.trainees().items():
        module.train()
        wrapped = module
        if dist.world_size > 1:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            wrapped = DistributedDataParallel(module, device_ids=device_ids, **NO_BUFFER_SYNC_PER_FORWARD,
                                              find_unused_parameters=job.find_unused_parameters)
        fused = dist.device.type == "cuda"
        trainees[name] = Trainee(module, wrapped, *build_optimizer(module, cfg, no_decay, fused, job.first_step(name)))
    return trainees


def restore_latest(cfg: TrainConfig, out: Path, trainees: dict[str, Trainee], dataset: ImageFolder,
                   dist: Distributed) -> int:
    """The step to start from: 0 for a fresh run (refused in another run's folder), else the step of the
    latest checkpoint, whose modules, optimizers and schedules are restored in place."""
    if not cfg.resume:
        refuse_earlier_run(out)
        return 0
    resume_from = latest_checkpoint(out)
    if resume_from is None:
        if dist.is_main:
            print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0", file=sys.stderr)
        return 0
    state = read_trainer_state(resume_from)
    check_resume(cfg, state, len(dataset), dataset.class_names, dist.world_size, resume_from)
    load_checkpoint(resume_from, *trainee_parts(trainees))
    for trainee in trainees.values():
        apply_current_lr(trainee.scheduler)
    if dist.is_main:
        print(f"resumed from step {state['step']} ({resume_from})")
    return state["step"]


def trainee_parts(trainees: dict[str, Trainee]) -> tuple[dict, dict, dict]:
    """{name: module}, {name: optimizer}, {name: scheduler}: what a checkpoint holds."""
    return ({name: t.module for name, t in trainees.items()}, {name: t.optimizer for name, t in trainees.items()},
            {name: t.scheduler for name, t in trainees.items()})


def write_checkpoint(out: Path, done: int, trainees: dict[str, Trainee], cfg: TrainConfig, dataset: ImageFolder,
                     order: BatchOrder, dist: Distributed, validation: dict | None, progress) -> None:
    """Checkpoint `done` with the trainer state a resume needs (data position, config, held-out metrics)."""
    epoch, batch_in_epoch = divmod(done, order.batches_per_epoch)
    state = dict(epoch=epoch, batch_in_epoch=batch_in_epoch, world_size=dist.world_size, batch_size=cfg.batch_size,
                 seed=cfg.seed, num_images=len(dataset), class_names=dataset.class_names,
                 config=dataclasses.asdict(cfg))
    if validation is not None:
        state["validation"] = validation
        log_validation(out, done - 1, validation, progress)
    save_checkpoint(out, done, *trainee_parts(trainees), state, cfg.keep_checkpoints)


def check_diverged(values: dict[str, float], step: int, cfg: TrainConfig) -> None:
    """Stop at the first NaN or infinite loss, metric or gradient norm (floats already: no extra sync), before it
    reaches a checkpoint, a sample grid or the export."""
    bad = ", ".join(f"{name} {value}" for name, value in values.items() if not math.isfinite(value))
    if bad:
        last = latest_checkpoint(Path(cfg.out))
        kept = f"the checkpoints before it are kept (newest: {last})" if last else "no checkpoint was written"
        raise SystemExit(f"training diverged at step {step + 1}: {bad}; {kept}. Start again with a lower --lr "
                         f"(now {cfg.lr}), or check --data {cfg.data}")


def train_step(job: Job, trainees: dict[str, Trainee], batch: Batch, step: int, cfg: TrainConfig,
               window: dict[str, list[float]], step_lrs: dict[str, float]) -> torch.Tensor:
    """Every phase of one step (the model; a GAN's discriminator); appends each metric to `window` and each
    trainee's rate to `step_lrs` ("lr", "discriminator_lr"). Returns the last phase's loss."""
    wrapped = {name: t.wrapped for name, t in trainees.items()}
    for name in job.phases(step):
        prefix = "" if name == "model" else f"{name}_"
        step_lrs[prefix + "lr"] = trainees[name].optimizer.param_groups[0]["lr"]  # the rate this step uses
        with autocast_context(batch.images.device, cfg.precision):
            loss, metrics = job.loss(name, wrapped, batch, step)
        grad_norm = trainees[name].step(loss, cfg.grad_clip)
        values = {prefix + key: float(value) for key, value in {"loss": loss.detach(), **metrics,
                                                                "grad_norm": grad_norm}.items()}
        check_diverged(values, step, cfg)
        for key, value in values.items():
            window.setdefault(key, []).append(value)
    job.after_step(step, batch)
    return loss


def summary_line(steps: int, loss: float | None, folders: list[Path]) -> str:
    """The line a run ends with: its steps, the loss of its last logged window (None: no step ran in this process)
    and the folders its model was exported to."""
    final_loss = "" if loss is None else f", final loss {loss:.4g}"
    return f"{steps} steps{final_loss}; model written to {', '.join(map(str, folders))}"


def run_training(cfg: TrainConfig, job_cls: type) -> Path:
    """Train `job_cls(cfg, dataset, device)` as configured; returns the output folder."""
    dist = setup_distributed(cfg.device)
    out = Path(cfg.out)
    size = decode_size(cfg.image_size, cfg.crop_scale)
    cache = fits_in_memory(cfg.data, size, cfg.cache_limit_gb, copies=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    dataset = ImageFolder(cfg.data, size, cache=cache)
    order = BatchOrder(len(dataset), cfg.batch_size, cfg.seed, dist.rank, dist.world_size, dataset.labels,
                       cfg.class_balance)
    held_out = load_validation_set(cfg, dataset.class_names, dist)
    torch.manual_seed(cfg.seed)
    job = job_cls(cfg, dataset, dist.device)
    if cfg.init_from:
        init_weights = load_file(Path(cfg.init_from) / WEIGHTS_NAME, device=str(dist.device))
        load_state_dict_strict(job.trainees()["model"][0], init_weights, source=cfg.init_from)
    trainees = build_trainees(job, cfg, dist)
    start_step = restore_latest(cfg, out, trainees, dataset, dist)
    if start_step == 0:
        job.before_first_step()
    if dist.world_size > 1:  # every process has read --out before the main one writes into it
        torch_dist.barrier()

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        trim_log(out / "log.jsonl", start_step)
        job.save_inputs(out)
    progress = None
    if dist.is_main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, desc=type(job).__name__, dynamic_ncols=True)

    window: dict[str, list[float]] = {}
    step_lrs: dict[str, float] = {}
    record = {}  # the last logged window's averages
    window_start = time.perf_counter()
    batches = iterate_batches(dataset, order, start_step, cfg.num_workers)
    last_step = cfg.stop_at or cfg.max_steps
    for step in range(start_step, last_step):
        seed = step_seed(cfg.seed, step, dist.rank)
        torch.manual_seed(seed)
        batch = next(batches)
        batch = Batch(batch.indices, batch.images.to(dist.device, non_blocking=True).float() / 255,
                      batch.labels.to(dist.device, non_blocking=True))
        if size > cfg.image_size:
            batch = crop_some(batch, cfg.image_size, seed)
        if cfg.hflip > 0:
            batch = mirror_some(batch, cfg.hflip, seed)
        loss = train_step(job, trainees, batch, step, cfg, window, step_lrs)
        done = step + 1
        checkpoint_due = done % cfg.save_every == 0 or done == cfg.max_steps
        # a window also ends at each checkpoint, so a resumed run logs the same windows as an uninterrupted one
        if done % cfg.log_every == 0 or checkpoint_due:
            record = averaged(window, dist)
            elapsed = time.perf_counter() - window_start
            record.update(step=step, **step_lrs, steps_per_s=len(window["loss"]) / elapsed)
            if dist.is_main:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            window, window_start = {}, time.perf_counter()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint_due:
            validation = validate(job, trainees, held_out, cfg, dist) if held_out is not None else None
            if dist.is_main:
                write_checkpoint(out, done, trainees, cfg, dataset, order, dist, validation, progress)
        if dist.is_main and ((cfg.sample_every and done % cfg.sample_every == 0) or done == cfg.max_steps):
            save_sample_grid(job, trainees, out / "samples" / f"step_{done:07d}.png")  # after the checkpoint
    if progress is not None:
        progress.close()
    if dist.is_main and last_step < cfg.max_steps:
        print(f"stopped at step {last_step} of {cfg.max_steps} ({latest_checkpoint(out)}); continue with --resume")
    elif dist.is_main:
        folders = job.export(out, dataset.class_names)
        print(summary_line(cfg.max_steps, record.get("loss"), folders))
    if dist.world_size > 1:
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return out
