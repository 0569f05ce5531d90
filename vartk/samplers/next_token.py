"""Next-token (LlamaGen) sampling: prefill the class token, then decode grid_size^2 tokens in raster order on
static KV caches, with classifier-free guidance.

With guidance the batch holds 2B rows, [cond; null]; logits = u + s * (c - u) is applied to the float32 logits
before temperature / top-k / top-p, and the sampled token is fed to both halves. Top-p follows LlamaGen's rule
(`top_p_drop_llamagen`), and every decode step (not the prefill) runs attention on PyTorch's math SDPA kernel, as
the official `decode_n_tokens` does: in bf16 the fused kernels round differently, and the sampled tokens would
drift from the official ones.

The steps are reusable pieces that speculative samplers share: `TokenGuidance` (which rows, how to combine them,
guidance as a function of the token index), `TokenDistribution` (the exact filtered distribution tokens are
drawn from), `prefill`, and a windowed decode step (T tokens per row at per-row positions), eager or replayed from
a captured CUDA graph (`DecodeSteps`).
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..models.attention import StaticKVCache, caches_nbytes
from .contract import NextTokenOutput, uniform_stats
from .registry import NEXT_TOKEN, register_sampler
from .sampling import (
    cfg_next_token, check_class_labels, check_generator, check_non_negative, check_sampling_args, draw_from_probs,
    probs_from_logits, sample_from_logits,
)

DECODE_ATTENTION = SDPBackend.MATH  # the official decode steps' kernel (the prefill picks its own)
WINDOW_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH]  # any kernel: windows of several tokens have no official counterpart


@dataclass(frozen=True)
class TokenGuidance:
    """LlamaGen's classifier-free guidance of one call.

    scale > 1 runs [cond; null] rows and mixes u + scale (c - u); <= 1 runs the conditional rows alone.
    cfg_interval -1 guides every token; k >= 0 guides tokens 0 .. k + 1 only (the official `cfg_interval`: the
    prefill and decode steps 0 .. k), a function of the token index, never of the iteration."""

    scale: float
    cfg_interval: int = -1

    @property
    def guided(self) -> bool:
        return self.scale > 1.0

    def rows(self, labels: torch.Tensor, null_class: int) -> torch.Tensor:
        """The class ids the transformer runs: [R] = [labels; null] with guidance, else the labels."""
        return torch.cat([labels, torch.full_like(labels, null_class)]) if self.guided else labels

    def repeat(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens of the B samples [B, T] -> the transformer's rows [R, T] (both halves get the same tokens)."""
        return torch.cat([tokens, tokens]) if self.guided else tokens

    def combine(self, logits: torch.Tensor, token_index: torch.Tensor | int) -> torch.Tensor:
        """Logits of the rows [R, T, V] -> guided float32 logits [B, T, V] of image tokens `token_index`
        ([B, T], or one index for all)."""
        if not self.guided:
            return logits.float()
        cond = logits.float().chunk(2)[0]
        guided = cfg_next_token(logits.float(), self.scale)
        if self.cfg_interval == -1:
            return guided
        on = torch.as_tensor(token_index, device=logits.device) <= self.cfg_interval + 1  # [B, T] or []
        return torch.where(on[..., None], guided, cond) if on.ndim else (guided if on else cond)


@dataclass(frozen=True)
class TokenDistribution:
    """The distribution next-token samplers draw from: temperature, then top-k / top-p with LlamaGen's rule."""

    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Guided logits [..., V] -> float32 probabilities [..., V] (see `probs_from_logits`)."""
        return probs_from_logits(logits, self.top_k, self.top_p, self.temperature, top_p_rule="llamagen")

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row of logits [..., V] -> int64 [...] (greedy settings: the argmax)."""
        return sample_from_logits(logits, self.top_k, self.top_p, self.temperature, generator, top_p_rule="llamagen")

    def draw(self, probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row of probabilities this distribution made [..., V] -> int64 [...]."""
        return probs.argmax(-1) if self.temperature == 0 or self.top_k == 1 else draw_from_probs(probs, generator)


def prefill(transformer, row_labels: torch.Tensor, caches: list[StaticKVCache]) -> torch.Tensor:
    """Run the class token of every row (position 0) into the caches -> logits [R, 1, V] of image token 0."""
    positions = torch.zeros(len(row_labels), 1, dtype=torch.long, device=row_labels.device)  # [R, 1]
    return transformer.forward_cached(None, row_labels, positions, caches)


class WindowDecodeStep:
    """Decode T tokens per row at per-row absolute positions: `step(tokens [R, T], positions [R, T])` -> logits
    [R, T, V] (float32), writing their keys and values into `caches`. One token a step runs attention on the official
    decode kernel (math); a window of several, which no official code runs, on PyTorch's fastest kernel."""

    def __init__(self, transformer, caches: list[StaticKVCache], window: int):
        self.transformer, self.caches, self.window = transformer, caches, window
        self.kernels = [DECODE_ATTENTION] if window == 1 else WINDOW_ATTENTION

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(self.kernels):
            return self.transformer.forward_cached(tokens, None, positions, self.caches)


class CUDAGraphWindowStep(WindowDecodeStep):
    """A `WindowDecodeStep` of a fixed window T captured once in a CUDA graph; a call copies the inputs into static
    buffers and replays. The returned logits [R, T, V] live in a static buffer the next call overwrites.

    Warm-up runs write positions cls_token_num .. cls_token_num + T - 1 of the caches, which the first real
    decode step rewrites before anything attends to them."""

    def __init__(self, transformer, caches: list[StaticKVCache], window: int, warmup_steps: int = 2):
        super().__init__(transformer, caches, window)
        rows, device = caches[0].k.shape[0], caches[0].k.device
        self.tokens = torch.zeros(rows, window, dtype=torch.long, device=device)  # [R, T]
        first = transformer.config.cls_token_num
        self.positions = torch.arange(first, first + window, device=device).expand(rows, -1).contiguous()  # [R, T]
        with torch.cuda.device(device):  # capture on the model's GPU, whichever is current
            side_stream = torch.cuda.Stream(device)
            side_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side_stream):
                for _ in range(warmup_steps):
                    super().__call__(self.tokens, self.positions)
            torch.cuda.current_stream(device).wait_stream(side_stream)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: a DataLoader's pin-memory thread may call CUDA while a training job captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logits = super().__call__(self.tokens, self.positions)  # [R, T, V]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


def check_cuda_graph_setting(cuda_graph) -> None:
    if not (cuda_graph == "auto" or isinstance(cuda_graph, bool)):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")


@dataclass
class DecodeSteps:
    """The decode steps of one sampler: eager ones with fresh caches per call, or a CUDA graph that is kept and
    replayed on later calls with the same model, rows and window, so only the first call pays for the capture.

    cuda_graph: "auto" captures on CUDA, never on CPU; True requires CUDA; False always runs eagerly.
    Reusing the kept graph's caches is safe: attention masks keys by position, and every position a query can
    see is rewritten (prefill, then each decode step) before it is read."""

    cuda_graph: bool | str = "auto"
    _kept: tuple[tuple, CUDAGraphWindowStep] | None = field(default=None, repr=False)

    def uses_graph(self, device: torch.device) -> bool:
        """Whether steps on `device` replay a CUDA graph."""
        if self.cuda_graph is True and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        return device.type == "cuda" and self.cuda_graph in ("auto", True)

    def step(self, transformer, rows: int, window: int, extra_positions: int = 0) -> WindowDecodeStep:
        """A decode step of `window` tokens for `rows` rows, with its caches (room for `extra_positions` past
        the last image token)."""
        if not self.uses_graph(transformer.device):
            return WindowDecodeStep(transformer, transformer.new_kv_caches(rows, extra_positions=extra_positions),
                                    window)
        tensors = (*transformer.parameters(), *transformer.buffers())
        key = (id(transformer), rows, window, extra_positions,
               torch.is_inference_mode_enabled(),  # inference-mode caches stay in it
               tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors))
        if self._kept is None or self._kept[0] != key:
            self._kept = None  # free the old graph and its caches before capturing the new one
            caches = transformer.new_kv_caches(rows, extra_positions=extra_positions)
            self._kept = key, CUDAGraphWindowStep(transformer, caches, window)
        return self._kept[1]


def check_token_call(transformer, class_labels, guidance_scale, top_k, top_p, temperature, generator) -> torch.Tensor:
    """The checks every next-token sampler runs on its arguments; returns the labels as int64 [B] on the model."""
    check_sampling_args(top_k, top_p, temperature)
    check_generator(generator)
    check_non_negative("guidance_scale", guidance_scale, "<= 1 disables guidance")
    return check_class_labels(class_labels, transformer.config.num_classes, transformer.device)


def cuda_peak_memory(device: torch.device) -> int | None:
    """torch.cuda.max_memory_allocated on a CUDA device since the last reset, else None."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_cuda_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@register_sampler("nexttoken", family=NEXT_TOKEN, aliases=("nexttokensampler", "ar"))
@dataclass
class NextTokenSampler:
    """Plain next-token sampling, one token per forward (the official LlamaGen loop).

    temperature: divides the (guided) logits; 0 means greedy (the official code floors it at 1e-5).
    cfg_interval: -1 guides every token; k >= 0 stops guiding after decode step k (the prefill token is always
        guided; once off, guidance stays off), as the official `cfg_interval`.
    cuda_graph: "auto" replays a captured CUDA graph of the decode step on CUDA, never on CPU; True requires
        CUDA; False always runs eagerly. The sampler keeps its last graph (and the KV caches it writes) and
        replays it on later calls with the same model and number of rows.
    """

    temperature: float = 1.0
    cfg_interval: int = -1
    cuda_graph: bool | str = "auto"
    _steps: DecodeSteps = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._steps = checked_decode_steps(self.temperature, self.cfg_interval, self.cuda_graph)

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
        tokenizer=None,
    ) -> NextTokenOutput:
        """Sample image tokens for `class_labels` [B] -> NextTokenOutput(tokens int64 [B, grid_size^2], stats).

        guidance_scale is LlamaGen's cfg_scale: > 1 enables CFG with the null class; <= 1 runs the
        conditional rows only (no unconditional branch, as in the official code). `tokenizer` is not used (the
        protocol passes it for samplers that read the codebook).
        """
        labels = check_token_call(transformer, class_labels, guidance_scale, top_k, top_p, self.temperature, generator)
        start = time.perf_counter()
        reset_cuda_peak_memory(labels.device)
        guidance = TokenGuidance(guidance_scale, self.cfg_interval)
        distribution = TokenDistribution(top_k, top_p, self.temperature)
        rows = guidance.rows(labels, transformer.null_class)  # [R]
        step = self._steps.step(transformer, len(rows), window=1)
        num_tokens, first = transformer.num_tokens, transformer.config.cls_token_num
        out = torch.empty(len(labels), num_tokens, dtype=torch.long, device=labels.device)  # [B, N]
        logits = prefill(transformer, rows, step.caches)  # [R, 1, V]
        out[:, 0] = distribution.sample(guidance.combine(logits, 0)[:, -1], generator)
        for index in tqdm(range(1, num_tokens), disable=not progress, desc="tokens"):
            tokens = guidance.repeat(out[:, index - 1 : index])  # [R, 1]
            positions = torch.full_like(tokens, first + index - 1)  # [R, 1]
            logits = step(tokens, positions)  # [R, 1, V]
            out[:, index] = distribution.sample(guidance.combine(logits, index)[:, -1], generator)
        stats = uniform_stats(len(labels), forwards=num_tokens, tokens=num_tokens, seconds=time.perf_counter() - start,
                              kv_bytes=caches_nbytes(step.caches, peak=True), peak_memory=cuda_peak_memory(labels.device))
        return NextTokenOutput(tokens=out, stats=stats)


def checked_decode_steps(temperature, cfg_interval, cuda_graph) -> DecodeSteps:
    """Check the settings every next-token sampler shares (one ValueError naming a bad one) and make its steps."""
    check_non_negative("temperature", temperature, "0 = greedy")
    check_cfg_interval(cfg_interval)
    check_cuda_graph_setting(cuda_graph)
    return DecodeSteps(cuda_graph)


def check_cfg_interval(interval) -> None:
    if not isinstance(interval, numbers.Integral) or isinstance(interval, bool) or interval < -1:
        raise ValueError(f"cfg_interval must be an integer >= -1 (-1 = guide every token), got {interval!r}")
