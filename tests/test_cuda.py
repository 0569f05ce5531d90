"""GPU-only checks (skipped without CUDA): the CUDA-graph decode step (one token and a window of several) against
eager decoding, the samplers (plain and speculative) and the training jobs under bf16 on the GPU, and the CPU / GPU
agreement of the teacher-forced forwards.

    python -m pytest tests/test_cuda.py          # on a GPU machine; tools/gpu_checks.sh runs it first
"""
import copy
import dataclasses

import pytest
import torch
from _train_helpers import FAST, job_args, read_log, write_images
from references import reference_loop
from tiny_models import NUM_CLASSES, PATCH_NUMS
from tiny_models import tiny_var_tokenizer as tiny_tokenizer
from tiny_models import tiny_var_transformer as tiny_transformer

from vartk.samplers import GSDSampler, SJDSampler
from vartk.samplers.next_scale import NextScaleSampler
from vartk.samplers.next_token import CUDAGraphWindowStep, NextTokenSampler, WindowDecodeStep, prefill
from vartk.train import train_main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_cuda_graph_decode_gives_the_eager_tokens(gpt_model, guidance_scale):
    """Same weights, same generator: the replayed graph draws exactly the eager loop's tokens, greedy and sampled;
    greedy decoding through the graph equals the CPU reference loop (one full forward per token)."""
    on_gpu = copy.deepcopy(gpt_model).to(CUDA)
    labels = torch.tensor([1, 4, 9, 0])
    for sampling in (dict(top_k=1), dict(top_k=20, top_p=0.9)):
        eager, graph = (NextTokenSampler(cuda_graph=use_graph)(
            on_gpu, labels.to(CUDA), guidance_scale=guidance_scale, generator=torch.Generator(CUDA).manual_seed(7),
            progress=False, **sampling).tokens for use_graph in (False, True))
        assert torch.equal(eager, graph), sampling
        if sampling["top_k"] == 1:
            assert torch.equal(graph.cpu(), reference_loop(gpt_model, labels, guidance_scale))


def test_cuda_graph_decode_in_bf16_is_deterministic_and_captured_once(gpt_model):
    on_gpu = copy.deepcopy(gpt_model).to(CUDA, torch.bfloat16)
    labels = torch.arange(8, device=CUDA) % NUM_CLASSES
    sampler, graphs = NextTokenSampler(cuda_graph=True), []
    draws = []
    for _ in range(2):  # the second call replays the first call's graph on its kept caches
        draws.append(sampler(on_gpu, labels, guidance_scale=2.0, top_k=20,
                             generator=torch.Generator(CUDA).manual_seed(3), progress=False).tokens)
        graphs.append(sampler._steps._kept[1])
    assert draws[0].shape == (8, 16) and torch.equal(draws[0], draws[1])
    assert graphs[0] is graphs[1]
    eager = NextTokenSampler(cuda_graph=False)(on_gpu, labels, guidance_scale=2.0, top_k=20,
                                               generator=torch.Generator(CUDA).manual_seed(3), progress=False).tokens
    assert torch.equal(eager, draws[1])


def test_a_cpu_generator_drives_gpu_sampling(gpt_model):
    """As in diffusers, a CPU generator may drive a model on the GPU: the draws happen on the CPU, so the same
    seed gives the same tokens each time (next-token with the graph, next-scale with Gumbel smoothing)."""
    on_gpu = copy.deepcopy(gpt_model).to(CUDA)
    labels = torch.tensor([1, 4], device=CUDA)
    gpt = [NextTokenSampler(cuda_graph=True)(on_gpu, labels, guidance_scale=2.0, top_k=20, progress=False,
                                             generator=torch.Generator().manual_seed(5)).tokens for _ in range(2)]
    assert torch.equal(*gpt)
    transformer, tokenizer = tiny_transformer().to(CUDA), tiny_tokenizer().to(CUDA)
    var = [NextScaleSampler(more_smooth=True)(transformer, tokenizer, labels, top_k=4, progress=False,
                                              generator=torch.Generator().manual_seed(5)).token_maps
           for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*var))


@pytest.mark.parametrize("window", [1, 4])
def test_a_captured_window_step_equals_the_eager_one(gpt_model, window):
    """Replaying the CUDA graph of a window of T tokens at ragged per-row positions gives the eager step's logits
    (fp32) and writes the same keys; T = 1 is the plain decode step."""
    on_gpu = copy.deepcopy(gpt_model).to(CUDA)
    labels = torch.tensor([2, 5, NUM_CLASSES], device=CUDA)
    caches = [on_gpu.new_kv_caches(3, extra_positions=window) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            prefill(on_gpu, labels, c)
        eager, graph = WindowDecodeStep(on_gpu, caches[0], window), CUDAGraphWindowStep(on_gpu, caches[1], window)
        for start in range(3):
            tokens = torch.randint(0, 64, (3, window), device=CUDA, generator=torch.Generator(CUDA).manual_seed(start))
            positions = 1 + torch.tensor([[start], [2 * start], [0]], device=CUDA) + torch.arange(window, device=CUDA)
            assert (eager(tokens, positions) - graph(tokens, positions)).abs().max() <= 1e-5
    for a, b in zip(caches[0], caches[1]):
        assert (a.k - b.k).abs().max() <= 1e-5


@pytest.mark.parametrize("sampler", [SJDSampler(window=5), SJDSampler(window=5, coupled=True, init="above"),
                                     GSDSampler(window=5, embedding="transformer")], ids=["sjd", "coupled", "gsd"])
def test_speculative_sampling_replays_its_window_graph(gpt_model, sampler):
    """The CUDA-graph verify step draws the eager tokens (fp32, same generator), is captured once for repeated
    calls, and greedy speculative tokens equal the CPU reference loop."""
    on_gpu = copy.deepcopy(gpt_model).to(CUDA)
    labels = torch.tensor([1, 4, 9, 0], device=CUDA)
    kwargs = dict(guidance_scale=2.0, top_k=20, progress=False)
    graph = [sampler(on_gpu, labels, generator=torch.Generator(CUDA).manual_seed(3), **kwargs) for _ in range(2)]
    eager = dataclasses.replace(sampler, cuda_graph=False)
    expected = eager(on_gpu, labels, generator=torch.Generator(CUDA).manual_seed(3), **kwargs)
    assert torch.equal(graph[0].tokens, graph[1].tokens) and torch.equal(graph[0].tokens, expected.tokens)
    greedy = sampler(on_gpu, labels, guidance_scale=2.0, top_k=1, progress=False).tokens
    assert torch.equal(greedy.cpu(), reference_loop(gpt_model, labels.cpu(), 2.0))


def test_next_scale_forward_agrees_between_cpu_and_gpu():
    """The teacher-forced logits of the tiny VAR in fp32 on CUDA equal the CPU ones to 1e-4."""
    transformer, tokenizer = tiny_transformer().eval(), tiny_tokenizer().eval()
    labels = torch.tensor([1, 7])
    maps = [torch.randint(0, tokenizer.vocab_size, (2, pn, pn)) for pn in PATCH_NUMS]
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 convs: ~3e-4 off
        cpu = transformer(labels, tokenizer.teacher_forcing_input(maps))
        inputs = tokenizer.to(CUDA).teacher_forcing_input([m.to(CUDA) for m in maps])
        gpu = transformer.to(CUDA)(labels.to(CUDA), inputs)
    assert (cpu - gpu.cpu()).abs().max() <= 1e-4


def test_next_scale_sampling_in_bf16_on_gpu():
    transformer, tokenizer = tiny_transformer().to(CUDA, torch.bfloat16).eval(), tiny_tokenizer().to(CUDA).eval()
    draws = [NextScaleSampler()(transformer, tokenizer, torch.tensor([1, 7], device=CUDA), guidance_scale=1.5,
                                top_k=8, top_p=0.9, generator=torch.Generator(CUDA).manual_seed(1),
                                progress=False).token_maps for _ in range(2)]
    assert [tuple(t.shape) for t in draws[0]] == [(2, pn, pn) for pn in PATCH_NUMS]
    assert all(torch.equal(a, b) for a, b in zip(*draws))
    images = tokenizer.decode(draws[0])
    assert images.shape[0] == 2 and torch.isfinite(images).all()


@pytest.mark.parametrize("job", ["tokenizer", "var", "gpt"])
def test_training_on_gpu_with_bf16_autocast(job, tmp_path):
    """A few steps of every job on the GPU (bf16 autocast, fused AdamW): finite losses, a checkpoint, an export."""
    images = write_images(tmp_path / "images", classes=2, per_class=4)
    out = tmp_path / "run"
    train_main(job, ["--data", str(images), "--out", str(out), "--batch-size", "4", "--max-steps", "4",
                     "--save-every", "4", "--log-every", "1", "--device", "cuda", "--val-data", str(images), *FAST,
                     *job_args(job, images, tmp_path)])
    log = read_log(out)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)
    assert any("val_loss" in r for r in log)
    assert (out / ("tokenizer" if job == "tokenizer" else "pipeline")).is_dir()
