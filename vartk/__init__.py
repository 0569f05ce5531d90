"""vartk: visual autoregressive image generation — VAR (next-scale) and LlamaGen (next-token).

Public API re-exports only (resolved lazily, so `import vartk` stays cheap); see README.md.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GPTPipeline": ".pipelines",
    "VARPipeline": ".pipelines",
    "load": ".pipelines",
    "GPTTransformer": ".models.gpt",
    "VARTransformer": ".models.var",
    "MultiScaleVQVAE": ".tokenizers.msvq",
    "VQModel": ".tokenizers.vq",
    "samplers": ".samplers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vartk' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], __name__)
    return module if name == "samplers" else getattr(module, name)
