"""Open local validation data, split off a held-out part, and yield padded batches.

The first of three steps, each calling only the ones after it: this module reads (files -> a
:class:`RawTable`; a :class:`TensorData` -> a seeded split and padded :class:`Batch` es),
``prepare.py`` turns the table's columns into the model's inputs, and ``tasks.py`` owns the labels
(their form, the loss, the metric, and the classes the split is stratified by).

Reading (:func:`read_table`) keeps every column it can use as read: numbers, ragged sequences,
text and images. A file is read by the reader registered for its suffix (:func:`data_reader`);
a folder is a ``datasets.save_to_disk`` folder or a folder of data files.

Batches (:func:`batch_rows`) hold a number of rows; rows of token ids are also packed, sorted by
length, into batches of at most a number of tokens, since a language model's memory grows with the
tokens of a batch rather than its rows.

Everything is read into memory as tensors: validation sets are small next to the checkpoints, and
random access makes the seeded, stratified split and the shuffles trivial. Nothing here touches
the network (``datasets`` is used only on local paths).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError
from .io.formats import Reader
from .io.formats.safetensors import SafetensorsReader
from .io.formats.torch_pickle import NotATensorMapping, TorchReader

log = logging.getLogger(__name__)

# The label of a position that is neither trained nor scored (transformers' convention): label
# padding, a prompt's tokens. The one definition; tasks and text import it.
IGNORE_INDEX = -100
# Data file suffix -> the ``datasets`` builder that reads it (also the files a --val folder may hold).
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow",
                 ".txt": "text"}


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
        """``numeric`` (a tensor), ``ragged`` (a list of 1-D tensors), ``text``, ``image``, ``chat`` (a list
        of messages per row, :func:`conversations`) or ``other``."""
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
        if isinstance(first, list):
            return "chat"
        return "other"


@dataclass
class TensorData:
    """Model-ready columns with a common first dimension ``n``.

    A column is a tensor ``[N, ...]`` or, for sequences of different lengths, a list of ``N`` 1-D
    tensors that :func:`iter_batches` pads per batch with ``pad[name]`` (the tokenizer's pad id for
    ``input_ids``, 0 for ``attention_mask``, :data:`IGNORE_INDEX` for labels), as a trainer's
    collator does. ``strata`` is the class of each row ``[N]`` that :func:`split_holdout`
    stratifies by, or None; the task decides it (``Task.strata``).
    """

    columns: dict[str, torch.Tensor | list[torch.Tensor]]
    inputs: tuple[str, ...]
    label: str | None
    source: str
    pad: dict[str, float] = field(default_factory=dict)
    strata: torch.Tensor | None = None

    @property
    def n(self) -> int:
        first = next(iter(self.columns.values()))
        return first.shape[0] if isinstance(first, torch.Tensor) else len(first)

    def subset(self, index: torch.Tensor) -> "TensorData":
        rows = index.tolist()
        return TensorData({k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in rows]
                           for k, v in self.columns.items()}, self.inputs, self.label, self.source, dict(self.pad),
                          None if self.strata is None else self.strata[index])

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
        target: the labels ``[B]`` or ``[B, T]`` (:data:`IGNORE_INDEX`: ignored), or None (causal
            LM without a label column, ``--loss entropy``).
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


# -- reading ---------------------------------------------------------------------------------------

def ragged(values: list) -> list[torch.Tensor] | None:
    """One 1-D tensor per row for lists of numbers of different lengths (token ids); None otherwise."""
    out = []
    for v in values:
        a = np.asarray(v if v is not None else [])
        if a.ndim != 1 or (a.size and a.dtype.kind not in "biuf"):
            return None
        out.append(torch.from_numpy(a.astype(np.int64 if a.dtype.kind in "biu" or not a.size else np.float32)))
    return out


def conversations(values: list) -> list[list[dict]] | None:
    """Chat rows (TRL's conversational format): one list of messages, dicts with a ``role``, per row; else None.

    Keys holding None are left out of each message: datasets fills a key that only some messages have
    (``tool_calls``) with None, and a chat template would read it as given.
    """
    out = []
    for row in values:
        if not isinstance(row, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in row):
            return None
        out.append([{k: v for k, v in m.items() if v is not None} for m in row])
    return out if any(out) else None


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
            values = list(ds[name])
            rows = ragged(values)
            chat = conversations(values) if rows is None else None
            if rows is not None:
                table.columns[name] = rows
            elif chat is not None:
                table.columns[name] = chat
            else:
                table.dropped[name] = ("neither numbers, a list of numbers per row, text, chat messages "
                                       "(dicts with a role) nor an image")
        else:
            table.dropped[name] = f"dtype {array.dtype} is neither numbers, text nor an image"
    return table


# A data file's suffix (as spelled, e.g. ".jsonl") -> the function that reads it: ``read(path, split) -> RawTable``.
DataReader = Callable[[Path, "str | None"], RawTable]
_READERS: dict[str, DataReader] = {}


def data_reader(*suffixes: str) -> Callable[[DataReader], DataReader]:
    """Function decorator: ``--val`` files ending with one of ``suffixes`` are read by ``fn(path, split)``.

    ``split`` is ``--split`` (None when not given); a format without splits ignores it.
    """
    def deco(fn: DataReader) -> DataReader:
        for suffix in suffixes:
            _READERS[suffix] = fn
        return fn
    return deco


def data_suffixes() -> tuple[str, ...]:
    """Every suffix a data reader is registered for, in registration order."""
    return tuple(_READERS)


def tensor_file_reader(*suffixes: str) -> Callable[[Callable[[Path], Any]], DataReader]:
    """Decorator for a reader of a flat ``{column: tensor}`` file, ``fn(path) -> dict``: registers (and returns)
    a :data:`DataReader` for ``suffixes`` with one set of errors (the file, and what was expected) for all such
    formats."""
    def deco(fn: Callable[[Path], Any]) -> DataReader:
        @data_reader(*suffixes)
        def read(path: Path, split: str | None) -> RawTable:
            try:
                obj = fn(path)
            except NotATensorMapping:
                raise DataError(f"{path}: expected a mapping of column name -> tensor") from None
            except Exception as exc:
                raise DataError(f"{path}: cannot be read as a tensor file ({type(exc).__name__}: {exc})") from exc
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise DataError(f"{path}: expected a mapping of column name -> tensor")
            return RawTable(dict(obj), str(path))
        return read
    return deco


def _read_with(reader: Reader) -> dict[str, torch.Tensor]:
    try:
        return {k: reader.read(k) for k in reader.entries()}
    finally:
        reader.close()


# Tensor files are read by the checkpoint readers, so a data file gets the same safety (weights-only
# unpickling) as a candidate; but never their container unwrapping: a data file is a flat {column: tensor}.
@tensor_file_reader(".safetensors")
def _safetensors_columns(path: Path) -> dict[str, torch.Tensor]:
    return _read_with(SafetensorsReader(path))


@tensor_file_reader(".pt", ".pth")
def _torch_columns(path: Path) -> dict[str, torch.Tensor]:
    return _read_with(TorchReader(path, unwrap=False))


@tensor_file_reader(".npz")
def _npz_columns(path: Path) -> dict[str, torch.Tensor]:
    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k]) for k in z.files}


def _skip_empty_lines(table: RawTable) -> RawTable:
    """Drop the empty and blank rows of the ``text`` column (in a text file an example is a line)."""
    lines = table.columns.get("text", [])
    kept = [t for t in lines if t and t.strip()]
    if len(kept) < len(lines):
        log.info("--val %s: %d empty line(s) skipped", table.source, len(lines) - len(kept))
    table.columns["text"] = kept
    return table


def _load_dataset_files(path: Path, files: list[Path], split: str | None) -> RawTable:
    """``files`` (one format) through ``datasets.load_dataset``; ``split`` defaults to ``train``, as it names them."""
    import datasets

    builders = {FILE_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise DataError(f"{path}: mixes file formats {sorted(builders)}; keep one format per --val")
    try:
        ds = datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split=split or "train")
    except Exception as exc:
        raise DataError(f"{path}: cannot be read by datasets.load_dataset ({exc})") from exc
    return _read_hf(ds, str(path))


@data_reader(*FILE_BUILDERS)
def _dataset_file(path: Path, split: str | None) -> RawTable:
    table = _load_dataset_files(path, [path], split)
    return _skip_empty_lines(table) if path.suffix == ".txt" else table


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _saved_dataset(path: Path, split: str | None) -> RawTable:
    """A ``save_to_disk`` folder: a Dataset, or one split of a DatasetDict (``--split``, else the validation one)."""
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
        obj = obj[split]
    elif split is not None:
        log.warning("--split %s ignored: %s holds a single Dataset", split, path)
    return _read_hf(obj, str(path))


def _folder_of_files(path: Path, split: str | None) -> RawTable:
    """Every data file under ``path`` (one format), as one table."""
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS)
    if any(p.suffix != ".txt" for p in files):
        files = [p for p in files if p.suffix != ".txt"]  # a README.txt beside data files is not data
    if not files:
        raise DataError(
            f"{path}: no data files found; expected a save_to_disk folder or {', '.join(FILE_BUILDERS)} files"
        )
    table = _load_dataset_files(path, files, split)
    if "text" in table.columns and len(table.columns) == 1:  # text only (.txt files, or rows of one text field)
        table = _skip_empty_lines(table)
    return table


def read_table(cfg: DataConfig) -> RawTable:
    """Open ``cfg.path`` and return its columns as read (:class:`RawTable`).

    A file is read by the reader registered for its suffix (:func:`data_reader`). A ``.txt`` file
    is one example per line (empty lines skipped) in a column ``text``.

    Raises:
        DataError: missing path, unknown file suffix, unreadable data, no rows, columns of different lengths.
    """
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"--val {path}: no such file or directory")
    if path.is_dir():
        table = (_saved_dataset if _is_saved_dataset(path) else _folder_of_files)(path, cfg.split)
    elif path.suffix in _READERS:
        table = _READERS[path.suffix](path, cfg.split)
    else:
        raise DataError(f"--val {path}: unknown data format (suffix {path.suffix!r}); expected "
                        f"{', '.join(data_suffixes())} files, a save_to_disk folder or a folder of data files")
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


# -- the split and the batches -----------------------------------------------------------------------

def split_holdout(data: TensorData, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split into (fit, held-out) row indices, stratified by ``data.strata`` when the task gave them.

    Raises:
        DataError: when either part would hold fewer than a handful of rows.
    """
    gen = torch.Generator().manual_seed(seed)
    n = data.n
    if fraction == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.long)
    if data.strata is not None:  # each class keeps its share in both parts
        fit, held = [], []
        for value in torch.unique(data.strata):
            rows = (data.strata == value).nonzero().flatten()
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


# A fit epoch sorts rows by length within windows of this many batches' worth of rows (of a shuffled
# order), so that a batch holds rows of similar lengths (little padding) while which rows share a
# batch still changes from epoch to epoch.
SORT_WINDOW_BATCHES = 8


def row_tokens(data: TensorData) -> torch.Tensor | None:
    """The tokens of each row ``[N]`` (the length of its longest ragged input: token ids and their mask),
    or None when no input is ragged (rectangular tensors, batched by rows alone)."""
    lengths = [torch.tensor([v.shape[0] for v in data.columns[c]], dtype=torch.long)
               for c in data.inputs if not isinstance(data.columns[c], torch.Tensor)]
    return torch.stack(lengths).amax(0) if lengths else None


def _pack(order: list[int], lengths: list[int], rows: int, tokens: int) -> list[list[int]]:
    """Consecutive rows of ``order`` into batches of at most ``rows`` rows and ``tokens`` padded tokens
    (rows x the batch's longest row). A row longer than ``tokens`` makes a batch of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if current and (len(current) + 1 > rows or (len(current) + 1) * max(longest, n) > tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def batch_rows(data: TensorData, index: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
               tokens: int | None = None) -> list[torch.Tensor]:
    """The row indices of each batch over ``index``, in the order they are used.

    Rectangular data, or ``tokens`` None: ``batch_size`` rows per batch, in order (shuffled when a
    generator is given). Ragged inputs (token ids) with a ``tokens`` budget: at most ``batch_size``
    rows and ``tokens`` padded tokens per batch; with a generator (the fit) the shuffled rows are
    sorted by length within windows of :data:`SORT_WINDOW_BATCHES` batches' worth of rows, packed,
    and the batches shuffled; without one (scoring) all rows are sorted, longest first, so that a batch
    that does not fit in memory is the first one.
    """
    found = None if tokens is None else row_tokens(data)
    if found is None:
        if generator is not None:
            index = index[torch.randperm(index.numel(), generator=generator)]
        return [index[start:start + batch_size] for start in range(0, index.numel(), batch_size)]
    lengths = found.tolist()
    if generator is None:
        order = sorted(index.tolist(), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
        batches = _pack(order, lengths, batch_size, tokens)
    else:
        shuffled = index[torch.randperm(index.numel(), generator=generator)].tolist()
        window = SORT_WINDOW_BATCHES * batch_size
        batches = []
        for start in range(0, len(shuffled), window):
            part = sorted(shuffled[start:start + window], key=lambda i: -lengths[i])
            batches += _pack(part, lengths, batch_size, tokens)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [torch.tensor(b, dtype=torch.long) for b in batches]


def iter_batches(data: TensorData, index: torch.Tensor, batch_size: int,
                 generator: torch.Generator | None = None, tokens: int | None = None) -> Iterator[Batch]:
    """Yield :class:`Batch` es over ``index``, padded per batch (which rows share a batch: :func:`batch_rows`)."""
    for rows in batch_rows(data, index, batch_size, generator, tokens):
        inputs = {c: _collate(data.columns[c], rows, data.pad.get(c, 0)) for c in data.inputs}
        target = None if data.label is None else _collate(data.columns[data.label], rows,
                                                          data.pad.get(data.label, IGNORE_INDEX))
        yield Batch(inputs, target)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches of ``batch_size`` rows over ``n`` rows (row batching; with a token budget: :func:`epoch_steps`)."""
    return max(1, math.ceil(n / batch_size))


def epoch_steps(data: TensorData, index: torch.Tensor, batch_size: int, tokens: int | None) -> int:
    """The batches of one epoch of :func:`iter_batches` over ``index``: :func:`steps_per_epoch` for rows;
    with a token budget, those of all rows sorted by length. A fit epoch makes exactly as many when its
    rows fit in one sorting window (:data:`SORT_WINDOW_BATCHES`), else a few more (each window of rows ends
    with its own partial batch)."""
    if tokens is None or row_tokens(data) is None:
        return steps_per_epoch(index.numel(), batch_size)
    return max(1, len(batch_rows(data, index, batch_size, None, tokens)))
