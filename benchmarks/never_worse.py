"""Does TWA lose to picking? A study of fit options on data no step of the merge has seen (issue 13, item 3).

For every pool of candidates (``benchmarks/pools.py`` builds them; a pool is a folder with ``pool.json``)
this script runs ``twamerge.fit`` with each option below on the pool's validation data, scores every
written merge on the pool's test split with ``twamerge.evaluate_checkpoints``, and compares it with
what picking would have given:

* **best single**: the candidate with the best metric on all of ``--val`` (what a user picks by hand);
* **greedy soup**: the soup ``fit`` itself reports (ingredients chosen on the fit rows, BatchNorm
  re-estimated), written with ``--init greedy --epochs 0``.

Options (each a ``FitConfig`` change from the defaults; the rules that choose use the held-out rows
of the default fit, never the test split):

    twa            the defaults (uniform start, 10 epochs, lr 0.05, 20% of --val held out)
    init_greedy    start at the greedy soup
    init_greedy_wd start at the greedy soup, weight decay 1.0 toward it (also 0.1 and 0.3)
    wd             weight decay 1.0 toward the uniform start
    restarts3      three data orders, coefficients averaged
    global         one coefficient vector for the whole model (--blocks global): K - 1 numbers to fit, not
                   (K - 1) per tensor
    refit          the defaults fitted on all of --val (--holdout 0)
    tuned_refit    lr chosen among 0.02 / 0.05 / 0.1 on the held-out rows, then refitted on all of --val
    select         whichever of TWA, the greedy soup, the uniform average and the best candidate (on the
                   fit rows) scores best on the held-out rows (ties: lower held-out loss, then TWA)
    select_refit   the same choice, with the refitted TWA written when TWA is chosen
    select_any     as select, but every candidate competes on the held-out rows (not only the best on the fit rows)

Run (pools: a few minutes; the study: about an hour and a half on 2 shared CPU cores, most of it the
MiniLM soup, whose fits take about 3 minutes each; each process uses one thread, so two can run side by side):

    python benchmarks/pools.py --seeds 0,1
    python benchmarks/pools.py --seeds 2,3,4 --only fmnist_mlp_soup8,mnist_mlp_epochs
    python benchmarks/pools.py --seeds 2,3 --only fmnist_cnn16
    python examples/finetune_soup/run.py --out runs/finetune_soup --variants layer:8
    python benchmarks/never_worse.py --pools runs/pools runs/finetune_soup --out runs/never_worse --md docs/never_worse.md

Results are kept per pool in ``<out>/<pool>.json``; a rerun fits only the options a pool's file lacks.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")

import torch  # noqa: E402

from twamerge import DataConfig, FitConfig, ModelConfig, OutputConfig, evaluate_checkpoints, fit  # noqa: E402
from twamerge.report import MethodResult, best_candidate, best_on_heldout  # noqa: E402

# Each option: (FitConfig changes, fitted on all of --val?). The picks (select*) are computed from these.
OPTIONS: dict[str, tuple[dict, bool]] = {
    "twa": ({}, False),
    "init_greedy": ({"init": "greedy"}, False),
    "init_greedy_wd": ({"init": "greedy", "weight_decay": 1.0}, False),
    "init_greedy_wd0.1": ({"init": "greedy", "weight_decay": 0.1}, False),
    "init_greedy_wd0.3": ({"init": "greedy", "weight_decay": 0.3}, False),
    "wd": ({"weight_decay": 1.0}, False),
    "restarts3": ({"restarts": 3}, False),
    "global": ({"blocks": "global"}, False),
    "lr0.02": ({"lr": 0.02}, False),
    "lr0.1": ({"lr": 0.1}, False),
    "refit": ({}, True),
}
TUNED_LRS = {"lr0.02": 0.02, "twa": 0.05, "lr0.1": 0.1}
SHOWN = ["twa", "init_greedy", "init_greedy_wd0.1", "init_greedy_wd0.3", "init_greedy_wd", "wd", "restarts3", "global",
         "refit", "tuned_refit", "select", "select_refit", "select_any"]


# The output folder of examples/finetune_soup/run.py is a pool too (the MiniLM fine-tunes as Hugging Face folders,
# raw-text .jsonl splits, the model read from the folders).
FINETUNE_SOUP = {"name": "minilm_soup", "model": None, "in_tests": False, "checkpoints": "finetunes/*",
                 "val": "data/val.jsonl", "test": "data/test.jsonl",
                 "description": "examples/finetune_soup: all-MiniLM-L6-v2 + a classification head, 5 fine-tunes "
                                "(Hugging Face folders) on 5 Debian fortunes topics; raw text tokenized by the "
                                "folders' tokenizer"}


def pool_spec(root: Path) -> dict | None:
    if (root / "pool.json").exists():
        return json.loads((root / "pool.json").read_text())
    if (root / "finetunes").is_dir() and (root / "data" / "val.jsonl").exists():
        return FINETUNE_SOUP
    return None


def pool_paths(root: Path, spec: dict) -> tuple[list[str], str, str]:
    ckpts = sorted(glob.glob(str(root / spec.get("checkpoints", "ckpts/*.safetensors"))))
    return ckpts, str(root / spec.get("val", "val")), str(root / spec.get("test", "test"))


def output_path(work: Path, name: str, hf: bool) -> Path:
    return work / name if hf else work / f"{name}.safetensors"


def run_pool(root: Path, out: Path, threads: int, previous: dict | None = None) -> dict:
    """Fit and score every option not yet in ``previous`` (a pool's earlier result), and the picks."""
    spec = pool_spec(root)
    ckpts, val, test = pool_paths(root, spec)
    hf = Path(ckpts[0]).is_dir()
    model = ModelConfig(spec.get("model"), spec.get("model_args") or {})
    work = out / "work" / spec["name"]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.set_num_threads(threads)
    res: dict = previous or {"name": spec["name"], "in_tests": spec.get("in_tests", False),
                             "description": spec.get("description", ""), "k": len(ckpts), "fits": {},
                             "seconds": {}, "test": {}, "test_loss": {}}

    if "candidates" not in res:
        # Picking by hand: every candidate on all of --val and on the test split.
        t = time.perf_counter()
        on_val = evaluate_checkpoints(ckpts, val=DataConfig(val), model=model, batch_size=256)
        on_test = evaluate_checkpoints(ckpts, val=DataConfig(test), model=model, batch_size=256)
        res["seconds"]["eval_candidates"] = time.perf_counter() - t
        res.update(metric=on_val["metric_name"], higher_is_better=on_val["higher_is_better"],
                   val_rows=on_val["rows"], test_rows=on_test["rows"])
        res["candidates"] = [{"name": Path(v["path"]).name, "val": v["metric"], "val_loss": v["loss"],
                              "test": te["metric"], "test_loss": te["loss"]}
                             for v, te in zip(on_val["checkpoints"], on_test["checkpoints"])]
    higher = res["higher_is_better"]
    sign = 1 if higher else -1
    best = max(res["candidates"], key=lambda c: (sign * c["val"], -c["val_loss"]))
    res["best_single"] = best["name"]

    outputs: dict[str, Path] = {}

    def do_fit(name: str, changes: dict, all_rows: bool) -> None:
        cfg = replace(FitConfig(), **changes, **({"holdout": 0.0} if all_rows else {}))
        if (all_rows or changes.get("init") is None) and name != "twa":
            # Baselines are only needed where they are the start point (init) or the evidence (twa).
            cfg = replace(cfg, greedy=False, eval_candidates=False)
        dst = output_path(work, name, hf)
        t0 = time.perf_counter()
        report = fit(ckpts, val=DataConfig(val), model=model, output=OutputConfig(dst), cfg=cfg)
        res["seconds"][name] = time.perf_counter() - t0
        res["fits"][name] = {"methods": report["methods"], "alphas": report["merge"]["block_alphas"]}
        outputs[name] = dst
        print(f"  {spec['name']}: {name} in {res['seconds'][name]:.0f}s", file=sys.stderr, flush=True)

    # The data-aware baselines as written files (BatchNorm re-estimated on the fit rows, like the report's).
    written = {**OPTIONS, "greedy": ({"init": "greedy", "epochs": 0}, False), "uniform": ({"epochs": 0}, False)}
    for name, (changes, all_rows) in written.items():
        if name not in res["test"]:
            do_fit(name, changes, all_rows)
    tuned = max(TUNED_LRS, key=lambda n: _key(_row(res["fits"][n]["methods"], "twa")["heldout"], higher))
    res["tuned_lr"] = TUNED_LRS[tuned]
    if tuned != "twa" and "tuned_refit" not in res["test"]:
        do_fit("tuned_refit", {"lr": TUNED_LRS[tuned]}, True)

    if outputs:
        # Scores on the test split of every file written now (one model build and one data load).
        t = time.perf_counter()
        scored = evaluate_checkpoints([str(p) for p in outputs.values()], val=DataConfig(test), model=model,
                                      batch_size=256)
        res["seconds"]["eval_outputs"] = res["seconds"].get("eval_outputs", 0.0) + time.perf_counter() - t
        for name, score in zip(outputs, scored["checkpoints"]):
            res["test"][name], res["test_loss"][name] = score["metric"], score["loss"]
    test = res["test"]
    if tuned == "twa":
        test["tuned_refit"], res["test_loss"]["tuned_refit"] = test["refit"], res["test_loss"]["refit"]
    res["picking"] = {"best_single": next(c["test"] for c in res["candidates"] if c["name"] == best["name"]),
                      "greedy": test["greedy"], "uniform": test["uniform"]}
    shutil.rmtree(work, ignore_errors=True)
    return res


def add_picks(res: dict) -> None:
    """The held-out picks, from the default fit's report only (no fit, no test score is used to choose).

    ``select`` is what ``--select best`` writes (the tool's own rule, ``report.best_on_heldout``).
    ``select_any`` lets every candidate compete on the held-out rows instead of the best on the fit rows
    (the best of K noisy held-out scores: an optimistic contender).
    """
    higher, test = res["higher_is_better"], res["test"]
    cand_test = {c["name"]: c["test"] for c in res["candidates"]}
    rows = [MethodResult(r["name"], r["kind"], r["fit"], r["heldout"]) for r in res["fits"]["twa"]["methods"]]
    others = [r for r in rows if r.kind != "candidate"]
    for name, contenders in (("select", rows),
                             ("select_any", [*others, best_candidate(rows, "heldout", higher)])):
        chosen = best_on_heldout(contenders, higher)
        res[f"{name}_choice"] = chosen.kind if chosen.kind != "candidate" else f"candidate {chosen.name}"
        test[name] = cand_test[chosen.name] if chosen.kind == "candidate" else test[chosen.kind]
        if name == "select":
            test["select_refit"] = test["refit"] if chosen.kind == "twa" else test[name]


def _row(rows: list[dict], kind: str) -> dict:
    return next(r for r in rows if r["kind"] == kind)


def _key(score: dict, higher: bool) -> tuple[float, float]:
    """Sort key of a held-out score: metric first (its better direction), then the lower loss."""
    return (score["metric"] if higher else -score["metric"], -score["loss"])


def _docstring_block(first: str) -> str:
    """The indented block of this module's docstring that starts with the line beginning ``first`` (the
    option list, the commands), for the generated page."""
    doc = __doc__ or ""
    start = doc.index(first)
    return doc[start:doc.index("\n\n", start)]


def render(results: list[dict]) -> str:
    lines = ["# Does TWA lose to picking?", "",
             "Generated by `python benchmarks/never_worse.py` from its per-pool result files; do not edit by hand. "
             "Every figure is measured on a test split that no step of any merge has seen. Picking: **best single** "
             "is the candidate with the best metric on all of `--val`; **greedy** is the greedy soup `twamerge fit` "
             "reports (ingredients chosen on the fit rows). The options:", "",
             *_docstring_block("    twa ").splitlines(), "", "Commands:", "",
             *_docstring_block("    python ").splitlines(), ""]
    head = ["pool", "K", "test rows", "best single", "greedy", "uniform", *SHOWN]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        f = (lambda x: f"{100 * x:.2f}") if r["metric"] == "accuracy" else (lambda x: f"{x:.4f}")
        pick = r["picking"]
        cells = [r["name"] + ("" if r["in_tests"] else " *"), str(r["k"]), str(r["test_rows"]),
                 f(pick["best_single"]), f(pick["greedy"]), f(pick["uniform"]), *(f(r["test"][n]) for n in SHOWN)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`*`: a pool the test suite does not contain.", "",
              "Each option against picking, per pool: the option's test metric minus the pick's (points for accuracy; "
              "positive is better), averaged over all pools and over the pools the tests do not contain (`*`). "
              "'Better pick' is the better of best single and greedy soup on the test split, known only in "
              "hindsight: the hardest bar; wins / ties / losses count the pools against it.", "",
              "| option | vs best single | vs greedy | vs better pick | vs better pick, `*` pools | worst | "
              "wins / ties / losses |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n in SHOWN:
        vs_single, vs_greedy, vs_better, hidden = [], [], [], []
        for r in results:
            sign = 1 if r["higher_is_better"] else -1
            scale = 100 if r["metric"] == "accuracy" else 1
            single, greedy = r["picking"]["best_single"], r["picking"]["greedy"]
            diff = lambda ref: round(scale * sign * (r["test"][n] - ref), 6)  # noqa: E731
            vs_single.append(diff(single))
            vs_greedy.append(diff(greedy))
            vs_better.append(diff(max(single, greedy, key=lambda x: sign * x)))
            if not r["in_tests"]:
                hidden.append(vs_better[-1])
        wins, ties = sum(d > 0 for d in vs_better), sum(d == 0 for d in vs_better)
        mean = lambda xs: f"{sum(xs) / len(xs):+.2f}" if xs else "-"  # noqa: E731
        lines.append(f"| {n} | {mean(vs_single)} | {mean(vs_greedy)} | {mean(vs_better)} | {mean(hidden)} | "
                     f"{min(vs_better):+.2f} | {wins} / {ties} / {len(vs_better) - wins - ties} |")
    # One line per kind of pool (its seeds differ in initialisation, data order and which rows go where).
    kinds: dict[str, list[dict]] = {}
    for r in results:
        kinds.setdefault(re.sub(r"_s\d+$", "", r["name"]), []).append(r)
    lines += ["", "## Pools", ""]
    for kind, rs in kinds.items():
        r = rs[0]
        names = ", ".join(f"`{x['name']}`" for x in rs)
        described = re.sub(r"\(seed \d+\)", "(per seed)", r["description"]) if len(rs) > 1 else r["description"]
        lines.append(f"- {names} (K = {r['k']}, {r['val_rows']} `--val` rows, {r['test_rows']} test rows): {described}")
    lines += ["", "Held-out choices of `select`: " + ", ".join(f"{r['name']}: {r['select_choice']}" for r in results)
              + "; lr chosen for `tuned_refit`: " + ", ".join(f"{r['name']}: {r['tuned_lr']}" for r in results) + ".",
              "", "Seconds per fit (default options): " + ", ".join(
                  f"{r['name']}: {r['seconds']['twa']:.0f}" for r in results) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=Path, nargs="+", required=True,
                    help="pool folders (pool.json, or an examples/finetune_soup output), or folders of them")
    ap.add_argument("--out", type=Path, default=Path("runs/never_worse"))
    ap.add_argument("--md", type=Path, help="write the markdown tables here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (small nets run faster on one)")
    args = ap.parse_args(argv)
    roots = []
    for p in args.pools:
        roots += [p] if pool_spec(p) else sorted(q for q in p.iterdir() if q.is_dir() and pool_spec(q))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for root in roots:
        done = args.out / f"{root.name}.json"
        previous = json.loads(done.read_text()) if done.exists() else None
        if previous is None or any(n not in previous["test"] for n in OPTIONS):
            print(f"pool {root.name}", file=sys.stderr, flush=True)
            done.write_text(json.dumps(run_pool(root, args.out, args.threads, previous), indent=1))
        res = json.loads(done.read_text())
        add_picks(res)
        done.write_text(json.dumps(res, indent=1))
        results.append(res)
    md = render(results)
    print(md)
    if args.md:
        args.md.write_text(md)


if __name__ == "__main__":
    main()
