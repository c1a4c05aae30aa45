"""Language models and text: tiny real transformers models (Llama, BERT heads) with the real MiniLM tokenizer.

Every figure is checked against an independent computation (the model's own ``labels=`` loss,
per-row perplexity without padding, plain accuracy), and every bad input fails through the CLI
with one ``error:`` line before the basis is built.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from text_fixtures import LABELS, load_model, save_finetunes, sentences, tokenizer, write_jsonl
from typer.testing import CliRunner

from twamerge.cli import app
from twamerge.config import DataConfig, ModelConfig
from twamerge.data import iter_batches
from twamerge.prepare import ModelContext, hf_dirs, load_inputs
from twamerge.tasks import CausalLM

pytest.importorskip("transformers")
runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "8", "--no-greedy"]


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def lm(tmp_path_factory):
    """Three LlamaForCausalLM fine-tunes whose tokenizer has an eos and no pad token, and texts."""
    root = tmp_path_factory.mktemp("lm")
    dirs = save_finetunes(root, "causal-lm", 3, eos_as_pad=True)
    texts = sentences(24)
    return dirs, write_jsonl(root / "val.jsonl", [{"text": t} for t in texts]), texts


@pytest.fixture(scope="session")
def clf(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    dirs = save_finetunes(root, "classification", 3)
    texts = sentences(30, seed=1)
    labels = [LABELS[i % 3] for i in range(30)]
    return dirs, write_jsonl(root / "val.jsonl", [{"sentence": t, "label": y} for t, y in zip(texts, labels)]), texts, labels


def _perplexity(folder: Path, texts: list[str]) -> float:
    """exp(mean next-token loss over every token of every row), one row at a time: no padding at all."""
    model, tok = load_model(folder), tokenizer(folder)
    total, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            logits = model(input_ids=ids).logits
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return math.exp(total / n)


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


def test_fit_a_causal_lm_from_a_jsonl_of_text(lm, tmp_path):
    dirs, val, texts = lm
    out, report = tmp_path / "merged", tmp_path / "r.json"
    r = _run("fit", *dirs, "--val", val, "-o", out, "--report", report, "--holdout", "0", "--epochs", "1",
             "--batch-size", "8")
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["metric_name"] == "perplexity" and rep["higher_is_better"] is False
    assert rep["model"]["task"] == "causal-lm"
    assert "lower is better" in r.stderr and "padding with eos" in r.stderr
    cands = {m["name"]: m["fit"]["metric"] for m in rep["methods"] if m["kind"] == "candidate"}
    for d in dirs:  # the report's perplexity is the padding-free per-row computation
        assert cands[d.name] == pytest.approx(_perplexity(d, texts), rel=1e-4)
    assert rep["best_candidate"] == min(cands, key=cands.get)  # lower is better
    greedy = next(m for m in rep["methods"] if m["kind"] == "greedy")
    assert greedy["fit"]["metric"] <= min(cands.values()) + 1e-9
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["twamerge.metric_name"] == "perplexity" and meta["twamerge.higher_is_better"] == "false"


def test_txt_ragged_ids_and_jsonl_text_give_the_same_figures(lm, tmp_path):
    dirs, val, texts = lm
    (tmp_path / "val.txt").write_text("\n".join(texts) + "\n\n")
    tok = tokenizer(dirs[0])
    ragged = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": tok(t)["input_ids"]} for t in texts])
    results = []
    for data in (val, tmp_path / "val.txt", ragged):
        r = _run("eval", dirs[0], "--val", data, "--json", "--batch-size", "5")
        assert r.exit_code == 0, r.output
        results.append(json.loads(r.stdout)["checkpoints"][0])
    assert results[0]["n"] == results[1]["n"] == results[2]["n"]
    assert results[1]["metric"] == pytest.approx(results[0]["metric"], rel=1e-6)
    assert results[2]["metric"] == pytest.approx(results[0]["metric"], rel=1e-6)


def test_prompt_completion_trains_and_scores_the_completion_only(lm, tmp_path):
    dirs, _, texts = lm
    rows = [{"prompt": t, "completion": " ".join(reversed(t.split()))} for t in texts[:12]]
    val = write_jsonl(tmp_path / "sft.jsonl", rows)
    model, tok = load_model(dirs[0]), tokenizer(dirs[0])
    data, task = load_inputs(DataConfig(str(val)), ModelConfig(), ModelContext(model, hf_dirs(dirs)))
    assert data.label == "labels"
    for i, row in enumerate(rows):
        prompt = tok(row["prompt"])["input_ids"]
        completion = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert data.columns["input_ids"][i].tolist() == prompt + completion
        assert data.columns["labels"][i].tolist() == [-100] * len(prompt) + completion
    batch = next(iter_batches(data, torch.arange(12), 12))
    assert task.count(batch) == sum(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    r = _run("fit", *dirs, "--val", val, "-o", tmp_path / "m", "--holdout", "0", *FAST)
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
    r = _run("fit", *dirs, "--val", val, "-o", tmp_path / "m", "--report", report, "--holdout", "0", *FAST)
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


def test_token_classification_accuracy_is_over_labelled_tokens(tmp_path):
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
    r = _run("fit", *dirs, "--val", val, "-o", tmp_path / "m", "--holdout", "0", *FAST)
    assert r.exit_code == 0, r.output


def _error_case(tmp_path, name, lm, clf):
    """(checkpoints, extra args, expected text) for each bad input."""
    lm_dirs, lm_val, _ = lm
    clf_dirs, _, texts, _ = clf
    if name == "no text column":
        return lm_dirs, ["--val", write_jsonl(tmp_path / "v.jsonl", [{"body": t} for t in texts])], "no input columns"
    if name == "tokenizer mismatch":
        other = tmp_path / "other"
        import shutil

        shutil.copytree(lm_dirs[1], other)
        with open(other / "vocab.txt", "a") as f:
            f.write("newtoken\n")
        return [lm_dirs[0], other, lm_dirs[2]], ["--val", lm_val], "vocab.txt differs between ft1 and other"
    if name == "unknown label":
        rows = [{"text": t, "label": "positive" if i else "meh"} for i, t in enumerate(texts)]
        return clf_dirs, ["--val", write_jsonl(tmp_path / "v.jsonl", rows)], "label 'meh' of column label is not in"
    if name == "model rejects the batch":
        rows = [{"input_ids": [101, 40000 + i, 102]} for i in range(24)]
        return lm_dirs, ["--val", write_jsonl(tmp_path / "v.jsonl", rows)], \
            "LlamaForCausalLM rejects a batch of input_ids [8, 3] int64: IndexError"
    rows = [{"text": t, "label": i % 5} for i, t in enumerate(texts)]
    return clf_dirs, ["--val", write_jsonl(tmp_path / "v.jsonl", rows)], "label 4 is out of range for a model with 3 outputs"


@pytest.mark.parametrize("name", ["no text column", "tokenizer mismatch", "unknown label", "model rejects the batch",
                                  "labels out of range"])
def test_bad_inputs_fail_in_one_line_before_the_basis(lm, clf, tmp_path, name):
    ckpts, args, expected = _error_case(tmp_path, name, lm, clf)
    out = tmp_path / "merged"
    r = _run("fit", *ckpts, *args, "-o", out, "--report", tmp_path / "r.json", *FAST)
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "basis:" not in r.stderr
    assert not out.exists() and not (tmp_path / "r.json").exists()


ASSETS = Path(__file__).parent / "assets"


def test_an_image_column_reaches_the_model_as_float_nchw(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    sys_path = str(ASSETS)
    import sys

    sys.path.insert(0, sys_path)
    from tiny_vision import build

    sys.path.remove(sys_path)
    ckpts = []
    for i in range(3):
        torch.manual_seed(i)
        save_file(build().state_dict(), str(tmp_path / f"c{i}.safetensors"))
        ckpts.append(tmp_path / f"c{i}.safetensors")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(20)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(20)]},
                               features=feats).save_to_disk(str(tmp_path / "val"))
    r = _run("fit", *ckpts, "--val", tmp_path / "val", "--model", f"{ASSETS / 'tiny_vision.py'}:build",
             "-o", tmp_path / "m.safetensors", "--json", *FAST)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metric_name"] == "accuracy"
    assert "20 images as float32 [20, 3, 8, 8] in [0, 1]" in r.stderr


def test_preprocess_maps_raw_columns_to_inputs(run, tmp_path):
    import datasets
    from digits_run import MODEL_SPEC

    ds = datasets.load_from_disk(str(run.val))
    rows = [{"pixels": " ".join(str(round(v * 16)) for v in x), "label": y} for x, y in zip(ds["x"], ds["label"])]
    val = write_jsonl(tmp_path / "pixels.jsonl", rows)
    r = _run("eval", run.checkpoints[-1], "--val", val, "--model", MODEL_SPEC, "--json",
             "--preprocess", f"{ASSETS / 'tiny_vision.py'}:pixels_from_text")
    assert r.exit_code == 0, r.output
    via_text = json.loads(r.stdout)["checkpoints"][0]
    r = _run("eval", run.checkpoints[-1], "--val", run.val, "--model", MODEL_SPEC, "--json")
    direct = json.loads(r.stdout)["checkpoints"][0]
    assert via_text["metric"] == pytest.approx(direct["metric"]) and via_text["loss"] == pytest.approx(direct["loss"])


def test_entropy_fits_without_labels(run, tmp_path, lm):
    import datasets
    from digits_run import MODEL_SPEC

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


def test_precision_bf16_autocasts_the_forward_and_learns_nearly_the_same_merge(run, tmp_path):
    from digits_run import fit_digits

    from twamerge.precision import resolve_precision

    assert resolve_precision("auto", torch.device("cpu"), torch.bfloat16) is None  # fp32 on a CPU
    a = fit_digits(run, tmp_path / "a.safetensors", greedy=False, eval_candidates=False, epochs=1)
    b = fit_digits(run, tmp_path / "b.safetensors", greedy=False, eval_candidates=False, epochs=1, precision="bf16")
    alphas_a, alphas_b = torch.tensor(a["merge"]["block_alphas"]), torch.tensor(b["merge"]["block_alphas"])
    assert not torch.equal(alphas_a, alphas_b)  # a bf16 forward gives slightly other gradients ...
    assert torch.allclose(alphas_a, alphas_b, atol=0.05)  # ... and nearly the same merge


def test_gradient_checkpointing_learns_the_same_merge(lm, tmp_path):
    """--gradient-checkpointing recomputes activations: the same gradients, so the same alphas (to float
    rounding), and a clear error for a model that cannot do it."""
    dirs, val, _ = lm
    reports = []
    for flag in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"m{len(flag)}"
        r = _run("fit", *dirs, "--val", val, "-o", out, "--epochs", "1", "--no-greedy", "--no-candidates",
                 "--report", tmp_path / f"r{len(flag)}.json", "-q", *flag)
        assert r.exit_code == 0, r.output
        reports.append(json.loads((tmp_path / f"r{len(flag)}.json").read_text()))
    a, b = (torch.tensor(r["merge"]["block_alphas"]) for r in reports)
    assert (a - 1 / 3).abs().max() > 1e-4 and torch.allclose(a, b, atol=1e-5)
    assert reports[1]["settings"]["gradient_checkpointing"] is True

    from digits_run import MODEL_SPEC, make_digits_run

    run = make_digits_run(tmp_path / "digits", epochs=2)
    r = _run("fit", *run.checkpoints, "--val", run.val, "--model", MODEL_SPEC, "-o", tmp_path / "x.safetensors",
             "--gradient-checkpointing")
    assert r.exit_code == 1 and "--gradient-checkpointing" in r.output and "gradient_checkpointing_enable" in r.output
    assert not (tmp_path / "x.safetensors").exists()
