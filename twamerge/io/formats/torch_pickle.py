"""torch pickles (``.pt .pth .bin .ckpt``): loaded with ``weights_only=True`` and never anything else.

Zip-format files are memory-mapped, and the pages behind each tensor are handed back to the kernel
after it is copied out, so reading all K candidates does not keep K models resident. A file that
needs more than tensors to unpickle is refused with the globals it asks for; there is no unsafe
fallback.
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
from ..rename import log_ema_hints, unwrap_state_dict
from ..stats import stats
from .base import Entry, Reader, register

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


def torch_load(path: Path) -> tuple[Any, bool]:
    """``torch.load`` with ``weights_only=True`` (mmap'd when the file is a zip); returns (object, mmapped).

    Raises:
        CheckpointError: the file needs unsafe globals (named in the message), or is damaged.
    """
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), mmap
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
        obj, self._mmap = torch_load(self.path)
        if not unwrap:
            if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise NotATensorMapping(f"{path}: holds a {type(obj).__name__}, not a mapping of name -> tensor")
            self._sd = {str(k): v for k, v in obj.items()}
            return
        log_ema_hints(obj, self.path, ema_key)
        self._sd, self.container = unwrap_state_dict(obj, ema_key=ema_key, source=str(path))
        if self.container is not None and isinstance(obj, Mapping):
            self.outer_keys = frozenset(map(str, obj))

    def entries(self) -> dict[str, Entry]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self._sd.items()}

    def read(self, key: str) -> torch.Tensor:
        src = self._sd[key]
        out = torch.empty(src.shape, dtype=src.dtype)
        out.copy_(src)
        stats.tensor(self.path, out.numel() * out.element_size())
        if self._mmap:
            _release_pages(src)
        return out

    def close(self) -> None:
        self._sd = {}
