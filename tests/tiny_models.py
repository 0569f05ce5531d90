"""Tiny random-weight models shared by the tests (conftest.py wraps them as fixtures): a VAR transformer and its
multi-scale tokenizer on a 1-2-3 schedule, and a LlamaGen GPT on a 4x4 grid."""
from __future__ import annotations

import torch

from vartk.models.gpt import GPTTransformer
from vartk.models.var import VARTransformer
from vartk.tokenizers.msvq import MultiScaleVQVAE

NUM_CLASSES = 10
PATCH_NUMS = (1, 2, 3)
VAR_VOCAB = 32
GPT_VOCAB = 64


def tiny_var_transformer(shared_aln=False, seed=0, **kwargs) -> VARTransformer:
    """depth 2, width 64, 2 heads, V 32, Cz 8, with every parameter random (not the near-zero gates of init)."""
    config = dict(depth=2, width=64, num_heads=2, vocab_size=VAR_VOCAB, latent_channels=8, num_classes=NUM_CLASSES)
    model = VARTransformer(**{**config, "patch_nums": PATCH_NUMS, "shared_aln": shared_aln, **kwargs}).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def tiny_var_tokenizer() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(
        ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=VAR_VOCAB, patch_nums=PATCH_NUMS,
        norm_groups=8, share_quant_resi=2,
    ).eval()


def random_token_maps(batch, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VAR_VOCAB, (batch, pn, pn), generator=generator) for pn in PATCH_NUMS]


def tiny_gpt(seed=0, **kwargs) -> GPTTransformer:
    """dim 64, 2 layers, 4 heads, V 64, 4x4 grid; std 0.2 weights give peaked logits, so greedy choices are far
    from ties."""
    torch.manual_seed(seed)
    config = dict(dim=64, n_layer=2, n_head=4, vocab_size=GPT_VOCAB, num_classes=NUM_CLASSES, grid_size=4)
    model = GPTTransformer(**{**config, **kwargs})
    model.init_weights(std=0.2, randomize_output=True)
    return model.eval()


def tiny_pipelines():
    """A next-token pipeline (the tiny GPT with a single-scale tokenizer of its 64 codes on its 4x4 grid) and a
    next-scale pipeline on the official 256 px schedule (10 scales, 680 tokens: KV-cache policies work at their
    default budgets), both random."""
    from vartk.models.var import PATCH_NUMS_256
    from vartk.pipelines import GPTPipeline, VARPipeline

    torch.manual_seed(0)
    gpt_tokenizer = MultiScaleVQVAE(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=GPT_VOCAB,
                                    patch_nums=(4,), norm_groups=8).eval()
    var_tokenizer = MultiScaleVQVAE(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=VAR_VOCAB,
                                    patch_nums=PATCH_NUMS_256, norm_groups=8, share_quant_resi=2).eval()
    var = tiny_var_transformer(patch_nums=PATCH_NUMS_256, width=32)
    return GPTPipeline(tokenizer=gpt_tokenizer, transformer=tiny_gpt()), VARPipeline(tokenizer=var_tokenizer,
                                                                                     transformer=var)
