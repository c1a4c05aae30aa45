"""Find, open, validate and write checkpoints, one tensor at a time.

Reading (``open_checkpoints``) accepts safetensors files, sharded safetensors or torch checkpoints
(``*.index.json``), torch pickles (``.pt .pth .bin .ckpt``, loaded only with ``weights_only=True``)
and Hugging Face style model directories. Containers (``state_dict``, ``model``, ...) are unwrapped
and ``module.`` / ``_orig_mod.`` prefixes stripped in one place (``unwrap_state_dict``); every
candidate is validated against the first (keys, shapes, dtypes) before any arithmetic.

Memory: safetensors data is read with ``pread`` into a fresh buffer per tensor instead of through a
long-lived mmap, and pages of memory-mapped torch pickles are handed back to the kernel after each
tensor is copied out. Otherwise the resident size would grow to the sum of all K files as the merge
touches every page of every candidate, even though only one tensor per candidate is live.

Writing (``write_checkpoint``) is atomic: files go to temporary names in the destination folder
and are renamed into place only when complete; a directory output is built in a temporary sibling
directory and renamed as a whole.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .options import dtype_name, parse_dtype, parse_size  # noqa: F401 - re-exported until io/ lands
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    InvalidArgumentError,
    NonFiniteError,
    OutputError,
    one_line,
)

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointSet",
    "expand_paths",
    "open_checkpoints",
    "parse_dtype",
    "parse_size",
    "sha256_file",
    "unwrap_state_dict",
    "write_checkpoint",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
# Containers that hold the model's state dict inside a training checkpoint, most specific first.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Keys that usually hold EMA weights; never chosen implicitly, only mentioned so users find --key.
EMA_HINT_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model", "ema_params")
STRIP_PREFIXES = ("module.", "_orig_mod.")
# Weight files of a Hugging Face model directory, in order of preference.
HF_WEIGHT_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# Files never copied from a Hugging Face source directory: weights of the source model.
_WEIGHT_FILE_SUFFIXES = CHECKPOINT_SUFFIXES + (".h5", ".msgpack", ".onnx", ".ot", ".tflite", ".gguf")

_ST_DTYPES: dict[str, torch.dtype] = {
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

_SHA_CACHE: dict[tuple[int, int, int, int], str] = {}


def sha256_file(path: Path, *, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of one file, read in 4 MiB chunks.

    Cached by (device, inode, mtime, size), which a rename keeps: the hash logged for a temporary
    output is reused for the renamed file instead of reading it again.
    """
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        if len(_SHA_CACHE) > 4096:
            _SHA_CACHE.clear()
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _natural_key(path: Path) -> list[Any]:
    # re.split with a capture group alternates text and digits, so int and str never meet in a comparison.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in HF_WEIGHT_NAMES)


def _is_checkpoint_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith(CHECKPOINT_SUFFIXES) or name.endswith(".index.json"))


def _drop_indexed_shards(paths: list[Path]) -> list[Path]:
    """Remove shard files that an index in the same list already covers (a glob catches both)."""
    shards: set[Path] = set()
    for p in paths:
        if p.name.endswith(".index.json") and p.is_file():
            try:
                weight_map = json.loads(p.read_text()).get("weight_map", {})
            except (OSError, ValueError):
                continue
            shards.update((p.parent / f).resolve() for f in set(weight_map.values()))
    return [p for p in paths if p.resolve() not in shards]


def _expand_dir(directory: Path) -> list[Path]:
    if _is_model_dir(directory):
        return [directory]
    found = [p for p in directory.iterdir() if _is_checkpoint_file(p) or _is_model_dir(p)]
    found = _drop_indexed_shards(sorted(found, key=_natural_key))
    if not found:
        raise CheckpointError(
            f"directory {directory} holds no checkpoints (looked for *.safetensors, *.pt, *.pth, *.bin, *.ckpt, "
            f"*.index.json and model directories with {HF_WEIGHT_NAMES[1]} or {HF_WEIGHT_NAMES[3]})"
        )
    return found


def expand_paths(items: Sequence[str | Path]) -> list[Path]:
    """Expand globs and directories into an ordered list of candidate checkpoints.

    A directory in Hugging Face layout (``model.safetensors``, ``pytorch_model.bin`` or their
    ``.index.json``) is one candidate; any other directory contributes the checkpoint files and model
    directories inside it. Each glob or directory is sorted naturally (``epoch10`` after ``epoch9``);
    the order of the arguments themselves is kept. Shards covered by an index are dropped.

    Raises:
        CheckpointError: a path does not exist, a glob matches nothing, a directory holds no
            checkpoints, or the same file is given twice.
    """
    out: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        path = Path(text)
        if path.exists():
            out.extend(_expand_dir(path) if path.is_dir() else [path])
        elif glob.has_magic(text):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            matches = [m for m in matches if _is_checkpoint_file(m) or _is_model_dir(m)]
            if not matches:
                raise CheckpointError(f"pattern {text!r} matches no checkpoint files")
            out.extend(_drop_indexed_shards(sorted(matches, key=_natural_key)))
        else:
            raise CheckpointError(f"{text}: no such file or directory")
    seen: dict[Path, Path] = {}
    for p in out:
        key = p.resolve()
        if key in seen:
            raise CheckpointError(
                f"{p} is given more than once (also as {seen[key]}); each candidate must be a distinct file"
            )
        seen[key] = p
    return out


# --------------------------------------------------------------------------------------------------
# Readers: one per on-disk format. Each maps raw key -> (shape, dtype) and reads one tensor on demand.


class _Reader:
    format: str = ""
    files: list[Path]
    # Notes for the report: the container that was unwrapped, and whether this is a Lightning file.
    container: str | None = None
    lightning: bool = False

    def entries(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor (formats without random access read it whole)."""
        return self.read(key).reshape(-1)[start:stop].clone()

    def close(self) -> None:
        pass


class _SafetensorsReader(_Reader):
    format = "safetensors"

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.files = [path]
        # The library validates the header (length, JSON, offsets within the file, overlaps) first.
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                self.metadata = f.metadata() or {}
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except Exception as e:  # noqa: BLE001 - any decode failure means the same thing to the user
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({one_line(e)}); it may be truncated or corrupted, "
                "re-save or re-download it"
            ) from e
        self._base = 8 + n
        self._index: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        for k in keys:
            info = header[k]
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {k!r} has dtype {info['dtype']} which torch cannot hold")
            begin, end = info["data_offsets"]
            self._index[k] = (tuple(info["shape"]), dtype, begin, end)
        if sys.byteorder != "little":
            raise CheckpointError("reading safetensors on a big-endian machine is not supported")
        self._fh = open(path, "rb")

    def entries(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (v[0], v[1]) for k, v in self._index.items()}

    def read(self, key: str) -> torch.Tensor:
        shape, dtype, begin, end = self._index[key]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            got = os.preadv(self._fh.fileno(), [memoryview(buf.numpy())], self._base + begin)
            if got != end - begin:
                raise CheckpointError(f"{self.path}: tensor {key!r} is truncated ({got} of {end - begin} bytes)")
        return buf.view(dtype).reshape(shape)

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        shape, dtype, begin, end = self._index[key]
        size = dtype.itemsize
        stop = max(start, min(stop, (end - begin) // size))
        buf = torch.empty((stop - start) * size, dtype=torch.uint8)
        if stop > start:
            got = os.preadv(self._fh.fileno(), [memoryview(buf.numpy())], self._base + begin + start * size)
            if got != buf.numel():
                raise CheckpointError(f"{self.path}: tensor {key!r} is truncated ({got} of {buf.numel()} bytes "
                                      f"at element {start})")
        return buf.view(dtype)

    def close(self) -> None:
        self._fh.close()


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


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and never anything else; errors become CheckpointError."""
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


def unwrap_state_dict(
    obj: Any, *, ema_key: str | None = None, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the flat ``{name: Tensor}`` state dict inside a loaded checkpoint object.

    With ``ema_key`` (e.g. ``"state_dict_ema"`` or a dotted path ``"callbacks.ema.weights"``) that
    entry is taken; otherwise the first of ``state_dict``, ``model_state_dict``, ``model``, ``module``
    is descended into while the current dict holds non-tensor values.

    Returns:
        (state dict, the container path taken or None).

    Raises:
        CheckpointError: ``ema_key`` is missing, or the result is not a non-empty dict of tensors.
    """
    taken: list[str] = []
    if ema_key:
        cur = obj
        if isinstance(cur, Mapping) and ema_key in cur:
            parts = [ema_key]
        else:
            parts = ema_key.split(".")
        for part in parts:
            if not isinstance(cur, Mapping) or part not in cur:
                avail = sorted(map(str, cur.keys()))[:12] if isinstance(cur, Mapping) else []
                raise CheckpointError(
                    f"{source}: no entry {ema_key!r} (stopped at {part!r}); available keys there: {avail}"
                )
            cur = cur[part]
            taken.append(part)
        obj = cur
    else:
        while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            nxt = next((c for c in CONTAINER_KEYS if isinstance(obj.get(c), Mapping)), None)
            if nxt is None:
                break
            taken.append(nxt)
            obj = obj[nxt]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, expected a dict of tensors")
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            hint = f" (top-level keys: {sorted(map(str, obj.keys()))[:12]})" if not taken else ""
            raise CheckpointError(
                f"{source}: key {k!r} holds a {type(v).__name__}, not a tensor; expected a flat dict of tensors"
                f"{hint}; pass --key NAME to choose the state dict inside the file"
            )
    if not obj:
        raise CheckpointError(f"{source}: holds no tensors")
    return {str(k): v for k, v in obj.items()}, ".".join(taken) or None


class _TorchReader(_Reader):
    format = "torch"

    def __init__(self, path: Path, ema_key: str | None):
        self.path = path
        self.files = [path]
        obj, self._mmap = _torch_load(path)
        self.lightning = isinstance(obj, Mapping) and (
            "pytorch-lightning_version" in obj or ("state_dict" in obj and "global_step" in obj)
        )
        if isinstance(obj, Mapping) and not ema_key:
            hints = [k for k in EMA_HINT_KEYS if k in obj]
            if hints:
                log.info("%s also holds %s; pass --key %s to merge those weights instead", path, hints, hints[0])
        self._sd, self.container = unwrap_state_dict(obj, ema_key=ema_key, source=str(path))

    def entries(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self._sd.items()}

    def read(self, key: str) -> torch.Tensor:
        src = self._sd[key]
        out = torch.empty(src.shape, dtype=src.dtype)
        out.copy_(src)
        if self._mmap:
            _release_pages(src)
        return out

    def close(self) -> None:
        self._sd = {}


class _ShardedReader(_Reader):
    def __init__(self, index: Path, ema_key: str | None):
        self.path = index
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({one_line(e)}); expected a 'weight_map'") from e
        shard_names = list(dict.fromkeys(weight_map.values()))
        self.files = [index] + [index.parent / s for s in shard_names]
        self._shards: dict[str, _Reader] = {}
        try:
            for name in shard_names:
                shard = index.parent / name
                if not shard.is_file():
                    raise CheckpointError(f"{index}: shard {name} is missing from {index.parent}")
                self._shards[name] = _open_file(shard, ema_key)
        except BaseException:
            self.close()
            raise
        inner = {r.format for r in self._shards.values()}
        self.format = f"{inner.pop() if len(inner) == 1 else 'mixed'}-sharded"
        self._where: dict[str, tuple[_Reader, tuple[tuple[int, ...], torch.dtype]]] = {}
        for name, reader in self._shards.items():
            ent = reader.entries()
            for k, v in ent.items():
                if weight_map.get(k) == name:
                    self._where[k] = (reader, v)
        missing = [k for k in weight_map if k not in self._where]
        if missing:
            self.close()
            raise CheckpointError(f"{index}: {len(missing)} indexed tensors are absent from their shards, e.g. {missing[:3]}")

    def entries(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: v[1] for k, v in self._where.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._where[key][0].read(key)

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._where[key][0].read_range(key, start, stop)

    def close(self) -> None:
        for r in self._shards.values():
            r.close()


def _open_file(path: Path, ema_key: str | None) -> _Reader:
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _ShardedReader(path, ema_key)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return _SafetensorsReader(path)
    if name.endswith(TORCH_SUFFIXES) or zipfile.is_zipfile(path):
        return _TorchReader(path, ema_key)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (suffix {path.suffix!r}); expected .safetensors, .pt, .pth, .bin, "
        ".ckpt, *.index.json or a model directory"
    )


class _Candidate:
    """One candidate: a reader plus the rename map from clean keys to the reader's raw keys."""

    def __init__(self, path: Path, ema_key: str | None):
        self.path = path
        self.hf_dir: Path | None = None
        target = path
        if path.is_dir():
            target = next((path / n for n in HF_WEIGHT_NAMES if (path / n).is_file()), None)
            if target is None:
                raise CheckpointError(f"{path}: directory holds none of {', '.join(HF_WEIGHT_NAMES)}")
            if (path / "config.json").is_file():
                self.hf_dir = path
        elif not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        self.reader = _open_file(target, ema_key)
        self.format = ("hf-dir:" if path.is_dir() else "") + self.reader.format
        raw = self.reader.entries()
        names = list(raw)
        stripped: list[str] = []
        changed = True
        while changed and names:
            changed = False
            for p in STRIP_PREFIXES:
                if all(n.startswith(p) for n in names):
                    names = [n[len(p):] for n in names]
                    stripped.append(p)
                    changed = True
        # A LightningModule's state dict is its children's, prefixed by the attribute name (``model.``).
        first = names[0].split(".", 1)[0] + "." if names and "." in names[0] else None
        if self.reader.lightning and first and all(n.startswith(first) and n != first for n in names):
            names = [n[len(first):] for n in names]
            stripped.append(first)
        if len(set(names)) != len(names):
            self.reader.close()
            raise CheckpointError(f"{path}: stripping prefixes {stripped} makes key names collide")
        self.raw_of = dict(zip(names, raw))
        self.entries = {n: raw[r] for n, r in self.raw_of.items()}
        self.rename_note: dict[str, Any] | None = None
        if stripped or self.reader.container:
            self.rename_note = {
                "path": str(path),
                "container": self.reader.container,
                "stripped_prefixes": stripped,
                "renamed_keys": len(names) if stripped else 0,
            }
        self._sha: str | None = None

    def read(self, key: str) -> torch.Tensor:
        return self.reader.read(self.raw_of[key])

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.reader.read_range(self.raw_of[key], start, stop)

    def sha256(self) -> str:
        if self._sha is None:
            files = self.reader.files
            if len(files) == 1:
                self._sha = sha256_file(files[0])
            else:
                # Several files (index + shards): hash of the per-file hashes in index order.
                h = hashlib.sha256()
                for f in files:
                    h.update(f"{f.name}:{sha256_file(f)}\n".encode())
                self._sha = h.hexdigest()
        return self._sha

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.reader.files)


def _fmt_entry(e: tuple[tuple[int, ...], torch.dtype]) -> str:
    return f"{list(e[0])} {dtype_name(e[1])}"


def _validate(cands: list[_Candidate], mode: str) -> tuple[list[str], list[str]]:
    """Return (merged keys in the first candidate's order, dropped keys); raise on disagreement."""
    ref = cands[0]
    common = [k for k in ref.entries if all(k in c.entries for c in cands[1:])]
    dropped = sorted(set().union(*(c.entries for c in cands)) - set(common))
    if mode == "strict" and dropped:
        parts = []
        for c in cands[1:]:
            missing = [k for k in ref.entries if k not in c.entries]
            extra = [k for k in c.entries if k not in ref.entries]
            if missing or extra:
                parts.append(
                    f"{c.path.name} lacks {len(missing)} keys of {ref.path.name} {missing[:3]} "
                    f"and has {len(extra)} it lacks {extra[:3]}"
                )
        raise CheckpointMismatchError(
            "checkpoints disagree on keys: " + "; ".join(parts[:4])
            + ("; ..." if len(parts) > 4 else "")
            + "; pass --keys intersection to merge only the common keys"
        )
    if not common:
        raise CheckpointMismatchError("the checkpoints share no tensor names; nothing to merge")
    bad = []
    for k in common:
        for c in cands[1:]:
            if c.entries[k] != ref.entries[k]:
                bad.append(
                    f"{k!r} is {_fmt_entry(ref.entries[k])} in {ref.path.name} but {_fmt_entry(c.entries[k])} "
                    f"in {c.path.name}"
                )
                break
    if bad:
        raise CheckpointMismatchError(
            f"checkpoints disagree on shapes or dtypes of {len(bad)} tensors: " + "; ".join(bad[:3])
            + ("; ..." if len(bad) > 3 else "")
            + "; they must come from the same architecture (cast with --dtype only changes the output)"
        )
    if dropped:
        log.warning("merging the %d common keys; %d keys not in every checkpoint are left out, e.g. %s",
                    len(common), len(dropped), dropped[:3])
    return common, dropped


class CheckpointSet:
    """K validated candidate checkpoints with the same keys, shapes and dtypes, read lazily.

    Build it with ``open_checkpoints``. Tensors are read one at a time, on CPU, in their stored dtype;
    nothing keeps whole models in memory. Use as a context manager or call ``close()``.
    """

    def __init__(self, cands: list[_Candidate], keys: list[str], dropped: list[str], allow_nonfinite: bool):
        self._cands = cands
        self._keys = keys
        self.dropped_keys = dropped
        self.allow_nonfinite = allow_nonfinite

    def __len__(self) -> int:
        return len(self._cands)

    def __enter__(self) -> CheckpointSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def paths(self) -> list[Path]:
        return [c.path for c in self._cands]

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._cands[0].entries[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._cands[0].entries[key][1]

    def numel(self, key: str) -> int:
        n = 1
        for s in self.shape(key):
            n *= s
        return n

    def is_float(self, key: str) -> bool:
        return self.dtype(key).is_floating_point

    @property
    def float_keys(self) -> list[str]:
        return [k for k in self._keys if self.is_float(k)]

    def get(self, i: int, key: str, *, check: bool = True) -> torch.Tensor:
        """Tensor ``key`` of candidate ``i``: CPU, stored dtype, a fresh copy.

        ``check=False`` skips the NaN/Inf scan, for callers that check a result instead (a sum over
        candidates is non-finite whenever one of its terms is) and call ``get`` again to name the file.

        Raises:
            NonFiniteError: a floating tensor holds NaN/Inf (unless ``allow_nonfinite`` or ``check=False``).
        """
        t = self._cands[i].read(key)
        return self._checked(i, key, t) if check else t

    def get_slice(self, i: int, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of candidate ``i``'s flattened ``key``: 1-D, CPU, stored dtype.

        Safetensors files are read only in that byte range (a distributed fit's rank reads its columns).

        Raises:
            NonFiniteError: the slice holds NaN/Inf (unless ``allow_nonfinite``).
        """
        return self._checked(i, key, self._cands[i].read_range(key, start, stop))

    def _checked(self, i: int, key: str, t: torch.Tensor) -> torch.Tensor:
        if t.dtype.is_floating_point and not self.allow_nonfinite:
            check = t if t.dtype.itemsize > 1 else t.float()
            finite = torch.isfinite(check)
            if not bool(finite.all()):
                n_nan = int(check.isnan().sum())
                n_inf = int((~finite).sum()) - n_nan
                raise NonFiniteError(
                    f"{self._cands[i].path}: tensor {key!r} holds {n_nan} NaN and {n_inf} Inf values; "
                    "drop that checkpoint or pass --allow-nonfinite to merge anyway"
                )
        return t

    def stack(self, key: str) -> torch.Tensor:
        """All candidates' ``key`` stacked: ``[K, *shape]``, stored dtype."""
        out = torch.empty((len(self), *self.shape(key)), dtype=self.dtype(key))
        for i in range(len(self)):
            out[i].copy_(self.get(i, key))
        return out

    def stack_slice(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements ``[lo, hi)`` of the flattened ``key`` in every candidate: ``[K, hi - lo]``, stored dtype.

        The whole tensor is read as one piece; a part only in that byte range where the format allows.
        """
        if (lo, hi) == (0, self.numel(key)):
            return self.stack(key).reshape(len(self), -1)
        return torch.stack([self.get_slice(i, key, lo, hi) for i in range(len(self))])

    @property
    def hf_dir(self) -> Path | None:
        """The first candidate's directory when the inputs are Hugging Face style directories."""
        return self._cands[0].hf_dir

    @property
    def formats(self) -> list[str]:
        return [c.format for c in self._cands]

    def sources(self) -> list[dict[str, str]]:
        """``{"path", "format", "sha256"}`` per candidate (hashes computed once, on first call)."""
        return [{"path": str(c.path), "format": c.format, "sha256": c.sha256()} for c in self._cands]

    @property
    def renamed(self) -> list[dict[str, Any]]:
        """Per candidate where something changed: the container unwrapped and the prefixes stripped."""
        return [c.rename_note for c in self._cands if c.rename_note]

    def close(self) -> None:
        for c in self._cands:
            c.reader.close()


def _open_candidates(paths: Sequence[Path], ema_key: str | None) -> list[_Candidate]:
    """Open already expanded ``paths``; on any failure the ones opened so far are closed."""
    cands: list[_Candidate] = []
    try:
        for p in paths:
            cands.append(_Candidate(p, ema_key))
    except BaseException:
        for c in cands:
            c.reader.close()
        raise
    return cands


def open_checkpoints(
    paths: Sequence[str | Path],
    *,
    ema_key: str | None = None,
    keys: str = "strict",
    allow_nonfinite: bool = False,
    min_count: int = 2,
) -> CheckpointSet:
    """Open and validate candidate checkpoints.

    Args:
        paths: files, globs and directories (expanded with ``expand_paths``).
        ema_key: the entry inside torch checkpoints to merge instead of the model's state dict
            (e.g. ``"state_dict_ema"``; dotted paths descend).
        keys: ``"strict"`` (every candidate has the same keys) or ``"intersection"`` (merge the
            common keys, log the rest).
        allow_nonfinite: let ``get`` return tensors holding NaN/Inf.
        min_count: the fewest candidates accepted.

    Returns:
        A ``CheckpointSet``; shapes and dtypes have been checked to agree for every merged key.

    Raises:
        CheckpointError: a file is missing, unreadable, unsafe, or too few are given.
        CheckpointMismatchError: keys, shapes or dtypes disagree.

    Example:
        >>> with open_checkpoints(["a.safetensors", "b.safetensors"]) as cs:  # doctest: +SKIP
        ...     w = cs.stack(cs.keys[0])      # [2, *shape]
    """
    if keys not in ("strict", "intersection"):
        raise InvalidArgumentError(f"keys={keys!r}; expected 'strict' or 'intersection'")
    expanded = expand_paths(paths)
    if len(expanded) < min_count:
        raise CheckpointError(
            f"need at least {min_count} checkpoints, got {len(expanded)}"
            + (f" ({', '.join(str(p) for p in expanded)})" if expanded else "")
        )
    cands = _open_candidates(expanded, ema_key)
    try:
        common, dropped = _validate(cands, keys)
    except BaseException:
        for c in cands:
            c.reader.close()
        raise
    return CheckpointSet(cands, common, dropped, allow_nonfinite)


# --------------------------------------------------------------------------------------------------
# Writing


def _is_dir_output(out: Path, hf_source_dir: Path | None) -> bool:
    known = out.suffix.lower() in CHECKPOINT_SUFFIXES
    return not known and (out.suffix == "" or hf_source_dir is not None)


def check_output(out: str | Path, *, force: bool = False, hf_source_dir: Path | None = None) -> None:
    """Fail early, before any arithmetic, when ``out`` cannot or must not be written.

    Raises:
        OutputError: ``out`` exists without ``force``, has an unknown suffix, or its folder is not writable.
    """
    out = Path(out)
    is_dir = _is_dir_output(out, hf_source_dir)
    if not is_dir and out.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise OutputError(
            f"output {out} has suffix {out.suffix!r}; use .safetensors (default), .pt/.pth/.bin/.ckpt, or a name "
            "without a suffix for a model directory"
        )
    index = out.with_name(out.name + ".index.json")
    for existing in (out, index):
        if existing.exists() and not force:
            raise OutputError(f"{existing} already exists; pass --force to overwrite it or choose another output")
    if out.exists() and out.is_dir() != is_dir:
        raise OutputError(f"{out} exists and is a {'directory' if out.is_dir() else 'file'}; choose another output")
    ancestor = out.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: folder {ancestor} is not writable")


def _prepare_tensors(tensors: Mapping[str, torch.Tensor], clone_shared: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        if not isinstance(k, str):
            raise TypeError(f"tensor names must be str, got {type(k).__name__} {k!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{k!r} is a {type(t).__name__}, expected a torch.Tensor")
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        # safetensors refuses tensors that share memory (tied weights): give each its own copy.
        if not t.is_contiguous() or (clone_shared and ptr is not None and ptr in seen):
            t = t.contiguous().clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_size: int | None) -> list[list[str]]:
    if max_shard_size is None:
        return [list(tensors)]
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


# Every dtype we read, we can write.
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in _ST_DTYPES.items()}


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write the safetensors format byte-for-byte reproducibly.

    ``safetensors.torch.save_file`` keeps the metadata in a hash map whose order changes from call to
    call, so the same merge would get a different file (and SHA-256) each time. Here the header is
    JSON with sorted keys (tensors by name, then ``__metadata__``), padded with spaces to 8 bytes, and
    the data follow in header order: the layout of the format's specification, written in a stable
    order, streamed tensor by tensor without a second copy.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                        else t.numpy().tobytes())


def _save(tensors: dict[str, torch.Tensor], path: Path, fmt: str, metadata: dict[str, str]) -> None:
    if fmt == "safetensors":
        _save_safetensors(tensors, path, metadata)
    else:
        torch.save(tensors, path)


def _copy_hf_files(src: Path, dst: Path) -> list[str]:
    copied = []
    ignore = shutil.ignore_patterns(*(f"*{s}" for s in _WEIGHT_FILE_SUFFIXES), "*.index.json", ".*")
    for entry in sorted(src.iterdir()):
        if entry.name.startswith(".") or entry.name.lower().endswith(_WEIGHT_FILE_SUFFIXES + (".index.json",)):
            continue
        if entry.name == "README.md":
            continue  # the source's model card describes the source, not the merge
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, ignore=ignore)
        else:
            shutil.copy2(entry, dst / entry.name)
        copied.append(entry.name)
    return copied


def _set_config_dtype(config_path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Make a copied ``config.json`` name the dtype the merged weights were written in.

    transformers loads with the config's ``torch_dtype`` (``dtype`` since v5) when asked for
    ``"auto"``; a merge written in bfloat16 must not claim float32. Left alone when the floating
    tensors have mixed dtypes or the config names none.
    """
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1 or not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    name = dtype_name(next(iter(dtypes)))
    keys = [k for k in ("torch_dtype", "dtype") if isinstance(config.get(k), str)]
    if keys and any(config[k] != name for k in keys):
        for k in keys:
            config[k] = name
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def _previous_output_files(out: Path, base_name: str) -> list[Path]:
    """The files a previous file output at ``out`` consists of: the file, its shards and index, metadata.

    Shards are taken from the old index's weight map only (never by globbing), so files the user put
    beside the output are not touched.
    """
    folder = out.parent
    found = [p for p in (out, folder / f"{base_name}.index.json", folder / f"{base_name}.metadata.json")
             if p.is_file()]
    index = folder / f"{base_name}.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            weight_map = {}
        found += [folder / name for name in set(weight_map.values())
                  if isinstance(name, str) and Path(name).name == name and (folder / name).is_file()]
    return found


def write_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    out: str | Path,
    *,
    metadata: dict[str, str],
    force: bool = False,
    max_shard_size: int | None = None,
    hf_source_dir: Path | None = None,
) -> list[Path]:
    """Write a state dict atomically and return the paths written (shards first, index last).

    Format from ``out``: ``.safetensors`` (with ``metadata`` in its header), ``.pt/.pth/.bin/.ckpt``
    (a plain ``torch.save`` state dict; ``metadata`` goes to ``<out>.metadata.json`` or the shard
    index), or a directory when ``out`` has no suffix (or an unknown one with ``hf_source_dir``):
    ``model.safetensors`` plus the config/tokenizer files of ``hf_source_dir``. Past ``max_shard_size``
    bytes the tensors are split into ``<stem>-0000i-of-0000N<suffix>`` shards with a
    ``<name>.index.json`` in the Hugging Face format.

    Args:
        tensors: ``{name: Tensor}``; any device, made contiguous; tensors sharing memory are cloned.
        out: output file or directory.
        metadata: str -> str, stored with the weights (``format: pt`` is added for transformers).
        force: replace an existing output.
        max_shard_size: bytes per shard, or None for one file.
        hf_source_dir: a Hugging Face model directory whose non-weight files are copied.

    Raises:
        OutputError: the output exists without ``force`` or cannot be written. Nothing partial is left.
        TypeError: a name or value is not str / Tensor, or metadata is not str -> str.
    """
    out = Path(out)
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in metadata.items()):
        raise TypeError("metadata must be a dict of str -> str (JSON-encode anything else)")
    metadata = {"format": "pt", **metadata}
    check_output(out, force=force, hf_source_dir=hf_source_dir)
    is_dir = _is_dir_output(out, hf_source_dir)
    fmt = "safetensors" if is_dir or out.suffix.lower() == ".safetensors" else "torch"
    prepared = _prepare_tensors(tensors, clone_shared=fmt == "safetensors")
    shards = _plan_shards(prepared, max_shard_size)
    base = Path("model.safetensors") if is_dir else Path(out.name)
    stem, suffix = base.stem, base.suffix
    names = [base.name] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}{suffix}" for i in range(len(shards))
    ]

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {out.parent}: {one_line(e)}") from e

    # (temporary path, final path) pairs; renamed in this order, index last.
    staged: list[tuple[Path, Path]] = []
    tmp_dir: Path | None = None
    try:
        if is_dir:
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
            target_dir = tmp_dir
        else:
            target_dir = out.parent

        def stage(final_name: str) -> Path:
            if is_dir:
                p = tmp_dir / final_name  # type: ignore[operator]
                staged.append((p, out / final_name))
                return p
            fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=target_dir)
            os.close(fd)
            staged.append((Path(tmp), out.parent / final_name))
            return Path(tmp)

        weight_map: dict[str, str] = {}
        for name, keys in zip(names, shards):
            part = {k: prepared[k] for k in keys}
            _save(part, stage(name), fmt, metadata)
            weight_map.update({k: name for k in keys})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in prepared.values())
            index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
            stage(f"{base.name}.index.json").write_text(json.dumps(index, indent=2))
        elif fmt == "torch":
            stage(f"{base.name}.metadata.json").write_text(json.dumps(metadata, indent=2))
        if is_dir and hf_source_dir is not None:
            copied = _copy_hf_files(Path(hf_source_dir), tmp_dir)  # type: ignore[arg-type]
            _set_config_dtype(tmp_dir / "config.json", prepared)  # type: ignore[operator]
            log.info("copied %s from %s", ", ".join(copied) or "nothing", hf_source_dir)

        for tmp, final in staged:
            log.info("wrote %s (%d bytes, sha256 %s)", final, tmp.stat().st_size, sha256_file(tmp))

        if is_dir:
            old = None
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
                os.replace(out, old / "x")
            os.replace(tmp_dir, out)  # type: ignore[arg-type]
            tmp_dir = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            # With --force, what the previous output had and this one lacks (its shards, a single
            # file now sharded or the reverse) goes too, or a loader could pick up stale weights.
            previous = _previous_output_files(out, base.name) if force else []
            done = []
            try:
                for tmp, final in staged:
                    os.replace(tmp, final)
                    done.append(final)
            except BaseException:
                for f in done:
                    f.unlink(missing_ok=True)
                raise
            for stale in set(previous) - set(done):
                stale.unlink(missing_ok=True)
                log.info("removed %s, part of the output this one replaces", stale)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {one_line(e)}") from e
    finally:
        for tmp, _ in staged:
            if not is_dir:
                tmp.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return [final for _, final in staged]

