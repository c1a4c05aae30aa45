"""Open local validation data, pick columns, split off a held-out part, and yield batches.

Everything is read into memory as tensors: validation sets are small next to the checkpoints, and
random access makes the seeded, stratified split and the shuffles trivial. Nothing here touches
the network (``datasets`` is used only on local paths).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError
from .io.formats import Reader
from .io.formats.safetensors import SafetensorsReader
from .io.formats.torch_pickle import NotATensorMapping, TorchReader

log = logging.getLogger(__name__)

LABEL_CANDIDATES = ("label", "labels", "target", "y")
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")


@dataclass
class TensorData:
    """Columns as tensors with a common first dimension ``n``."""

    columns: dict[str, torch.Tensor]
    inputs: tuple[str, ...]
    label: str | None
    source: str

    @property
    def n(self) -> int:
        return next(iter(self.columns.values())).shape[0]

    @property
    def is_classification(self) -> bool:
        return self.label is not None and not torch.is_floating_point(self.columns[self.label])

    def subset(self, index: torch.Tensor) -> "TensorData":
        return TensorData({k: v[index] for k, v in self.columns.items()}, self.inputs, self.label, self.source)


def _from_hf(ds, source: str) -> dict[str, torch.Tensor]:
    columns: dict[str, torch.Tensor] = {}
    for name in ds.column_names:
        try:
            values = ds.with_format("numpy", columns=[name])[name]
            array = np.asarray(values)
        except Exception:  # ragged sequences, nested structures: not usable as one tensor
            log.debug("column %s of %s is not a rectangular array; ignored", name, source)
            continue
        if array.dtype.kind in "biuf":
            columns[name] = torch.from_numpy(np.ascontiguousarray(array))
        else:
            log.debug("column %s of %s has dtype %s; ignored", name, source, array.dtype)
    return columns


def _load_hf_dir(path: Path, split: str | None):
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot be read by datasets.load_from_disk ({exc})") from exc
    if isinstance(obj, datasets.DatasetDict):
        names = list(obj.keys())
        if split is None:
            preferred = [s for s in ("validation", "val", "valid", "test") if s in obj]
            if len(names) == 1:
                split = names[0]
            elif preferred:
                split = preferred[0]
            else:
                raise DataError(f"{path}: a DatasetDict with splits {names}; choose one with --split")
        if split not in obj:
            raise DataError(f"{path}: no split {split!r}; available splits: {names}")
        return obj[split]
    if split is not None:
        log.warning("--split %s ignored: %s holds a single Dataset", split, path)
    return obj


def _load_files(path: Path, split: str | None):
    import datasets

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS)
    if not files:
        raise DataError(
            f"{path}: no data files found; expected a save_to_disk folder or {', '.join(FILE_BUILDERS)} files"
        )
    builders = {FILE_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise DataError(f"{path}: mixes file formats {sorted(builders)}; keep one format per --val")
    try:
        return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split=split or "train")
    except Exception as exc:
        raise DataError(f"{path}: cannot be read by datasets.load_dataset ({exc})") from exc


def _read_with(reader: Reader) -> dict[str, torch.Tensor]:
    try:
        return {k: reader.read(k) for k in reader.entries()}
    finally:
        reader.close()


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    # The checkpoint readers, so a data file gets the same safety (weights-only unpickling) as a
    # candidate; but never their container unwrapping: a data file is a flat {column: tensor}.
    try:
        if path.suffix == ".safetensors":
            obj = _read_with(SafetensorsReader(path))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                obj = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            obj = _read_with(TorchReader(path, unwrap=False))
    except NotATensorMapping:
        raise DataError(f"{path}: expected a mapping of column name -> tensor") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as a tensor file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: expected a mapping of column name -> tensor")
    return dict(obj)


def load_data(cfg: DataConfig) -> TensorData:
    """Open ``cfg.path`` and return its usable columns as tensors.

    Raises:
        DataError: missing path, unreadable data, no rows, no label column, unknown columns.
    """
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"--val {path}: no such file or directory")
    if path.is_file() and path.suffix in TENSOR_SUFFIXES:
        columns = _load_tensor_file(path)
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                            or (path / "state.json").exists()):
        columns = _from_hf(_load_hf_dir(path, cfg.split), str(path))
    else:
        columns = _from_hf(_load_files(path, cfg.split), str(path))
    if not columns:
        raise DataError(f"--val {path}: no numeric columns found")
    lengths = {k: v.shape[0] if v.dim() else 0 for k, v in columns.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"--val {path}: columns have different lengths {lengths}")
    if next(iter(lengths.values())) == 0:
        raise DataError(f"--val {path}: the data set is empty (0 rows)")
    label = cfg.label
    if label is None:
        label = next((c for c in LABEL_CANDIDATES if c in columns), None)
        if label is None:
            raise DataError(
                f"--val {path}: no label column; expected one of {', '.join(LABEL_CANDIDATES)} "
                f"(columns: {', '.join(columns)}); name it with --label"
            )
    elif label not in columns:
        raise DataError(f"--label {label}: not a numeric column of {path}; columns: {', '.join(columns)}")
    if cfg.inputs:
        missing = [c for c in cfg.inputs if c not in columns]
        if missing:
            raise DataError(f"--inputs {','.join(missing)}: not numeric columns of {path}; columns: {', '.join(columns)}")
        inputs = tuple(cfg.inputs)
    else:
        inputs = tuple(c for c in columns if c != label)
    if not inputs:
        raise DataError(f"--val {path}: no input columns besides the label {label!r}")
    keep = {c: columns[c] for c in (*inputs, label)}
    if keep[label].dtype == torch.bool:
        keep[label] = keep[label].long()
    for name in inputs:
        if keep[name].dtype == torch.float64:
            keep[name] = keep[name].float()
    check_finite_columns(keep, path, allow=cfg.allow_nonfinite_data)
    return TensorData(keep, inputs, label, str(path))


def check_finite_columns(columns: dict[str, torch.Tensor], path: Path, *, allow: bool = False) -> None:
    """Refuse complex columns, and NaN/Inf anywhere (unless ``allow``), naming the column and first row."""
    for name, col in columns.items():
        if col.is_complex():
            raise DataError(f"--val {path}: column {name!r} is complex ({col.dtype}); inputs and labels must be real")
    if allow:
        return
    for name, col in columns.items():
        if not col.is_floating_point():
            continue
        bad = ~torch.isfinite(col.float() if col.dtype.itemsize == 1 else col)
        if bool(bad.any()):
            rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten()
            raise DataError(f"--val {path}: column {name!r} holds NaN or Inf in {rows.numel()} rows, first row "
                            f"{int(rows[0])}; clean the data or pass --allow-nonfinite-data")


def split_holdout(data: TensorData, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split into (fit, held-out) row indices, stratified by label for one-label-per-row classification.

    Raises:
        DataError: when either part would hold fewer than a handful of rows.
    """
    gen = torch.Generator().manual_seed(seed)
    n = data.n
    if fraction == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.long)
    # Stratify by class when there is one label per row (not, e.g., a token sequence per row).
    if data.is_classification and data.columns[data.label].numel() == n:
        labels = data.columns[data.label].reshape(n)
        fit, held = [], []
        for value in torch.unique(labels):
            rows = (labels == value).nonzero().flatten()
            rows = rows[torch.randperm(rows.numel(), generator=gen)]
            k = int(round(rows.numel() * fraction))
            held.append(rows[:k])
            fit.append(rows[k:])
        fit_idx, held_idx = torch.cat(fit), torch.cat(held)
    else:
        perm = torch.randperm(n, generator=gen)
        k = int(round(n * fraction))
        held_idx, fit_idx = perm[:k], perm[k:]
    minimum = 4
    if held_idx.numel() < minimum or fit_idx.numel() < minimum:
        raise DataError(
            f"--holdout {fraction} of {n} rows leaves {fit_idx.numel()} to fit and {held_idx.numel()} held out; "
            f"each needs at least {minimum}: give more data or change --holdout"
        )
    return fit_idx.sort().values, held_idx.sort().values


def iter_batches(
    data: TensorData, index: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Yield (inputs by column name, label) batches over ``index``; shuffled when a generator is given."""
    if generator is not None:
        index = index[torch.randperm(index.numel(), generator=generator)]
    for start in range(0, index.numel(), batch_size):
        rows = index[start:start + batch_size]
        yield {c: data.columns[c][rows] for c in data.inputs}, data.columns[data.label][rows]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
