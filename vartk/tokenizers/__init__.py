"""Image <-> token tokenizers: multi-scale residual VQ-VAE (VAR) and single-scale VQ (LlamaGen)."""
from .msvq import MultiScaleVQVAE
from .vq import VQModel

__all__ = ["MultiScaleVQVAE", "VQModel"]
