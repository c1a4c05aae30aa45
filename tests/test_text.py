"""Text through the fit: tiny real transformers models (Llama, BERT heads) with the real MiniLM tokenizer.

Every figure is checked against an independent computation (per-row perplexity without padding),
text read as .txt, ragged ids and jsonl gives the same figures, and every bad input fails through
the CLI with one ``error:`` line before the basis is built. The tasks' labels and losses on these
models are tested in test_tasks.py; how columns become inputs (prompt + completion, images,
--preprocess) in test_prepare.py. The ``lm`` and ``clf`` fixtures are in conftest.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from text_fixtures import load_model, tokenizer, write_jsonl
from typer.testing import CliRunner

from twamerge.cli import app

pytest.importorskip("transformers")
runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "8", "--no-greedy"]


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


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
            "LlamaForCausalLM rejects a batch of input_ids [4, 3] int64: IndexError"  # evaluation.PROBE_ROWS rows
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
    for i, flag in enumerate(["--no-gradient-checkpointing", "--gradient-checkpointing"]):
        r = _run("fit", *dirs, "--val", val, "-o", tmp_path / f"m{i}", "--epochs", "1", "--no-greedy",
                 "--no-candidates", "--report", tmp_path / f"r{i}.json", "-q", flag)
        assert r.exit_code == 0, r.output
        reports.append(json.loads((tmp_path / f"r{i}.json").read_text()))
    a, b = (torch.tensor(r["merge"]["block_alphas"]) for r in reports)
    assert (a - 1 / 3).abs().max() > 1e-4 and torch.allclose(a, b, atol=1e-5)
    assert reports[0]["settings"]["gradient_checkpointing"] is False
    assert reports[1]["settings"]["gradient_checkpointing"] is True

    from digits_run import MODEL_SPEC, make_digits_run

    run = make_digits_run(tmp_path / "digits", epochs=2)
    r = _run("fit", *run.checkpoints, "--val", run.val, "--model", MODEL_SPEC, "-o", tmp_path / "x.safetensors",
             "--gradient-checkpointing")
    assert r.exit_code == 1 and "--gradient-checkpointing" in r.output and "gradient_checkpointing_enable" in r.output
    assert not (tmp_path / "x.safetensors").exists()
