"""The Reader interface every checkpoint format implements, and the suffix registry that picks one.

A format is one module: a ``Reader`` subclass decorated with ``@register(".suffix", ...)``. The
rest of twamerge (discovery, candidates, inspect, data) only talks to ``Reader`` and ``open_reader``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from ...errors import CheckpointError
from ..hashing import FileHash

__all__ = ["Entry", "Reader", "open_reader", "reader_suffixes", "register"]

Entry = tuple[tuple[int, ...], torch.dtype]


class Reader:
    """One checkpoint on disk (one file, or an index and its shards), read one tensor at a time.

    Keys are the raw names stored in the file; renaming happens above (``io.rename``).
    """

    #: short name shown to users ("safetensors", "torch", "safetensors-sharded")
    format: str = ""
    #: every file this checkpoint consists of (an index first, then its shards)
    files: list[Path]
    #: the container path unwrapped to reach the state dict (``"state_dict"``), or None
    container: str | None = None
    #: top-level keys of the object the state dict was unwrapped from (empty when it was flat);
    #: lets the renaming step recognise the training framework that wrote it
    outer_keys: frozenset[str] = frozenset()

    def entries(self) -> dict[str, Entry]:
        """``{raw key: (shape, dtype)}`` in the order the format lists them."""
        raise NotImplementedError

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key``: CPU, stored dtype, the caller's alone: changing it in place changes neither the
        file nor any other read (a fresh copy, or a private copy-on-write map of the file's bytes)."""
        raise NotImplementedError

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor (formats without random access read it whole)."""
        return self.read(key).reshape(-1)[start:stop].clone()

    def reads_ranges(self, key: str) -> bool:
        """Whether ``read_range`` of ``key`` reads only that range (else it reads the whole tensor)."""
        return False

    def position(self, key: str) -> tuple[int, int] | None:
        """(index into ``files``, byte offset) of ``key``'s data, or None when the format cannot say.

        Reading keys in this order reads each file front to back, which lets the hashes come for free.
        """
        return None

    def hash_files(self) -> list[FileHash]:
        """The SHA-256 of each of ``files``, in that order, started on the hashing threads.

        Formats that keep a file open override this to hash that open file (``FileHash(path, fd)``).
        """
        return [FileHash(f) for f in self.files]

    def close(self) -> None:
        pass


ReaderFactory = Callable[[Path, "str | None"], Reader]
_R = TypeVar("_R", bound=type)

# Lower-case file name suffix -> the reader class that opens it. Longest suffix wins (".index.json").
_BY_SUFFIX: dict[str, ReaderFactory] = {}


def register(*suffixes: str) -> Callable[[_R], _R]:
    """Class decorator: files whose lower-cased name ends with one of ``suffixes`` open with this reader.

    The class is called as ``cls(path, ema_key)``. It may define a ``sniff(path) -> bool``
    staticmethod to claim files whose suffix no format registered (e.g. torch zips named oddly).
    """
    def deco(cls: _R) -> _R:
        for s in suffixes:
            _BY_SUFFIX[s.lower()] = cls  # type: ignore[assignment]
        return cls
    return deco


def reader_suffixes() -> tuple[str, ...]:
    """Every registered suffix, longest first."""
    return tuple(sorted(_BY_SUFFIX, key=len, reverse=True))


def open_reader(path: Path, ema_key: str | None = None) -> Reader:
    """Open ``path`` with the reader registered for its suffix.

    Raises:
        CheckpointError: no format claims the file, or the reader refuses it.
    """
    path = Path(path)
    name = path.name.lower()
    for suffix in reader_suffixes():
        if name.endswith(suffix):
            return _BY_SUFFIX[suffix](path, ema_key)
    for factory in dict.fromkeys(_BY_SUFFIX.values()):
        sniff = getattr(factory, "sniff", None)
        if sniff is not None and sniff(path):
            return factory(path, ema_key)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (suffix {path.suffix!r}); expected .safetensors, .pt, .pth, .bin, "
        ".ckpt, *.index.json or a model directory"
    )
