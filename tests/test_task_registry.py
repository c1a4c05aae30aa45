"""--task auto: a transformers head's task comes from transformers' own auto mappings, not from its class name.

GPT2LMHeadModel does not end in ForCausalLM and is a causal LM; BartForConditionalGeneration is in the
masked-LM mapping and is a seq2seq model. Each mapping is checked on a model built from a tiny config,
a folder of GPT-2 (the reported case) is scored as a language model end to end, and a masked-LM head's
loss is the model's own ``labels=`` loss.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from ckpt_fixtures import minilm_dir
from text_fixtures import VOCAB, sentences, tokenizer, write_jsonl
from typer.testing import CliRunner

from twamerge.cli import app
from twamerge.config import DataConfig, ModelConfig
from twamerge.data import iter_batches
from twamerge.errors import ModelError
from twamerge.prepare import ModelContext, load_inputs
from twamerge.tasks import (
    HEAD_MAPPINGS,
    CausalLM,
    Classification,
    MaskedLM,
    TokenClassification,
    resolve_task,
    task_of_architecture,
)

transformers = pytest.importorskip("transformers")
runner = CliRunner()

BERT = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32)


def _tiny(name: str):
    """A model of class ``name`` from a config small enough to build in milliseconds."""
    t = transformers
    configs = {
        "GPT2LMHeadModel": lambda: t.GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=1, n_head=2),
        "OpenAIGPTLMHeadModel": lambda: t.OpenAIGPTConfig(vocab_size=100, n_positions=32, n_embd=16, n_layer=1,
                                                          n_head=2),
        "LlamaForCausalLM": lambda: t.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
        "BertForSequenceClassification": lambda: t.BertConfig(**BERT, num_labels=3),
        "BertForTokenClassification": lambda: t.BertConfig(**BERT, num_labels=4),
        "BertForMaskedLM": lambda: t.BertConfig(**BERT),
        "ViTForImageClassification": lambda: t.ViTConfig(image_size=8, patch_size=4, hidden_size=16,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=32, num_labels=3),
        "T5ForConditionalGeneration": lambda: t.T5Config(vocab_size=100, d_model=16, d_ff=32, d_kv=8, num_layers=1,
                                                         num_heads=2),
        "BartForConditionalGeneration": lambda: t.BartConfig(vocab_size=100, d_model=16, encoder_layers=1,
                                                             decoder_layers=1, encoder_attention_heads=2,
                                                             decoder_attention_heads=2, encoder_ffn_dim=32,
                                                             decoder_ffn_dim=32, max_position_embeddings=32),
        "BertModel": lambda: t.BertConfig(**BERT),
    }
    return getattr(t, name)(configs[name]())


@pytest.mark.parametrize("name, task", [
    ("GPT2LMHeadModel", CausalLM), ("OpenAIGPTLMHeadModel", CausalLM), ("LlamaForCausalLM", CausalLM),
    ("BertForSequenceClassification", Classification), ("BertForTokenClassification", TokenClassification),
    ("BertForMaskedLM", MaskedLM), ("ViTForImageClassification", Classification)])
def test_each_mapping_gives_its_task(name, task):
    model = _tiny(name)
    assert type(resolve_task("auto", "auto", model, None)) is task
    # config.architectures, as a saved folder has it, decides the same way as the class.
    model.config.architectures = [name]
    assert type(resolve_task("auto", "auto", model, torch.tensor([0.5]))) is task


def test_the_registry_is_transformers_own_mappings_in_their_order_of_precedence():
    from transformers.models.auto import modeling_auto

    assert task_of_architecture(["GPT2LMHeadModel"]) == ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    # BART's head is in the masked-LM mapping too; the seq2seq mapping comes first.
    assert "BartForConditionalGeneration" in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()
    assert task_of_architecture(["BartForConditionalGeneration"])[0] is None
    # The first architecture known wins; none known: None.
    assert task_of_architecture(["NoSuchModel", "BertForMaskedLM"])[0] == "masked-lm"
    assert task_of_architecture(["NoSuchModel"]) is None
    for mapping, _ in HEAD_MAPPINGS:  # every mapping named exists in this transformers
        assert getattr(modeling_auto, mapping)


def test_a_custom_code_head_gets_its_task_from_its_auto_map():
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM",
                "AutoModelForSequenceClassification": "modeling_x.XForClassifying"}
    assert task_of_architecture(["XForCausalLM"], auto_map) == (
        "causal-lm", "auto_map AutoModelForCausalLM: modeling_x.XForCausalLM")
    assert task_of_architecture(["XForClassifying"], auto_map)[0] == "classification"
    assert task_of_architecture(["XModel"], auto_map) is None


@pytest.mark.parametrize("name, expected", [
    ("BertModel", r"^BertModel is in none of transformers' task mappings \(causal LM, .*\), so --task auto cannot "
                  r"tell what it predicts; pass --task classification\|causal-lm\|.* or --task module:fn$"),
    ("T5ForConditionalGeneration", r"^T5ForConditionalGeneration is a sequence-to-sequence head "
                                   r"\(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES\), and twamerge has no task "
                                   r"for it"),
    ("BartForConditionalGeneration", r"^BartForConditionalGeneration is a sequence-to-sequence head")])
def test_a_head_of_no_known_kind_is_a_one_line_error_naming_it_and_task(name, expected):
    model = _tiny(name)
    with pytest.raises(ModelError, match=expected) as err:
        resolve_task("auto", "auto", model, torch.tensor([0, 1]))
    assert "\n" not in str(err.value) and "--task" in str(err.value)
    # An explicit --task is obeyed, whatever the head.
    assert type(resolve_task("classification", "auto", model, None)) is Classification


def test_a_gpt2_folder_with_text_rows_is_scored_as_a_language_model(tmp_path):
    """The report: GPT2LMHeadModel + {"text"} rows stopped with 'no label column'. Now its perplexity is that of
    the model's own next-token loss over every token of every row."""
    import shutil

    folder = tmp_path / "gpt2"
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16,
                                                                 n_layer=1, n_head=2))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(minilm_dir() / name, folder / name)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    texts = sentences(10, seed=3)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": t} for t in texts])
    r = runner.invoke(app, ["eval", str(folder), "--val", str(val), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["task"] == "causal-lm" and out["metric_name"] == "perplexity"
    tok, total, n = tokenizer(folder), 0.0, 0
    model.eval()
    with torch.no_grad():
        for t in texts:  # one row at a time: no padding at all
            enc = tok(t, return_tensors="pt")  # what the tokenizer gives (BERT's has token_type_ids)
            ids = enc["input_ids"]
            total += float(model(**enc, labels=ids).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert out["checkpoints"][0]["n"] == n
    assert out["checkpoints"][0]["metric"] == pytest.approx(math.exp(total / n), rel=1e-5)


def test_a_masked_lm_scores_the_masked_positions_as_the_model_does(tmp_path):
    """BertForMaskedLM with pre-masked ids and -100 labels elsewhere (as DataCollatorForLanguageModeling writes
    them): the task's loss is the model's own labels= loss, its metric exp of it."""
    model = _tiny("BertForMaskedLM").eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(6):
        ids = torch.randint(5, 100, (6 + i,), generator=g)
        labels = torch.full_like(ids, -100)
        masked = torch.tensor([1, 3 + i % 2])
        labels[masked] = ids[masked]
        ids[masked] = 4  # the mask token's id
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    val = write_jsonl(tmp_path / "mlm.jsonl", rows)
    data, task = load_inputs(DataConfig(str(val)), ModelConfig(), ModelContext(model, []))
    assert type(task) is MaskedLM and data.label == "labels"
    batch = next(iter_batches(data, torch.arange(6), 6))
    with torch.no_grad():
        output = model(**batch.inputs)
        loss_sum, n = task.loss(output, batch)
        own = model(**batch.inputs, labels=batch.target).loss
    assert n == 12 and float(loss_sum) / n == pytest.approx(float(own), rel=1e-5)
    scores = task.finish(*task.sums(output, batch))
    assert scores["metric"] == pytest.approx(math.exp(float(own)), rel=1e-5) and not task.higher_is_better
