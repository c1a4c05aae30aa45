"""Read throughput of twamerge's reader against safetensors' and torch's own, on the same files in one run.

Each contender reads every tensor of every file once and touches it (``.sum()``), one thread, the
files in the page cache (each is read once before timing). Rounds are interleaved (every contender
once per round, so a busy moment of a shared machine hits all alike) and each contender's fastest
round is reported; ratios are what carries over between machines.

Contenders (the first is no reader at all: the floor set by copying the bytes):

- ``readinto``: ``open(...).readinto`` of every file's bytes into one reused buffer (no tensors);
- ``safe_open``: ``safe_open(path).get_tensor(k).sum()`` for every key (a memory map, touched);
- ``twamerge safetensors``: ``open_checkpoints(paths)``, then ``cs.get(i, key, check=False).sum()``
  for every key in file order (the issue's target: >= 0.8x ``safe_open``);
- ``torch.load mmap``: ``torch.load(p, mmap=True, weights_only=True)``, then ``.sum()`` of each tensor;
- ``twamerge torch zip``: the same files saved with ``torch.save``, read as for safetensors;
- ``twamerge, hashing beside``: the safetensors pass with every input's SHA-256 started first
  (``cs.start_hashing()``), timed to the end of the reads: what hashing costs the reads;
- ``twamerge, hashes waited``: the same, waiting for the hashes at the end (``cs.sources()``), the way
  ``average`` does: reads plus whatever hashing is left when they end.

    OMP_NUM_THREADS=1 python benchmarks/reader.py [--files 8] [--mb 96] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _raw_read import raw_read


def _state_dict(mb: int, seed: int) -> dict[str, torch.Tensor]:
    """About ``mb`` MB of float32 shaped like a transformer: an embedding, then layers of four d x d
    attention matrices, two d x 4d MLP matrices, and their small bias and norm vectors."""
    g = torch.Generator().manual_seed(seed)
    d = 512
    sd = {"embed.weight": torch.randn(8192, d, generator=g)}
    layer = 0
    while sum(t.numel() for t in sd.values()) * 4 < mb * 1_000_000:
        p = f"layers.{layer}."
        for name in ("q", "k", "v", "o"):
            sd[p + name + ".weight"] = torch.randn(d, d, generator=g)
            sd[p + name + ".bias"] = torch.randn(d, generator=g)
        sd[p + "up.weight"] = torch.randn(4 * d, d, generator=g)
        sd[p + "up.bias"] = torch.randn(4 * d, generator=g)
        sd[p + "down.weight"] = torch.randn(d, 4 * d, generator=g)
        sd[p + "down.bias"] = torch.randn(d, generator=g)
        sd[p + "norm.weight"] = torch.ones(d)
        sd[p + "norm.bias"] = torch.zeros(d)
        layer += 1
    return sd


def _safe_open(paths: list[Path]) -> None:
    from safetensors import safe_open

    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                float(f.get_tensor(k).sum())


def _torch_load(paths: list[Path]) -> None:
    for p in paths:
        sd = torch.load(p, mmap=True, weights_only=True, map_location="cpu")
        for v in sd.values():
            float(v.sum())
        del sd


def _twamerge(paths: list[Path], *, hashing: str = "off") -> float:
    """Sum of every tensor through twamerge's reader. ``hashing``: "off"; "beside": every input's
    SHA-256 started first and left running (returns the seconds to the end of the reads, the time the
    reads took with hashing beside them); "waited": started first and waited for at the end, the way
    ``average`` does (returns None: the whole call is timed)."""
    from twamerge import open_checkpoints
    from twamerge.io import hashing as io_hashing

    if hashing != "off":
        io_hashing._SHA_CACHE.clear()  # hash the files again: the digest of an unchanged file is cached
    t = time.perf_counter()
    total = 0.0
    with open_checkpoints(paths) as cs:
        if hashing != "off":
            cs.start_hashing()
        for key in cs.keys_in_file_order():
            for i in range(len(cs)):
                total += float(cs.get(i, key, check=False).sum())
        reads = time.perf_counter() - t
        if hashing == "waited":
            cs.sources()
    return reads if hashing == "beside" else None  # closing the set stops the hashes left running


def _best_interleaved(contenders: dict[str, Callable[[], float | None]], repeat: int) -> dict[str, float]:
    """Each contender's fastest of ``repeat`` interleaved rounds: the seconds it returns, or else the whole call."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, run in contenders.items():
            gc.collect()
            t = time.perf_counter()
            counted = run()
            times[name].append(time.perf_counter() - t if counted is None else counted)
    return {name: min(ts) for name, ts in times.items()}


def _check_same_tensors(st: list[Path], pt: list[Path]) -> None:
    """twamerge's reader returns the tensors the libraries do, from both formats."""
    from safetensors.torch import load_file

    from twamerge import open_checkpoints

    for paths in (st, pt):
        with open_checkpoints(paths) as cs:
            for i, p in enumerate(st):
                ref = load_file(str(p))
                assert all(torch.equal(cs.get(i, k), ref[k]) for k in cs.keys), paths[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=8, help="checkpoint files per format")
    ap.add_argument("--mb", type=int, default=96, help="size of one file in MB (float32)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds; each contender's fastest is reported")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        st, pt = [], []
        for i in range(args.files):
            sd = _state_dict(args.mb, i)
            st.append(Path(tmp) / f"c{i}.safetensors")
            save_file(sd, str(st[-1]))
            pt.append(Path(tmp) / f"c{i}.pt")
            torch.save(sd, pt[-1])
        n_tensors = len(sd)
        raw_read(st + pt)  # into the page cache
        _check_same_tensors(st, pt)
        best = _best_interleaved({
            "readinto (bytes only)": lambda: raw_read(st),
            "safe_open get_tensor": lambda: _safe_open(st),
            "twamerge safetensors": lambda: _twamerge(st),
            "torch.load mmap": lambda: _torch_load(pt),
            "twamerge torch zip": lambda: _twamerge(pt),
            "twamerge, hashing beside": lambda: _twamerge(st, hashing="beside"),
            "twamerge, hashes waited": lambda: _twamerge(st, hashing="waited"),
        }, args.repeat)
        data_mb = sum(p.stat().st_size for p in st) / 1e6

    ref = best["safe_open get_tensor"]
    print(f"{args.files} files x {args.mb} MB float32 ({n_tensors} tensors each), page cache warm, "
          f"{torch.get_num_threads()} thread, best of {args.repeat} interleaved rounds; "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores visible")
    print(f"{'contender':<27}{'seconds':>9}{'MB/s':>9}{'x safe_open':>13}")
    for name, s in best.items():
        print(f"{name:<27}{s:>9.3f}{data_mb / s:>9.0f}{ref / s:>13.2f}")
    print(f"twamerge torch zip / torch.load mmap: {best['torch.load mmap'] / best['twamerge torch zip']:.2f}x")


if __name__ == "__main__":
    main()
