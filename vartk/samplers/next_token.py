"""Next-token (LlamaGen) sampling: prefill the class token, then decode grid_size^2 tokens in raster
order on static KV caches, with classifier-free guidance.

With guidance the batch holds 2B rows, [cond; null]; logits = u + s * (c - u) is applied to the
float32 logits before temperature / top-k / top-p, and the sampled token is fed to both halves.
Top-p follows LlamaGen's rule (`top_p_drop_llamagen`), and every decode step (not the prefill) runs
attention on PyTorch's math SDPA kernel, as the official `decode_n_tokens` does: in bf16 the fused kernels
round differently, and the sampled tokens would drift from the official ones.
On CUDA the single-token decode step can be replayed from a captured CUDA graph; it runs the
same `forward_cached` call as the eager loop, so both paths compute the same thing.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..models.attention import StaticKVCache
from .sampling import (
    check_class_labels, check_generator, check_non_negative, check_sampling_args, sample_from_logits,
)


DECODE_ATTENTION = SDPBackend.MATH  # the official decode steps' kernel (the prefill picks its own)


@dataclass
class NextTokenSampler:
    """Official LlamaGen sampling loop.

    temperature: divides the (guided) logits; 0 means greedy (the official code floors it at 1e-5).
    cfg_interval: -1 guides every token; k >= 0 stops guiding after decode step k (the prefill
        token is always guided; once off, guidance stays off), as the official `cfg_interval`.
    cuda_graph: "auto" replays a captured CUDA graph of the decode step on CUDA, never on CPU;
        True requires CUDA; False always runs eagerly. The sampler keeps its last graph (and the KV
        caches it writes) and replays it on later calls with the same model and number of rows, so only
        the first call pays for the capture.
    """

    temperature: float = 1.0
    cfg_interval: int = -1
    cuda_graph: bool | str = "auto"
    _graph: tuple[tuple, CUDAGraphDecodeStep] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        check_non_negative("temperature", self.temperature, "0 = greedy")
        interval = self.cfg_interval
        if not isinstance(interval, numbers.Integral) or isinstance(interval, bool) or interval < -1:
            raise ValueError(f"cfg_interval must be an integer >= -1 (-1 = guide every token), got {interval!r}")
        if not (self.cuda_graph == "auto" or isinstance(self.cuda_graph, bool)):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {self.cuda_graph!r}")

    @torch.no_grad()
    def __call__(
        self,
        transformer,
        class_labels,
        guidance_scale: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Sample image tokens for `class_labels` [B] -> int64 [B, grid_size^2] in raster order.

        guidance_scale is LlamaGen's cfg_scale: > 1 enables CFG with the null class; <= 1 runs the
        conditional rows only (no unconditional branch, as in the official code).
        """
        check_sampling_args(top_k, top_p, self.temperature)
        check_generator(generator)
        check_non_negative("guidance_scale", guidance_scale, "<= 1 disables guidance")
        labels = check_class_labels(class_labels, transformer.config.num_classes, transformer.device)
        use_graph = self._use_cuda_graph(labels.device)
        guided = guidance_scale > 1.0
        rows = torch.cat([labels, torch.full_like(labels, transformer.null_class)]) if guided else labels  # [R]
        if use_graph:
            decode = self._decode_graph(transformer, len(rows))
            caches = decode.caches
        else:
            caches = transformer.new_kv_caches(len(rows))

            def decode(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                with sdpa_kernel(DECODE_ATTENTION):
                    return transformer.forward_cached(tokens, None, positions, caches)

        def pick(logits: torch.Tensor, guide: bool) -> torch.Tensor:
            """Last-position logits [R, T, V] -> one token per sample [B] (CFG combine, then draw)."""
            logits = logits[:, -1]  # [R, V]
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance_scale * (cond - uncond) if guide else cond
            return sample_from_logits(logits, top_k, top_p, self.temperature, generator, top_p_rule="llamagen")

        num_tokens = transformer.num_tokens
        out = torch.empty(len(labels), num_tokens, dtype=torch.long, device=labels.device)  # [B, N]
        prefill_positions = torch.zeros(len(rows), 1, dtype=torch.long, device=labels.device)  # [R, 1]
        out[:, 0] = pick(transformer.forward_cached(None, rows, prefill_positions, caches), guide=True)
        guide = True
        for step in tqdm(range(num_tokens - 1), disable=not progress, desc="tokens"):
            guide = guide and not (self.cfg_interval > -1 and step > self.cfg_interval)
            token = out[:, step : step + 1]  # [B, 1]
            tokens = torch.cat([token, token]) if guided else token  # [R, 1]
            positions = torch.full_like(tokens, transformer.config.cls_token_num + step)  # [R, 1]
            out[:, step + 1] = pick(decode(tokens, positions), guide)
        return out

    def _use_cuda_graph(self, device: torch.device) -> bool:
        if self.cuda_graph is True and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        return device.type == "cuda" and self.cuda_graph in ("auto", True)

    def _decode_graph(self, transformer, rows: int) -> CUDAGraphDecodeStep:
        """The kept graph when it was captured for this model (the same tensors) and `rows`, else a new one.
        Reusing its caches is safe: attention masks keys by position, and every position a query can see is
        rewritten (prefill, then each decode step) before it is read."""
        tensors = (*transformer.parameters(), *transformer.buffers())
        key = (id(transformer), rows, torch.is_inference_mode_enabled(),  # inference-mode caches stay in it
               tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors))
        if self._graph is None or self._graph[0] != key:
            self._graph = None  # free the old graph and its caches before capturing the new one
            self._graph = key, CUDAGraphDecodeStep(transformer, transformer.new_kv_caches(rows))
        return self._graph[1]


class CUDAGraphDecodeStep:
    """A single-token decode step `forward_cached(tokens [R, 1], None, positions [R, 1], caches)`
    captured once in a CUDA graph; calling it copies the inputs into static buffers and replays.

    The returned logits [R, 1, V] live in a static buffer that the next call overwrites.
    Warm-up runs write position 1 of the caches, which the first real decode step rewrites
    before anything attends to it.
    """

    def __init__(self, transformer, caches: list[StaticKVCache], warmup_steps: int = 2):
        self.caches = caches
        rows = caches[0].k.shape[0]
        device = caches[0].k.device
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # [R, 1]
        self.positions = torch.full_like(self.tokens, transformer.config.cls_token_num)  # [R, 1]
        with torch.cuda.device(device):  # capture on the model's GPU, whichever is current
            side_stream = torch.cuda.Stream(device)
            side_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side_stream), sdpa_kernel(DECODE_ATTENTION):
                for _ in range(warmup_steps):
                    transformer.forward_cached(self.tokens, None, self.positions, caches)
            torch.cuda.current_stream(device).wait_stream(side_stream)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: a DataLoader's pin-memory thread may call CUDA while a training job captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), sdpa_kernel(DECODE_ATTENTION):
                self.logits = transformer.forward_cached(self.tokens, None, self.positions, caches)  # [R, 1, V]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
