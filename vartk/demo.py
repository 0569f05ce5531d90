"""Gradio workbench: sample, edit and compare with any loaded model. Runs offline on CPU with the built-in models.

Tabs: Sample (class, count, seed, settings, sampler and KV-cache policy -> images and what the call cost), Edit (an
uploaded or sampled image, a painted region -> inpainting, outpainting or class editing; next-scale models) and
Compare (one seed under two samplers or KV-cache policies -> both images, both costs and the PSNR between them).

    vartk demo                      # the shipped emoji models, on http://127.0.0.1:7860
    vartk demo --model path/to/folder --model var-d16 --port 7861
"""
import argparse
import functools
import math
import numbers
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .images import to_rgb
from .metrics import psnr
from .samplers import KV_CACHE, SAMPLER, registry
from .samplers.contract import format_bytes
from .samplers.registry import NEXT_SCALE, NEXT_TOKEN

MAX_IMAGES = 16  # images per Sample call
MAX_GUIDANCE = 10.0  # the guidance slider's end
EDIT_MODES = ("inpaint", "outpaint", "class edit")
EDITOR_PIXELS = 256  # the painting canvas's side; images are fitted into it, and back to the model's size
IMAGE_HEIGHT = 320  # pixels of page an edited or compared image takes
# Compare's first pair: the full cache against ScaleKV (next-scale), plain against speculative decoding (next-token)
COMPARE_PAIRS = {NEXT_SCALE: (("nextscale", "full"), ("nextscale", "scalekv:budget=0.1")),
                 NEXT_TOKEN: (("nexttoken", None), ("sjd:window=16", None))}
# small images shown large, and sharp
CSS = ".pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


class DemoBackend:
    """Loads pipelines once and turns the UI's values into images and text; the UI only wires these methods."""

    def __init__(self, model_names: list[str], device: str):
        from .loading import load

        self.pipes = {name: load(name, device=device) for name in model_names}
        self.device = device

    def class_choices(self, model_name: str) -> list[str]:
        pipe = self.pipes[model_name]
        names = getattr(pipe, "class_names", None)
        return list(names) if names else [str(i) for i in range(pipe.num_classes)]

    def sampling_sliders(self, model_name: str, editing: bool = False) -> tuple[float, int, float]:
        """(guidance scale, top-k, top-p) the model samples (or, `editing`, inpaints) with by default."""
        from .pipelines import OFFICIAL_INPAINT_SAMPLING

        options = self.pipes[model_name].sampling_options(official=OFFICIAL_INPAINT_SAMPLING if editing else None)
        return options["guidance_scale"], options["top_k"], options["top_p"]

    def vocab_size(self, model_name: str) -> int:
        """The model's number of codes: the largest top-k that means anything."""
        return self.pipes[model_name].transformer.config.vocab_size

    def sampler_choices(self, model_name: str) -> list[str]:
        """The registered samplers of the model's family (GSD is lossy, as its name in the list says)."""
        family = self.pipes[model_name].sampling_family
        return [e.name for e in registry.entries(SAMPLER, family)]

    def kv_cache_choices(self, model_name: str) -> list[str]:
        """The registered KV-cache policies of the model's family (none for next-token models)."""
        family = self.pipes[model_name].sampling_family
        return [e.name for e in registry.entries(KV_CACHE, family)]

    def editable_models(self) -> list[str]:
        """The loaded models that can edit images (next-scale ones)."""
        return [name for name, pipe in self.pipes.items() if pipe.sampling_family == NEXT_SCALE]

    def compare_pair(self, model_name: str) -> tuple[tuple[str | None, str | None], tuple[str | None, str | None]]:
        """The (sampler, KV cache) pairs Compare starts with for this model's family."""
        return COMPARE_PAIRS[self.pipes[model_name].sampling_family]

    def generate(self, model_name: str, class_choice: str, count: int, guidance_scale: float, top_k: int,
                 top_p: float, seed: int, sampler: str | None = None, kv_cache: str | None = None):
        """(images, what the call cost as a line of text) for the UI's values; an empty seed box means 0, any
        integer is taken modulo 2^63; sampler / kv_cache are registry specs ("sjd:window=16"), empty = the
        model's own. A bad value raises one ValueError naming the field and what it allows (the UI shows it)."""
        label = self.class_id(model_name, class_choice)
        count = at_most("images", ui_number("images", count, "a whole number >= 1", integer=True, minimum=1),
                        MAX_IMAGES, "the demo's cap; `vartk sample --n` makes more")
        out = self.pipes[model_name](
            class_labels=[label], num_images_per_label=count,
            **self.sampling_values(model_name, guidance_scale, top_k, top_p, seed),
            sampler=sampler or None, kv_cache=kv_cache or None, output_type="pil", progress=False,
        )
        return out.images, cost_line(out.stats)

    def edit(self, model_name: str, image, painted, mode: str, class_choice: str | None, guidance_scale: float,
             top_k: int, top_p: float, seed: int):
        """(the edited image, what was regenerated and what it cost as text). `image`: PIL or uint8 array of any
        size, fitted into the model's square resolution (padded with white); `painted`: [H, W] of the image's size,
        nonzero where the user painted. inpaint regenerates the painted tokens (a token is painted when any of its
        pixels is), outpaint keeps them and regenerates the rest, class edit regenerates them as `class_choice`."""
        self.check_editable(model_name)
        if mode not in EDIT_MODES:
            raise ValueError(f"edit mode {mode!r} is unknown; choose one of {list(EDIT_MODES)}")
        if image is None:
            raise ValueError("no image to edit: upload one, or send one from the Sample tab")
        pipe = self.pipes[model_name]
        tokens = pipe.tokenizer.latent_size
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        painted_tokens = token_mask(np.asarray(painted), (image.height, image.width), tokens)
        if not painted_tokens.any():
            raise ValueError("nothing is painted: paint the region to regenerate (inpaint, class edit) or to keep "
                             "(outpaint)")
        keep = painted_tokens if mode == "outpaint" else 1 - painted_tokens
        label = self.class_id(model_name, class_choice) if mode == "class edit" else None
        out = pipe.inpaint(fit_square(to_rgb(image), tokens * pipe.tokenizer.downsample_factor), keep,
                           class_label=label, **self.sampling_values(model_name, guidance_scale, top_k, top_p, seed),
                           output_type="pil", progress=False)
        regenerated = int((1 - keep).sum())
        return out.images[0], f"{mode}: regenerated {regenerated} of {tokens * tokens} tokens; {cost_line(out.stats)}"

    def compare(self, model_name: str, class_choice: str, guidance_scale: float, top_k: int, top_p: float, seed: int,
                sampler_a: str | None, kv_cache_a: str | None, sampler_b: str | None, kv_cache_b: str | None):
        """One image of the class with the same seed and settings under (sampler_a, kv_cache_a) and (sampler_b,
        kv_cache_b): (image A, image B, cost A, cost B, the PSNR between the two images as text)."""
        settings = (model_name, class_choice, 1, guidance_scale, top_k, top_p, seed)
        (image_a,), cost_a = self.generate(*settings, sampler_a, kv_cache_a)
        (image_b,), cost_b = self.generate(*settings, sampler_b, kv_cache_b)
        return image_a, image_b, cost_a, cost_b, psnr_line(np.asarray(image_a), np.asarray(image_b))

    def class_id(self, model_name: str, class_choice: str) -> int:
        if model_name not in self.pipes:
            raise ValueError(f"unknown model {model_name!r}; choose one of {list(self.pipes)}")
        choices = self.class_choices(model_name)
        if class_choice not in choices:
            raise ValueError(f"unknown class {class_choice!r}; choose one of {choices[:20]}"
                             + (f" (+{len(choices) - 20} more)" if len(choices) > 20 else ""))
        return choices.index(class_choice)

    def check_editable(self, model_name: str) -> None:
        editable = self.editable_models()
        if model_name not in editable:
            raise ValueError(f"model {model_name!r} cannot edit images (next-scale models can); choose one of "
                             f"{editable}")

    def sampling_values(self, model_name: str, guidance_scale, top_k, top_p, seed) -> dict:
        """The UI's settings as pipeline arguments: guidance_scale, top_k (at most the vocabulary), top_p and a
        generator seeded with `seed` (empty: 0; any integer, taken modulo 2^63)."""
        top_k = ui_number("top-k", top_k, "a whole number >= 0 (0 = off)", integer=True)
        seed = 0 if seed is None or seed == "" else ui_number("seed", seed, "a whole number", integer=True,
                                                              minimum=-math.inf)
        return dict(guidance_scale=ui_number("guidance scale", guidance_scale, "a number >= 0"),
                    top_k=at_most("top-k", top_k, self.vocab_size(model_name), "the model's vocabulary size; 0 = off"),
                    top_p=ui_number("top-p", top_p, "a number in (0, 1]"),
                    generator=torch.Generator(device=self.device).manual_seed(seed % 2**63))


def cost_line(stats) -> str:
    """What a call cost, for the UI: seconds, transformer forwards per image, tokens per forward, KV-cache bytes."""
    return (f"{stats.seconds:.2f} s, {stats.row_forwards.double().mean():.1f} transformer forwards per image "
            f"({stats.tokens_per_forward.mean():.2f} tokens per forward), KV cache {format_bytes(stats.kv_bytes)}")


def psnr_line(image_a: np.ndarray, image_b: np.ndarray) -> str:
    """The PSNR between two uint8 images as text ("identical" when they are)."""
    value = psnr(image_a, image_b)
    return "A and B are identical (PSNR inf)" if math.isinf(value) else f"PSNR between A and B: {value:.2f} dB"


def fit_square(image: Image.Image, size: int, resample=Image.Resampling.BOX, fill="white") -> Image.Image:
    """`image` scaled to fit a size x size square, centred, the rest filled with `fill`."""
    return ImageOps.pad(image, (size, size), method=resample, color=fill)


def token_mask(painted: np.ndarray, image_size: tuple[int, int], tokens: int) -> torch.Tensor:
    """A painted [H, W] array (nonzero = painted) of an image of `image_size` (H, W) -> [tokens, tokens] float,
    1 on each token any painted pixel falls in, once the image is fitted into a square as `fit_square` does."""
    if painted.shape != image_size:
        raise ValueError(f"the painted mask is {list(painted.shape)} but the image is {list(image_size)} (H, W); "
                         "paint on the image itself")
    side = max(image_size)
    square = fit_square(Image.fromarray((painted != 0).astype(np.uint8) * 255), side, Image.Resampling.NEAREST, 0)
    pixels = torch.from_numpy(np.asarray(square) / 255.0)[None, None]  # [1, 1, side, side]
    return F.adaptive_max_pool2d(pixels, tokens)[0, 0].float()


def ui_number(field: str, value, allowed: str, integer: bool = False, minimum: float = 0) -> int | float:
    """A value from the UI as a finite number >= minimum (a whole one when `integer`: Gradio sends 4.0 for 4);
    else one ValueError naming the field and what it allows."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        finite = isinstance(value, numbers.Integral) or math.isfinite(value)  # a huge int is no float
        whole = isinstance(value, numbers.Integral) or finite and float(value).is_integer()
        if (whole if integer else finite) and value >= minimum:
            return int(value) if integer else float(value)
    raise ValueError(f"{field} must be {allowed}, got {value!r}")


def at_most(field: str, value: int, maximum: int, why: str) -> int:
    """`value`, unless it exceeds `maximum`: then one ValueError naming the field, the maximum and `why`."""
    if value > maximum:
        raise ValueError(f"{field} must be at most {maximum} ({why}), got {value}")
    return value


# ---------------------------------------------------------------- the page
def shown_in_page(backend: DemoBackend, method: str):
    """The backend's `method` (looked up at each call) for an event: a ValueError becomes a gr.Error, which the
    page shows with its message instead of a bare "Error"."""
    import gradio as gr

    @functools.wraps(getattr(backend, method))
    def call(*values):
        try:
            return getattr(backend, method)(*values)
        except ValueError as err:
            raise gr.Error(str(err)) from err

    return call


def class_dropdown(backend: DemoBackend, model_name: str, **options):
    """The class dropdown for a model (inside a Blocks: the component; returned from an event: its update)."""
    import gradio as gr

    choices = backend.class_choices(model_name)
    return gr.Dropdown(choices, value=choices[0], label="class", **options)


def setting_sliders(backend: DemoBackend, model_name: str, editing: bool = False):
    """Guidance, top-k (up to the model's vocabulary) and top-p sliders at the model's defaults."""
    import gradio as gr

    cfg, top_k, top_p = backend.sampling_sliders(model_name, editing)
    return (gr.Slider(0.0, MAX_GUIDANCE, value=cfg, step=0.05, label="guidance scale"),
            gr.Slider(0, backend.vocab_size(model_name), value=top_k, step=1, label="top-k (0 = off)"),
            gr.Slider(0.05, 1.0, value=top_p, step=0.01, label="top-p"))


def spec_dropdowns(backend: DemoBackend, model_name: str, pair: tuple[str | None, str | None] = (None, None),
                   suffix: str = ""):
    """Sampler and KV-cache dropdowns of the model's family (any spec may be typed), set to `pair`."""
    import gradio as gr

    caches = backend.kv_cache_choices(model_name)
    return (gr.Dropdown(backend.sampler_choices(model_name), value=pair[0], allow_custom_value=True,
                        label=f"sampler{suffix} (empty: the model's own; a spec such as sjd:window=16 works too)"),
            gr.Dropdown(caches, value=pair[1], allow_custom_value=True, interactive=bool(caches),
                        label=f"KV cache{suffix} (next-scale; empty: the model's own; e.g. scalekv:budget=0.1)"))


def sample_tab(backend: DemoBackend, names: list[str], can_edit: bool):
    """The Sample tab; returns (model dropdown, gallery, selected index, the send-to-Edit button)."""
    import gradio as gr

    with gr.Row():
        model = gr.Dropdown(names, value=names[0], label="model")
        label = class_dropdown(backend, names[0])
        count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label=f"images (at most {MAX_IMAGES})")
        seed = gr.Number(value=0, precision=0, label="seed")
    with gr.Row():
        sliders = setting_sliders(backend, names[0])
    with gr.Row():
        specs = spec_dropdowns(backend, names[0])
    run = gr.Button("Generate", variant="primary", elem_id="sample-run")
    gallery = gr.Gallery(label="samples (click one to pick it for editing)", columns=8, type="pil",
                         format="png", elem_id="sample-gallery", elem_classes="pixelated")
    cost = gr.Markdown(elem_id="sample-cost")
    send = gr.Button("Edit the selected sample", visible=can_edit, elem_id="sample-send")
    selected = gr.State(0)

    model.change(lambda m: (class_dropdown(backend, m), *setting_sliders(backend, m), *spec_dropdowns(backend, m)),
                 model, [label, *sliders, *specs], api_visibility="private")
    generate = shown_in_page(backend, "generate")
    run.click(lambda *values: (*generate(*values), 0), [model, label, count, *sliders, seed, *specs],
              [gallery, cost, selected], concurrency_id="model", api_name="generate")

    def pick(event: gr.SelectData) -> int:
        return event.index

    gallery.select(pick, None, selected, api_visibility="private")
    return model, gallery, selected, send


def edit_tab(backend: DemoBackend, names: list[str]):
    """The Edit tab; returns (model dropdown, image editor)."""
    import gradio as gr

    with gr.Row():
        editor = gr.ImageEditor(label="image: paint the region (upload one, or send one from Sample)",
                                sources=("upload", "clipboard"), type="numpy", format="png", transforms=(),
                                layers=False, canvas_size=(EDITOR_PIXELS, EDITOR_PIXELS), fixed_canvas=True,
                                brush=gr.Brush(colors=[("#ff00ff", 0.6)], color_mode="fixed", default_size=24),
                                elem_id="edit-canvas")
        with gr.Column():
            result = gr.Image(label="result", format="png", interactive=False, height=IMAGE_HEIGHT,
                              elem_id="edit-result", elem_classes="pixelated")
            cost = gr.Markdown(elem_id="edit-cost")
    mode = gr.Radio(list(EDIT_MODES), value=EDIT_MODES[0], label="mode",
                    info="inpaint: regenerate the painted region; outpaint: keep the painted region, regenerate the "
                         "rest; class edit: regenerate the painted region as the class")
    with gr.Row():
        model = gr.Dropdown(names, value=names[0], label="model (next-scale)")
        label = class_dropdown(backend, names[0], info="class edit only")
        seed = gr.Number(value=0, precision=0, label="seed")
    with gr.Row():
        sliders = setting_sliders(backend, names[0], editing=True)
    run = gr.Button("Edit", variant="primary", elem_id="edit-run")

    model.change(lambda m: (class_dropdown(backend, m), *setting_sliders(backend, m, editing=True)), model,
                 [label, *sliders], api_visibility="private")
    edit = shown_in_page(backend, "edit")
    run.click(lambda m, value, *rest: edit(m, *editor_image_and_paint(value), *rest),
              [model, editor, mode, label, *sliders, seed], [result, cost], concurrency_id="model", api_name="edit")
    return model, editor


def compare_tab(backend: DemoBackend, names: list[str]):
    import gradio as gr

    pair_a, pair_b = backend.compare_pair(names[0])
    with gr.Row():
        model = gr.Dropdown(names, value=names[0], label="model")
        label = class_dropdown(backend, names[0])
        seed = gr.Number(value=0, precision=0, label="seed (the same for A and B)")
    with gr.Row():
        sliders = setting_sliders(backend, names[0])
    with gr.Row():
        with gr.Column():
            specs_a = spec_dropdowns(backend, names[0], pair_a, " A")
        with gr.Column():
            specs_b = spec_dropdowns(backend, names[0], pair_b, " B")
    run = gr.Button("Compare", variant="primary", elem_id="compare-run")
    with gr.Row():
        with gr.Column():
            image_a = gr.Image(label="A", format="png", interactive=False, height=IMAGE_HEIGHT,
                               elem_id="compare-a",
                               elem_classes="pixelated")
            cost_a = gr.Markdown(elem_id="compare-cost-a")
        with gr.Column():
            image_b = gr.Image(label="B", format="png", interactive=False, height=IMAGE_HEIGHT,
                               elem_id="compare-b",
                               elem_classes="pixelated")
            cost_b = gr.Markdown(elem_id="compare-cost-b")
    difference = gr.Markdown(elem_id="compare-psnr")

    def follow(m):
        pairs = backend.compare_pair(m)
        return (class_dropdown(backend, m), *setting_sliders(backend, m), *spec_dropdowns(backend, m, pairs[0], " A"),
                *spec_dropdowns(backend, m, pairs[1], " B"))

    model.change(follow, model, [label, *sliders, *specs_a, *specs_b], api_visibility="private")
    run.click(shown_in_page(backend, "compare"), [model, label, *sliders, seed, *specs_a, *specs_b],
              [image_a, image_b, cost_a, cost_b, difference], concurrency_id="model", api_name="compare")


def editor_image_and_paint(value) -> tuple[np.ndarray | None, np.ndarray | None]:
    """An ImageEditor value -> (its background image, the painted alpha [H, W]: the largest over its layers)."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"]
    painted = np.zeros(background.shape[:2], np.uint8)  # [H, W]
    for layer in value.get("layers") or []:
        painted = np.maximum(painted, layer[..., 3])
    return background, painted


def build_demo(backend: DemoBackend):
    import gradio as gr

    names, editable = list(backend.pipes), backend.editable_models()
    with gr.Blocks(title="vartk") as demo:
        gr.Markdown("# vartk: visual autoregressive generation\nSample, edit and compare next-scale (VAR) and "
                    "next-token (LlamaGen) models, samplers and KV-cache policies.")
        with gr.Tabs() as tabs:
            with gr.Tab("Sample", id="sample"):
                sample_model, gallery, selected, send = sample_tab(backend, names, can_edit=bool(editable))
            with gr.Tab("Edit", id="edit"):
                if editable:
                    edit_model, editor = edit_tab(backend, editable)
                else:
                    gr.Markdown("Editing needs a next-scale model; none is loaded (e.g. `vartk demo --model default`).")
            with gr.Tab("Compare", id="compare"):
                compare_tab(backend, names)
        if editable:
            def send_to_edit(images, index, model_name):
                """The picked sample, enlarged for painting, into the Edit tab (with its model, if it can edit)."""
                if not images:
                    raise gr.Error("generate samples first, then pick one in the gallery")
                image = fit_square(images[min(index, len(images) - 1)][0], EDITOR_PIXELS, Image.Resampling.NEAREST)
                chosen = model_name if model_name in editable else editable[0]
                return {"background": image, "layers": [], "composite": image}, gr.Tabs(selected="edit"), chosen

            send.click(send_to_edit, [gallery, selected, sample_model], [editor, tabs, edit_model],
                       api_visibility="private")
    return demo


def launch(demo, host: str, port: int, **options):
    """Serve the page on host:port (gradio's `launch`, with the page's style sheet; `options` go to it)."""
    return demo.launch(server_name=host, server_port=port, show_error=True, css=CSS, **options)


def main(argv: list[str] | None = None) -> None:
    from .arguments import DEFAULT_DEVICE, int_in_range, parse_device

    parser = argparse.ArgumentParser(
        prog="vartk demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"The Sample tab makes at most {MAX_IMAGES} images a call; `vartk sample --n` makes more.")
    parser.add_argument("--model", action="append", default=None,
                        help="built-in name, official name (var-d16, llamagen-b) or folder; repeatable "
                             "(default: the built-in models default and default-gpt)")
    parser.add_argument("--device", type=parse_device, default=DEFAULT_DEVICE,
                        help=f"a torch device that exists here (default: {DEFAULT_DEVICE})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=int_in_range(1, 65535), default=7860, help="TCP port, 1-65535 (default: 7860)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    backend = DemoBackend(args.model or ["default", "default-gpt"], args.device)
    launch(build_demo(backend), args.host, args.port)


if __name__ == "__main__":
    main()
