"""Test setup. TRITON_INTERPRET must be set before any module with @triton.jit is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The shared real training run: an MLP on scikit-learn's digits, one safetensors checkpoint per epoch (6)."""
    from digits_run import make_digits_run

    return make_digits_run(tmp_path_factory.mktemp("digits"))
