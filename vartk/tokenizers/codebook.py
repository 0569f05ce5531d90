"""Codebook pieces both quantisers share: LlamaGen's codebook / commitment loss, the entropy (usage) loss and
k-means seeding of a codebook.

A quantiser compares "lookup vectors" with its codebook rows: the L2-normalised low-dimensional codes of
LlamaGen's VQ (and of a MultiScaleVQVAE with `codebook_dim`), or VAR's full-width residuals. Both models give
them, with the code each one picks, through `quantizer_lookups(latent)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def codebook_loss(codes: torch.Tensor, z: torch.Tensor, beta: float) -> torch.Tensor:
    """LlamaGen's quantiser loss: MSE(codes, sg(z)) moves the codes, beta * MSE(sg(codes), z) commits z to them."""
    return F.mse_loss(codes, z.detach()) + beta * F.mse_loss(codes.detach(), z)


def entropy_loss(distances: torch.Tensor, temperature: float) -> torch.Tensor:
    """The codebook entropy loss of MaskGIT / MAGVIT (LlamaGen's `compute_entropy_loss`) on squared distances
    [N, V]: with p_n = softmax(-d_n / temperature), mean_n H(p_n) - H(mean_n p_n). Lowering it makes each lookup
    confident and spreads the batch over the whole codebook."""
    logits = -distances / temperature  # [N, V]
    probs = logits.softmax(dim=-1)
    sample_entropy = -(probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    mean_probs = probs.mean(dim=0)  # [V]
    batch_entropy = -(mean_probs * (mean_probs + 1e-5).log()).sum()
    return sample_entropy - batch_entropy


@torch.no_grad()
def move_codes_to_means(codebook: torch.Tensor, vectors: torch.Tensor, tokens: torch.Tensor) -> None:
    """One Lloyd update: every code that some of `vectors` [N, D] picked (`tokens` [N]) moves to their mean; the
    others stay where they are."""
    sums = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device).index_add_(0, tokens, vectors)
    counts = torch.bincount(tokens, minlength=len(codebook))  # [V]
    picked = counts > 0
    codebook[picked] = (sums[picked] / counts[picked, None]).to(codebook.dtype)


@torch.no_grad()
def lookups_in_chunks(model, latents: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.quantizer_lookups` over latents [M, ...], `chunk_size` at a time: (vectors [N, D], tokens [N])."""
    parts = [model.quantizer_lookups(chunk) for chunk in latents.split(chunk_size)]
    return torch.cat([vectors for vectors, _ in parts]), torch.cat([tokens for _, tokens in parts])


@torch.no_grad()
def kmeans_codebook(model, latents: torch.Tensor, iterations: int, generator: torch.Generator,
                    chunk_size: int = 16) -> None:
    """Seed `model`'s codebook by k-means on the vectors its quantiser looks up for `latents` [M, ...].

    The codebook is zeroed first, so that every scale of a multi-scale quantiser looks up (almost) the latent
    itself; the codes start on random ones of those vectors, none twice (drawn with `generator` from the vectors
    in the order the `chunk_size` latents at a time give them). Each of the
    `iterations` Lloyd steps then quantises the latents with the current codes, so that a multi-scale quantiser
    sees the residuals each of its scales quantises with them, and moves every picked code to the mean of the
    vectors that picked it.
    """
    codebook = model.quantize.embedding.weight  # [V, D]
    codebook.zero_()
    vectors, _ = lookups_in_chunks(model, latents, chunk_size)  # [N, D]
    if len(vectors) < len(codebook):
        raise ValueError(f"k-means needs at least as many vectors as codes: {len(latents)} latents give "
                         f"{len(vectors)} vectors for {len(codebook)} codes; give more images")
    picks = torch.randperm(len(vectors), generator=generator, device=generator.device)[:len(codebook)]  # [V]
    codebook.copy_(vectors[picks.to(vectors.device)].to(codebook.dtype))
    for _ in range(iterations):
        move_codes_to_means(codebook, *lookups_in_chunks(model, latents, chunk_size))
