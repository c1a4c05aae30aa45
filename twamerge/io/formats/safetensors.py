"""safetensors files: the header is validated by the library, each tensor is a private map of its bytes.

Each read maps only that tensor's bytes (``mapped.read_tensor``) instead of holding one long-lived
map of the whole file: otherwise the resident size would grow to the sum of all K files as a merge
touches every page of every candidate, even though only one tensor per candidate is live. The
file's SHA-256 is computed apart, on a hashing thread, from the descriptor kept open here.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch

from ...errors import CheckpointError, one_line
from ..hashing import FileHash
from ..stats import resolved_path, stats
from .base import Entry, Reader, register
from .mapped import read_tensor

__all__ = ["ST_DTYPES", "SafetensorsReader"]

# safetensors dtype names -> torch dtypes; the writer uses the inverse, so every dtype read can be written.
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


@register(".safetensors")
class SafetensorsReader(Reader):
    format = "safetensors"

    def __init__(self, path: Path, ema_key: str | None = None):
        if sys.byteorder != "little":
            raise CheckpointError("reading safetensors on a big-endian machine is not supported")
        self.path = Path(path)
        self.files = [self.path]
        self._counted = resolved_path(self.path)  # the read counter's key, resolved once
        # Every read and the hash use the descriptor the header is read from: a path replaced meanwhile
        # (a trainer saving by rename) does not mix two files.
        try:
            self._fh = open(path, "rb")
        except OSError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
        try:
            self._index = self._read_index()
        except BaseException:
            self._fh.close()
            raise

    def _read_index(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, int, int]]:
        """``{key: (shape, dtype, begin, end)}`` from the header; sets ``metadata`` and ``_base``."""
        from safetensors import safe_open

        path = self.path
        # The library validates the header (length, JSON, offsets within the file, overlaps) first.
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                self.metadata = f.metadata() or {}
            (n,) = struct.unpack("<Q", self._fh.read(8))
            header = json.loads(self._fh.read(n))
        except Exception as e:  # noqa: BLE001 - any decode failure means the same thing to the user
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({one_line(e)}); it may be truncated or corrupted, "
                "re-save or re-download it"
            ) from e
        self._base = 8 + n
        index = {}
        for k in keys:
            info = header[k]
            dtype = ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {k!r} has dtype {info['dtype']} which torch cannot hold")
            begin, end = info["data_offsets"]
            index[k] = (tuple(info["shape"]), dtype, begin, end)
        return index

    def entries(self) -> dict[str, Entry]:
        return {k: (v[0], v[1]) for k, v in self._index.items()}

    def position(self, key: str) -> tuple[int, int]:
        return (0, self._base + self._index[key][2])

    def read(self, key: str) -> torch.Tensor:
        shape, dtype, begin, end = self._index[key]
        t = read_tensor(self._fh.fileno(), self._base + begin, shape, dtype, self.path, key)
        stats.tensor(self._counted, end - begin, resolved=True)
        return t

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        shape, dtype, begin, end = self._index[key]
        size = dtype.itemsize
        stop = max(start, min(stop, (end - begin) // size))
        t = read_tensor(self._fh.fileno(), self._base + begin + start * size, (stop - start,), dtype, self.path, key,
                        f" at element {start}")
        stats.tensor(self._counted, (stop - start) * size, resolved=True)
        return t

    def reads_ranges(self, key: str) -> bool:
        return True

    def hash_files(self) -> list[FileHash]:
        return [FileHash(self.path, self._fh.fileno())]

    def close(self) -> None:
        self._fh.close()
