"""Test setup. TRITON_INTERPRET must be set before any module with @triton.jit is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property-based tests (tests/test_hostile_props.py): seeded and bounded by default; a longer random
# run with `--hypothesis-profile soak` (TWAMERGE_SOAK_EXAMPLES examples per test, default 1000).
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None, print_blob=True,
                          suppress_health_check=_QUIET, database=None)
settings.register_profile("soak", derandomize=False, max_examples=int(os.environ.get("TWAMERGE_SOAK_EXAMPLES", 1000)),
                          deadline=None, print_blob=True, suppress_health_check=_QUIET)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The shared real training run: an MLP on scikit-learn's digits, one safetensors checkpoint per epoch (6)."""
    from digits_run import make_digits_run

    return make_digits_run(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def lm(tmp_path_factory):
    """Three LlamaForCausalLM fine-tunes whose tokenizer has an eos and no pad token, and texts (test_text,
    test_tasks, test_prepare)."""
    pytest.importorskip("transformers")
    from text_fixtures import save_finetunes, sentences, write_jsonl

    root = tmp_path_factory.mktemp("lm")
    dirs = save_finetunes(root, "causal-lm", 3, eos_as_pad=True)
    texts = sentences(24)
    return dirs, write_jsonl(root / "val.jsonl", [{"text": t} for t in texts]), texts


@pytest.fixture(scope="session")
def clf(tmp_path_factory):
    """Three BertForSequenceClassification fine-tunes (label2id: negative, neutral, positive), string-labelled rows."""
    pytest.importorskip("transformers")
    from text_fixtures import LABELS, save_finetunes, sentences, write_jsonl

    root = tmp_path_factory.mktemp("clf")
    dirs = save_finetunes(root, "classification", 3)
    texts = sentences(30, seed=1)
    labels = [LABELS[i % 3] for i in range(30)]
    val = write_jsonl(root / "val.jsonl", [{"sentence": t, "label": y} for t, y in zip(texts, labels)])
    return dirs, val, texts, labels
