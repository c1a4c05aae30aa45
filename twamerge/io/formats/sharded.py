"""Sharded checkpoints: a ``*.index.json`` whose ``weight_map`` names the shard holding each tensor.

Each shard is opened with the reader of its own format, so safetensors and torch shards both work.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ...errors import CheckpointError, one_line
from ..hashing import FileHash
from ..jsonschema import Fields, load_json
from .base import Entry, Reader, open_reader, register

__all__ = ["ShardedReader", "indexed_shards", "read_shard_index"]

#: most tensors an index may list
MAX_INDEX_ENTRIES = 10_000_000


def _shard_problem(name: str) -> str | None:
    """Why ``name`` cannot be a shard of an index (None when it can): shards live beside their index."""
    if not name or "\x00" in name or any(ord(c) < 32 for c in name):
        return "is not a file name"
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        return "is an absolute path, outside the index's folder"
    if ".." in posix.parts or ".." in windows.parts:
        return "points outside the index's folder"
    if name.lower().endswith(".index.json"):
        return "names another index; an index may only name shard files"
    return None


def read_shard_index(index: Path) -> dict[str, str]:
    """The validated ``weight_map`` of ``index``: a non-empty object of tensor name -> shard file name,
    every shard a file name inside the index's folder that is not itself an index.

    Raises:
        CheckpointError: naming the field or entry at fault.
    """
    check = Fields(index, CheckpointError)
    root = check.object(load_json(index, "shard index", CheckpointError), "the index")
    weight_map = check.object(check.get(root, "weight_map", "weight_map"), "weight_map", max_len=MAX_INDEX_ENTRIES)
    if not weight_map:
        raise check.fail("weight_map", "is empty; an index names at least one tensor")
    problems: dict[str, str | None] = {}
    for key, name in weight_map.items():
        check.string(name, f"weight_map[{key!r}]", what="a shard file name", max_len=4096)
        if name not in problems:
            problems[name] = _shard_problem(name)
        if problems[name]:
            raise check.fail(f"weight_map[{key!r}]", f"{name!r} {problems[name]}")
    return weight_map


def indexed_shards(index: Path) -> list[Path] | None:
    """The shard files ``index`` names (in its folder), or None when it is not a valid index."""
    try:
        weight_map = read_shard_index(index)
    except CheckpointError:
        return None
    return [index.parent / name for name in dict.fromkeys(weight_map.values())]


@register(".index.json")
class ShardedReader(Reader):
    def __init__(self, index: Path, ema_key: str | None = None):
        self.path = index = Path(index)
        weight_map = read_shard_index(index)
        shard_names = list(dict.fromkeys(weight_map.values()))
        self.files = [index] + [index.parent / s for s in shard_names]
        self._shards: dict[str, Reader] = {}
        try:
            for name in shard_names:
                shard = index.parent / name
                try:
                    is_file = shard.is_file()
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{index}: shard {name!r}: {one_line(e)}") from None
                if not is_file:
                    raise CheckpointError(f"{index}: shard {name} is missing from {index.parent}")
                self._shards[name] = open_reader(shard, ema_key)
        except BaseException:
            self.close()
            raise
        inner = {r.format for r in self._shards.values()}
        self.format = f"{inner.pop() if len(inner) == 1 else 'mixed'}-sharded"
        # key -> (shard number, 1-based: files[0] is the index; the shard's reader; its entry)
        self._where: dict[str, tuple[int, Reader, Entry]] = {}
        for number, (name, reader) in enumerate(self._shards.items(), start=1):
            for k, v in reader.entries().items():
                if weight_map.get(k) == name:
                    self._where[k] = (number, reader, v)
        missing = [k for k in weight_map if k not in self._where]
        if missing:
            self.close()
            raise CheckpointError(f"{index}: {len(missing)} indexed tensors are absent from their shards, e.g. {missing[:3]}")

    def entries(self) -> dict[str, Entry]:
        return {k: v[2] for k, v in self._where.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._where[key][1].read(key)

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._where[key][1].read_range(key, start, stop)

    def position(self, key: str) -> tuple[int, int] | None:
        number, reader, _ = self._where[key]
        inner = reader.position(key)
        return None if inner is None else (number, inner[1])

    def reads_ranges(self, key: str) -> bool:
        return self._where[key][1].reads_ranges(key)

    def hash_files(self) -> list[FileHash]:
        return [FileHash(self.path)] + [h for r in self._shards.values() for h in r.hash_files()]

    def close(self) -> None:
        for r in self._shards.values():
            r.close()
