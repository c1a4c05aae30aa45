"""Tensors read from a file at the speed of its bytes: a private memory map per read, no copy.

A read maps just the tensor's bytes, copy-on-write (``mmap.ACCESS_COPY``, Linux's ``MAP_PRIVATE``).
Its pages are the page cache's own, so nothing is copied or zeroed (a ``pread`` into a fresh buffer
was 3-6x slower here, most of it faulting in and zeroing the buffer), and each read is a mapping of
its own, so the tensor is the caller's alone:

- a caller that changes it in place gets private copies of the pages it writes, then and only then;
  the file and every other read of the same bytes keep the file's contents;
- its pages leave the process when the tensor is freed (the mapping goes with its last reference),
  so a pass over K candidates keeps only the tensors alive resident, not K files.

Small tensors are read with one ``pread`` into a fresh buffer instead (below ``MAP_MIN_BYTES`` a map
costs more than the copy), and so is any tensor a map cannot serve: bytes not aligned to its dtype,
or a file system, descriptor limit or address space that refuses the map.

Like every memory-mapped reader (``safe_open``, ``torch.load(mmap=True)``), a file cut short in
place while its tensors are alive (``torch.save`` over the same name) makes the next touch of the
lost pages fail with SIGBUS; files replaced by a rename, as trainers save, are unaffected.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from ...errors import CheckpointError

__all__ = ["MAP_MIN_BYTES", "read_tensor"]

#: tensors of at least this many bytes are mapped; smaller ones are read into a fresh buffer
MAP_MIN_BYTES = 512 << 10


def read_tensor(fd: int, offset: int, shape: tuple[int, ...], dtype: torch.dtype, path: Path, key: str,
                what: str = "") -> torch.Tensor:
    """The ``shape`` x ``dtype`` tensor whose bytes start at ``offset`` of the open file ``fd``; CPU,
    contiguous, seen by no one else (see the module docstring).

    Raises:
        CheckpointError: the file ends before the tensor does (``what`` says where, for a slice).
    """
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = None
    if nbytes >= MAP_MIN_BYTES and offset % dtype.itemsize == 0:
        raw = _mapped(fd, offset, nbytes, path, key, what)
    if raw is None:
        raw = _pread(fd, offset, nbytes, path, key, what)
    return raw.view(dtype).reshape(shape)


def _truncated(path: Path, key: str, got: int, nbytes: int, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: tensor {key!r} is truncated ({got} of {nbytes} bytes{what}); "
                           "the file is shorter than its header says, re-save or re-download it")


def _mapped(fd: int, offset: int, nbytes: int, path: Path, key: str, what: str) -> torch.Tensor | None:
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps begin on a page boundary
    try:
        m = mmap.mmap(fd, offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
    except ValueError:  # "mmap length is greater than file size"
        size = os.fstat(fd).st_size
        raise _truncated(path, key, max(0, size - offset), nbytes, what) from None
    except OSError:
        return None  # no map here: read instead
    # The tensor holds the map (through the buffer it exports); the map is closed when the tensor dies.
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset - start)


def _pread(fd: int, offset: int, nbytes: int, path: Path, key: str, what: str) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    got = 0
    while got < nbytes:  # one read returns at most ~2 GiB on Linux
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise _truncated(path, key, got, nbytes, what)
        got += n
    return buf
