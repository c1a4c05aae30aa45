"""Write sum_k w_k c_k: uniform (SWA), fixed weights, EMA; streaming over the candidates' tensors."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import __version__
from .errors import InvalidArgumentError
from .io import CheckpointSet, check_output, open_checkpoints, sha256_file, write_checkpoint
from .options import dtype_name, parse_dtype, parse_size

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[Iterable[T]], Iterable[T]]
Weights = Sequence[float] | Callable[[str], Sequence[float]]

__all__ = ["average_checkpoints", "build_metadata", "ema_weights", "linear_merge", "uniform_weights"]


def uniform_weights(k: int) -> list[float]:
    """``[1/k] * k``: the SWA / uniform-soup weights."""
    if k < 1:
        raise InvalidArgumentError(f"need at least one candidate for uniform weights, got {k}")
    return [1.0 / k] * k


def ema_weights(k: int, decay: float) -> list[float]:
    """Weights of an exponential moving average over ``k`` checkpoints taken in order.

    ``e_1 = c_1``, ``e_j = decay * e_{j-1} + (1 - decay) * c_j``; so ``w_1 = decay^(k-1)`` and
    ``w_j = (1 - decay) * decay^(k-j)`` for ``j >= 2``. They sum to 1.
    """
    if not (0.0 <= decay <= 1.0) or math.isnan(decay):
        raise InvalidArgumentError(f"EMA decay {decay!r} must lie in [0, 1] (e.g. 0.9)")
    if k < 1:
        raise InvalidArgumentError(f"need at least one candidate for EMA weights, got {k}")
    return [decay ** (k - 1)] + [(1.0 - decay) * decay ** (k - j) for j in range(2, k + 1)]


def _check_weights(w: Sequence[float], k: int, key: str | None = None) -> list[float]:
    where = f" for {key!r}" if key is not None else ""
    w = [float(x) for x in w]
    if len(w) != k:
        raise InvalidArgumentError(f"got {len(w)} weights{where} for {k} checkpoints; give exactly one per checkpoint")
    if not all(math.isfinite(x) for x in w):
        raise InvalidArgumentError(f"weights{where} must be finite, got {w}")
    return w


def linear_merge(
    cs: CheckpointSet,
    weights: Weights,
    *,
    out_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    on_int_mismatch: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge ``sum_k w_k c_k`` key by key.

    Floating tensors accumulate in float64 on CPU and are cast once to ``out_dtype`` (default: the
    stored dtype). Integer and bool tensors (e.g. ``num_batches_tracked``) are copied from candidate 0
    and compared with the others; a difference is logged as a warning naming the key. At most one
    tensor per candidate plus the float64 accumulator is live besides the result.

    Args:
        cs: the validated candidates (K of them).
        weights: K floats for every key, or a function ``key -> K floats`` (per-block coefficients).
        out_dtype: floating dtype of the merged floating tensors, or None to keep each stored dtype.
        progress: optional wrapper around the key iterable (e.g. a progress bar).
        on_int_mismatch: called with each integer/bool key whose values differ across candidates.

    Returns:
        ``{key: Tensor}`` in ``cs.keys`` order, on CPU.

    Raises:
        InvalidArgumentError: a weight vector has the wrong length or non-finite entries.
        NonFiniteError: a candidate tensor holds NaN/Inf (unless the set allows it).

    Example:
        >>> merged = linear_merge(cs, [0.5, 0.5])  # doctest: +SKIP
    """
    k = len(cs)
    fixed = None if callable(weights) else _check_weights(weights, k)
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise InvalidArgumentError(f"out_dtype {dtype_name(out_dtype)} is not a floating dtype")
    keys: Iterable[str] = progress(cs.keys) if progress is not None else cs.keys
    try:
        return _merge_keys(cs, keys, fixed, weights, k, out_dtype, on_int_mismatch)
    finally:
        # A generator-based progress bar must stop now, not when it is garbage-collected after an error.
        close = getattr(keys, "close", None)
        if close is not None:
            close()


def _merge_keys(
    cs: CheckpointSet,
    keys: Iterable[str],
    fixed: list[float] | None,
    weights: Weights,
    k: int,
    out_dtype: torch.dtype | None,
    on_int_mismatch: Callable[[str], None] | None,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if not cs.is_float(key):
            first = cs.get(0, key)
            if any(not torch.equal(first, cs.get(i, key)) for i in range(1, k)):
                log.warning("integer tensor %r differs across checkpoints; keeping the first checkpoint's value", key)
                if on_int_mismatch is not None:
                    on_int_mismatch(key)
            out[key] = first
            continue
        w = fixed if fixed is not None else _check_weights(weights(key), k, key)  # type: ignore[operator]
        acc = torch.zeros(cs.shape(key), dtype=torch.float64)
        for i, wi in enumerate(w):
            if wi != 0.0:
                # In-place add promotes the candidate to float64 element by element: no float64 copy.
                # torch defines no promotion for float8, so those (1-byte) tensors are converted first.
                t = cs.get(i, key, check=False)
                acc.add_(t if t.dtype.itemsize > 1 else t.double(), alpha=wi)
        # One reduction over the accumulator instead of a NaN/Inf scan per candidate: a float64 sum of
        # finite float32/16 values cannot overflow, so a non-finite total means a non-finite input.
        if not cs.allow_nonfinite and not math.isfinite(float(acc.sum())):
            for i, wi in enumerate(w):
                if wi != 0.0:
                    cs.get(i, key)  # raises NonFiniteError naming the file and key
        out[key] = acc.to(out_dtype or cs.dtype(key))
        del acc
    return out


def build_metadata(method: str, sources: list[dict[str, str]], **extra: Any) -> dict[str, str]:
    """Safetensors metadata (str -> str): tool version, method, sources with SHA-256, and ``extra``
    (non-str values JSON-encoded), each under a ``twamerge.`` prefix."""
    meta = {
        "twamerge.version": __version__,
        "twamerge.method": method,
        "twamerge.sources": json.dumps(sources),
    }
    for k, v in extra.items():
        meta[f"twamerge.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta


def average_checkpoints(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    ema: float | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    normalize: bool = True,
    keys: str = "strict",
    ema_key: str | None = None,
    allow_nonfinite: bool = False,
    max_shard_size: int | str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Average checkpoints without data: uniform (SWA), fixed weights, or an EMA over the given order.

    Args:
        paths: checkpoint files, globs or directories (at least two candidates).
        out: output file (``.safetensors`` default, ``.pt`` etc.) or a directory name.
        weights: one weight per candidate; divided by their sum when ``normalize``.
        ema: decay of an exponential moving average over ``paths`` in order (excludes ``weights``).
        dtype: output dtype for floating tensors (``"float32"``, ``"bf16"``, ...); default the input's.
        force: overwrite an existing output.
        normalize: rescale ``weights`` to sum to 1.
        keys: ``"strict"`` or ``"intersection"``.
        ema_key: entry to merge inside torch checkpoints (e.g. ``"state_dict_ema"``).
        allow_nonfinite: merge tensors holding NaN/Inf instead of failing.
        max_shard_size: bytes (or ``"2GB"``) per output shard.
        progress: optional wrapper around the key iterable.

    Returns:
        A JSON-able summary: method, weights, inputs with SHA-256, outputs with SHA-256, counts, timing.

    Raises:
        TwamergeError subclasses for bad inputs, mismatches, non-finite weights and unwritable outputs.

    Example:
        >>> average_checkpoints(["e8.safetensors", "e9.safetensors"], "swa.safetensors")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if weights is not None and ema is not None:
        raise InvalidArgumentError("give either weights or an EMA decay, not both")
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    with open_checkpoints(paths, ema_key=ema_key, keys=keys, allow_nonfinite=allow_nonfinite) as cs:
        check_output(out, force=force, hf_source_dir=cs.hf_dir)
        k = len(cs)
        if ema is not None:
            method, w = "ema", ema_weights(k, float(ema))
        elif weights is not None:
            method, w = "weighted", _check_weights(weights, k)
            total = sum(w)
            if normalize:
                if abs(total) < 1e-12:
                    raise InvalidArgumentError(f"weights {w} sum to 0 and cannot be normalized")
                w = [x / total for x in w]
            elif abs(total - 1.0) > 1e-6:
                log.warning("weights sum to %g, not 1: the merged weights are scaled accordingly", total)
        else:
            method, w = "uniform", uniform_weights(k)
        log.info("%s average of %d checkpoints, weights %s", method, k, [round(x, 6) for x in w])
        mismatched: list[str] = []
        merged = linear_merge(cs, w, out_dtype=out_dtype, progress=progress, on_int_mismatch=mismatched.append)
        sources = cs.sources()
        extra: dict[str, Any] = {"weights": w}
        if ema is not None:
            extra["ema_decay"] = float(ema)
        written = write_checkpoint(
            merged,
            Path(out),
            metadata=build_metadata(method, sources, **extra),
            force=force,
            max_shard_size=shard_bytes,
            hf_source_dir=cs.hf_dir,
        )
        float_params = sum(cs.numel(key) for key in cs.float_keys)
        summary = {
            "command": "average",
            "method": method,
            "weights": w,
            "ema_decay": ema,
            "count": k,
            "inputs": sources,
            "renamed": cs.renamed,
            "tensors": len(cs.keys),
            "params": sum(cs.numel(key) for key in cs.keys),
            "float_params": float_params,
            "dropped_keys": cs.dropped_keys,
            "integer_mismatches": mismatched,
            "dtype": dtype_name(out_dtype) if out_dtype else "as input",
            "outputs": [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in written],
            "seconds": round(time.perf_counter() - t0, 3),
        }
    return summary
