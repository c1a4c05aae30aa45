"""Compute and write ``sum_k w_k c_k`` over the candidates' tensors, streaming; ``average`` (no data needed).

The weights come from :mod:`twamerge.methods`; this module only applies them, exactly (float64
accumulation, one cast at the end).
"""

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
from .config import OutputConfig, ReadConfig
from .errors import InvalidArgumentError
from .io import CheckpointSet, check_output, open_checkpoints, sha256_file, write_checkpoint
from .methods import check_weights, data_free_weights
from .options import dtype_name, parse_dtype

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[Iterable[T]], Iterable[T]]
Weights = Sequence[float] | Callable[[str], Sequence[float]]

__all__ = ["average_checkpoints", "build_metadata", "linear_merge"]


def linear_merge(
    cs: CheckpointSet,
    weights: Weights,
    *,
    out_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    on_int_mismatch: Callable[[str], None] | None = None,
    into: Callable[[str], torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge ``sum_k w_k c_k`` key by key.

    Floating tensors accumulate in float64 on CPU and are cast once to ``out_dtype`` (default: the
    stored dtype). Integer and bool tensors (e.g. ``num_batches_tracked``) are copied from candidate 0
    and compared with the others of nonzero weight; a difference is logged as a warning naming the key. At most one
    tensor per candidate plus the float64 accumulator is live besides the result. Candidates with
    weight 0 are not read (the source of integer tensors, candidate 0, excepted).

    Args:
        cs: the validated candidates (K of them).
        weights: K floats for every key, or a function ``key -> K floats`` (per-block coefficients).
        out_dtype: floating dtype of the merged floating tensors, or None to keep each stored dtype.
        progress: optional wrapper around the key iterable (e.g. a progress bar).
        on_int_mismatch: called with each integer/bool key whose values differ across candidates.
        into: ``key -> tensor or None``: where to put a floating result instead of a new tensor (e.g.
            the model's parameter, a view of the fit's flat buffer), used when its shape and dtype are
            the result's; the returned dict then holds that tensor.

    Returns:
        ``{key: Tensor}`` in ``cs.keys`` order, on CPU. The tensors are read in file order, which
        lets ``cs.sources()`` finish the candidates' SHA-256 without reading them again.

    Raises:
        InvalidArgumentError: a weight vector has the wrong length or non-finite entries.
        NonFiniteError: a candidate tensor holds NaN/Inf (unless the set allows it).

    Example:
        >>> merged = linear_merge(cs, [0.5, 0.5])  # doctest: +SKIP
    """
    k = len(cs)
    fixed = None if callable(weights) else check_weights(weights, k)
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise InvalidArgumentError(f"out_dtype {dtype_name(out_dtype)} is not a floating dtype")
    # Read in file order (each candidate's safetensors file front to back, so ``cs.sources()`` hashes
    # it from these reads); return in the candidates' key order.
    order = cs.keys_in_file_order()
    keys: Iterable[str] = progress(order) if progress is not None else order
    try:
        merged = _merge_keys(cs, keys, fixed, weights, k, out_dtype, on_int_mismatch, into)
        return {key: merged[key] for key in cs.keys}
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
    into: Callable[[str], torch.Tensor | None] | None,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        w = fixed if fixed is not None else check_weights(weights(key), k, key)  # type: ignore[operator]
        if not cs.is_float(key):
            first = cs.get(0, key)
            # Compared with the candidates this merge uses: a greedy-soup trial reads nothing of the others.
            if any(not torch.equal(first, cs.get(i, key)) for i in range(1, k) if w[i] != 0.0):
                if key not in cs.int_mismatch_warned:
                    cs.int_mismatch_warned.add(key)
                    log.warning("integer tensor %r differs across checkpoints; keeping the first checkpoint's value",
                                key)
                if on_int_mismatch is not None:
                    on_int_mismatch(key)
            out[key] = first
            continue
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
        dtype = out_dtype or cs.dtype(key)
        dest = into(key) if into is not None else None
        if dest is not None and dest.dtype == dtype and dest.shape == acc.shape:
            dest.copy_(acc)  # the same rounding as .to(dtype)
            out[key] = dest
        else:
            out[key] = acc.to(dtype)
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
    output: OutputConfig | str | Path,
    *,
    weights: Sequence[float] | None = None,
    ema: float | None = None,
    normalize: bool = True,
    read: ReadConfig = ReadConfig(),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Average checkpoints without data: uniform (SWA), fixed weights, or an EMA over the given order.

    Args:
        paths: checkpoint files, globs or directories (at least two candidates).
        output: output file (``.safetensors`` default, ``.pt`` etc.) or a directory name, with
            ``force``, ``dtype`` (of the floating tensors; default the input's) and ``max_shard_size``.
        weights: one weight per candidate; divided by their sum when ``normalize``.
        ema: decay of an exponential moving average over ``paths`` in order (excludes ``weights``).
        normalize: rescale ``weights`` to sum to 1.
        read: how the candidates are read (``ema_key``, ``keys``, ``allow_nonfinite``).
        progress: optional wrapper around the key iterable.

    Returns:
        A JSON-able summary: method, weights, inputs with SHA-256, outputs with SHA-256, counts, timing.

    Raises:
        TwamergeError subclasses for bad inputs, mismatches, non-finite weights and unwritable outputs.

    Example:
        >>> average_checkpoints(["e8.safetensors", "e9.safetensors"], "swa.safetensors")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    out = OutputConfig.of(output)
    out_dtype = parse_dtype(out.dtype)
    with open_checkpoints(paths, ema_key=read.ema_key, keys=read.keys, allow_nonfinite=read.allow_nonfinite) as cs:
        check_output(out.path, force=out.force, hf_source_dir=cs.hf_dir, max_shard_size=out.max_shard_size)
        k = len(cs)
        method, w = data_free_weights(k, weights=weights, ema=ema, normalize=normalize)
        if method == "weighted" and not normalize and abs(sum(w) - 1.0) > 1e-6:
            log.warning("weights sum to %g, not 1: the merged weights are scaled accordingly", sum(w))
        log.info("%s average of %d checkpoints, weights %s", method, k, [round(x, 6) for x in w])
        bn_stats = [key for key in cs.keys if key.endswith((".running_mean", ".running_var"))]
        if bn_stats:
            # Averaged BatchNorm statistics do not describe the averaged weights' activations (measured:
            # 18% test accuracy for a Fashion-MNIST CNN whose re-estimated average scores 82%).
            log.warning("%d BatchNorm statistics (e.g. %s) are averaged like the weights; re-estimate them on "
                        "data before use: `twamerge fit ... --epochs 0` writes the uniform average with "
                        "re-estimated statistics", len(bn_stats), bn_stats[0])
        mismatched: list[str] = []
        merged = linear_merge(cs, w, out_dtype=out_dtype, progress=progress, on_int_mismatch=mismatched.append)
        sources = cs.sources()
        extra: dict[str, Any] = {"weights": w}
        if ema is not None:
            extra["ema_decay"] = float(ema)
        written = write_checkpoint(
            merged,
            out.path,
            metadata=build_metadata(method, sources, **extra),
            force=out.force,
            max_shard_size=out.max_shard_size,
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
            "batchnorm_statistics_averaged": len(bn_stats),
            "dtype": dtype_name(out_dtype) if out_dtype else "as input",
            "outputs": [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in written],
            "seconds": round(time.perf_counter() - t0, 3),
        }
    return summary
