"""Independent reference computations the tests compare vartk against: written from the documented formulas
with plain loops and full (uncached) forwards, never with the code under test."""
from __future__ import annotations

import numpy as np
import torch


def reference_filter(row: np.ndarray, top_k: int, top_p: float, rule: str = "var") -> np.ndarray:
    """Plain-Python top-k then top-p over one row of logits: the set of kept indices. A token is kept while
    the mass ranked above it is below top_p (VAR) or at most top_p (LlamaGen)."""
    keep = np.ones_like(row, dtype=bool)
    if 0 < top_k < len(row):
        kth = np.sort(row)[::-1][top_k - 1]
        keep &= row >= kth
    if top_p < 1.0:
        masked = np.where(keep, row, -np.inf)
        probs = np.exp(masked - masked.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        mass_above = 0.0
        for idx in order:
            if mass_above > top_p or (rule == "var" and mass_above == top_p):
                keep[idx] = False
            mass_above += probs[idx]
    return keep


def reference_probs(row: np.ndarray, top_k: int, top_p: float, temperature: float, rule: str) -> np.ndarray:
    """float64 probabilities of one row of logits: divide by the temperature, keep `reference_filter`'s set,
    renormalise; temperature 0 is a point mass on the argmax."""
    if temperature == 0 or top_k == 1:
        return np.eye(len(row))[np.argmax(row)]
    scaled = row / max(temperature, 1e-5)
    kept = np.where(reference_filter(scaled, top_k, top_p, rule), np.exp(scaled - scaled.max()), 0.0)
    return kept / kept.sum()


def reference_loop(model, labels, guidance_scale, cfg_interval=-1, draw=lambda logits: logits.argmax(-1)):
    """Next-token sampling written with teacher-forced forward calls only: one full forward per token.
    guidance_scale None: the conditional logits alone."""
    null = torch.full_like(labels, model.null_class)
    tokens = torch.zeros(len(labels), 0, dtype=torch.long)
    guide = guidance_scale is not None
    with torch.no_grad():
        for index in range(model.num_tokens):
            if cfg_interval > -1 and index - 1 > cfg_interval:  # token `index` comes from decode step index - 1
                guide = False
            cond = model(labels, tokens)[:, -1]
            uncond = model(null, tokens)[:, -1]
            logits = uncond + guidance_scale * (cond - uncond) if guide else cond
            tokens = torch.cat([tokens, draw(logits)[:, None]], dim=1)
    return tokens


@torch.no_grad()
def greedy_next_scale_reference(transformer, tokenizer, labels, cfg):
    """Greedy next-scale sampling through the teacher-forced forward (no KV cache): scales not yet sampled are
    zeros, which the block-causal mask hides from the scale being predicted."""
    patch_nums = tokenizer.patch_nums
    B, K = len(labels), len(patch_nums)
    tokens = [torch.zeros(B, pn, pn, dtype=torch.long) for pn in patch_nums]
    both = torch.cat([labels, torch.full_like(labels, transformer.null_class)])
    begin = 0
    for si, pn in enumerate(patch_nums):
        logits = transformer(both, tokenizer.teacher_forcing_input(tokens).repeat(2, 1, 1))[:, begin : begin + pn * pn]
        t = cfg * si / (K - 1)
        guided = (1 + t) * logits[:B] - t * logits[B:]
        tokens[si] = guided.argmax(-1).view(B, pn, pn)
        begin += pn * pn
    return tokens
