"""Choose fit defaults by measurement: accuracy and loss on a test split the tool never sees.

Trains the digits MLP (tests/digits_run.py) for several seeds, fits TWA with a grid of settings,
and prints the test accuracy and loss of each setting next to the last epoch, the uniform average
and the best single checkpoint of the same run. Run: ``python benchmarks/defaults_sweep.py [--seeds 3]``.

A low ``--train-lr`` makes a run that is still improving at its last checkpoint (the case where
the best merge extrapolates past it), and ``--val-rows`` a small ``--val`` (few fit steps per
epoch): the two together measure the step budget (``--min-steps``, docs/defaults.md).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from digits_run import MODEL_SPEC, make_digits_run  # noqa: E402

from twamerge.config import DataConfig, FitConfig, ModelConfig  # noqa: E402
from twamerge.merge import average_checkpoints  # noqa: E402
from twamerge.pipeline import evaluate_checkpoints, fit  # noqa: E402

# The grid's axes: command-line option -> (FitConfig field, parser of one value).
AXES = {
    "blocks": ("blocks", str),
    "lr": ("lr", float),
    "epochs": ("epochs", int),
    "bits": ("bits", int),
    "init": ("init", str),
    "coordinates": ("coordinates", str),
    "min_steps": ("min_steps", int),
    "stop_tol": ("stop_tol", float),
    "floor": ("fit_floor", lambda x: x == "on"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs-trained", type=int, default=8)
    ap.add_argument("--train-lr", type=float, default=0.1, help="SGD learning rate of the training run")
    ap.add_argument("--val-rows", type=int, default=450, help="rows of --val (at most 450)")
    ap.add_argument("--blocks", default="global,layer")
    ap.add_argument("--lr", default="0.02,0.05,0.2")
    ap.add_argument("--epochs", default="5,10")
    ap.add_argument("--bits", default="8")
    ap.add_argument("--init", default="uniform")
    ap.add_argument("--coordinates", default=FitConfig().coordinates)
    # The step budget and the fit floor; the old behaviour is --min-steps 0 --stop-tol 0 --floor off.
    ap.add_argument("--min-steps", default=str(FitConfig().min_steps))
    ap.add_argument("--stop-tol", default=str(FitConfig().stop_tol))
    ap.add_argument("--floor", default="on", help="on, off or on,off")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    values = {axis: [parse(x) for x in str(getattr(args, axis)).split(",")] for axis, (_, parse) in AXES.items()}
    grid = [dict(zip(AXES, point)) for point in itertools.product(*values.values())]
    results: dict[str, list[tuple[float, float]]] = {}
    steps: dict[str, list[int]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            run = make_digits_run(Path(tmp) / f"s{seed}", epochs=args.epochs_trained, seed=seed, lr=args.train_lr,
                                  val_rows=args.val_rows)
            test = DataConfig(str(run.test))
            model = ModelConfig(MODEL_SPEC)
            base = evaluate_checkpoints(run.checkpoints, val=test, model=model)["checkpoints"]
            results.setdefault("last epoch", []).append((base[-1]["metric"], base[-1]["loss"]))
            best = max(base, key=lambda c: c["metric"])
            results.setdefault("best single (by test, optimistic)", []).append((best["metric"], best["loss"]))
            uni = Path(tmp) / f"s{seed}-uniform.safetensors"
            average_checkpoints(run.checkpoints, uni)
            score = evaluate_checkpoints([uni], val=test, model=model)["checkpoints"][0]
            results.setdefault("uniform", []).append((score["metric"], score["loss"]))
            for i, point in enumerate(grid):
                out = Path(tmp) / f"s{seed}-{i}.safetensors"
                cfg = FitConfig(**{AXES[axis][0]: v for axis, v in point.items()}, seed=seed,
                                greedy=point["init"] == "greedy" or point["floor"],
                                eval_candidates=point["init"] != "uniform" or point["floor"])
                report = fit(run.checkpoints, val=DataConfig(str(run.val)), model=model, output=out, cfg=cfg)
                score = evaluate_checkpoints([out], val=test, model=model)["checkpoints"][0]
                name = "twa " + " ".join(f"{axis}={v if axis != 'floor' else ('on' if v else 'off')}"
                                         for axis, v in point.items())
                results.setdefault(name, []).append((score["metric"], score["loss"]))
                steps.setdefault(name, []).append(report["fit"]["steps"])
    print(f"digits MLP, {args.seeds} seeds x {args.epochs_trained} checkpoints (train lr {args.train_lr}), "
          f"{args.val_rows} --val rows; test accuracy and loss (mean ± sd over seeds); steps: mean fit steps")
    print("| setting | test accuracy | test loss | steps |\n|---|---|---|---|")
    def sd(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    for name, scores in results.items():
        accs, losses = [a for a, _ in scores], [v for _, v in scores]
        n = f"{statistics.mean(steps[name]):.0f}" if name in steps else "-"
        print(f"| {name} | {statistics.mean(accs):.4f} ± {sd(accs):.4f} | {statistics.mean(losses):.4f} ± "
              f"{sd(losses):.4f} | {n} |")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
