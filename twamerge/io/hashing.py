"""SHA-256 of candidate files, computed from the bytes the readers read anyway where possible.

A merge reads every tensor of every candidate once; hashing the file separately would read it all
a second time. ``StreamingHasher`` is fed the byte ranges a reader reads and only reads itself what
no tensor read covered (the gaps, and the tail when ``finish`` is called). Its result is the plain
SHA-256 of the file whatever the order of the reads: out-of-order reads only cost extra gap reads.

The hashing itself runs on one background thread (:class:`BackgroundHash`), beside the merge that
reads the bytes: SHA-256 runs at 1.4 GB/s on a core, about as fast as a merge adds float32
candidates, so on the caller's thread it doubled the time of ``average``. hashlib releases the GIL
while it hashes, and the thread takes the pieces in the order they were read.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from pathlib import Path

from .stats import stats

__all__ = ["BackgroundHash", "StreamingHasher", "remember_sha256", "sha256_file"]

_CHUNK = 1 << 22
_SHA_CACHE: dict[tuple[int, int, int, int], str] = {}


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _remember(key: tuple[int, int, int, int], digest: str) -> None:
    if len(_SHA_CACHE) > 4096:
        _SHA_CACHE.clear()
    _SHA_CACHE[key] = digest


def remember_sha256(path: Path, digest: str) -> None:
    """Record the SHA-256 of a file just written (hashed from the bytes as they were written), so that
    ``sha256_file`` on it, or on its name after a rename, does not read it back."""
    _remember(_stat_key(os.stat(path)), digest)


def sha256_file(path: Path, *, chunk: int = _CHUNK) -> str:
    """Hex SHA-256 of one file, read in 4 MiB chunks.

    Cached by (device, inode, mtime, size), which a rename keeps: the hash logged for a temporary
    output is reused for the renamed file instead of reading it again, and a file a
    ``StreamingHasher`` finished is not read again either.
    """
    key = _stat_key(os.stat(path))
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        _remember(key, h.hexdigest())
    return _SHA_CACHE[key]


class BackgroundHash:
    """``hashlib`` updates run on one daemon thread, in submission order.

    ``submit(h, data)`` queues ``h.update`` of a private copy of ``data`` and returns: the caller owns
    its buffer again at once (a tensor a reader returns may be changed in place), and a copy runs
    about ten times faster than SHA-256. The queue holds at most ``limit`` bytes (a reader that gets
    ahead waits). ``wait()`` returns when everything submitted is hashed.
    """

    def __init__(self, limit: int = 256 << 20):
        self.limit = limit
        self._reset()

    def _reset(self) -> None:
        self._jobs: deque = deque()
        self._pending = 0
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, h, data) -> None:
        n = len(data)
        data = bytes(data)
        with self._cv:
            while self._pending and self._pending + n > self.limit:
                self._cv.wait()
            self._pending += n
            self._jobs.append((h, data, n))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="twamerge-sha256", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def wait(self) -> None:
        with self._cv:
            while self._pending:
                self._cv.wait()
            error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"hashing failed on the background thread: {error!r}") from error

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                h, data, n = self._jobs[0]
            try:
                h.update(data)  # outside the lock: hashlib releases the GIL on large buffers
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                self._error = exc
            finally:
                with self._cv:
                    self._jobs.popleft()
                    self._pending -= n
                    self._cv.notify_all()


BACKGROUND = BackgroundHash()
# A forked child has no hashing thread, and may have forked while another thread held the lock.
os.register_at_fork(after_in_child=BACKGROUND._reset)


class StreamingHasher:
    """SHA-256 of one file, fed by the reads of its reader.

    ``pos`` is the first byte not yet hashed. ``update(start, data)`` with ``start == pos`` hashes
    ``data``; with ``start > pos`` the gap ``[pos, start)`` is read from the file first (counted as
    ``hash_bytes_read``); bytes before ``pos`` are already in the hash and skipped. ``finish`` reads
    ``[pos, EOF)`` and returns the digest: no extra read when the file was read front to back.

    A gap is read at ``update`` time only when it is small: at most ``small_gap`` bytes or the size of
    the data just read. A larger jump (a distributed rank reading its column slice, an inspection
    reading one tensor) leaves ``pos`` where it is, so callers that never ask for the hash (``eval``,
    ``inspect``, the other ranks) do not pay a read of everything in between; ``finish`` reads it.
    Either way each byte is read for hashing at most once.
    """

    def __init__(self, path: Path, *, small_gap: int = 1 << 16):
        self.path = Path(path)
        self.small_gap = small_gap
        self.pos = 0
        self._h = hashlib.sha256()
        self._digest: str | None = None
        # Taken when the reader opens the file; a file changed since is hashed again in full.
        self._key = _stat_key(os.stat(self.path))
        cached = _SHA_CACHE.get(self._key)
        if cached is not None:
            self._digest = cached

    @property
    def done(self) -> bool:
        return self._digest is not None

    def update(self, start: int, data: bytes | memoryview) -> None:
        """Bytes ``[start, start + len(data))`` of the file were just read."""
        if self._digest is not None:
            return
        end = start + len(data)
        if start > self.pos:
            if start - self.pos > max(self.small_gap, len(data)):
                return
            self._read_gap(start)
        if end > self.pos:
            view = memoryview(data).cast("B")
            BACKGROUND.submit(self._h, view[self.pos - start:])
            self.pos = end

    def _read_gap(self, stop: int | None) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(self.pos)
            while stop is None or self.pos < stop:
                want = _CHUNK if stop is None else min(_CHUNK, stop - self.pos)
                block = fh.read(want)
                if not block:
                    break
                BACKGROUND.submit(self._h, block)  # (a bytes object: the copy is cheap next to the read)
                self.pos += len(block)
                stats.hashed(self.path, len(block))

    def finish(self) -> str:
        """Hash what no read covered and return the hex digest (computed once)."""
        if self._digest is None:
            self._read_gap(None)
            BACKGROUND.wait()
            digest = self._h.hexdigest()
            if _stat_key(os.stat(self.path)) != self._key:
                # The file changed under us: the pieces may come from two versions; hash it whole.
                digest = sha256_file(self.path)
            else:
                _remember(self._key, digest)
            self._digest = digest
        return self._digest
