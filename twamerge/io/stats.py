"""Per-file counts of the bytes read, so tests can check how often each candidate is read.

Readers count the tensor data they return (``bytes_read``); the streaming hasher counts the bytes it
had to read itself because no tensor read covered them (``hash_bytes_read``). Headers and the
metadata scans of the libraries we call are not counted: they are small and not tensor data.
Counting is a dict update per tensor, cheap enough to be always on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ReadStats", "count_reads", "reset_read_stats", "stats"]


@dataclass
class ReadStats:
    """Bytes read per file (keys are resolved paths)."""

    bytes_read: dict[Path, int] = field(default_factory=lambda: defaultdict(int))
    hash_bytes_read: dict[Path, int] = field(default_factory=lambda: defaultdict(int))

    def reset(self) -> None:
        self.bytes_read.clear()
        self.hash_bytes_read.clear()

    def tensor(self, path: Path, n: int) -> None:
        self.bytes_read[_key(path)] += n

    def hashed(self, path: Path, n: int) -> None:
        self.hash_bytes_read[_key(path)] += n


def _key(path: Path) -> Path:
    # Resolved, so that a test may look a file up by any spelling of its path.
    return Path(path).resolve()


stats = ReadStats()


def reset_read_stats() -> None:
    """Zero all counts."""
    stats.reset()


@contextmanager
def count_reads() -> Iterator[ReadStats]:
    """Zero the counts and yield them; read ``bytes_read[path]`` / ``hash_bytes_read[path]`` inside or after.

    Example:
        >>> with count_reads() as reads:  # doctest: +SKIP
        ...     average_checkpoints([a, b], out)
        >>> reads.bytes_read[a.resolve()] == tensor_bytes_of_a  # doctest: +SKIP
    """
    stats.reset()
    yield stats
