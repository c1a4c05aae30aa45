"""Per-rank basis memory and fit step time of a distributed fit, 1 rank vs 2 ranks, measured in the same run.

    python benchmarks/distributed.py [--hidden 512] [--candidates 6] [--bits 4] [--epochs 2]

Writes K synthetic candidates of an MLP (about ``784*h + h*h + 10*h`` parameters) and a synthetic
classification set to a temporary folder, fits once in this process and once on two gloo ranks
(torch.multiprocessing.spawn; CPU), and prints per-rank basis bytes and seconds per step with the
ratios against the one-rank run. On a 2-core machine the two ranks share the cores, so the step
time shows overhead, not speed-up; run it on a machine with a core (or GPU) per rank for that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn


def build(n_in: int = 784, hidden: int = 512, n_out: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


def _prepare(root: Path, hidden: int, k: int, rows: int) -> tuple[list[str], str]:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base = build(hidden=hidden).state_dict()
    paths = []
    for i in range(k):
        state = {n: (t + 0.02 * torch.randn(t.shape, generator=gen)).contiguous() for n, t in base.items()}
        paths.append(str(root / f"c{i}.safetensors"))
        save_file(state, paths[-1])
    x = torch.randn(rows, 784, generator=gen)
    label = torch.randint(0, 10, (rows,), generator=gen)
    val = root / "val.pt"
    torch.save({"x": x, "label": label}, val)
    return paths, str(val)


def _fit(args: argparse.Namespace, paths: list[str], val: str, out: Path) -> dict:
    from twamerge.config import DataConfig, FitConfig, ModelConfig, OutputConfig
    from twamerge.pipeline import fit

    return fit(paths, val=DataConfig(val), model=ModelConfig(f"{Path(__file__).resolve()}:build",
                                                             {"hidden": args.hidden}),
               output=OutputConfig(out, force=True),
               cfg=FitConfig(bits=args.bits, epochs=args.epochs, batch_size=args.batch_size, greedy=False,
                             eval_candidates=False, device="cpu"))


def _summary(report: dict) -> dict:
    ranks = report.get("distributed", {}).get("ranks") or [{"basis_bytes": report["memory"]["basis_bytes"]}]
    return {"basis_bytes": [r["basis_bytes"] for r in ranks],
            "step_s": report["timings"]["fit"] / max(1, report["fit"]["steps"]),
            "alphas": report["merge"]["block_alphas"]}


def _worker(rank: int, args: argparse.Namespace, paths: list[str], val: str, root: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    dist.init_process_group("gloo", init_method=f"file://{root}/rdv", rank=rank, world_size=2)
    try:
        report = _fit(args, paths, val, Path(root) / "two.safetensors")
    finally:
        dist.destroy_process_group()
    if rank == 0:
        (Path(root) / "two.json").write_text(json.dumps(_summary(report)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths, val = _prepare(root, args.hidden, args.candidates, args.rows)
        n_params = sum(p.numel() for p in build(hidden=args.hidden).parameters())
        one = _summary(_fit(args, paths, val, root / "one.safetensors"))
        mp.spawn(_worker, args=(args, paths, val, str(root)), nprocs=2, join=True)
        two = json.loads((root / "two.json").read_text())
    drift = max(abs(a - b) for ra, rb in zip(one["alphas"], two["alphas"]) for a, b in zip(ra, rb))
    print(f"model: {n_params:,} parameters, K={args.candidates}, bits={args.bits}, CPU threads={os.cpu_count()}")
    print(f"{'ranks':>5} {'basis bytes per rank':>28} {'max/1-rank':>10} {'s/step':>8} {'vs 1 rank':>9}")
    for name, res in (("1", one), ("2", two)):
        per = res["basis_bytes"]
        print(f"{name:>5} {', '.join(f'{b:,}' for b in per):>28} {max(per) / one['basis_bytes'][0]:>10.3f} "
              f"{res['step_s']:>8.4f} {res['step_s'] / one['step_s']:>9.2f}")
    print(f"max |alpha(2 ranks) - alpha(1 rank)| = {drift:.2e}")


if __name__ == "__main__":
    sys.exit(main())
