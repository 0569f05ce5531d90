import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402
from tiny_models import tiny_gpt, tiny_var_tokenizer, tiny_var_transformer  # noqa: E402


@pytest.fixture(scope="module")
def gpt_model():
    """The tiny GPT (tests/tiny_models.py) in eval mode; tests must not change it."""
    return tiny_gpt()


@pytest.fixture(scope="module")
def var_models():
    """(tiny VAR transformer, its tiny multi-scale tokenizer) in eval mode; tests must not change them."""
    return tiny_var_transformer(), tiny_var_tokenizer()


@pytest.fixture(scope="module")
def tiny_pipelines():
    """(next-token pipeline, next-scale pipeline) of tiny random models (tests/tiny_models.py)."""
    from tiny_models import tiny_pipelines as build

    return build()
