"""Tasks: the labels' form, the classes the split is stratified by, the loss and the metric.

Unit tests of each task's ``shape_labels`` and ``strata`` and of ``resolve_task``; then the losses
and metrics on tiny real transformers models (the model's own ``labels=`` loss, accuracy over
labelled tokens, string labels through label2id, entropy without labels).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from digits_run import FAST, MODEL_SPEC
from text_fixtures import load_model, save_finetunes, sentences, tokenizer, write_jsonl
from torch import nn
from typer.testing import CliRunner

from twamerge.cli import app
from twamerge.config import DataConfig, FitConfig, ModelConfig
from twamerge.data import iter_batches
from twamerge.errors import DataError, ModelError
from twamerge.pipeline import fit
from twamerge.prepare import ModelContext, hf_dirs, load_inputs
from twamerge.tasks import (
    TASKS,
    CausalLM,
    Classification,
    CustomLoss,
    Entropy,
    LabelColumn,
    Regression,
    Task,
    TokenClassification,
    resolve_task,
)

runner = CliRunner()
CLI_FAST = ["--epochs", "1", "--batch-size", "8", "--no-greedy"]
LABEL2ID = {"negative": 0, "neutral": 1, "positive": 2}


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _column(values, kind="numeric", **kw) -> LabelColumn:
    return LabelColumn("label", values, kind, **kw)


# -- one definition of the ignored label -------------------------------------------------------------

def test_ignore_index_is_one_constant_shared_by_data_text_and_tasks():
    from twamerge import data, tasks, text

    # -100 is not a cached small int: separate definitions would be separate objects.
    assert data.IGNORE_INDEX == -100
    assert tasks.IGNORE_INDEX is data.IGNORE_INDEX and text.IGNORE_INDEX is data.IGNORE_INDEX


# -- label shaping ---------------------------------------------------------------------------------

def test_classification_maps_string_labels_through_label2id_and_names_an_unknown_one():
    task = Classification()
    got = task.shape_labels(_column(["positive", "negative", "positive"], "text", label2id=LABEL2ID))
    assert got.dtype == torch.long and got.tolist() == [2, 0, 2]
    with pytest.raises(DataError, match=r"^label 'meh' of column label is not in the model's label2id \(negative"):
        task.shape_labels(_column(["positive", "meh"], "text", label2id=LABEL2ID))
    with pytest.raises(DataError, match="holds strings .* and Net has no config.label2id"):
        task.shape_labels(_column(["positive"], "text", model_name="Net"))


def test_classification_renumbers_a_class_label_to_the_models_order_and_keeps_ignored_rows():
    task = Classification()
    names = ["positive", "negative", "neutral"]  # the data set's ids index these
    got = task.shape_labels(_column(torch.tensor([0, 1, 2, -1]), class_names=names, label2id=LABEL2ID))
    assert got.tolist() == [2, 0, 1, -1]
    # Same order as the model, or a model that names other classes: the ids as read.
    same = torch.tensor([0, 1, 2])
    assert task.shape_labels(_column(same, class_names=list(LABEL2ID), label2id=LABEL2ID)) is same
    assert task.shape_labels(_column(same, class_names=["a", "b", "c"], label2id=LABEL2ID)) is same


def test_classification_turns_bools_into_class_ids_and_refuses_other_columns():
    got = Classification().shape_labels(_column(torch.tensor([True, False])))
    assert got.dtype == torch.long and got.tolist() == [1, 0]
    with pytest.raises(DataError, match="^label column label: a image column; expected numbers or strings"):
        Classification().shape_labels(_column([object()], "image"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.float16])
def test_regression_targets_become_float32(dtype):
    got = Regression().shape_labels(_column(torch.arange(6, dtype=dtype).reshape(3, 2)))
    assert got.dtype == torch.float32 and got.tolist() == [[0, 1], [2, 3], [4, 5]]
    # A custom loss on a regression task gets the same float targets; on classification, ids as read.
    assert CustomLoss(lambda o, y: o, Regression()).shape_labels(_column(torch.arange(3))).dtype == torch.float32
    assert CustomLoss(lambda o, y: o, Classification()).shape_labels(_column(torch.arange(3))).dtype == torch.int64


def test_causal_lm_takes_token_id_labels_as_given_else_builds_them_from_the_ids():
    task = CausalLM()
    ids = [torch.tensor([-100, 5, 6]), torch.tensor([-100, 7])]
    assert task.shape_labels(_column(ids, "ragged")) is ids
    assert task.shape_labels(None) is None  # no label column: CausalLM.labels uses input_ids
    assert task.shape_labels(_column(["a", "b"], "text")) is None  # a text column is not token labels
    assert task.labels_from_inputs and not Classification().labels_from_inputs


# -- stratification ----------------------------------------------------------------------------------

def test_only_classification_with_one_integer_label_per_row_stratifies():
    ids = torch.tensor([0, 1, 2, 1])
    assert torch.equal(Classification().strata(ids), ids)
    assert torch.equal(Classification().strata(ids[:, None]), ids)  # [N, 1]: still one label per row
    assert Classification().strata(ids.float()) is None  # floats are not class ids
    assert Classification().strata(torch.zeros(4, 3, dtype=torch.long)) is None  # a sequence per row
    assert Classification().strata([torch.tensor([0, 1]), torch.tensor([1])]) is None  # ragged
    assert TokenClassification().strata(torch.zeros(4, 3, dtype=torch.long)) is None
    for task in (Regression(), CausalLM(), Entropy(Classification())):
        assert task.strata(ids) is None
    assert torch.equal(CustomLoss(lambda o, y: o, Classification()).strata(ids), ids)  # the base task's choice
    assert CustomLoss(lambda o, y: o, Regression()).strata(ids) is None


# -- choosing the task --------------------------------------------------------------------------------

class _Plain(nn.Module):
    def forward(self, x):
        return x


def test_auto_task_from_the_architecture_else_from_the_label_dtype():
    class LlamaForCausalLM(nn.Module):
        config = type("Config", (), {"architectures": None})()

    assert isinstance(resolve_task("auto", "auto", LlamaForCausalLM(), None), CausalLM)
    assert type(resolve_task("auto", "auto", _Plain(), torch.tensor([0, 1]))) is Classification
    assert type(resolve_task("auto", "auto", _Plain(), torch.tensor([0.5]))) is Regression
    assert type(resolve_task("auto", "auto", _Plain(), [torch.tensor([0.5, 1.0])])) is Regression
    assert type(resolve_task("auto", "mse", _Plain(), torch.tensor([0, 1]))) is Regression
    assert type(resolve_task("auto", "ce", _Plain(), torch.tensor([0.5]))) is Classification
    ent = resolve_task("causal-lm", "entropy", _Plain(), None)
    assert isinstance(ent, Entropy) and ent.token_level and not ent.needs_labels
    with pytest.raises(ModelError, match="^--task 'nope': expected auto, classification, causal-lm"):
        resolve_task("nope", "auto", _Plain(), None)


def test_a_new_task_is_one_class_and_one_registry_entry(monkeypatch):
    class Ranking(Task):
        name = "ranking"

    monkeypatch.setitem(TASKS, "ranking", Ranking)
    assert isinstance(resolve_task("ranking", "auto", _Plain(), None), Ranking)


# -- losses and metrics on real models ------------------------------------------------------------

def test_causal_lm_loss_is_the_models_own_labels_loss_and_padding_is_never_a_label(lm):
    dirs, val, texts = lm
    model = load_model(dirs[0])
    data, task = load_inputs(DataConfig(str(val)), ModelConfig(), ModelContext(model, hf_dirs(dirs)))
    assert isinstance(task, CausalLM) and task.metric_name == "perplexity" and not task.higher_is_better
    assert data.inputs == ("input_ids", "attention_mask")  # token_type_ids: Llama's forward takes none
    batch = next(iter_batches(data, torch.arange(8), 8))
    mask = batch.inputs["attention_mask"]
    assert (mask == 0).any()  # rows of different lengths: padded per batch
    pad = tokenizer(dirs[0]).sep_token_id  # eos stands in for the missing pad token ...
    assert (batch.inputs["input_ids"][mask == 0] == pad).all()
    labels = CausalLM.labels(batch)
    assert (labels[mask == 0] == -100).all() and (labels[mask == 1] == pad).sum() == 8  # ... and real eos stay labels
    with torch.no_grad():
        out = model(**batch.inputs)
        own = model(**batch.inputs, labels=labels).loss
        total, n = task.loss(out, batch)
    assert n == task.count(batch) == int((labels[:, 1:] != -100).sum())
    assert float(total) / n == pytest.approx(float(own), rel=1e-5)


def test_token_classification_accuracy_is_over_labelled_tokens(tmp_path):
    pytest.importorskip("transformers")
    dirs = save_finetunes(tmp_path, "token-classification", 3)
    tok = tokenizer(dirs[0])
    rows = []
    for i, t in enumerate(sentences(16, seed=2)):
        ids = tok(t)["input_ids"]
        rows.append({"input_ids": ids, "labels": [-100] + [(i + j) % 4 for j in range(len(ids) - 2)] + [-100]})
    val = write_jsonl(tmp_path / "ner.jsonl", rows)
    r = _run("eval", dirs[0], "--val", val, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["checkpoints"][0]
    model = load_model(dirs[0])
    correct = n = 0
    with torch.no_grad():
        for row in rows:
            pred = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].argmax(-1)
            y = torch.tensor(row["labels"])
            correct += int((pred[y != -100] == y[y != -100]).sum())
            n += int((y != -100).sum())
    assert got["n"] == n and got["metric"] == pytest.approx(correct / n) and got["metric"] <= 1
    r = _run("fit", *dirs, "--val", val, "-o", tmp_path / "m", "--holdout", "0", *CLI_FAST)
    assert r.exit_code == 0, r.output


def _accuracy(folder: Path, texts: list[str], labels: list[str]) -> float:
    model, tok = load_model(folder), tokenizer(folder)
    with torch.no_grad():
        pred = [int(model(**tok(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    return sum(model.config.id2label[p] == y for p, y in zip(pred, labels)) / len(texts)


def test_sequence_classification_with_string_labels_and_class_labels(clf, tmp_path):
    import datasets

    dirs, val, texts, labels = clf
    report = tmp_path / "r.json"
    r = _run("fit", *dirs, "--val", val, "-o", tmp_path / "m", "--report", report, "--holdout", "0", *CLI_FAST)
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["metric_name"] == "accuracy" and rep["higher_is_better"] is True
    for m in rep["methods"]:
        if m["kind"] == "candidate":
            assert m["fit"]["metric"] == pytest.approx(_accuracy(Path(m["path"]), texts, labels), abs=1e-9)
        assert 0 <= m["fit"]["metric"] <= 1
    # The same rows as a ClassLabel whose names are in another order than the model's label2id.
    names = ["positive", "negative", "neutral"]
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"text": texts, "label": [names.index(y) for y in labels]},
                               features=feats).save_to_disk(str(tmp_path / "cl"))
    r = _run("eval", dirs[0], "--val", tmp_path / "cl", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["checkpoints"][0]["metric"] == pytest.approx(_accuracy(dirs[0], texts, labels))


def test_entropy_fits_without_labels(run, tmp_path, lm):
    import datasets

    x = datasets.load_from_disk(str(run.val))["x"]
    datasets.Dataset.from_dict({"x": x}).save_to_disk(str(tmp_path / "unlabeled"))
    report = tmp_path / "r.json"
    r = _run("fit", *run.checkpoints, "--val", tmp_path / "unlabeled", "--model", MODEL_SPEC, "--loss", "entropy",
             "-o", tmp_path / "m.safetensors", "--report", report, "--epochs", "2", "--batch-size", "64")
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["metric_name"] == "entropy" and rep["higher_is_better"] is False
    twa, uniform = (next(m for m in rep["methods"] if m["kind"] == k) for k in ("twa", "uniform"))
    assert twa["fit"]["metric"] < uniform["fit"]["metric"]  # the objective went down
    assert all(m["fit"]["metric"] == m["fit"]["loss"] for m in rep["methods"])  # no accuracy exists
    # A causal LM: the entropy of the next-token distribution at every real (unpadded) position.
    dirs, val, _ = lm
    r = _run("eval", dirs[0], "--val", val, "--loss", "entropy", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["metric_name"] == "entropy" and 0 < got["checkpoints"][0]["metric"] <= math.log(30522) + 1e-6


def test_bad_loss_spec_names_the_loss_option(run, tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(ModelError, match="^--loss 'no_such_module_xyz:fn': cannot import module"):
        fit(run.checkpoints, val=DataConfig(str(run.val)), model=ModelConfig(MODEL_SPEC, loss="no_such_module_xyz:fn"),
            output=out, cfg=FitConfig(**FAST))
    assert not out.exists()
