"""Cost of building the subspace against reading the candidates once (issues 12 and 20, target: 2.5x a raw read).

Writes K safetensors candidates of about D float32 parameters (an MLP-like stack of [W, W] weights and
[W] biases: a base plus a per-candidate perturbation, like fine-tunes of one model), then times, in
the same run and interleaved, the minimum over repeats of:

* raw read: ``open(...).readinto`` of every byte of every file into one reused buffer (issue 20's divisor);
* read (plain): ``twamerge.open_checkpoints`` and ``stack_slice`` of every tensor, the reads the
  subspace build made before it read the candidates in place (no NaN/Inf scan);
* build: ``build_subspace`` as the fit calls it (``--backend``, default auto: the C kernels on CPU, reading each
  candidate's mapped tensor in place), its NaN/Inf check from the Gram matrices on;
* build (stacked): the same with each tensor's K copies stacked into a reused buffer first, the way the build
  read them before (the fit's gradient buffer), to show what reading in place saves.

Wall time and the thread's CPU time (what a shared machine distorts least) are both reported. The files are
written to ``--dir`` (default: a temporary folder, removed at the end). They are read warm from the page cache:
the ratio is compute against memory reads, not against a disk.

Run: ``OMP_NUM_THREADS=1 python benchmarks/subspace_build.py --params 10e6 --k 8 [--bits 8] [--blocks layer]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _raw_read import raw_read
from safetensors.torch import save_file

import twamerge
from twamerge import subspace
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


def read_once(paths) -> None:
    with twamerge.open_checkpoints(paths) as cs:
        for key in cs.keys:
            cs.stack_slice(key, 0, cs.numel(key))


def build(paths, blocks: str, bits: int, group_size: int, backend: str, stacked: bool = False):
    with twamerge.open_checkpoints(paths) as cs:
        names = cs.keys
        layout = make_layout(names, [cs.shape(n) for n in names], blocks, group_size)
        scratch = torch.empty(layout.n_cols)  # the fit's gradient buffer, which a stacking build fills
        real = subspace._Build._in_place
        if stacked:
            subspace._Build._in_place = lambda self, dtype: False
        try:
            return build_subspace(cs, layout, bits=bits, backend=backend, scratch=scratch)
        finally:
            subspace._Build._in_place = real


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
    ap.add_argument("--backend", default="auto", choices=["auto", "native", "torch"])
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
            "raw read": lambda: raw_read(paths),
            "read (plain)": lambda: read_once(paths),
            "build": lambda: build(paths, args.blocks, args.bits, args.group_size, args.backend),
            "build (stacked)": lambda: build(paths, args.blocks, args.bits, args.group_size, args.backend, True),
        }
        raw_read(paths)  # into the page cache
        times: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start, start_cpu = time.perf_counter(), time.thread_time()
                fn()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.thread_time() - start_cpu)
        best = {name: min(t) for name, t in times.items()}
        best_cpu = {name: min(t) for name, t in cpu.items()}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); K = {args.k}, bits = {args.bits}, "
              f"blocks = {args.blocks}, group_size = {args.group_size}, backend = {args.backend}; minimum of "
              f"{args.repeats} interleaved runs")
        print("| measure | wall s | x raw read | x read (plain) | CPU s | CPU x raw read |\n"
              "|---|---|---|---|---|---|")
        for name, t in best.items():
            c = best_cpu[name]
            print(f"| {name} | {t:.3f} | {t / best['raw read']:.2f} | {t / best['read (plain)']:.2f} | "
                  f"{c:.3f} | {c / best_cpu['raw read']:.2f} |")
        ratio = best["build"] / best["raw read"]
        ratio_cpu = best_cpu["build"] / best_cpu["raw read"]
        print(f"build / raw read = {ratio:.2f}x wall, {ratio_cpu:.2f}x CPU time "
              f"(target 2.5x: {'met' if ratio <= 2.5 else 'not met'} on wall time)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
