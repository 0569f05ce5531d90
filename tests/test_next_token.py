import numpy as np
import pytest
import torch
from test_sampling import reference_filter

from vartk.models.gpt import GPTTransformer
from vartk.samplers.next_token import NextTokenSampler

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = GPTTransformer(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=NUM_CLASSES, grid_size=4)
    model.init_weights(std=0.2, randomize_output=True)  # peaked logits: greedy choices far from ties
    return model.eval()


def reference_loop(model, labels, guidance_scale, cfg_interval=-1, draw=lambda logits: logits.argmax(-1)):
    """Sampling written with teacher-forced forward calls only: one full forward per token.
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


def test_greedy_cfg_matches_reference_loop(model):
    labels = torch.tensor([1, 4, 9])
    tokens = NextTokenSampler()(model, labels, guidance_scale=2.0, top_k=1, progress=False)
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 16)
    assert torch.equal(tokens, reference_loop(model, labels, 2.0))
    assert not torch.equal(tokens, reference_loop(model, labels, 1.0))  # guidance changes the result here


@pytest.mark.parametrize("guidance_scale", [1.0, 0.5])
def test_scale_up_to_one_is_the_conditional_branch(model, guidance_scale):
    labels = torch.tensor([2, 5])
    tokens = NextTokenSampler()(model, labels, guidance_scale=guidance_scale, top_k=1, progress=False)
    assert torch.equal(tokens, reference_loop(model, labels, None))
    if guidance_scale == 1.0:  # u + 1 (c - u) = c: the guided formula at scale 1 agrees
        assert torch.equal(tokens, reference_loop(model, labels, 1.0))


def test_cfg_interval_turns_guidance_off_after_that_decode_step(model):
    labels = torch.tensor([3, 8])
    tokens = NextTokenSampler(cfg_interval=2)(model, labels, guidance_scale=4.0, top_k=1, progress=False)
    assert torch.equal(tokens, reference_loop(model, labels, 4.0, cfg_interval=2))
    assert not torch.equal(tokens, reference_loop(model, labels, 4.0))


def test_guidance_is_applied_before_temperature_and_filtering(model):
    labels = torch.tensor([0, 6])
    sampler = NextTokenSampler(temperature=0.8)
    tokens = sampler(model, labels, guidance_scale=1.5, top_k=20, top_p=0.9,
                     generator=torch.Generator().manual_seed(3), progress=False)
    generator = torch.Generator().manual_seed(3)

    def draw(logits):
        """Divide by the temperature, filter with the plain-Python reference, draw from the same generator."""
        scaled = logits.double().numpy() / 0.8
        kept = np.array([np.where(reference_filter(row, 20, 0.9, "llamagen"), np.exp(row - row.max()), 0.0)
                         for row in scaled])
        return torch.multinomial(torch.from_numpy(kept).float(), 1, generator=generator)[:, 0]

    assert torch.equal(tokens, reference_loop(model, labels, 1.5, draw=draw))


def test_top_p_follows_llamagen_rule():
    """A zero output head (the official init) gives uniform logits over 64 codes. With top_p 0.5 LlamaGen keeps
    a code while at most half the mass is ranked above it: 33 codes (VAR's rule would keep 32)."""
    torch.manual_seed(0)
    uniform = GPTTransformer(dim=32, n_layer=1, n_head=2, vocab_size=64, num_classes=NUM_CLASSES, grid_size=8)
    uniform.init_weights()
    tokens = NextTokenSampler()(uniform.eval(), torch.zeros(32, dtype=torch.long), top_p=0.5,
                                generator=torch.Generator().manual_seed(0), progress=False)  # 2048 draws
    assert len(tokens.unique()) == 33


def test_decode_steps_run_attention_on_the_math_kernel(model, monkeypatch):
    """As the official decode_n_tokens: the prefill leaves SDPA's kernel choice alone, every decode step
    allows the math kernel only (the kernels round differently in bf16)."""
    import vartk.models.attention as attention_module

    real_sdpa, only_math = attention_module.F.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        only_math.append(not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled())
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    NextTokenSampler()(model, torch.tensor([1]), guidance_scale=2.0, top_k=1, progress=False)
    layers = len(model.layers)
    assert only_math == [False] * layers + [True] * (model.num_tokens - 1) * layers


def test_same_generator_same_tokens(model):
    labels = torch.tensor([1, 1, 2])
    sample = lambda seed: NextTokenSampler()(  # noqa: E731
        model, labels, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed), progress=False
    )
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
def test_invalid_arguments(model, kwargs, message):
    call = dict(class_labels=[1], progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        NextTokenSampler()(model, **call)


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


def test_cuda_graph_true_needs_cuda(model):
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        NextTokenSampler(cuda_graph=True)(model, [1], progress=False)


def test_a_tiny_temperature_is_near_greedy_not_a_crash(model):
    labels = torch.tensor([1, 4])
    greedy = NextTokenSampler(temperature=0)(model, labels, guidance_scale=2.0, progress=False)
    tiny = NextTokenSampler(temperature=1e-40)(model, labels, guidance_scale=2.0, progress=False,
                                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny, greedy)  # the peaked logits leave no second choice at T = 1e-5


class EagerStep:
    """Stands in for CUDAGraphDecodeStep on a CPU: the same interface, run eagerly, captures counted."""

    captures = 0

    def __init__(self, transformer, caches):
        self.transformer, self.caches = transformer, caches
        EagerStep.captures += 1

    def __call__(self, tokens, positions):
        return self.transformer.forward_cached(tokens, None, positions, self.caches)


def test_the_decode_graph_is_captured_once_per_model_and_batch(model, monkeypatch):
    import vartk.samplers.next_token as next_token

    monkeypatch.setattr(next_token, "CUDAGraphDecodeStep", EagerStep)
    monkeypatch.setattr(NextTokenSampler, "_use_cuda_graph", lambda self, device: True)
    EagerStep.captures = 0
    sampler = NextTokenSampler(temperature=0)
    expected = reference_loop(model, torch.tensor([1, 4]), 2.0)
    for _ in range(3):  # the kept caches hold the previous call's keys: they must not leak into this one
        assert torch.equal(sampler(model, [1, 4], guidance_scale=2.0, progress=False), expected)
    assert EagerStep.captures == 1
    sampler(model, [1, 4, 5], guidance_scale=2.0, progress=False)  # other rows: a new graph
    sampler(model, [1, 4, 5], guidance_scale=1.0, progress=False)  # no CFG: 3 rows, not 6
    assert EagerStep.captures == 3
    other = GPTTransformer(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=NUM_CLASSES, grid_size=4).eval()
    other.load_state_dict(model.state_dict())
    assert torch.equal(sampler(other, [1, 4], guidance_scale=2.0, progress=False), expected)
    assert EagerStep.captures == 4  # same weights, other tensors: the old graph would read the old model
    with torch.inference_mode():  # its caches are inference tensors, which cannot be written outside that mode
        sampler(other, [1, 4], guidance_scale=2.0, progress=False)
    assert torch.equal(sampler(other, [1, 4], guidance_scale=2.0, progress=False), expected)
    assert EagerStep.captures == 6


def test_a_pipeline_keeps_its_default_sampler():
    from vartk.pipelines import load

    pipe = load("default-gpt")
    assert pipe.default_sampler is pipe.default_sampler and pipe.default_sampler == NextTokenSampler()
