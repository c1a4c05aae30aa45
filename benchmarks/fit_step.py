"""Cost of one TWA fit step against plain training on the same model and batch.

One fit step = combine (w = m + P~^T beta into the flat parameter buffer) + forward + backward +
project (P~ g). The baseline, measured in the same run, is forward + backward of the same model
with ordinary parameters. Also prints the basis memory next to its formula (R x D x bits/8 plus a
float32 scale and zero per group) and the flat float32 buffers.

Also times combine and project alone against a plain memory copy of the basis bytes (codes, scales
and zeros into preallocated buffers: the memory-speed floor of anything that reads the basis). All
timings are interleaved in one loop; each is the minimum over ``--repeats``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/fit_step.py [--width 1024] [--depth 4] [--k 8] [--bits 4] [--batch 64]``;
about 100M parameters: ``--width 4096 --depth 7 --bits 8`` (needs about 8 GB of memory).
``--backend torch`` times the torch references instead of the C kernels (``auto`` on CPU).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from twamerge.fit import FlatBinding
from twamerge.subspace import StackedCandidates, build_subspace, make_layout


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Minimum wall time of each function over ``repeats`` rounds that run every function once."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--k", type=int, default=8, help="number of candidate checkpoints")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--blocks", default="layer")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--backend", default="auto", choices=["auto", "native", "torch"],
                    help="kernels for combine and project (auto: the C loops on CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = mlp(args.width, args.depth)
    names = [n for n, _ in base.named_parameters()]
    shapes = [tuple(p.shape) for _, p in base.named_parameters()]
    stacks = {n: p.detach().unsqueeze(0) + 0.01 * torch.randn(args.k, *p.shape) for n, p in base.named_parameters()}
    del base
    layout = make_layout(names, shapes, args.blocks, 128)
    t0 = time.perf_counter()
    sub = build_subspace(StackedCandidates(stacks), layout, bits=args.bits, backend=args.backend)
    build_s = time.perf_counter() - t0
    del stacks
    x = torch.randn(args.batch, 784)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()

    plain = mlp(args.width, args.depth)

    def plain_step() -> None:
        plain.zero_grad(set_to_none=False)
        loss_fn(plain(x), y).backward()

    model = mlp(args.width, args.depth)
    binding = FlatBinding(model, layout, torch.device("cpu"))
    beta = torch.randn(layout.n_blocks, sub.rows) * 0.01

    def fit_step() -> None:
        sub.combine(beta, out=binding.flat)
        binding.grad.zero_()
        loss_fn(model(x), y).backward()
        sub.project(binding.grad)

    basis = (sub.codes, sub.scales, sub.zeros)
    copies = tuple(torch.empty_like(t) for t in basis)

    def copy_basis() -> None:
        for dst, src in zip(copies, basis):
            dst.copy_(src)

    best = interleaved({"plain": plain_step, "fit": fit_step, "combine": lambda: sub.combine(beta, out=binding.flat),
                        "project": lambda: sub.project(binding.grad), "copy": copy_basis}, args.repeats)
    t_plain, t_fit, t_combine, t_project, t_copy = (best[n] for n in ("plain", "fit", "combine", "project", "copy"))
    d = layout.n_params
    formula = (args.k - 1) * layout.n_cols * args.bits / 8 + (
        2 * 4 * (args.k - 1) * layout.n_cols / 128 if args.bits <= 8 else 0)
    print(f"model: MLP width {args.width} depth {args.depth}, D = {d:,} parameters; K = {args.k}, "
          f"bits = {args.bits}, blocks = {args.blocks} ({layout.n_blocks}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; backend {args.backend}; minimum of {args.repeats} interleaved rounds")
    print("| measure | value |\n|---|---|")
    print(f"| forward+backward (baseline) | {t_plain * 1e3:.2f} ms |")
    print(f"| fit step (combine+fwd+bwd+project) | {t_fit * 1e3:.2f} ms |")
    print(f"| ratio fit step / baseline | {t_fit / t_plain:.2f} |")
    print(f"| combine alone | {t_combine * 1e3:.2f} ms ({t_combine / t_copy:.2f}x the basis copy) |")
    print(f"| project alone | {t_project * 1e3:.2f} ms ({t_project / t_copy:.2f}x the basis copy) |")
    print(f"| memory copy of the basis bytes (floor) | {t_copy * 1e3:.2f} ms |")
    print(f"| basis build (2 streaming passes) | {build_s:.2f} s |")
    print(f"| basis bytes measured | {sub.basis_bytes():,} |")
    print(f"| basis bytes formula (K-1) x D_pad x bits/8 + scales | {int(formula):,} |")
    print(f"| flat float32 buffers (weights, grads) | {2 * layout.n_cols * 4:,} |")
    print(f"| fp32 copy of the K checkpoints (what it avoids) | {args.k * d * 4:,} |")


if __name__ == "__main__":
    main()
