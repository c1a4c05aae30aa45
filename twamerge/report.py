"""The report of a fit: metrics of every method on the held-out split, alphas, settings, timings, memory.

The report is plain data (JSON-able dicts). The CLI renders it as a table; ``apply`` reads it back
to re-emit the same merge without data or model.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .errors import OutputError, TwamergeError
from .io.atomic import AtomicWrite, refuse_existing

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


@contextmanager
def atomic_output(path: Path, force: bool, what: str) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    Refuses to overwrite ``path`` without ``force``.
    """
    path = Path(path)
    refuse_existing(path, what, force=force)
    with AtomicWrite() as aw:
        try:
            tmp = aw.file(path, suffix=path.suffix or ".tmp")
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the {what} ({exc.strerror})") from exc
        yield tmp
        aw.commit()


def write_report(report: dict, path: Path, force: bool) -> None:
    """Write ``report`` as JSON atomically; refuse to overwrite without ``force``."""
    with atomic_output(path, force, "report") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def read_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TwamergeError(f"{path}: no such report file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise TwamergeError(f"{path}: not a readable JSON report ({exc})") from exc
    if not isinstance(report, dict) or report.get("report_version") != REPORT_VERSION or "merge" not in report:
        raise TwamergeError(f"{path}: not a twamerge fit report (report_version {REPORT_VERSION} with a 'merge' section)")
    missing = [k for k in ("candidates",) if not isinstance(report.get(k), list)] + [
        f"merge.{k}" for k in ("block_alphas", "key_block", "default_alphas", "metadata")
        if not isinstance(report["merge"], dict) or k not in report["merge"]]
    if missing:
        raise TwamergeError(f"{path}: the report lacks {', '.join(missing)}; was it edited or cut short?")
    return report
