"""The main job, end to end, on real data that ships with scikit-learn (the 1,797 8x8 digit images).

1. train a small MLP, saving a safetensors checkpoint after every epoch;
2. write the validation split with `datasets` (for twamerge) and keep a test split that twamerge never sees;
3. `twamerge fit` learns the averaging coefficients on the validation split (it holds out part of it itself);
4. `twamerge average` writes the uniform average; `twamerge eval` scores best single / last / uniform / TWA
   on the test split; the table goes to stdout and to OUT/table.md.

    python examples/digits/run.py --out runs/demo            # about a minute on 2 CPU cores
    python examples/digits/run.py --out runs/demo-smoke --smoke
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
from model import build  # noqa: E402


def load_digits_splits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    # The data set is small enough to use whole even in the smoke run (3 epochs take a second; the time goes to
    # starting twamerge), and a barely trained net would make the smoke numbers meaningless.
    tr, va, te = C.stratified_split(y, [0.5, 0.25, 0.25], seed)
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}


def train(
    x: np.ndarray, y: np.ndarray, ckpt_dir: Path, epochs: int, lr: float, seed: int, log: dict
) -> list[Path]:
    """SGD with momentum at a constant learning rate: the per-epoch checkpoints scatter around a good region,
    which is what averaging exploits."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 32):
            b = perm[i : i + 32]
            loss = F.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        paths.append(C.save_checkpoint(model, ckpt_dir / f"epoch_{epoch:02d}.safetensors"))
        log.setdefault("train_acc", []).append(C.accuracy(model, xt, yt))
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="3 epochs: seconds, for the tests")
    ap.add_argument(
        "--fit-arg",
        action="append",
        default=[],
        help="extra option passed to `twamerge fit` (repeatable), e.g. --fit-arg=--bits=4",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs = min(args.epochs, 3)
        # The smoke run checks the plumbing: the fit's default step budget (--min-steps) would dominate its time.
        args.fit_arg = ["--min-steps=0", *args.fit_arg]

    t_start = time.perf_counter()
    C.set_threads()
    out = C.fresh_dir(args.out)
    run = C.Runner(out)

    splits = load_digits_splits(args.seed)
    val_dir = C.save_split(out / "data" / "val", {"pixels": splits["val"][0], "label": splits["val"][1]})
    test_dir = C.save_split(out / "data" / "test", {"pixels": splits["test"][0], "label": splits["test"][1]})

    t0 = time.perf_counter()
    log: dict = {}
    ckpts = train(*splits["train"], out / "ckpts", args.epochs, args.lr, args.seed, log)
    train_s = time.perf_counter() - t0

    model = ["--model", run.rel(HERE / "model.py") + ":build"]

    # Best single checkpoint: chosen on the validation data, like a user would (no peeking at test).
    by_name = C.eval_metrics(run("eval", *ckpts, "--val", val_dir, *model, "--json", parse_json=True,
                                 label="eval-val"))
    best = max(ckpts, key=lambda p: (by_name[p.name]["metric"], p.name))

    uniform = out / "uniform.safetensors"
    run("average", *ckpts, "-o", uniform, label="average")

    twa = out / "twa.safetensors"
    fit = run(
        "fit",
        *ckpts,
        "--val",
        val_dir,
        *model,
        "-o",
        twa,
        "--report",
        out / "report.json",
        *args.fit_arg,
        "--json",
        parse_json=True,
        label="fit",
    )
    (out / "fit.json").write_text(json.dumps(fit, indent=2) + "\n")

    # The greedy soup that `twamerge fit` picked (ingredients chosen on the fit part of --val), written out to test it too.
    names = C.greedy_ingredients(fit) or []
    members = [p for p in ckpts if p.name in {Path(n).name for n in names}]
    if len(members) > 1:
        greedy = out / "greedy.safetensors"
        run("average", *members, "-o", greedy, label="average-greedy")
    else:
        greedy = members[0] if members else None

    rows_spec = [("best single (by val)", best), ("last epoch", ckpts[-1]), ("uniform average", uniform)]
    if greedy is not None:
        rows_spec.append((f"greedy soup ({len(members)} of {len(ckpts)})", greedy))
    rows_spec.append(("TWA (twamerge fit)", twa))
    test_by_name = C.eval_metrics(run("eval", *dict.fromkeys(p for _, p in rows_spec), "--val", test_dir, *model,
                                      "--json", parse_json=True, label="eval-test"))

    heldout = {
        "uniform average": C.method_metric(fit, "uniform"),
        "TWA (twamerge fit)": C.method_metric(fit, "twa"),
        "best single (by val)": C.candidate_metrics(fit).get(best.name),
        "last epoch": C.candidate_metrics(fit).get(ckpts[-1].name),
    }
    if greedy is not None:
        heldout[rows_spec[3][0]] = C.method_metric(fit, "greedy")
    rows, table_rows = [], []
    for name, path in rows_spec:
        acc = test_by_name[path.name]["metric"]
        rows.append(
            {
                "method": name,
                "checkpoint": path.name,
                "test_acc": acc,
                "test_loss": test_by_name[path.name]["loss"],
                "heldout_acc": heldout.get(name),
            }
        )
        table_rows.append(
            [
                name,
                path.name,
                C.fmt_acc(acc),
                f"{test_by_name[path.name]['loss']:.4f}",
                C.fmt_acc(heldout.get(name)),
            ]
        )

    table = (
        f"Digits (scikit-learn), MLP 64-128-128-10, {args.epochs} epochs, "
        f"{len(splits['train'][1])} train / {len(splits['val'][1])} val / {len(splits['test'][1])} test "
        f"images. Accuracy (%) and loss on the test split twamerge never saw; last column: accuracy on the "
        f"part of --val that `twamerge fit` held out ({fit['heldout_rows']} rows).\n\n"
        + C.markdown_table(
            ["method", "checkpoint", "test accuracy %", "test loss", "held-out accuracy %"], table_rows
        )
    )
    (out / "table.md").write_text(table)
    print(table)

    total_s = time.perf_counter() - t_start
    result = {
        "smoke": args.smoke,
        "epochs": args.epochs,
        "lr": args.lr,
        "seed": args.seed,
        "sizes": {k: int(len(v[1])) for k, v in splits.items()},
        "rows": rows,
        "fit_heldout": {
            "uniform": heldout["uniform average"],
            "twa": heldout["TWA (twamerge fit)"],
            "greedy": C.method_metric(fit, "greedy"),
            "greedy_ingredients": names,
            "candidates": C.candidate_metrics(fit),
        },
        "alphas": C.block_alphas(fit),
        "train_acc": log.get("train_acc"),
        "wall_s": {"train": round(train_s, 2), "total": round(total_s, 2)},
        "commands": run.records,
    }
    C.write_results(out, "digits", result)
    return result


if __name__ == "__main__":
    main()
