"""Validation data: reading (one reader per file suffix, folders, text lines), the seeded stratified hold-out
split, and bad data refused before any output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from digits_run import FAST, MODEL_SPEC

from twamerge.config import DataConfig, FitConfig, ModelConfig
from twamerge.errors import DataError, FitError
from twamerge.pipeline import fit


@pytest.mark.parametrize("label_shape", [(), (12,)])
def test_holdout_split_is_disjoint_and_stratified_when_one_label_per_row(label_shape):
    from twamerge.data import TensorData, split_holdout
    from twamerge.tasks import Classification

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(100).remainder(4).reshape(100, *([1] * len(label_shape))).expand(100, *label_shape)
    # The task says what to stratify by (one class id per row); the split only follows it.
    strata = Classification().strata(labels.contiguous())
    assert (strata is None) == bool(label_shape)
    data = TensorData({"x": torch.randn(100, 3, generator=gen), "label": labels.contiguous()}, ("x",), "label", "t",
                      strata=strata)
    fit_idx, held_idx = split_holdout(data, 0.2, seed=0)
    assert sorted(torch.cat([fit_idx, held_idx]).tolist()) == list(range(100)) and held_idx.numel() == 20
    if not label_shape:  # one class label per row: each class keeps its share in the held-out rows
        assert torch.bincount(labels[held_idx]).tolist() == [5, 5, 5, 5]


def test_data_files_are_read_by_the_reader_registered_for_their_suffix(tmp_path, monkeypatch):
    from twamerge import data
    from twamerge.data import RawTable, data_reader, read_table

    assert {".safetensors", ".pt", ".pth", ".npz", ".csv", ".jsonl", ".parquet", ".txt"} <= set(data.data_suffixes())
    (tmp_path / "val.weird").write_text("1 2 3\n")
    with pytest.raises(DataError, match=r"^--val .*val.weird: unknown data format \(suffix '.weird'\); expected "
                                        r"\.safetensors, .*, a save_to_disk folder or a folder of data files$"):
        read_table(DataConfig(str(tmp_path / "val.weird")))
    # A new format is one registered function: read_table and everything after it take its table.
    monkeypatch.setattr(data, "_READERS", dict(data._READERS))

    @data_reader(".weird")
    def read_weird(path: Path, split: str | None) -> RawTable:
        return RawTable({"x": torch.tensor([float(v) for v in path.read_text().split()])}, str(path))

    table = read_table(DataConfig(str(tmp_path / "val.weird")))
    assert table.n == 3 and table.columns["x"].tolist() == [1.0, 2.0, 3.0] and table.kind("x") == "numeric"


def test_text_lines_and_data_folders(tmp_path):
    from twamerge.data import read_table

    (tmp_path / "val.txt").write_text("one line\n\n  \nanother line\n")
    assert read_table(DataConfig(str(tmp_path / "val.txt"))).columns == {"text": ["one line", "another line"]}
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"x": [1, 2], "label": 0}\n')
    (folder / "b.jsonl").write_text('{"x": [3], "label": 1}\n')
    (folder / "README.txt").write_text("not data\n")
    table = read_table(DataConfig(str(folder)))
    assert table.n == 2 and table.kind("x") == "ragged" and table.columns["label"].tolist() == [0, 1]
    (folder / "c.csv").write_text("x,label\n1,0\n")
    with pytest.raises(DataError, match=r"mixes file formats \['csv', 'json'\]; keep one format per --val"):
        read_table(DataConfig(str(folder)))


def _write_val(path: Path, columns: dict):
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("columns, match, error", [
    ({"x": [[0.0] * 64] * 20}, "no label column", DataError),
    ({"x": [[0.1] * 64] * 20, "label": [12] * 20}, "label 12 is out of range", DataError),
    ({"x": [[0.1] * 64] * 6, "label": [1, 2] * 3}, "leaves .* each needs at least", DataError),
    ({"x": [[float("nan")] * 64] * 40, "label": [1, 2] * 20}, "'x' holds NaN or Inf in 40 rows, first row 0",
     DataError),
    # With --allow-nonfinite-data the NaN reaches the model, and the fit stops at its loss.
    ({"x": [[float("nan")] * 64] * 40, "label": [1, 2] * 20, "allow": True}, "loss became nan at step 1", FitError),
])
def test_bad_validation_data(run, tmp_path, columns, match, error):
    allow = columns.pop("allow", False)
    val = _write_val(tmp_path / "val", columns)
    out = tmp_path / "m.safetensors"
    with pytest.raises(error, match=match):
        fit(run.checkpoints, val=DataConfig(str(val), allow_nonfinite_data=allow), model=ModelConfig(MODEL_SPEC),
            output=out, cfg=FitConfig(**FAST))
    assert not out.exists()


def test_empty_validation_data(run, tmp_path):
    import numpy as np

    val = tmp_path / "empty.npz"
    np.savez(val, x=np.zeros((0, 64), np.float32), label=np.zeros((0,), np.int64))
    with pytest.raises(DataError, match="empty"):
        fit(run.checkpoints, val=DataConfig(str(val)), model=ModelConfig(MODEL_SPEC), output=tmp_path / "m.safetensors",
            cfg=FitConfig(**FAST))
    assert not (tmp_path / "m.safetensors").exists()
