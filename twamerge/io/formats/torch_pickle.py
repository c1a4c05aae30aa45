"""torch pickles (``.pt .pth .bin .ckpt``): loaded with ``weights_only=True`` and never anything else.

Zip-format files are loaded memory-mapped (``torch.load(mmap=True)``), which gives each tensor's shape,
dtype and place in the file without reading its bytes. A read then maps that tensor's bytes on its
own (``mapped.read_tensor``, as for safetensors: no copy, the caller's alone). Where torch's bytes
are not the file's (a byte-swapped file, a tensor that is not contiguous) the tensor is copied out of
torch's map and those pages handed back to the kernel, so reading all K candidates does not keep K
models resident either way. A file that needs more than tensors to unpickle is refused with the
globals it asks for; there is no unsafe fallback.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, one_line
from ..hashing import FileHash
from ..rename import log_ema_hints, unwrap_state_dict
from ..stats import resolved_path, stats
from .base import Entry, Reader, register
from .checks import ZipStorages, check_tensor, check_zip_storages
from .mapped import read_tensor

__all__ = ["NotATensorMapping", "TorchReader", "torch_load"]

_MADV_DONTNEED = 4
_libc: Any = None


def _release_pages(t: torch.Tensor) -> None:
    """Tell the kernel it may drop the pages behind a memory-mapped tensor we have already copied.

    The mapping is private and never written, so the pages come back from the file if touched again.
    Best effort: Linux only, silently skipped elsewhere.
    """
    global _libc
    if not sys.platform.startswith("linux") or t.numel() == 0 or not t.is_contiguous():
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = os.sysconf("SC_PAGE_SIZE")
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo:
            _libc.madvise(lo, hi - lo, _MADV_DONTNEED)
    except (OSError, AttributeError, ValueError):
        pass


def torch_load(path: Path) -> tuple[Any, bool, int | None]:
    """``torch.load`` with ``weights_only=True`` (mmap'd when the file is a zip).

    Returns:
        (object, mmapped, base): ``base`` is the address of the file's first byte in torch's map, when
        every storage's bytes are the file's (then a tensor's bytes start at file offset
        ``t.data_ptr() - base``); None when that is not known.

    Raises:
        CheckpointError: the file needs unsafe globals (named in the message), or is damaged.
    """
    mmap = zipfile.is_zipfile(path)
    layout = check_zip_storages(path) if mmap else None
    created: list[int] = []

    def where(storage: Any, location: str) -> Any:
        # torch.load calls this once per storage, in the order the pickle first names them.
        created.append(storage.data_ptr())
        return storage

    try:
        obj = torch.load(path, map_location=where if mmap else "cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        try:
            blocked = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - legacy formats cannot be scanned; fall back to torch's message
            blocked = []
        what = f"the globals {', '.join(blocked)}" if blocked else f"more than tensors ({one_line(e)[:200]})"
        raise CheckpointError(
            f"{path}: refusing to unpickle: the file needs {what}, which a weights-only load does not allow "
            "and twamerge never loads pickles unsafely; if you trust the file, convert it once in a trusted "
            "session (obj = torch.load(path, weights_only=False); safetensors.torch.save_file(<its state dict>, "
            "'model.safetensors')) or allow the globals with torch.serialization.add_safe_globals"
        ) from e
    except Exception as e:  # noqa: BLE001 - zip/EOF/runtime errors all mean a damaged file
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({one_line(e)[:300]}); it may be truncated or corrupted"
        ) from e
    return obj, mmap, _map_base(layout, created) if layout is not None else None


def _map_base(layout: ZipStorages, created: list[int]) -> int | None:
    """The address of file offset 0 in torch's map of the whole file: each storage torch created sits at
    its record's offset from it. None unless every storage agrees (and the bytes need no swapping)."""
    if not layout.native or not created or len(created) != len(layout.order):
        return None
    bases = {ptr - layout.offsets.get(key, -(1 << 62)) for ptr, key in zip(created, layout.order)}
    return bases.pop() if len(bases) == 1 else None


class NotATensorMapping(CheckpointError):
    """A file read with ``unwrap=False`` holds something other than a flat mapping of tensors."""


@register(".pt", ".pth", ".bin", ".ckpt")
class TorchReader(Reader):
    format = "torch"

    @staticmethod
    def sniff(path: Path) -> bool:
        # torch.save writes a zip whatever the file is called.
        return zipfile.is_zipfile(path)

    def __init__(self, path: Path, ema_key: str | None = None, *, unwrap: bool = True):
        """``unwrap=False`` takes the file as a flat ``{name: Tensor}`` mapping (tensor data files, not
        training checkpoints) and raises ``NotATensorMapping`` otherwise."""
        self.path = Path(path)
        self.files = [self.path]
        self._counted = resolved_path(self.path)  # the read counter's key, resolved once
        # Opened before torch maps the file: the reads and the hash use this descriptor.
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({one_line(e)})") from None
        try:
            obj, self._mmap, base = torch_load(self.path)
            if not unwrap:
                if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                    raise NotATensorMapping(f"{path}: holds a {type(obj).__name__}, not a mapping of name -> tensor")
                self._sd = {str(k): v for k, v in obj.items()}
            else:
                log_ema_hints(obj, self.path, ema_key)
                self._sd, self.container = unwrap_state_dict(obj, ema_key=ema_key, source=str(path))
                if self.container is not None and isinstance(obj, Mapping):
                    self.outer_keys = frozenset(map(str, obj))
            for k, v in self._sd.items():
                check_tensor(v, self.path, k)
            self._offset = self._file_offsets(base)
        except BaseException:
            os.close(self._fd)
            raise

    def _file_offsets(self, base: int | None) -> dict[str, int]:
        """key -> file offset of its bytes, for the contiguous tensors whose bytes are the file's."""
        if base is None:
            return {}
        st = os.fstat(self._fd)
        if (st.st_dev, st.st_ino) != _identity(self.path):
            return {}  # the path was replaced between our open and torch's: read what torch mapped
        offsets = {}
        for k, v in self._sd.items():
            start = v.data_ptr() - base
            if v.is_contiguous() and v.numel() and 0 <= start and start + v.numel() * v.element_size() <= st.st_size:
                offsets[k] = start
        return offsets

    def entries(self) -> dict[str, Entry]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self._sd.items()}

    def read(self, key: str) -> torch.Tensor:
        src = self._sd[key]
        nbytes = src.numel() * src.element_size()
        start = self._offset.get(key)
        if start is not None:
            out = read_tensor(self._fd, start, tuple(src.shape), src.dtype, self.path, key)
        else:
            out = torch.empty(src.shape, dtype=src.dtype)
            out.copy_(src)
            if self._mmap:
                _release_pages(src)
        stats.tensor(self._counted, nbytes, resolved=True)
        return out

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        first = self._offset.get(key)
        if first is None:
            return super().read_range(key, start, stop)
        src = self._sd[key]
        size = src.element_size()
        stop = max(start, min(stop, src.numel()))
        out = read_tensor(self._fd, first + start * size, (stop - start,), src.dtype, self.path, key,
                          f" at element {start}")
        stats.tensor(self._counted, (stop - start) * size, resolved=True)
        return out

    def reads_ranges(self, key: str) -> bool:
        return key in self._offset

    def position(self, key: str) -> tuple[int, int] | None:
        start = self._offset.get(key)
        return None if start is None else (0, start)

    def hash_files(self) -> list[FileHash]:
        return [FileHash(self.path, self._fd)]

    def close(self) -> None:
        self._sd = {}
        self._offset = {}
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)
