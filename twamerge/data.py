"""Open local validation data, split off a held-out part, and yield padded batches.

Reading (:func:`read_table`) keeps every column it can use as read: numbers, ragged sequences,
text and images; which become the model's inputs and labels is decided in ``prepare.py``.

Everything is read into memory as tensors: validation sets are small next to the checkpoints, and
random access makes the seeded, stratified split and the shuffles trivial. Nothing here touches
the network (``datasets`` is used only on local paths).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError
from .io.formats import Reader
from .io.formats.safetensors import SafetensorsReader
from .io.formats.torch_pickle import NotATensorMapping, TorchReader

log = logging.getLogger(__name__)

LABEL_CANDIDATES = ("label", "labels", "target", "y")
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow",
                 ".txt": "text"}
TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")


@dataclass
class RawTable:
    """The columns of ``--val`` as read, before any column is chosen as an input or a label.

    A column is a tensor ``[N, ...]`` (rectangular numbers), a list of 1-D tensors (ragged
    sequences such as token ids), a list of ``str`` (text) or a list of images (a datasets
    ``Image`` column, decoded). ``class_names`` holds the names of ClassLabel columns; ``dropped``
    the columns that cannot be used and why.
    """

    columns: dict[str, Any]
    source: str
    class_names: dict[str, list[str]] = field(default_factory=dict)
    images: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def kind(self, name: str) -> str:
        """``numeric`` (a tensor), ``ragged`` (a list of 1-D tensors), ``text``, ``image`` or ``other``."""
        col = self.columns[name]
        if isinstance(col, torch.Tensor):
            return "numeric"
        if name in self.images:
            return "image"
        first = next((v for v in col if v is not None), None)
        if isinstance(first, torch.Tensor):
            return "ragged"
        if isinstance(first, str):
            return "text"
        return "other"


@dataclass
class TensorData:
    """Model-ready columns with a common first dimension ``n``.

    A column is a tensor ``[N, ...]`` or, for sequences of different lengths, a list of ``N`` 1-D
    tensors that :func:`iter_batches` pads per batch with ``pad[name]`` (the tokenizer's pad id for
    ``input_ids``, 0 for ``attention_mask``, -100 for ``labels``), as a trainer's collator does.
    """

    columns: dict[str, torch.Tensor | list[torch.Tensor]]
    inputs: tuple[str, ...]
    label: str | None
    source: str
    pad: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        first = next(iter(self.columns.values()))
        return first.shape[0] if isinstance(first, torch.Tensor) else len(first)

    @property
    def is_classification(self) -> bool:
        col = self.columns.get(self.label) if self.label is not None else None
        return isinstance(col, torch.Tensor) and not torch.is_floating_point(col)

    def subset(self, index: torch.Tensor) -> "TensorData":
        rows = index.tolist()
        return TensorData({k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in rows]
                           for k, v in self.columns.items()}, self.inputs, self.label, self.source, dict(self.pad))

    def label_values(self) -> torch.Tensor | None:
        """Every label of the data as one flat tensor (ragged rows concatenated), or None without labels."""
        if self.label is None:
            return None
        col = self.columns[self.label]
        return col.reshape(-1) if isinstance(col, torch.Tensor) else torch.cat([v.reshape(-1) for v in col])


@dataclass
class Batch:
    """One batch as the model and the task see it.

    Attributes:
        inputs: the model's inputs by name, each ``[B, ...]`` (ragged columns padded to the
            batch's longest row, e.g. ``input_ids`` and ``attention_mask`` ``[B, T]``).
        target: the labels ``[B]`` or ``[B, T]`` (-100: ignored), or None (causal LM without a
            label column, ``--loss entropy``).
    """

    inputs: dict[str, torch.Tensor]
    target: torch.Tensor | None

    @property
    def rows(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def shard(self, lo: int, hi: int) -> "Batch":
        """Rows ``lo:hi`` (a rank's share of a global batch; the padding stays that of the whole batch)."""
        return Batch({k: v[lo:hi] for k, v in self.inputs.items()},
                     None if self.target is None else self.target[lo:hi])

    def to(self, device: torch.device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.inputs.items()},
                     None if self.target is None else self.target.to(device))

    def describe(self) -> str:
        """``input_ids [8, 17] int64, attention_mask [8, 17] int64`` (for error messages)."""
        return ", ".join(f"{k} {list(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in self.inputs.items())


def _read_hf(ds, source: str) -> RawTable:
    """The columns of a datasets ``Dataset``: numbers as tensors, ragged sequences, text, images, ClassLabels."""
    import datasets

    table = RawTable({}, source)
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            table.columns[name] = list(ds[name])
            table.images.add(name)
            continue
        if isinstance(feature, datasets.ClassLabel):
            table.class_names[name] = list(feature.names)
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            table.columns[name] = list(ds[name])
            continue
        try:
            array = np.asarray(ds.with_format("numpy", columns=[name])[name])
        except Exception:  # lists of different lengths per row (token ids), nested structures
            array = None
        if array is not None and array.dtype.kind in "biuf":
            table.columns[name] = torch.from_numpy(np.ascontiguousarray(array))
        elif array is None or array.dtype == object:
            ragged = _ragged(list(ds[name]))
            if ragged is None:
                table.dropped[name] = "neither numbers, a list of numbers per row, text nor an image"
            else:
                table.columns[name] = ragged
        else:
            table.dropped[name] = f"dtype {array.dtype} is neither numbers, text nor an image"
    return table


def _ragged(values: list) -> list[torch.Tensor] | None:
    """One 1-D tensor per row for lists of numbers of different lengths (token ids); None otherwise."""
    out = []
    for v in values:
        a = np.asarray(v if v is not None else [])
        if a.ndim != 1 or (a.size and a.dtype.kind not in "biuf"):
            return None
        out.append(torch.from_numpy(a.astype(np.int64 if a.dtype.kind in "biu" or not a.size else np.float32)))
    return out


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
    if path.is_dir() and any(p.suffix != ".txt" for p in files):
        files = [p for p in files if p.suffix != ".txt"]  # a README.txt beside data files is not data
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


def read_table(cfg: DataConfig) -> RawTable:
    """Open ``cfg.path`` and return its columns as read (:class:`RawTable`).

    A ``.txt`` file is one example per line (empty lines skipped) in a column ``text``.

    Raises:
        DataError: missing path, unreadable data, no rows, columns of different lengths.
    """
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"--val {path}: no such file or directory")
    if path.is_file() and path.suffix in TENSOR_SUFFIXES:
        table = RawTable(dict(_load_tensor_file(path)), str(path))
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                            or (path / "state.json").exists()):
        table = _read_hf(_load_hf_dir(path, cfg.split), str(path))
    else:
        table = _read_hf(_load_files(path, cfg.split), str(path))
        if path.suffix == ".txt" or (path.is_dir() and "text" in table.columns and len(table.columns) == 1):
            lines = table.columns.get("text", [])
            kept = [t for t in lines if t and t.strip()]
            if len(kept) < len(lines):
                log.info("--val %s: %d empty line(s) skipped", path, len(lines) - len(kept))
            table.columns["text"] = kept
    if not table.columns:
        dropped = "; ".join(f"{k}: {v}" for k, v in table.dropped.items())
        raise DataError(f"--val {path}: no usable columns" + (f" ({dropped})" if dropped else ""))
    lengths = {k: len(v) if not isinstance(v, torch.Tensor) else (v.shape[0] if v.dim() else 0)
               for k, v in table.columns.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"--val {path}: columns have different lengths {lengths}")
    if next(iter(lengths.values())) == 0:
        raise DataError(f"--val {path}: the data set is empty (0 rows)")
    return table


def check_finite_columns(columns: dict[str, Any], source: str, *, allow: bool = False) -> None:
    """Refuse complex columns, and NaN/Inf anywhere (unless ``allow``), naming the column and first row.

    ``columns`` are the model's inputs and the label, as tensors ``[N, ...]`` or lists of per-row
    tensors (ragged sequences).
    """
    def rows_of(col: Any) -> list[torch.Tensor] | torch.Tensor:
        return col if isinstance(col, torch.Tensor) else [t for t in col if isinstance(t, torch.Tensor)]

    for name, col in columns.items():
        parts = rows_of(col)
        if any(t.is_complex() for t in ([parts] if isinstance(parts, torch.Tensor) else parts)):
            raise DataError(f"--val {source}: column {name!r} is complex; inputs and labels must be real")
    if allow:
        return
    for name, col in columns.items():
        parts = rows_of(col)
        if isinstance(parts, torch.Tensor):
            if not parts.is_floating_point():
                continue
            bad = ~torch.isfinite(parts.float() if parts.dtype.itemsize == 1 else parts)
            rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten() if bad.numel() else bad.new_zeros(0)
        else:
            rows = torch.tensor([i for i, t in enumerate(parts) if t.is_floating_point()
                                 and not bool(torch.isfinite(t.float()).all())], dtype=torch.long)
        if rows.numel():
            raise DataError(f"--val {source}: column {name!r} holds NaN or Inf in {rows.numel()} rows, first row "
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


def _collate(column: torch.Tensor | list[torch.Tensor], rows: torch.Tensor, pad: float) -> torch.Tensor:
    """Rows of a column: indexed, or for a ragged column right-padded with ``pad`` to the longest row."""
    if isinstance(column, torch.Tensor):
        return column[rows]
    return torch.nn.utils.rnn.pad_sequence([column[i] for i in rows.tolist()], batch_first=True, padding_value=pad)


def iter_batches(data: TensorData, index: torch.Tensor, batch_size: int,
                 generator: torch.Generator | None = None) -> Iterator[Batch]:
    """Yield :class:`Batch` es over ``index`` (shuffled when a generator is given), padded per batch."""
    if generator is not None:
        index = index[torch.randperm(index.numel(), generator=generator)]
    for start in range(0, index.numel(), batch_size):
        rows = index[start:start + batch_size]
        inputs = {c: _collate(data.columns[c], rows, data.pad.get(c, 0)) for c in data.inputs}
        target = None if data.label is None else _collate(data.columns[data.label], rows, data.pad.get(data.label, -100))
        yield Batch(inputs, target)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
