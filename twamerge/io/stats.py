"""Per-file counts of the bytes read, so tests can check how often each candidate is read.

Readers count the tensor data they return (``bytes_read``); the hashing threads count the bytes they
hash (``hash_bytes_read``: each input file once when its SHA-256 is asked for). Headers and the
metadata scans of the libraries we call are not counted: they are small and not tensor data.
Counting is a dict update per tensor (or per hashed chunk), cheap enough to be always on.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ReadStats", "count_reads", "reset_read_stats", "resolved_path", "stats"]


@dataclass
class ReadStats:
    """Bytes read per file (keys are resolved paths)."""

    bytes_read: dict[Path, int] = field(default_factory=lambda: defaultdict(int))
    hash_bytes_read: dict[Path, int] = field(default_factory=lambda: defaultdict(int))
    # The hashing threads count beside the reading thread: ``d[k] += n`` is not atomic.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def reset(self) -> None:
        with self._lock:
            self.bytes_read.clear()
            self.hash_bytes_read.clear()

    def tensor(self, path: Path, n: int, *, resolved: bool = False) -> None:
        """``n`` bytes of tensor data read from ``path`` (``resolved``: ``path`` is ``resolved_path(...)``'s,
        which readers keep from when they open a file: resolving costs a system call per component)."""
        key = path if resolved else resolved_path(path)
        with self._lock:
            self.bytes_read[key] += n

    def hashed(self, path: Path, n: int) -> None:
        key = resolved_path(path)
        with self._lock:
            self.hash_bytes_read[key] += n


def resolved_path(path: Path) -> Path:
    """The key ``path``'s counts are kept under: resolved, so a test may look a file up by any spelling."""
    return Path(path).resolve()


stats = ReadStats()
# A child forked while a hashing thread held the lock would wait on it forever.
os.register_at_fork(after_in_child=lambda: setattr(stats, "_lock", threading.Lock()))


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
