"""From the columns of --val to the model's inputs: the rules of prepare.py, and the task's part in them.

prepare.py finds the inputs and the label column and hands the label column to the task, which
shapes it and says what the split is stratified by; these tests check that hand-over, then the
rules on real data (prompt + completion rows, an image column, --preprocess).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
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
from twamerge.tasks import Classification, Regression

runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "8", "--no-greedy"]
ASSETS = Path(__file__).parent / "assets"
PACKAGE = Path(__file__).resolve().parents[1] / "twamerge"


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


class Net(nn.Module):
    def forward(self, x):
        return x


def _prepare(path: Path, **model):
    return load_inputs(DataConfig(str(path)), ModelConfig(**model), ModelContext(Net(), []))


# -- the order of the steps ---------------------------------------------------------------------------

def _relative_imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every relative ``from .module import names`` in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            out.append((node.module or "", [a.name for a in node.names]))
    return out


def _imported_modules(name: str) -> set[str]:
    """The twamerge modules ``twamerge/<name>.py`` imports (``from .x.y import`` -> x, ``from . import x`` -> x)."""
    out: set[str] = set()
    for module, names in _relative_imports(PACKAGE / f"{name}.py"):
        out |= {module.split(".")[0]} if module else set(names)
    return out


def test_data_flows_one_way_read_then_prepare_then_task():
    imported = {name: _imported_modules(name) for name in ("data", "prepare", "tasks", "text")}
    assert not imported["data"] & {"prepare", "tasks", "text"}  # reading knows nothing of what follows
    assert not imported["tasks"] & {"prepare", "text"}  # the task is handed its label column
    assert not imported["text"] & {"prepare", "tasks"}
    assert {"data", "tasks", "text"} <= imported["prepare"]


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{path.relative_to(PACKAGE)}: from .{module} import {name}"
                 for path in sorted(PACKAGE.rglob("*.py"))
                 for module, names in _relative_imports(path)
                 for name in names if name.startswith("_") and not name.startswith("__")]
    assert not offenders


# -- the label column, handed to the task ---------------------------------------------------------------

def test_integer_labels_are_class_ids_padded_with_ignore_index_and_stratify_the_split(tmp_path):
    y = torch.arange(40) % 4
    torch.save({"x": torch.randn(40, 3, dtype=torch.float64), "label": y}, tmp_path / "val.pt")
    data, task = _prepare(tmp_path / "val.pt")
    assert type(task) is Classification and data.inputs == ("x",) and data.label == "label"
    assert data.columns["x"].dtype == torch.float32  # float64 inputs become float32
    assert torch.equal(data.columns["label"], y) and data.pad["label"] == IGNORE_INDEX
    assert torch.equal(data.strata, y)  # Classification.strata: one class id per row
    assert torch.equal(data.subset(torch.tensor([5, 2])).strata, y[[5, 2]])


def test_float_targets_regress_as_float32_and_the_split_is_not_stratified(tmp_path):
    np.savez(tmp_path / "val.npz", x=np.ones((20, 3), np.float32), target=np.arange(20, dtype=np.float64))
    data, task = _prepare(tmp_path / "val.npz")
    assert type(task) is Regression and data.label == "target"
    assert data.columns["target"].dtype == torch.float32 and data.strata is None


def test_a_task_from_a_factory_shapes_the_labels_and_decides_the_split(tmp_path):
    (tmp_path / "mytask.py").write_text(
        "from twamerge.tasks import Classification\n"
        "class Shifted(Classification):\n"
        "    def shape_labels(self, column):\n"
        "        return super().shape_labels(column) + 1\n"
        "    def strata(self, labels):\n"
        "        return None\n"
        "def make():\n"
        "    return Shifted()\n")
    torch.save({"x": torch.randn(12, 3), "y": torch.arange(12) % 3}, tmp_path / "val.pt")
    data, task = _prepare(tmp_path / "val.pt", task=f"{tmp_path / 'mytask.py'}:make")
    assert type(task).__name__ == "Shifted" and data.label == "y"
    assert data.columns["y"].tolist() == [i % 3 + 1 for i in range(12)] and data.strata is None


def test_label_column_errors_name_the_columns(tmp_path):
    torch.save({"x": torch.randn(12, 3), "y": torch.arange(12) % 3}, tmp_path / "val.pt")
    with pytest.raises(DataError, match=r"^--label score: not a column of .*val.pt; columns: x, y$"):
        load_inputs(DataConfig(str(tmp_path / "val.pt"), label="score"), ModelConfig(), ModelContext(Net(), []))
    torch.save({"x": torch.randn(12, 3)}, tmp_path / "unlabelled.pt")
    with pytest.raises(DataError, match=r"no label column; expected one of label, labels, target, y \(columns: x\)"):
        _prepare(tmp_path / "unlabelled.pt")
    # A task whose labels are the input ids needs ids (or text) to take them from.
    with pytest.raises(DataError, match=r"a causal-lm model needs text or input_ids; columns: x$"):
        _prepare(tmp_path / "unlabelled.pt", task="causal-lm")


# -- the rules on real data ------------------------------------------------------------------------------

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
