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
from .io import CheckpointSet, sha256_file
from .io.adapters import AdapterSet, check_merge_output, open_inputs, tokenizer_dir, write_output
from .io.discovery import out_of_natural_order
from .io.model_card import average_card, average_command
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
    and compared with the others of nonzero weight; a difference is logged as a warning naming the key.
    Besides the result, what is live is a window of each candidate's elements of one key (at most
    ``WINDOW_BYTES`` of them together, where the format reads ranges; else each candidate's whole
    tensor) and a float64 block of ``BLOCK`` elements. Candidates with weight 0 are not read (the
    source of integer tensors, candidate 0, excepted).

    Args:
        cs: the validated candidates (K of them).
        weights: K floats for every key, or a function ``key -> K floats`` (per-block coefficients).
        out_dtype: floating dtype of the merged floating tensors, or None to keep each stored dtype.
        progress: optional wrapper around the key iterable (e.g. a progress bar).
        on_int_mismatch: called with each integer/bool key whose values differ across candidates.
        into: ``key -> tensor or None``: where to put a floating result instead of a new tensor (e.g.
            the model's parameter, a view of the fit's flat buffer), used when its shape and dtype are
            the result's; the returned dict then holds that tensor. It is written block by block, so
            after a NonFiniteError it may hold part of a result.

    Returns:
        ``{key: Tensor}`` in ``cs.keys`` order, on CPU. The tensors are read in file order (front to
        back through each file: what read-ahead serves best when the files are not cached).

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
    # Read in file order (each candidate's file front to back); return in the candidates' key order.
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
            out[key], differs = first_candidate(cs, key, w)
            if differs and on_int_mismatch is not None:
                on_int_mismatch(key)
            continue
        dtype = out_dtype or cs.dtype(key)
        dest = into(key) if into is not None else None
        if dest is not None and dest.dtype == dtype and dest.shape == cs.shape(key):
            if dest.is_contiguous():
                out[key] = weighted_sum(cs, key, w, dest)
            else:
                out[key] = dest.copy_(weighted_sum(cs, key, w, torch.empty(dest.shape, dtype=dtype)))
        else:
            out[key] = weighted_sum(cs, key, w, torch.empty(cs.shape(key), dtype=dtype))
    return out


#: elements of one key summed at a time: a float64 block this long (1 MiB) stays in the core's cache
#: while every candidate's piece is added into it. A whole-tensor float64 accumulator made each
#: candidate's add a round trip through memory: 6.5x slower for 8 float32 candidates.
BLOCK = 1 << 17
#: bytes of candidate data one key holds at a time, all candidates together (where formats read ranges)
WINDOW_BYTES = 64 << 20


def weighted_sum(cs: CheckpointSet, key: str, w: Sequence[float], out: torch.Tensor, lo: int = 0,
                 hi: int | None = None) -> torch.Tensor:
    """``sum_k w_k c_k`` over elements ``[lo, hi)`` of the flattened floating ``key`` (default: all of it)
    into the contiguous ``out`` (``hi - lo`` elements), block by block (see ``BLOCK``). A sharded fit
    merges its ranks' rows with it (``sharding``).

    Each block is summed in float64, in candidate order, and cast once: the same numbers as one
    float64 accumulator over the whole tensor. Candidates are read a window of ``WINDOW_BYTES`` at a time
    where the format reads ranges, else each candidate's tensor once.

    Raises:
        NonFiniteError: a candidate of nonzero weight holds NaN/Inf there (unless the set allows it).
    """
    used = [(i, wi) for i, wi in enumerate(w) if wi != 0.0]
    n = cs.numel(key)
    hi = n if hi is None else hi
    flat = out.view(-1)
    window = hi - lo
    if used and cs.reads_ranges(key):
        per_candidate = WINDOW_BYTES // (len(used) * cs.dtype(key).itemsize)
        window = max(BLOCK, per_candidate // BLOCK * BLOCK)
    block = torch.empty(min(BLOCK, max(hi - lo, 1)), dtype=torch.float64)
    total = 0.0
    for a in range(lo, hi, max(window, 1)):
        z = min(hi, a + window)
        if (a, z) == (0, n):
            parts = [(cs.get(i, key, check=False).reshape(-1), wi) for i, wi in used]
        else:
            parts = [(cs.get_slice(i, key, a, z, check=False), wi) for i, wi in used]
        for c in range(a, z, BLOCK):
            d = min(z, c + BLOCK)
            acc = block[: d - c].zero_()
            for part, wi in parts:
                # In-place add promotes the candidate to float64 element by element: no float64 copy.
                # torch defines no promotion for float8, so those (1-byte) pieces are converted first.
                x = part[c - a: d - a]
                acc.add_(x if x.dtype.itemsize > 1 else x.double(), alpha=wi)
            # A float64 sum of finite float32/16 values cannot overflow, so a non-finite total means a
            # non-finite input: one reduction of the block in cache instead of a scan of every candidate.
            total += float(acc.sum())
            flat[c - lo: d - lo].copy_(acc)  # the same rounding as .to(dtype)
        del parts  # this window's pages leave the process before the next is mapped
    if not cs.allow_nonfinite and not math.isfinite(total):
        for i, _ in used:  # raises NonFiniteError naming the file and key
            cs.get(i, key) if (lo, hi) == (0, n) else cs.get_slice(i, key, lo, hi)
    return out


def first_candidate(cs: CheckpointSet, key: str, w: Sequence[float]) -> tuple[torch.Tensor, bool]:
    """An integer or bool ``key`` as a merge writes it: the first candidate's, and whether a candidate of
    nonzero weight differs (warned once per key). Compared with the candidates the merge uses only: a
    greedy-soup trial reads nothing of the others."""
    first = cs.get(0, key)
    differs = any(not torch.equal(first, cs.get(i, key)) for i in range(1, len(w)) if w[i] != 0.0)
    if differs and key not in cs.int_mismatch_warned:
        cs.int_mismatch_warned.add(key)
        log.warning("integer tensor %r differs across checkpoints; keeping the first checkpoint's value", key)
    return first, differs


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
    hash_inputs: bool = True,
    model: str | None = None,
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
        hash_inputs: compute each input's SHA-256 (on the hashing threads, beside the merge) for the
            summary and the output's metadata (``twamerge.sources``). False (``--no-hash``) leaves
            them out of both: no provenance hashes, for raw speed.
        model: for LoRA adapter folders, the base model's folder (``--model``; default: their
            ``base_model_name_or_path``), needed with ``output.merge_into_base`` alone: by default
            the average is written as an adapter (``io.adapters``).

    Returns:
        A JSON-able summary: method, weights, inputs (with SHA-256 unless ``hash_inputs=False``),
        outputs with SHA-256, counts, timing.

    Raises:
        TwamergeError subclasses for bad inputs, mismatches, non-finite weights and unwritable outputs.

    Example:
        >>> average_checkpoints(["e8.safetensors", "e9.safetensors"], "swa.safetensors")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    out = OutputConfig.of(output)
    out_dtype = parse_dtype(out.dtype)
    swapped = out_of_natural_order(paths) if weights is not None else None
    if swapped is not None:
        # The candidates are taken in natural order; which weight the user meant for which is then ambiguous.
        raise InvalidArgumentError(f"--weights pair with the checkpoints in order, but {swapped[0]} was given before "
                                   f"{swapped[1]}, and a numbered series is taken in natural order; list the "
                                   "checkpoints in natural order (or quote the glob for twamerge to expand it)")
    with open_inputs(paths, ema_key=read.ema_key, keys=read.keys, allow_nonfinite=read.allow_nonfinite, model=model,
                     need_base=out.merge_into_base) as cs:
        check_merge_output(cs, out.path, merge_into_base=out.merge_into_base, force=out.force,
                           max_shard_size=out.max_shard_size)
        k = len(cs)
        method, w = data_free_weights(k, weights=weights, ema=ema, normalize=normalize)
        adapters = cs.describe() if isinstance(cs, AdapterSet) else None
        if adapters is not None and abs(sum(w) - 1.0) > 1e-6:
            # Adapter k as a model is base + dW_k; only weights summing to 1 keep the base once.
            raise InvalidArgumentError(f"weights sum to {sum(w):g}: an average of LoRA adapters is base + sum_k w_k dW_k, "
                                       "the average of the adapted models only when the weights sum to 1; drop "
                                       "--no-normalize")
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
        if hash_inputs:
            cs.start_hashing()  # on the hashing threads while the merge reads; sources() waits for the rest
        mismatched: list[str] = []
        # Merged adapters are written as factors: the dense merge is needed only for a merge into the base.
        merged = None if adapters is not None and not out.merge_into_base else linear_merge(
            cs, w, out_dtype=out_dtype, progress=progress, on_int_mismatch=mismatched.append)
        sources = cs.sources(hashes=hash_inputs)
        extra: dict[str, Any] = {"weights": w}
        if ema is not None:
            extra["ema_decay"] = float(ema)
        # A merge into the base is made of the base too: its SHA-256 goes with the candidates' (unless --no-hash).
        base = cs.base_source() if adapters is not None and out.merge_into_base and hash_inputs else None
        if base is not None:
            extra["base"] = base
            adapters["base_sha256"] = base["sha256"]
        card = average_card(
            {"method": method, "weights": w, "ema_decay": ema, "inputs": sources, "version": __version__},
            library_name="peft" if adapters is not None and not out.merge_into_base else
            "transformers" if cs.hf_dir is not None else None,
            base_model=adapters["base_model"] if adapters is not None else None, adapter=adapters,
            merge_into_base=out.merge_into_base,
            reproduce=average_command([s["path"] for s in sources], str(out.path), weights=weights, ema=ema,
                                      normalize=normalize, dtype=out.dtype, ema_key=read.ema_key, keys=read.keys,
                                      merge_into_base=out.merge_into_base, model=model, hash_inputs=hash_inputs))
        written = write_output(cs, out.path, tensors=merged, weights_of=lambda key: w,
                               metadata=build_metadata(method, sources, **extra), out_dtype=out_dtype,
                               merge_into_base=out.merge_into_base, force=out.force,
                               max_shard_size=out.max_shard_size, tokenizer=tokenizer_dir(cs, model, None),
                               model_card=card)
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
            "adapters": adapters,
            "base": base,
            "dtype": dtype_name(out_dtype) if out_dtype else "as input",
            "outputs": [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in written],
            "seconds": round(time.perf_counter() - t0, 3),
        }
    return summary
