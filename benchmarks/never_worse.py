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

    twa            the defaults (uniform start, 10 epochs and at least 150 steps with the early stop, the fit
                   floor, lr 0.05, 20% of --val held out)
    old            the defaults before issue 22: 10 epochs however few steps they are, no early stop, no fit floor
    no_stop        the defaults without the early stop (--stop-tol 0)
    min300         the defaults with at least 300 steps (--min-steps 300)
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
    greedy_span    the defaults fitted in the span of the greedy soup's ingredients only (their files are the
                   candidates of a second fit, which starts at their average: the greedy soup); the greedy soup
                   itself where it has one ingredient
    blocks_rows    data-size-aware blocks: at least ROWS_PER_COEF fit rows per fitted coefficient; B = fit rows //
                   (ROWS_PER_COEF x (K - 1)) blocks: layer where B reaches the number of tensors (then the
                   default fit itself), global where B <= 1, else size:N with N = parameters / B
    select_span    as select, with the greedy-span fit as a further contender (its held-out score)

Run (pools: a few minutes; the study: about an hour and a half on 2 shared CPU cores, most of it the
MiniLM soup, whose fits take about 3 minutes each; each process uses one thread, so two can run side by side).
``--options`` fits a subset (the picks that need other options are made when those are there), and
``--section`` writes the tables as a marked section of ``--md`` instead of the whole page, e.g. issue 22's
study of still-improving runs (docs/never_worse.md, its last section):

    python benchmarks/pools.py --seeds 0 --only digits,digits_early,fmnist_cnn16,fmnist_cnn16_half,fmnist_mlp_soup8,\
        mnist_mlp_epochs,lm_trainer
    python benchmarks/never_worse.py --pools runs/pools --out runs/never_worse22 --options twa,old,no_stop,min300 \
        --md docs/never_worse.md --section "Issue 22: the step budget and the fit floor"

and its second study (the 17 pools of the whole study below and the still-improving ones at several seeds, the
greedy span and the data-size-aware blocks; its section lists the exact commands) with
``--options twa,old,greedy_span,blocks_rows --section "Issue 22: the study again"``. Pools can be run in
separate processes (``--pools`` one pool each, the same ``--out``), then once more over all of them, which fits
nothing and writes the page.

The whole study:

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
    "old": ({"min_steps": 0, "stop_tol": 0.0, "fit_floor": False}, False),
    "no_stop": ({"stop_tol": 0.0}, False),
    "min300": ({"min_steps": 300}, False),
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
    # Fitted after the default fit, from what its report says (the greedy soup's ingredients; the fit rows, the
    # number of tensors and parameters): see run_pool.
    "greedy_span": ({}, False),
    "blocks_rows": ({}, False),
}
DERIVED_FITS = {"greedy_span", "blocks_rows"}
# blocks_rows: fit rows per coefficient, chosen before the study (a common rule of thumb for a regression's
# observations per parameter), not tuned on it.
ROWS_PER_COEF = 10
TUNED_LRS = {"lr0.02": 0.02, "twa": 0.05, "lr0.1": 0.1}
SHOWN = ["twa", "old", "no_stop", "min300", "init_greedy", "init_greedy_wd0.1", "init_greedy_wd0.3", "init_greedy_wd",
         "wd", "restarts3", "global", "refit", "tuned_refit", "select", "select_refit", "select_any", "greedy_span",
         "blocks_rows", "select_span"]
# What each derived pick needs fitted.
PICKS_NEED = {"select": {"twa"}, "select_any": {"twa"}, "select_refit": {"twa", "refit"},
              "tuned_refit": {"twa", "lr0.02", "lr0.1", "refit"}, "select_span": {"twa", "greedy_span"}}


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


def run_pool(root: Path, out: Path, threads: int, previous: dict | None = None,
             options: list[str] | None = None) -> dict:
    """Fit and score every option (of ``options``, default all) not yet in ``previous`` (a pool's earlier
    result), and the picks."""
    spec = pool_spec(root)
    ckpts, val, test = pool_paths(root, spec)
    hf = Path(ckpts[0]).is_dir()
    model = ModelConfig(spec.get("model"), spec.get("model_args") or {})
    work = out / "work" / spec["name"]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.set_num_threads(threads)
    res: dict = previous or {"name": spec["name"], "in_tests": spec.get("in_tests", False),
                             "improving": spec.get("improving", False),
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

    def do_fit(name: str, changes: dict, all_rows: bool, files: list[str] | None = None) -> None:
        cfg = replace(FitConfig(), **changes, **({"holdout": 0.0} if all_rows else {}))
        if (all_rows or changes.get("init") is None) and name not in ("twa", "greedy_span"):
            # Baselines are only needed where they are the start point (init) or the evidence (twa; the greedy
            # span's held-out score, which select_span compares, is its twa row).
            cfg = replace(cfg, greedy=False, eval_candidates=False)
        dst = output_path(work, name, hf)
        t0 = time.perf_counter()
        report = fit(files or ckpts, val=DataConfig(val), model=model, output=OutputConfig(dst), cfg=cfg)
        res["seconds"][name] = time.perf_counter() - t0
        res["fits"][name] = {"methods": report["methods"], "alphas": report["merge"]["block_alphas"],
                             "steps": report["fit"]["steps"], "runs": report["fit"].get("runs"),
                             "floor": report["fit"].get("floor"), "blocks": cfg.blocks,
                             "fit_rows": report["data"]["fit_rows"], "n_params": report["subspace"]["n_params"],
                             "n_blocks": len(report["blocks"]), "k": len(files or ckpts)}
        outputs[name] = dst
        print(f"  {spec['name']}: {name} in {res['seconds'][name]:.0f}s", file=sys.stderr, flush=True)

    # The data-aware baselines as written files (BatchNorm re-estimated on the fit rows, like the report's).
    chosen = {n: OPTIONS[n] for n in (options or OPTIONS)}
    written = {**chosen, "greedy": ({"init": "greedy", "epochs": 0}, False), "uniform": ({"epochs": 0}, False)}
    if DERIVED_FITS & set(chosen) and "twa" not in res["fits"]:
        written = {"twa": OPTIONS["twa"], **written}  # what they are derived from
    for name, (changes, all_rows) in written.items():
        if name in res["test"] or name in DERIVED_FITS:
            continue
        if name == "no_stop" and "twa" in outputs and not any(r["stop"] for r in res["fits"]["twa"]["runs"] or []):
            # The early stop changes a fit only from the step where it stops: the default fit did not stop, so the
            # fit without the rule is the same computation (same seed, same steps), not fitted a second time.
            res["fits"][name], res["seconds"][name] = {**res["fits"]["twa"], "same_as": "twa"}, 0.0
            outputs[name] = outputs["twa"]
            continue
        do_fit(name, changes, all_rows)
    for name in [n for n in chosen if n in DERIVED_FITS and n not in res["test"]]:
        derived_fit(name, res, ckpts, outputs, do_fit)
    tuned = None
    if PICKS_NEED["tuned_refit"] <= set(res["fits"]):
        tuned = max(TUNED_LRS, key=lambda n: _key(_row(res["fits"][n]["methods"], "twa")["heldout"], higher))
        res["tuned_lr"] = TUNED_LRS[tuned]
        if tuned != "twa" and "tuned_refit" not in res["test"]:
            do_fit("tuned_refit", {"lr": TUNED_LRS[tuned]}, True)

    if outputs:
        # Scores on the test split of every file written now (one model build and one data load).
        t = time.perf_counter()
        files = list(dict.fromkeys(str(p) for p in outputs.values()))  # a file shared by two options, once
        scored = evaluate_checkpoints(files, val=DataConfig(test), model=model, batch_size=256)
        res["seconds"]["eval_outputs"] = res["seconds"].get("eval_outputs", 0.0) + time.perf_counter() - t
        by_file = dict(zip(files, scored["checkpoints"]))
        for name, path in outputs.items():
            res["test"][name], res["test_loss"][name] = by_file[str(path)]["metric"], by_file[str(path)]["loss"]
    test = res["test"]
    if tuned == "twa":
        test["tuned_refit"], res["test_loss"]["tuned_refit"] = test["refit"], res["test_loss"]["refit"]
    res["picking"] = {"best_single": next(c["test"] for c in res["candidates"] if c["name"] == best["name"]),
                      "greedy": test["greedy"], "uniform": test["uniform"]}
    shutil.rmtree(work, ignore_errors=True)
    return res


def derived_fit(name: str, res: dict, ckpts: list[str], outputs: dict, do_fit) -> None:
    """Fit ``greedy_span`` or ``blocks_rows`` from the default fit's report (``res["fits"]["twa"]``); where the
    option amounts to a merge already written (one greedy ingredient; the layer blocks), reuse it, not refit."""
    twa = res["fits"]["twa"]
    if name == "greedy_span":
        ingredients = _row(twa["methods"], "greedy")["ingredients"]
        by_name = {n: c for c in ckpts for n in (Path(c).name, Path(c).stem)}
        files = [by_name[i] for i in ingredients]
        if len(files) > 1:
            do_fit(name, {}, False, files)
            res["fits"][name]["ingredients"] = ingredients
        else:  # one ingredient: the span is that point, the greedy soup
            res["fits"][name] = {"same_as": "greedy", "ingredients": ingredients}
            _reuse(name, "greedy", res, outputs)
        return
    blocks = rows_blocks(twa["fit_rows"], res["k"], twa["n_blocks"], twa["n_params"])
    if blocks == twa["blocks"]:
        res["fits"][name] = {**twa, "same_as": "twa"}
        _reuse(name, "twa", res, outputs)
    else:
        do_fit(name, {"blocks": blocks}, False)


def _reuse(name: str, source: str, res: dict, outputs: dict) -> None:
    """Option ``name`` is the merge ``source`` already made: its file now, or its stored test scores."""
    res["seconds"][name] = 0.0
    if source in outputs:
        outputs[name] = outputs[source]
    else:
        res["test"][name], res["test_loss"][name] = res["test"][source], res["test_loss"][source]


def rows_blocks(fit_rows: int, k: int, n_tensors: int, n_params: int) -> str:
    """The ``--blocks`` value of the data-size-aware rule (``blocks_rows``): at most one fitted coefficient
    (K - 1 per block: the weights sum to one) per ROWS_PER_COEF fit rows."""
    n = fit_rows // (ROWS_PER_COEF * max(1, k - 1))
    if n >= n_tensors:
        return "layer"
    return "global" if n <= 1 else f"size:{-(-n_params // n)}"


def add_picks(res: dict) -> None:
    """The held-out picks, from the default fit's report only (no fit, no test score is used to choose).

    ``select`` is what ``--select best`` writes (the tool's own rule, ``report.best_on_heldout``).
    ``select_any`` lets every candidate compete on the held-out rows instead of the best on the fit rows
    (the best of K noisy held-out scores: an optimistic contender).
    """
    higher, test = res["higher_is_better"], res["test"]
    last = max(res["candidates"], key=lambda c: _natural(c["name"]))
    res["last"] = {"name": last["name"], "test": last["test"], "test_loss": last["test_loss"]}
    if "twa" not in res["fits"]:
        return
    cands = {c["name"]: c for c in res["candidates"]}
    loss = res["test_loss"]

    def pick(name: str, chosen: MethodResult | str) -> None:
        """Option ``name`` is what ``chosen`` (a method row, or an option's name) wrote: its test scores."""
        kind = chosen if isinstance(chosen, str) else chosen.kind
        if kind == "candidate":
            res[f"{name}_choice"] = f"candidate {chosen.name}"
            test[name], loss[name] = cands[chosen.name]["test"], cands[chosen.name]["test_loss"]
        else:
            res[f"{name}_choice"], test[name], loss[name] = kind, test[kind], loss[kind]

    rows = [MethodResult(r["name"], r["kind"], r["fit"], r["heldout"]) for r in res["fits"]["twa"]["methods"]]
    others = [r for r in rows if r.kind != "candidate"]
    for name, contenders in (("select", rows),
                             ("select_any", [*others, best_candidate(rows, "heldout", higher)])):
        chosen = best_on_heldout(contenders, higher)
        pick(name, chosen)
        if name == "select" and "refit" in test:
            test["select_refit"] = test["refit"] if chosen.kind == "twa" else test[name]
    span = res["fits"].get("greedy_span")
    if span is not None and "greedy_span" in test:
        # select's choice, or the greedy-span fit where its held-out score (its own twa row; the greedy row where
        # it is the greedy soup) is strictly better: the same rule as --select best, one contender more.
        score = _row(span["methods"], "twa")["heldout"] if "methods" in span else \
            _row(res["fits"]["twa"]["methods"], "greedy")["heldout"]
        chosen = best_on_heldout(rows, higher)
        better = score is not None and chosen.heldout is not None and _key(score, higher) > _key(chosen.heldout, higher)
        pick("select_span", "greedy_span" if better else chosen)


def _natural(name: str) -> list:
    """Sort key that puts checkpoint-25 before checkpoint-100 (the last checkpoint of a run is the greatest)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
    """The whole page: the options, the commands, and the tables of :func:`_tables`."""
    lines = ["# Does TWA lose to picking?", "",
             "Generated by `python benchmarks/never_worse.py` from its per-pool result files; do not edit by hand. "
             "Every figure is measured on a test split that no step of any merge has seen. Picking: **best single** "
             "is the candidate with the best metric on all of `--val`; **greedy** is the greedy soup `twamerge fit` "
             "reports (ingredients chosen on the fit rows). The options:", "",
             *_docstring_block("    twa ").splitlines(), "", "Commands:", "",
             *_docstring_block("    python benchmarks/pools.py --seeds 0,1").splitlines(), ""]
    return "\n".join(lines + _tables(results, "##")) + "\n"


def render_section(results: list[dict], title: str, command: str, options: list[str]) -> str:
    """A section of the page for a study of some pools and ``options`` (``--section``): what ran, and its tables
    (those options, and the picks made from them)."""
    shown = [n for n in _shown(results) if n in options or PICKS_NEED.get(n, {n}) <= set(options)]
    options = _keep_option_lines(_docstring_block("    twa ").splitlines(), shown)
    lines = [f"## {title}", "",
             f"Generated by `python benchmarks/never_worse.py ... --section` from the result files of the pools "
             f"below and nothing else ({len(results)} pools); the tables above are earlier studies "
             "and are left as they were. Same rules: every figure is on a test split no step of any merge has "
             "seen; **last** is the run's last checkpoint. Seconds are wall time on a shared CPU whose load varied "
             "during the study: the steps say what each fit cost. The options:", "",
             *options, "", "Commands (the pools, then the study):", "", *(f"    {c}" for c in pools_commands(results)),
             f"    {command}", ""]
    return "\n".join(lines + _tables(results, "###", shown)) + "\n"


def pools_commands(results: list[dict]) -> list[str]:
    """The commands that build the pools of ``results``: ``benchmarks/pools.py`` for those named
    ``<kind>_s<seed>`` (one command per set of seeds), examples/finetune_soup for the MiniLM soup."""
    seeds: dict[str, list[int]] = {}
    for r in results:
        if m := re.search(r"^(.*)_s(\d+)$", r["name"]):
            seeds.setdefault(m.group(1), []).append(int(m.group(2)))
    by_seeds: dict[str, list[str]] = {}
    for kind, ss in seeds.items():
        by_seeds.setdefault(f"--seeds {','.join(map(str, sorted(ss)))} ", []).append(kind)
    other = [r["name"] for r in results if r["name"] != FINETUNE_SOUP["name"] and not re.search(r"_s\d+$", r["name"])]
    if other:  # a pool named without a seed
        by_seeds[""] = other
    lines = [f"python benchmarks/pools.py {ss}--only {','.join(kinds)}" for ss, kinds in by_seeds.items()]
    if any(r["name"] == FINETUNE_SOUP["name"] for r in results):
        lines.append("python examples/finetune_soup/run.py --out runs/finetune_soup --variants layer:8")
    return lines


def _keep_option_lines(lines: list[str], shown: list[str]) -> list[str]:
    """The docstring's option lines (with their continuation lines) of the options shown."""
    kept, keep = [], False
    for line in lines:
        name = line.split()[0]
        if line.startswith("    " + name) and not line.startswith("     "):
            keep = name in shown
        if keep:
            kept.append(line)
    return kept


def _shown(results: list[dict]) -> list[str]:
    """The options (and picks) every pool has a test figure for, in the order of SHOWN."""
    return [n for n in SHOWN if all(n in r["test"] for r in results)]


def _diff(r: dict, value: float, ref: float) -> float:
    """``value`` against ``ref`` on pool ``r``, positive when better: points for accuracy, percent of ``ref``
    for a lower-is-better metric (perplexity)."""
    if r["higher_is_better"]:
        return round(100 * (value - ref), 6) if r["metric"] == "accuracy" else round(value - ref, 6)
    return round(100 * (ref - value) / ref, 6)


def _tables(results: list[dict], level: str, shown: list[str] | None = None) -> list[str]:
    shown = _shown(results) if shown is None else shown
    improving = any(r.get("improving") for r in results)
    head = ["pool", "K", "test rows", "best single", "greedy", "uniform", *(["last"] if improving else []), *shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        f = (lambda x: f"{100 * x:.2f}") if r["metric"] == "accuracy" else (lambda x: f"{x:.4f}")
        pick = r["picking"]
        mark = ("" if r["in_tests"] else " *") + (" +" if r.get("improving") else "")
        cells = [r["name"] + mark, str(r["k"]), str(r["test_rows"]), f(pick["best_single"]), f(pick["greedy"]),
                 f(pick["uniform"]), *([f(r["last"]["test"])] if improving else []), *(f(r["test"][n]) for n in shown)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`*`: a pool the test suite does not contain." + (" `+`: a run still improving at its last "
              "checkpoint." if improving else ""), ""]
    for unit, group in (("points of accuracy (positive is better)", [r for r in results if r["metric"] == "accuracy"]),
                        ("percent of the pick's perplexity (positive: a lower perplexity, better)",
                         [r for r in results if r["metric"] != "accuracy"])):
        if group:
            lines += _summary(group, shown, unit, improving)
    lines += _loss_vs_last([r for r in results if r.get("improving") and r["metric"] == "accuracy"], shown)
    kinds: dict[str, list[dict]] = {}
    for r in results:
        kinds.setdefault(re.sub(r"_s\d+$", "", r["name"]), []).append(r)
    lines += [f"{level} Pools", ""]
    for kind, rs in kinds.items():
        r = rs[0]
        names = ", ".join(f"`{x['name']}`" for x in rs)
        described = re.sub(r"\(seed \d+\)", "(per seed)", r["description"]) if len(rs) > 1 else r["description"]
        lines.append(f"- {names} (K = {r['k']}, {r['val_rows']} `--val` rows, {r['test_rows']} test rows): {described}")
    notes = []
    if "select" in shown:
        notes.append("Held-out choices of `select`: "
                     + ", ".join(f"{r['name']}: {r['select_choice']}" for r in results))
    if "tuned_refit" in shown:
        notes.append("lr chosen for `tuned_refit`: " + ", ".join(f"{r['name']}: {r['tuned_lr']}" for r in results))
    if "select_span" in shown:
        notes.append("Held-out choices of `select_span`: "
                     + ", ".join(f"{r['name']}: {r['select_span_choice']}" for r in results))
    if "greedy_span" in shown:
        notes.append("Greedy ingredients (the greedy span's K): "
                     + ", ".join(f"{r['name']}: {len(r['fits']['greedy_span']['ingredients'])}" for r in results))
    if "blocks_rows" in shown:
        notes.append("`--blocks` of `blocks_rows` (fit rows, blocks): " + ", ".join(
            f"{r['name']}: {r['fits']['blocks_rows']['blocks']} ({r['fits']['twa']['fit_rows']}, "
            f"{r['fits']['blocks_rows']['n_blocks']})" for r in results))
    lines += ["", ". ".join(notes) + "." if notes else ""]
    lines += ["", "Seconds per fit: " + "; ".join(
        f"{r['name']}: " + ", ".join(f"{n} {r['seconds'][n]:.0f}" for n in shown if n in r["seconds"])
        for r in results) + "."]
    steps = [r for r in results if any("steps" in r["fits"].get(n, {}) for n in shown)]
    if steps:
        lines += ["", "Fit steps taken (of the budget; `floor`: what the fit floor did): " + "; ".join(
            f"{r['name']}: " + ", ".join(_steps_text(n, r["fits"][n]) for n in shown if "steps" in r["fits"].get(n, {}))
            for r in steps) + "."]
    return lines


def _loss_vs_last(results: list[dict], shown: list[str]) -> list[str]:
    """Test loss against the last checkpoint's on the still-improving accuracy pools (on a perplexity pool the
    perplexity table says it): what the fit minimises, where the accuracy and the loss can disagree."""
    if not results:
        return []
    lines = ["Test loss against the last checkpoint's on the still-improving accuracy pools, in percent of its "
             "loss (positive: a lower loss, better); what the fit minimises, where accuracy may disagree.", "",
             "| option | " + " | ".join(r["name"] for r in results) + " |", "|---|" + "---:|" * len(results)]
    for n in ["greedy", "uniform", *shown]:
        cells = [f"{100 * (r['last']['test_loss'] - r['test_loss'][n]) / r['last']['test_loss']:+.1f}"
                 if n in r["test_loss"] else "-" for r in results]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _steps_text(name: str, fit: dict) -> str:
    runs = fit.get("runs") or []
    budget = "+".join(str(x["budget"]) for x in runs) or "?"
    stopped = [str(x["stop"]["step"]) for x in runs if x.get("stop")]
    text = f"{name} {fit['steps']}/{budget}" + (f" (converged at {', '.join(stopped)})" if stopped else "")
    floor = fit.get("floor")
    return text + (f" floor {floor['action']}" if floor else "")


def _summary(results: list[dict], shown: list[str], unit: str, improving: bool) -> list[str]:
    """Each option against picking, averaged over ``results`` (pools of one kind of metric)."""
    pools = f"{len(results)} pool" + ("s" if len(results) > 1 else "")
    lines = [f"Each option against picking, in {unit}, averaged over these {pools} "
             "and over the pools the tests do not contain (`*`). 'Better pick' is the better of best single "
             "and greedy soup on the test split, known only in hindsight: the hardest bar; wins / ties / losses "
             "count the pools against it."
             + (" 'vs last': against the run's last checkpoint, over the still-improving pools (`+`), and how many "
                "of them the option beats." if improving else ""),
             "",
             "| option | vs best single | vs greedy | vs better pick | vs better pick, `*` pools | worst | "
             "wins / ties / losses |" + (" vs last, `+` pools | beats last |" if improving else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if improving else "")]
    mean = lambda xs: f"{sum(xs) / len(xs):+.2f}" if xs else "-"  # noqa: E731
    for n in shown:
        vs_single, vs_greedy, vs_better, hidden, vs_last = [], [], [], [], []
        for r in results:
            sign = 1 if r["higher_is_better"] else -1
            single, greedy = r["picking"]["best_single"], r["picking"]["greedy"]
            vs_single.append(_diff(r, r["test"][n], single))
            vs_greedy.append(_diff(r, r["test"][n], greedy))
            vs_better.append(_diff(r, r["test"][n], max(single, greedy, key=lambda x: sign * x)))
            if not r["in_tests"]:
                hidden.append(vs_better[-1])
            if r.get("improving"):
                vs_last.append(_diff(r, r["test"][n], r["last"]["test"]))
        wins, ties = sum(d > 0 for d in vs_better), sum(d == 0 for d in vs_better)
        row = (f"| {n} | {mean(vs_single)} | {mean(vs_greedy)} | {mean(vs_better)} | {mean(hidden)} | "
               f"{min(vs_better):+.2f} | {wins} / {ties} / {len(vs_better) - wins - ties} |")
        if improving:
            row += f" {mean(vs_last)} | {sum(d > 0 for d in vs_last)} of {len(vs_last)} |"
        lines.append(row)
    return lines + [""]


def write_section(path: Path, title: str, text: str) -> None:
    """Put ``text`` into ``path`` between the markers of section ``title`` (replacing an earlier version of it),
    or at the end; the rest of the page is left as it is."""
    begin, end = f"<!-- section: {title} -->", f"<!-- end of section: {title} -->"
    page = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}{end}\n"
    if begin in page and end in page:
        page = page[:page.index(begin)] + block + page[page.index(end) + len(end) + 1:]
    else:
        page = page + ("\n" if page and not page.endswith("\n\n") else "") + block
    path.write_text(page)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=Path, nargs="+", required=True,
                    help="pool folders (pool.json, or an examples/finetune_soup output), or folders of them")
    ap.add_argument("--out", type=Path, default=Path("runs/never_worse"))
    ap.add_argument("--md", type=Path, help="write the markdown tables here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (small nets run faster on one)")
    ap.add_argument("--options", default=",".join(OPTIONS), help="comma-separated options to fit (default: all)")
    ap.add_argument("--section", help="write the tables as this section of --md (the rest of the page is kept)")
    args = ap.parse_args(argv)
    options = [o for o in args.options.split(",") if o]
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        ap.error(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    roots = []
    for p in args.pools:
        roots += [p] if pool_spec(p) else sorted(q for q in p.iterdir() if q.is_dir() and pool_spec(q))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for root in roots:
        done = args.out / f"{root.name}.json"
        previous = json.loads(done.read_text()) if done.exists() else None
        if previous is None or any(n not in previous["test"] for n in options):
            print(f"pool {root.name}", file=sys.stderr, flush=True)
            done.write_text(json.dumps(run_pool(root, args.out, args.threads, previous, options), indent=1))
        res = json.loads(done.read_text())
        add_picks(res)
        done.write_text(json.dumps(res, indent=1))
        results.append(res)
    if args.section:
        command = "python benchmarks/never_worse.py " + " ".join(a if " " not in a else f'"{a}"' for a in
                                                                  (argv if argv is not None else sys.argv[1:]))
        md = render_section(results, args.section, command, options)
    else:
        md = render(results)
    print(md)
    if args.md:
        write_section(args.md, args.section, md) if args.section else args.md.write_text(md)


if __name__ == "__main__":
    main()
