"""The report of a fit: metrics of every method on the held-out split, alphas, settings, timings, memory.

The report is plain data (JSON-able dicts). The CLI renders it as a table; ``apply`` reads it back
to re-emit the same merge without data or model.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .errors import OutputError, TwamergeError

REPORT_VERSION = 1


@dataclass
class MethodResult:
    """One row of the comparison table."""

    name: str
    kind: str  # candidate | uniform | greedy | twa
    fit: dict | None = None  # {"loss", "metric", "n"} on the fit split
    heldout: dict | None = None  # the same on the held-out split
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "fit": self.fit, "heldout": self.heldout, **self.detail}


class Timer:
    """Named wall-clock phases."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peak_memory() -> dict:
    """Peak resident memory of this process (and of the CUDA allocator when used), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def best_candidate(rows: list[MethodResult], split: str, classification: bool) -> MethodResult | None:
    cands = [r for r in rows if r.kind == "candidate" and getattr(r, split) is not None]
    if not cands:
        return None
    key = (lambda r: getattr(r, split)["metric"]) if classification else (lambda r: -getattr(r, split)["metric"])
    return max(cands, key=key)


def is_better(a: dict, b: dict, classification: bool) -> bool:
    """Whether metrics ``a`` are strictly better than ``b``."""
    return a["metric"] > b["metric"] if classification else a["metric"] < b["metric"]


def format_table(report: dict) -> str:
    """A plain-text table of the methods (what the CLI prints on stderr, and the README shows)."""
    metric = report["metric_name"]
    split = "heldout" if report.get("heldout_rows", 0) else "fit"
    lines = [f"| method | fit {metric} | held-out {metric} | held-out loss |", "|---|---|---|---|"]
    for row in report["methods"]:
        fit = row.get("fit") or {}
        held = row.get("heldout") or {}
        def cell(d: dict, k: str) -> str:
            return f"{d[k]:.4f}" if d and d.get(k) is not None else "-"
        lines.append(f"| {row['name']} | {cell(fit, 'metric')} | {cell(held, 'metric')} | {cell(held, 'loss')} |")
    if split == "fit":
        lines.append("(--holdout 0: no held-out split exists; every figure is on the data the coefficients were fit on)")
    return "\n".join(lines)


def write_report(report: dict, path: Path, force: bool) -> None:
    """Write ``report`` as JSON atomically; refuse to overwrite without ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path}: report exists; pass --force to overwrite it")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the report ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TwamergeError(f"{path}: no such report file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise TwamergeError(f"{path}: not a readable JSON report ({exc})") from exc
    if not isinstance(report, dict) or report.get("report_version") != REPORT_VERSION or "merge" not in report:
        raise TwamergeError(f"{path}: not a twamerge fit report (report_version {REPORT_VERSION} with a 'merge' section)")
    return report
