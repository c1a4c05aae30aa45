"""SHA-256 of files: the inputs' on worker threads beside the work that reads them, outputs' as written.

The inputs' hashes (in the report and the output's metadata; ``apply`` checks candidates by them)
are the plain SHA-256 of each file, the hash the Hugging Face hub lists. :class:`FileHash` computes
one on a hashing thread, straight from the file's pages (a read-only memory map of the page cache:
no copy of the bytes, nothing kept resident), while the caller reads tensors at full speed; only
``result()`` waits. SHA-256 runs at about 0.7-1.5 GB/s on a core, several times slower than a reader
that maps the file, so it must never sit on the reading path. The threads (:func:`hash_workers` of
them, daemons, so an abandoned hash never holds up the interpreter's exit) take one file each;
hashlib releases the GIL while it hashes.

A :class:`FileHash` hashes the file descriptor the reader holds (a duplicate of it), so the digest is
of the bytes the reader reads even when the path is replaced by a new file meanwhile; a file changed
in place while it is hashed is an error, since its digest would describe neither version.

Outputs are hashed from the bytes as they are written (:class:`BackgroundHash`, used by the writer).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from ..errors import CheckpointError, one_line
from .stats import stats

__all__ = ["BackgroundHash", "FileHash", "hash_workers", "remember_sha256", "sha256_file"]

_CHUNK = 1 << 22
# Pieces a hashing thread hashes from its memory map at a time; their pages are unmapped after each.
_MAP_CHUNK = 8 << 20
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
    output is reused for the renamed file instead of reading it again, and a file a ``FileHash``
    finished is not read again either.
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
    its buffer again at once, and a copy runs about ten times faster than SHA-256. ``copy=False`` queues
    ``data`` itself, for a caller that keeps it alive and unchanged until ``wait()`` (a writer of
    tensors that outlive the write): no copy, and no memory beyond the caller's. The queue holds at
    most ``limit`` bytes (a writer that gets ahead waits). ``wait()`` returns when everything submitted
    is hashed.
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

    def submit(self, h, data, *, copy: bool = True) -> None:
        n = len(data)
        if copy:
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


def hash_workers() -> int:
    """Threads that hash input files: one per core this process may run on, less the one reading.

    At least one, so a single core still overlaps hashing with work that waits on memory; each
    thread hashes one file at a time (SHA-256 of one file is sequential).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class _Cancelled(Exception):
    pass


class _Workers:
    """The hashing threads: one more is started while jobs outnumber them, up to ``hash_workers()``;
    each takes the oldest job waiting. Idle threads wait on the queue (daemons: nothing to join)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._unfinished = 0

    def submit(self, job: Callable[[], str]) -> Future:
        future: Future = Future()
        with self._lock:
            self._unfinished += 1
            self._jobs.put((future, job))
            if self._threads < min(hash_workers(), self._unfinished):
                self._threads += 1
                threading.Thread(target=self._run, name="twamerge-sha256", daemon=True).start()
        return future

    def _run(self) -> None:
        while True:
            future, job = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the hash
                    future.set_exception(exc)
            with self._lock:
                self._unfinished -= 1


_WORKERS = _Workers()
# A forked child has none of the parent's threads (and may have forked while one held the lock).
os.register_at_fork(after_in_child=_WORKERS._reset)


class FileHash:
    """The SHA-256 of one file, computed on a hashing thread from the moment this object is made.

    ``fd``: a descriptor open on ``path`` that the caller keeps using (the reader's); it is duplicated,
    so the hash is of that open file, whatever ``path`` names by then. Without it, ``path`` is opened
    now. A digest already known for the file (same device, inode, mtime and size) is reused at once.
    ``result()`` waits for the hex digest; ``cancel()`` stops the work (a hash no one will ask for).

    Raises (from ``result``):
        CheckpointError: the file cannot be read, or changed in place while it was hashed.
    """

    def __init__(self, path: Path, fd: int | None = None):
        self.path = Path(path)
        self._stop = threading.Event()
        try:
            own = os.dup(fd) if fd is not None else os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open it to compute its SHA-256 ({one_line(e)})") from None
        self._key = key = _stat_key(os.fstat(own))
        cached = _SHA_CACHE.get(key)
        if cached is not None:
            os.close(own)
            self._future: Future = Future()
            self._future.set_result(cached)
            return
        self._future = _WORKERS.submit(lambda: self._hash(own, key))
        # A job cancelled before it started still owns the descriptor.
        self._future.add_done_callback(lambda f: os.close(own) if f.cancelled() else None)

    def result(self) -> str:
        """The hex digest (waits for the hashing thread).

        Raises:
            CheckpointError: the file could not be hashed, or it was changed in place since this hash
                started (what was read since may mix two versions; a file replaced by a rename is fine).
        """
        digest = self._future.result()
        try:
            st = os.stat(self.path)
        except OSError:
            return digest  # removed or renamed away since: what was opened is what was hashed
        if (st.st_dev, st.st_ino) == self._key[:2] and _stat_key(st) != self._key:
            raise _changed(self.path)
        return digest

    def cancel(self) -> None:
        self._stop.set()
        self._future.cancel()

    def _hash(self, fd: int, key: tuple[int, int, int, int]) -> str:
        try:
            h = hashlib.sha256()
            try:
                self._hash_mapped(fd, key[3], h)
            except (OSError, ValueError):
                h = hashlib.sha256()  # no memory map on this file system: read it in pieces instead
                self._hash_read(fd, h)
            if _stat_key(os.fstat(fd)) != key:
                raise _changed(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read it to compute its SHA-256 ({one_line(e)})") from None
        finally:
            os.close(fd)
        digest = h.hexdigest()
        _remember(key, digest)
        return digest

    def _hash_mapped(self, fd: int, size: int, h) -> None:
        if size == 0:
            return
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
            for start in range(0, size, _MAP_CHUNK):
                if self._stop.is_set():
                    raise _Cancelled
                with view[start:start + _MAP_CHUNK] as piece:
                    h.update(piece)
                    n = len(piece)
                if hasattr(m, "madvise"):
                    # Hashed pages leave this process (the page cache keeps them): RSS stays flat.
                    m.madvise(mmap.MADV_DONTNEED, start, n)
                stats.hashed(self.path, n)

    def _hash_read(self, fd: int, h) -> None:
        buf = memoryview(bytearray(_CHUNK))
        with os.fdopen(os.dup(fd), "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                if self._stop.is_set():
                    raise _Cancelled
                h.update(buf[:n])
                stats.hashed(self.path, n)


def _changed(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: the file changed while twamerge read it (its size or modification time moved), so no "
        "SHA-256 describes what was merged; run again once nothing writes to it"
    )
