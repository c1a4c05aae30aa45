"""Choose fit defaults by measurement: accuracy on a test split the tool never sees.

Trains the digits MLP (tests/digits_run.py) for several seeds, fits TWA with a grid of settings,
and prints test accuracy of each setting next to the last epoch, the uniform average and the best
single checkpoint of the same run. Run: ``python benchmarks/defaults_sweep.py [--seeds 3]``.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs-trained", type=int, default=8)
    ap.add_argument("--blocks", default="global,layer")
    ap.add_argument("--lr", default="0.02,0.05,0.2")
    ap.add_argument("--epochs", default="5,10")
    ap.add_argument("--bits", default="8")
    ap.add_argument("--init", default="uniform")
    ap.add_argument("--coordinates", default=FitConfig().coordinates)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    grid = list(itertools.product(args.blocks.split(","), [float(x) for x in args.lr.split(",")],
                                  [int(x) for x in args.epochs.split(",")], [int(x) for x in args.bits.split(",")], args.init.split(","), args.coordinates.split(",")))
    results: dict[str, list[float]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            run = make_digits_run(Path(tmp) / f"s{seed}", epochs=args.epochs_trained, seed=seed)
            test = DataConfig(str(run.test))
            model = ModelConfig(MODEL_SPEC)
            base = evaluate_checkpoints(run.checkpoints, val=test, model=model)["checkpoints"]
            results.setdefault("last epoch", []).append(base[-1]["metric"])
            results.setdefault("best single (by test, optimistic)", []).append(max(c["metric"] for c in base))
            uni = Path(tmp) / f"s{seed}-uniform.safetensors"
            average_checkpoints(run.checkpoints, uni)
            results.setdefault("uniform", []).append(evaluate_checkpoints([uni], val=test, model=model)
                                                     ["checkpoints"][0]["metric"])
            for blocks, lr, epochs, bits, init, coords in grid:
                out = Path(tmp) / f"s{seed}-{blocks}-{lr}-{epochs}-{bits}-{init}-{coords}.safetensors"
                fit(run.checkpoints, val=DataConfig(str(run.val)), model=model, output=out,
                    cfg=FitConfig(blocks=blocks, lr=lr, epochs=epochs, bits=bits, init=init, coordinates=coords,
                                  greedy=init == "greedy", eval_candidates=init != "uniform", seed=seed))
                acc = evaluate_checkpoints([out], val=test, model=model)["checkpoints"][0]["metric"]
                results.setdefault(f"twa blocks={blocks} lr={lr} epochs={epochs} bits={bits} init={init} coordinates={coords}", []).append(acc)
    print(f"digits MLP, {args.seeds} seeds x {args.epochs_trained} checkpoints; test accuracy (mean ± sd over seeds)")
    print("| setting | test accuracy |\n|---|---|")
    for name, accs in results.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {name} | {statistics.mean(accs):.4f} ± {sd:.4f} |")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
