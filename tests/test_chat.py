"""Chat data: rows of messages rendered with the tokenizer's own chat template, scored on the assistant tokens.

The candidates are the tiny Llama fine-tunes of the ``lm`` fixture with the real MiniLM tokenizer, to which
a chat template is added as transformers saves one (``chat_template.jinja``). The assistant-token mask is
checked against a hand computation (the template's pieces tokenized one by one), the perplexity against
the model's own ``labels=`` loss, and every refusal is one line.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from text_fixtures import load_model, tokenizer, write_jsonl
from torch import nn
from typer.testing import CliRunner

from twamerge.cli import app
from twamerge.config import DataConfig, ModelConfig
from twamerge.data import IGNORE_INDEX, iter_batches
from twamerge.errors import DataError
from twamerge.prepare import ModelContext, hf_dirs, load_inputs
from twamerge.text import tokenize_chat

pytest.importorskip("transformers")
runner = CliRunner()

# A ChatML-like template in words the MiniLM vocabulary knows; "[CLS]" stands for a BOS the template writes.
TEMPLATE = ("[CLS] {% for m in messages %}<{{ m.role }}> {{ m.content }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
CHATS = [
    [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a warm mat"}],
    [{"role": "system", "content": "be quiet"}, {"role": "user", "content": "where did dogs run"},
     {"role": "assistant", "content": "past old red barns"}, {"role": "user", "content": "and then"},
     {"role": "assistant", "content": "near small rivers"}],
    [{"role": "user", "content": "rain fell"}, {"role": "assistant", "content": "over quiet hills every morning"}],
]


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def chat_dirs(lm, tmp_path_factory):
    """Two of the ``lm`` fine-tunes with a chat template in chat_template.jinja."""
    root = tmp_path_factory.mktemp("chat")
    dirs = []
    for d in lm[0][:2]:
        shutil.copytree(d, root / d.name)
        (root / d.name / "chat_template.jinja").write_text(TEMPLATE)
        dirs.append(root / d.name)
    return dirs


def _by_hand(tok, messages: list[dict], scored_from: int = 0) -> tuple[list[int], list[int]]:
    """The ids and labels of one conversation from the template's pieces, each tokenized on its own (BERT's
    tokenizer splits at spaces, so the pieces' tokens are the whole text's): assistant content and its
    [SEP] scored, everything else -100."""
    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    out, labels = ids("[CLS]"), [IGNORE_INDEX]
    for i, m in enumerate(messages):
        head = ids(f"<{m['role']}>")
        body = ids(f"{m['content']} [SEP]")
        out += head + body
        scored = m["role"] == "assistant" and i >= scored_from
        labels += [IGNORE_INDEX] * len(head) + (body if scored else [IGNORE_INDEX] * len(body))
    return out, labels


def test_messages_rows_score_every_assistant_turn_and_nothing_else(chat_dirs, tmp_path):
    val = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m, "id": i} for i, m in enumerate(CHATS)])
    model, tok = load_model(chat_dirs[0]), tokenizer(chat_dirs[0])
    data, task = load_inputs(DataConfig(str(val)), ModelConfig(), ModelContext(model, hf_dirs(chat_dirs)))
    assert task.name == "causal-lm" and data.label == "labels" and data.n == len(CHATS)
    for i, messages in enumerate(CHATS):
        ids, labels = _by_hand(tok, messages)
        assert data.columns["input_ids"][i].tolist() == ids
        assert data.columns["labels"][i].tolist() == labels
    # Row 1 has two assistant turns, both scored; its user turn between them is not.
    assert sum(v != IGNORE_INDEX for v in data.columns["labels"][1].tolist()) == len(
        tok("past old red barns [SEP] near small rivers [SEP]", add_special_tokens=False)["input_ids"])
    batch = next(iter_batches(data, torch.arange(data.n), data.n))
    assert task.count(batch) == sum(sum(v != IGNORE_INDEX for v in _by_hand(tok, m)[1]) for m in CHATS)


def test_trl_conversational_prompt_completion_scores_the_completion_only(chat_dirs, tmp_path):
    rows = [{"prompt": m[:-1], "completion": m[-1:]} for m in CHATS]
    val = write_jsonl(tmp_path / "pc.jsonl", rows)
    model, tok = load_model(chat_dirs[0]), tokenizer(chat_dirs[0])
    data, _ = load_inputs(DataConfig(str(val)), ModelConfig(), ModelContext(model, hf_dirs(chat_dirs)))
    for i, messages in enumerate(CHATS):
        ids, labels = _by_hand(tok, messages, scored_from=len(messages) - 1)
        assert data.columns["input_ids"][i].tolist() == ids
        assert data.columns["labels"][i].tolist() == labels  # row 1: the prompt's assistant turn is not scored


def test_perplexity_is_the_models_own_loss_on_the_assistant_tokens(chat_dirs, tmp_path):
    val = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS * 3])
    r = _run("eval", chat_dirs[0], "--val", val, "--json", "--batch-size", "4")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["checkpoints"][0]
    model, tok = load_model(chat_dirs[0]), tokenizer(chat_dirs[0])
    total, n = 0.0, 0
    with torch.no_grad():
        for messages in CHATS * 3:  # one row at a time, by the model's own shifted, -100-ignoring loss
            ids, labels = _by_hand(tok, messages)
            count = sum(v != IGNORE_INDEX for v in labels[1:])
            total += float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss) * count
            n += count
    assert got["n"] == n and got["metric"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert "tokenized messages (chat, the tokenizer's chat template): 9 rows" in r.stderr
    assert f"loss on {n} assistant tokens of" in r.stderr


def test_fit_on_a_chat_column_named_by_text(chat_dirs, tmp_path):
    val = write_jsonl(tmp_path / "dialog.jsonl", [{"dialog": m} for m in CHATS * 4])
    r = _run("fit", *chat_dirs, "--val", val, "--text", "dialog", "-o", tmp_path / "merged", "--holdout", "0",
             "--epochs", "1", "--min-steps", "2", "--no-greedy", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["metric_name"] == "perplexity" and out["model"]["task"] == "causal-lm"


def test_truncation_counts_and_names_the_rows_it_drops(chat_dirs, tmp_path):
    # Rows 0 and 2 render to 16 and 15 tokens, their assistant turns from tokens 11 and 10: cut at 12, still
    # scored; row 1's first assistant token is its 19th: dropped; row 3 has no assistant message: dropped.
    rows = [{"messages": m} for m in CHATS] + [{"messages": [{"role": "user", "content": "hi"}]}]
    val = write_jsonl(tmp_path / "chat.jsonl", rows)
    r = _run("eval", chat_dirs[0], "--val", val, "--json", "--max-length", "12")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == 2
    line = next(x for x in r.stderr.splitlines() if "tokenized messages" in x)
    assert line.startswith("WARNING") and "2 rows, max length 12" in line
    assert "2 rows cut at 12 tokens" in line
    assert "1 rows dropped without an assistant token to score (no assistant message, or an empty one; rows 3)" \
        in line
    assert "1 rows dropped whose assistant tokens all lie beyond --max-length 12 (rows 1)" in line
    r = _run("eval", chat_dirs[0], "--val", val, "--json", "--max-length", "4")
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1, r.output
    assert "no chat row has an assistant token to score within --max-length 4" in errors[0]


def test_a_tokenizer_without_a_chat_template_is_a_one_line_error(lm, tmp_path):
    val = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    r = _run("eval", lm[0][0], "--val", val, "--json")
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1, r.output
    assert f"{lm[0][0]}: the tokenizer has no chat template" in errors[0] and "Traceback" not in r.stderr


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_dirs):
    tok = tokenizer(chat_dirs[0])
    # The generation prompt comes first: rendering more messages changes the text before them.
    tok.chat_template = ("{% if add_generation_prompt %}<assistant> {% endif %}"
                         "{% for m in messages %}<{{ m.role }}> {{ m.content }} [SEP] {% endfor %}")
    with pytest.raises(DataError, match=r"^chat row 0: the chat template renders message 1 \(assistant\) by "
                                        r"changing the text of the messages before it"):
        tokenize_chat(tok, [CHATS[0]], [0], 64)


def test_chat_rows_for_a_classifier_are_refused_when_asked_for(tmp_path):
    class Net(nn.Module):
        def forward(self, x):
            return x

    val = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m, "label": i % 2} for i, m in enumerate(CHATS)])
    with pytest.raises(DataError, match=r"^--text messages: chat messages are scored as a language model's next "
                                        r"tokens, and Net is a classification model; give a text column$"):
        load_inputs(DataConfig(str(val), text="messages"), ModelConfig(), ModelContext(Net(), []))


def test_chat_files_count_in_the_tokenizer_comparison(chat_dirs, tmp_path):
    """Another chat template renders other ids: candidates whose templates differ are refused."""
    other = tmp_path / "other"
    shutil.copytree(chat_dirs[1], other)
    (other / "chat_template.jinja").write_text(TEMPLATE.replace("<{{ m.role }}>", "{{ m.role }}:"))
    val = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    with pytest.raises(DataError, match=r"chat_template.jinja differs between ft1 and other"):
        load_inputs(DataConfig(str(val)), ModelConfig(),
                    ModelContext(load_model(chat_dirs[0]), hf_dirs([chat_dirs[0], other])))


def test_readme_lists_the_data_formats():
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    for form in ('"text"', '"prompt"', '"messages"', "conversational prompt/completion"):
        assert form in text
