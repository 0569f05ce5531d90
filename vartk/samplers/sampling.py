"""Logit filtering and token drawing shared by every sampler."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

MIN_TEMPERATURE = 1e-5


def check_sampling_args(top_k: int, top_p: float, temperature: float = 1.0) -> None:
    """Raise ValueError for top_k < 0, top_p outside (0, 1] or temperature < 0 (or not a number)."""
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k filtering), got {top_k!r}")
    if not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no top-p filtering), got {top_p!r}")
    check_non_negative("temperature", temperature)


def check_non_negative(name: str, value: float, meaning: str = "") -> None:
    """Raise one ValueError unless `value` is a finite number >= 0; `meaning` explains the allowed range."""
    if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0{f' ({meaning})' if meaning else ''}, got {value!r}")


def check_generator(generator) -> None:
    """Raise one TypeError unless `generator` is a torch.Generator or None (one generator drives the whole batch)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be one torch.Generator (it draws for the whole batch) or None, got "
                        f"{generator!r}")


def on_generator_device(draw, tensor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`draw(tensor)` run where `generator` lives (e.g. a CPU generator with a model on the GPU, as diffusers
    allows), the result moved back to `tensor`'s device."""
    if generator is None or generator.device == tensor.device:
        return draw(tensor)
    return draw(tensor.to(generator.device)).to(tensor.device)


def check_class_labels(class_labels, num_classes: int, device=None, allow_null: bool = False) -> torch.Tensor:
    """Class ids (int, list or tensor) -> int64 [B] on `device`. Ids must lie in [0, num_classes), or also
    equal num_classes (the null class) when `allow_null`; anything else raises one TypeError / ValueError."""
    if not isinstance(class_labels, (numbers.Integral, list, tuple, range, torch.Tensor, np.ndarray)):
        raise TypeError(f"class_labels must be a class id or a list / tensor of them, got a "
                        f"{type(class_labels).__name__} {class_labels!r}")
    try:
        labels = torch.as_tensor(class_labels, device=device)
    except (TypeError, ValueError, RuntimeError):  # ragged lists, None or strings inside
        raise ValueError(f"class_labels must be integer class ids, got {class_labels!r}") from None
    if labels.numel() == 0:
        raise ValueError("class_labels is empty; give at least one class id")
    if labels.is_floating_point() or labels.is_complex() or labels.ndim > 1:
        raise ValueError(f"class_labels must be integer class ids (1-D), got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.long().reshape(-1)
    top = num_classes + 1 if allow_null else num_classes
    bad = labels[(labels < 0) | (labels >= top)]
    if bad.numel():
        allowed = f"[0, {num_classes}] ({num_classes} = no class)" if allow_null else f"[0, {num_classes})"
        raise ValueError(f"class id {bad[0].item()} is outside {allowed} for this model")
    return labels


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, top_p_rule: str = "var") -> torch.Tensor:
    """Top-k then top-p filtering over the last dim; removed entries become -inf (a new tensor).

    Top-k keeps every logit >= the k-th largest (ties kept). Top-p keeps the highest-probability tokens
    by one of the two official rules (TOP_P_RULES); the argmax always survives.
    """
    if top_p_rule not in TOP_P_RULES:
        raise ValueError(f"top_p_rule {top_p_rule!r} is unknown; use one of {sorted(TOP_P_RULES)}")
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = logits.masked_fill(TOP_P_RULES[top_p_rule](logits, top_p), float("-inf"))
    return logits


def top_p_drop_var(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """VAR's rule, bool [..., V] (True = drop): sorted ascending, drop the tokens whose cumulative
    probability (their own included) is at most 1 - top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    mass_up_to = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [..., V], ascending
    drop_sorted = mass_up_to <= (1.0 - top_p)
    drop_sorted[..., -1] = False
    return drop_sorted.scatter(-1, order, drop_sorted)


def top_p_drop_llamagen(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """LlamaGen's rule, bool [..., V] (True = drop): sorted descending, drop a token once the probability
    of the tokens ranked above it exceeds top_p (so the token that crosses top_p is kept)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    mass_up_to = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [..., V], descending
    drop_sorted = torch.zeros_like(mass_up_to, dtype=torch.bool)
    drop_sorted[..., 1:] = mass_up_to[..., :-1] > top_p
    return drop_sorted.scatter(-1, order, drop_sorted)


TOP_P_RULES = {"var": top_p_drop_var, "llamagen": top_p_drop_llamagen}


def probs_from_logits(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    top_p_rule: str = "var",
) -> torch.Tensor:
    """The exact distribution `sample_from_logits` draws from, float32 [..., V]: softmax of the logits divided by
    the temperature (floored at MIN_TEMPERATURE, as in the official LlamaGen), after top-k then top-p
    filtering. Temperature 0 or top_k 1 (greedy) is a point mass on the argmax."""
    if temperature == 0 or top_k == 1:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    scaled = logits.float() / max(temperature, MIN_TEMPERATURE)
    return filter_logits(scaled, top_k, top_p, top_p_rule).softmax(dim=-1)


def draw_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` [..., V] -> int64 [...] (multinomial, with `generator`)."""
    flat = probs.reshape(-1, probs.shape[-1])  # [N, V]
    if flat.shape[0] == 0:
        return torch.zeros(probs.shape[:-1], dtype=torch.long, device=probs.device)
    tokens = on_generator_device(lambda p: torch.multinomial(p, 1, generator=generator), flat, generator)  # [N, 1]
    return tokens.view(probs.shape[:-1])


def sample_from_logits(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    top_p_rule: str = "var",
) -> torch.Tensor:
    """Draw one token per row of `logits` [..., V] from `probs_from_logits` -> int64 [...]; greedy settings take
    the argmax without drawing."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    return draw_from_probs(probs_from_logits(logits, top_k, top_p, temperature, top_p_rule), generator)


def cfg_next_token(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """LlamaGen's classifier-free guidance: [cond; uncond] logits [2B, ...] -> u + scale (c - u), [B, ...]."""
    cond, uncond = logits.chunk(2)
    return uncond + scale * (cond - uncond)


def cfg_next_scale(logits: torch.Tensor, t: float) -> torch.Tensor:
    """VAR's classifier-free guidance at ramp value t: [cond; uncond] logits [2B, ...] -> (1 + t) c - t u, [B, ...].
    (The same mix as `cfg_next_token` with scale 1 + t, in the official code's own arithmetic.)"""
    cond, uncond = logits.chunk(2)
    return (1 + t) * cond - t * uncond


def var_guidance_ramp(guidance_scale: float, scale_index: int, num_scales: int) -> float:
    """VAR's guidance at a scale: t = guidance_scale * k / (K - 1), from 0 at the first scale to guidance_scale."""
    return guidance_scale * (scale_index / max(num_scales - 1, 1))  # the official order of operations


def constant_guidance(guidance_scale: float, scale_index: int, num_scales: int) -> float:
    """The same guidance at every scale, the first included: t = guidance_scale."""
    return guidance_scale


GUIDANCE_SCHEDULES = {"linear": var_guidance_ramp, "constant": constant_guidance}  # name -> t at a scale
