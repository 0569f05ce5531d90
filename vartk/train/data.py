"""Image folders as training data, and the deterministic batch order that makes `--resume` exact.

Layout: class subfolders (ImageFolder style; class index = position in the sorted folder names)
or a flat folder of images (one class). Images are resized (shorter side, LANCZOS) and
center-cropped to a square, and kept as uint8 [3, S, S]; small datasets are decoded once and held
in memory. Batch order: epoch e shuffles with seed + e (torch's DistributedSampler rule), each rank
takes its share, and the incomplete last batch is dropped, so step s always sees the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..images import IMAGE_EXTENSIONS, list_images, open_rgb

def find_images(root: str | Path, flag: str = "--data") -> tuple[list[Path], list[int], list[str]]:
    """(image paths, class indices, class names) of an ImageFolder tree or a flat folder (one class); errors name
    the folder as `flag`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {root} is not a folder; give a folder of images or of class subfolders")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [list_images(d) for d in class_dirs]
    top_level = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                 and not f.name.startswith(".")]
    if any(per_class) and top_level:
        raise ValueError(f"{flag} {root} holds images ({top_level[0].name}, ...) beside class folders "
                         f"({', '.join(d.name for d in class_dirs)}); move them into a class folder or give a folder "
                         "of either kind")
    if any(per_class):
        empty = [d.name for d, files in zip(class_dirs, per_class) if not files]
        if empty:
            raise FileNotFoundError(f"class folders {empty} of {flag} {root} hold no images; class ids are the "
                                    "positions of the sorted folder names, so remove or fill them")
        paths = [p for files in per_class for p in files]
        labels = [index for index, files in enumerate(per_class) for _ in files]
        names = [d.name for d in class_dirs]
    else:
        paths = list_images(root)
        labels, names = [0] * len(paths), [root.name]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {flag} {root}")
    return paths, labels, names


def load_image(path: Path, size: int) -> torch.Tensor:
    """Read an image (`open_rgb`: transparency onto white), shorter side -> size, center crop -> uint8
    [3, size, size]."""
    image = open_rgb(path)
    scale = size / min(image.size)
    if scale != 1:
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.LANCZOS)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, S, S]


class ImageFolder(Dataset):
    """Images of a folder as (uint8 [3, S, S], class index); `cache=True` decodes everything once."""

    def __init__(self, root: str | Path, image_size: int, cache: bool, flag: str = "--data"):
        self.paths, labels, self.class_names = find_images(root, flag)
        self.image_size = image_size
        self.labels = torch.tensor(labels)  # [N]
        self.images = None  # [N, 3, S, S] uint8 when cached
        if cache:
            self.images = torch.empty(len(self.paths), 3, image_size, image_size, dtype=torch.uint8)
            for index, path in enumerate(self.paths):
                self.images[index] = load_image(path, image_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index] if self.images is not None else load_image(self.paths[index], self.image_size)
        return image, int(self.labels[index])


def fits_in_memory(root: str | Path, image_size: int, limit_gb: float, copies: int = 1) -> bool:
    """Whether `copies` decoded uint8 copies of the dataset (one per process of a machine) stay under `limit_gb`."""
    return copies * len(find_images(root)[0]) * 3 * image_size**2 <= limit_gb * 2**30


def same_classes(names: list[str], other: list[str]) -> bool:
    """Whether two folders' classes give the same ids: the same names, or one class each (a flat folder's class
    is named after the folder, which may differ between a training and a held-out folder)."""
    return names == other or len(names) == len(other) == 1


def load_subset(dataset: ImageFolder, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """These images of `dataset`: uint8 [M, 3, S, S] and labels [M]."""
    return torch.stack([dataset[i][0] for i in indices]), dataset.labels[indices]


@dataclass
class Batch:
    indices: torch.Tensor | None  # [B] training-set indices (None: held-out images)
    images: torch.Tensor  # [B, 3, S, S] uint8
    labels: torch.Tensor  # [B]
    mirrored: torch.Tensor | None = None  # [B] bool: the image is flipped left-right (--hflip); None: none is


MIRROR_STREAM, CROP_STREAM = 1, 2  # the flips' and crops' streams beside the step's own


def stream_generator(step_seed: int, stream: int) -> torch.Generator:
    """A CPU generator of its own for one kind of augmentation, seeded from the step's seed, so it leaves the
    step's other randomness (e.g. label dropout) as it is without it. The seed is hashed, SeedSequence([step_seed,
    stream]), not offset: torch's CPU generator reads only a seed's low 32 bits."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([step_seed, stream]).generate_state(1)[0]))


def decode_size(image_size: int, crop_scale: float) -> int:
    """The side training images are decoded at: --image-size x --crop-scale (random crops are cut from it)."""
    return max(image_size, round(image_size * crop_scale))


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size part of images [..., H, W]."""
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    return images[..., top : top + size, left : left + size]


def crop_some(batch: Batch, size: int, step_seed: int) -> Batch:
    """A random size x size crop of each (square) image, uniform over the positions (VAR's RandomCrop after its
    1.125x resize), drawn from the crops' own stream."""
    spare = batch.images.shape[-1] - size
    offsets = torch.randint(0, spare + 1, (len(batch.labels), 2), generator=stream_generator(step_seed, CROP_STREAM))
    images = torch.stack([image[:, top : top + size, left : left + size]
                          for image, (top, left) in zip(batch.images, offsets.tolist())])  # [B, 3, size, size]
    return Batch(batch.indices, images, batch.labels, batch.mirrored)


def mirror_some(batch: Batch, probability: float, step_seed: int) -> Batch:
    """Flip each image left-right with this probability, drawn from the flips' own stream."""
    draws = torch.rand(len(batch.labels), generator=stream_generator(step_seed, MIRROR_STREAM))  # [B]
    mirrored = (draws < probability).to(batch.images.device)
    images = torch.where(mirrored[:, None, None, None], batch.images.flip(-1), batch.images)
    return Batch(batch.indices, images, batch.labels, mirrored)


class BatchOrder:
    """Which dataset indices each step of one rank reads; a pure function of (seed, epoch, rank).

    class_balance = 0: every epoch is a shuffle of the dataset (torch's DistributedSampler rule).
    class_balance = a > 0: every epoch draws as many images as the dataset has, with replacement, an image of
    a class with n images with weight n ** -a (a = 1: every class equally often; 0.5: in proportion to sqrt(n)).
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int, world_size: int,
                 labels: torch.Tensor | None = None, class_balance: float = 0.0):
        per_rank = dataset_size // world_size
        if per_rank < batch_size:
            raise ValueError(
                f"{dataset_size} images over {world_size} process(es) give {per_rank} per process, fewer than "
                f"--batch-size {batch_size}; use a smaller batch or more images"
            )
        if class_balance < 0 or (class_balance > 0 and labels is None):
            raise ValueError(f"class_balance must be >= 0 and needs the labels, got {class_balance}")
        self.sampler = DistributedSampler(range(dataset_size), world_size, rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.seed, self.rank, self.world_size, self.per_rank = seed, rank, world_size, per_rank
        self.image_weights = None  # [N] sampling weight of every image when class-balanced
        if class_balance > 0:
            class_sizes = torch.bincount(labels).double()  # [C]
            self.image_weights = class_sizes[labels].pow(-class_balance)  # [N]
            if not self.image_weights.sum() > 0:
                raise ValueError(f"--class-balance {class_balance} weighs every image 0 (n ** -a underflows for "
                                 f"classes of {sorted(set(class_sizes.long().tolist()))} images); give a smaller "
                                 "value (1: every class equally often)")
        self.batch_size = batch_size
        self.batches_per_epoch = per_rank // batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for one epoch."""
        if self.image_weights is None:
            self.sampler.set_epoch(epoch)
            return list(self.sampler)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        drawn = torch.multinomial(self.image_weights, self.per_rank * self.world_size, replacement=True,
                                  generator=generator)  # [per_rank * world_size]
        return drawn[self.rank::self.world_size].tolist()

    def epoch(self, epoch: int) -> list[list[int]]:
        indices = self.epoch_indices(epoch)
        return [indices[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.batches_per_epoch)]

    def batches(self, start_step: int):
        """Index lists for steps start_step, start_step + 1, ... (forever)."""
        epoch, skip = divmod(start_step, self.batches_per_epoch)
        while True:
            yield from self.epoch(epoch)[skip:]
            epoch, skip = epoch + 1, 0


def iterate_batches(dataset: ImageFolder, order: BatchOrder, start_step: int, num_workers: int):
    """Batches for steps start_step, start_step + 1, ...: indexing the in-memory cache, else a DataLoader."""
    if dataset.images is not None:
        for indices in order.batches(start_step):
            index = torch.tensor(indices)
            yield Batch(index, dataset.images[index], dataset.labels[index])
        return
    while True:
        epoch, skip = divmod(start_step, order.batches_per_epoch)
        index_lists = order.epoch(epoch)[skip:]
        loader = DataLoader(dataset, batch_sampler=index_lists, num_workers=num_workers, persistent_workers=False,
                            pin_memory=torch.cuda.is_available(),
                            generator=torch.Generator())  # its own base seed: none drawn from the step's stream
        for indices, (images, labels) in zip(index_lists, loader):
            yield Batch(torch.tensor(indices), images, labels)
        start_step += len(index_lists)
