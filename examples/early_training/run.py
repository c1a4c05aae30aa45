"""Early training: does TWA over the checkpoints of the first part of a run reach the accuracy of the full run?

The paper's first headline effect. For each seed, train an MLP on Fashion-MNIST (Debian's dataset-fashion-mnist)
for E epochs with SGD + momentum under a cosine schedule, saving a checkpoint per epoch. Then, for each fraction f
of the epochs, merge the first round(f * E) checkpoints twice: `twamerge fit` (TWA, coefficients learned on a
validation split carved from the training images) and `twamerge average` (the uniform average, SWA). Everything is
scored with `twamerge eval` on the official 10,000-image test split, which the tool never sees.

    python examples/early_training/run.py --out runs/early_training            # a few minutes on 2 CPU cores
    python examples/early_training/run.py --out runs/early-smoke --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _common as C  # noqa: E402
import data  # noqa: E402
from model import build  # noqa: E402


def train(
    x: np.ndarray, y: np.ndarray, ckpt_dir: Path, epochs: int, lr: float, seed: int, batch_size: int = 128
) -> tuple[list[Path], float]:
    """SGD (momentum 0.9, weight decay 5e-4), cosine learning-rate decay to 0 over `epochs`, per step."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    paths = []
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            b = perm[i : i + batch_size]
            loss = F.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        paths.append(C.save_checkpoint(model, ckpt_dir / f"epoch_{epoch:02d}.safetensors"))
    return paths, time.perf_counter() - t0


def epochs_for(fraction: float, epochs: int) -> int:
    return max(2, min(epochs, int(round(fraction * epochs))))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/early_training"))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds (at least two)")
    ap.add_argument("--fractions", default="0.3,0.5,0.7", help="fractions of the epochs given to TWA")
    ap.add_argument(
        "--val-size", type=int, default=5000, help="training images held back as twamerge's --val"
    )
    ap.add_argument(
        "--tolerance",
        type=float,
        default=0.001,
        help="'equal accuracy' means TWA within this much (absolute) of the full run",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny subset and 4 epochs: seconds, for the tests")
    ap.add_argument(
        "--fit-arg",
        action="append",
        default=[],
        help="extra option passed to `twamerge fit` (repeatable), e.g. --fit-arg=--bits=4",
    )
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]

    t_start = time.perf_counter()
    C.set_threads()
    out = C.fresh_dir(args.out)
    run = C.Runner(out)

    x, y = data.load("train")
    xte, yte = data.load("test")
    if args.smoke:
        args.epochs = min(args.epochs, 4)
        # The smoke run checks the plumbing: the fit's default step budget (--min-steps) would dominate its time.
        args.fit_arg = ["--min-steps=0", *args.fit_arg]
        seeds, fractions = seeds[:1], [0.5]
        args.val_size = min(args.val_size, 300)
        keep = C.stratified_split(y, [2000 / len(y), 1 - 2000 / len(y)], 0)[0]
        x, y = x[keep], y[keep]
        keep = C.stratified_split(yte, [500 / len(yte), 1 - 500 / len(yte)], 0)[0]
        xte, yte = xte[keep], yte[keep]
    # Fractions that round to the same number of epochs (short runs) are merged once.
    plan = {}
    for f in fractions:
        plan.setdefault(epochs_for(f, args.epochs), f)
    fractions = list(plan.values())
    val_frac = args.val_size / len(y)
    tr, va = C.stratified_split(y, [1 - val_frac, val_frac], 12345)
    val_dir = C.save_split(out / "data" / "val", {"pixels": x[va], "label": y[va]})
    test_dir = C.save_split(out / "data" / "test", {"pixels": xte, "label": yte})
    model = ["--model", run.rel(HERE / "model.py") + ":build"]

    per_seed = []
    train_s = 0.0
    for seed in seeds:
        sdir = out / f"seed{seed}"
        ckpts, secs = train(x[tr], y[tr], sdir / "ckpts", args.epochs, args.lr, seed)
        train_s += secs
        curve = C.eval_metrics(run("eval", *ckpts, "--val", test_dir, *model, "--json", parse_json=True,
                                   label=f"eval-test-seed{seed}"))
        by_name = {name: v["metric"] for name, v in curve.items()}
        per_epoch = [by_name[p.name] for p in ckpts]
        merges = []
        for f in fractions:
            n = epochs_for(f, args.epochs)
            twa = sdir / f"twa_{n:02d}.safetensors"
            uni = sdir / f"uniform_{n:02d}.safetensors"
            fit = run(
                "fit",
                *ckpts[:n],
                "--val",
                val_dir,
                *model,
                "-o",
                twa,
                "--report",
                sdir / f"report_{n:02d}.json",
                *args.fit_arg,
                "--json",
                parse_json=True,
                label=f"fit-seed{seed}-{n}",
            )
            (sdir / f"fit_{n:02d}.json").write_text(json.dumps(fit, indent=2) + "\n")
            run("average", *ckpts[:n], "-o", uni, label=f"average-seed{seed}-{n}")
            ev = C.eval_metrics(run("eval", twa, uni, "--val", test_dir, *model, "--json", parse_json=True,
                                    label=f"eval-test-seed{seed}-{n}"))
            ev = {name: v["metric"] for name, v in ev.items()}
            merges.append(
                {
                    "fraction": f,
                    "epochs": n,
                    "twa": ev[twa.name],
                    "uniform": ev[uni.name],
                    "last_of_prefix": per_epoch[n - 1],
                    "twa_heldout": C.method_metric(fit, "twa"),
                    "uniform_heldout": C.method_metric(fit, "uniform"),
                    "alphas": C.block_alphas(fit),
                }
            )
        per_seed.append({"seed": seed, "per_epoch": per_epoch, "final": per_epoch[-1], "merges": merges})

    # Table: one row per number of epochs used, means over seeds plus TWA per seed.
    mean = {"final": float(np.mean([s["final"] for s in per_seed])), "merges": []}
    for i, f in enumerate(fractions):
        m = {
            k: float(np.mean([s["merges"][i][k] for s in per_seed]))
            for k in ("last_of_prefix", "uniform", "twa")
        }
        m.update(fraction=f, epochs=epochs_for(f, args.epochs))
        mean["merges"].append(m)
    seed_cols = [f"TWA seed {s['seed']}" for s in per_seed]
    headers = [
        "epochs used",
        "checkpoint at that epoch",
        "uniform average (SWA)",
        "TWA (twamerge fit)",
    ] + seed_cols
    rows = [
        [f"{args.epochs} of {args.epochs} (full run, final epoch)", C.fmt_acc(mean["final"]), "", ""]
        + [C.fmt_acc(s["final"]) + " (final)" for s in per_seed]
    ]
    for i, m in enumerate(mean["merges"]):
        rows.append(
            [
                f"{m['epochs']} of {args.epochs} ({100 * m['epochs'] / args.epochs:.0f}%)",
                C.fmt_acc(m["last_of_prefix"]),
                C.fmt_acc(m["uniform"]),
                C.fmt_acc(m["twa"]),
            ]
            + [C.fmt_acc(s["merges"][i]["twa"]) for s in per_seed]
        )

    # Fraction of epochs saved at equal accuracy: the fewest epochs whose TWA (mean over seeds) is within the
    # tolerance of the full run's final epoch.
    matching = [m for m in mean["merges"] if m["twa"] >= mean["final"] - args.tolerance]
    if matching:
        best = min(matching, key=lambda m: m["epochs"])
        saved = 1 - best["epochs"] / args.epochs
        verdict = (
            f"TWA over the first {best['epochs']} of {args.epochs} epochs reaches the full run's accuracy "
            f"(within {100 * args.tolerance:.1f} points, mean over seeds): {100 * saved:.0f}% of the "
            f"training epochs saved."
        )
    else:
        saved = None
        verdict = (
            f"No tested fraction reaches the full run's final accuracy within {100 * args.tolerance:.1f} "
            f"points (mean over seeds); see the table for the gap."
        )
    table = (
        f"Fashion-MNIST, MLP 784-512-256-10, SGD + cosine over {args.epochs} epochs, "
        f"{len(tr)} train / {len(va)} val (twamerge --val) / {len(yte)} test images, "
        f"seeds {', '.join(map(str, seeds))}; "
        f"test accuracy (%), mean over seeds unless a column names a seed.\n\n"
        + C.markdown_table(headers, rows)
        + "\n"
        + verdict
        + "\n"
    )
    (out / "table.md").write_text(table)
    print(table)

    total_s = time.perf_counter() - t_start
    result = {
        "smoke": args.smoke,
        "epochs": args.epochs,
        "lr": args.lr,
        "seeds": seeds,
        "fractions": fractions,
        "sizes": {"train": int(len(tr)), "val": int(len(va)), "test": int(len(yte))},
        "per_seed": per_seed,
        "mean": mean,
        "epochs_saved_fraction": saved,
        "verdict": verdict,
        "tolerance": args.tolerance,
        "wall_s": {"train": round(train_s, 2), "total": round(total_s, 2)},
        "commands": run.records,
    }
    C.write_results(out, "early_training", result)
    return result


if __name__ == "__main__":
    main()
