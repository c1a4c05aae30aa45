"""safetensors files: the header is validated by the library, tensors are read with ``pread``.

Data are read into a fresh buffer per tensor instead of through a long-lived mmap: otherwise the
resident size would grow to the sum of all K files as a merge touches every page of every
candidate, even though only one tensor per candidate is live. Every read also feeds the file's
``StreamingHasher``, so a merge that reads in file order hashes the file without reading it twice.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import torch

from ...errors import CheckpointError, one_line
from ..hashing import StreamingHasher
from ..stats import stats
from .base import Entry, Reader, register

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
        from safetensors import safe_open

        self.path = Path(path)
        self.files = [self.path]
        # The library validates the header (length, JSON, offsets within the file, overlaps) first.
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                self.metadata = f.metadata() or {}
            with open(path, "rb") as fh:
                raw_len = fh.read(8)
                (n,) = struct.unpack("<Q", raw_len)
                raw_header = fh.read(n)
                header = json.loads(raw_header)
        except Exception as e:  # noqa: BLE001 - any decode failure means the same thing to the user
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({one_line(e)}); it may be truncated or corrupted, "
                "re-save or re-download it"
            ) from e
        self._base = 8 + n
        self._index: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        for k in keys:
            info = header[k]
            dtype = ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {k!r} has dtype {info['dtype']} which torch cannot hold")
            begin, end = info["data_offsets"]
            self._index[k] = (tuple(info["shape"]), dtype, begin, end)
        if sys.byteorder != "little":
            raise CheckpointError("reading safetensors on a big-endian machine is not supported")
        self._hasher = StreamingHasher(self.path)
        self._hasher.update(0, raw_len + raw_header)
        self._fh = open(path, "rb")

    def entries(self) -> dict[str, Entry]:
        return {k: (v[0], v[1]) for k, v in self._index.items()}

    def position(self, key: str) -> tuple[int, int]:
        return (0, self._base + self._index[key][2])

    def _pread(self, key: str, nbytes: int, offset: int, what: str) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            got = os.preadv(self._fh.fileno(), [view], offset)
            if got != nbytes:
                raise CheckpointError(f"{self.path}: tensor {key!r} is truncated ({got} of {nbytes} bytes{what})")
            stats.tensor(self.path, nbytes)
            self._hasher.update(offset, view)
        return buf

    def read(self, key: str) -> torch.Tensor:
        shape, dtype, begin, end = self._index[key]
        buf = self._pread(key, end - begin, self._base + begin, "")
        return buf.view(dtype).reshape(shape)

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        shape, dtype, begin, end = self._index[key]
        size = dtype.itemsize
        stop = max(start, min(stop, (end - begin) // size))
        buf = self._pread(key, (stop - start) * size, self._base + begin + start * size, f" at element {start}")
        return buf.view(dtype)

    def file_hashes(self) -> list[str]:
        return [self._hasher.finish()]

    def close(self) -> None:
        self._fh.close()
