"""tools/score_tokenizers.py: code counts over all scales (and eval_default_models' codes used), their perplexity,
and a scored folder end to end."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vartk.tokenizers import MultiScaleVQVAE, VQModel

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))  # the tool imports its sibling eval_default_models
spec = importlib.util.spec_from_file_location("score_tokenizers", TOOLS / "score_tokenizers.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
sys.path.remove(str(TOOLS))


def tiny_multiscale() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    model = MultiScaleVQVAE(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, vocab_size=16, norm_groups=4,
                            patch_nums=(1, 2, 4), share_quant_resi=3).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(0, 0.1)
    return model


def test_code_counts_cover_every_scale_and_the_perplexity_is_exp_entropy():
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    multiscale = tiny_multiscale()
    tokens = torch.cat([t.flatten() for t in multiscale.encode(images)])  # 5 * (1 + 4 + 16)
    expected = torch.tensor([float((tokens == code).sum()) for code in range(16)])
    assert torch.equal(tool.code_counts(multiscale, images, batch_size=2), expected) and expected.sum() == 105
    torch.manual_seed(0)
    vq = VQModel(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, codebook_size=16, codebook_embed_dim=3,
                 norm_groups=4, usage_queue_size=64).eval()
    vq_tokens = vq.encode(images).flatten()  # 5 * 16
    assert torch.equal(tool.code_counts(vq, images, batch_size=2),
                       torch.tensor([float((vq_tokens == code).sum()) for code in range(16)]))
    codes_used = sys.modules["eval_default_models"].codes_used
    assert codes_used(multiscale, images) == len(set(tokens.tolist()))
    assert codes_used(vq, images) == len(set(vq_tokens.tolist()))
    counts = torch.tensor([3.0, 1.0, 0.0, 4.0])
    p = [3 / 8, 1 / 8, 4 / 8]
    assert tool.perplexity(counts) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    assert tool.perplexity(torch.ones(7)) == pytest.approx(7) and tool.perplexity(torch.tensor([0.0, 5.0])) == 1


def test_a_folder_is_scored_with_the_shipped_classifier(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("flags", "symbols"):  # two of the classifier's classes, 64 px images
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / "val" / name / f"{i}.png")
    torch.manual_seed(0)
    MultiScaleVQVAE(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, vocab_size=16, norm_groups=4,
                    patch_nums=(1, 2, 4, 8, 16, 32), codebook_dim=3).save_pretrained(tmp_path / "tok")
    (result,) = tool.main(["--data", str(tmp_path / "data"), "--split", "val", "--out", str(tmp_path / "out"),
                           str(tmp_path / "tok")])
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == [result]
    assert result["vocab_size"] == 16 and 1 <= result["codes_used"] <= 16
    assert 1 <= result["perplexity"] <= result["codes_used"] and 0 <= result["accuracy_of_reconstructions"] <= 1
    assert 0 < result["psnr"] < 20  # an untrained tokenizer on noise
