"""Checks on what a reader hands out: dense strided tensors of a dtype twamerge merges and writes, and,
for torch zips, storage records that hold every byte their tensors declare.

Whatever the format, a tensor that is sparse, on the meta device, nested, quantized, complex or of a
float8 variant safetensors cannot store is refused on read with its key and dtype named, before any
arithmetic (otherwise it surfaces as a copy or cast failure deep in a merge, or as an output that
cannot be written).
"""

from __future__ import annotations

import functools
import io
import pickle
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, one_line
from .safetensors import ST_DTYPES

__all__ = ["SUPPORTED_DTYPES", "ZipStorages", "check_tensor", "check_zip_storages"]

#: the dtypes a merge reads and writes (every one safetensors stores)
SUPPORTED_DTYPES = frozenset(ST_DTYPES.values())


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_tensor(t: Any, path: str | Path, key: str) -> torch.Tensor:
    """Return ``t`` when it is a dense, strided CPU tensor of a supported dtype; raise otherwise.

    Raises:
        CheckpointError: naming the file, the key, what the tensor is and its dtype.
    """
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
    if t.is_nested:
        what = "a nested tensor"
    elif t.layout != torch.strided:
        what = f"a {str(t.layout).removeprefix('torch.').replace('_', ' ')} tensor"
    elif t.is_meta:
        what = "a meta tensor (it has a shape but no data)"
    elif t.device.type != "cpu":
        what = f"a tensor on {t.device}"
    elif t.is_quantized:
        what = "a quantized tensor"
    elif t.dtype not in SUPPORTED_DTYPES:
        what = "a tensor of a dtype twamerge cannot merge or write"
    else:
        return t
    raise CheckpointError(
        f"{path}: tensor {key!r} is {what} (dtype {_dtype(t)}); only dense tensors of dtype "
        f"{', '.join(sorted(_dtype(torch.empty(0, dtype=d)) for d in SUPPORTED_DTYPES))} can be merged"
    )


class _Stub:
    """Stands in for every global a torch pickle names while its storage ids are collected: nothing
    the file names is imported or called."""

    module = ""
    qualname = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageIds(pickle.Unpickler):
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.ids: list[tuple] = []

    def find_class(self, module: str, name: str) -> type:
        return type(name if name.isidentifier() else "_", (_Stub,), {"module": module, "qualname": name})

    def persistent_load(self, pid: Any) -> Any:
        self.ids.append(pid if isinstance(pid, tuple) else (pid,))
        return _Stub()


def _itemsize(storage_type: Any) -> int | None:
    """Bytes per element of a storage class the pickle names (``torch.FloatStorage``), or None."""
    if isinstance(storage_type, type) and issubclass(storage_type, _Stub) and storage_type.module == "torch":
        return _torch_storage_itemsize(storage_type.qualname)
    return None


@functools.lru_cache(maxsize=64)
def _torch_storage_itemsize(name: str) -> int | None:
    # Cached: a checkpoint names the same few storage classes once per tensor.
    if name == "UntypedStorage":
        return 1
    if name.endswith("Storage") and name.isidentifier():
        with warnings.catch_warnings():  # "TypedStorage is deprecated"
            warnings.simplefilter("ignore")
            cls = getattr(torch, name, None)
            dtype = getattr(cls, "dtype", None) if isinstance(cls, type) else None
        if isinstance(dtype, torch.dtype):
            return dtype.itemsize
    return None


@dataclass
class ZipStorages:
    """Where a torch zip keeps its storages' bytes, for reading them straight from the file.

    Attributes:
        order: the storage keys in the order the pickle first names them, which is the order
            ``torch.load`` creates the storages in.
        offsets: storage key -> offset in the file of its record's bytes (uncompressed records only).
        native: the records hold the bytes as this machine orders them (else torch swaps them on load).
    """

    order: list[str]
    offsets: dict[str, int]
    native: bool


def _record_offsets(path: Path, infos: dict[str, zipfile.ZipInfo], names: list[str]) -> dict[str, int]:
    """Offset of each named record's bytes: past its local header, whose name and extra field lengths
    may differ from the central directory's."""
    offsets = {}
    with open(path, "rb") as fh:
        for name in names:
            info = infos[name]
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            fh.seek(info.header_offset)
            local = fh.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                continue
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offsets[name] = info.header_offset + 30 + name_len + extra_len
    return offsets


def check_zip_storages(path: Path) -> ZipStorages:
    """Refuse a torch zip whose storage records hold fewer bytes than the pickle declares for them;
    return where the records are.

    ``torch.load(mmap=True)`` maps a storage at its record's offset with the size the pickle declares,
    so a short record would silently read the bytes of the zip entries that follow it.

    Raises:
        CheckpointError: a record is shorter than its storage, missing, or the pickle cannot be scanned.
    """
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            pkl = next((n for n in infos if n == "data.pkl" or n.endswith("/data.pkl")), None)
            if pkl is None:
                raise CheckpointError(f"{path}: not a torch checkpoint (the zip has no data.pkl)")
            prefix = pkl[: -len("data.pkl")]
            scanner = _StorageIds(z.read(pkl))
            scanner.load()
            order_record = infos.get(f"{prefix}byteorder")
            byteorder = z.read(order_record).decode(errors="replace") if order_record is not None else None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged zip or pickle
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({one_line(e)[:200]})") from None
    order: dict[str, None] = {}  # (ordered, without repeats)
    for pid in scanner.ids:
        if len(pid) < 5 or pid[0] != "storage":
            continue
        _, storage_type, key, _location, numel = pid[:5]
        if isinstance(key, str):
            order.setdefault(key)
        itemsize = _itemsize(storage_type)
        if itemsize is None or not isinstance(key, str) or isinstance(numel, bool) or not isinstance(numel, int):
            continue  # torch refuses what it does not know itself
        info = infos.get(f"{prefix}data/{key}")
        need = numel * itemsize
        if info is None:
            raise CheckpointError(f"{path}: storage {key!r} has no data record in the zip; the file is damaged")
        if info.file_size < need or numel < 0:
            raise CheckpointError(
                f"{path}: storage {key!r} holds {info.file_size} bytes but its tensors declare {need} bytes; "
                "the file is truncated or corrupted"
            )
    names = [f"{prefix}data/{key}" for key in order if f"{prefix}data/{key}" in infos]
    try:
        located = _record_offsets(path, infos, names)
    except OSError:
        located = {}
    offsets = {name[len(prefix) + len("data/"):]: off for name, off in located.items()}
    return ZipStorages(list(order), offsets, (byteorder or _default_byteorder()) == sys.byteorder)


def _default_byteorder() -> str:
    """The byte order ``torch.load`` assumes for a zip without a byteorder record (written before 1.12)."""
    endianness = torch.serialization.get_default_load_endianness()
    if endianness is None or endianness == torch.serialization.LoadEndianness.LITTLE:
        return "little"
    return "big" if endianness == torch.serialization.LoadEndianness.BIG else sys.byteorder
