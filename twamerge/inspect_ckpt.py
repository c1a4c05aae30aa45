"""Describe candidate checkpoints: formats, sizes, mergeability, diversity and the basis memory TWA needs.

(Named ``inspect_ckpt`` so that it never shadows the standard library's ``inspect``.)
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, CheckpointMismatchError, InvalidArgumentError, NonFiniteError
from .io import Candidate, CheckpointSet, expand_paths, open_candidates, validate_candidates
from .io.adapters import Adapter, AdapterSet, adapter_paths, check_agree, find_base
from .kernels.layout import FLOAT_BITS, PACKED_BITS, SUPPORTED_BITS
from .options import dtype_name

log = logging.getLogger(__name__)

__all__ = ["basis_memory_bytes", "centred_gram", "inspect_checkpoints"]

# The packed widths: those whose memory is worth comparing (16/32-bit floats are K x D x 2 or 4 bytes).
DEFAULT_BITS = PACKED_BITS
# Columns per float64 chunk when forming the Gram matrix: bounds the temporary to K x 4M doubles.
_CHUNK = 1 << 22


def basis_memory_bytes(k: int, d: int, bits: int, group_size: int = 128) -> int:
    """Bytes of a quantized basis for ``k`` candidates and ``d`` float parameters.

    The basis has ``k - 1`` rows of ``d`` columns padded to a multiple of ``group_size``; each row
    stores ``bits``-bit codes packed into bytes plus a float32 scale and zero point per group.
    ``bits`` 16/32 store plain floats without groups.
    """
    if group_size <= 0:
        raise InvalidArgumentError(f"group_size={group_size} must be positive")
    rows = max(k - 1, 0)
    if bits in FLOAT_BITS:
        return rows * d * bits // 8
    if bits not in PACKED_BITS:
        raise InvalidArgumentError(f"bits={bits} is not supported; expected one of "
                                   + ", ".join(map(str, SUPPORTED_BITS)))
    groups = -(-d // group_size)
    d_pad = groups * group_size
    return rows * (d_pad * bits // 8 + groups * 8)


def centred_gram(
    cs: CheckpointSet, *, progress: Callable[[Iterable[str]], Iterable[str]] | None = None
) -> torch.Tensor:
    """Gram matrix of the centred candidates over all floating tensors.

    Centring is done per tensor, in float64, before the products: for fine-tunes of one model the
    raw checkpoints are nearly parallel and ``J R J`` of the raw Gram would cancel catastrophically.

    Returns:
        ``G`` float64 ``[K, K]`` with ``G[i, j] = <c_i - m, c_j - m>``.
    """
    k = len(cs)
    gram = torch.zeros(k, k, dtype=torch.float64)
    keys: Iterable[str] = progress(cs.float_keys) if progress is not None else cs.float_keys
    try:
        for key in keys:
            x = cs.stack(key).reshape(k, -1)
            for s in range(0, x.shape[1], _CHUNK):
                y = x[:, s:s + _CHUNK].to(torch.float64)
                y -= y.mean(dim=0, keepdim=True)
                gram += y @ y.T
    finally:
        close = getattr(keys, "close", None)
        if close is not None:
            close()
    return gram


def _file_info(c: Candidate) -> dict[str, Any]:
    dtypes = Counter(dtype_name(e[1]) for e in c.entries.values())
    params = sum(math.prod(e[0]) for e in c.entries.values())
    float_params = sum(math.prod(e[0]) for e in c.entries.values() if e[1].is_floating_point)
    return {
        "path": str(c.path),
        "format": c.format,
        "tensors": len(c.entries),
        "params": params,
        "float_params": float_params,
        "dtypes": dict(sorted(dtypes.items())),
        "bytes": c.size_bytes(),
        "renamed": c.rename_note,
    }


def _round(x: float) -> float | None:
    return None if not math.isfinite(x) else round(x, 6)


def _similarity(cs: CheckpointSet, progress: Callable[[Iterable[str]], Iterable[str]] | None) -> dict[str, Any]:
    """Pairwise cosine similarity and distance of the centred candidates, their norms and the rank."""
    gram = centred_gram(cs, progress=progress)
    diag = gram.diagonal().clamp_min(0)
    norms = diag.sqrt()
    denom = norms[:, None] * norms[None, :]
    cosine = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.full_like(gram, math.nan))
    dist = (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0).sqrt()
    eig = torch.linalg.eigvalsh(gram)
    rank = int((eig > 1e-10 * max(float(eig.max()), 1e-300)).sum()) if float(eig.max()) > 0 else 0
    return {
        "cosine": [[_round(float(v)) for v in row] for row in cosine],
        "distance": [[_round(float(v)) for v in row] for row in dist],
        "norms": [_round(float(v)) for v in norms],
        "rank": rank,
    }


def _inspect_adapters(paths: list[Path], *, similarity: bool, bits: Sequence[int], group_size: int,
                      progress: Callable[[Iterable[str]], Iterable[str]] | None, t0: float) -> dict[str, Any]:
    """``inspect`` of LoRA adapter folders: each adapter's rank, alpha and modules; whether they can be merged
    (same base, modules and rank); the similarity of their updates (``s B A``, formed module by module; the
    base cancels when centring); the basis memory of a fit, which spans the base model (``io.adapters``)."""
    opened: list[Adapter] = []
    try:
        for p in paths:
            opened.append(Adapter(p))
        files = [{**_file_info(a.file), "path": str(a.path), "format": "peft-lora",
                  "lora": {"r": a.r, "lora_alpha": a.config.get("lora_alpha"), "use_rslora": a.rslora,
                           "scaling": a.scaling, "base_model": a.base_name, "modules": len(a.modules)}}
                 for a in opened]
        mergeable = len(opened) >= 2
        reason = None if mergeable else f"need at least 2 adapters to merge, got {len(opened)}"
        if mergeable:
            try:
                check_agree(opened)
            except CheckpointMismatchError as e:
                mergeable, reason = False, str(e)
        updates = AdapterSet(opened, None, allow_nonfinite=False)
        sim = None
        if mergeable and similarity:
            try:
                sim = _similarity(updates, progress)
            except NonFiniteError as e:
                mergeable, reason = False, str(e)
        described = updates.describe()
        try:
            base = find_base(opened, None)
        except CheckpointError:
            base = None
        d = described["update_params"]
        if base is not None:  # a fit's basis spans every floating tensor of the base
            (cand,) = open_candidates([base])
            try:
                d = sum(math.prod(e[0]) for e in cand.entries.values() if e[1].is_floating_point)
            finally:
                cand.close()
        memory = {str(b): basis_memory_bytes(len(opened), d, b, group_size) for b in bits}
        return {"command": "inspect", "count": len(opened), "files": files, "mergeable": mergeable, "reason": reason,
                "merged_tensors": len(updates.keys), "dropped_keys": [], "float_params": d,
                "adapters": {**described, "base_dir": None if base is None else str(base)}, "similarity": sim,
                "basis_memory": {"group_size": group_size, "rows": max(len(opened) - 1, 0), "bytes": memory},
                "seconds": round(time.perf_counter() - t0, 3)}
    finally:
        for a in opened:
            a.close()


def inspect_checkpoints(
    paths: Sequence[str | Path],
    *,
    ema_key: str | None = None,
    keys: str = "strict",
    similarity: bool = True,
    bits: Sequence[int] = DEFAULT_BITS,
    group_size: int = 128,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> dict[str, Any]:
    """Report on candidate checkpoints without changing anything.

    Args:
        paths: files, globs or directories.
        ema_key: entry to read inside torch checkpoints (as for ``average``).
        keys: ``"strict"`` or ``"intersection"`` (which keys a merge would use).
        similarity: compute the pairwise cosine similarity and distance of the centred candidates
            (reads every floating tensor once; one tensor per candidate in memory at a time).
        bits: bit widths for the basis-memory estimate.
        group_size: quantization group size for the estimate.
        progress: optional wrapper around the key iterable of the similarity pass.

    Returns:
        ``{"files": [...], "count", "mergeable", "reason", "merged_tensors", "float_params",
        "similarity": {"cosine": KxK, "distance": KxK, "norms": K, "rank": r} | None,
        "basis_memory": {"group_size", "bytes": {bits: n}}}``.

    Raises:
        CheckpointError: a path is missing, unreadable or unsafe.
    """
    t0 = time.perf_counter()
    if keys not in ("strict", "intersection"):
        raise InvalidArgumentError(f"keys={keys!r}; expected 'strict' or 'intersection'")
    adapters = adapter_paths(paths)
    if adapters is not None:
        return _inspect_adapters(adapters, similarity=similarity, bits=bits, group_size=group_size,
                                 progress=progress, t0=t0)
    cands = open_candidates(expand_paths(paths), ema_key)
    try:
        files = [_file_info(c) for c in cands]
        k = len(cands)
        mergeable, reason = True, None
        common: list[str] = []
        dropped: list[str] = []
        if k < 2:
            mergeable, reason = False, f"need at least 2 checkpoints to merge, got {k}"
        else:
            try:
                common, dropped = validate_candidates(cands, keys)
            except CheckpointMismatchError as e:
                mergeable, reason = False, str(e)
        sim = None
        if mergeable and similarity:
            cs = CheckpointSet(cands, common, dropped, allow_nonfinite=False)
            try:
                sim = _similarity(cs, progress)
            except NonFiniteError as e:
                mergeable, reason = False, str(e)
        if mergeable:
            d = sum(math.prod(cands[0].entries[key][0]) for key in common
                    if cands[0].entries[key][1].is_floating_point)
        else:
            d = files[0]["float_params"] if files else 0
        memory = {str(b): basis_memory_bytes(k, d, b, group_size) for b in bits}
        return {
            "command": "inspect",
            "count": k,
            "files": files,
            "mergeable": mergeable,
            "reason": reason,
            "merged_tensors": len(common),
            "dropped_keys": dropped,
            "float_params": d,
            "similarity": sim,
            "basis_memory": {"group_size": group_size, "rows": max(k - 1, 0), "bytes": memory},
            "seconds": round(time.perf_counter() - t0, 3),
        }
    finally:
        for c in cands:
            c.close()
