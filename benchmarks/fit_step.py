"""Cost of one TWA fit step against plain training on the same model and batch.

One fit step = combine (w = m + P~^T beta into the flat parameter buffer) + forward + backward +
project (P~ g). The baseline, measured in the same run, is forward + backward of the same model
with ordinary parameters. Also prints the basis memory next to its formula (R x D x bits/8 plus a
float32 scale and zero per group) and the flat float32 buffers.

Run: ``python benchmarks/fit_step.py [--width 1024] [--depth 4] [--k 8] [--bits 4] [--batch 64]``.
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


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--k", type=int, default=8, help="number of candidate checkpoints")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--blocks", default="layer")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = mlp(args.width, args.depth)
    names = [n for n, _ in base.named_parameters()]
    shapes = [tuple(p.shape) for _, p in base.named_parameters()]
    stacks = {n: p.detach().unsqueeze(0) + 0.01 * torch.randn(args.k, *p.shape) for n, p in base.named_parameters()}
    layout = make_layout(names, shapes, args.blocks, 128)
    t0 = time.perf_counter()
    sub = build_subspace(StackedCandidates(stacks), layout, bits=args.bits)
    build_s = time.perf_counter() - t0
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

    t_plain = timed(plain_step, args.repeats)
    t_fit = timed(fit_step, args.repeats)
    t_combine = timed(lambda: sub.combine(beta, out=binding.flat), args.repeats)
    t_project = timed(lambda: sub.project(binding.grad), args.repeats)
    d = layout.n_params
    formula = (args.k - 1) * layout.n_cols * args.bits / 8 + (
        2 * 4 * (args.k - 1) * layout.n_cols / 128 if args.bits <= 8 else 0)
    print(f"model: MLP width {args.width} depth {args.depth}, D = {d:,} parameters; K = {args.k}, "
          f"bits = {args.bits}, blocks = {args.blocks} ({layout.n_blocks}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print("| measure | value |\n|---|---|")
    print(f"| forward+backward (baseline) | {t_plain * 1e3:.2f} ms |")
    print(f"| fit step (combine+fwd+bwd+project) | {t_fit * 1e3:.2f} ms |")
    print(f"| ratio fit step / baseline | {t_fit / t_plain:.2f} |")
    print(f"| combine alone | {t_combine * 1e3:.2f} ms |")
    print(f"| project alone | {t_project * 1e3:.2f} ms |")
    print(f"| basis build (2 streaming passes) | {build_s:.2f} s |")
    print(f"| basis bytes measured | {sub.basis_bytes():,} |")
    print(f"| basis bytes formula (K-1) x D_pad x bits/8 + scales | {int(formula):,} |")
    print(f"| flat float32 buffers (weights, grads) | {2 * layout.n_cols * 4:,} |")
    print(f"| fp32 copy of the K checkpoints (what it avoids) | {args.k * d * 4:,} |")


if __name__ == "__main__":
    main()
