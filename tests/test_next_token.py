import numpy as np
import pytest
import torch
from references import reference_filter, reference_loop
from tiny_models import NUM_CLASSES

from vartk.models.gpt import GPTTransformer
from vartk.samplers.next_token import NextTokenSampler, WindowDecodeStep, prefill

def test_greedy_cfg_matches_reference_loop(gpt_model):
    labels = torch.tensor([1, 4, 9])
    tokens = NextTokenSampler()(gpt_model, labels, guidance_scale=2.0, top_k=1, progress=False).tokens
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 16)
    assert torch.equal(tokens, reference_loop(gpt_model, labels, 2.0))
    assert not torch.equal(tokens, reference_loop(gpt_model, labels, 1.0))  # guidance changes the result here


@pytest.mark.parametrize("guidance_scale", [1.0, 0.5])
def test_scale_up_to_one_is_the_conditional_branch(gpt_model, guidance_scale):
    labels = torch.tensor([2, 5])
    tokens = NextTokenSampler()(gpt_model, labels, guidance_scale=guidance_scale, top_k=1, progress=False).tokens
    assert torch.equal(tokens, reference_loop(gpt_model, labels, None))
    if guidance_scale == 1.0:  # u + 1 (c - u) = c: the guided formula at scale 1 agrees
        assert torch.equal(tokens, reference_loop(gpt_model, labels, 1.0))


def test_cfg_interval_turns_guidance_off_after_that_decode_step(gpt_model):
    labels = torch.tensor([3, 8])
    tokens = NextTokenSampler(cfg_interval=2)(gpt_model, labels, guidance_scale=4.0, top_k=1, progress=False).tokens
    assert torch.equal(tokens, reference_loop(gpt_model, labels, 4.0, cfg_interval=2))
    assert not torch.equal(tokens, reference_loop(gpt_model, labels, 4.0))


def test_guidance_is_applied_before_temperature_and_filtering(gpt_model):
    labels = torch.tensor([0, 6])
    sampler = NextTokenSampler(temperature=0.8)
    tokens = sampler(gpt_model, labels, guidance_scale=1.5, top_k=20, top_p=0.9,
                     generator=torch.Generator().manual_seed(3), progress=False).tokens
    generator = torch.Generator().manual_seed(3)

    def draw(logits):
        """Divide by the temperature, filter with the plain-Python reference, draw from the same generator."""
        scaled = logits.double().numpy() / 0.8
        kept = np.array([np.where(reference_filter(row, 20, 0.9, "llamagen"), np.exp(row - row.max()), 0.0)
                         for row in scaled])
        return torch.multinomial(torch.from_numpy(kept).float(), 1, generator=generator)[:, 0]

    assert torch.equal(tokens, reference_loop(gpt_model, labels, 1.5, draw=draw))


def test_top_p_follows_llamagen_rule():
    """A zero output head (the official init) gives uniform logits over 64 codes. With top_p 0.5 LlamaGen keeps
    a code while at most half the mass is ranked above it: 33 codes (VAR's rule would keep 32)."""
    torch.manual_seed(0)
    uniform = GPTTransformer(dim=32, n_layer=1, n_head=2, vocab_size=64, num_classes=NUM_CLASSES, grid_size=8)
    uniform.init_weights()
    tokens = NextTokenSampler()(uniform.eval(), torch.zeros(32, dtype=torch.long), top_p=0.5,
                                generator=torch.Generator().manual_seed(0), progress=False).tokens  # 2048 draws
    assert len(tokens.unique()) == 33


def test_decode_steps_run_attention_on_the_math_kernel(gpt_model, monkeypatch):
    """As the official decode_n_tokens: the prefill leaves SDPA's kernel choice alone, every decode step
    allows the math kernel only (the kernels round differently in bf16)."""
    import vartk.models.attention as attention_module

    real_sdpa, only_math = attention_module.F.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        only_math.append(not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled())
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    NextTokenSampler()(gpt_model, torch.tensor([1]), guidance_scale=2.0, top_k=1, progress=False)
    layers = len(gpt_model.layers)
    assert only_math == [False] * layers + [True] * (gpt_model.num_tokens - 1) * layers


def test_same_generator_same_tokens(gpt_model):
    labels = torch.tensor([1, 1, 2])
    sample = lambda seed: NextTokenSampler()(  # noqa: E731
        gpt_model, labels, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed), progress=False
    ).tokens
    assert torch.equal(sample(0), sample(0))
    assert not sample(0).is_inference()  # usable as training targets (inference tensors are not)
    assert not torch.equal(sample(0), sample(1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_labels=[0, NUM_CLASSES]), r"class id 10 is outside \[0, 10\)"),
    (dict(class_labels=[-1]), r"class id -1 is outside"),
    (dict(class_labels=[[1, 2]]), r"integer class ids \(1-D\)"),
    (dict(guidance_scale=-0.5), "guidance_scale must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_invalid_arguments(gpt_model, kwargs, message):
    call = dict(class_labels=[1], progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        NextTokenSampler()(gpt_model, **call)


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(cuda_graph="sometimes"), "cuda_graph must be 'auto', True or False, got 'sometimes'"),
    (dict(cuda_graph=1), "cuda_graph must be 'auto', True or False, got 1"),
    (dict(cfg_interval=-7), r"cfg_interval must be an integer >= -1 \(-1 = guide every token\), got -7"),
    (dict(cfg_interval=2.5), "cfg_interval must be an integer >= -1.*got 2.5"),
    (dict(cfg_interval="abc"), "cfg_interval must be an integer >= -1.*got 'abc'"),
])
def test_invalid_sampler_settings_fail_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        NextTokenSampler(**settings)


def test_cuda_graph_true_needs_cuda(gpt_model):
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        NextTokenSampler(cuda_graph=True)(gpt_model, [1], progress=False)


def test_a_tiny_temperature_is_near_greedy_not_a_crash(gpt_model):
    labels = torch.tensor([1, 4])
    greedy = NextTokenSampler(temperature=0)(gpt_model, labels, guidance_scale=2.0, progress=False).tokens
    tiny = NextTokenSampler(temperature=1e-40)(gpt_model, labels, guidance_scale=2.0, progress=False,
                                               generator=torch.Generator().manual_seed(0)).tokens
    assert torch.equal(tiny, greedy)  # the peaked logits leave no second choice at T = 1e-5


class EagerStep(WindowDecodeStep):
    """Stands in for CUDAGraphWindowStep on a CPU: the same interface, run eagerly, captures counted."""

    captures = 0

    def __init__(self, transformer, caches, window):
        super().__init__(transformer, caches, window)
        EagerStep.captures += 1


def test_the_decode_graph_is_captured_once_per_model_and_batch(gpt_model, monkeypatch):
    import vartk.samplers.next_token as next_token

    monkeypatch.setattr(next_token, "CUDAGraphWindowStep", EagerStep)
    monkeypatch.setattr(next_token.DecodeSteps, "uses_graph", lambda self, device: True)
    EagerStep.captures = 0
    sampler = NextTokenSampler(temperature=0)
    expected = reference_loop(gpt_model, torch.tensor([1, 4]), 2.0)
    sample = lambda model, labels, **kwargs: sampler(model, labels, progress=False, **kwargs).tokens  # noqa: E731
    for _ in range(3):  # the kept caches hold the previous call's keys: they must not leak into this one
        assert torch.equal(sample(gpt_model, [1, 4], guidance_scale=2.0), expected)
    assert EagerStep.captures == 1
    sample(gpt_model, [1, 4, 5], guidance_scale=2.0)  # other rows: a new graph
    sample(gpt_model, [1, 4, 5], guidance_scale=1.0)  # no CFG: 3 rows, not 6
    assert EagerStep.captures == 3
    other = GPTTransformer(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=NUM_CLASSES, grid_size=4).eval()
    other.load_state_dict(gpt_model.state_dict())
    assert torch.equal(sample(other, [1, 4], guidance_scale=2.0), expected)
    assert EagerStep.captures == 4  # same weights, other tensors: the old graph would read the old model
    with torch.inference_mode():  # its caches are inference tensors, which cannot be written outside that mode
        sample(other, [1, 4], guidance_scale=2.0)
    assert torch.equal(sample(other, [1, 4], guidance_scale=2.0), expected)
    assert EagerStep.captures == 6


def test_a_pipeline_keeps_its_default_sampler():
    from vartk.loading import load

    pipe = load("default-gpt")
    assert pipe.sampler is pipe.sampler and pipe.sampler == NextTokenSampler()


def test_a_one_token_window_step_is_the_official_decode_step_bit_for_bit(gpt_model):
    """The decode step of the official loop: forward_cached of one token per row on the math SDPA kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    labels = torch.tensor([3, 7, NUM_CLASSES, NUM_CLASSES])
    tokens = torch.randint(0, 64, (4, 15), generator=torch.Generator().manual_seed(0))
    window_caches, official_caches = gpt_model.new_kv_caches(4), gpt_model.new_kv_caches(4)
    step = WindowDecodeStep(gpt_model, window_caches, window=1)
    with torch.no_grad():
        for caches in (window_caches, official_caches):
            prefill(gpt_model, labels, caches)
        for index in range(15):
            positions = torch.full((4, 1), 1 + index)
            ours = step(tokens[:, index : index + 1], positions)
            with sdpa_kernel(SDPBackend.MATH):
                official = gpt_model.forward_cached(tokens[:, index : index + 1], None, positions, official_caches)
            assert torch.equal(ours, official)


def test_a_window_at_ragged_positions_equals_single_steps(gpt_model):
    """Rows at different lengths (4 and 1 tokens committed) decode a window of 5 tokens each in one forward:
    the logits equal 5 single-token steps per row (fp32, <= 1e-5), and the caches hold the same keys."""
    labels = torch.tensor([2, 5])
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    committed = torch.tensor([4, 1])
    windowed, single = gpt_model.new_kv_caches(2, extra_positions=5), gpt_model.new_kv_caches(2, extra_positions=5)
    with torch.no_grad():
        for caches in (windowed, single):
            prefill(gpt_model, labels, caches)
            for index in range(committed.max()):  # one token a step; a row past its length rewrites its last one
                last = torch.minimum(torch.tensor(index), committed - 1)[:, None]  # [2, 1]
                gpt_model.forward_cached(tokens.gather(1, last), None, 1 + last, caches)
        window = torch.stack([tokens[row, committed[row] : committed[row] + 5] for row in range(2)])  # [2, 5]
        positions = 1 + committed[:, None] + torch.arange(5)  # [2, 5]
        ours = WindowDecodeStep(gpt_model, windowed, window=5)(window, positions)  # [2, 5, V]
        steps = WindowDecodeStep(gpt_model, single, window=1)
        expected = torch.cat([steps(window[:, j : j + 1], positions[:, j : j + 1]) for j in range(5)], dim=1)
    assert ours.shape == (2, 5, 64)
    assert (ours - expected).abs().max() <= 1e-5
    for a, b in zip(windowed, single):
        assert (a.k - b.k).abs().max() <= 1e-5

