"""Cost of building the subspace against reading the candidates once (issue 12, target: 2.5x).

Writes K safetensors candidates of about D float32 parameters (an MLP-like stack of [W, W] weights and
[W] biases: a base plus a per-candidate perturbation, like fine-tunes of one model), then times, in
the same run and interleaved, the minimum over repeats of:

* read (plain): ``twamerge.open_checkpoints`` and ``stack_slice`` of every tensor, the reads the
  subspace build makes (no NaN/Inf scan);
* read (scanned): ``stack`` of every tensor with the reader's per-tensor NaN/Inf scan, what the
  build used to read through before it found non-finite values from its Gram matrices;
* build: ``build_subspace`` with ``check_finite=True`` (its default), how the fit calls it.

Wall time and process CPU time (user + sys, which is what a shared machine distorts least) are both
reported. The files are written to ``--dir`` (default: a temporary folder, removed at the end). They are read
warm from the page cache: the ratio is compute against memory reads, not against a disk.

Run: ``OMP_NUM_THREADS=1 python benchmarks/subspace_build.py --params 10e6 --k 8 [--bits 8] [--blocks layer]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import twamerge
from twamerge.subspace import build_subspace, make_layout


def shapes_for(params: float, width: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    total = 0
    while total < params:
        shapes += [(width, width), (width,)]
        total += width * width + width
    return shapes


def write_candidates(folder: Path, k: int, shapes, dtype: torch.dtype, seed: int = 0) -> list[Path]:
    gen = torch.Generator().manual_seed(seed)
    base = {f"layer{j // 2}.{'weight' if len(s) == 2 else 'bias'}": torch.randn(s, generator=gen) * 0.02
            for j, s in enumerate(shapes)}
    paths = []
    for i in range(k):
        sd = {n: (t + 1e-3 * torch.randn(t.shape, generator=gen)).to(dtype) for n, t in base.items()}
        path = folder / f"cand{i}.safetensors"
        save_file(sd, str(path))
        paths.append(path)
        del sd
    return paths


def read_once(paths, *, scan: bool) -> None:
    with twamerge.open_checkpoints(paths) as cs:
        for key in cs.keys:
            cs.stack(key, check=True) if scan else cs.stack_slice(key, 0, cs.numel(key))


def build(paths, blocks: str, bits: int, group_size: int):
    with twamerge.open_checkpoints(paths) as cs:
        names = cs.keys
        layout = make_layout(names, [cs.shape(n) for n in names], blocks, group_size)
        return build_subspace(cs, layout, bits=bits, backend="torch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=10e6, help="parameters per candidate (about)")
    ap.add_argument("--k", type=int, default=8, help="number of candidates")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--blocks", default="layer")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--width", type=int, default=1024, help="side of the [W, W] weight matrices")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--dir", default=None, help="where to write the candidates (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="twamerge-build-", dir=args.dir))
    try:
        shapes = shapes_for(args.params, args.width)
        d = sum(torch.Size(s).numel() for s in shapes)
        t0 = time.perf_counter()
        paths = write_candidates(folder, args.k, shapes, getattr(torch, args.dtype))
        size = sum(p.stat().st_size for p in paths)
        print(f"wrote {args.k} candidates x {d:,} parameters ({args.dtype}, {len(shapes)} tensors), "
              f"{size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s under {folder}")
        runs = {
            "read (plain)": lambda: read_once(paths, scan=False),
            "read (scanned)": lambda: read_once(paths, scan=True),
            "build (check from Gram)": lambda: build(paths, args.blocks, args.bits, args.group_size),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        best = {name: min(t) for name, t in times.items()}
        best_cpu = {name: min(t) for name, t in cpu.items()}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); K = {args.k}, bits = {args.bits}, "
              f"blocks = {args.blocks}, group_size = {args.group_size}; minimum of {args.repeats} interleaved runs")
        print("| measure | wall s | x read (plain) | x read (scanned) | CPU s (user+sys) | CPU x read (plain) |\n"
              "|---|---|---|---|---|---|")
        for name, t in best.items():
            c = best_cpu[name]
            print(f"| {name} | {t:.3f} | {t / best['read (plain)']:.2f} | {t / best['read (scanned)']:.2f} | "
                  f"{c:.3f} | {c / best_cpu['read (plain)']:.2f} |")
        ratio = best["build (check from Gram)"] / best["read (plain)"]
        ratio_cpu = best_cpu["build (check from Gram)"] / best_cpu["read (plain)"]
        print(f"build / read once = {ratio:.2f}x wall, {ratio_cpu:.2f}x CPU time "
              f"(target 2.5x: {'met' if ratio <= 2.5 else 'not met'} on wall time)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
