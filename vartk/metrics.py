"""FID / IS / KID / precision-recall of a generated image set against a reference, on torch-fidelity.

    from vartk.metrics import compute_metrics
    compute_metrics("samples/", "VIRTUAL_imagenet256_labeled.npz", metrics=("fid", "is", "prc"))
    # {'fid': 3.5, 'is': 280.1, 'is_std': 4.2, 'precision': 0.84, 'recall': 0.51, ...}

An image set is a folder of png/jpg files (searched recursively; hidden folders such as unfinished
sample shards are skipped), an ADM-style .npz holding uint8 images [N, H, W, 3] under `arr_0`, a list
of image paths or a uint8 array [N, H, W, 3]. A reference may also be a statistics .npz with `mu` and
`sigma`: our cache files (which also record the extractor, layer and weights they came from, and the
features, so KID and precision/recall work from them) or ADM's, whose `mu` / `sigma` are TF-Inception
pool3 statistics and are used as such for FID with the default extractor at layer "2048". ADM's
reference batch (VIRTUAL_imagenet256_labeled.npz) holds both: FID uses its `mu` / `sigma` (as ADM's
evaluator does); KID and precision/recall use features of its `arr_0` images.

Features come from a torch-fidelity feature extractor: "inception-v3-compat" by default (torch-fidelity's
TF-compatible Inception; weights from $TORCH_HOME/hub/checkpoints/ or the `feature_extractor_weights`
file) or any other name registered with `torch_fidelity.register_feature_extractor`. FID is the Frechet
distance of the feature statistics, computed here so statistics files work; IS, KID and precision/recall
are torch-fidelity's. Reference statistics (and features) of a folder or .npz are cached next to it,
keyed by a hash of its content, the extractor, the layer and the weights, so a second run reuses them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .files import write_file_atomic
from .images import IMAGE_EXTENSIONS, list_images, open_rgb

try:
    import scipy.linalg
    from torch_fidelity import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
except ImportError as err:
    raise ImportError(f"vartk.metrics needs the [eval] extra: pip install 'vartk[eval]' ({err})") from err

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
ADM_STATISTICS_LAYER = "2048"  # what the mu / sigma of a statistics file without metadata describe
METRIC_NAMES = {"fid": "fid", "is": "isc", "kid": "kid", "prc": "prc"}  # ours -> torch-fidelity's
FEATURE_METRICS = ("kid", "prc")  # metrics that need the reference's features, not only mu / sigma
CACHE_FORMAT = "rgb-on-white-2"  # how reference images are decoded (vartk.images.to_rgb); part of the cache key
STATISTICS_META = ("feature_extractor", "feature_layer", "weights")  # what our statistics files' meta must say
PRC_NEIGHBORHOOD = 3  # k of precision/recall (Kynkaanniemi et al.'s and torch-fidelity's default)


def image_needs(prc_neighborhood: int = PRC_NEIGHBORHOOD) -> dict[str, tuple[int, str]]:
    """{metric: (the fewest images each set needs for it, the sentence that says so)}."""
    k = prc_neighborhood
    return {
        "fid": (2, "FID needs at least 2 images per set (a covariance)"),
        "is": (1, "IS needs an image"),
        "kid": (2, "KID needs at least 2 images per set (subsets of two)"),
        "prc": (k + 1, f"precision/recall needs more than k = {k} images per set (each image's k nearest neighbours "
                       "in its own set)"),
    }


def check_image_count(what: str, count: int, metrics, prc_neighborhood: int = PRC_NEIGHBORHOOD) -> None:
    """Raise one ValueError naming each of `metrics` that `count` images of `what` (an image set) are too few for."""
    needs = image_needs(prc_neighborhood)
    short = [m for m in metrics if count < needs[m][0]]
    if short:
        raise ValueError(f"{what} has {count} image(s), too few for {', '.join(short)}: "
                         f"{'; '.join(needs[m][1] for m in short)}. Use more images, or leave "
                         f"{', '.join(short)} out of the metrics")


# ----------------------------------------------------------------------------------------------------
# Image sets


def check_image_array(dtype, shape: tuple[int, ...], what: str = "images") -> None:
    """Raise one ValueError unless (dtype, shape) are those of uint8 images [N, H, W, 3]."""
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 [N, H, W, 3], got {dtype} {list(shape)}")


class _ArrayImages(Dataset):
    """uint8 [N, H, W, 3] array -> uint8 [3, H, W] tensors, as torch-fidelity's extractors take them."""

    def __init__(self, array: np.ndarray):
        check_image_array(array.dtype, array.shape)
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.array[i])).permute(2, 0, 1)  # [3, H, W]


class _FileImages(Dataset):
    """Image files -> uint8 [3, H, W] tensors (`open_rgb`: transparency onto white, as training reads them).
    Every image must have the first one's size; another size raises one ValueError naming the file."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.size = open_rgb(paths[0]).size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = open_rgb(self.paths[i])
        if image.size != self.size:
            raise ValueError(f"{self.paths[i]} is {image.width}x{image.height}, {self.paths[0]} is "
                             f"{self.size[0]}x{self.size[1]}: the images of a set must share one size "
                             "(center-crop and resize them first, as ADM's reference batches are)")
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, H, W]


def open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """An .npz, opened lazily and never unpickled; a file that is not one raises one ValueError naming it."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not an .npz of arrays as np.savez writes ({err})") from err
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a .npy file renamed
        raise ValueError(f"{path} holds a single array (.npy), not an .npz of named arrays as np.savez writes")
    return npz


def npz_keys(path: str | os.PathLike) -> set[str]:
    with open_npz(path) as npz:
        return set(npz.files)


def _array_header(npz: np.lib.npyio.NpzFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an array in an open .npz, from its .npy header: the array itself is not read."""
    with npz.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    return shape, dtype


def image_dataset(images) -> Dataset:
    """A folder, an .npz with `arr_0`, a list of image paths, a uint8 [N, H, W, 3] array or a Dataset
    of uint8 [3, H, W] tensors -> a Dataset of uint8 [3, H, W] tensors."""
    if isinstance(images, Dataset):
        return images
    if isinstance(images, np.ndarray):
        return _ArrayImages(images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("the list of images is empty")
        return _FileImages([Path(p) for p in images])
    path = Path(images)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {path}")
        return _FileImages(files)
    if path.suffix == ".npz" and path.is_file():
        with open_npz(path) as npz:
            if "arr_0" not in npz.files:
                raise ValueError(f"{path} holds no images (no 'arr_0'; keys {sorted(npz.files)})")
            return _ArrayImages(npz["arr_0"])
    raise FileNotFoundError(f"{images!r} is neither an image folder nor an .npz file with images under 'arr_0'")


# ----------------------------------------------------------------------------------------------------
# Feature extraction


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (remembered per path, size and mtime within a process)."""
    stat = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _torch_fidelity_module(name: str, weights: str | None, weights_id: str, layers: tuple, device: str, verbose: bool):
    """The torch-fidelity extractor module computing `layers` (built once per process and settings)."""
    kwargs = {"feature_extractor_weights_path": weights} if weights else {}
    cuda = torch.device(device).type == "cuda"
    try:
        return create_feature_extractor(name, list(layers), cuda=cuda, verbose=verbose, **kwargs)
    except OSError as err:  # urllib's URLError: torch-fidelity could not download the Inception weights
        if name != INCEPTION or weights:
            raise
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise FileNotFoundError(
            f"torch-fidelity's Inception weights {INCEPTION_WEIGHTS_FILE} are not in {folder} and could not be "
            f"downloaded ({err}). Fetch {INCEPTION_WEIGHTS_URL} into $TORCH_HOME/hub/checkpoints/ or pass its "
            "path with --inception-weights (feature_extractor_weights=...)"
        ) from err


@dataclass
class FeatureExtractor:
    """A torch-fidelity feature extractor by registered name and the settings it runs with."""

    name: str = INCEPTION
    weights: str | None = None  # weights file; None = the extractor's own (torch-fidelity's cache for Inception)
    device: str | None = None  # None = cuda when available
    batch_size: int = 64
    verbose: bool = False

    def __post_init__(self):
        if self.name not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(
                f"feature extractor {self.name!r} is not registered with torch-fidelity; "
                f"known: {sorted(FEATURE_EXTRACTORS_REGISTRY)} (the emoji classifier \"vartk-emoji\" after "
                "vartk.emoji_extractor.register_emoji_extractor())"
            )
        if self.weights is not None and not Path(self.weights).exists():
            raise FileNotFoundError(f"feature extractor weights {self.weights} do not exist")
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cls = FEATURE_EXTRACTORS_REGISTRY[self.name]

    @property
    def default_weights(self) -> Path | None:
        """The weights used when none are given: the extractor's `default_weights()` (e.g. the shipped emoji
        classifier), or Inception's file in torch-fidelity's cache once it is there."""
        default = getattr(self.cls, "default_weights", None)
        if default is not None:
            return Path(default())
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        return cached if self.name == INCEPTION and cached.is_file() else None

    @property
    def weights_id(self) -> str:
        """What identifies the weights in cache keys: the sha256 of the weights file (of its files' sha256s for a
        folder), given or `default_weights`; 'default' while Inception's file is not downloaded yet."""
        weights = Path(self.weights) if self.weights else self.default_weights
        if weights is None:
            return "default"
        if weights.is_file():
            return file_sha256(weights)
        files = sorted(f for f in weights.rglob("*") if f.is_file())
        return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()

    @property
    def has_official_inception_weights(self) -> bool:
        """Inception with torch-fidelity's file (its name carries its sha256 prefix), which ADM's statistics
        were computed with."""
        prefix = INCEPTION_WEIGHTS_FILE.rsplit("-", 1)[1].removesuffix(".pth")
        return self.name == INCEPTION and (self.weights_id == "default" or self.weights_id.startswith(prefix))

    def layer_for(self, metric: str, layer: str | None = None) -> str:
        """The layer `metric` ('fid', 'is', 'kid', 'prc') reads: `layer` if given, else the extractor's default."""
        layer = layer if layer is not None else self.cls.get_default_feature_layer_for_metric(METRIC_NAMES[metric])
        provided = self.cls.get_provided_features_list()
        if layer not in provided:
            raise ValueError(f"feature layer {layer!r} is not provided by {self.name!r}; choose one of {provided}")
        return layer

    def module(self, layers) -> FeatureExtractorBase:
        """The torch-fidelity module computing `layers` (built once per process; Inception's weights are fetched
        now); the network runs only as deep as the deepest layer asked for."""
        return _torch_fidelity_module(
            self.name, self.weights, self.weights_id, tuple(sorted(set(layers))), self.device, self.verbose
        )

    def extract(self, images, layers) -> dict[str, torch.Tensor]:
        """Features {layer: float [N, D]} (on the CPU) of an image set."""
        cuda = torch.device(self.device).type == "cuda"
        return get_featuresdict_from_dataset(
            image_dataset(images), self.module(layers), self.batch_size, cuda, save_cpu_ram=not cuda,
            verbose=self.verbose,
        )

    def dimensions(self, layers) -> dict[str, int]:
        """{layer: D}, the feature size of each layer, from one pass of the extractor's dummy input."""
        module = self.module(layers)
        with torch.no_grad():
            features = module(self.cls.get_dummy_input_for_compile().to(self.device))
        return {layer: f.shape[-1] for layer, f in module.convert_features_tuple_to_dict(features).items()}


# ----------------------------------------------------------------------------------------------------
# Statistics and the Frechet distance


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D]."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D] for statistics, got shape {list(features.shape)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), the FID formula.

    As in ADM's and pytorch-fid's code: when the product is singular enough that sqrtm is not finite,
    `eps` is added to both diagonals; a small imaginary part from rounding is dropped. A distance within the
    rounding error of 0 (`frechet_rounding`) is 0: matching statistics give 0, not a tiny negative number."""
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics disagree in dimension: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    product = sigma1 @ sigma2
    covmean = scipy.linalg.sqrtm(product)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    return 0.0 if abs(distance) <= frechet_rounding(product) else distance


def frechet_rounding(product: np.ndarray) -> float:
    """A bound on the rounding error of the Frechet distance, from the product sigma1 sigma2 [D, D]: float64 rounding
    moves its eigenvalues by up to eps ||product||, so each of the D square roots that tr sqrtm sums by up to
    sqrt(eps ||product||) (reached at the zero eigenvalues of a covariance of no more images than features), and the
    trace counts twice. The Frobenius norm bounds the spectral one."""
    return 2 * len(product) * math.sqrt(np.finfo(np.float64).eps * np.linalg.norm(product))


@dataclass
class LayerStatistics:
    """What a reference contributes at one feature layer."""

    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D]
    features: torch.Tensor | None  # [N, D], None for statistics-only files (no KID / precision-recall)
    num_images: int | None = None  # behind mu and sigma; None when unknown (ADM's statistics)

    @classmethod
    def from_features(cls, features: torch.Tensor) -> "LayerStatistics":
        return cls(*feature_statistics(features), features, len(features))


def save_statistics(path: str | os.PathLike, stats: LayerStatistics, meta: dict) -> None:
    """Write mu, sigma, features and a JSON `meta` to an .npz, atomically (temp file + rename)."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "meta": np.array(json.dumps(meta))}
    if stats.features is not None:
        arrays["features"] = stats.features.numpy()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    write_file_atomic(path, write)


def _statistics_meta(npz: np.lib.npyio.NpzFile, path) -> dict:
    """The JSON `meta` of our statistics files, saying what they describe; {} for ADM's, which have none."""
    if "meta" not in npz.files:
        return {}
    try:
        meta = json.loads(str(npz["meta"]))
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or not set(STATISTICS_META) <= meta.keys():
        raise ValueError(f"{path}: its 'meta' must be a JSON object with {list(STATISTICS_META)} (as vartk writes "
                         f"it) or be absent (ADM's statistics), got {str(npz['meta'])[:200]!r}")
    return meta


def _read_mu_sigma(npz: np.lib.npyio.NpzFile, path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu [D], sigma [D, D], meta) of an open statistics .npz; what FID cannot use raises one ValueError."""
    if not {"mu", "sigma"} <= set(npz.files):
        raise ValueError(f"{path} is not a statistics file: it has no 'mu' and 'sigma' (keys {npz.files})")
    mu, sigma = npz["mu"], npz["sigma"]
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu" or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu must be numbers [D] and sigma [D, D], got {mu.dtype} {list(mu.shape)} and "
                         f"{sigma.dtype} {list(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu and sigma must be finite, but they hold NaN or inf")
    return mu, sigma, _statistics_meta(npz, path)


def read_statistics(path: str | os.PathLike) -> tuple[LayerStatistics, dict]:
    """(statistics, meta) of a statistics .npz; meta is {} for files without it (ADM's). The number of images is
    the meta's `num_images`, else the number of features, else unknown."""
    with open_npz(path) as npz:
        mu, sigma, meta = _read_mu_sigma(npz, path)
        features = torch.from_numpy(npz["features"]) if "features" in npz.files else None
        num_images = meta.get("num_images", None if features is None else len(features))
        return LayerStatistics(mu, sigma, features, num_images), meta


# ----------------------------------------------------------------------------------------------------
# References, with their statistics cached next to them


def content_hash(source: str | os.PathLike) -> str:
    """sha256 over a file's bytes, or over the relative names and bytes of a folder's images."""
    path = Path(source)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in list_images(path):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def _cache_files(reference: Path, digest: str, extractor: FeatureExtractor, layer: str) -> list[Path]:
    """Where the cached statistics of `reference` (content hash `digest`) at `layer` live: next to it,
    else in the vartk cache."""
    from .hub import default_cache_dir

    key_parts = [digest, extractor.name, layer, extractor.weights_id, CACHE_FORMAT]
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    name = f"{reference.name}.{extractor.name}-{layer}.{key}.stats.npz"
    return [reference.parent / name, default_cache_dir() / "fid_stats" / name]


def _write_cache(files: list[Path], stats: LayerStatistics, meta: dict) -> None:
    """Write to the first of `files` that can be written (the reference's folder may be read-only)."""
    errors = []
    for file in files:
        try:
            save_statistics(file, stats, meta)
            return
        except OSError as err:
            errors.append(str(err))
    raise OSError(f"could not write reference statistics: {errors}")


def _statistics_mismatch(path: Path, meta: dict, extractor: FeatureExtractor, layer: str) -> str | None:
    """Why the statistics in `path` cannot stand for (extractor, layer), or None when they can."""
    if not meta:  # ADM's file: TF-Inception pool3
        described = (INCEPTION, ADM_STATISTICS_LAYER)
        if (extractor.name, layer) != described:
            return f"its statistics (no metadata: ADM's) are {INCEPTION} layer {ADM_STATISTICS_LAYER}"
        if not extractor.has_official_inception_weights:
            return f"its statistics (no metadata: ADM's) come from the official {INCEPTION_WEIGHTS_FILE}"
        return None
    described = (meta["feature_extractor"], meta["feature_layer"])
    if described != (extractor.name, layer):
        return f"its statistics are {described[0]} layer {described[1]}"
    if meta["weights"] != extractor.weights_id:
        return f"its statistics come from other {extractor.name} weights ({meta['weights'][:12]})"
    return None


def _image_statistics(reference, layers: list[str], extractor: FeatureExtractor, cache: bool) -> dict:
    """Statistics and features of the reference's images at `layers`, through the cache when it is a path."""
    path = Path(reference) if isinstance(reference, (str, os.PathLike)) else None
    digest = content_hash(path) if cache and path is not None else None
    cache_files = {layer: _cache_files(path, digest, extractor, layer) for layer in layers} if digest else {}
    out = {}
    for layer, files in cache_files.items():
        for found in (f for f in files if f.is_file()):
            try:
                out[layer] = read_statistics(found)[0]
                break
            except Exception:  # a torn or foreign file: recompute and overwrite it
                continue
    missing = [layer for layer in layers if layer not in out]
    if missing:
        features = extractor.extract(reference, missing)
        for layer in missing:
            out[layer] = LayerStatistics.from_features(features[layer])
            if layer in cache_files:
                meta = {
                    "feature_extractor": extractor.name, "feature_layer": layer, "weights": extractor.weights_id,
                    "source": str(path.resolve()), "num_images": len(features[layer]),
                }
                _write_cache(cache_files[layer], out[layer], meta)
    return out


def _split_layers(path, meta: dict | None, has_features: bool, has_images: bool, layers: dict[str, bool],
                  extractor: FeatureExtractor) -> tuple[list[str], list[str]]:
    """(layers whose mu / sigma come from the statistics file `path`, layers whose statistics or features come from
    the reference's images), for `layers` {layer: features needed?}; meta None: the reference holds no statistics.
    A layer that neither can give raises one ValueError."""
    if meta is None:
        return [], list(layers)
    from_file = []
    for layer, needs_features in layers.items():
        reason = _statistics_mismatch(path, meta, extractor, layer)
        if reason is None and needs_features and not has_features and not has_images:
            reason = "it holds no features or images (KID and precision/recall need them)"
        if reason is None:
            from_file.append(layer)
        elif not has_images:
            raise ValueError(f"reference {path} cannot be used for {extractor.name} layer {layer}: {reason}")
    from_images = [layer for layer, needs_features in layers.items()
                   if layer not in from_file or (needs_features and not has_features)]
    return from_file, from_images


def check_reference(reference: str | os.PathLike, layers: dict[str, str], extractor: FeatureExtractor,
                    prc_neighborhood: int = PRC_NEIGHBORHOOD) -> None:
    """Raise now what `reference_statistics` would raise only after sampling, and refuse a reference with too few
    images for the metrics that read it (`layers`: {metric: layer}, IS left out), reading little: a folder's image
    names, or an .npz's array headers, meta, mu and sigma (not its images or features)."""
    path, what = Path(reference), f"reference {reference}"
    if path.is_dir():
        return check_image_count(what, len(list_images(path)), layers, prc_neighborhood)
    with open_npz(path) as npz:
        keys = set(npz.files)
        if "arr_0" not in keys and not {"mu", "sigma"} <= keys:
            raise ValueError(f"reference {path} holds neither images ('arr_0') nor statistics ('mu' and 'sigma'); "
                             f"its keys are {sorted(keys)}")
        if "arr_0" in keys:
            shape, dtype = _array_header(npz, "arr_0")
            check_image_array(dtype, shape, f"the images ('arr_0') of reference {path}")
        counts = {key: _array_header(npz, key)[0][0] for key in ("arr_0", "features") if key in keys}
        mu, _, meta = _read_mu_sigma(npz, path) if {"mu", "sigma"} <= keys else (None, None, None)
    from_file, from_images = _split_layers(path, meta, "features" in keys, "arr_0" in keys,
                                           _reference_layers(layers), extractor)
    on_images, on_features = [], []  # the metrics that read the images ('arr_0'), and the file's features
    for metric, layer in layers.items():
        if metric in FEATURE_METRICS:
            (on_images if layer in from_images else on_features).append(metric)
        elif layer not in from_file:  # FID, where the file's mu / sigma do not describe its layer
            on_images.append(metric)
    check_image_count(what, counts.get("arr_0", 0), on_images, prc_neighborhood)
    check_image_count(what, counts.get("features", 0), on_features, prc_neighborhood)
    for layer, size in (extractor.dimensions(from_file) if from_file else {}).items():
        if size != len(mu):
            raise ValueError(f"reference {path} holds statistics of {len(mu)} features, but {extractor.name} layer "
                             f"{layer} gives {size}")


def reference_statistics(
    reference, layers: dict[str, bool], extractor: FeatureExtractor, cache: bool = True
) -> dict[str, LayerStatistics]:
    """Statistics of `reference` at each layer in `layers` ({layer: features needed?}).

    A statistics file gives mu / sigma (and features, if it has them) where it describes (extractor,
    layer); everything else comes from the reference's images."""
    path = Path(reference) if isinstance(reference, (str, os.PathLike)) else None
    is_npz = path is not None and path.is_file()
    keys = npz_keys(path) if is_npz else set()
    stats, meta = read_statistics(path) if {"mu", "sigma"} <= keys else (None, None)
    has_features = stats is not None and stats.features is not None
    from_file, from_images = _split_layers(path, meta, has_features, not is_npz or "arr_0" in keys, layers, extractor)
    images = _image_statistics(reference, from_images, extractor, cache) if from_images else {}
    out = {}
    for layer in layers:
        if layer in from_file and layer in images:  # the file's mu / sigma with the images' features
            out[layer] = LayerStatistics(stats.mu, stats.sigma, images[layer].features, stats.num_images)
        else:
            out[layer] = stats if layer in from_file else images[layer]
    return out


# ----------------------------------------------------------------------------------------------------
# Metrics


def _check_metrics(metrics) -> tuple[str, ...]:
    if isinstance(metrics, str):  # one name or a comma list, as --metrics takes them
        metrics = [m.strip() for m in metrics.split(",")]
    metrics = tuple(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown or metrics}; choose from {list(METRIC_NAMES)}")
    return metrics


def _reference_layers(layers: dict[str, str]) -> dict[str, bool]:
    """{layer: features needed?} that the reference must give for {metric: layer}: none for IS; mu / sigma for FID;
    features for KID and precision/recall."""
    out = {}
    for metric, layer in layers.items():
        if metric != "is":
            out[layer] = out.get(layer, False) or metric in FEATURE_METRICS
    return out


def check_scoring(reference, metrics, feature_extractor: str = INCEPTION, feature_extractor_weights=None,
                  feature_layer: str | None = None, device: str | None = None, batch_size: int = 64,
                  verbose: bool = False, num_generated: int | None = None,
                  prc_neighborhood: int = PRC_NEIGHBORHOOD) -> tuple[FeatureExtractor, dict[str, str]]:
    """(extractor, {metric: layer}) after checking all that scoring needs and that needs no generated image: the
    metric names (a list, or one string of comma-separated names), the number of generated images (when given) and
    of the reference's images against each metric, a reference where one is needed and what it holds
    (`check_reference`), the extractor, its layers and weights (Inception's are fetched now). eval/fid.py calls it
    before sampling, so a typo does not wait for 50k samples."""
    metrics = _check_metrics(metrics)
    if num_generated is not None:
        check_image_count("the generated set", num_generated, metrics, prc_neighborhood)
    if reference is None and set(metrics) - {"is"}:
        raise ValueError(f"metrics {[m for m in metrics if m != 'is']} need a reference; only 'is' works without one")
    if isinstance(reference, (str, os.PathLike)):
        if not Path(reference).exists():
            raise FileNotFoundError(f"reference {reference} does not exist")
        if not (Path(reference).is_dir() or Path(reference).suffix == ".npz"):
            raise FileNotFoundError(f"reference {reference} is neither an image folder nor an .npz file")
    if batch_size < 1:
        raise ValueError(f"the scoring batch size must be >= 1, got {batch_size}")
    extractor = FeatureExtractor(
        feature_extractor, str(feature_extractor_weights) if feature_extractor_weights else None, device, batch_size,
        verbose,
    )
    layers = {m: extractor.layer_for(m, None if m == "is" else feature_layer) for m in metrics}
    extractor.module(layers.values())
    reading = {m: layer for m, layer in layers.items() if m != "is"}  # the metrics that read the reference
    if reading and isinstance(reference, (str, os.PathLike)):
        check_reference(reference, reading, extractor, prc_neighborhood)
    elif reading:
        check_image_count("the reference", len(image_dataset(reference)), reading, prc_neighborhood)
    return extractor, layers


def singular_covariance_warnings(counts: dict[str, int | None], dimension: int, source: str) -> list[str]:
    """A sentence for each set of `counts` ({name: images}; None: unknown) with no more images than the `dimension`
    features FID reads (`source`): the covariance of N images has rank N - 1 at most, and FID's bias, which shrinks
    as the sets grow, dominates it."""
    return [f"FID: the {name} has {count} images, no more than the {dimension} features of {source}, so its "
            "covariance is singular and the FID mostly measures the set sizes; use many more images than features, "
            "and compare FIDs of equal set sizes only"
            for name, count in counts.items() if count is not None and count <= dimension]


def compute_metrics(
    generated,
    reference=None,
    metrics=("fid", "is"),
    *,
    feature_extractor: str = INCEPTION,
    feature_extractor_weights: str | os.PathLike | None = None,
    feature_layer: str | None = None,
    device: str | None = None,
    batch_size: int = 64,
    cache: bool = True,
    isc_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = PRC_NEIGHBORHOOD,
    verbose: bool = False,
) -> dict:
    """Score `generated` (an image set) against `reference` (an image set or statistics file).

    metrics: any of "fid", "is" (Inception score, needs no reference), "kid", "prc" (precision/recall), as a list
    or one comma-separated string.
    feature_layer: the layer FID, KID and precision/recall read (default: the extractor's, "2048" for
    Inception); IS always reads the extractor's class logits. KID's subset size and IS's number of
    splits shrink to the number of images when there are fewer; sets too small for a metric are refused
    before any feature is extracted. Returns a flat dict of floats: fid, is, is_std, kid, kid_std, precision,
    recall, plus num_generated / num_reference, and `warnings`, a list of sentences on what the numbers cannot
    tell (a set with no more images than FID's features)."""
    generated = image_dataset(generated)
    extractor, layers = check_scoring(reference, metrics, feature_extractor, feature_extractor_weights,
                                      feature_layer, device, batch_size, verbose, len(generated), prc_neighborhood)
    metrics = tuple(layers)  # checked, without repeats
    generated_features = extractor.extract(generated, layers.values())
    num_generated = len(generated)
    results = {"num_generated": num_generated, "warnings": []}
    reference_layers = _reference_layers(layers)
    reference_stats = reference_statistics(reference, reference_layers, extractor, cache) if reference_layers else {}
    for layer, needs_features in reference_layers.items():
        if needs_features:
            results["num_reference"] = len(reference_stats[layer].features)

    if "fid" in metrics:
        ref, features = reference_stats[layers["fid"]], generated_features[layers["fid"]]
        results["fid"] = frechet_distance(*feature_statistics(features), ref.mu, ref.sigma)
        results["warnings"] += singular_covariance_warnings(
            {"generated set": num_generated, "reference": ref.num_images}, features.shape[1],
            f"{extractor.name} layer {layers['fid']}",
        )
    if "is" in metrics:
        score = isc_features_to_metric(generated_features[layers["is"]], splits=min(isc_splits, num_generated))
        results["is"], results["is_std"] = score[KEY_METRIC_ISC_MEAN], score[KEY_METRIC_ISC_STD]
    if "kid" in metrics:
        ref_features = reference_stats[layers["kid"]].features
        subset_size = min(kid_subset_size, num_generated, len(ref_features))
        if subset_size < 2:
            raise ValueError(f"KID needs subsets of >= 2 images; the sets have {num_generated} and "
                             f"{len(ref_features)} (kid_subset_size {kid_subset_size})")
        score = kid_features_to_metric(
            generated_features[layers["kid"]], ref_features, kid_subsets=kid_subsets, kid_subset_size=subset_size,
            verbose=False,
        )
        whole_sets = subset_size == num_generated == len(ref_features)  # every subset is the same: no spread
        results.update(kid=score[KEY_METRIC_KID_MEAN], kid_std=None if whole_sets else score[KEY_METRIC_KID_STD],
                       kid_subset_size=subset_size)
    if "prc" in metrics:
        score = prc_features_to_metric(
            generated_features[layers["prc"]].to(extractor.device),
            reference_stats[layers["prc"]].features.to(extractor.device),
            prc_neighborhood=prc_neighborhood, save_cpu_ram=True, verbose=False,
        )
        results["precision"], results["recall"] = score["precision"], score["recall"]
    return results


# ----------------------------------------------------------------------------------------------------
# Paired comparison


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 [H, W, 3] (`open_rgb`)."""
    return np.asarray(open_rgb(path))


def psnr(image_a: np.ndarray, image_b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of the same shape (inf when they are identical)."""
    if image_a.shape != image_b.shape:
        raise ValueError(f"images differ in shape: {image_a.shape} vs {image_b.shape}")
    mse = np.mean((image_a.astype(np.float64) - image_b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _images_by_name(folder) -> dict[str, Path]:
    files = list_images(folder)
    by_name = {f.name: f for f in files}
    if len(by_name) != len(files):
        raise ValueError(f"{folder} holds several images with the same file name; pairing by name needs unique names")
    return by_name


def paired_psnr(folder_a, folder_b) -> dict:
    """Per-image PSNR between images with the same file name in two folders (searched recursively).

    Returns {"psnr_mean": mean over pairs that differ, "psnr_min", "num_pairs", "num_identical",
    "per_image": {name: dB}}; identical pairs (infinite PSNR) appear as None, as do the mean and
    minimum when every pair is identical, so the result is plain JSON."""
    images_a, images_b = _images_by_name(folder_a), _images_by_name(folder_b)
    names = sorted(images_a.keys() & images_b.keys())
    if not names:
        raise ValueError(f"{folder_a} and {folder_b} have no image file names in common")
    values = {name: psnr(read_image(images_a[name]), read_image(images_b[name])) for name in names}
    finite = [v for v in values.values() if np.isfinite(v)]
    return {
        "psnr_mean": float(np.mean(finite)) if finite else None,
        "psnr_min": float(np.min(finite)) if finite else None,
        "num_pairs": len(names),
        "num_identical": len(names) - len(finite),
        "per_image": {name: (v if np.isfinite(v) else None) for name, v in values.items()},
    }
