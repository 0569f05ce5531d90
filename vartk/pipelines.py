"""diffusers pipelines tying a tokenizer, a transformer and a sampler together.

    pipe = VARPipeline.from_official(vae="vae_ch160v4096z32.pth", var="var_d16.pth")
    out = pipe(class_labels=[207, 360], guidance_scale=1.5, top_k=900, top_p=0.96,
               generator=torch.Generator().manual_seed(0))
    out.images  # list of PIL images

Both pipelines have the components `tokenizer` and `transformer`. Sampling strategies and KV-cache policies are
objects (or registry specs such as "sjd:window=16") passed to `__call__`; the ones a pipeline holds
(`pipe.sampler`, `pipe.kv_cache`) are used when a call passes none, and are saved with it, as diffusers saves a
scheduler. A folder `save_pretrained` wrote loads back strictly with
`from_pretrained` (`load_folder`), and through diffusers' own entry point,
`diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, as strictly (`SavedComponent`);
`vartk.load` (vartk.loading) also takes built-in and official model names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import operator
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from .checkpoints import CheckpointError, load_saved_model, read_json_object
from .hub import check_official_files_exist
from .images import images_to_output, pil_arrays, resize_and_clamp
from .models.gpt import TOKENIZER_DOWNSAMPLE, GPTTransformer
from .models.var import VARTransformer
from .samplers import registry
from .samplers.contract import SamplerStats
from .samplers.kv_cache import KVCachePolicy
from .samplers.next_scale import NextScaleSampler, check_same_schedule, edit_next_scale
from .samplers.next_token import NextTokenSampler
from .samplers.registry import KV_CACHE, NEXT_SCALE, NEXT_TOKEN, SAMPLER
from .samplers.scalekv import check_calibration
from .samplers.sampling import check_class_labels, check_non_negative, check_sampling_args
from .tokenizers.msvq import MultiScaleVQVAE
from .tokenizers.vq import VQModel

OUTPUT_TYPES = ("pil", "np", "pt")
OFFICIAL_INPAINT_SAMPLING = {"guidance_scale": 3.0, "top_k": 900, "top_p": 0.95}  # VAR's demo notebook
PIPELINE_MODULE = "vartk_pipeline"  # the module file save_pretrained writes beside model_index.json, for diffusers
PIPELINE_MODULE_SOURCE = '''"""The pipeline classes model_index.json's "_class_name" names, for diffusers:
diffusers.DiffusionPipeline.from_pretrained(this folder, trust_remote_code=True) imports them from here (vartk must be
installed). vartk.load(folder) does not run this file."""
from vartk.pipelines import GPTPipeline, VARPipeline  # noqa: F401
'''


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Run a block with `modules` in eval mode (no dropout), restoring their modes afterwards."""
    was_training = [m.training for m in modules]
    try:
        yield [m.eval() for m in modules]
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


@dataclasses.dataclass
class SamplingOutput(ImagePipelineOutput):
    """images: PIL images, a uint8 array [B, H, W, 3] or a float tensor [B, 3, H, W]; stats: what sampling cost
    (transformer forwards, tokens per forward, seconds, KV-cache bytes; see `SamplerStats`)."""

    stats: SamplerStats | None = None


class _AutoregressivePipeline(DiffusionPipeline):
    """What both pipelines share: argument checks, label expansion, the sampler and KV-cache policy they hold,
    output conversion."""

    family: str = ""  # the model family, "var" or "llamagen" (its official protocols)
    sampling_family: str = ""  # the samplers' family, NEXT_SCALE or NEXT_TOKEN
    official_sampling: dict = {}  # the family's published sampling settings, used when nothing else is given
    component_classes: dict[str, tuple[type, ...]] = {}  # component name -> the classes it may be
    default_sampler_class: type = type(None)

    def __init__(self, tokenizer, transformer, class_names: list[str] | None = None,
                 sampling_defaults: dict | None = None, sampler=None, kv_cache=None, kv_calibration: dict | None = None):
        """sampler / kv_cache: the ones calls use when they pass none (objects, registry specs such as
        "sjd:window=16", or the config dicts a saved folder holds; None: the family's plain sampler and the full
        cache). kv_calibration: a `vartk calibrate-kv` calibration a policy with calibration="model" uses."""
        super().__init__()
        for name, component in (("tokenizer", tokenizer), ("transformer", transformer)):
            classes = self.component_classes[name]
            if not isinstance(component, classes):
                raise TypeError(f"a {type(self).__name__}'s {name} is a {' or '.join(c.__name__ for c in classes)}, "
                                f"got a {type(component).__name__}")
        if class_names is not None and not (isinstance(class_names, (list, tuple))
                                            and all(isinstance(c, str) for c in class_names)):
            raise TypeError(f"class_names must be a list of strings, got {class_names!r}")
        if sampling_defaults is not None and not isinstance(sampling_defaults, dict):
            raise TypeError(f"sampling_defaults must be a dict such as {self.official_sampling}, got "
                            f"{sampling_defaults!r}")
        self.check_components(tokenizer, transformer)
        self.register_modules(tokenizer=tokenizer, transformer=transformer)
        if class_names is not None and len(class_names) != transformer.config.num_classes:
            raise ValueError(
                f"{len(class_names)} class names given for a model with {transformer.config.num_classes} classes"
            )
        unknown = sorted(set(sampling_defaults or {}) - set(self.official_sampling))
        if unknown:
            raise ValueError(f"sampling_defaults {unknown} unknown; allowed: {sorted(self.official_sampling)}")
        self.register_to_config(class_names=list(class_names) if class_names is not None else None,
                                sampling_defaults=dict(sampling_defaults) if sampling_defaults else None)
        self.kv_calibration = kv_calibration
        self.sampling_options()  # the saved settings are valid ones
        self._plain_sampler = self.default_sampler_class()
        self.sampler, self.kv_cache = sampler, kv_cache

    @property
    def sampler(self):
        """The sampler of calls that pass none: the one set (and saved) with the pipeline, else the family's plain
        sampler; kept, so that a CUDA graph it captures is replayed on later calls."""
        return self._sampler or self._plain_sampler

    @sampler.setter
    def sampler(self, value) -> None:
        self._sampler = self.resolve(value, SAMPLER)
        self.register_to_config(sampler=registry.to_config(self._sampler) if self._sampler is not None else None)

    @property
    def kv_cache(self):
        """The KV-cache policy of calls that pass none (None: the full cache)."""
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, value) -> None:
        self._kv_cache = self.resolve(value, KV_CACHE)
        self.register_to_config(kv_cache=registry.to_config(self._kv_cache) if self._kv_cache is not None else None)

    @property
    def kv_calibration(self) -> dict | None:
        """The KV-cache calibration saved with the pipeline (`vartk calibrate-kv`), which a policy with
        calibration="model" uses; None: none."""
        return self.config.kv_calibration

    @kv_calibration.setter
    def kv_calibration(self, calibration: dict | None) -> None:
        if calibration is not None:
            if not isinstance(calibration, dict):
                raise TypeError(f"kv_calibration must be a calibration dict (vartk calibrate-kv), got {calibration!r}")
            check_calibration(calibration, self.transformer.cache_spec(1))
        self.register_to_config(kv_calibration=calibration)

    def resolve(self, value, kind: str):
        """A sampler / KV-cache policy given as an object, a registry spec string or a saved config dict -> the
        object, checked to be of this pipeline's family (None stays None)."""
        if isinstance(value, str):
            value = registry.from_spec(value, kind, self.sampling_family)
        elif isinstance(value, dict):
            value = registry.from_config(value, kind, self.sampling_family, source=f"saved {kind}")
        registry.check_family(value, kind, self.sampling_family)
        return value

    def check_sampler(self, sampler=None, kv_cache=None) -> None:
        """Raise ValueError unless `sampler` / `kv_cache` (objects or registry specs; None = the pipeline's) suit
        this pipeline, as a call would."""
        self.resolve(sampler, SAMPLER)
        self.policy_for_call(kv_cache)

    def policy_for_call(self, kv_cache):
        """The call's KV-cache policy: the given one or the pipeline's; a policy whose `calibration` is "model"
        gets the calibration saved with the pipeline (uniform budgets without one)."""
        policy = self.resolve(kv_cache, KV_CACHE) if kv_cache is not None else self.kv_cache
        if getattr(policy, "calibration", None) == "model":
            policy = dataclasses.replace(policy, calibration=self.kv_calibration or "uniform")
        return policy

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A folder save_pretrained wrote loads strictly (`load_folder`: every config field and weight present, of
        the right type and shape), its transformer cast to `torch_dtype` if given (`with_transformer_dtype`); anything
        else (a hub id) goes to diffusers."""
        folder = Path(pretrained_model_name_or_path)
        if not (folder / PIPELINE_INDEX).is_file():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        torch_dtype = kwargs.pop("torch_dtype", None)
        kwargs.pop("low_cpu_mem_usage", None)  # a local folder is read once either way
        if kwargs:
            raise TypeError(f"from_pretrained of a local folder takes torch_dtype only, got {sorted(kwargs)}")
        pipe = load_folder(folder)
        if not isinstance(pipe, cls):
            raise CheckpointError(f"{folder} holds a {type(pipe).__name__}, not a {cls.__name__}")
        return with_transformer_dtype(pipe, torch_dtype)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """diffusers' save_pretrained, plus the module file that model_index.json's `_class_name` names
        (`to_json_string`), so that diffusers.DiffusionPipeline.from_pretrained loads the folder too."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_MODULE_SOURCE)
        super().save_pretrained(save_directory, **kwargs)

    def to_json_string(self) -> str:
        """The config as diffusers writes it into model_index.json, with `_class_name` in diffusers' form for a
        pipeline defined outside diffusers, [module file in the folder, class name]: DiffusionPipeline.from_pretrained
        finds the class there, where a bare name would be looked up in diffusers."""
        index = json.loads(super().to_json_string())
        return json.dumps({**index, "_class_name": [PIPELINE_MODULE, type(self).__name__]}, indent=2,
                          sort_keys=True) + "\n"

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' generic loader (DiffusionPipeline.from_pretrained) loads each component with the class this
        returns for it: `SavedComponent`, which loads it as `load_folder` does, strictly."""
        init_dict, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        strict = {name: (__name__, SavedComponent.__name__) for name in cls.component_classes}
        return {**init_dict, **strict}, unused, hidden

    @staticmethod
    def check_components(tokenizer, transformer) -> None:
        """Raise ValueError unless `transformer` predicts `tokenizer`'s codes (see the subclasses)."""

    def sampling_options(self, guidance_scale=None, top_k=None, top_p=None, official: dict | None = None) -> dict:
        """The given settings; each one left as None comes from the model's saved `sampling_defaults`,
        else from `official` (default: the family's official sampling settings)."""
        saved = self.config.sampling_defaults or {}
        given = dict(guidance_scale=guidance_scale, top_k=top_k, top_p=top_p)
        options = {name: given[name] if given[name] is not None else saved.get(name, fallback)
                   for name, fallback in (official or self.official_sampling).items()}
        check_non_negative("guidance_scale", options["guidance_scale"])
        check_sampling_args(options["top_k"], options["top_p"])
        return options

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    @property
    def class_names(self) -> list[str] | None:
        """Human-readable class names saved with the pipeline (None for ImageNet ids)."""
        return self.config.class_names

    def class_ids(self, class_labels):
        """Class names (for a model saved with `class_names`) -> ids; ids pass through unchanged."""
        items = [class_labels] if isinstance(class_labels, str) else class_labels
        if not isinstance(items, (list, tuple)) or not any(isinstance(c, str) for c in items):
            return class_labels
        names = self.class_names or []
        for c in items:
            if isinstance(c, str) and c not in names:
                allowed = f"one of {names} or an id" if names else "integer ids (this model has no class names)"
                raise ValueError(f"unknown class {c!r}; use {allowed} in [0, {self.num_classes})")
        return [names.index(c) if isinstance(c, str) else c for c in items]

    def _class_tensor(self, class_labels, num_images_per_label: int) -> torch.Tensor:
        """Validate labels (ids or names) and repeat each one `num_images_per_label` times -> int64 [B]."""
        labels = check_class_labels(self.class_ids(class_labels), self.num_classes)
        try:
            count = operator.index(num_images_per_label)
        except TypeError:
            count = 0
        if count < 1:
            raise ValueError(f"num_images_per_label must be a positive integer, got {num_images_per_label!r}")
        return labels.repeat_interleave(count).to(self.device)

    @staticmethod
    def _check_output(output_type: str, output_size: int | None = None) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is unknown; use one of {OUTPUT_TYPES}")
        if output_size is not None and not (isinstance(output_size, numbers.Integral) and output_size > 0):
            raise ValueError(f"output_size must be a positive integer (pixels) or None, got {output_size!r}")

    def _finish(self, decoded: torch.Tensor, output_type: str, return_dict: bool, output_size: int | None = None,
                stats: SamplerStats | None = None):
        """The tokenizer's output (`resize_and_clamp`) as `output_type`, with the sampler's statistics."""
        images = images_to_output(resize_and_clamp(decoded, output_size), output_type)
        return SamplingOutput(images=images, stats=stats) if return_dict else (images,)


class VARPipeline(_AutoregressivePipeline):
    """Next-scale (VAR) generation: a MultiScaleVQVAE tokenizer and a VARTransformer."""

    family = "var"
    sampling_family = NEXT_SCALE
    default_sampler_class = NextScaleSampler
    official_sampling = dict(guidance_scale=1.5, top_k=900, top_p=0.96)
    component_classes = {"tokenizer": (MultiScaleVQVAE,), "transformer": (VARTransformer,)}

    @staticmethod
    def check_components(tokenizer, transformer) -> None:
        check_same_schedule(transformer, tokenizer)

    @classmethod
    def from_official(cls, vae, var) -> "VARPipeline":
        """Build from the official `vae_ch160v4096z32.pth` and `var_d{16,20,24,30,36}.pth` files
        (paths or state dicts); depth, shared AdaLN and the scale schedule come from the weights."""
        check_official_files_exist(vae=vae, var=var)
        transformer = VARTransformer.from_official(var)
        tokenizer = MultiScaleVQVAE.from_official(vae, patch_nums=tuple(transformer.config.patch_nums))
        return cls(tokenizer=tokenizer.eval(), transformer=transformer.eval())

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        guidance_scale: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        num_images_per_label: int = 1,
        sampler=None,
        kv_cache: KVCachePolicy | str | None = None,
        progress: bool = True,
        return_dict: bool = True,
        output_size: int | None = None,
    ):
        """Sample one image per label (times `num_images_per_label`); `output_size` resizes them (`resize_and_clamp`).

        guidance_scale is the official VAR `cfg`: the guidance ramps linearly over the scales
        from 1 (pure conditional) to 1 + guidance_scale at the last one. Settings left as None come from
        the model's `sampling_defaults`, else the official ones (cfg 1.5, top-k 900, top-p 0.96). `sampler` /
        `kv_cache`: a next-scale sampler / KV-cache policy or its registry spec (default: the pipeline's).
        Returns a SamplingOutput (images, stats)."""
        self._check_output(output_type, output_size)
        options = self.sampling_options(guidance_scale, top_k, top_p)
        sampler = self.resolve(sampler, SAMPLER) or self.sampler
        kv_cache = self.policy_for_call(kv_cache)
        labels = self._class_tensor(class_labels, num_images_per_label)
        with eval_mode(self.tokenizer, self.transformer):
            out = sampler(self.transformer, self.tokenizer, labels, **options, generator=generator, kv_cache=kv_cache,
                          progress=progress)
            # the running latent, not the tokens: `more_smooth` mixes soft embeddings into it
            decoded = self.tokenizer.decode_latent(out.latent, clamp=False)
        return self._finish(decoded, output_type, return_dict, output_size, out.stats)

    @torch.no_grad()
    def inpaint(
        self,
        image,
        mask,
        class_label: int | str | None = None,
        guidance_scale: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        sampler=None,
        output_type: str = "pil",
        progress: bool = True,
        return_dict: bool = True,
        kv_cache: KVCachePolicy | str | None = None,
    ):
        """Zero-shot in/out-painting (class_label None) or class-conditional editing.

        `image`: PIL image(s), a uint8 array [H, W, 3] / [B, H, W, 3] or a float tensor [B, 3, H, W] in [0, 1],
        at the tokenizer's resolution; `mask`: [h, w] or [B, h, w] at the last token-map resolution, 1 = keep
        the image's token, 0 = generate. Settings left as None come from the model's `sampling_defaults`, else
        the official editing demo's (cfg 3, top-k 900, top-p 0.95); `sampler` defaults to that demo's
        `NextScaleSampler(more_smooth=True)` (pass `NextScaleSampler()` for plain token sampling)."""
        self._check_output(output_type)
        sampler = self.resolve(sampler, SAMPLER)
        kv_cache = self.policy_for_call(kv_cache)
        options = self.sampling_options(guidance_scale, top_k, top_p, official=OFFICIAL_INPAINT_SAMPLING)
        if class_label is not None and not isinstance(class_label, (numbers.Integral, str)):
            raise TypeError(f"class_label must be one class id or name (None = in/out-painting), got {class_label!r}")
        images = self._image_tensor(image)
        labels = None if class_label is None else self._class_tensor([class_label], images.shape[0])
        with eval_mode(self.tokenizer, self.transformer):
            out = edit_next_scale(self.transformer, self.tokenizer, images, mask, class_labels=labels, sampler=sampler,
                                  **options, generator=generator, progress=progress, kv_cache=kv_cache)
            images = self.tokenizer.decode_latent(out.latent)  # the running latent, as in __call__
        return self._finish(images, output_type, return_dict, stats=out.stats)

    def _image_tensor(self, image) -> torch.Tensor:
        """PIL image(s), uint8 array [(B,) H, W, 3] or float tensor [(B,) 3, H, W] -> float [B, 3, H, W] on the
        device (the tokenizer checks the values are in [0, 1])."""
        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, list):
            image = np.stack(pil_arrays(image))  # [B, H, W, 3] uint8
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.shape[-1] != 3 or image.ndim not in (3, 4):
                raise ValueError(f"an image array must be uint8 [H, W, 3] or [B, H, W, 3], got {image.dtype} "
                                 f"{list(image.shape)}")
            image = torch.from_numpy(image.reshape(-1, *image.shape[-3:])).permute(0, 3, 1, 2) / 255.0
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            raise ValueError(f"image must be PIL, a uint8 array or a float tensor [(B,) 3, H, W], got {type(image)}"
                             f"{f' {image.dtype}' if isinstance(image, torch.Tensor) else ''}")
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"a float image tensor must be [3, H, W] or [B, 3, H, W] (channels first), got shape "
                             f"{tuple(image.shape)}")
        return (image[None] if image.ndim == 3 else image).to(self.device, torch.float32)


class GPTPipeline(_AutoregressivePipeline):
    """Next-token (LlamaGen) generation: a single-scale tokenizer and a GPTTransformer."""

    family = "llamagen"
    sampling_family = NEXT_TOKEN
    default_sampler_class = NextTokenSampler
    official_sampling = dict(guidance_scale=2.0, top_k=0, top_p=1.0)
    component_classes = {"tokenizer": (VQModel, MultiScaleVQVAE), "transformer": (GPTTransformer,)}

    @staticmethod
    def check_components(tokenizer, transformer) -> None:
        """Same vocabulary; a tokenizer with a fixed token grid (a single-scale MultiScaleVQVAE) must have the
        transformer's grid."""
        if tokenizer.vocab_size != transformer.config.vocab_size:
            raise ValueError(f"transformer vocab_size {transformer.config.vocab_size} differs from tokenizer "
                             f"vocab_size {tokenizer.vocab_size}; use the tokenizer the transformer was trained with")
        patch_nums = tuple(getattr(tokenizer, "patch_nums", ()))
        grid = transformer.config.grid_size
        if patch_nums and patch_nums != (grid,):
            raise ValueError(f"the tokenizer's token maps are {patch_nums} a side, the transformer's grid is {grid}; "
                             f"a next-token model needs a single-scale tokenizer with patch_nums ({grid},)")

    @classmethod
    def from_official(cls, vq, gpt, model: str = "GPT-B", image_size: int = 256) -> "GPTPipeline":
        """Build from the official `vq_ds16_c2i.pt` and `c2i_*.pt` files (paths or state dicts).

        The grid size is not visible in the weights: give `image_size` (256 or 384) to match the
        file (`c2i_B_256.pt` -> 256); a file name that disagrees is an error."""
        check_official_files_exist(vq=vq, gpt=gpt)
        tokenizer = VQModel.from_official(vq)
        if tokenizer.downsample_factor != TOKENIZER_DOWNSAMPLE:
            raise ValueError(f"the VQ downsamples by {tokenizer.downsample_factor}; the c2i GPTs were trained on "
                             f"VQ-{TOKENIZER_DOWNSAMPLE} tokens (vq_ds16_c2i.pt)")
        transformer = GPTTransformer.from_official(gpt, model=model, image_size=image_size)
        return cls(tokenizer=tokenizer.eval(), transformer=transformer.eval())

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        guidance_scale: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        num_images_per_label: int = 1,
        sampler=None,
        kv_cache=None,
        progress: bool = True,
        return_dict: bool = True,
        output_size: int | None = None,
    ):
        """Sample one image per label (times `num_images_per_label`); `output_size` resizes them (`resize_and_clamp`).

        guidance_scale is LlamaGen's `cfg_scale`: logits = u + s (c - u); s <= 1 turns CFG off. Settings
        left as None come from the model's `sampling_defaults`, else cfg 2.0, no top-k, no top-p. `sampler`: a
        next-token sampler or its registry spec, e.g. "sjd:window=16" (default: the pipeline's); next-token models
        keep a static cache, so `kv_cache` must stay None. Returns a SamplingOutput (images, stats)."""
        self._check_output(output_type, output_size)
        options = self.sampling_options(guidance_scale, top_k, top_p)
        self.policy_for_call(kv_cache)
        sampler = self.resolve(sampler, SAMPLER) or self.sampler
        labels = self._class_tensor(class_labels, num_images_per_label)
        grid = self.transformer.config.grid_size
        with eval_mode(self.tokenizer, self.transformer):
            out = sampler(self.transformer, labels, **options, generator=generator, progress=progress,
                          tokenizer=self.tokenizer)
            decoded = self.tokenizer.decode(out.tokens.view(-1, grid, grid), clamp=False)
        return self._finish(decoded, output_type, return_dict, output_size, out.stats)

    def policy_for_call(self, kv_cache):
        """None: next-token models keep a static cache; a KV-cache policy is refused."""
        if kv_cache is not None:
            raise ValueError("kv_cache policies apply to next-scale models; GPTPipeline uses a static cache")


PIPELINES = {"VARPipeline": VARPipeline, "GPTPipeline": GPTPipeline}
PIPELINE_INDEX = DiffusionPipeline.config_name  # model_index.json, the file every pipeline folder has
SAVED_SETTINGS = ("class_names", "sampling_defaults", "sampler", "kv_cache", "kv_calibration")  # model_index.json


COMPONENT_CLASSES = {name: tuple(dict.fromkeys(c for cls in PIPELINES.values() for c in cls.component_classes[name]))
                     for name in ("tokenizer", "transformer")}  # the classes each component may be, in any pipeline
FILE_READING_OPTIONS = ("low_cpu_mem_usage", "use_safetensors", "disable_mmap")  # how diffusers reads files


class SavedComponent(ModelMixin):
    """Never made: the class that diffusers' generic loader is given for each component of a vartk folder
    (`_AutoregressivePipeline.extract_init_dict`). Its `from_pretrained` loads the component strictly
    (`load_saved_model`), where ModelMixin's would fill a missing weight with random values and drop an unknown
    config field with a warning; the pipeline then checks that the component is of its class."""

    @classmethod
    def from_pretrained(cls, component_folder, torch_dtype: torch.dtype | None = None, **options):
        """diffusers passes `<pipeline folder>/<component>` (the pipeline folder when that is missing) and its
        loading options: torch_dtype casts the transformer only (`with_transformer_dtype`); options that place or
        quantize weights are refused (move the pipeline with .to(device) instead)."""
        placing = sorted(name for name, value in options.items() if value and name not in FILE_READING_OPTIONS)
        if placing:
            raise TypeError(f"a vartk pipeline loads with torch_dtype only, got {placing}; move it with .to(device)")
        folder = Path(component_folder)
        if folder.name not in COMPONENT_CLASSES:
            raise CheckpointError(f"{folder} lacks a component folder: a vartk pipeline folder holds "
                                  f"{sorted(COMPONENT_CLASSES)}")
        model = load_saved_model(folder, COMPONENT_CLASSES[folder.name])
        return model.to(torch_dtype) if torch_dtype is not None and folder.name == "transformer" else model


def load_folder(folder: Path) -> _AutoregressivePipeline:
    """The pipeline save_pretrained wrote into `folder`, each component loaded strictly (`load_saved_model`); one
    CheckpointError names the file and what is wrong with it. `_class_name` is [PIPELINE_MODULE, name], or the bare
    name in folders written before vartk saved the module file."""
    index_file = folder / PIPELINE_INDEX
    index = read_json_object(index_file)
    class_name = index.get("_class_name")
    if isinstance(class_name, list) and len(class_name) == 2 and class_name[0] == PIPELINE_MODULE:
        class_name = class_name[1]
    cls = PIPELINES.get(class_name) if isinstance(class_name, str) else None
    if cls is None:
        raise CheckpointError(f"{index_file} has _class_name {index.get('_class_name')!r}; a vartk folder holds one "
                              f"of {sorted(PIPELINES)}, alone or as [{PIPELINE_MODULE!r}, name]")
    components = {name: load_saved_model(folder / name, classes) for name, classes in cls.component_classes.items()}
    try:
        return cls(**components, **{name: index.get(name) for name in SAVED_SETTINGS})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder} does not make a {class_name}: {err}") from None


def with_transformer_dtype(pipe: _AutoregressivePipeline, torch_dtype: torch.dtype | None):
    """`pipe` with its transformer cast to `torch_dtype` (None: as it is). The tokenizer stays in float32, as the
    official samplers keep their VAE / VQ: codes and decoded images are not rounded to bfloat16."""
    if torch_dtype is not None:
        pipe.transformer.to(torch_dtype)
    return pipe
