"""Gradio demo: pick a model and a class, get a grid of samples. Runs offline on CPU with the built-in models.

    vartk demo                      # the shipped emoji models
    vartk demo --model path/to/folder --model var-d16 --port 7860
"""
from __future__ import annotations

import argparse
import math
import numbers
import os

import torch

from .samplers import KV_CACHE, SAMPLER, registry
from .samplers.contract import format_bytes


class DemoBackend:
    """Loads pipelines once and turns the UI's values into images."""

    def __init__(self, model_names: list[str], device: str):
        from .loading import load

        self.pipes = {name: load(name, device=device) for name in model_names}
        self.device = device

    def class_choices(self, model_name: str) -> list[str]:
        pipe = self.pipes[model_name]
        names = getattr(pipe, "class_names", None)
        return list(names) if names else [str(i) for i in range(pipe.num_classes)]

    def sampling_sliders(self, model_name: str) -> tuple[float, int, float]:
        """(guidance scale, top-k, top-p) the model samples with by default."""
        options = self.pipes[model_name].sampling_options()
        return options["guidance_scale"], options["top_k"], options["top_p"]

    def sampler_choices(self, model_name: str) -> list[str]:
        """The registered samplers of the model's family (GSD is lossy, as its name in the list says)."""
        family = self.pipes[model_name].sampling_family
        return [e.name for e in registry.entries(SAMPLER, family)]

    def kv_cache_choices(self, model_name: str) -> list[str]:
        """The registered KV-cache policies of the model's family (none for next-token models)."""
        family = self.pipes[model_name].sampling_family
        return [e.name for e in registry.entries(KV_CACHE, family)]

    def generate(self, model_name: str, class_choice: str, count: int, guidance_scale: float, top_k: int,
                 top_p: float, seed: int, sampler: str | None = None, kv_cache: str | None = None):
        """(images, what the call cost as a line of text) for the UI's values; an empty seed box means 0, any
        integer is taken modulo 2^63; sampler / kv_cache are registry specs ("sjd:window=16"), empty = the
        model's own. A bad value raises one ValueError naming the field and what it allows (the UI shows it)."""
        if model_name not in self.pipes:
            raise ValueError(f"unknown model {model_name!r}; choose one of {list(self.pipes)}")
        choices = self.class_choices(model_name)
        if class_choice not in choices:
            raise ValueError(f"unknown class {class_choice!r}; choose one of {choices[:20]}"
                             + (f" (+{len(choices) - 20} more)" if len(choices) > 20 else ""))
        seed = 0 if seed is None or seed == "" else ui_number("seed", seed, "a whole number", integer=True,
                                                              minimum=-math.inf)
        generator = torch.Generator(device=self.device).manual_seed(seed % 2**63)
        out = self.pipes[model_name](
            class_labels=[choices.index(class_choice)],
            num_images_per_label=ui_number("images", count, "a whole number >= 1", integer=True, minimum=1),
            guidance_scale=ui_number("guidance scale", guidance_scale, "a number >= 0"),
            top_k=ui_number("top-k", top_k, "a whole number >= 0 (0 = off)", integer=True),
            top_p=ui_number("top-p", top_p, "a number in (0, 1]"),
            sampler=sampler or None, kv_cache=kv_cache or None,
            generator=generator, output_type="pil", progress=False,
        )
        return out.images, cost_line(out.stats)


def cost_line(stats) -> str:
    """What a call cost, for the UI: seconds, transformer forwards per image, tokens per forward, KV-cache bytes."""
    return (f"{stats.seconds:.2f} s, {stats.row_forwards.double().mean():.1f} transformer forwards per image "
            f"({stats.tokens_per_forward.mean():.2f} tokens per forward), KV cache {format_bytes(stats.kv_bytes)}")


def ui_number(field: str, value, allowed: str, integer: bool = False, minimum: float = 0) -> int | float:
    """A value from the UI as a finite number >= minimum (a whole one when `integer`: Gradio sends 4.0 for 4);
    else one ValueError naming the field and what it allows."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        finite = isinstance(value, numbers.Integral) or math.isfinite(value)  # a huge int is no float
        whole = isinstance(value, numbers.Integral) or finite and float(value).is_integer()
        if (whole if integer else finite) and value >= minimum:
            return int(value) if integer else float(value)
    raise ValueError(f"{field} must be {allowed}, got {value!r}")


def build_demo(backend: DemoBackend):
    import gradio as gr

    names = list(backend.pipes)
    with gr.Blocks(title="vartk") as demo:
        gr.Markdown("# vartk: visual autoregressive generation\nNext-scale (VAR) and next-token (LlamaGen) samplers.")
        with gr.Row():
            model = gr.Dropdown(names, value=names[0], label="model")
            label = gr.Dropdown(backend.class_choices(names[0]), value=backend.class_choices(names[0])[0], label="class")
        with gr.Row():
            count = gr.Slider(1, 16, value=4, step=1, label="images")
            initial_cfg, initial_top_k, initial_top_p = backend.sampling_sliders(names[0])
            cfg = gr.Slider(0.0, 8.0, value=initial_cfg, step=0.05, label="guidance scale")
            top_k = gr.Slider(0, 4096, value=initial_top_k, step=1, label="top-k (0 = off)")
            top_p = gr.Slider(0.05, 1.0, value=initial_top_p, step=0.01, label="top-p")
            seed = gr.Number(value=0, precision=0, label="seed")
        with gr.Row():
            sampler = gr.Dropdown(backend.sampler_choices(names[0]), value=None, allow_custom_value=True,
                                  label="sampler (empty: the model's own; a spec such as sjd:window=16 works too)")
            kv_cache = gr.Dropdown(backend.kv_cache_choices(names[0]), value=None, allow_custom_value=True,
                                   label="KV cache (next-scale; empty: full; e.g. scalekv:budget=0.1)")
        run = gr.Button("Generate", variant="primary")
        gallery = gr.Gallery(label="samples", columns=4)
        cost = gr.Markdown()
        model.change(lambda m: (gr.Dropdown(choices=backend.class_choices(m), value=backend.class_choices(m)[0]),
                                *backend.sampling_sliders(m),
                                gr.Dropdown(choices=backend.sampler_choices(m), value=None),
                                gr.Dropdown(choices=backend.kv_cache_choices(m), value=None)),
                     model, [label, cfg, top_k, top_p, sampler, kv_cache])

        def generate(*values):
            try:
                return backend.generate(*values)
            except ValueError as err:  # a bad setting: shown in the UI, not as a bare "Error"
                raise gr.Error(str(err))

        run.click(generate, [model, label, count, cfg, top_k, top_p, seed, sampler, kv_cache], [gallery, cost],
                  api_name="generate")
    return demo


def main(argv: list[str] | None = None) -> None:
    from .arguments import DEFAULT_DEVICE, int_in_range, parse_device

    parser = argparse.ArgumentParser(prog="vartk demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, help="repeatable; default: the built-in models")
    parser.add_argument("--device", type=parse_device, default=DEFAULT_DEVICE)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int_in_range(1, 65535), default=7860, help="TCP port, 1-65535")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    backend = DemoBackend(args.model or ["default", "default-gpt"], args.device)
    build_demo(backend).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
