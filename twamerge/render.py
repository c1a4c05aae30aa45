"""What the commands print, and where: results on stdout (one JSON object with ``--json``, else text
and rich tables), logs and progress bars on stderr.

Every renderer takes a command's JSON-able result and a ``rich`` console; none computes anything the
result does not hold, so ``--json`` and the text show the same figures.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

Renderer = Callable[[dict[str, Any], Console], None]


class _StderrHandler(logging.StreamHandler):
    """A stream handler that looks ``sys.stderr`` up at every record, so that a replaced stderr
    (test runners, redirection after start-up) is honoured and a closed one is never written to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


def configure_logging(verbose: int, quiet: bool) -> None:
    """twamerge's log records on stderr: INFO and up, DEBUG with ``-v``, only errors with ``-q``."""
    pkg = logging.getLogger("twamerge")
    if _HANDLER not in pkg.handlers:
        pkg.addHandler(_HANDLER)
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    pkg.setLevel(level)
    _HANDLER.setLevel(level)
    # -vv also shows what other libraries (torch, datasets, ...) log.
    if verbose >= 2 and not quiet:
        root = logging.getLogger()
        root.setLevel(logging.DEBUG)
        if _HANDLER not in root.handlers:
            root.addHandler(_HANDLER)
            pkg.removeHandler(_HANDLER)


def progress(description: str, quiet: bool) -> Callable[[Iterable[Any]], Iterable[Any]] | None:
    """A wrapper that shows a rich progress bar on stderr, or None under ``-q``."""
    if quiet:
        return None

    def wrap(items: Iterable[Any]) -> Iterable[Any]:
        from rich.progress import track

        items = list(items)
        return track(items, description=description, total=len(items), transient=True,
                     console=Console(file=sys.stderr))

    return wrap


def jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON takes it: NaN/Inf as None, paths as strings, tuples as lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def emit(result: dict[str, Any], json_out: bool, render: Renderer | None = None) -> None:
    """Print ``result`` to stdout: one JSON object (strict JSON, NaN/Inf as null) with ``--json``,
    otherwise through ``render`` (or indented JSON when there is no renderer)."""
    if json_out or render is None:
        sys.stdout.write(json.dumps(jsonable(result), indent=None if json_out else 2, allow_nan=False) + "\n")
        sys.stdout.flush()
        return
    render(result, Console(file=sys.stdout, soft_wrap=True))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def average_summary(result: dict[str, Any], console: Console) -> None:
    weights = ", ".join(f"{w:.4g}" for w in result["weights"])
    console.print(f"{result['method']} average of {result['count']} checkpoints (weights {weights}), "
                  f"{result['tensors']} tensors, {result['params']:,} parameters, dtype {result['dtype']}")
    for out in result["outputs"]:
        console.print(f"wrote {out['path']}  {human_bytes(out['bytes'])}  sha256 {out['sha256']}")


def inspect_summary(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{result['count']} checkpoint(s)")
    for col in ("#", "file", "format", "tensors", "params", "dtypes", "size"):
        table.add_column(col, justify="right" if col in ("#", "tensors", "params", "size") else "left")
    for i, f in enumerate(result["files"]):
        dtypes = ", ".join(f"{k}:{v}" for k, v in f["dtypes"].items())
        table.add_row(str(i), Path(f["path"]).name, f["format"], str(f["tensors"]), f"{f['params']:,}", dtypes,
                      human_bytes(f["bytes"]))
    console.print(table)
    lora = result.get("adapters")
    if lora:
        console.print(f"LoRA adapters of {lora['base_model']}: rank {lora['rank']}, {lora['modules']} modules "
                      f"({', '.join(lora['target_modules'])}), updates of {lora['update_params']:,} parameters"
                      + (f", {len(lora['whole_tensors'])} tensors saved whole" if lora["whole_tensors"] else "")
                      + ("" if lora["base_dir"] else " (the base is not a local folder: a fit needs --model BASE_DIR)"))
    if result["mergeable"]:
        console.print(f"mergeable: yes ({result['merged_tensors']} tensors, {result['float_params']:,} float "
                      "parameters)")
    else:
        console.print(f"mergeable: no: {result['reason']}")
    sim = result["similarity"]
    if sim:
        names = [str(i) for i in range(result["count"])]
        t = Table(title=f"centred checkpoints: cosine similarity / distance (rank {sim['rank']})")
        t.add_column("")
        for n in names:
            t.add_column(n, justify="right")
        for i, n in enumerate(names):
            cells = []
            for j in range(len(names)):
                c, d = sim["cosine"][i][j], sim["distance"][i][j]
                cells.append(f"{'-' if c is None else f'{c:+.3f}'} / {d:.3g}")
            t.add_row(n, *cells)
        console.print(t)
    mem = result["basis_memory"]
    parts = ", ".join(f"{b}-bit {human_bytes(n)}" for b, n in mem["bytes"].items())
    console.print(f"basis memory ({mem['rows']} rows, groups of {mem['group_size']}): {parts}")


def fit_summary(result: dict[str, Any], console: Console) -> None:
    console.print(f"wrote {', '.join(result['outputs'])}")
    twa = next(m for m in result["methods"] if m["kind"] == "twa")
    split = "heldout" if result["heldout_rows"] else "fit"
    # The best candidate's figure beside TWA's: the comparison --fail-if-worse makes, and the warning names.
    best = max((m for m in result["methods"] if m["kind"] == "candidate" and m.get(split)),
               key=lambda m: m[split]["metric"] * (1 if result["higher_is_better"] else -1), default=None)
    versus = f"best candidate: {best['name']}, {best[split]['metric']:.4f}" if best else "no candidates scored"
    console.print(f"twa {result['metric_name']} on the {split} split: {twa[split]['metric']:.4f} ({versus})")
    if result["written"]["kind"] != "twa":
        console.print(f"--select best: wrote {result['written']['name']}, the best on the held-out split")


def fit_table(report: dict[str, Any], console: Console) -> None:
    """Every method of a fit report on the fit and held-out splits (the written one in bold), then the basis."""
    metric = report["metric_name"]
    better = "higher" if report.get("higher_is_better", True) else "lower"
    table = Table(title=f"{metric}, {better} is better (held-out: {report['heldout_rows']} rows, "
                        f"fit: {report['data']['fit_rows']} rows)")
    for col in ("method", f"fit {metric}", f"held-out {metric}", "held-out loss"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in report["methods"]:
        fit_, held = row.get("fit") or {}, row.get("heldout") or {}
        name = row["name"] + (f" ({len(row['ingredients'])} ingredients)" if row.get("ingredients") else "")
        table.add_row(name, f"{fit_['metric']:.4f}" if fit_ else "-", f"{held['metric']:.4f}" if held else "-",
                      f"{held['loss']:.4f}" if held else "-",
                      style="bold" if row["name"] == report["written"]["name"] else None)
    console.print(table)
    sub = report["subspace"]
    console.print(f"basis: {sub['rows']} rows x {sub['n_params']:,} params at {sub['bits']} bits = "
                  f"{human_bytes(sub['basis_bytes'])}; {sub['dropped_directions']} directions dropped; "
                  f"quantization gap {sub['quantization_gap']:.2e}; "
                  f"{report['fit']['steps']} steps in {report['timings'].get('fit', 0):.1f} s")
    console.print(describe_fit(report["fit"]))
    soup = next((r for r in report["methods"] if r.get("subspace_gap")), None)
    if soup is not None:  # the greedy soup's trials are points of the subspace; its row is the exact soup's
        console.print(f"{soup['name']}: chosen in the subspace, where it scores held-out {metric} "
                      f"{soup['subspace']['heldout']['metric']:.4f} ({soup['subspace_gap']['metric']:+.4f} against "
                      "the exact soup in the table)")
    if not report["heldout_rows"]:
        console.print("[yellow]--holdout 0: every figure is on the data the coefficients were fit on[/yellow]")


def describe_fit(fit: dict[str, Any]) -> str:
    """One line on how the fit ended: each run's steps (and an early stop), and what the fit floor did."""
    runs = []
    for r in fit.get("runs", []):
        stop = r.get("stop")
        ended = (f", converged at step {stop['step']} (the last two windows of {stop['window']} steps: mean fit loss "
                 f"{-100 * stop['improvement']:+.2f}% against the best before them)") if stop else ""
        runs.append(f"from {r.get('start', '?')}: {r['steps']} of {r['budget']} steps{ended}")
    floor = fit.get("floor")
    if floor is None:
        verdict = "fit floor: off or not applicable"
    elif floor["action"] == "kept":
        verdict = (f"fit floor: kept (fit loss {floor['twa_fit_loss']:.4f} <= best baseline {floor['best_baseline']} "
                   f"{floor['best_fit_loss']:.4f})")
    else:
        returned = "" if floor["action"] == "continued" else f", still above: TWA's merge is {floor['best_baseline']}"
        verdict = (f"fit floor: the fit ended at fit loss {floor['twa_fit_loss']:.4f}, above {floor['best_baseline']} "
                   f"({floor['best_fit_loss']:.4f}); it continued from there to {floor['continued_fit_loss']:.4f}"
                   + returned)
    return "fit: " + "; ".join(runs or ["no steps"]) + "; " + verdict


def eval_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{result['rows']} rows")
    for col in ("checkpoint", "loss", result["metric_name"]):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for row in result["checkpoints"]:
        table.add_row(row["path"], f"{row['loss']:.4f}", f"{row['metric']:.4f}")
    console.print(table)


def apply_summary(result: dict[str, Any], console: Console) -> None:
    console.print(f"wrote {', '.join(result['outputs'])}")
