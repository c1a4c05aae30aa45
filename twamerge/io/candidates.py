"""Candidates (a reader plus its renaming) and the validated set of them that merges read from.

``open_candidates`` opens and renames without comparing (``inspect`` reports on files that cannot be
merged); ``open_checkpoints`` expands the paths, opens, and validates: what a merge starts from.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, InvalidArgumentError
from .discovery import HF_WEIGHT_NAMES, expand_paths, hf_weight_file
from .formats import Entry, Reader, open_reader
from .hashing import FileHash
from .rename import is_lightning, rename_note, strip_prefixes
from .validate import KEY_MODES, check_finite, validate_candidates

__all__ = ["Candidate", "CheckpointSet", "open_candidates", "open_checkpoints"]


class Candidate:
    """One candidate: a reader plus the rename map from clean keys to the reader's raw keys.

    Attributes:
        path: the path as given (a file, an index or a model directory).
        reader: the format reader.
        format: the reader's format, prefixed ``hf-dir:`` for a model directory.
        entries: ``{clean key: (shape, dtype)}``.
        raw_of: ``{clean key: raw key}``.
        rename_note: what the renaming changed (for the report), or None.
        hf_dir: ``path`` when it is a model directory with a ``config.json``.
    """

    def __init__(self, path: Path, ema_key: str | None):
        self.path = path = Path(path)
        self.hf_dir: Path | None = None
        target: Path | None = path
        if path.is_dir():
            target = hf_weight_file(path)
            if target is None:
                raise CheckpointError(f"{path}: directory holds none of {', '.join(HF_WEIGHT_NAMES)}")
            if (path / "config.json").is_file():
                self.hf_dir = path
        elif not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        self.reader: Reader = open_reader(target, ema_key)
        self.format = ("hf-dir:" if path.is_dir() else "") + self.reader.format
        raw = self.reader.entries()
        names, stripped = strip_prefixes(list(raw), lightning=is_lightning(self.reader.outer_keys))
        if len(set(names)) != len(names):
            self.reader.close()
            raise CheckpointError(f"{path}: stripping prefixes {stripped} makes key names collide")
        self.raw_of = dict(zip(names, raw))
        self.entries: dict[str, Entry] = {n: raw[r] for n, r in self.raw_of.items()}
        self.rename_note: dict[str, Any] | None = rename_note(path, self.reader.container, stripped, len(names))
        self._hashes: list[FileHash] | None = None
        self._sha: str | None = None

    def read(self, key: str) -> torch.Tensor:
        return self.reader.read(self.raw_of[key])

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.reader.read_range(self.raw_of[key], start, stop)

    def reads_ranges(self, key: str) -> bool:
        """Whether ``read_range`` of ``key`` reads only that range (see ``Reader.reads_ranges``)."""
        return self.reader.reads_ranges(self.raw_of[key])

    def position(self, key: str) -> tuple[int, int] | None:
        """(file number, byte offset) of ``key``'s data in this candidate, or None (see ``Reader.position``)."""
        return self.reader.position(self.raw_of[key])

    def start_hashing(self) -> list[FileHash]:
        """Start computing the SHA-256 of this candidate's files on the hashing threads (once)."""
        if self._hashes is None:
            self._hashes = self.reader.hash_files()
        return self._hashes

    def sha256(self) -> str:
        """SHA-256 of the file; for an index with shards, of the ``name:sha\\n`` lines in index order.

        Computed once, on the hashing threads (started here unless ``start_hashing`` started it
        earlier, beside the work that reads the tensors); this waits for it.
        """
        if self._sha is None:
            hashes = [h.result() for h in self.start_hashing()]
            if len(hashes) == 1:
                self._sha = hashes[0]
            else:
                h = hashlib.sha256()
                for f, sha in zip(self.reader.files, hashes):
                    h.update(f"{f.name}:{sha}\n".encode())
                self._sha = h.hexdigest()
        return self._sha

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.reader.files)

    def close(self) -> None:
        if self._hashes is not None and self._sha is None:
            for h in self._hashes:  # no one will ask for them now
                h.cancel()
        self.reader.close()


class CheckpointSet:
    """K validated candidate checkpoints with the same keys, shapes and dtypes, read lazily.

    Build it with ``open_checkpoints``. Tensors are read one at a time, on CPU, in their stored dtype;
    nothing keeps whole models in memory. Use as a context manager or call ``close()``.
    """

    def __init__(self, cands: list[Candidate], keys: list[str], dropped: list[str], allow_nonfinite: bool):
        self._cands = cands
        self._keys = keys
        self.dropped_keys = dropped
        self.allow_nonfinite = allow_nonfinite
        # Integer keys already reported as differing (a fit merges many times: warn once per key).
        self.int_mismatch_warned: set[str] = set()

    def __len__(self) -> int:
        return len(self._cands)

    def __enter__(self) -> CheckpointSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def candidates(self) -> list[Candidate]:
        return list(self._cands)

    @property
    def paths(self) -> list[Path]:
        return [c.path for c in self._cands]

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def keys_in_file_order(self, keys: Iterable[str] | None = None) -> list[str]:
        """``keys`` (default: all merged keys) sorted by where the first candidate stores their data.

        A pass over the tensors in this order reads each file front to back, which is what the kernel's
        read-ahead serves best when the files are not in the page cache. Keys whose format cannot say
        where they are (legacy torch pickles) keep their given order, after those that can.
        """
        keys = list(self._keys if keys is None else keys)
        first = self._cands[0]
        positions = {k: first.position(k) for k in keys}
        placed = sorted((k for k in keys if positions[k] is not None), key=lambda k: positions[k])
        return placed + [k for k in keys if positions[k] is None]

    def position(self, i: int, key: str) -> tuple[int, int] | None:
        """(file number, byte offset) of candidate ``i``'s ``key`` data, or None when unknown."""
        return self._cands[i].position(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._cands[0].entries[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._cands[0].entries[key][1]

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def is_float(self, key: str) -> bool:
        return self.dtype(key).is_floating_point

    @property
    def float_keys(self) -> list[str]:
        return [k for k in self._keys if self.is_float(k)]

    def get(self, i: int, key: str, *, check: bool = True) -> torch.Tensor:
        """Tensor ``key`` of candidate ``i``: CPU, stored dtype, the caller's own.

        Usually a private copy-on-write map of the file's bytes (``io.formats.mapped``): nothing is
        copied unless the caller changes the tensor in place, and then neither the file nor later
        reads see the change.

        ``check=False`` skips the NaN/Inf scan, for callers that check a result instead (a sum over
        candidates is non-finite whenever one of its terms is) and call ``get`` again to name the file.

        Raises:
            NonFiniteError: a floating tensor holds NaN/Inf (unless ``allow_nonfinite`` or ``check=False``).
        """
        t = self._cands[i].read(key)
        return self._checked(i, key, t) if check else t

    def get_slice(self, i: int, key: str, start: int, stop: int, *, check: bool = True) -> torch.Tensor:
        """Elements ``[start, stop)`` of candidate ``i``'s flattened ``key``: 1-D, CPU, stored dtype.

        Safetensors files are read only in that byte range (a distributed fit's rank reads its columns).

        Raises:
            NonFiniteError: the slice holds NaN/Inf (unless ``allow_nonfinite`` or ``check=False``).
        """
        t = self._cands[i].read_range(key, start, stop)
        return self._checked(i, key, t) if check else t

    def reads_ranges(self, key: str) -> bool:
        """Whether ``get_slice`` of ``key`` reads only the slice from every candidate (else whole tensors)."""
        return all(c.reads_ranges(key) for c in self._cands)

    def _checked(self, i: int, key: str, t: torch.Tensor) -> torch.Tensor:
        return t if self.allow_nonfinite else check_finite(t, self._cands[i].path, key)

    def stack(self, key: str, *, check: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """All candidates' ``key`` stacked: ``[K, *shape]``, stored dtype (``check`` as for ``get``).

        ``out``: a tensor of that shape and dtype to fill and return instead of a new one. A caller that
        stacks key after key into one reused buffer saves the page faults and zeroing of a fresh
        allocation per key, which cost 2-3x the copy itself (8 candidates of 4 MB tensors, page cache warm).
        """
        shape = (len(self), *self.shape(key))
        out = self._destination(key, shape, out)
        for i in range(len(self)):
            out[i].copy_(self.get(i, key, check=check))
        return out

    def stack_slice(self, key: str, lo: int, hi: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[lo, hi)`` of the flattened ``key`` in every candidate: ``[K, hi - lo]``, stored dtype.

        The whole tensor is read as one piece; a part only in that byte range where the format allows
        (what the subspace passes of a distributed fit's rank read). No NaN/Inf scan: its reader,
        ``build_subspace``, finds non-finite values from each tensor's Gram matrix for nothing.
        ``out``: as for ``stack``, of shape ``[K, hi - lo]``.
        """
        out = self._destination(key, (len(self), hi - lo), out)
        whole = (lo, hi) == (0, self.numel(key))
        for i in range(len(self)):
            piece = self.get(i, key, check=False) if whole else self.get_slice(i, key, lo, hi, check=False)
            out[i].copy_(piece.reshape(-1))
        return out

    def _destination(self, key: str, shape: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
        dtype = self.dtype(key)
        if out is None:
            return torch.empty(shape, dtype=dtype)
        if tuple(out.shape) != shape or out.dtype != dtype:
            raise InvalidArgumentError(f"out is {list(out.shape)} {out.dtype}; stacking {key!r} needs {list(shape)} "
                                       f"{dtype}")
        return out

    @property
    def hf_dir(self) -> Path | None:
        """The first candidate's directory when the inputs are Hugging Face style directories."""
        return self._cands[0].hf_dir

    @property
    def formats(self) -> list[str]:
        return [c.format for c in self._cands]

    def start_hashing(self) -> None:
        """Start computing every candidate's SHA-256 on the hashing threads (``io.hashing``), to overlap
        with the work that reads the tensors; ``sources()`` waits for the results."""
        for c in self._cands:
            c.start_hashing()

    def sources(self, *, hashes: bool = True) -> list[dict[str, str]]:
        """``{"path", "format", "sha256"}`` per candidate; ``hashes=False`` leaves out ``sha256``.

        The hashes are computed once; call ``start_hashing()`` first, before the reads, so that this
        only waits for what is left of them.
        """
        if not hashes:
            return [{"path": str(c.path), "format": c.format} for c in self._cands]
        self.start_hashing()  # every file on the hashing threads at once, not one after another
        return [{"path": str(c.path), "format": c.format, "sha256": c.sha256()} for c in self._cands]

    @property
    def renamed(self) -> list[dict[str, Any]]:
        """Per candidate where something changed: the container unwrapped and the prefixes stripped."""
        return [c.rename_note for c in self._cands if c.rename_note]

    def close(self) -> None:
        for c in self._cands:
            c.close()


def open_candidates(paths: Sequence[str | Path], ema_key: str | None = None) -> list[Candidate]:
    """Open already expanded ``paths`` (no glob or directory expansion, no cross-checks).

    On any failure the candidates opened so far are closed. The caller closes the rest
    (``Candidate.close``), or hands them to ``CheckpointSet``.
    """
    cands: list[Candidate] = []
    try:
        for p in paths:
            cands.append(Candidate(Path(p), ema_key))
    except BaseException:
        for c in cands:
            c.close()
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
    if keys not in KEY_MODES:
        raise InvalidArgumentError(f"keys={keys!r}; expected 'strict' or 'intersection'")
    expanded = expand_paths(paths)
    if len(expanded) < min_count:
        raise CheckpointError(
            f"need at least {min_count} checkpoints, got {len(expanded)}"
            + (f" ({', '.join(str(p) for p in expanded)})" if expanded else "")
        )
    cands = open_candidates(expanded, ema_key)
    try:
        common, dropped = validate_candidates(cands, keys)
    except BaseException:
        for c in cands:
            c.close()
        raise
    return CheckpointSet(cands, common, dropped, allow_nonfinite)
