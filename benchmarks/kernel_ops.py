"""Time the four subspace kernels against the device's copy bandwidth, measured in the same run.

For every K (candidates), D (flat parameters) and bits it reports each op's time, the bytes the op
must move at minimum, the achieved GB/s, that as a fraction of a plain ``copy_`` of a large buffer on
the same device, and the speed-up of the fast implementation over the torch reference: the Triton
kernels on CUDA; on CPU the C loops for combine and project (gram and orth_quantize have only the
reference there). The Triton interpreter is a correctness tool, far too slow to time.

    python benchmarks/kernel_ops.py                      # CPU-friendly defaults
    python benchmarks/kernel_ops.py --K 8 16 32 --D 1e6 1e7 1e8 --bits 1 2 4 8   # the issue's grid (GPU)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
from twamerge.kernels import native, reference  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, n_bytes: int, repeat: int) -> float:
    """GB/s of ``dst.copy_(src)`` (read + write counted)."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, repeat, warmup=2)
    return 2 * src.numel() * 4 / t / 1e9


def op_bytes(op: str, k: int, r: int, d: int, bits: int, gs: int, elt: int) -> int:
    """Minimum bytes an op must read and write."""
    basis = r * d * bits // 8 + (0 if bits >= 16 else 2 * r * (d // gs) * 4)
    if op == "gram":
        return k * d * elt + d * 4
    if op == "orth_quantize":
        return k * d * elt + d * 4 + basis
    if op == "combine":
        return d * 4 + basis + (d // gs) * 4 + d * elt
    return d * elt + basis + (d // gs) * 4  # project


def build_inputs(k: int, d: int, bits: int, gs: int, dtype: torch.dtype, device: torch.device, gen):
    r = max(1, k - 1)
    x = torch.randn(k, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
    mean = x.float().mean(dim=0)
    transform = torch.randn(r, k, generator=gen, device=device) / k
    codes, scales, zeros = reference.orth_quantize_torch(x, mean, transform, bits, gs)
    n_groups = d // gs
    # About one block per 4096 groups: many blocks, as in a "layer" fit of a real model.
    group_block = (torch.arange(n_groups, device=device) // 4096).to(torch.int32)
    n_blocks = int(group_block[-1].item()) + 1 if n_groups else 1
    beta = torch.randn(n_blocks, r, generator=gen, device=device)
    grad = torch.randn(d, generator=gen, device=device).to(dtype)
    out = torch.empty(d, dtype=dtype, device=device)
    return dict(x=x, mean=mean, transform=transform, codes=codes, scales=scales, zeros=zeros,
                group_block=group_block, n_blocks=n_blocks, beta=beta, grad=grad, out=out, r=r)


def op_calls(impl: dict, a: dict, bits: int, gs: int) -> dict:
    return {
        "gram": lambda: impl["gram"](a["x"]),
        "orth_quantize": lambda: impl["orth_quantize"](a["x"], a["mean"], a["transform"], bits, gs),
        "combine": lambda: impl["combine"](a["mean"], a["codes"], a["scales"], a["zeros"], a["beta"],
                                           a["group_block"], bits, gs, a["out"]),
        "project": lambda: impl["project"](a["grad"], a["codes"], a["scales"], a["zeros"], a["group_block"],
                                           a["n_blocks"], bits, gs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--K", type=int, nargs="+", default=[8, 16, 32], help="candidate counts")
    p.add_argument("--D", type=float, nargs="+", default=None,
                   help="flat parameter counts (default 1e6 on CPU, 1e6 1e7 1e8 on CUDA)")
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="candidate / grad / out dtype")
    p.add_argument("--ops", nargs="+", default=["gram", "orth_quantize", "combine", "project"])
    p.add_argument("--repeat", type=int, default=None, help="timed runs per case (median reported)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_triton = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    elt = torch.tensor([], dtype=dtype).element_size()
    sizes = [int(x) for x in (args.D or ([1e6, 1e7, 1e8] if use_triton else [1e6]))]
    repeat = args.repeat or (10 if use_triton else 3)
    gs = args.group_size

    impl_ref = {op: getattr(reference, f"{op}_torch") for op in args.ops}
    if use_triton:
        import importlib

        fast_name = "triton"
        impl_fast = {op: getattr(importlib.import_module(f"twamerge.kernels.triton_{op}"), f"{op}_triton")
                     for op in args.ops}
    else:
        fast_name = "C"
        built, why = native.status()
        usable = built and native.unsupported("combine", dtype=dtype) is None
        impl_fast = {op: getattr(native, f"{op}_native") for op in args.ops
                     if usable and op in ("combine", "project")}
        if not usable:
            print(f"the C kernels are not timed: {why if not built else native.unsupported('combine', dtype=dtype)}")

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    copy_gbs = copy_bandwidth(device, (1 << 30) if use_triton else (1 << 28), repeat)
    print(f"device: {device.type} ({name}); torch {torch.__version__}; dtype {args.dtype}; group_size {gs}")
    buf = "1 GiB" if use_triton else "256 MiB"
    print(f"measured copy bandwidth: {copy_gbs:.1f} GB/s (read + write of a {buf} float32 buffer)")
    if not use_triton:
        print("no CUDA device: the Triton kernels are not timed (they need a GPU)")

    head = (f"{'op':<14}{'impl':>7}{'K':>4}{'D':>11}{'bits':>5}{'ms':>10}{'MB moved':>10}{'GB/s':>8}{'% copy':>8}"
            f"{'torch ms':>10}{'speed-up':>9}")
    print(head)
    print("-" * len(head))
    gen = torch.Generator(device=device).manual_seed(0)
    for d in sizes:
        d = d // gs * gs
        for k in args.K:
            need = (3 * k + 6) * d * 4  # candidates, their float copy, basis and buffers, roughly
            if device.type == "cuda" and need > 0.8 * torch.cuda.mem_get_info(device)[0]:
                print(f"skip K={k} D={d}: needs about {need / 1e9:.1f} GB")
                continue
            for bits in args.bits:
                a = build_inputs(k, d, bits, gs, dtype, device, gen)
                calls_ref = op_calls(impl_ref, a, bits, gs)
                calls_fast = op_calls(impl_fast, a, bits, gs)
                for op in args.ops:
                    # gram does not depend on bits; time it once per (K, D).
                    if op == "gram" and bits != args.bits[0]:
                        continue
                    moved = op_bytes(op, k, a["r"], d, bits, gs, elt)
                    t_ref = timed(calls_ref[op], device, repeat)
                    fast = op in impl_fast and (fast_name != "C" or native.unsupported(op, bits=bits) is None)
                    t = timed(calls_fast[op], device, repeat) if fast else t_ref
                    gbs = moved / t / 1e9
                    row = (f"{op:<14}{fast_name if fast else 'torch':>7}{k:>4}{d:>11}"
                           f"{'-' if op == 'gram' else bits:>5}{t * 1e3:>10.2f}"
                           f"{moved / 1e6:>10.1f}{gbs:>8.1f}{100 * gbs / copy_gbs:>7.1f}%")
                    if fast:
                        row += f"{t_ref * 1e3:>10.2f}{t_ref / t:>8.2f}x"
                    print(row, flush=True)
                del a
    # The machine may be shared; a second copy measurement shows how much the baseline drifted.
    end_gbs = copy_bandwidth(device, (1 << 30) if use_triton else (1 << 28), repeat)
    print(f"copy bandwidth re-measured at the end: {end_gbs:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
