"""Early training under the paper's protocol: does TWA over the constant-learning-rate half of a run reach the
accuracy of the full run?

The paper (Li et al., "Trainable Weight Averaging") trains a CNN with BatchNorm by SGD whose regular schedule keeps
the learning rate constant for the first half of the epochs and divides it by 10 at 50% and 75% of them (CIFAR: 200
epochs, decays at 100 and 150). TWA takes the checkpoints of the first half (one per epoch, plus the
initialisation), learns the coefficients on the training data (TWA-t) for about 10 epochs with a step schedule,
re-estimates BatchNorm, and is compared with the full regular run: "100 + 10 vs 200 epochs".

Here, for each seed: a small CNN with BatchNorm and one residual block (examples/early_training/cnn.py) is trained
on a subset of Debian's Fashion-MNIST training images for E epochs (lr constant, /10 at E/2 and 3E/4), saving the
initialisation and every epoch. The checkpoints 0..E/2 are then merged with the command-line tool:

* `twamerge average` (SWA: uniform average, BatchNorm statistics averaged too);
* `twamerge fit --epochs 0` on the training images (the same uniform average, BatchNorm re-estimated);
* `twamerge fit --schedule step` with the training images as --val (TWA-t; --holdout of them kept for its report),
  for --twa-epochs epochs and, for the paper's cost ratio (10 of 200 epochs), for 1 epoch;
* `twamerge fit --schedule step` on a validation split carved from the training images that training never used
  (TWA-v).

Everything is scored by `twamerge eval` on the official 10,000 test images, which no step sees.

    python examples/early_training/paper.py --out runs/early_training_paper     # ~25 min on 2 shared CPU cores
    python examples/early_training/paper.py --out runs/paper-smoke --smoke      # ~1 min
"""

from __future__ import annotations

import argparse
import json
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
from cnn import build  # noqa: E402


def lr_factor(epoch: int, epochs: int) -> float:
    """The regular run's step schedule, per epoch (0-based): 1 before E/2, 0.1 before 3E/4, then 0.01."""
    if epoch < epochs // 2:
        return 1.0
    return 0.1 if epoch < (3 * epochs) // 4 else 0.01


def train(
    x: np.ndarray, y: np.ndarray, ckpt_dir: Path, epochs: int, lr: float, seed: int, batch_size: int = 128
) -> tuple[list[Path], float]:
    """SGD (momentum 0.9, weight decay 5e-4) under the step schedule; saves epoch_00 (the initialisation) to
    epoch_E."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    paths = [C.save_checkpoint(model, ckpt_dir / "epoch_00.safetensors")]
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(epoch, epochs)
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt) - batch_size + 1, batch_size):  # full batches only (BatchNorm)
            b = perm[i : i + batch_size]
            loss = F.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        paths.append(C.save_checkpoint(model, ckpt_dir / f"epoch_{epoch + 1:02d}.safetensors"))
        print(f"seed {seed} epoch {epoch + 1}/{epochs} lr {opt.param_groups[0]['lr']:.4g} "
              f"loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return paths, time.perf_counter() - t0


METHODS = [  # (key, row label)
    ("swa", "SWA: `twamerge average` (BatchNorm statistics averaged)"),
    ("swa_bn", "SWA, BatchNorm re-estimated (`twamerge fit --epochs 0`)"),
    ("twa_t1", "TWA-t, 1 epoch (the paper's 10/200 cost ratio)"),
    ("twa_t", "TWA-t, {n} epochs (the paper's recipe)"),
    ("twa_v", "TWA-v, {n} epochs on {v} held-out training images"),
]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/early_training_paper"))
    ap.add_argument("--epochs", type=int, default=12, help="E of the regular run (lr /10 at E/2 and 3E/4)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    ap.add_argument("--train-size", type=int, default=6000, help="training images the network is trained on")
    ap.add_argument("--val-size", type=int, default=2000,
                    help="further training images, never trained on: TWA-v's --val")
    ap.add_argument("--twa-epochs", type=int, default=10, help="`twamerge fit --epochs` of TWA-t and TWA-v")
    ap.add_argument("--twa-batch-size", type=int, default=128, help="TWA-t's --batch-size (the training batch)")
    ap.add_argument("--holdout-t", type=float, default=0.1,
                    help="TWA-t's --holdout: the part of the training images kept out of its fit")
    ap.add_argument("--tolerance", type=float, default=0.001,
                    help="'equal accuracy' means within this much (absolute) of the full run")
    ap.add_argument("--smoke", action="store_true", help="tiny subset, 4 epochs, one seed: about a minute")
    ap.add_argument("--render", type=Path, metavar="RUN",
                    help="only rewrite RUN/table.md (and the verdict in RUN/results.json) from RUN/results.json")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads((args.render / "results.json").read_text())
        res.setdefault("n_params", sum(p.numel() for p in build().parameters()))
        res.setdefault("holdout_t", args.holdout_t)
        table, res["verdict"] = render(res)
        (args.render / "table.md").write_text(table)
        (args.render / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        print(table)
        return res
    seeds = [int(s) for s in args.seeds.split(",")]

    t_start = time.perf_counter()
    C.set_threads()
    out = C.fresh_dir(args.out)
    run = C.Runner(out)

    x, y = data.load("train")
    xte, yte = data.load("test")
    if args.smoke:
        args.epochs, args.twa_epochs = 4, 2
        seeds = seeds[:1]
        args.train_size, args.val_size = min(args.train_size, 1000), min(args.val_size, 300)
        keep = C.stratified_split(yte, [500 / len(yte), 1 - 500 / len(yte)], 0)[0]
        xte, yte = xte[keep], yte[keep]
    if args.epochs < 4 or args.epochs % 4:
        ap.error("--epochs must be a multiple of 4 (decays at E/2 and 3E/4 on epoch boundaries)")
    n = len(y)
    tr, va, _rest = C.stratified_split(
        y, [args.train_size / n, args.val_size / n, 1 - (args.train_size + args.val_size) / n], 12345
    )
    half = args.epochs // 2
    train_dir = C.save_split(out / "data" / "train", {"pixels": x[tr], "label": y[tr]})
    val_dir = C.save_split(out / "data" / "val", {"pixels": x[va], "label": y[va]})
    test_dir = C.save_split(out / "data" / "test", {"pixels": xte, "label": yte})
    model = ["--model", run.rel(HERE / "cnn.py") + ":build"]
    step = ["--schedule", "step"]

    per_seed = []
    train_s = 0.0
    fit_s: dict[str, float] = {}
    for seed in seeds:
        sdir = out / f"seed{seed}"
        ckpts, secs = train(x[tr], y[tr], sdir / "ckpts", args.epochs, args.lr, seed)
        train_s += secs
        prefix = ckpts[: half + 1]  # the initialisation and epochs 1..E/2 (constant learning rate)
        curve = C.eval_metrics(run("eval", *ckpts, "--val", test_dir, *model, "--json", parse_json=True,
                                   label=f"eval-test-seed{seed}"))
        per_epoch = [curve[p.name]["metric"] for p in ckpts]  # index = epoch (0: initialisation)
        paths = {key: sdir / f"{key}.safetensors" for key, _ in METHODS}
        run("average", *prefix, "-o", paths["swa"], label=f"average-seed{seed}")
        fits = {
            "swa_bn": ["--val", train_dir, "--holdout", str(args.holdout_t), "--epochs", "0",
                       "--no-greedy", "--no-candidates"],
            "twa_t1": ["--val", train_dir, "--holdout", str(args.holdout_t), "--epochs", "1", *step,
                       "--batch-size", str(args.twa_batch_size), "--no-greedy", "--no-candidates"],
            "twa_t": ["--val", train_dir, "--holdout", str(args.holdout_t), "--epochs", str(args.twa_epochs),
                      *step, "--batch-size", str(args.twa_batch_size), "--no-greedy", "--no-candidates"],
            "twa_v": ["--val", val_dir, "--epochs", str(args.twa_epochs), *step],
        }
        fit_json = {}
        for key, opts in fits.items():
            t0 = time.perf_counter()
            fit_json[key] = run("fit", *prefix, *opts, *model, "-o", paths[key], "--report",
                                sdir / f"report_{key}.json", "--json", parse_json=True, label=f"fit-{key}-seed{seed}")
            fit_s[key] = fit_s.get(key, 0.0) + time.perf_counter() - t0
            (sdir / f"fit_{key}.json").write_text(json.dumps(fit_json[key], indent=2) + "\n")
        ev = C.eval_metrics(run("eval", *paths.values(), "--val", test_dir, *model, "--json", parse_json=True,
                                label=f"eval-test-merges-seed{seed}"))
        merged = {key: ev[p.name]["metric"] for key, p in paths.items()}
        per_seed.append(
            {
                "seed": seed,
                "per_epoch": per_epoch,
                "half": per_epoch[half],
                "final": per_epoch[-1],
                "merges": merged,
                "heldout": {
                    key: {"twa": C.method_metric(f, "twa"), "uniform": C.method_metric(f, "uniform"),
                          "greedy": C.method_metric(f, "greedy")}
                    for key, f in fit_json.items()
                },
                "greedy_ingredients": C.greedy_ingredients(fit_json["twa_v"]),
                "alphas": C.block_alphas(fit_json["twa_t"]),
                "alphas_v": C.block_alphas(fit_json["twa_v"]),
            }
        )

    E = args.epochs
    mean = {k: float(np.mean([s[k] for s in per_seed])) for k in ("half", "final")}
    mean["per_epoch"] = np.mean([s["per_epoch"] for s in per_seed], 0).tolist()
    mean["merges"] = {key: float(np.mean([s["merges"][key] for s in per_seed])) for key, _ in METHODS}
    result = {
        "smoke": args.smoke,
        "protocol": "paper",
        "epochs": E,
        "half": half,
        "lr": args.lr,
        "twa_epochs": args.twa_epochs,
        "seeds": seeds,
        "sizes": {"train": int(len(tr)), "val": int(len(va)), "test": int(len(yte))},
        "n_params": sum(p.numel() for p in build().parameters()),
        "holdout_t": args.holdout_t,
        "per_seed": per_seed,
        "mean": mean,
        "tolerance": args.tolerance,
    }
    table, result["verdict"] = render(result)
    (out / "table.md").write_text(table)
    print(table)
    result["wall_s"] = {"train": round(train_s, 2), **{f"fit_{k}": round(s, 2) for k, s in fit_s.items()},
                        "total": round(time.perf_counter() - t_start, 2)}
    result["commands"] = run.records
    C.write_results(out, "early_training_paper", result)
    return result


def render(res: dict) -> tuple[str, str]:
    """(table.md, verdict) from a results.json's fields (`--render RUN` rewrites a run's table.md)."""
    E, half, n, v = res["epochs"], res["half"], res["twa_epochs"], res["sizes"]["val"]
    per_seed, mean = res["per_seed"], res["mean"]
    # Cost in epochs: passes of forward + backward over the training images. A TWA step is one forward +
    # backward of the network (plus the small subspace's combine and project); TWA-t passes over the part of the
    # training images outside its --holdout, TWA-v over 80% of the validation split (its default --holdout).
    # The BatchNorm re-estimation (one forward pass) is not counted.
    t_share = 1 - res["holdout_t"]
    cost = {"half": half, "final": E, "swa": half, "swa_bn": half, "twa_t1": half + t_share,
            "twa_t": half + n * t_share, "twa_v": half + n * 0.8 * v / res["sizes"]["train"]}
    res["cost_epochs"] = cost
    seed_cols = [f"seed {s['seed']}" for s in per_seed]
    headers = ["model (merges: checkpoints 0..E/2)", "epochs of cost", "test acc. (mean)"] + seed_cols

    def row(label, key, value_of):
        return [label, f"{cost[key]:.3g}", C.fmt_acc(value_of(mean))] + [C.fmt_acc(value_of(s)) for s in per_seed]

    rows = [
        row(f"regular run at epoch {half} (E/2, end of the constant lr)", "half", lambda r: r["half"]),
        row(f"regular run at epoch {E} (full run)", "final", lambda r: r["final"]),
    ]
    for key, label in METHODS:
        rows.append(row(label.format(n=n, v=v), key, lambda r, k=key: r["merges"][k]))

    full = mean["final"]
    lines = []
    short = {"twa_t1": "TWA-t (1 epoch)", "twa_t": f"TWA-t ({n} epochs)", "twa_v": f"TWA-v ({n} epochs)"}
    for key, name in short.items():
        acc = mean["merges"][key]
        reached = next((e for e, a in enumerate(mean["per_epoch"]) if a >= acc), None)
        saved = 1 - cost[key] / E
        if acc >= full - res["tolerance"]:
            lines.append(f"{name} reaches the full run ({C.fmt_acc(acc)} vs {C.fmt_acc(full)}, mean over seeds) "
                         f"at {cost[key]:.3g} of {E} epochs of cost: {100 * saved:.0f}% of the epochs saved.")
        else:
            if reached is None:
                at = "the regular run never reaches it"
            else:
                gain = 1 - cost[key] / reached
                at = (f"the regular run first reaches it at epoch {reached} (mean curve): at this accuracy TWA "
                      + (f"saves {100 * gain:.0f}%" if gain >= 0 else f"costs {-100 * gain:.0f}% more")
                      + " of the epochs")
            lines.append(f"{name} is {100 * (full - acc):.2f} points below the full run ({C.fmt_acc(acc)} vs "
                         f"{C.fmt_acc(full)}, mean over seeds); its cost is {cost[key]:.3g} epochs and {at}.")
    verdict = "\n".join(f"- {line}" for line in lines)
    tr = res["sizes"]["train"]
    table = (
        f"Fashion-MNIST, CNN with BatchNorm and a residual block (examples/early_training/cnn.py, "
        f"{res['n_params']} parameters), SGD lr {res['lr']} constant for epochs 1-{half}, /10 after epoch {half} "
        f"and again after epoch {3 * E // 4}, {E} epochs, batch 128; {tr} training images, {v} further training "
        f"images as TWA-v's validation split, {res['sizes']['test']} test images; merges of the {half + 1} "
        f"checkpoints 0..{half} (initialisation + constant-lr epochs); seeds "
        f"{', '.join(str(s['seed']) for s in per_seed)}; test accuracy (%). 'Epochs of cost' counts passes over "
        f"the {tr} training images (a TWA step is one forward + backward).\n\n"
        + C.markdown_table(headers, rows)
        + "\n"
        + verdict
        + "\n"
    )
    return table, verdict


if __name__ == "__main__":
    main()
