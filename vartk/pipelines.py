"""diffusers pipelines tying a tokenizer, a transformer and a sampler together.

    pipe = VARPipeline.from_official(vae="vae_ch160v4096z32.pth", var="var_d16.pth")
    out = pipe(class_labels=[207, 360], guidance_scale=1.5, top_k=900, top_p=0.96,
               generator=torch.Generator().manual_seed(0))
    out.images  # list of PIL images

Both pipelines have the components `tokenizer` and `transformer`; sampling strategies and KV-cache
policies are objects passed to `__call__`.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from .images import to_rgb
from .models.attention import KVCachePolicy
from .models.gpt import GPTTransformer
from .models.var import VARTransformer
from .samplers.next_scale import NextScaleSampler, edit_next_scale
from .samplers.next_token import NextTokenSampler
from .samplers.sampling import check_class_labels, check_non_negative
from .tokenizers.msvq import MultiScaleVQVAE
from .tokenizers.vq import VQModel

OUTPUT_TYPES = ("pil", "np", "pt")


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Run a block with `modules` in eval mode (no dropout), restoring their modes afterwards."""
    was_training = [m.training for m in modules]
    try:
        yield [m.eval() for m in modules]
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], rounding (what every PNG vartk writes holds)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _images_to_output(images: torch.Tensor, output_type: str):
    """[B, 3, H, W] float in [0, 1] -> the requested output type."""
    if output_type == "pt":
        return images
    array = images_to_uint8(images)  # [B, H, W, 3]
    if output_type == "np":
        return array
    return [Image.fromarray(a) for a in array]


class _AutoregressivePipeline(DiffusionPipeline):
    """What both pipelines share: argument checks, label expansion, output conversion."""

    family: str = ""
    official_sampling: dict = {}  # the family's published sampling settings, used when nothing else is given

    def __init__(self, tokenizer, transformer, class_names: list[str] | None = None,
                 sampling_defaults: dict | None = None):
        super().__init__()
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

    def sampling_options(self, guidance_scale=None, top_k=None, top_p=None) -> dict:
        """The given settings; each one left as None comes from the model's saved `sampling_defaults`,
        else from the family's official settings."""
        saved = self.config.sampling_defaults or {}
        given = dict(guidance_scale=guidance_scale, top_k=top_k, top_p=top_p)
        options = {name: given[name] if given[name] is not None else saved.get(name, official)
                   for name, official in self.official_sampling.items()}
        self._check_guidance(options["guidance_scale"])
        return options

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    @property
    def class_names(self) -> list[str] | None:
        """Human-readable class names saved with the pipeline (None for ImageNet ids)."""
        return self.config.class_names

    def _class_tensor(self, class_labels, num_images_per_label: int) -> torch.Tensor:
        """Validate labels and repeat each one `num_images_per_label` times -> int64 [B]."""
        labels = check_class_labels(class_labels, self.num_classes)
        if not isinstance(num_images_per_label, int) or num_images_per_label < 1:
            raise ValueError(f"num_images_per_label must be a positive integer, got {num_images_per_label!r}")
        return labels.repeat_interleave(num_images_per_label).to(self.device)

    @staticmethod
    def _check_output_type(output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is unknown; use one of {OUTPUT_TYPES}")

    @staticmethod
    def _check_guidance(guidance_scale: float) -> None:
        check_non_negative("guidance_scale", guidance_scale)

    def _finish(self, images: torch.Tensor, output_type: str, return_dict: bool):
        images = _images_to_output(images, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class VARPipeline(_AutoregressivePipeline):
    """Next-scale (VAR) generation: a MultiScaleVQVAE tokenizer and a VARTransformer."""

    family = "var"
    official_sampling = dict(guidance_scale=1.5, top_k=900, top_p=0.96)

    @classmethod
    def from_official(cls, vae, var) -> "VARPipeline":
        """Build from the official `vae_ch160v4096z32.pth` and `var_d{16,20,24,30,36}.pth` files
        (paths or state dicts); depth, shared AdaLN and the scale schedule come from the weights."""
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
        sampler: NextScaleSampler | None = None,
        kv_cache: KVCachePolicy | None = None,
        progress: bool = True,
        return_dict: bool = True,
    ):
        """Sample one image per label (times `num_images_per_label`).

        guidance_scale is the official VAR `cfg`: the guidance ramps linearly over the scales
        from 1 (pure conditional) to 1 + guidance_scale at the last one. Settings left as None come from
        the model's `sampling_defaults`, else the official ones (cfg 1.5, top-k 900, top-p 0.96)."""
        self._check_output_type(output_type)
        options = self.sampling_options(guidance_scale, top_k, top_p)
        labels = self._class_tensor(class_labels, num_images_per_label)
        sampler = sampler or NextScaleSampler()
        with eval_mode(self.tokenizer, self.transformer):
            _, latent = sampler(
                self.transformer, self.tokenizer, labels, **options, generator=generator, kv_cache=kv_cache,
                progress=progress, return_latent=True,
            )  # the running latent, not the tokens: `more_smooth` mixes soft embeddings into it
            images = self.tokenizer.decode_latent(latent)
        return self._finish(images, output_type, return_dict)

    @torch.no_grad()
    def inpaint(
        self,
        image,
        mask,
        class_label: int | None = None,
        guidance_scale: float = 3.0,
        top_k: int = 900,
        top_p: float = 0.95,
        generator: torch.Generator | None = None,
        sampler: NextScaleSampler | None = None,
        output_type: str = "pil",
        progress: bool = True,
        return_dict: bool = True,
    ):
        """Zero-shot in/out-painting (class_label None) or class-conditional editing.

        `image`: PIL image or [B, 3, H, W] tensor in [0, 1] at the tokenizer's resolution;
        `mask`: [h, w] or [B, h, w] at the last token-map resolution, 1 = keep the image's
        token, 0 = generate. `sampler`: e.g. `NextScaleSampler(more_smooth=True)`, as the official demo."""
        self._check_output_type(output_type)
        self._check_guidance(guidance_scale)
        images = self._image_tensor(image)
        labels = None if class_label is None else self._class_tensor([class_label], images.shape[0])
        with eval_mode(self.tokenizer, self.transformer):
            _, latent = edit_next_scale(
                self.transformer, self.tokenizer, images, mask, class_labels=labels, sampler=sampler,
                guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, generator=generator, progress=progress,
                return_latent=True,
            )  # the running latent, as in __call__
            images = self.tokenizer.decode_latent(latent)
        return self._finish(images, output_type, return_dict)

    def _image_tensor(self, image) -> torch.Tensor:
        """PIL image, list of PIL images or [B, 3, H, W] tensor -> float [B, 3, H, W] on the device."""
        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, list):
            arrays = [np.asarray(to_rgb(im), dtype=np.float32) / 255.0 for im in image]
            image = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, H, W]
        if image.ndim == 3:
            image = image[None]
        return image.to(self.device, torch.float32)


class GPTPipeline(_AutoregressivePipeline):
    """Next-token (LlamaGen) generation: a single-scale tokenizer and a GPTTransformer."""

    family = "llamagen"
    official_sampling = dict(guidance_scale=2.0, top_k=0, top_p=1.0)

    @classmethod
    def from_official(cls, vq, gpt, model: str = "GPT-B", image_size: int = 256) -> "GPTPipeline":
        """Build from the official `vq_ds16_c2i.pt` and `c2i_*.pt` files (paths or state dicts).

        The grid size is not visible in the weights: give `image_size` (256 or 384) to match the
        file (`c2i_B_256.pt` -> 256); a file name that disagrees is an error."""
        tokenizer = VQModel.from_official(vq)
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
        sampler: NextTokenSampler | None = None,
        kv_cache: KVCachePolicy | None = None,
        progress: bool = True,
        return_dict: bool = True,
    ):
        """Sample one image per label (times `num_images_per_label`).

        guidance_scale is LlamaGen's `cfg_scale`: logits = u + s (c - u); s <= 1 turns CFG off. Settings
        left as None come from the model's `sampling_defaults`, else cfg 2.0, no top-k, no top-p."""
        self._check_output_type(output_type)
        options = self.sampling_options(guidance_scale, top_k, top_p)
        if kv_cache is not None:
            raise ValueError("kv_cache policies apply to next-scale models; GPTPipeline uses a static cache")
        labels = self._class_tensor(class_labels, num_images_per_label)
        sampler = sampler or NextTokenSampler()
        grid = self.transformer.config.grid_size
        with eval_mode(self.tokenizer, self.transformer):
            tokens = sampler(self.transformer, labels, **options, generator=generator, progress=progress)  # [B, N]
            images = self.tokenizer.decode(tokens.view(-1, grid, grid))
        return self._finish(images, output_type, return_dict)


PIPELINES = {"VARPipeline": VARPipeline, "GPTPipeline": GPTPipeline}
ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODELS = {"default": ASSETS / "default", "default-gpt": ASSETS / "default-gpt"}


def load(name: str = "default", device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None):
    """Load a pipeline by name or folder.

    - "default" / "default-gpt": the small emoji models shipped in the package (offline);
    - a folder written by `save_pretrained`;
    - an official model name ("var-d16" ... "var-d36", "llamagen-b" ... "llamagen-3b"), resolved
      from $VARTK_HOME / the Hugging Face cache or downloaded.
    """
    from .checkpoints import KNOWN_MODELS, resolve_official_file

    folder = BUILTIN_MODELS.get(name, Path(name))
    if name in KNOWN_MODELS:
        known = KNOWN_MODELS[name]
        files = {role: resolve_official_file(name, file_name) for role, file_name in known.files.items()}
        if known.family == "var":
            pipe = VARPipeline.from_official(vae=files["vae"], var=files["var"])
        else:
            pipe = GPTPipeline.from_official(vq=files["vq"], gpt=files["gpt"], **known.options)
    elif (folder / "model_index.json").is_file():
        class_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
        if class_name not in PIPELINES:
            raise ValueError(f"{folder} holds a {class_name!r}, not a vartk pipeline ({sorted(PIPELINES)})")
        pipe = PIPELINES[class_name].from_pretrained(folder, low_cpu_mem_usage=False)
    elif name in BUILTIN_MODELS:
        raise FileNotFoundError(f"the built-in model {name!r} is missing from {folder}; reinstall vartk")
    else:
        raise FileNotFoundError(
            f"{name!r} is neither a folder written by save_pretrained (no model_index.json there), a built-in model "
            f"({sorted(BUILTIN_MODELS)}) nor an official model name ({sorted(KNOWN_MODELS)})"
        )
    return pipe.to(device, torch_dtype) if torch_dtype is not None else pipe.to(device)
