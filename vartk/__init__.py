"""vartk: visual autoregressive image generation — VAR (next-scale) and LlamaGen (next-token).

Public API re-exports only (resolved lazily, so `import vartk` stays cheap); see README.md.
"""
import importlib
import logging

__version__ = "0.1.0"


class _NoEmptyFloat32Warning(logging.Filter):
    """diffusers 0.42 warns on every ModelMixin.to(dtype) that modules "should be kept in float32: []", also when
    that list is empty (`_keep_in_fp32_modules or []` is never None); no vartk model keeps a module in float32."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFloat32Warning())

_EXPORTS = {
    "GPTPipeline": ".pipelines",
    "VARPipeline": ".pipelines",
    "load": ".loading",
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
