"""Sharded checkpoints: a ``*.index.json`` whose ``weight_map`` names the shard holding each tensor.

Each shard is opened with the reader of its own format, so safetensors and torch shards both work.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import CheckpointError, one_line
from .base import Entry, Reader, open_reader, register

__all__ = ["ShardedReader"]


@register(".index.json")
class ShardedReader(Reader):
    def __init__(self, index: Path, ema_key: str | None = None):
        self.path = index = Path(index)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({one_line(e)}); expected a 'weight_map'") from e
        shard_names = list(dict.fromkeys(weight_map.values()))
        self.files = [index] + [index.parent / s for s in shard_names]
        self._shards: dict[str, Reader] = {}
        try:
            for name in shard_names:
                shard = index.parent / name
                if not shard.is_file():
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

    def file_hashes(self) -> list[str]:
        from ..hashing import sha256_file

        return [sha256_file(self.path)] + [h for r in self._shards.values() for h in r.file_hashes()]

    def close(self) -> None:
        for r in self._shards.values():
            r.close()
